//! `bench --fleet`: a fleet on an etcd the bench starts (Debian's `etcd-server`): a
//! checkpoint's latency to etcd against a bare put of the same bytes, and failover against
//! the lease TTL.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use fleet::{local::LocalEtcd, Etcd, Fleet, FleetConfig};
use host::{
    loader::PluginFile,
    state::{KeyRing, StateBackend, StateKey},
    Kernel, KernelConfig,
};

use super::{
    stats::{millis, Samples},
    Bench, Goal, Row,
};
use crate::control::{self, Request, Response};

/// The lease TTL of the bench's fleet: the shortest etcd keeps.
const TTL: Duration = fleet::MIN_LEASE_TTL;

pub(super) fn rows(bench: &Bench) -> anyhow::Result<Vec<Row>> {
    let dir = bench.dir("etcd")?;
    let etcd = LocalEtcd::start(&dir).context("starting etcd for the fleet's measures")?;
    let mut rows = checkpoint(bench, &etcd)?;
    rows.extend(failover(bench, &etcd)?);
    Ok(rows)
}

/// kv's checkpoint to etcd (export, seal, one fenced transaction) against a bare put of the
/// same number of bytes, in alternation.
fn checkpoint(bench: &Bench, etcd: &LocalEtcd) -> anyhow::Result<Vec<Row>> {
    let keys = KeyRing::new(StateKey::generate(), Vec::new());
    let fleet = Fleet::join(
        &FleetConfig {
            endpoints: etcd.endpoints(),
            node: "bench".into(),
            lease_ttl: Duration::from_secs(10),
            prefix: "/bench".into(),
        },
        keys,
    )?;
    let kernel = Kernel::new(KernelConfig {
        state_backend: Some(fleet.clone() as Arc<dyn StateBackend>),
        placement: Some(fleet.clone() as Arc<dyn host::kernel::Placement>),
        ..KernelConfig::default()
    })?;
    if !fleet.claim(&["kv".to_owned()])? {
        bail!("the bench's fleet could not claim kv");
    }
    let file = PluginFile::read(&bench.plugin("libkv.so"))?;
    // SAFETY: as in `super::load`: the bench's own plugins.
    let loaded = unsafe { kernel.load_version(&file) }?;
    kernel.register(loaded, None)?;
    kernel.start("kv")?;
    let bare = Etcd::connect(&etcd.endpoints(), Duration::from_secs(5))?;
    // A state of about 1 KiB, changed before every checkpoint (an unchanged one is not
    // written).
    let value = "v".repeat(1000);
    let put = |n: usize| -> anyhow::Result<()> {
        let payload = format!(r#"{{"op":"put","key":"k","value":"{value}{n}"}}"#);
        let reply = kernel.request("kv", "request", payload.as_bytes(), None);
        if !reply.is_ok() {
            bail!("kv answered {}: {}", reply.code, reply.message);
        }
        Ok(())
    };
    put(0)?;
    let sealed_len = {
        kernel.checkpoint();
        fleet.load("kv")?.map_or(1024, |s| s.bytes.len()) + 64
    };
    let rounds = bench.effort.pick(200, 40, 3);
    let (mut written, mut floor) = (Samples::default(), Samples::default());
    for n in 1..=rounds {
        put(n)?;
        let started = Instant::now();
        for (service, result) in kernel.checkpoint() {
            result.with_context(|| format!("checkpointing {service}"))?;
        }
        written.push(started.elapsed());
        let bytes = vec![b'x'; sealed_len];
        let started = Instant::now();
        bare.call("a bare put", move |mut c| async move {
            c.put("/bench/bare", bytes, None).await
        })?;
        floor.push(started.elapsed());
    }
    drop(kernel);
    fleet.leave();
    Ok(vec![Row::new(
        "checkpoint of kv (1 KiB state) to etcd, median",
        (millis(written.median()), millis(floor.median())),
        "ms",
        "a bare etcd put of the same number of bytes, in alternation",
        Goal::RatioAtMost(1.5),
        written.len(),
    )
    .with_spread(
        &written.in_order(millis),
        &floor.in_order(millis),
        0.5,
    )])
}

/// Two hosts running kv; its owner killed (SIGKILL), again and again: from the kill to kv
/// answering on the other host, against the lease TTL.
fn failover(bench: &Bench, etcd: &LocalEtcd) -> anyhow::Result<Vec<Row>> {
    let root = bench.dir("fleet")?;
    let plugins = root.join("plugins");
    fs::create_dir_all(&plugins)?;
    fs::copy(bench.plugin("libkv.so"), plugins.join("libkv.so"))?;
    let key = root.join("key");
    StateKey::write_new(&key)?;
    let mut hosts: Vec<Option<Host>> = Vec::new();
    for name in ["a", "b"] {
        hosts.push(Some(Host::start(&root, name, etcd)?));
    }
    let rounds = bench.effort.pick(10, 3, 1);
    let mut times = Samples::default();
    for round in 0..rounds {
        let owner = owner_of(&hosts)?;
        let other = 1 - owner;
        let mut killed = hosts[owner].take().expect("a running owner");
        let started = Instant::now();
        killed.kill();
        loop {
            let host = hosts[other].as_ref().expect("the other host");
            if host.get().is_ok() {
                break;
            }
            if started.elapsed() > TTL * 10 {
                bail!("round {round}: kv did not come back within {:?}", TTL * 10);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        times.push(started.elapsed());
        hosts[owner] = Some(Host::start(&root, killed.name, etcd)?);
    }
    Ok(vec![
        Row::new(
            "failover: an owner killed (SIGKILL) to kv answering on another host, median",
            (millis(times.median()), millis(TTL)),
            "ms",
            "the lease TTL (2 s): how long etcd keeps a dead host's ownership",
            Goal::GrowthBelow(1000.0),
            times.len(),
        ),
        Row::new(
            "failover, the slowest",
            (millis(times.quantile(1.0)), millis(TTL)),
            "ms",
            "the lease TTL",
            Goal::GrowthBelow(1000.0),
            times.len(),
        ),
    ])
}

/// A `microkernel run --cluster` of the bench's, killed when dropped.
struct Host {
    name: &'static str,
    child: Child,
    socket: PathBuf,
}

impl Host {
    fn start(root: &Path, name: &'static str, etcd: &LocalEtcd) -> anyhow::Result<Host> {
        let exe = std::env::current_exe().context("finding this program")?;
        let state = root.join(name);
        fs::create_dir_all(&state)?;
        let log = fs::File::create(root.join(format!("{name}.log")))?;
        let child = Command::new(&exe)
            .arg("run")
            .arg("--plugins")
            .arg(root.join("plugins"))
            .arg("--state-dir")
            .arg(&state)
            .arg("--key-file")
            .arg(root.join("key"))
            .args(["--cluster", &etcd.url(), "--node", name])
            .args(["--lease-ttl", "2s", "--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {} run", exe.display()))?;
        let host = Host {
            name,
            child,
            socket: state.join("control.sock"),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while control::call(&host.socket, &Request::List, Duration::from_secs(5)).is_err() {
            if Instant::now() > deadline {
                bail!(
                    "host {name} did not come up: {}",
                    fs::read_to_string(root.join(format!("{name}.log"))).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(host)
    }

    fn owns_kv(&self) -> bool {
        matches!(
            control::call(&self.socket, &Request::List, Duration::from_secs(5)),
            Ok(Response::Services { services, .. })
                if services.iter().any(|s| s.name == "kv" && s.owner.as_deref() == Some(self.name) && s.status == "running")
        )
    }

    fn get(&self) -> anyhow::Result<()> {
        let request = Request::Send {
            service: "kv".into(),
            kind: "request".into(),
            payload: hex::encode(br#"{"op":"put","key":"k","value":1}"#),
            timeout_ms: Some(1000),
        };
        match control::call(&self.socket, &request, Duration::from_secs(5))? {
            Response::Reply { code: 0, .. } => Ok(()),
            other => bail!("kv answered {other:?}"),
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Which host runs kv, once one does.
fn owner_of(hosts: &[Option<Host>]) -> anyhow::Result<usize> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        for (i, host) in hosts.iter().enumerate() {
            if host.as_ref().is_some_and(Host::owns_kv) {
                return Ok(i);
            }
        }
        if Instant::now() > deadline {
            bail!("no host runs kv");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
