//! A host's membership of the fleet: its lease, kept alive on the etcd runtime, and how long
//! it is certainly still valid by this host's own clock.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp, TxnOpResponse};
use parking_lot::Mutex;

use crate::{error::FleetError, etcd::Etcd, keys::Keys};

/// How long this host's lease is certainly valid: etcd ends a lease no sooner than its TTL
/// after it received the last renewal, so a renewal *sent* at `t` and answered keeps the
/// lease until at least `t + TTL`, whatever the network did meanwhile.
#[derive(Debug)]
pub(crate) struct Validity {
    until: Mutex<Instant>,
    ended: AtomicBool,
    renewals: AtomicU64,
}

impl Validity {
    fn renewed(&self, until: Instant) {
        let mut current = self.until.lock();
        if until > *current {
            *current = until;
        }
        self.renewals.fetch_add(1, Ordering::Relaxed);
    }

    fn end(&self) {
        self.ended.store(true, Ordering::Release);
    }

    fn ended(&self) -> bool {
        self.ended.load(Ordering::Acquire)
    }
}

/// One lease of this host, and its node key (`PREFIX/nodes/NODE`) under it. Every service
/// the host owns has its owner key under the same lease: when the lease ends, etcd removes
/// them all at once.
#[derive(Debug)]
pub struct Session {
    lease: i64,
    ttl: Duration,
    validity: Arc<Validity>,
}

/// What a node key holds: who the node is, for `ctl fleet`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NodeRecord {
    /// The node's name.
    pub node: String,
    /// The host's process id on its machine.
    pub pid: u32,
    /// When it joined (Unix seconds).
    pub since: u64,
    /// A random token of the host (`Fleet`) that wrote it: tells this host's own earlier
    /// lease from another host's.
    #[serde(default)]
    pub instance: String,
}

/// A random token: a host's in its node records (see [`NodeRecord::instance`]), a state's
/// generation.
pub(crate) fn random_token() -> String {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).expect("the operating system's random source failed");
    hex::encode(bytes)
}

impl Session {
    /// Takes a lease of `ttl` (whole seconds) and registers `node` under it. Refused when
    /// another live host has the same node name.
    pub(crate) fn open(
        etcd: &Etcd,
        keys: &Keys,
        node: &str,
        ttl: Duration,
        instance: &str,
    ) -> Result<Session, FleetError> {
        let seconds = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let sent = Instant::now();
        let granted = etcd.call("granting the lease", move |mut c| async move {
            c.lease_grant(seconds, None).await
        })?;
        let lease = granted.id();
        let granted_ttl = Duration::from_secs(u64::try_from(granted.ttl()).unwrap_or(0));
        let validity = Arc::new(Validity {
            until: Mutex::new(sent + granted_ttl.min(ttl)),
            ended: AtomicBool::new(false),
            renewals: AtomicU64::new(0),
        });
        let session = Session {
            lease,
            ttl,
            validity,
        };
        if let Err(error) = session.register(etcd, keys, node, instance) {
            session.revoke(etcd);
            return Err(error);
        }
        etcd.spawn(keep_alive(
            etcd.client(),
            lease,
            ttl,
            session.validity.clone(),
        ));
        Ok(session)
    }

    /// Puts the node key under this lease, unless a key is there: refused when another
    /// live host has the name (or this host's own earlier lease still holds it).
    pub(crate) fn register(
        &self,
        etcd: &Etcd,
        keys: &Keys,
        node: &str,
        instance: &str,
    ) -> Result<(), FleetError> {
        let record = NodeRecord {
            node: node.to_owned(),
            pid: std::process::id(),
            since: unix_now(),
            instance: instance.to_owned(),
        };
        let key = keys.node(node);
        let value = serde_json::to_vec(&record).expect("a node record serializes");
        let lease = self.lease;
        let txn = Txn::new()
            .when([Compare::version(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.clone(),
                value,
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else([TxnOp::get(key, None)]);
        let response = etcd.call("registering the node", move |mut c| async move {
            c.txn(txn).await
        })?;
        if response.succeeded() {
            return Ok(());
        }
        let held = response.op_responses().into_iter().find_map(|op| match op {
            TxnOpResponse::Get(get) => get.kvs().first().map(|kv| {
                (
                    kv.lease(),
                    serde_json::from_slice::<NodeRecord>(kv.value()).ok(),
                )
            }),
            _ => None,
        });
        match held {
            // Already this lease's.
            Some((holder, _)) if holder == lease => Ok(()),
            Some((_, record)) => Err(FleetError::NodeInUse {
                node: node.to_owned(),
                pid: record.as_ref().map(|r| r.pid),
                mine: record.is_some_and(|r| r.instance == instance),
            }),
            None => Err(FleetError::NodeInUse {
                node: node.to_owned(),
                pid: None,
                mine: false,
            }),
        }
    }

    /// The lease's id.
    pub fn lease(&self) -> i64 {
        self.lease
    }

    /// The lease's TTL.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Until when the lease is certainly valid, by this host's clock.
    pub fn valid_until(&self) -> Instant {
        *self.validity.until.lock()
    }

    /// Whether the lease is certainly valid now, with `guard` to spare: a host stops
    /// serving its services `guard` before its lease may end.
    pub fn is_valid(&self, guard: Duration) -> bool {
        !self.validity.ended() && Instant::now() + guard < self.valid_until()
    }

    /// Renewals answered so far.
    pub fn renewals(&self) -> u64 {
        self.validity.renewals.load(Ordering::Relaxed)
    }

    /// Ends the session: stops renewing, and revokes the lease (its keys go at once: the
    /// host's services are free for others). Best effort.
    pub(crate) fn revoke(&self, etcd: &Etcd) {
        self.validity.end();
        let lease = self.lease;
        if let Err(error) = etcd.call("revoking the lease", move |mut c| async move {
            c.lease_revoke(lease).await
        }) {
            tracing::warn!(lease, error = %host::error_chain(&error), "the lease could not be revoked: it ends at its TTL");
        }
    }

    /// Stops renewing without revoking: the lease runs out at its TTL.
    pub(crate) fn abandon(&self) {
        self.validity.end();
    }
}

/// Renews the lease every third of its TTL until the session ends or the lease is gone. A
/// broken stream (etcd restarted, a member lost) is opened again: etcd-client's keepalive
/// does not reconnect by itself.
async fn keep_alive(
    mut client: etcd_client::Client,
    lease: i64,
    ttl: Duration,
    validity: Arc<Validity>,
) {
    let period = ttl / 3;
    let retry = Duration::from_millis(100).min(period);
    while !validity.ended() {
        let opened = tokio::time::timeout(period, client.lease_keep_alive(lease)).await;
        let Ok(Ok((mut keeper, mut stream))) = opened else {
            tokio::time::sleep(retry).await;
            continue;
        };
        loop {
            if validity.ended() {
                return;
            }
            let sent = Instant::now();
            if keeper.keep_alive().await.is_err() {
                break;
            }
            match tokio::time::timeout(period, stream.message()).await {
                Ok(Ok(Some(answer))) if answer.ttl() > 0 => {
                    let granted = Duration::from_secs(u64::try_from(answer.ttl()).unwrap_or(0));
                    validity.renewed(sent + granted.min(ttl));
                }
                Ok(Ok(Some(_))) => {
                    // etcd says the lease is gone: no renewal can bring it back.
                    tracing::error!(lease, "etcd ended this host's lease");
                    validity.end();
                    return;
                }
                _ => break,
            }
            tokio::time::sleep(period).await;
        }
        tokio::time::sleep(retry).await;
    }
}

pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
