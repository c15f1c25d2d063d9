//! Through the real daemon: a reload with `ctl reload`; start-up of many services.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

use super::{
    stats::{millis, Samples},
    swap::store,
    Bench, Goal, Row,
};
use host::{
    loader::{Loader, PluginFile, Probe},
    state::{KeyRing, StateKey, StateStore},
    Kernel, KernelConfig,
};

use crate::control::{self, Request, Response};

/// How long the bench waits for the daemon to answer anything.
const WAIT: Duration = Duration::from_secs(60);

/// A `microkernel run` started by the bench, stopped (SIGTERM) when dropped.
struct Daemon {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl Daemon {
    fn start(plugins: &Path, state: &Path, key: &Path, log: PathBuf) -> anyhow::Result<Daemon> {
        let exe = std::env::current_exe().context("finding this program")?;
        let child = Command::new(&exe)
            .arg("run")
            .arg("--plugins")
            .arg(plugins)
            .arg("--state-dir")
            .arg(state)
            .arg("--key-file")
            .arg(key)
            .args(["--log-level", "warn", "--checkpoint-interval", "0s"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("starting {} run", exe.display()))?;
        let mut daemon = Daemon {
            child,
            socket: state.join("control.sock"),
            log,
        };
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok(Response::Services { services, .. }) =
                control::call(&daemon.socket, &Request::List, WAIT)
            {
                if services.iter().all(|s| s.status == "running") {
                    return Ok(daemon);
                }
            }
            if let Some(status) = daemon.child.try_wait()? {
                bail!("the host exited ({status}): {}", daemon.log_text());
            }
            if Instant::now() > deadline {
                bail!(
                    "the host did not come up in {WAIT:?}: {}",
                    daemon.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn call(&self, request: &Request) -> anyhow::Result<Response> {
        control::call(&self.socket, request, WAIT)
    }

    fn send(&self, service: &str, kind: &str, payload: &[u8]) -> anyhow::Result<Vec<u8>> {
        match self.call(&Request::Send {
            service: service.to_owned(),
            kind: kind.to_owned(),
            payload: hex::encode(payload),
            timeout_ms: None,
        })? {
            Response::Reply { code: 0, data, .. } => Ok(hex::decode(data)?),
            other => bail!("{service} answered {other:?}"),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

/// Copies `from` to `to` the way an operator should: a temporary name, then a rename.
fn install(from: &Path, to: &Path) -> anyhow::Result<()> {
    let temporary = to.with_extension("so.new");
    fs::copy(from, &temporary)
        .with_context(|| format!("copying {} to {}", from.display(), temporary.display()))?;
    fs::rename(&temporary, to)?;
    Ok(())
}

/// The loader the daemon uses: every file proven in a probe process first, with the state
/// the service would import.
fn daemon_loader(store: Arc<StateStore>) -> anyhow::Result<Loader> {
    let loader = Loader::new(
        None,
        Some(Probe::new(
            std::env::current_exe()?,
            Duration::from_secs(30),
        )),
    )?;
    loader.set_state_source(Box::new(move |service| {
        let saved = store.load(service).ok()??;
        Some((saved.version, saved.bytes))
    }));
    Ok(loader)
}

/// Measure 3: `ctl reload` of a service with 1 KiB of state to its new version serving,
/// through the daemon, against loading and checking the file as the daemon does (a probe
/// process first) plus sealing and durably writing 1 KiB.
pub(super) fn reload(bench: &Bench) -> anyhow::Result<Vec<Row>> {
    let plugins = bench.dir("reload-plugins")?;
    let state = bench.dir("reload-state")?;
    let key = bench.scratch.join("reload.key");
    let _ = fs::remove_file(&key);
    StateKey::write_new(&key)?;
    let versions = ["1.0.0", "2.0.0"].map(|v| bench.plugin(&format!("versions/named-{v}.so")));
    let installed = plugins.join("libnamed.so");
    install(&versions[0], &installed)?;
    let daemon = Daemon::start(&plugins, &state, &key, bench.scratch.join("reload.log"))?;
    daemon.send("named", "fill", b"1024")?;

    let floor_dir = bench.dir("reload-floor")?;
    let floor_store = Arc::new(store(&floor_dir)?);
    floor_store.save("named", "1.0.0", &[7u8; 1024])?;
    let loader = daemon_loader(floor_store.clone())?;
    let files = [
        PluginFile::read(&versions[0])?,
        PluginFile::read(&versions[1])?,
    ];

    let n = bench.effort.pick(100, 12, 2);
    let (mut reloads, mut floors) = (Samples::default(), Samples::default());
    for round in 0..=n {
        let version = ["2.0.0", "1.0.0"][round % 2];
        install(&versions[(round + 1) % 2], &installed)?;
        let started = Instant::now();
        let response = daemon.call(&Request::Reload {
            service: Some("named".into()),
            retry: false,
        })?;
        let took = started.elapsed();
        match &response {
            Response::Done { failed: false, .. } => {}
            other => bail!("the reload to {version} failed: {other:?}"),
        }
        let serving = daemon.send("named", "version", b"")?;
        if serving != version.as_bytes() {
            bail!(
                "after the reload, named answers version {}, not {version}",
                String::from_utf8_lossy(&serving)
            );
        }

        let started = Instant::now();
        let library = super::load(&loader, &files[(round + 1) % 2])?;
        floor_store.save("named", "1.0.0", &[7u8; 1024])?;
        let floor = started.elapsed();
        drop(library);
        if round > 0 {
            reloads.push(took);
            floors.push(floor);
        }
    }
    drop(daemon);
    Ok(vec![Row::new(
        "ctl reload to the new version serving, 1 KiB state",
        (millis(reloads.median()), millis(floors.median())),
        "ms",
        "load + check (probe process, then dlopen) + seal + durable write of 1 KiB",
        Goal::RatioAtMost(2.0),
        reloads.len(),
    )
    .with_spread(
        &reloads.in_order(millis),
        &floors.in_order(millis),
        0.5,
    )])
}

/// Measure 7: start-up of every service in `startup/` with its state on disk, as the daemon
/// starts them (one scan of the directory), against loading and checking each file and
/// opening its state.
pub(super) fn startup(bench: &Bench) -> anyhow::Result<Vec<Row>> {
    let source = bench.plugin("startup");
    let plugins = bench.dir("startup-plugins")?;
    let state = bench.dir("startup-state")?;
    let mut files = Vec::new();
    for entry in fs::read_dir(&source).with_context(|| format!("reading {}", source.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "so") {
            let target = plugins.join(path.file_name().unwrap_or_default());
            fs::copy(&path, &target)?;
            files.push(target);
        }
    }
    if files.is_empty() {
        bail!("{} holds no plugin", source.display());
    }
    files.sort();
    let key = bench.scratch.join("startup.key");
    let _ = fs::remove_file(&key);
    StateKey::write_new(&key)?;
    let keys =
        || -> anyhow::Result<KeyRing> { Ok(KeyRing::new(StateKey::from_file(&key)?, Vec::new())) };
    let store = Arc::new(StateStore::new(&state, keys()?)?);
    let mut names = Vec::new();
    {
        let loader = Loader::new(None, None)?;
        for file in &files {
            let name = super::load_path(&loader, file)?.manifest().name.clone();
            store.save(&name, "1.0.0", &[7u8; 1024])?;
            names.push(name);
        }
    }
    let loader = daemon_loader(store.clone())?;
    let n = bench.effort.pick(10, 3, 1);
    let (mut startups, mut floors) = (Samples::default(), Samples::default());
    for round in 0..=n {
        let started = Instant::now();
        let kernel = Kernel::new(KernelConfig {
            state: Some(StateStore::new(&state, keys()?)?),
            probe: Some(Probe::new(
                std::env::current_exe()?,
                Duration::from_secs(30),
            )),
            ..KernelConfig::default()
        })?;
        let report = super::reloader(&plugins).scan(&kernel, None);
        let took = started.elapsed();
        let running = kernel
            .list()
            .iter()
            .filter(|s| s.status == host::Status::Running)
            .count();
        if running != files.len() {
            bail!("{running} of {} services started: {report:?}", files.len());
        }
        kernel.shutdown();

        let started = Instant::now();
        let mut libraries = Vec::new();
        for (file, name) in files.iter().zip(&names) {
            libraries.push(super::load_path(&loader, file)?);
            store.load(name)?.context("the state is there")?;
        }
        let floor = started.elapsed();
        drop(libraries);
        if round > 0 {
            startups.push(took);
            floors.push(floor);
        }
    }
    Ok(vec![Row::new(
        format!("start-up of {} services with state on disk", files.len()),
        (millis(startups.median()), millis(floors.median())),
        "ms",
        format!(
            "{} × (load + check with a probe process + open the state)",
            files.len()
        ),
        Goal::RatioAtMost(1.5),
        startups.len(),
    )
    .with_spread(
        &startups.in_order(millis),
        &floors.in_order(millis),
        0.5,
    )])
}
