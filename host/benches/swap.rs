//! `cargo bench -p host --bench swap`: how long the operations that matter take on this
//! machine (release build, medians of many runs). A bench command, not a test: it measures
//! and prints, and asserts nothing about time.
//!
//! - a hot replace of `echo` (load and check the new library, also with a probe process
//!   first, as the daemon does; then the replace itself: export,
//!   seal and durable write of the state, stop, new instance, import, start, close the old
//!   library), and how long requests were held meanwhile;
//! - a request/reply through the kernel;
//! - sealing and durably writing a state of 1 KiB and 1 MiB;
//! - how resident memory grows over many swaps (a leak would show here).

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use host::{
    loader::{Loader, PluginFile, Probe},
    state::{KeyRing, StateKey, StateStore},
    Kernel, KernelConfig,
};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// Builds the example plugins in release mode; returns the directory holding them.
fn plugins() -> PathBuf {
    let status = Command::new(env!("CARGO"))
        .current_dir(workspace())
        .args([
            "build",
            "--quiet",
            "--release",
            "-p",
            "echo",
            "-p",
            "echo-v2",
        ])
        .status()
        .expect("cargo runs");
    assert!(status.success(), "building the plugins failed");
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"))
        .join("release")
}

fn quantiles(label: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    println!(
        "{label:<44} n={:<6} median {:>10.1?}  p90 {:>10.1?}  p99 {:>10.1?}  max {:>10.1?}",
        samples.len(),
        at(0.5),
        at(0.9),
        at(0.99),
        samples[samples.len() - 1]
    );
}

/// The process's resident memory, in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn store(dir: &Path) -> StateStore {
    StateStore::new(dir, KeyRing::new(StateKey::generate(), Vec::new())).unwrap()
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is understood.
    let plugins = plugins();
    let state = tempfile::tempdir().unwrap();
    let kernel = Kernel::new(KernelConfig {
        state: Some(store(state.path())),
        ..Default::default()
    })
    .unwrap();
    let v1 = plugins.join("libecho.so");
    let v2 = plugins.join("libecho_v2.so");
    kernel.load(&v1, None).unwrap();
    assert!(kernel.start_all().is_empty());

    let mut requests = Vec::new();
    for _ in 0..20_000 {
        let started = Instant::now();
        assert!(kernel.request("echo", "echo", b"x", None).is_ok());
        requests.push(started.elapsed());
    }
    quantiles("request/reply through the kernel", requests);

    let (mut loads, mut swaps, mut held) = (Vec::new(), Vec::new(), Vec::new());
    let file = PluginFile::read(&v2).unwrap();
    let mut rss_after_warmup = 0;
    for round in 0..2000 {
        if round == 100 {
            rss_after_warmup = rss_kib();
        }
        let started = Instant::now();
        let library = if round == 0 {
            kernel.loader().load(&v2).unwrap()
        } else {
            kernel.loader().load_file(&file).unwrap()
        };
        let loaded = started.elapsed();
        let swap_started = Instant::now();
        let report = kernel.replace(library, None).unwrap();
        swaps.push(swap_started.elapsed());
        loads.push(loaded);
        held.push(report.held);
        assert!(report.unmapped, "the old library stayed mapped");
    }
    let rss_growth = rss_kib().saturating_sub(rss_after_warmup);
    println!(
        "{:<44} {} KiB over the last 1900 swaps ({} bytes a swap)",
        "resident memory growth",
        rss_growth,
        rss_growth * 1024 / 1900
    );
    quantiles("load + check a new echo (shadow copy, dlopen)", loads);

    // What proving a file in a child process first adds to a reload (the daemon always does).
    let probing = Loader::new(
        None,
        Some(Probe::new(
            env!("CARGO_BIN_EXE_microkernel").into(),
            Duration::from_secs(10),
        )),
    )
    .unwrap();
    let mut probed = Vec::new();
    for _ in 0..200 {
        let started = Instant::now();
        let library = probing.load_file(&file).unwrap();
        probed.push(started.elapsed());
        drop(library);
    }
    quantiles("load + check, proven in a probe process first", probed);
    quantiles("hot replace (export .. close old library)", swaps);
    quantiles("requests held during the replace", held);

    let dir = tempfile::tempdir().unwrap();
    let writer = store(dir.path());
    for size in [1024, 1024 * 1024] {
        let state = vec![7u8; size];
        let mut writes = Vec::new();
        for _ in 0..if size > 4096 { 100 } else { 500 } {
            let started = Instant::now();
            writer.save("bench", "1.0.0", &state).unwrap();
            writes.push(started.elapsed());
        }
        quantiles(
            &format!("seal + durable write of {} KiB", size / 1024),
            writes,
        );
    }
    kernel.shutdown();
}
