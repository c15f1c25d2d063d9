//! Hot replaces: how long requests are held, against the same chain of work done directly;
//! persisting state; memory over many swaps; checkpoints of unchanged state.

use std::{
    fs,
    io::Write,
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use plugin_api::{abi::LogLevel, codes, Reply};

use super::{
    stats::{millis, Samples},
    Bench, Goal, Row,
};
use host::{
    instance::{HostServices, ServiceInstance as _},
    loader::{Instance, Library, Loader, PluginFile},
    state::{cipher, KeyRing, StateKey, StateStore},
    Kernel, KernelConfig,
};

/// How the swap pause rows start (the chart finds them by it).
pub(super) const PAUSE: &str = "swap pause, kv state";

/// The state sizes the swap pause is measured at.
fn sizes(bench: &Bench) -> Vec<usize> {
    match bench.effort {
        super::Effort::Smoke => vec![1 << 10, 64 << 10],
        _ => vec![1 << 10, 64 << 10, 1 << 20, 16 << 20],
    }
}

/// A human name for a size.
pub(super) fn size_name(size: usize) -> String {
    match size {
        s if s >= 1 << 20 => format!("{} MiB", s >> 20),
        s => format!("{} KiB", s >> 10),
    }
}

/// A kv state (its map as JSON) of about `size` bytes: entries of about 1 KiB, as a cache
/// of small documents would hold.
pub(super) fn kv_state(size: usize) -> Vec<u8> {
    let entry = 1024.min(size);
    let count = (size / entry).max(1);
    // `"k0000000":"<value>",` is 15 bytes around the value.
    let value_len = entry.saturating_sub(15).max(1);
    let map: std::collections::BTreeMap<String, String> = (0..count)
        .map(|i| (format!("k{i:07}"), "v".repeat(value_len)))
        .collect();
    serde_json::to_vec(&map).expect("a map of strings serializes")
}

/// A store in `dir` with a fresh key.
pub(super) fn store(dir: &Path) -> anyhow::Result<StateStore> {
    Ok(StateStore::new(
        dir,
        KeyRing::new(StateKey::generate(), Vec::new()),
    )?)
}

/// What the floor's instances see of a host: nothing.
pub(super) struct Nothing;

impl HostServices for Nothing {
    fn log(&self, _: LogLevel, _: &str, _: &str) {}
    fn request(&self, _: &str, _: &str, _: &[u8], _: Duration) -> Reply {
        Reply::error(codes::NOT_FOUND, "no host")
    }
    fn emit(&self, _: &str, _: &str, _: &[u8]) -> Result<(), String> {
        Err("no host".into())
    }
}

/// The floor of a swap: the plugin's and the store's work, one step after the other on this
/// thread, nothing of the host around it.
struct Direct {
    libraries: [Arc<Library>; 2],
    running: Instance,
    next: usize,
    store: StateStore,
    version: String,
}

/// The floor's steps, timed.
#[derive(Default)]
struct Steps {
    export: Samples,
    save: Samples,
    import: Samples,
    start: Samples,
    total: Samples,
}

impl Direct {
    fn new(loader: &Loader, kv: &Path, store: StateStore, state: &[u8]) -> anyhow::Result<Self> {
        let libraries = [
            Arc::new(super::load_path(loader, kv)?),
            Arc::new(super::load_path(loader, kv)?),
        ];
        let version = libraries[0].manifest().version.to_string();
        let mut running = instance(&libraries[0])?;
        running
            .import_state(&version, state)
            .map_err(anyhow::Error::msg)?;
        running.start().map_err(anyhow::Error::msg)?;
        Ok(Direct {
            libraries,
            running,
            next: 1,
            store,
            version,
        })
    }

    /// One swap: the new instance is made first (outside the pause, as the host does).
    fn swap(&mut self, steps: &mut Steps) -> anyhow::Result<()> {
        let mut new = instance(&self.libraries[self.next])?;
        let t0 = Instant::now();
        let bytes = self.running.export_state().map_err(anyhow::Error::msg)?;
        let t1 = Instant::now();
        self.store.save("kv-direct", &self.version, &bytes)?;
        let t2 = Instant::now();
        new.import_state(&self.version, &bytes)
            .map_err(anyhow::Error::msg)?;
        let t3 = Instant::now();
        new.start().map_err(anyhow::Error::msg)?;
        let t4 = Instant::now();
        steps.export.push(t1 - t0);
        steps.save.push(t2 - t1);
        steps.import.push(t3 - t2);
        steps.start.push(t4 - t3);
        steps.total.push(t4 - t0);
        let mut old = std::mem::replace(&mut self.running, new);
        old.stop().map_err(anyhow::Error::msg)?;
        drop(old);
        self.next = 1 - self.next;
        Ok(())
    }
}

fn instance(library: &Arc<Library>) -> anyhow::Result<Instance> {
    Instance::new(library.clone(), Arc::new(Nothing), None).map_err(anyhow::Error::msg)
}

fn start_all(kernel: &Kernel) -> anyhow::Result<()> {
    if let Some((service, error)) = kernel.start_all().into_iter().next() {
        bail!("starting {service}: {}", host::error_chain(&error));
    }
    Ok(())
}

/// A kernel running kv with `state` restored from its store in `dir`.
fn kv_kernel(bench: &Bench, dir: &Path, state: &[u8]) -> anyhow::Result<Kernel> {
    let store = store(dir)?;
    store.save("kv", "1.0.0", state)?;
    let kernel = Kernel::new(KernelConfig {
        state: Some(store),
        ..KernelConfig::default()
    })?;
    kernel.register(
        super::load_path(kernel.loader(), &bench.plugin("libkv.so"))?,
        None,
    )?;
    start_all(&kernel)?;
    Ok(kernel)
}

/// Measure 2: requests held by a hot replace of kv, by state size, against [`Direct`].
pub(super) fn pauses(bench: &Bench) -> anyhow::Result<Vec<Row>> {
    let kv = bench.plugin("libkv.so");
    let file = PluginFile::read(&kv)?;
    let mut rows = Vec::new();
    for size in sizes(bench) {
        let dir = bench.dir(&format!("swap-{size}"))?;
        let state = kv_state(size);
        let kernel = kv_kernel(bench, &dir, &state)?;
        let loader = Loader::new(None, None)?;
        let mut direct = Direct::new(&loader, &kv, store(&dir)?, &state)?;
        let n = match size {
            s if s >= 16 << 20 => bench.effort.pick(40, 6, 2),
            s if s >= 1 << 20 => bench.effort.pick(150, 15, 2),
            _ => bench.effort.pick(500, 40, 3),
        };
        let (mut held, mut steps) = (Samples::default(), Steps::default());
        // One of each to warm up, then one of each in turn.
        for round in 0..=n {
            let report = kernel
                .replace(super::load(kernel.loader(), &file)?, None)
                .context("replacing kv")?;
            let mut discard = Steps::default();
            direct.swap(if round == 0 { &mut discard } else { &mut steps })?;
            if round > 0 {
                held.push(report.held);
            }
        }
        let parts = vec![
            ("export_state".to_owned(), millis(steps.export.median())),
            (
                "seal + durable write".to_owned(),
                millis(steps.save.median()),
            ),
            ("import_state".to_owned(), millis(steps.import.median())),
            ("start".to_owned(), millis(steps.start.median())),
        ];
        let value = millis(held.median());
        let floor = millis(steps.total.median());
        let mut parts = parts;
        parts.push(("the host (the rest)".to_owned(), (value - floor).max(0.0)));
        rows.push(
            Row::new(
                format!("{PAUSE} {} ({} B)", size_name(size), state.len()),
                (value, floor),
                "ms",
                "export_state, seal + durable write, import_state, start: directly, in turn",
                Goal::RatioAtMost(1.2),
                held.len(),
            )
            .with_parts(parts)
            .with_spread(&held.in_order(millis), &steps.total.in_order(millis), 0.5),
        );
        kernel.shutdown();
        drop(direct);
        drop(loader);
    }
    Ok(rows)
}

/// Measure 4: the store persisting 16 MiB, against sealing and durably writing as directly
/// as can be (in place, one file rewritten, one fsync).
pub(super) fn persist(bench: &Bench) -> anyhow::Result<Vec<Row>> {
    const SIZE: usize = 16 << 20;
    let dir = bench.dir("persist")?;
    let store = store(&dir)?;
    let state = vec![0x5a_u8; SIZE];
    let key = StateKey::generate();
    let mut buffer = state.clone();
    let floor_path = dir.join("floor.bin");
    let n = bench.effort.pick(40, 8, 2);
    let (mut stored, mut direct) = (Samples::default(), Samples::default());
    for round in 0..=n {
        let started = Instant::now();
        store.save("persist", "1.0.0", &state)?;
        let saved = started.elapsed();

        let started = Instant::now();
        buffer.copy_from_slice(&state);
        let nonce = cipher::fresh_nonce();
        let tag = key.seal_in_place(&nonce, b"persist", &mut buffer);
        let mut file = fs::File::create(&floor_path)?;
        file.write_all(&buffer)?;
        file.write_all(&tag)?;
        file.sync_all()?;
        let written = started.elapsed();
        if round > 0 {
            stored.push(saved);
            direct.push(written);
        }
    }
    let mb = SIZE as f64 / 1e6;
    Ok(vec![Row::new(
        "persisting 16 MiB of state (seal, write, fsync, rename)",
        (
            mb / stored.median().as_secs_f64(),
            mb / direct.median().as_secs_f64(),
        ),
        "MB/s",
        "sealing 16 MiB in place and writing it to one file with one fsync",
        Goal::RatioAtLeast(0.8),
        stored.len(),
    )
    .with_spread(
        &stored.in_order(|d| mb / d.as_secs_f64()),
        &direct.in_order(|d| mb / d.as_secs_f64()),
        0.5,
    )])
}

/// The process's resident memory (KiB) and its count of memory mappings.
fn memory() -> (f64, f64) {
    let rss = fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0.0);
    let maps = fs::read_to_string("/proc/self/maps").map_or(0, |m| m.lines().count());
    (rss, maps as f64)
}

/// Measure 5: resident memory and mappings after many swaps against after 10.
pub(super) fn memory_rows(bench: &Bench) -> anyhow::Result<Vec<Row>> {
    let dir = bench.dir("memory")?;
    let kernel = kv_kernel(bench, &dir, &kv_state(1 << 10))?;
    let file = PluginFile::read(&bench.plugin("libkv.so"))?;
    let swaps = bench.effort.pick(1000, 300, 20);
    let mut after_ten = (0.0, 0.0);
    for swap in 1..=swaps {
        let report = kernel.replace(super::load(kernel.loader(), &file)?, None)?;
        if !report.unmapped {
            bail!("swap {swap}: the old kv library stayed mapped");
        }
        let reply = kernel.request("kv", "put", br#"{"op":"put","key":"k","value":1}"#, None);
        if !reply.is_ok() {
            bail!(
                "kv failed after swap {swap}: {}",
                String::from_utf8_lossy(&reply.data)
            );
        }
        if swap == 10 {
            after_ten = memory();
        }
    }
    let after = memory();
    kernel.shutdown();
    Ok(vec![
        Row::new(
            format!("resident memory after {swaps} swaps"),
            (after.0, after_ten.0),
            "KiB",
            "resident memory after 10 swaps",
            Goal::GrowthBelow(1024.0),
            1,
        ),
        Row::new(
            format!("memory mappings after {swaps} swaps"),
            (after.1, after_ten.1),
            "maps",
            "memory mappings after 10 swaps",
            Goal::Equal,
            1,
        ),
    ])
}

/// Measure 6: what checkpoints of a state that did not change write.
pub(super) fn checkpoint(bench: &Bench) -> anyhow::Result<Vec<Row>> {
    let dir = bench.dir("checkpoint")?;
    let kernel = kv_kernel(bench, &dir, &kv_state(64 << 10))?;
    let store = kernel.state_store().context("the kernel has a store")?;
    let n = bench.effort.pick(100, 20, 3);
    let checkpoints = |n: usize| -> anyhow::Result<u64> {
        let before = store.bytes_written();
        for _ in 0..n {
            for (service, result) in kernel.checkpoint() {
                result.with_context(|| format!("checkpoint of {service}"))?;
            }
        }
        Ok(store.bytes_written() - before)
    };
    let unchanged = checkpoints(n)?;
    // The same after a change: the first checkpoint writes, the others do not.
    let reply = kernel.request("kv", "put", br#"{"op":"put","key":"new","value":1}"#, None);
    if !reply.is_ok() {
        bail!("kv failed: {}", String::from_utf8_lossy(&reply.data));
    }
    let changed = checkpoints(n)?;
    let file = fs::metadata(store.path("kv"))?.len();
    kernel.shutdown();
    Ok(vec![
        Row::new(
            format!("bytes written by {n} checkpoints of an unchanged state"),
            (unchanged as f64, 0.0),
            "B",
            "nothing",
            Goal::Equal,
            n,
        ),
        Row::new(
            format!("bytes written by {n} checkpoints after one change"),
            (changed as f64, file as f64),
            "B",
            "one state file",
            Goal::Equal,
            n,
        ),
    ])
}
