//! Placement and failover: which services this host runs.
//!
//! Every host loads the same plugins; each service runs on one host, the one that owns it.
//! Services that depend on each other are placed together: the unit of placement is a
//! connected group of the dependency graph. A thread (`fleet`) does, every quarter of the
//! lease TTL (at most every 500 ms):
//!
//! 1. If this host's lease may have ended (no renewal answered in time, by its own clock,
//!    with the guard to spare), it stops every service it owned without saving (another
//!    host may own them by now: their state is the last checkpoint in etcd), says so, and
//!    takes a new lease when etcd answers again.
//! 2. It reads the owners and the live nodes, and stops any service it believed it owned
//!    that etcd gives to no one or to another host.
//! 3. It claims groups no host owns, up to its fair share (the groups divided by the live
//!    nodes, rounded up), and starts them from their state in etcd. A group it cannot start
//!    (its plugin version cannot import the state, say) is released at once and not tried
//!    again here for ten TTLs; the log says why.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
    time::{Duration, Instant},
};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender};
use host::{loader::threads, Kernel, ServiceInfo};
use sha2::{Digest, Sha256};

use crate::owner::Fleet;

/// This host's part in the fleet: the thread that places services, while it runs.
#[derive(Debug)]
pub struct Member {
    stop: Option<Sender<()>>,
    thread: Option<threads::HostThread>,
}

impl Member {
    /// Starts placing `kernel`'s services as a member of `fleet`.
    pub fn spawn(fleet: Arc<Fleet>, kernel: Arc<Kernel>) -> std::io::Result<Member> {
        let (stop, stopped) = bounded(1);
        let thread = threads::spawn("fleet", move || {
            let mut placer = Placer {
                fleet,
                kernel,
                held_back: HashMap::new(),
                told_no_etcd: false,
                failing_since: None,
                last_owners: BTreeMap::new(),
            };
            placer.run(&stopped);
        })?;
        Ok(Member {
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Stops placing (services keep running as they are), waiting for the thread until
    /// `deadline`.
    pub fn stop(&mut self, deadline: Instant) {
        drop(self.stop.take());
        if let Some(mut thread) = self.thread.take() {
            thread.join_until(deadline);
        }
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.stop(Instant::now() + Duration::from_secs(5));
    }
}

struct Placer {
    fleet: Arc<Fleet>,
    kernel: Arc<Kernel>,
    /// Groups this host leaves to others until then: those it could not start, and those
    /// whose owner still lives (see [`Placer::wait_for_live_owners`]).
    held_back: HashMap<Vec<String>, Instant>,
    /// Whether the log already says etcd fails this host (said once, until it answers).
    told_no_etcd: bool,
    /// Since when etcd has failed this host's reads (refused them, or not answered).
    failing_since: Option<Instant>,
    /// The owners read at the last step, with the lease each owner key was held under.
    last_owners: BTreeMap<String, (String, i64)>,
}

impl Placer {
    /// How often the owners are read: a quarter of the TTL, at most 500 ms.
    fn tick(&self) -> Duration {
        (self.fleet.ttl() / 4).min(Duration::from_millis(500))
    }

    fn run(&mut self, stopped: &Receiver<()>) {
        let tick = self.tick();
        loop {
            self.step();
            // Woken when the lease may end, if that comes before the next tick: a host
            // stops serving on its own clock, not a tick late.
            let wait = match self.fleet.session() {
                Some(session) if !self.fleet.claimed().is_empty() => {
                    let stop_at = session
                        .valid_until()
                        .checked_sub(self.fleet.guard())
                        .unwrap_or_else(Instant::now);
                    tick.min(stop_at.saturating_duration_since(Instant::now()))
                }
                _ => tick,
            };
            match stopped.recv_timeout(wait.max(Duration::from_millis(10))) {
                Err(RecvTimeoutError::Timeout) => {}
                _ => return,
            }
        }
    }

    fn step(&mut self) {
        if !self.fleet.is_live() {
            self.lose_everything("this host's lease may have ended (no renewal answered in time)");
            if let Err(error) = self.fleet.renew_session() {
                self.no_etcd(&error);
                return;
            }
        }
        let owner_keys = match self.fleet.read_owner_keys() {
            Ok(keys) => keys,
            Err(error) => return self.no_etcd(&error),
        };
        let owners: BTreeMap<String, String> = owner_keys
            .iter()
            .map(|(service, (node, _))| (service.clone(), node.clone()))
            .collect();
        let live: BTreeSet<String> = match self.fleet.read_nodes() {
            Ok(nodes) => nodes.into_iter().map(|(record, _)| record.node).collect(),
            Err(error) => return self.no_etcd(&error),
        };
        let nodes = live.len().max(1);
        if self.told_no_etcd {
            tracing::info!(etcd = %self.fleet.endpoints(), "etcd answers again");
            self.told_no_etcd = false;
        }
        self.failing_since = None;
        let node = self.fleet.node().to_owned();
        // What this host claimed but etcd gives to another, or to no one: its lease ended
        // on etcd's side first.
        let gone: Vec<String> = self
            .fleet
            .claimed()
            .into_iter()
            .filter(|service| owners.get(service) != Some(&node))
            .collect();
        if !gone.is_empty() {
            tracing::error!(services = %gone.join(", "), "etcd no longer gives these services to this host: stopping them without saving");
            // Forgotten first: from now on no request is answered for them here, while
            // they stop (the owner keys are not this host's: nothing to release).
            self.fleet.forget(&gone);
            self.stop_unsaved(&gone);
        }
        // This host's own node key, gone while its lease lives (deleted by hand): put back,
        // so that the others see it alive.
        if !live.contains(&node) {
            if let Err(error) = self.fleet.register_again() {
                tracing::warn!(error = %host::error_chain(&error), "this host's node key is gone and could not be put back");
            }
        }
        let groups = groups(&self.kernel.list());
        let share = groups.len().div_ceil(nodes);
        let mut mine = groups
            .iter()
            .filter(|group| group.iter().all(|s| owners.get(s) == Some(&node)))
            .count();
        let now = Instant::now();
        self.held_back.retain(|_, until| *until > now);
        self.wait_for_live_owners(&groups, &owners, &live, now);
        self.last_owners = owner_keys;
        let mut free: Vec<&Vec<String>> = groups
            .iter()
            .filter(|group| group.iter().all(|s| !owners.contains_key(s)))
            .filter(|group| !self.held_back.contains_key(*group))
            .collect();
        // Each node tries the free groups in an order of its own, so that hosts starting
        // together do not all race for the same group first.
        free.sort_by_key(|group| Sha256::digest(format!("{node}/{}", group[0]).as_bytes()));
        for group in free {
            if mine >= share {
                break;
            }
            match self.fleet.claim(group) {
                Ok(true) => {
                    if self.take(group) {
                        mine += 1;
                    }
                }
                Ok(false) => {}
                Err(error) => return self.no_etcd(&error),
            }
        }
    }

    /// A group whose owner key went while its owner still lives (deleted by hand, or given
    /// up): that host stops it at its next read of the owners, a tick at most; the group is
    /// taken only after that, so that no two hosts serve it. The owner lives when its node
    /// key is there, or when etcd still has the lease its owner key was held under (its node
    /// key may have been deleted by hand too). A dead owner's lease is gone from etcd before
    /// its keys are: its groups are taken at once.
    fn wait_for_live_owners(
        &mut self,
        groups: &[Vec<String>],
        owners: &BTreeMap<String, String>,
        live: &BTreeSet<String>,
        now: Instant,
    ) {
        let node = self.fleet.node();
        let until = now + self.tick() * 2 + self.fleet.guard();
        let mut lease_alive: BTreeMap<i64, bool> = BTreeMap::new();
        for group in groups {
            let Some((previous, lease)) = group.iter().find_map(|s| self.last_owners.get(s)) else {
                continue;
            };
            // Owned at the last read, gone now: once per disappearance.
            let gone = group.iter().all(|s| !owners.contains_key(s));
            if !gone || previous == node {
                continue;
            }
            // Not known (etcd failed the call): taken for alive, which costs two ticks,
            // never two owners.
            let alive = live.contains(previous)
                || *lease_alive
                    .entry(*lease)
                    .or_insert_with(|| self.fleet.lease_lives(*lease).unwrap_or(true));
            if alive {
                tracing::info!(
                    services = %group.join(", "),
                    owner = %previous,
                    "the owner key is gone while its owner lives: left to that host to stop first (two ticks of placement)"
                );
                let held = self.held_back.entry(group.clone()).or_insert(until);
                *held = (*held).max(until);
            }
        }
    }

    /// Starts a group just claimed; releases it if it does not start.
    fn take(&mut self, group: &[String]) -> bool {
        let failures = self.kernel.start_new(group);
        if failures.is_empty() {
            tracing::info!(services = %group.join(", "), node = %self.fleet.node(), "took over: running here from the state in etcd");
            return true;
        }
        let why: Vec<String> = failures
            .iter()
            .map(|(service, error)| format!("{service}: {}", host::error_chain(error)))
            .collect();
        tracing::error!(
            services = %group.join(", "),
            why = %why.join("; "),
            "not taken: these services do not start on this host (left to another host; tried again here in ten lease TTLs)"
        );
        self.stop_unsaved(group);
        if let Err(error) = self.fleet.release(group) {
            tracing::warn!(error = %host::error_chain(&error), "releasing the services failed: they are free again when this host's lease ends");
        }
        self.held_back
            .insert(group.to_vec(), Instant::now() + self.fleet.ttl() * 10);
        false
    }

    /// The lease may have ended (or is given up): everything this host owned is stopped,
    /// unsaved.
    fn lose_everything(&mut self, why: &str) {
        let lost = self.fleet.lose_session();
        if lost.is_empty() {
            return;
        }
        tracing::error!(
            services = %lost.join(", "),
            etcd = %self.fleet.endpoints(),
            "{why}: this host stops these services on its own clock; what they did since their last checkpoint in etcd is lost"
        );
        self.stop_unsaved(&lost);
    }

    fn stop_unsaved(&self, services: &[String]) {
        for service in services {
            if let Err(error) = self.kernel.relinquish(service) {
                tracing::warn!(service, error = %host::error_chain(&error), "stopping a service this host no longer owns failed");
            }
        }
    }

    /// etcd failed a read or a claim: said once; past a lease TTL of failures (etcd
    /// refuses this host but still renews its lease, say, when authentication was turned
    /// on), the host gives its lease up and stops its services: it can neither checkpoint
    /// them nor learn that another host owns them.
    fn no_etcd(&mut self, error: &crate::error::FleetError) {
        let since = *self.failing_since.get_or_insert_with(Instant::now);
        if !self.told_no_etcd {
            tracing::warn!(etcd = %self.fleet.endpoints(), error = %host::error_chain(error), "etcd failed this host's request: its services keep running while its lease is certainly valid, a lease TTL at most");
            self.told_no_etcd = true;
        }
        if since.elapsed() > self.fleet.ttl() && self.fleet.session().is_some() {
            tracing::error!(etcd = %self.fleet.endpoints(), error = %host::error_chain(error), "etcd has failed this host for longer than the lease TTL");
            self.lose_everything(
                "this host gives its lease up (it can neither checkpoint its services nor see who owns them)",
            );
        }
    }
}

/// The connected groups of the dependency graph among `services`, each sorted, in order of
/// their first service.
pub fn groups(services: &[ServiceInfo]) -> Vec<Vec<String>> {
    let names: BTreeSet<&str> = services.iter().map(|s| s.name.as_str()).collect();
    let mut parent: BTreeMap<&str, &str> = names.iter().map(|n| (*n, *n)).collect();
    fn root<'a>(parent: &mut BTreeMap<&'a str, &'a str>, mut at: &'a str) -> &'a str {
        while parent[at] != at {
            let up = parent[parent[at]];
            parent.insert(at, up);
            at = up;
        }
        at
    }
    for service in services {
        for dependency in &service.dependencies {
            if names.contains(dependency.as_str()) {
                let (a, b) = (
                    root(&mut parent, &service.name),
                    root(&mut parent, dependency),
                );
                if a != b {
                    parent.insert(a.max(b), a.min(b));
                }
            }
        }
    }
    let mut groups: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for name in &names {
        let r = root(&mut parent, name);
        groups.entry(r).or_default().push((*name).to_owned());
    }
    groups.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(name: &str, dependencies: &[&str]) -> ServiceInfo {
        ServiceInfo {
            name: name.into(),
            dependencies: dependencies.iter().map(|d| (*d).into()).collect(),
            ..ServiceInfo::default()
        }
    }

    #[test]
    fn services_that_depend_on_each_other_are_one_group() {
        let services = [
            service("web", &["auth", "kv"]),
            service("auth", &[]),
            service("kv", &[]),
            service("echo", &[]),
            service("cron", &["mail"]),
            service("mail", &["missing"]),
        ];
        assert_eq!(
            groups(&services),
            vec![
                vec!["auth".to_owned(), "kv".into(), "web".into()],
                vec!["cron".into(), "mail".into()],
                vec!["echo".into()],
            ]
        );
    }
}
