//! This host in its fleet: its session, the services it owns (claims), and what it reads
//! of the others.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use etcd_client::{Compare, CompareOp, DeleteOptions, GetOptions, PutOptions, Txn, TxnOp};
use host::state::KeyRing;
use parking_lot::{Mutex, RwLock};

use crate::{
    error::FleetError,
    etcd::{Endpoints, Etcd},
    keys::Keys,
    session::{NodeRecord, Session},
};

/// The shortest lease etcd keeps reliably at its default election settings.
pub const MIN_LEASE_TTL: Duration = Duration::from_secs(2);

/// How a host joins a fleet.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// etcd's members, TLS and authentication.
    pub endpoints: Endpoints,
    /// This host's name in the fleet (unique among live hosts).
    pub node: String,
    /// The lease's TTL, whole seconds, at least [`MIN_LEASE_TTL`]: how long a host that
    /// died keeps its services before the others take them.
    pub lease_ttl: Duration,
    /// The fleet's keys start with this.
    pub prefix: String,
}

/// This host in its fleet: its session, the services it owns, and the state store.
#[derive(Debug)]
pub struct Fleet {
    etcd: Etcd,
    pub(crate) keys: Keys,
    pub(crate) node: String,
    ttl: Duration,
    pub(crate) keyring: KeyRing,
    session: RwLock<Option<Arc<Session>>>,
    /// The services this host owns: the create revision of each one's owner key.
    claims: Mutex<BTreeMap<String, i64>>,
    /// The owners last read (service → node), for `list` and misdirected requests.
    owners: RwLock<BTreeMap<String, String>>,
    /// State writes etcd refused because this host no longer owned the service.
    pub(crate) refused: AtomicU64,
    /// Bytes of sealed state this host wrote to etcd (chunks and inline states).
    pub(crate) written: AtomicU64,
    /// The generation of each service's state this host last wrote or read.
    pub(crate) generations: Mutex<HashMap<String, String>>,
    /// This host's token in its node records (tells its own earlier lease from others').
    instance: String,
}

impl Fleet {
    /// Connects to etcd and joins as `config.node`, sealing states with `keyring`.
    pub fn join(config: &FleetConfig, keyring: KeyRing) -> Result<Arc<Fleet>, FleetError> {
        check_lease_ttl(config.lease_ttl).map_err(FleetError::Config)?;
        check_node_name(&config.node).map_err(FleetError::Config)?;
        // Every call must end well within the lease: a renewal waits for none of them, but
        // a claim or a write that took longer than the lease would be fenced anyway.
        let timeout = (config.lease_ttl / 2).min(Duration::from_secs(5));
        let etcd = Etcd::connect(&config.endpoints, timeout)?;
        let keys = Keys::new(&config.prefix);
        let instance = crate::session::random_token();
        let session = Session::open(&etcd, &keys, &config.node, config.lease_ttl, &instance)?;
        tracing::info!(
            node = %config.node,
            etcd = %etcd.endpoints(),
            lease = session.lease(),
            ttl = ?config.lease_ttl,
            "joined the fleet"
        );
        Ok(Arc::new(Fleet {
            etcd,
            keys,
            node: config.node.clone(),
            ttl: config.lease_ttl,
            keyring,
            session: RwLock::new(Some(Arc::new(session))),
            claims: Mutex::default(),
            owners: RwLock::default(),
            refused: AtomicU64::new(0),
            written: AtomicU64::new(0),
            generations: Mutex::default(),
            instance,
        }))
    }

    /// This host's node name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The lease TTL.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// How long before its lease may end a host stops serving: a tenth of the TTL, at
    /// least 200 ms.
    pub fn guard(&self) -> Duration {
        (self.ttl / 10).max(Duration::from_millis(200))
    }

    /// etcd's members, for messages.
    pub fn endpoints(&self) -> String {
        self.etcd.endpoints()
    }

    /// The keys.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// The session, while it lasts.
    pub fn session(&self) -> Option<Arc<Session>> {
        self.session.read().clone()
    }

    /// Whether this host's lease is certainly valid now (with the guard to spare).
    pub fn is_live(&self) -> bool {
        // Asked for every request in a fleet: no clone of the session.
        self.session
            .read()
            .as_ref()
            .is_some_and(|s| s.is_valid(self.guard()))
    }

    /// Ends a session that is no longer valid, forgetting every claim: returns the
    /// services this host owned. The lease is abandoned, not revoked (etcd may still have
    /// it, and keep its keys until its TTL).
    pub fn lose_session(&self) -> Vec<String> {
        if let Some(session) = self.session.write().take() {
            session.abandon();
        }
        let lost: Vec<String> = std::mem::take(&mut *self.claims.lock())
            .into_keys()
            .collect();
        lost
    }

    /// Takes a new lease once the last one ended (etcd is back, or the host was paused).
    pub fn renew_session(&self) -> Result<(), FleetError> {
        let session = Session::open(&self.etcd, &self.keys, &self.node, self.ttl, &self.instance)?;
        tracing::info!(node = %self.node, lease = session.lease(), "rejoined the fleet with a new lease");
        *self.session.write() = Some(Arc::new(session));
        Ok(())
    }

    /// Leaves the fleet: revokes the lease, so that every service this host owned is free
    /// for the others at once. Call it once every state is saved.
    pub fn leave(&self) {
        self.claims.lock().clear();
        if let Some(session) = self.session.write().take() {
            session.revoke(&self.etcd);
        }
    }

    /// Claims `services` (a group placed together), all or none: each gets an owner key
    /// under this host's lease, if none has one. Returns whether this host now owns them.
    pub fn claim(&self, services: &[String]) -> Result<bool, FleetError> {
        let session = self
            .session()
            .filter(|s| s.is_valid(self.guard()))
            .ok_or(FleetError::NoSession)?;
        let lease = session.lease();
        let free: Vec<Compare> = services
            .iter()
            .map(|s| Compare::version(self.keys.owner(s), CompareOp::Equal, 0))
            .collect();
        let puts: Vec<TxnOp> = services
            .iter()
            .map(|s| {
                TxnOp::put(
                    self.keys.owner(s),
                    self.node.clone(),
                    Some(PutOptions::new().with_lease(lease)),
                )
            })
            .collect();
        let txn = Txn::new().when(free).and_then(puts);
        let response =
            self.etcd.call(
                "claiming services",
                move |mut c| async move { c.txn(txn).await },
            )?;
        if !response.succeeded() {
            return Ok(false);
        }
        // Created by this transaction: the owner keys' create revision is its revision.
        let revision = response.header().map_or(0, |h| h.revision());
        let mut claims = self.claims.lock();
        let mut owners = self.owners.write();
        let mut generations = self.generations.lock();
        for service in services {
            claims.insert(service.clone(), revision);
            owners.insert(service.clone(), self.node.clone());
            // Another host may have written since this one last did: its generation is
            // read from the pointer again before the next write replaces it.
            generations.remove(service);
        }
        Ok(true)
    }

    /// Gives `services` up (their owner keys deleted while still this host's): for a group
    /// this host could not start. Forgets the claims whatever etcd said.
    pub fn release(&self, services: &[String]) -> Result<(), FleetError> {
        let mut ops = Vec::new();
        let mut fences = Vec::new();
        {
            let mut claims = self.claims.lock();
            for service in services {
                if let Some(revision) = claims.remove(service) {
                    fences.push(Compare::create_revision(
                        self.keys.owner(service),
                        CompareOp::Equal,
                        revision,
                    ));
                    ops.push(TxnOp::delete(self.keys.owner(service), None));
                }
            }
        }
        if ops.is_empty() {
            return Ok(());
        }
        let txn = Txn::new().when(fences).and_then(ops);
        self.etcd
            .call("releasing services", move |mut c| async move {
                c.txn(txn).await
            })?;
        Ok(())
    }

    /// Forgets this host's claims of `services` (etcd gives them to another host, or to
    /// none): it no longer answers for them.
    pub fn forget(&self, services: &[String]) {
        let mut claims = self.claims.lock();
        for service in services {
            claims.remove(service);
        }
    }

    /// Puts this host's node key back under its lease, if it is gone (deleted by hand).
    pub fn register_again(&self) -> Result<(), FleetError> {
        let session = self.session().ok_or(FleetError::NoSession)?;
        session.register(&self.etcd, &self.keys, &self.node, &self.instance)
    }

    /// Whether this host owns `service` now: it claimed it, and its lease is certainly
    /// valid.
    pub fn owns(&self, service: &str) -> bool {
        self.claims.lock().contains_key(service) && self.is_live()
    }

    /// The services this host claimed.
    pub fn claimed(&self) -> Vec<String> {
        self.claims.lock().keys().cloned().collect()
    }

    /// The owner of `service` as last read; never this host while it does not own the
    /// service now (its lease lapsed: another host may have it).
    pub fn owner_of(&self, service: &str) -> Option<String> {
        let owner = self.owners.read().get(service).cloned()?;
        (owner != self.node || self.owns(service)).then_some(owner)
    }

    /// Reads every service's owner from etcd (and remembers them).
    pub fn read_owners(&self) -> Result<BTreeMap<String, String>, FleetError> {
        Ok(self
            .read_owner_keys()?
            .into_iter()
            .map(|(service, (node, _))| (service, node))
            .collect())
    }

    /// Reads every service's owner from etcd (and remembers them), with the lease each
    /// owner key is held under.
    pub fn read_owner_keys(&self) -> Result<BTreeMap<String, (String, i64)>, FleetError> {
        let prefix = self.keys.owners();
        let got = self.etcd.call("reading the owners", {
            let prefix = prefix.clone();
            move |mut c| async move { c.get(prefix, Some(GetOptions::new().with_prefix())).await }
        })?;
        let keys: BTreeMap<String, (String, i64)> = got
            .kvs()
            .iter()
            .filter_map(|kv| {
                let service = kv.key_str().ok()?.strip_prefix(&prefix)?.to_owned();
                Some((service, (kv.value_str().ok()?.to_owned(), kv.lease())))
            })
            .collect();
        let owners: BTreeMap<String, String> = keys
            .iter()
            .map(|(service, (node, _))| (service.clone(), node.clone()))
            .collect();
        *self.owners.write() = owners;
        Ok(keys)
    }

    /// The live nodes (those whose lease holds their key), with their lease's id.
    pub fn read_nodes(&self) -> Result<Vec<(NodeRecord, i64)>, FleetError> {
        let prefix = self.keys.nodes();
        let got = self
            .etcd
            .call("reading the nodes", move |mut c| async move {
                c.get(prefix, Some(GetOptions::new().with_prefix())).await
            })?;
        Ok(got
            .kvs()
            .iter()
            .filter_map(|kv| Some((serde_json::from_slice(kv.value()).ok()?, kv.lease())))
            .collect())
    }

    /// Whether etcd still has `lease` (a node's): a lease that ended is gone from etcd
    /// (revoked, or expired and revoked by etcd) before the keys it held are.
    pub fn lease_lives(&self, lease: i64) -> Result<bool, FleetError> {
        let got = self.etcd.call(
            "asking etcd whether a node's lease lives",
            move |mut c| async move { c.lease_time_to_live(lease, None).await },
        )?;
        // etcd answers -1 for a lease it does not have.
        Ok(got.ttl() >= 0)
    }

    /// How many state writes etcd refused because this host no longer owned the service.
    pub fn refused_writes(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// The fence of a write of `service`'s state: its owner key is still the one this
    /// host's claim created. `None` when this host never claimed it (or forgot the claim).
    pub(crate) fn fence(&self, service: &str) -> Option<Compare> {
        let revision = *self.claims.lock().get(service)?;
        Some(Compare::create_revision(
            self.keys.owner(service),
            CompareOp::Equal,
            revision,
        ))
    }

    pub(crate) fn etcd(&self) -> &Etcd {
        &self.etcd
    }

    /// Removes a whole generation of chunks (best effort: a leftover is only space).
    pub(crate) fn remove_generation(&self, service: &str, generation: &str) {
        let prefix = self.keys.generation(service, generation);
        let _ = self
            .etcd
            .call("removing a state generation", move |mut c| async move {
                c.delete(prefix, Some(DeleteOptions::new().with_prefix()))
                    .await
            });
    }
}

impl host::kernel::Placement for Fleet {
    fn owns(&self, service: &str) -> bool {
        Fleet::owns(self, service)
    }

    fn owner_of(&self, service: &str) -> Option<String> {
        Fleet::owner_of(self, service)
    }

    fn stats(&self) -> host::metrics::FleetStats {
        let lease_valid = self.session().map_or(Duration::ZERO, |session| {
            session
                .valid_until()
                .saturating_duration_since(std::time::Instant::now())
        });
        host::metrics::FleetStats {
            refused_writes: self.refused_writes(),
            lease_valid,
            owned: self.claimed().len(),
        }
    }
}

/// Whether etcd keeps a lease of `ttl`: whole seconds (it counts in seconds), at least
/// [`MIN_LEASE_TTL`]; why not.
pub fn check_lease_ttl(ttl: Duration) -> Result<(), String> {
    if ttl < MIN_LEASE_TTL || ttl.subsec_nanos() != 0 {
        return Err(format!(
            "the lease TTL must be whole seconds, at least {MIN_LEASE_TTL:?} (etcd keeps leases by the second): got {ttl:?}"
        ));
    }
    Ok(())
}

/// Whether `name` can name a node: 1 to 64 letters, digits, `-`, `_`, `.`; why not.
pub fn check_node_name(name: &str) -> Result<(), String> {
    let fits = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if fits {
        Ok(())
    } else {
        Err(format!(
            "node name `{name}` must be 1 to 64 characters: letters, digits, `-`, `_`, `.`"
        ))
    }
}
