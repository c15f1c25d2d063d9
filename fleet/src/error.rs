//! Why a fleet operation failed.

use std::{path::PathBuf, time::Duration};

/// Why a fleet operation failed. Each names etcd's members and what was being done.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// etcd answered with an error, or could not be reached.
    #[error("etcd {endpoints}: {op} failed")]
    Etcd {
        /// The members.
        endpoints: String,
        /// What was being done.
        op: &'static str,
        /// What etcd (or the transport) said.
        #[source]
        source: etcd_client::Error,
    },
    /// etcd did not answer in time.
    #[error("etcd {endpoints}: {op} did not finish within {timeout:?}")]
    TimedOut {
        /// The members.
        endpoints: String,
        /// What was being done.
        op: &'static str,
        /// The call timeout.
        timeout: Duration,
    },
    /// The runtime for etcd's client could not be started.
    #[error("the runtime for the etcd client could not be started")]
    Runtime {
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file of the configuration (a certificate, a key, a password) could not be read.
    #[error("{what} {path}: reading failed")]
    File {
        /// The file.
        path: PathBuf,
        /// What it is.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The configuration contradicts itself.
    #[error("{0}")]
    Config(String),
    /// Another live host has this node name.
    #[error("{}", if *mine { format!("node name `{node}` is still held by this host's own earlier lease: it is free once that lease ends (a lease TTL)") } else { format!("node name `{node}` is in use by another live host{}: give each host its own --node", pid.map(|p| format!(" (pid {p} on its machine)")).unwrap_or_default()) })]
    NodeInUse {
        /// The name.
        node: String,
        /// The other host's process id, if it said.
        pid: Option<u32>,
        /// Whether the holder is this very process (an earlier lease of its own).
        mine: bool,
    },
    /// This host has no lease: it lost it, and has not got a new one yet.
    #[error("this host has no valid lease in the fleet")]
    NoSession,
}
