//! A fleet of hosts on one etcd (issue 18): states in etcd, fenced owners, failover. Each
//! test starts its own etcd (see `etcd.rs`).

use std::{sync::Arc, time::Duration};

use fleet::{Fleet, FleetConfig};
use host::state::{KeyRing, StateBackend, StateError, StateKey};

use crate::{etcd::EtcdServer, support::TestResult};

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
    let status = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!(
            "--endpoints={}",
            etcd.url().replace("etcd://", "http://")
        ))
        .args(["lease", "revoke", &format!("{lease:x}")])
        .stdout(std::process::Stdio::null())
        .status()
        .expect("etcdctl runs");
    assert!(status.success());
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
    let a = Fleet::join(&config(&etcd, "a"), keyring())?;
    assert!(a.claim(&services(&["big"]))?);
    let big: Vec<u8> = (0..(3 << 20) + 12345).map(|i| (i % 251) as u8).collect();
    a.save("big", "1.0.0", &big)?;
    assert_eq!(a.load("big")?.ok_or("a state")?.bytes, big);
    // Replaced by a smaller one: the old generation's chunks go.
    a.save("big", "1.0.0", b"small")?;
    assert_eq!(a.load("big")?.ok_or("a state")?.bytes, b"small");
    let chunks = etcdctl_keys(&etcd, "/microkernel/state/big/gen/");
    assert_eq!(chunks.len(), 1, "{chunks:?}");
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
    let out = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!(
            "--endpoints={}",
            etcd.url().replace("etcd://", "http://")
        ))
        .args(["get", "--prefix", "--keys-only", prefix])
        .output()
        .expect("etcdctl runs");
    String::from_utf8_lossy(&out.stdout)
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
            lease_ttl: Duration::from_secs(3),
            ..config(&etcd, "a")
        },
        keyring(),
    )?;
    assert!(a.claim(&services(&["kv"]))?);
    a.save("kv", "1", b"before")?;
    etcd.restart();
    let renewals = a.session().ok_or("a session")?.renewals();
    // Two TTLs: without renewals over a new stream the lease would lapse in one.
    let until = std::time::Instant::now() + Duration::from_secs(6);
    while std::time::Instant::now() < until {
        assert!(a.owns("kv"), "a lost kv to an etcd restart");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(a.session().ok_or("a session")?.renewals() > renewals);
    a.save("kv", "1", b"after")?;
    assert_eq!(a.load("kv")?.ok_or("a state")?.bytes, b"after");
    Ok(())
}
