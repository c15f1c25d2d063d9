//! A fleet of microkernel hosts sharing one etcd: each service's state kept in etcd, sealed
//! as on disk, and one owner per service whose every state write is fenced.
//!
//! - [`etcd`]: the client, on a tokio runtime of its own; the kernel's threads wait for
//!   each call with a deadline.
//! - [`session`]: this host's lease, kept alive, and how long it is certainly valid by the
//!   host's own clock.
//! - [`Fleet`]: claims (an owner key per service, under the lease), fenced writes (a
//!   transaction that succeeds only while the owner key is the one this host created), and
//!   the state store the kernel uses ([`host::state::StateBackend`]).
//! - [`member`]: placement and failover: which services this host runs.
//! - [`local`]: a one-member etcd on loopback, for the tests and `bench --fleet`.
//!
//! **Invariant: a state write succeeds only while its writer owns the service.** Every write
//! of a service's state is a transaction comparing the create revision of the service's
//! owner key with the one this host's claim created. A host whose lease ended (paused,
//! partitioned, or just slow) no longer has that key, whatever it believes: its writes are
//! refused by etcd, counted and logged.

mod error;
pub mod etcd;
mod keys;
pub mod local;
pub mod member;
mod owner;
pub mod session;
mod store;

pub use error::FleetError;
pub use etcd::{Endpoints, Etcd};
pub use keys::Keys;
pub use member::Member;
pub use owner::{check_lease_ttl, check_node_name, Fleet, FleetConfig, MIN_LEASE_TTL};
pub use session::{NodeRecord, Session};
