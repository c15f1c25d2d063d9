//! The control socket: a Unix domain socket (mode 0600, peers of another uid refused) that
//! speaks one JSON object per line each way. `microkernel ctl` is its client.
//!
//! Bounded against clients that misbehave (see [`Limits`]): one thread reads every
//! connection and writes every answer without blocking (`poll`), so an idle connection, or
//! one that does not read its answer, costs a descriptor and a buffer, never a thread; a few
//! workers carry whole requests out. Requests have a maximum size, connections an idle
//! timeout, answers a time limit to be read, and connections a cap (at the cap the oldest
//! idle connection gives way; with none idle the newcomer is told "busy"), and
//! every malformed request gets an error answer.

mod commands;
mod server;

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use anyhow::{bail, Context as _};
use serde::{Deserialize, Serialize};

pub use server::{ControlServer, Limits};

use host::ServiceInfo;

/// One service as `list` reports it: the control protocol's own type (`ctl list --json`
/// prints it), made from the kernel's [`ServiceInfo`] and the reloader's verdicts, so that
/// neither engine type is a wire format.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceEntry {
    /// Service name.
    pub name: String,
    /// Version of the loaded library.
    pub version: String,
    /// Lifecycle status, one lowercase word (`registered`, `starting`, `running`,
    /// `stopping`, `stopped`, `failed`).
    pub status: String,
    /// Services it depends on.
    pub dependencies: Vec<String>,
    /// The plugin file.
    pub path: std::path::PathBuf,
    /// SHA-256 of the plugin file, hex.
    pub sha256: String,
    /// When the current library was loaded (seconds since the Unix epoch).
    pub loaded_since: u64,
    /// How many hot replaces it went through.
    pub swaps: u64,
    /// The last error, if any.
    pub last_error: Option<String>,
    /// Earlier libraries of the service that stay loaded because plugin code may still run
    /// in them, one line each.
    #[serde(default)]
    pub pinned: Vec<String>,
    /// Plugin files of the service the host rejected, and why, one line each: not chosen
    /// again until their content or the service's configuration changes.
    #[serde(default)]
    pub rejected: Vec<String>,
    /// Why the service will not start after a restart, when no plugin file of the
    /// directory provides it any more.
    #[serde(default)]
    pub no_plugin_file: Option<String>,
    /// Where its instance runs: `in-process` (the host's own process) or `isolated` (a
    /// worker process of its own).
    #[serde(default)]
    pub mode: String,
    /// The worker process of an isolated service.
    #[serde(default)]
    pub worker: Option<WorkerEntry>,
    /// The node that owns it, in a fleet.
    #[serde(default)]
    pub owner: Option<String>,
}

/// An isolated service's worker process, as `list` shows it.
/// The fleet as `fleet` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetView {
    /// This host's node name.
    pub node: String,
    /// etcd's members.
    pub etcd: String,
    /// This host's lease (hex, as `etcdctl lease` shows it), while it has one.
    pub lease: Option<String>,
    /// The lease's TTL.
    pub lease_ttl_ms: u64,
    /// How long the lease is certainly valid still, by this host's clock.
    pub valid_for_ms: Option<u64>,
    /// State writes etcd refused because this host no longer owned the service.
    pub refused_writes: u64,
    /// The live nodes, each with the services it owns.
    pub nodes: Vec<FleetNode>,
    /// Services loaded here that no node owns.
    pub unowned: Vec<String>,
}

/// A node of the fleet, as `fleet` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetNode {
    pub node: String,
    pub pid: u32,
    /// When it joined (Unix seconds).
    pub since: u64,
    /// Its lease (hex, as `etcdctl lease` shows it).
    #[serde(default)]
    pub lease: String,
    pub services: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerEntry {
    /// Its process id; `null` between a crash and the restart, or once given up.
    pub pid: Option<u32>,
    /// Workers started again after a crash (since this version was loaded).
    pub restarts: u64,
    /// Workers lost: a signal, an exit, a closed socket, no answer in time.
    pub crashes: u64,
    /// How the last one ended (`was killed by SIGSEGV (core dumped) during handle`).
    pub last_crash: Option<String>,
    /// Whether it crashed too often to be restarted (the service is then `failed`).
    pub gave_up: bool,
    /// What confines it beyond its own process, when asked for (`landlock: enforced`, or
    /// why not).
    #[serde(default)]
    pub confined: Option<String>,
}

impl WorkerEntry {
    /// One line for the table's section.
    pub fn describe(&self) -> String {
        let pid = self
            .pid
            .map_or("no process".to_owned(), |pid| format!("pid {pid}"));
        let mut line = format!(
            "{pid}, {} restart{}, {} crash{}",
            self.restarts,
            if self.restarts == 1 { "" } else { "s" },
            self.crashes,
            if self.crashes == 1 { "" } else { "es" }
        );
        if let Some(last) = &self.last_crash {
            line.push_str(&format!("; last: {last}"));
        }
        if self.gave_up {
            line.push_str("; not restarted any more (crashed too often)");
        }
        if let Some(confined) = &self.confined {
            line.push_str(&format!("; {confined}"));
        }
        line
    }
}

impl ServiceEntry {
    /// What `list` says of the service `info` describes, whose rejected files are `rejected`.
    pub fn new(info: ServiceInfo, rejected: Vec<String>, no_plugin_file: Option<String>) -> Self {
        ServiceEntry {
            status: info.status.to_string(),
            name: info.name,
            version: info.version,
            dependencies: info.dependencies,
            path: info.path,
            sha256: info.sha256,
            loaded_since: info.loaded_since,
            swaps: info.swaps,
            last_error: info.last_error,
            pinned: info.pinned,
            rejected,
            no_plugin_file,
            mode: if info.process.is_some() {
                "isolated"
            } else {
                "in-process"
            }
            .to_owned(),
            owner: info.owner,
            worker: info.process.map(|p| WorkerEntry {
                pid: p.pid,
                restarts: p.restarts,
                crashes: p.crashes,
                last_crash: p.last_crash,
                gave_up: p.gave_up,
                confined: p.confined,
            }),
        }
    }
}

/// A command sent to the host.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Request {
    /// The services.
    List,
    /// A request to a service.
    Send {
        /// Target service.
        service: String,
        /// Request kind.
        kind: String,
        /// Payload, hex.
        payload: String,
        /// Timeout in milliseconds; the host's default when absent.
        timeout_ms: Option<u64>,
    },
    /// A rescan.
    Reload {
        /// Limit to one service.
        service: Option<String>,
        /// Try the files rejected earlier again.
        #[serde(default)]
        retry: bool,
    },
    /// A checkpoint of every service.
    Checkpoint,
    /// Stop a service.
    Stop {
        /// The service.
        service: String,
    },
    /// Start a service.
    Start {
        /// The service.
        service: String,
    },
    /// The fleet.
    Fleet,
}

/// The host's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "lowercase")]
pub enum Response {
    /// `list`.
    Services {
        /// Every service.
        services: Vec<ServiceEntry>,
        /// Plugin files that failed to load for a reason of their own (they provide no
        /// service the host could tell), one line each.
        #[serde(default)]
        broken: Vec<String>,
        /// Services that are not registered and have rejected files only: `(service, line)`.
        #[serde(default)]
        rejected_elsewhere: Vec<(String, String)>,
        /// Services that run or have a state file, and that no plugin file provides:
        /// `(service, why)`.
        #[serde(default)]
        orphaned: Vec<(String, String)>,
    },
    /// `send`.
    Reply {
        /// Reply code.
        code: u32,
        /// Reply message.
        message: String,
        /// Reply data, hex.
        data: String,
    },
    /// What was done, line by line (`reload`, `checkpoint`, `start`, `stop`); `failed` when
    /// any line is an error.
    Done {
        /// One line per action.
        lines: Vec<String>,
        /// Whether something failed.
        failed: bool,
    },
    /// `fleet`.
    Fleet(Box<FleetView>),
    /// The command could not be carried out.
    Error {
        /// Why.
        message: String,
    },
}

/// Sends one command to the host listening on `path` and returns its response, waiting at
/// most `wait` for it.
pub fn call(path: &Path, request: &Request, wait: Duration) -> anyhow::Result<Response> {
    let mut stream = UnixStream::connect(path).with_context(|| {
        format!("cannot connect to control socket {} (is the host running? see --socket and --state-dir)", path.display())
    })?;
    // Only a host of this user (or root) is told anything: a socket another user bound in
    // its place would get the request, and could forge the answer.
    let peer = nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)
        .with_context(|| format!("asking who serves control socket {}", path.display()))?;
    let me = nix::unistd::geteuid().as_raw();
    if peer.uid() != me && peer.uid() != 0 {
        bail!(
            "control socket {} is served by uid {} (process {}), neither yours (uid {me}) nor root's: nothing sent (another user may have put it there)",
            path.display(),
            peer.uid(),
            peer.pid()
        );
    }
    stream.set_read_timeout(Some(wait))?;
    stream.set_write_timeout(Some(wait))?;
    let no_answer = |e: std::io::Error| {
        if matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ) {
            anyhow::anyhow!(
                "no answer from the host on control socket {} within {} (see ctl --wait)",
                path.display(),
                humantime::format_duration(wait)
            )
        } else {
            anyhow::Error::new(e).context(format!(
                "talking to the host on control socket {}",
                path.display()
            ))
        }
    };
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    // A host that refuses the connection (busy) answers and closes before reading: its
    // answer is read even when the request could not be written.
    let written = stream.write_all(line.as_bytes());
    let mut answer = String::new();
    BufReader::new(&stream)
        .read_line(&mut answer)
        .map_err(no_answer)?;
    if answer.is_empty() {
        written.map_err(no_answer)?;
        bail!(
            "the host closed control socket {} without answering",
            path.display()
        );
    }
    serde_json::from_str(&answer).with_context(|| format!("bad answer from the host: {answer}"))
}

#[cfg(test)]
mod tests;
