//! Isolated services: a request to a service in a worker process, a hot replace of one, a
//! crash to serving again, and what a crash loop costs the other services; each next to its
//! floor measured in the same run.

use std::{
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use host::{
    instance::InstanceSource as _,
    kernel::Loaded,
    loader::PluginFile,
    worker::{BarePeer, Isolation},
    Kernel, KernelConfig,
};

use super::{
    requests::{time, Peer, PAYLOAD},
    stats::{micros, millis, Samples},
    swap::{kv_state, size_name, store, Nothing},
    Bench, Goal, Row,
};

/// This program: the workers', and the bare peer's.
fn program() -> anyhow::Result<std::path::PathBuf> {
    Ok(host::loader::Probe::this_program())
}

/// A kernel running `plugins` (file names in the bench's directory), `isolated` of them in
/// worker processes, with `state` saved for kv first, when given.
fn kernel_with(
    bench: &Bench,
    plugins: &[&str],
    isolated: &[&str],
    state: Option<(&Path, &[u8])>,
) -> anyhow::Result<Kernel> {
    let store = match state {
        Some((dir, bytes)) => {
            let store = store(dir)?;
            store.save("kv", "1.0.0", bytes)?;
            Some(store)
        }
        None => None,
    };
    let kernel = Kernel::new(KernelConfig {
        isolation: isolated
            .iter()
            .map(|s| ((*s).to_owned(), fast_restarts()))
            .collect(),
        worker_program: Some(program()?),
        state: store,
        ..KernelConfig::default()
    })?;
    for plugin in plugins {
        kernel.register(load(&kernel, &bench.plugin(plugin))?, None)?;
    }
    if let Some((service, error)) = kernel.start_all().into_iter().next() {
        bail!("starting {service}: {}", host::error_chain(&error));
    }
    Ok(kernel)
}

/// Restarts at once, without limit: the bench crashes workers on purpose.
fn fast_restarts() -> Isolation {
    Isolation {
        max_restarts: u32::MAX,
        backoff: Duration::ZERO,
        backoff_max: Duration::ZERO,
        ..Isolation::default()
    }
}

fn load(kernel: &Kernel, path: &Path) -> anyhow::Result<Loaded> {
    let file = PluginFile::read(path)?;
    // SAFETY: as in `super::load`: the bench's own plugins.
    Ok(unsafe { kernel.load_version(&file) }?)
}

fn request(kernel: &Kernel, to: &str, payload: &[u8]) -> anyhow::Result<()> {
    let reply = kernel.request(to, "request", payload, None);
    if !reply.is_ok() {
        bail!("{to} answered {}: {}", reply.code, reply.message);
    }
    Ok(())
}

pub(super) fn rows(bench: &Bench) -> anyhow::Result<Vec<Row>> {
    let mut rows = requests(bench)?;
    rows.extend(pauses(bench)?);
    rows.extend(crash_to_serving(bench)?);
    rows.extend(crash_loop(bench)?);
    Ok(rows)
}

/// Request/reply to noop in a worker, against a bare exchange between two processes over
/// the same transport with the same waiting policy; and against the in-process path and the
/// JSON-lines peer, for comparison.
fn requests(bench: &Bench) -> anyhow::Result<Vec<Row>> {
    let isolated = kernel_with(bench, &["libnoop.so"], &["noop"], None)?;
    let in_process = kernel_with(bench, &["libnoop.so"], &[], None)?;
    let mut bare = BarePeer::spawn(&program()?, KernelConfig::default().spin)?;
    let mut peer = Peer::spawn()?;
    let rounds = bench.effort.pick(20, 10, 2);
    let batch = bench.effort.pick(2000, 1000, 50);
    let (mut floor, mut iso, mut local, mut json) = Default::default();
    let mut warm = Samples::default();
    time(&mut warm, batch, || Ok(bare.round_trip(&PAYLOAD)?))?;
    time(&mut warm, batch, || request(&isolated, "noop", &PAYLOAD))?;
    time(&mut warm, batch, || request(&in_process, "noop", &PAYLOAD))?;
    for _ in 0..rounds {
        time(&mut floor, batch, || Ok(bare.round_trip(&PAYLOAD)?))?;
        time(&mut iso, batch, || request(&isolated, "noop", &PAYLOAD))?;
        time(&mut local, batch, || request(&in_process, "noop", &PAYLOAD))?;
    }
    // The peer alone, as the requests measure times it: nothing else runs meanwhile, as
    // for a plugin system whose client and plugin block on their socket.
    time(&mut Samples::default(), batch / 4, || peer.round_trip())?;
    for _ in 0..rounds {
        time(&mut json, batch / 4, || peer.round_trip())?;
    }
    let floor_is = "a bare round trip between two processes: the same socket pair, frames and polling, a peer that answers at once";
    Ok(vec![
        Row::new(
            "isolated request/reply to noop (64 B), median",
            (micros(iso.median()), micros(floor.median())),
            "µs",
            floor_is,
            Goal::RatioAtMost(1.5),
            iso.len(),
        )
        .with_spread(&iso.in_order(micros), &floor.in_order(micros), 0.5),
        Row::new(
            "isolated request/reply to noop (64 B), p90",
            (micros(iso.quantile(0.9)), micros(floor.quantile(0.9))),
            "µs",
            floor_is,
            Goal::None,
            iso.len(),
        )
        .with_spread(&iso.in_order(micros), &floor.in_order(micros), 0.9),
        Row::new(
            "isolated request/reply to noop, against in process, median",
            (micros(iso.median()), micros(local.median())),
            "µs",
            "the same request to noop in the host's process (threads not pinned)",
            Goal::None,
            iso.len(),
        )
        .with_spread(&iso.in_order(micros), &local.in_order(micros), 0.5),
        Row::new(
            "JSON-lines peer against isolated request/reply, median",
            (micros(json.median()), micros(iso.median())),
            "µs",
            "the isolated request/reply (the ratio: how many times faster isolation is)",
            Goal::RatioAtLeast(5.0),
            json.len(),
        ),
    ])
}

/// A hot replace of kv with its own file, isolated against in process, by state size.
fn pauses(bench: &Bench) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    let sizes = match bench.effort {
        super::Effort::Smoke => vec![1 << 10],
        _ => vec![1 << 10, 1 << 20],
    };
    for size in sizes {
        let state = kv_state(size);
        let dir_iso = bench.dir(&format!("iso-swap-{size}"))?;
        let dir_in = bench.dir(&format!("in-swap-{size}"))?;
        let isolated = kernel_with(bench, &["libkv.so"], &["kv"], Some((&dir_iso, &state)))?;
        let in_process = kernel_with(bench, &["libkv.so"], &[], Some((&dir_in, &state)))?;
        let n = match size {
            s if s >= 1 << 20 => bench.effort.pick(60, 10, 2),
            _ => bench.effort.pick(200, 30, 3),
        };
        let (mut iso, mut local) = (Samples::default(), Samples::default());
        let kv = bench.plugin("libkv.so");
        for round in 0..=n {
            let new = load(&isolated, &kv)?;
            let report = isolated
                .replace(new, None)
                .context("replacing kv, isolated")?;
            let new = load(&in_process, &kv)?;
            let local_report = in_process
                .replace(new, None)
                .context("replacing kv, in process")?;
            if round > 0 {
                iso.push(report.held);
                local.push(local_report.held);
            }
        }
        rows.push(
            Row::new(
                format!(
                    "isolated swap pause, kv {} ({} B)",
                    size_name(size),
                    state.len()
                ),
                (millis(iso.median()), millis(local.median())),
                "ms",
                "the same hot replace of kv in process",
                Goal::None,
                iso.len(),
            )
            .with_spread(&iso.in_order(millis), &local.in_order(millis), 0.5),
        );
        isolated.shutdown();
        in_process.shutdown();
    }
    Ok(rows)
}

/// Waits until process `pid` is dead (a zombie, or gone).
fn wait_dead(pid: u32) {
    let stat = format!("/proc/{pid}/stat");
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        match std::fs::read_to_string(&stat) {
            Ok(text) if !text.contains(") Z ") => std::thread::yield_now(),
            _ => return,
        }
    }
}

fn kill(pid: u32) -> anyhow::Result<()> {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid)?),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    Ok(())
}

/// From a worker killed to the service serving again (the next request finds it dead,
/// starts another from the last durable state, and is served), against starting a worker,
/// opening the file, creating the instance, importing the same state and starting it,
/// directly.
fn crash_to_serving(bench: &Bench) -> anyhow::Result<Vec<Row>> {
    let state = kv_state(1 << 10);
    let dir = bench.dir("crash")?;
    let kernel = kernel_with(bench, &["libkv.so"], &["kv"], Some((&dir, &state)))?;
    kernel.checkpoint();
    let Loaded::Isolated(plugin) = load(&kernel, &bench.plugin("libkv.so"))? else {
        bail!("kv was not loaded isolated");
    };
    let n = bench.effort.pick(100, 20, 2);
    let len = br#"{"op":"len"}"#;
    let (mut served, mut direct) = (Samples::default(), Samples::default());
    for round in 0..=n {
        let pid = kernel
            .info("kv")
            .and_then(|info| info.process?.pid)
            .context("kv has no worker")?;
        kill(pid)?;
        wait_dead(pid);
        let started = Instant::now();
        request(&kernel, "kv", len)?;
        let back = started.elapsed();

        let started = Instant::now();
        let mut instance = plugin
            .clone()
            .create(Arc::new(Nothing), None)
            .map_err(anyhow::Error::msg)?;
        instance
            .import_state("1.0.0", &state)
            .map_err(anyhow::Error::msg)?;
        instance.start().map_err(anyhow::Error::msg)?;
        let floor = started.elapsed();
        drop(instance);
        if round > 0 {
            served.push(back);
            direct.push(floor);
        }
    }
    kernel.shutdown();
    Ok(vec![Row::new(
        "isolated crash to serving again (kv, 1 KiB state)",
        (millis(served.median()), millis(direct.median())),
        "ms",
        "starting a worker, opening the file, creating, importing the same state, starting: directly",
        Goal::RatioAtMost(1.5),
        served.len(),
    )
    .with_spread(&served.in_order(millis), &direct.in_order(millis), 0.5)])
}

/// The request latency of a service in process (echo) while an isolated one (noop) crashes
/// in a loop (its worker killed as soon as it serves again), against the same while
/// nothing crashes, alternating.
fn crash_loop(bench: &Bench) -> anyhow::Result<Vec<Row>> {
    let kernel = Arc::new(kernel_with(
        bench,
        &["libnoop.so", "libecho.so"],
        &["noop"],
        None,
    )?);
    let rounds = bench.effort.pick(10, 4, 1);
    let batch = bench.effort.pick(20_000, 5_000, 200);
    let (mut quiet, mut crashing) = (Samples::default(), Samples::default());
    let mut crashes = 0u64;
    let echo = |kernel: &Kernel| request(kernel, "echo", b"{}");
    time(&mut Samples::default(), batch, || echo(&kernel))?;
    for _ in 0..rounds {
        time(&mut quiet, batch, || echo(&kernel))?;
        let stop = Arc::new(AtomicBool::new(false));
        let crasher = {
            let (kernel, stop) = (kernel.clone(), stop.clone());
            std::thread::spawn(move || -> anyhow::Result<u64> {
                let mut crashes = 0;
                while !stop.load(Ordering::Relaxed) {
                    let pid = kernel
                        .info("noop")
                        .and_then(|info| info.process?.pid)
                        .context("noop has no worker")?;
                    kill(pid)?;
                    wait_dead(pid);
                    crashes += 1;
                    // Served again: the next crash is of a new worker.
                    request(&kernel, "noop", &PAYLOAD)?;
                }
                Ok(crashes)
            })
        };
        time(&mut crashing, batch, || echo(&kernel))?;
        stop.store(true, Ordering::Relaxed);
        crashes += crasher
            .join()
            .map_err(|_| anyhow::anyhow!("the crasher panicked"))??;
    }
    Ok(vec![Row::new(
        format!(
            "echo's request p99 while an isolated service crashes in a loop ({crashes} crashes)"
        ),
        (
            micros(crashing.quantile(0.99)),
            micros(quiet.quantile(0.99)),
        ),
        "µs",
        "echo's request p99 while nothing crashes, in alternation",
        Goal::RatioAtMost(1.5),
        crashing.len(),
    )
    .with_spread(
        &crashing.in_order(micros),
        &quiet.in_order(micros),
        0.99,
    )])
}
