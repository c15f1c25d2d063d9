//! Long runs, short by default: kill -9 while a large state is checkpointed and swapped,
//! and a thousand swaps under load. `MICROKERNEL_TORTURE_KILLS=1000` and
//! `MICROKERNEL_SOAK_SWAPS=1000` run the long versions (see docs/RELIABILITY.md).

use std::{
    fs,
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::Path,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::Duration,
};

use crate::{cli::*, support::*};

fn count_from_env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A small deterministic random sequence (the same on every run).
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// One control request on an open connection, its answer as JSON.
fn call(stream: &mut BufReader<UnixStream>, request: &serde_json::Value) -> serde_json::Value {
    let mut line = serde_json::to_vec(request).unwrap();
    line.push(b'\n');
    stream.get_mut().write_all(&line).unwrap();
    let mut answer = String::new();
    stream.read_line(&mut answer).unwrap();
    serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{e}: {answer:?}"))
}

fn connect(root: &Path) -> BufReader<UnixStream> {
    BufReader::new(UnixStream::connect(root.join("state/control.sock")).unwrap())
}

/// Writes `bytes` as `dir/name` atomically (as the README says to deploy a plugin).
fn deploy(dir: &Path, name: &str, bytes: &[u8]) {
    let staging = dir.join(format!(".{name}.new"));
    fs::write(&staging, bytes).unwrap();
    fs::rename(staging, dir.join(name)).unwrap();
}

fn reload(stream: &mut BufReader<UnixStream>) -> serde_json::Value {
    call(stream, &serde_json::json!({"cmd": "reload"}))
}

fn inspect_kv(root: &Path) -> Option<serde_json::Value> {
    let output = inspect(root, "kv", &["--json"]);
    output
        .status
        .success()
        .then(|| serde_json::from_slice::<serde_json::Value>(&output.stdout).ok())
        .flatten()
}

/// How long an acknowledged put may take to reach the disk while checkpoints (every 20 ms)
/// and hot replaces (back to back) each write the live state. A product failure past this.
const DURABLE_WITHIN: Duration = Duration::from_secs(120);

/// The writes of a state file seen by polling its identity: every write is a new file renamed
/// over the old one, so a new inode (or a new modification time, should the inode be
/// reused) is a new write. Writes of one service are serialized (each exports and saves under
/// the service's operation lock), so the second write seen after a moment exported its state
/// after that moment: the first may have exported before it and renamed after.
struct Writes {
    last: Option<(u64, i64, i64)>,
    seen: u32,
}

impl Writes {
    fn since(path: &Path) -> Writes {
        Writes {
            last: identity(path),
            seen: 0,
        }
    }

    fn seen_twice(&mut self, path: &Path) -> bool {
        let now = identity(path);
        if now != self.last {
            self.last = now;
            self.seen += 1;
        }
        self.seen >= 2
    }
}

fn identity(path: &Path) -> Option<(u64, i64, i64)> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::metadata(path).ok()?;
    Some((meta.ino(), meta.mtime(), meta.mtime_nsec()))
}

const LARGE_KEYS: usize = 11;
const LARGE_LEN: usize = 100_000;

#[test]
fn kill_9_while_a_large_state_is_checkpointed_and_swapped_never_tears_it() -> TestResult {
    let kills = count_from_env("MICROKERNEL_TORTURE_KILLS", 100);
    let root = setup(&["kv"]);
    let plugins = root.path().join("plugins");
    // Two builds of kv with different bytes: every rescan that finds the other one swaps.
    let build_a = fs::read(plugins.join("libkv.so"))?;
    let mut build_b = build_a.clone();
    build_b.extend_from_slice(b"another build of the same version");

    // A state of more than 1 MiB.
    let daemon = Daemon::start(root.path());
    let large = "x".repeat(LARGE_LEN);
    for key in 0..LARGE_KEYS {
        daemon.send(
            "kv",
            &format!(r#"{{"op":"put","key":"large-{key}","value":"{large}"}}"#),
        );
    }
    daemon.send("kv", r#"{"op":"put","key":"tick","value":0}"#);
    assert_eq!(daemon.terminate().code(), Some(0));
    assert!(fs::metadata(root.path().join("state/kv.state"))?.len() > 1 << 20);

    let mut acknowledged = vec![0u64];
    let mut random = Lcg(7);
    let mut seen_ticks = std::collections::BTreeSet::new();
    let state_file = root.path().join("state/kv.state");
    for kill in 0..kills {
        let mut daemon = Daemon::start_with(root.path(), &["--checkpoint-interval", "20ms"]);
        let stop = AtomicBool::new(false);
        let mut durable = None;
        std::thread::scope(|scope| {
            // Swaps, as fast as they go, until the kill.
            scope.spawn(|| {
                adopt();
                // The kill may come before this thread even connects.
                let Ok(stream) = UnixStream::connect(root.path().join("state/control.sock")) else {
                    return;
                };
                let mut stream = BufReader::new(stream);
                let mut b = kill % 2 == 0;
                while !stop.load(Ordering::Relaxed) {
                    deploy(&plugins, "libkv.so", if b { &build_b } else { &build_a });
                    b = !b;
                    let mut line =
                        serde_json::to_vec(&serde_json::json!({"cmd": "reload"})).unwrap();
                    line.push(b'\n');
                    if stream.get_mut().write_all(&line).is_err() {
                        return;
                    }
                    let mut answer = String::new();
                    if stream.read_line(&mut answer).unwrap_or(0) == 0 {
                        return;
                    }
                }
            });
            // Puts, each acknowledged before the next, for a random while; then on, until a
            // tick acknowledged after that while is seen durable; then the kill. So every
            // kill comes after a newer state reached the disk, however slow the machine.
            let alive = Duration::from_millis(random.below(300));
            let started = std::time::Instant::now();
            let mut stream = connect(root.path());
            let mut durable_after: Option<(u64, Writes)> = None;
            let acknowledged_before = acknowledged.len();
            loop {
                if let Some((_, writes)) = &mut durable_after {
                    if writes.seen_twice(&state_file) {
                        break;
                    }
                    if started.elapsed() > DURABLE_WITHIN {
                        // Failed below, once the daemon and the swapping thread are stopped.
                        break;
                    }
                } else if started.elapsed() >= alive && acknowledged.len() > acknowledged_before {
                    // Whatever is written from now on was exported after this ack.
                    let tick = *acknowledged.last().unwrap();
                    durable_after = Some((tick, Writes::since(&state_file)));
                }
                let tick = acknowledged.last().unwrap() + 1;
                let put = serde_json::json!({
                    "cmd": "send", "service": "kv", "kind": "request",
                    "payload": hex::encode(format!(r#"{{"op":"put","key":"tick","value":{tick}}}"#)),
                    "timeout_ms": null,
                });
                if call(&mut stream, &put)["code"] == 0 {
                    acknowledged.push(tick);
                }
                std::thread::sleep(Duration::from_millis(random.below(20)));
            }
            daemon.child.kill().unwrap();
            daemon.child.wait().unwrap();
            stop.store(true, Ordering::Relaxed);
            durable = durable_after.filter(|(_, writes)| writes.seen >= 2);
        });
        let Some((durable, _)) = durable else {
            panic!(
                "kill {kill}: no acknowledged put reached the disk in {DURABLE_WITHIN:?}\n{}",
                daemon.log()
            );
        };
        // The file opens, holds the large values, and a tick the service acknowledged.
        let state = inspect_kv(root.path())
            .unwrap_or_else(|| panic!("kill {kill}: kv.state does not open\n{}", daemon.log()));
        let content = &state["content"];
        for key in 0..LARGE_KEYS {
            assert_eq!(
                content[format!("large-{key}")].as_str().map(str::len),
                Some(LARGE_LEN),
                "kill {kill}: large-{key}"
            );
        }
        let tick = content["tick"].as_u64().unwrap();
        assert!(
            acknowledged.contains(&tick),
            "kill {kill}: tick {tick} was never acknowledged"
        );
        // Nothing seen durable before the kill is lost by it.
        assert!(
            tick >= durable,
            "kill {kill}: tick {durable} was on disk before the kill, {tick} after it"
        );
        seen_ticks.insert(tick);
    }
    // Not vacuous: every kill came after a state newer than the last kill's was written.
    assert_eq!(seen_ticks.len() as u64, kills, "{seen_ticks:?}");
    eprintln!(
        "torture: {kills} kills, every state file opened, {} distinct acknowledged ticks found",
        seen_ticks.len()
    );
    Ok(())
}

fn rss_kb(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

fn mappings(pid: u32) -> usize {
    fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap()
        .lines()
        .count()
}

#[test]
fn a_thousand_swaps_under_load_lose_no_request_and_leak_nothing() -> TestResult {
    let swaps = count_from_env("MICROKERNEL_SOAK_SWAPS", 150).max(12);
    // Resident memory is sampled at a third and at two thirds of the swaps, and at the end.
    // A leak grows it in both windows; the allocator's warm-up (its arenas and caches
    // reaching their size, about 1.3 MB here, at whatever swap the load makes it happen)
    // is one step, in one window at most. So the smaller growth of the two must be small.
    let samples = [swaps / 3, swaps * 2 / 3];
    let root = setup(&["echo"]);
    let plugins = root.path().join("plugins");
    let daemon = Daemon::start_with(root.path(), &["--checkpoint-interval", "0"]);
    let pid = daemon.child.id();
    let v2 = fs::read(fixture("echo-v2"))?;
    let builds = [v2.clone(), {
        let mut other = v2.clone();
        other.extend_from_slice(b"another build of 2.0.0");
        other
    }];

    let ok = AtomicU64::new(0);
    let failed = AtomicU64::new(0);
    let done = AtomicBool::new(false);
    let mut sampled = [(0, 0); 2];
    std::thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| {
                adopt();
                let mut stream = connect(root.path());
                let request = serde_json::json!({
                    "cmd": "send", "service": "echo", "kind": "echo",
                    "payload": hex::encode("load"), "timeout_ms": 30_000,
                });
                while !done.load(Ordering::Relaxed) {
                    if call(&mut stream, &request)["code"] == 0 {
                        ok.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
        let mut control = connect(root.path());
        for swap in 0..swaps {
            deploy(&plugins, "libecho_v2.so", &builds[(swap % 2) as usize]);
            let answer = reload(&mut control);
            let lines = answer["lines"].to_string();
            assert!(
                answer["failed"] == false && lines.contains("replaced echo"),
                "swap {swap}: {answer}"
            );
            if let Some(at) = samples.iter().position(|&s| s == swap) {
                sampled[at] = (rss_kb(pid), mappings(pid));
            }
            if swap % 100 == 0 {
                eprintln!(
                    "soak: swap {swap}: resident {} kB, {} mappings",
                    rss_kb(pid),
                    mappings(pid)
                );
            }
        }
        done.store(true, Ordering::Relaxed);
    });
    let (rss_after, mappings_after) = (rss_kb(pid), mappings(pid));
    eprintln!(
        "soak: {swaps} swaps, {} requests, {} failed, resident {} kB at swap {}, {} kB at swap {}, {rss_after} kB at the end, mappings {}, {} and {mappings_after}",
        ok.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        sampled[0].0,
        samples[0],
        sampled[1].0,
        samples[1],
        sampled[0].1,
        sampled[1].1,
    );
    assert_eq!(failed.load(Ordering::Relaxed), 0);
    // Every request was counted once, through every version.
    let count = daemon.send("echo", "{}")["count"].as_u64().unwrap();
    assert_eq!(count, ok.load(Ordering::Relaxed) + 1);
    // A library left open adds its mappings at every swap; a thread's stack or an
    // allocator's arena made once, in one window.
    assert!(
        sampled[1].1 == sampled[0].1 || mappings_after == sampled[1].1,
        "mappings grew in both windows: {} at swap {}, {} at swap {}, {mappings_after} at the end",
        sampled[0].1,
        samples[0],
        sampled[1].1,
        samples[1],
    );
    let growth = [
        sampled[1].0.saturating_sub(sampled[0].0),
        rss_after.saturating_sub(sampled[1].0),
    ];
    assert!(
        growth.iter().min().unwrap() < &1024,
        "resident memory grew in both windows: {} kB over swaps {}..{}, {} kB over swaps {}..{swaps}",
        growth[0],
        samples[0],
        samples[1],
        growth[1],
        samples[1],
    );
    Ok(())
}
