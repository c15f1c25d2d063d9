//! Where a fleet keeps what in etcd, under its prefix (`--cluster-prefix`, `/microkernel`):
//!
//! | key | value | lease |
//! |---|---|---|
//! | `P/nodes/NODE` | the node's record (JSON) | the node's |
//! | `P/owner/SERVICE` | the owning node's name | the owner's |
//! | `P/state/SERVICE/current` | the state's pointer (a JSON line: generation, chunks, length), then the sealed state when it is held inline | none |
//! | `P/state/SERVICE/gen/GEN/NNNNNN` | a chunk of the sealed state, in order | none |
//! | `P/state/SERVICE/bad-SECONDS` | a pointer set aside (a state that would not open) | none |

/// The keys of one fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// The keys under `prefix` (a trailing `/` is dropped).
    pub fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.trim_end_matches('/').to_owned(),
        }
    }

    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Every node's key starts with this.
    pub fn nodes(&self) -> String {
        format!("{}/nodes/", self.prefix)
    }

    /// A node's key.
    pub fn node(&self, node: &str) -> String {
        format!("{}{node}", self.nodes())
    }

    /// Every owner key starts with this.
    pub fn owners(&self) -> String {
        format!("{}/owner/", self.prefix)
    }

    /// A service's owner key.
    pub fn owner(&self, service: &str) -> String {
        format!("{}{service}", self.owners())
    }

    /// A service's state keys start with this.
    pub fn state(&self, service: &str) -> String {
        format!("{}/state/{service}/", self.prefix)
    }

    /// A service's state pointer.
    pub fn current(&self, service: &str) -> String {
        format!("{}current", self.state(service))
    }

    /// The chunks of one generation of a service's state start with this.
    pub fn generation(&self, service: &str, generation: &str) -> String {
        format!("{}gen/{generation}/", self.state(service))
    }

    /// One chunk.
    pub fn chunk(&self, service: &str, generation: &str, index: usize) -> String {
        format!("{}{index:06}", self.generation(service, generation))
    }

    /// Where a pointer set aside goes.
    pub fn set_aside(&self, service: &str, stamp: u64) -> String {
        format!("{}bad-{stamp}", self.state(service))
    }
}
