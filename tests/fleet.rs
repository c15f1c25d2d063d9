//! A fleet of hosts on one etcd (issue 18): states in etcd, fenced owners, failover. Each
//! test starts its own etcd (see `etcd.rs`).

use std::{
    collections::BTreeMap,
    fs,
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use fleet::{Fleet, FleetConfig};
use host::state::{KeyRing, StateBackend, StateError, StateKey};
use nix::{sys::signal, unistd::Pid};

use crate::{
    cli::{microkernel, stderr, Daemon},
    etcd::EtcdServer,
    support::{add_plugin, TestResult},
};

fn config(etcd: &EtcdServer, node: &str) -> FleetConfig {
    FleetConfig {
        endpoints: etcd.endpoints(),
        node: node.to_owned(),
        lease_ttl: Duration::from_secs(2),
        prefix: "/microkernel".into(),
    }
}

fn keyring() -> KeyRing {
    KeyRing::new(StateKey::generate(), Vec::new())
}

fn services(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| (*s).to_owned()).collect()
}

/// Revokes a lease from outside the host, as etcd does when it expires.
fn revoke(etcd: &EtcdServer, lease: i64) {
    etcd.etcdctl(&["lease", "revoke", &format!("{lease:x}")]);
}

#[test]
fn a_host_whose_lease_ended_cannot_write_over_the_new_owners_state() -> TestResult {
    let etcd = EtcdServer::start();
    let keys = keyring();
    let a = Fleet::join(&config(&etcd, "a"), keys.clone())?;
    let b = Fleet::join(&config(&etcd, "b"), keys)?;
    assert!(a.claim(&services(&["kv"]))?);
    assert!(!b.claim(&services(&["kv"]))?, "two owners of kv");
    a.save("kv", "1.0.0", b"written by a")?;
    assert!(matches!(
        b.save("kv", "1.0.0", b"b does not own kv"),
        Err(StateError::NotOwner { .. })
    ));

    // a's lease ends in etcd while a still believes it owns kv (a pause, a partition).
    revoke(&etcd, a.session().ok_or("a has a session")?.lease());
    assert!(b.claim(&services(&["kv"]))?);
    b.save("kv", "1.0.1", b"written by b")?;
    let refused = a.save("kv", "1.0.0", b"a's late write");
    match refused {
        Err(StateError::NotOwner { owner, node, .. }) => {
            assert_eq!((owner.as_deref(), node.as_str()), (Some("b"), "a"));
        }
        other => panic!("a's write was not refused: {other:?}"),
    }
    assert_eq!(a.refused_writes(), 1);
    // And in the metrics of a kernel placed by a.
    let kernel = host::Kernel::new(host::KernelConfig {
        placement: Some(a.clone() as Arc<dyn host::kernel::Placement>),
        state_backend: Some(a.clone() as Arc<dyn StateBackend>),
        ..host::KernelConfig::default()
    })?;
    let metrics = kernel.metrics_text();
    // What a wrote to etcd (its one accepted write, sealed) is counted.
    let written = StateBackend::bytes_written(&*a);
    assert!(written > b"written by a".len() as u64);
    assert!(
        metrics.contains(&format!(
            "microkernel_state_written_bytes_total {written}\n"
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains("microkernel_fleet_refused_writes_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("microkernel_fleet_owned_services 1"),
        "{metrics}"
    );
    let saved = b.load("kv")?.ok_or("a state")?;
    assert_eq!(
        (saved.version.as_str(), &saved.bytes[..]),
        ("1.0.1", &b"written by b"[..])
    );
    // Read by the old owner too: the same state.
    assert_eq!(a.load("kv")?.ok_or("a state")?.bytes, b"written by b");
    Ok(())
}

#[test]
fn a_state_larger_than_an_etcd_request_is_written_in_chunks_and_read_whole() -> TestResult {
    let etcd = EtcdServer::start();
    let a_keys = keyring();
    let a = Fleet::join(&config(&etcd, "a"), a_keys.clone())?;
    assert!(a.claim(&services(&["big"]))?);
    let big: Vec<u8> = (0..(3 << 20) + 12345).map(|i| (i % 251) as u8).collect();
    a.save("big", "1.0.0", &big)?;
    assert_eq!(a.load("big")?.ok_or("a state")?.bytes, big);
    assert_eq!(etcdctl_keys(&etcd, "/microkernel/state/big/gen/").len(), 4);
    // Replaced by a small one, held in its pointer: the old generation's chunks go.
    a.save("big", "1.0.0", b"small")?;
    assert_eq!(a.load("big")?.ok_or("a state")?.bytes, b"small");
    let chunks = etcdctl_keys(&etcd, "/microkernel/state/big/gen/");
    assert!(chunks.is_empty(), "{chunks:?}");
    // And a large one again, read by another host.
    a.save("big", "1.0.1", &big)?;
    let b = Fleet::join(&config(&etcd, "b"), a_keys)?;
    assert_eq!(b.load("big")?.ok_or("a state")?.bytes, big);
    // b takes it over and writes a generation of its own; when a owns it again, its next
    // write removes b's, not only the one a wrote last.
    revoke(&etcd, a.session().ok_or("a session")?.lease());
    assert!(b.claim(&services(&["big"]))?);
    b.save("big", "1.0.2", &big)?;
    b.leave();
    a.lose_session();
    a.renew_session()?;
    assert!(a.claim(&services(&["big"]))?);
    a.save("big", "1.0.3", &big)?;
    let generations: std::collections::BTreeSet<String> =
        etcdctl_keys(&etcd, "/microkernel/state/big/gen/")
            .iter()
            .filter_map(|key| key.split('/').nth(5).map(str::to_owned))
            .collect();
    assert_eq!(generations.len(), 1, "{generations:?}");
    Ok(())
}

/// A reader that reads while another host writes sees one whole state or another, never a
/// mix of two generations.
#[test]
fn a_reader_never_sees_a_mix_of_two_generations() -> TestResult {
    let etcd = EtcdServer::start();
    let keys = keyring();
    let writer = Fleet::join(&config(&etcd, "writer"), keys.clone())?;
    let reader = Fleet::join(&config(&etcd, "reader"), keys)?;
    assert!(writer.claim(&services(&["big"]))?);
    let size = (2 << 20) + 77;
    writer.save("big", "1", &vec![b'a'; size])?;
    let writing = {
        let writer = Arc::clone(&writer);
        std::thread::spawn(move || -> Result<(), StateError> {
            for round in 0..12u8 {
                writer.save("big", "1", &vec![b'a' + round % 2; size])?;
            }
            Ok(())
        })
    };
    let mut reads = 0;
    while !writing.is_finished() || reads == 0 {
        let state = reader.load("big")?.ok_or("a state")?.bytes;
        assert_eq!(state.len(), size);
        assert!(
            state.iter().all(|b| *b == state[0]),
            "a read mixed two generations"
        );
        reads += 1;
    }
    writing.join().expect("the writer")?;
    Ok(())
}

#[test]
fn a_node_name_is_one_live_hosts_and_claims_are_all_or_nothing() -> TestResult {
    let etcd = EtcdServer::start();
    let a = Fleet::join(&config(&etcd, "a"), keyring())?;
    let taken = Fleet::join(&config(&etcd, "a"), keyring()).expect_err("a second host named a");
    assert!(
        taken.to_string().contains("node name `a` is in use"),
        "{taken}"
    );
    let b = Fleet::join(&config(&etcd, "b"), keyring())?;
    assert!(a.claim(&services(&["kv"]))?);
    // kv is a's: b gets neither kv nor web.
    assert!(!b.claim(&services(&["kv", "web"]))?);
    assert!(b.claim(&services(&["web"]))?);
    assert_eq!(b.read_owners()?.get("kv").map(String::as_str), Some("a"));
    // a leaves: its services are free at once.
    a.leave();
    assert!(b.claim(&services(&["kv"]))?);
    Ok(())
}

/// The keys under `prefix`.
fn etcdctl_keys(etcd: &EtcdServer, prefix: &str) -> Vec<String> {
    etcd.etcdctl(&["get", "--prefix", "--keys-only", prefix])
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// etcd restarting within the lease's TTL interrupts nothing: the lease is renewed over a
/// new stream (etcd-client's does not reconnect by itself), and the owner keeps its
/// services and writes.
#[test]
fn an_etcd_restart_within_the_lease_interrupts_nothing() -> TestResult {
    let mut etcd = EtcdServer::start();
    let a = Fleet::join(
        &FleetConfig {
            // Well over what etcd takes to restart on a slow, loaded machine.
            lease_ttl: Duration::from_secs(10),
            ..config(&etcd, "a")
        },
        keyring(),
    )?;
    assert!(a.claim(&services(&["kv"]))?);
    a.save("kv", "1", b"before")?;
    etcd.restart();
    let renewals = a.session().ok_or("a session")?.renewals();
    // Past a TTL: without renewals over a new stream the lease would lapse in one.
    let until = std::time::Instant::now() + Duration::from_secs(12);
    while std::time::Instant::now() < until {
        assert!(a.owns("kv"), "a lost kv to an etcd restart");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(a.session().ok_or("a session")?.renewals() > renewals);
    a.save("kv", "1", b"after")?;
    assert_eq!(a.load("kv")?.ok_or("a state")?.bytes, b"after");
    Ok(())
}

/// The hosts of a fleet on one etcd, each in a directory of its own under `root` (its
/// plugins, copied: every host has the same; the fleet's one key; its state directory).
struct Hosts {
    root: tempfile::TempDir,
    packages: Vec<String>,
    hosts: BTreeMap<String, Daemon>,
}

/// The lease TTL of the fleets here.
const TTL: Duration = Duration::from_secs(2);

impl Hosts {
    fn new(packages: &[&str]) -> Hosts {
        let root = tempfile::tempdir().expect("a temporary directory");
        let key = root.path().join("key");
        let made = microkernel(&["keygen", "--out", key.to_str().unwrap()]);
        assert!(made.status.success(), "{}", stderr(&made));
        Hosts {
            root,
            packages: packages.iter().map(|p| (*p).to_owned()).collect(),
            hosts: BTreeMap::new(),
        }
    }

    /// Host `name`'s directory, made with its plugins and the key if it is new.
    fn prepare(&self, name: &str) -> std::path::PathBuf {
        let root = self.root.path().join(name);
        if !root.exists() {
            fs::create_dir_all(root.join("plugins")).unwrap();
            for package in &self.packages {
                add_plugin(&root.join("plugins"), package);
            }
            fs::copy(self.root.path().join("key"), root.join("key")).unwrap();
        }
        root
    }

    /// Starts hosts `names` on `etcd` together: each with its plugins directory empty
    /// until every one of them sees all the others alive, then given its plugins
    /// (`ctl reload`). So none places a service before the others have joined, as a host
    /// started alone would take every service (a host takes a fair share of what is free
    /// among the live nodes it sees).
    fn start_together(&mut self, names: &[&str], etcd: &EtcdServer, extra: &[&str]) {
        for name in names {
            let root = self.prepare(name);
            fs::rename(root.join("plugins"), root.join("plugins.later")).unwrap();
            fs::create_dir(root.join("plugins")).unwrap();
            self.start(name, etcd, extra);
        }
        self.wait(
            Duration::from_secs(30),
            "every host to see the others",
            |hosts| {
                names.iter().all(|name| {
                    let out = hosts.host(name).ctl(&["fleet", "--json"]);
                    let fleet: serde_json::Value =
                        serde_json::from_slice(&out.stdout).unwrap_or_default();
                    fleet["nodes"].as_array().map_or(0, Vec::len) == names.len()
                })
            },
        );
        for name in names {
            let root = self.root.path().join(name);
            for file in fs::read_dir(root.join("plugins.later")).unwrap() {
                let file = file.unwrap();
                fs::rename(file.path(), root.join("plugins").join(file.file_name())).unwrap();
            }
            fs::remove_dir(root.join("plugins.later")).unwrap();
            let reload = self.host(name).ctl(&["reload"]);
            assert!(reload.status.success(), "{name}: {}", stderr(&reload));
        }
    }

    /// Starts host `name` on `etcd`, with `extra` options.
    fn start(&mut self, name: &str, etcd: &EtcdServer, extra: &[&str]) {
        let root = self.prepare(name);
        let ttl = format!("{}s", TTL.as_secs());
        let mut args = vec!["--cluster", &etcd.url(), "--node", name]
            .into_iter()
            .map(str::to_owned)
            .collect::<Vec<_>>();
        for (option, default) in [("--lease-ttl", &ttl[..]), ("--checkpoint-interval", "1h")] {
            if !extra.contains(&option) {
                args.extend([option.to_owned(), default.to_owned()]);
            }
        }
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.hosts
            .insert(name.to_owned(), Daemon::start_with(&root, &args));
    }

    fn host(&self, name: &str) -> &Daemon {
        &self.hosts[name]
    }

    fn pid(&self, name: &str) -> Pid {
        Pid::from_raw(self.hosts[name].child.id() as i32)
    }

    /// Kills host `name` outright (SIGKILL).
    fn kill(&mut self, name: &str) {
        let mut host = self.hosts.remove(name).expect("a running host");
        host.child.kill().unwrap();
        host.child.wait().unwrap();
    }

    /// Whether `service` runs on host `name`.
    fn runs(&self, name: &str, service: &str) -> bool {
        let services = self.host(name).services();
        services
            .as_array()
            .into_iter()
            .flatten()
            .any(|s| s["name"] == service && s["status"] == "running")
    }

    /// The owner of every service, as host `name` sees them (`None` for a service no node
    /// owns).
    fn owners(&self, name: &str) -> BTreeMap<String, Option<String>> {
        let services = self.host(name).services();
        services
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| {
                (
                    s["name"].as_str().unwrap_or_default().to_owned(),
                    s["owner"].as_str().map(str::to_owned),
                )
            })
            .collect()
    }

    /// Waits until `what` holds, at most `within`; returns how long it took.
    fn wait(&self, within: Duration, what: &str, done: impl Fn(&Hosts) -> bool) -> Duration {
        let start = Instant::now();
        while !done(self) {
            assert!(
                start.elapsed() < within,
                "timed out waiting for {what}; logs:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        start.elapsed()
    }

    /// The owner of `service` once every live host agrees on one that is live, and it runs
    /// there (an owner claims a service, then starts it from its state in etcd).
    fn owner(&self, service: &str) -> String {
        self.wait(
            Duration::from_secs(30),
            &format!("an owner of {service}"),
            |hosts| {
                let seen: Vec<Option<String>> = hosts
                    .hosts
                    .keys()
                    .map(|h| hosts.owners(h).get(service).cloned().flatten())
                    .collect();
                matches!(seen.first(), Some(Some(first))
                    if hosts.hosts.contains_key(first)
                        && seen.iter().all(|s| s.as_ref() == Some(first))
                        && hosts.runs(first, service))
            },
        );
        let first = self.hosts.keys().next().unwrap();
        self.owners(first)[service].clone().unwrap()
    }

    /// Which live hosts answer `payload` to `service` (with their answers); the others
    /// must say who runs it.
    fn serving(&self, service: &str, payload: &str) -> Vec<(String, serde_json::Value)> {
        let mut serving = Vec::new();
        for (name, host) in &self.hosts {
            let out = host.ctl(&["send", service, payload]);
            if out.status.success() {
                serving.push((name.clone(), serde_json::from_slice(&out.stdout).unwrap()));
            }
        }
        serving
    }

    /// Whether host `name` answers `payload` to `service` (successfully).
    fn answers(&self, name: &str, service: &str, payload: &str) -> bool {
        self.host(name)
            .ctl(&["send", service, payload])
            .status
            .success()
    }

    /// Waits for `name`'s log to hold `text`. A host refuses requests on its own clock as
    /// soon as its lease may have ended; the placer's log line about it follows at its next
    /// step, so a test that saw the refusal waits for the line rather than reading at once.
    fn logged(&self, name: &str, text: &str) {
        self.wait(
            Duration::from_secs(20),
            &format!("`{text}` in {name}'s log"),
            |hosts| hosts.host(name).log().contains(text),
        );
    }

    fn logs(&self) -> String {
        self.hosts
            .iter()
            .map(|(name, host)| format!("--- {name}\n{}", host.log()))
            .collect()
    }
}

fn put(host: &Daemon, key: &str, value: u64) {
    let reply = host.send(
        "kv",
        &format!(r#"{{"op":"put","key":"{key}","value":{value}}}"#),
    );
    assert!(reply.is_object(), "{reply}");
}

fn get(host: &Daemon, key: &str) -> serde_json::Value {
    host.send("kv", &format!(r#"{{"op":"get","key":"{key}"}}"#))["value"].clone()
}

fn checkpoint(host: &Daemon) {
    let out = host.ctl(&["checkpoint"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn an_owner_killed_outright_is_replaced_by_another_host_with_its_last_checkpoint() -> TestResult {
    let etcd = EtcdServer::start();
    let mut hosts = Hosts::new(&["kv"]);
    for name in ["a", "b", "c"] {
        hosts.start(name, &etcd, &[]);
    }
    let owner = hosts.owner("kv");
    put(hosts.host(&owner), "kept", 1);
    checkpoint(hosts.host(&owner));
    // After the checkpoint: what a failover loses.
    put(hosts.host(&owner), "lost", 2);
    // Only the owner serves; the others name it.
    let other = hosts.hosts.keys().find(|h| **h != owner).unwrap().clone();
    let misdirected = hosts
        .host(&other)
        .ctl(&["send", "kv", r#"{"op":"get","key":"kept"}"#]);
    assert_eq!(misdirected.status.code(), Some(1));
    assert!(
        stderr(&misdirected).contains(&format!("error 421: service `kv` runs on node `{owner}`")),
        "{}",
        stderr(&misdirected)
    );

    // Nor is it another host's to stop.
    let stop = hosts.host(&other).ctl(&["stop", "kv"]);
    assert!(!stop.status.success());
    assert!(
        crate::cli::stdout(&stop).contains(&format!("runs on node `{owner}`")),
        "{}",
        crate::cli::stdout(&stop)
    );

    hosts.kill(&owner);
    let took = hosts.wait(
        TTL + Duration::from_secs(10),
        "another host to serve kv",
        |hosts| {
            !hosts
                .serving("kv", r#"{"op":"get","key":"kept"}"#)
                .is_empty()
        },
    );
    eprintln!("kv served again {took:?} after its owner was killed (lease TTL {TTL:?})");
    let serving = hosts.serving("kv", r#"{"op":"get","key":"kept"}"#);
    assert_eq!(serving.len(), 1, "two hosts serve kv: {serving:?}");
    // A dead owner's lease is gone from etcd with its keys: its services are taken at once,
    // not left to it as those of an owner that lives (whose key was deleted by hand).
    assert!(
        !hosts.logs().contains("gone while its owner lives"),
        "a dead owner's services were held back for it:\n{}",
        hosts.logs()
    );
    assert_eq!(serving[0].1["value"], 1);
    let new_owner = &serving[0].0;
    let lost = hosts
        .host(new_owner)
        .ctl(&["send", "kv", r#"{"op":"get","key":"lost"}"#]);
    assert!(stderr(&lost).contains("no key `lost`"), "{}", stderr(&lost));
    Ok(())
}

#[test]
fn a_paused_owner_stops_serving_and_never_overwrites_the_new_owners_state() -> TestResult {
    let etcd = EtcdServer::start();
    let mut hosts = Hosts::new(&["kv"]);
    hosts.start("a", &etcd, &[]);
    hosts.start("b", &etcd, &[]);
    let old = hosts.owner("kv");
    let new = if old == "a" { "b" } else { "a" }.to_owned();
    put(hosts.host(&old), "n", 1);
    checkpoint(hosts.host(&old));

    signal::kill(hosts.pid(&old), signal::Signal::SIGSTOP)?;
    hosts.wait(
        TTL + Duration::from_secs(10),
        "the other host to take kv over",
        |hosts| hosts.answers(&new, "kv", r#"{"op":"get","key":"n"}"#),
    );
    assert_eq!(get(hosts.host(&new), "n"), 1);
    put(hosts.host(&new), "n", 5);
    checkpoint(hosts.host(&new));
    // Its checkpoint would be due at once: the old owner tries to write when it wakes.
    signal::kill(hosts.pid(&old), signal::Signal::SIGCONT)?;
    hosts.wait(
        Duration::from_secs(20),
        "the old owner to stop serving kv",
        |hosts| {
            let out = hosts
                .host(&old)
                .ctl(&["send", "kv", r#"{"op":"get","key":"n"}"#]);
            stderr(&out).contains(&format!("runs on node `{new}`"))
        },
    );
    hosts.logged(&old, "lease may have ended");
    // A write refused is counted, then logged: the two agree once no write is under way.
    hosts.wait(
        Duration::from_secs(20),
        "every refused write to be in the log",
        |hosts| {
            let out = hosts.host(&old).ctl(&["fleet", "--json"]);
            let fleet: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            fleet["refused_writes"].as_u64()
                == Some(
                    hosts
                        .host(&old)
                        .log()
                        .matches("state write refused")
                        .count() as u64,
                )
        },
    );
    // The new owner's state was never overwritten: once it is gone, the old host takes
    // kv back from etcd with the new owner's checkpoint.
    hosts.kill(&new);
    hosts.wait(
        TTL + Duration::from_secs(10),
        "the old host to take kv back",
        |hosts| hosts.answers(&old, "kv", r#"{"op":"get","key":"n"}"#),
    );
    assert_eq!(get(hosts.host(&old), "n"), 5);
    Ok(())
}

#[test]
fn etcd_down_longer_than_the_lease_stops_the_services_and_they_come_back_with_it() -> TestResult {
    let mut etcd = EtcdServer::start();
    let mut hosts = Hosts::new(&["kv"]);
    hosts.start("a", &etcd, &[]);
    let owner = hosts.owner("kv");
    put(hosts.host(&owner), "n", 7);
    checkpoint(hosts.host(&owner));
    etcd.kill();
    hosts.wait(
        TTL + Duration::from_secs(10),
        "kv to stop on its own clock",
        |hosts| !hosts.answers(&owner, "kv", r#"{"op":"get","key":"n"}"#),
    );
    hosts.logged(&owner, "lease may have ended");
    etcd.restart();
    hosts.wait(
        TTL * 2 + Duration::from_secs(20),
        "kv to come back",
        |hosts| hosts.answers(&owner, "kv", r#"{"op":"get","key":"n"}"#),
    );
    assert_eq!(get(hosts.host(&owner), "n"), 7);
    Ok(())
}

/// etcd restarting within the lease's TTL (here 10 s, well over what etcd takes to restart on a slow machine) costs no request.
#[test]
fn an_etcd_restart_within_the_lease_costs_no_request() -> TestResult {
    let mut etcd = EtcdServer::start();
    let mut hosts = Hosts::new(&["kv"]);
    hosts.start("a", &etcd, &["--lease-ttl", "10s"]);
    let owner = hosts.owner("kv");
    put(hosts.host(&owner), "n", 1);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let socket = hosts.root.path().join("a/state/control.sock");
    let client = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut answered = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let out = microkernel(&[
                    "ctl",
                    "--socket",
                    socket.to_str().unwrap(),
                    "send",
                    "kv",
                    r#"{"op":"get","key":"n"}"#,
                ]);
                assert!(out.status.success(), "a request failed: {}", stderr(&out));
                answered += 1;
            }
            answered
        })
    };
    etcd.restart();
    // Past the restart, and past a TTL of the old lease's.
    std::thread::sleep(Duration::from_secs(11));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let answered = client.join().expect("no request failed");
    assert!(answered > 0);
    put(hosts.host(&owner), "n", 2);
    checkpoint(hosts.host(&owner));
    Ok(())
}

#[test]
fn a_hot_replace_in_the_fleet_happens_on_the_owner_with_its_state() -> TestResult {
    let etcd = EtcdServer::start();
    let mut hosts = Hosts::new(&["echo"]);
    hosts.start("a", &etcd, &[]);
    hosts.start("b", &etcd, &[]);
    let owner = hosts.owner("echo");
    for n in 1..=3 {
        assert_eq!(hosts.host(&owner).send("echo", "x")["count"], n);
    }
    for name in ["a", "b"] {
        add_plugin(&hosts.root.path().join(name).join("plugins"), "echo-v2");
        let reload = hosts.host(name).ctl(&["reload"]);
        assert!(
            reload.status.success(),
            "{name}: {}{}",
            crate::cli::stdout(&reload),
            stderr(&reload)
        );
    }
    let reply = hosts.host(&owner).send("echo", "after");
    assert_eq!(
        (reply["version"].as_str(), reply["count"].as_u64()),
        (Some("2.0.0"), Some(4))
    );
    // The state crossed the swap in etcd: another host takes it over from there.
    let other = if owner == "a" { "b" } else { "a" }.to_owned();
    hosts.kill(&owner);
    hosts.wait(
        TTL + Duration::from_secs(10),
        "the other host to take echo",
        |hosts| hosts.answers(&other, "echo", "x"),
    );
    let reply = hosts.host(&other).send("echo", "there");
    assert_eq!(reply["version"], "2.0.0");
    assert!(reply["count"].as_u64() >= Some(5), "{reply}");
    Ok(())
}

/// Services that depend on each other are placed together, each host takes a fair share,
/// and a host that joins takes a fair share of what no host owns.
#[test]
fn hosts_take_fair_shares_of_the_services_and_a_joining_host_takes_what_is_free() -> TestResult {
    let etcd = EtcdServer::start();
    // Four groups: echo with logger (which depends on it), kv, relay, faulty.
    let mut hosts = Hosts::new(&["echo", "logger", "kv", "fixture-relay", "fixture-faulty"]);
    hosts.start_together(&["a", "b"], &etcd, &[]);
    let placed = |hosts: &Hosts| -> BTreeMap<String, Vec<String>> {
        let mut by_node: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (service, owner) in hosts.owners(hosts.hosts.keys().next().unwrap()) {
            by_node
                .entry(owner.unwrap_or_default())
                .or_default()
                .push(service);
        }
        by_node
    };
    hosts.wait(Duration::from_secs(30), "every service placed", |hosts| {
        let by_node = placed(hosts);
        !by_node.contains_key("") && by_node.values().map(Vec::len).sum::<usize>() == 5
    });
    let by_node = placed(&hosts);
    assert_eq!(by_node.len(), 2, "{by_node:?}");
    for services in by_node.values() {
        // Two groups each: the echo group has two services.
        assert!(services.len() == 2 || services.len() == 3, "{by_node:?}");
        assert_eq!(
            services.contains(&"echo".to_owned()),
            services.contains(&"logger".to_owned()),
            "echo and logger apart: {by_node:?}"
        );
    }
    hosts.start("c", &etcd, &[]);
    let b_had = by_node["b"].clone();
    hosts.kill("a");
    hosts.wait(
        TTL + Duration::from_secs(10),
        "a's services taken",
        |hosts| {
            let by_node = placed(hosts);
            !by_node.contains_key("a") && !by_node.contains_key("")
        },
    );
    let by_node = placed(&hosts);
    assert_eq!(
        by_node["b"], b_had,
        "b took more than its share: {by_node:?}"
    );
    assert!(by_node.contains_key("c"), "{by_node:?}");
    Ok(())
}

/// Owners killed at random, again and again (`MICROKERNEL_FLEET_KILLS`, 100 by default):
/// after each kill every service is served again by exactly one host, with its last
/// checkpointed state. The failover times are printed (`--nocapture`).
#[test]
fn owners_killed_at_random_never_leave_two_owners_or_lose_a_checkpointed_state() -> TestResult {
    let kills: usize = std::env::var("MICROKERNEL_FLEET_KILLS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(100);
    let seed = std::env::var("MICROKERNEL_FLEET_SEED")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    eprintln!("MICROKERNEL_FLEET_SEED={seed}");
    let mut random = seed | 1;
    let mut next = move |n: usize| {
        random ^= random << 13;
        random ^= random >> 7;
        random ^= random << 17;
        (random % n as u64) as usize
    };
    let etcd = EtcdServer::start();
    let mut hosts = Hosts::new(&["kv", "echo"]);
    for name in ["a", "b", "c"] {
        hosts.start(name, &etcd, &[]);
    }
    let mut counter = 0u64;
    let mut failovers = Vec::new();
    for round in 0..kills {
        let kv_owner = hosts.owner("kv");
        let echo_owner = hosts.owner("echo");
        // Acknowledged and checkpointed before the kill: never lost.
        counter += 1;
        put(hosts.host(&kv_owner), "n", counter);
        checkpoint(hosts.host(&kv_owner));
        let echoes = hosts.host(&echo_owner).send("echo", "x")["count"]
            .as_u64()
            .ok_or("a count")?;
        checkpoint(hosts.host(&echo_owner));
        let victim = if next(2) == 0 { kv_owner } else { echo_owner };
        hosts.kill(&victim);
        // Every echo request served counts: the probes are counted too.
        let probes = std::cell::Cell::new(0u64);
        let took = hosts.wait(
            TTL + Duration::from_secs(20),
            "every service served again",
            |hosts| {
                if hosts.serving("kv", r#"{"op":"get","key":"n"}"#).len() != 1 {
                    return false;
                }
                let echo = hosts.serving("echo", "");
                probes.set(probes.get() + echo.len() as u64);
                echo.len() == 1
            },
        );
        failovers.push(took);
        let kv = hosts.serving("kv", r#"{"op":"get","key":"n"}"#);
        assert_eq!(kv.len(), 1, "round {round}: kv served by {kv:?}");
        assert_eq!(
            kv[0].1["value"], counter,
            "round {round}: kv lost its checkpoint"
        );
        let echo = hosts.serving("echo", "");
        probes.set(probes.get() + echo.len() as u64);
        assert_eq!(echo.len(), 1, "round {round}: echo served by {echo:?}");
        assert_eq!(
            echo[0].1["count"],
            echoes + probes.get(),
            "round {round}: echo lost its checkpoint"
        );
        hosts.start(&victim, &etcd, &[]);
    }
    failovers.sort();
    if let (Some(median), Some(max)) = (failovers.get(failovers.len() / 2), failovers.last()) {
        eprintln!(
            "{kills} owners killed: failover median {median:?}, max {max:?} (lease TTL {TTL:?}); 0 checkpointed states lost, never two hosts serving one service"
        );
    }
    Ok(())
}

/// A host whose plugin version cannot import a service's state (an older file) does not
/// take the service: it releases it, says why, and the state in etcd stays as it was.
#[test]
fn a_host_that_cannot_import_a_services_state_does_not_take_it() -> TestResult {
    let etcd = EtcdServer::start();
    let mut hosts = Hosts::new(&["echo"]);
    // a runs echo 2.0.0; b has only 1.0.0, which cannot read a 2.x state.
    add_plugin(&hosts.prepare("a").join("plugins"), "echo-v2");
    hosts.start("a", &etcd, &[]);
    assert_eq!(hosts.owner("echo"), "a");
    for _ in 0..3 {
        hosts.host("a").send("echo", "x");
    }
    checkpoint(hosts.host("a"));
    hosts.start("b", &etcd, &[]);
    hosts.kill("a");
    hosts.wait(TTL + Duration::from_secs(20), "b to refuse echo", |hosts| {
        hosts.host("b").log().contains("not taken")
    });
    let log = hosts.host("b").log();
    assert!(
        log.contains("echo 1.0.0 cannot read state of version 2.0.0"),
        "{log}"
    );
    let refused = hosts.host("b").ctl(&["send", "echo", "x"]);
    assert!(!refused.status.success());
    // Released, not held: a host that can import it takes it, with the state as it was.
    hosts.start("a", &etcd, &[]);
    hosts.wait(
        TTL + Duration::from_secs(20),
        "a to take echo back",
        |hosts| hosts.answers("a", "echo", "x"),
    );
    let reply = hosts.host("a").send("echo", "y");
    assert_eq!(reply["version"], "2.0.0");
    assert_eq!(reply["count"], 5, "{reply}");
    Ok(())
}

/// etcd with authentication on: a host with its user and password file joins and works
/// under the permissions of its role; without them, or with a wrong password, it is
/// refused with an error naming etcd and what it was doing.
#[test]
fn a_fleet_on_an_etcd_with_authentication_needs_its_user_and_password() -> TestResult {
    let etcd = EtcdServer::start();
    let admin = |args: &[&str]| {
        etcd.etcdctl(args);
    };
    admin(&["role", "add", "root"]);
    admin(&["user", "add", "root", "--new-user-password=rootpw"]);
    admin(&["user", "grant-role", "root", "root"]);
    admin(&["role", "add", "host"]);
    admin(&[
        "role",
        "grant-permission",
        "host",
        "--prefix=true",
        "readwrite",
        "/microkernel/",
    ]);
    admin(&["user", "add", "mk", "--new-user-password=s3cret"]);
    admin(&["user", "grant-role", "mk", "host"]);
    admin(&["auth", "enable"]);

    let dir = tempfile::tempdir()?;
    let password = dir.path().join("password");
    fs::write(&password, "s3cret\n")?;
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&password, fs::Permissions::from_mode(0o644))?;
        let readable = Fleet::join(&with_password(&etcd, &password), keyring())
            .expect_err("a password file others can read");
        assert!(readable.to_string().contains("chmod 600"), "{readable}");
        fs::set_permissions(&password, fs::Permissions::from_mode(0o600))?;
    }
    let with = |user: Option<&str>, password: Option<&Path>| FleetConfig {
        endpoints: fleet::Endpoints {
            user: user.map(str::to_owned),
            password_file: password.map(Path::to_owned),
            ..etcd.endpoints()
        },
        ..config(&etcd, "a")
    };
    let a = Fleet::join(&with(Some("mk"), Some(&password)), keyring())?;
    assert!(a.claim(&services(&["kv"]))?);
    a.save("kv", "1", b"with a user")?;
    assert_eq!(a.load("kv")?.ok_or("a state")?.bytes, b"with a user");
    a.leave();

    let anonymous = Fleet::join(&with(None, None), keyring()).expect_err("no user");
    let said = host::error_chain(&anonymous);
    assert!(said.contains("etcd etcd://127.0.0.1:"), "{said}");
    assert!(
        said.contains("granting the lease") || said.contains("registering"),
        "{said}"
    );
    fs::write(&password, "wrong\n")?;
    let wrong =
        Fleet::join(&with(Some("mk"), Some(&password)), keyring()).expect_err("a wrong password");
    let said = host::error_chain(&wrong);
    assert!(said.contains("authentication failed"), "{said}");
    Ok(())
}

fn with_password(etcd: &EtcdServer, password: &Path) -> FleetConfig {
    FleetConfig {
        endpoints: fleet::Endpoints {
            user: Some("mk".into()),
            password_file: Some(password.to_owned()),
            ..etcd.endpoints()
        },
        ..config(etcd, "a")
    }
}

/// Requests already waiting on an owner when its lease lapses (queued while it was paused)
/// are refused when it wakes, never answered from its stale state (found by the
/// adversarial pass: they were answered, after another host had taken over).
#[test]
fn requests_waiting_on_an_owner_whose_lease_lapsed_are_refused_not_answered() -> TestResult {
    let etcd = EtcdServer::start();
    let mut hosts = Hosts::new(&["kv"]);
    hosts.start("a", &etcd, &[]);
    hosts.start("b", &etcd, &[]);
    let old = hosts.owner("kv");
    let new = if old == "a" { "b" } else { "a" }.to_owned();
    put(hosts.host(&old), "x", 1);
    checkpoint(hosts.host(&old));
    signal::kill(hosts.pid(&old), signal::Signal::SIGSTOP)?;
    let socket = hosts.root.path().join(&old).join("state/control.sock");
    let waiting: Vec<_> = (0..3)
        .map(|n| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                microkernel(&[
                    "ctl",
                    "--socket",
                    socket.to_str().unwrap(),
                    "--wait",
                    "60s",
                    "send",
                    "--timeout",
                    "30s",
                    "kv",
                    &format!(r#"{{"op":"put","key":"x","value":{}}}"#, 100 + n),
                ])
            })
        })
        .collect();
    hosts.wait(
        TTL + Duration::from_secs(10),
        "the other host to take kv",
        |hosts| hosts.answers(&new, "kv", r#"{"op":"get","key":"x"}"#),
    );
    put(hosts.host(&new), "x", 2);
    checkpoint(hosts.host(&new));
    signal::kill(hosts.pid(&old), signal::Signal::SIGCONT)?;
    for request in waiting {
        let out = request.join().expect("a client");
        assert!(
            !out.status.success(),
            "a request waiting on the old owner was answered: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        // 421 naming the new owner, or 503 while this host has yet to read who it is.
        let said = stderr(&out);
        assert!(
            said.contains("error 421") || said.contains("error 503"),
            "{said}"
        );
    }
    assert_eq!(get(hosts.host(&new), "x"), 2);
    Ok(())
}

/// etcd that refuses a host's reads and writes while it still renews its lease (here:
/// authentication turned on under running hosts that have no user) does not leave it
/// serving without checkpoints for ever: past a lease TTL it gives its lease up and stops;
/// when etcd takes it again, the service comes back from its last checkpoint (found by the
/// adversarial pass).
#[test]
fn a_host_etcd_refuses_gives_its_lease_up_and_its_services_come_back_after() -> TestResult {
    let etcd = EtcdServer::start();
    let mut hosts = Hosts::new(&["kv"]);
    hosts.start("a", &etcd, &[]);
    assert_eq!(hosts.owner("kv"), "a");
    put(hosts.host("a"), "n", 3);
    checkpoint(hosts.host("a"));
    let etcdctl = |args: &[&str]| {
        etcd.etcdctl(args);
    };
    etcdctl(&["role", "add", "root"]);
    etcdctl(&["user", "add", "root", "--new-user-password=rootpw"]);
    etcdctl(&["user", "grant-role", "root", "root"]);
    etcdctl(&["auth", "enable"]);
    hosts.wait(TTL * 3 + Duration::from_secs(10), "a to stop kv", |hosts| {
        !hosts.answers("a", "kv", r#"{"op":"get","key":"n"}"#)
    });
    hosts.logged("a", "gives its lease up");
    etcdctl(&["--user", "root:rootpw", "auth", "disable"]);
    hosts.wait(TTL * 3 + Duration::from_secs(20), "kv back on a", |hosts| {
        hosts.answers("a", "kv", r#"{"op":"get","key":"n"}"#)
    });
    assert_eq!(get(hosts.host("a"), "n"), 3);
    Ok(())
}

/// An owner key deleted by hand while its owner lives (found by the adversarial pass: two
/// hosts served for a moment): the owner stops at its next read of the owners, and another
/// host takes the service only after that. Probing both hosts in turn, the hosts that
/// answer change at most once: never one, the other, then the first again.
#[test]
fn an_owner_key_deleted_by_hand_never_leaves_two_hosts_serving() -> TestResult {
    let etcd = EtcdServer::start();
    // Three groups on two hosts: the host with one is below its share, and takes what is
    // free as soon as it sees it.
    let mut hosts = Hosts::new(&["kv", "echo", "fixture-relay"]);
    hosts.start_together(&["a", "b"], &etcd, &[]);
    for round in 0..6 {
        for service in ["kv", "echo", "relay"] {
            hosts.owner(service);
        }
        // A service of the host that owns two.
        let owners = hosts.owners("a");
        let count = |node: &str| {
            owners
                .values()
                .filter(|o| o.as_deref() == Some(node))
                .count()
        };
        let busy = if count("a") == 2 { "a" } else { "b" };
        let (service, probe) = if owners["kv"].as_deref() == Some(busy) {
            ("kv", r#"{"op":"get","key":"p"}"#)
        } else if owners["echo"].as_deref() == Some(busy) {
            ("echo", "x")
        } else {
            ("relay", r#"{"to":"kernel","kind":"ping"}"#)
        };
        etcd.etcdctl(&["del", &format!("/microkernel/owner/{service}")]);
        if round >= 4 {
            // Its node key too (second adversarial pass): the other host must not take
            // the owner for dead, and the owner puts its key back.
            etcd.etcdctl(&["del", &format!("/microkernel/nodes/{busy}")]);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut served: Vec<&str> = Vec::new();
        let mut answers = 0;
        while answers < 60 {
            assert!(
                Instant::now() < deadline,
                "round {round}: {service} never came back"
            );
            for name in ["a", "b"] {
                let out = hosts.host(name).ctl(&["send", service, probe]);
                // Answered by the service (kv's 404 for a missing key included), not
                // refused by the host.
                let said = stderr(&out);
                let answered = out.status.success()
                    || !(said.contains("error 421")
                        || said.contains("error 503")
                        || said.contains("not running"));
                if answered {
                    if served.last() != Some(&name) {
                        served.push(name);
                    }
                    answers += 1;
                }
            }
        }
        assert!(
            served.len() <= 2,
            "round {round}: {service} answered in turn by {served:?}"
        );
    }
    // Both node keys are back.
    hosts.wait(Duration::from_secs(10), "both nodes listed", |hosts| {
        let fleet: serde_json::Value =
            serde_json::from_slice(&hosts.host("a").ctl(&["fleet", "--json"]).stdout)
                .unwrap_or_default();
        fleet["nodes"].as_array().map(Vec::len) == Some(2)
    });
    Ok(())
}

/// An owner key deleted while its owner lives (here paused, well within its 10 s lease):
/// the other host leaves the service to that owner to stop first, and says so. The second
/// round deletes the owner's node key first: the owner still counts as alive, as etcd still
/// has its lease. (A dead owner's services are taken at once: see the test of an owner
/// killed outright.)
#[test]
fn an_owner_key_deleted_while_its_owner_lives_is_left_to_that_owner_first() -> TestResult {
    let etcd = EtcdServer::start();
    let mut hosts = Hosts::new(&["kv"]);
    hosts.start_together(&["a", "b"], &etcd, &["--lease-ttl", "10s"]);
    for (round, node_key_too) in [(1, false), (2, true)] {
        let owner = hosts.owner("kv");
        put(hosts.host(&owner), "n", round);
        checkpoint(hosts.host(&owner));
        signal::kill(hosts.pid(&owner), signal::Signal::SIGSTOP)?;
        if node_key_too {
            etcd.etcdctl(&["del", &format!("/microkernel/nodes/{owner}")]);
        }
        etcd.etcdctl(&["del", "/microkernel/owner/kv"]);
        hosts.wait(
            Duration::from_secs(20),
            "the other host to leave kv to its owner",
            |hosts| hosts.logs().matches("gone while its owner lives").count() as u64 >= round,
        );
        signal::kill(hosts.pid(&owner), signal::Signal::SIGCONT)?;
        // Then one host serves kv, with its checkpoint (the owner stopped it, and the
        // service went to whichever host claimed it first).
        hosts.wait(Duration::from_secs(20), "one host to serve kv", |hosts| {
            let serving = hosts.serving("kv", r#"{"op":"get","key":"n"}"#);
            serving.len() == 1 && serving[0].1["value"] == round
        });
    }
    Ok(())
}

/// etcd whose clients speak TLS (`etcds://`), with a certificate signed by a CA of the
/// test's own (made with `openssl`): a host given the CA (`--etcd-ca-file`) joins and
/// works; one without it is refused, naming etcd and what failed.
#[test]
fn a_fleet_on_an_etcd_that_speaks_tls_trusts_only_the_ca_it_is_given() -> TestResult {
    let dir = tempfile::tempdir()?;
    let at = |name: &str| dir.path().join(name);
    let openssl = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir.path())
            .output()
            .expect("openssl runs (`.ci/run` installs it)");
        assert!(out.status.success(), "openssl {args:?}: {}", stderr(&out));
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=microkernel test CA",
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    fs::write(at("ext.cnf"), "subjectAltName=IP:127.0.0.1\n")?;
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
    let data = tempfile::tempdir()?;
    let etcd = fleet::local::LocalEtcd::start_with(
        data.path(),
        Some(fleet::local::Tls {
            ca: at("ca.pem"),
            cert: at("server.pem"),
            key: at("server.key"),
        }),
    )?;
    let config = |endpoints: fleet::Endpoints| FleetConfig {
        endpoints,
        node: "a".into(),
        lease_ttl: TTL,
        prefix: "/microkernel".into(),
    };
    let a = Fleet::join(&config(etcd.endpoints()), keyring())?;
    assert!(a.claim(&services(&["kv"]))?);
    a.save("kv", "1", b"over TLS")?;
    assert_eq!(a.load("kv")?.ok_or("a state")?.bytes, b"over TLS");
    a.leave();
    // `etcds://` without the CA: the system's roots do not know it.
    let untrusted = fleet::Endpoints::parse(&etcd.url())?;
    let refused = Fleet::join(&config(untrusted), keyring()).expect_err("an unknown CA");
    let said = host::error_chain(&refused);
    assert!(said.contains(&format!("etcd {}", etcd.url())), "{said}");
    Ok(())
}
