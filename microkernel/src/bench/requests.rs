//! Requests and events through the kernel, against the same exchange over a bare channel.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use crossbeam_channel::{bounded, Sender};
use nix::{
    sched::{sched_getaffinity, sched_setaffinity, CpuSet},
    unistd::Pid,
};

use super::{
    stats::{micros, Samples},
    Bench, Goal, Row,
};
use host::{loader::threads, recv_soon, Kernel, KernelConfig};

/// The payload of every request: 64 bytes.
pub(super) const PAYLOAD: [u8; 64] = [b'x'; 64];

/// A message on the bare channel: a request (the payload and where the reply goes), or an
/// event.
enum BareMessage {
    Request(Vec<u8>, Sender<Vec<u8>>),
    Event(Vec<u8>),
}

/// The floor: a thread serving a bounded channel of the kernel's mailbox type, replying with
/// nothing on a one-shot channel, as an executor would if the host cost nothing.
struct Bare {
    tx: Sender<BareMessage>,
    spin: Duration,
}

impl Bare {
    /// Its threads wait as the kernel's do: polling for `spin`, then asleep.
    fn start(capacity: usize, spin: Duration) -> anyhow::Result<Bare> {
        let (tx, rx) = bounded::<BareMessage>(capacity);
        threads::spawn_detached("bench-bare", move || {
            while let Ok(message) = recv_soon(&rx, spin, None) {
                match message {
                    BareMessage::Request(payload, reply) => {
                        drop(payload);
                        let _ = reply.send(Vec::new());
                    }
                    BareMessage::Event(payload) => drop(payload),
                }
            }
        })?;
        Ok(Bare { tx, spin })
    }

    fn round_trip(&self) -> anyhow::Result<()> {
        let (reply, answer) = bounded(1);
        self.tx
            .send(BareMessage::Request(PAYLOAD.to_vec(), reply))
            .context("the bare server is gone")?;
        recv_soon(&answer, self.spin, None).context("the bare server did not reply")?;
        Ok(())
    }
}

/// The measured exchanges' threads pinned, the floor's and the host's alike: the client
/// (this thread) on one CPU, every server (the bare ones and the executors) on the same
/// CPU ([`Cpus::One`]) or on another ([`Cpus::Two`]). Left to the scheduler, a pair of
/// threads lands on one CPU or on two from one run to the next, and the host's ratio to its
/// floor moved with it (1.2 on one, 1.45 on two: on two CPUs the request's and the reply's
/// bytes cross between caches, and the host reads what the floor's server does not).
/// Dropped, this thread may run anywhere again.
struct Placement {
    before: CpuSet,
}

/// Where [`Placement`] puts the servers.
#[derive(Debug, Clone, Copy)]
enum Cpus {
    /// On the client's CPU: an exchange is two switches between threads, no cache line
    /// crosses CPUs, and the host's own work weighs the most.
    One,
    /// On another CPU.
    Two,
}

impl Placement {
    /// Pins this thread and the threads named `servers`; `None` with fewer than two CPUs.
    fn pin(servers: &[&str], cpus: Cpus) -> Option<Placement> {
        let this = Pid::from_raw(0);
        let before = sched_getaffinity(this).ok()?;
        let available: Vec<usize> = (0..CpuSet::count())
            .filter(|&cpu| before.is_set(cpu).unwrap_or(false))
            .collect();
        let [client, other, ..] = available[..] else {
            return None;
        };
        let server = match cpus {
            Cpus::One => client,
            Cpus::Two => other,
        };
        let only = |cpu| {
            let mut set = CpuSet::new();
            set.set(cpu).ok().map(|()| set)
        };
        sched_setaffinity(this, &only(client)?).ok()?;
        let placement = Placement { before };
        for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
            let name = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            let tid = task.file_name().to_string_lossy().parse::<i32>();
            if let (true, Ok(tid)) = (servers.contains(&name.trim()), tid) {
                sched_setaffinity(Pid::from_raw(tid), &only(server)?).ok()?;
            }
        }
        Some(placement)
    }
}

impl Drop for Placement {
    fn drop(&mut self) {
        let _ = sched_setaffinity(Pid::from_raw(0), &self.before);
    }
}

/// Times `n` calls of `f`; stops at its first error.
pub(super) fn time(
    samples: &mut Samples,
    n: usize,
    mut f: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    for _ in 0..n {
        let started = Instant::now();
        f()?;
        samples.push(started.elapsed());
    }
    Ok(())
}

/// Retries `send` while it fails (a full mailbox), giving the CPU away between tries; an
/// error still there after `STALLED` is returned.
fn send_until_taken(mut send: impl FnMut() -> Result<(), String>) -> anyhow::Result<()> {
    const STALLED: Duration = Duration::from_secs(10);
    let mut since = None;
    loop {
        match send() {
            Ok(()) => return Ok(()),
            Err(error) => {
                let since = *since.get_or_insert_with(Instant::now);
                if since.elapsed() > STALLED {
                    bail!("{error} (for {STALLED:?})");
                }
                std::thread::yield_now();
            }
        }
    }
}

pub(super) fn rows(bench: &Bench) -> anyhow::Result<Vec<Row>> {
    let kernel = Kernel::new(KernelConfig::default())?;
    for plugin in ["libnoop.so", "libecho.so"] {
        kernel.register(
            super::load_path(kernel.loader(), &bench.plugin(plugin))?,
            None,
        )?;
    }
    if let Some((service, error)) = kernel.start_all().into_iter().next() {
        bail!("starting {service}: {}", host::error_chain(&error));
    }
    let config = KernelConfig::default();
    let bare = Bare::start(config.mailbox_capacity, config.spin)?;
    // The same without polling: what every exchange cost before the host polled.
    let sleepy = Bare::start(config.mailbox_capacity, Duration::ZERO)?;
    // Both servers run (and bear their names) once they have answered.
    bare.round_trip()?;
    sleepy.round_trip()?;
    let rounds = bench.effort.pick(20, 10, 2);
    let batch = bench.effort.pick(2000, 1000, 50);

    let request = |to: &str| -> anyhow::Result<()> {
        let reply = kernel.request(to, to, &PAYLOAD, None);
        if !reply.is_ok() {
            bail!("{to} answered {}: {}", reply.code, reply.message);
        }
        Ok(())
    };
    let servers = ["bench-bare", "svc-noop", "svc-echo"];
    let (mut floor, mut noop, mut echo) = Default::default();
    // The goals' figures: on one CPU (see `Cpus`).
    let placement = Placement::pin(&servers, Cpus::One);
    // Warm up every path, then interleave: each batch of one is next to a batch of the others.
    time(&mut Samples::default(), batch, || bare.round_trip())?;
    time(&mut Samples::default(), batch, || request("noop"))?;
    time(&mut Samples::default(), batch, || request("echo"))?;
    for _ in 0..rounds {
        time(&mut floor, batch, || bare.round_trip())?;
        time(&mut noop, batch, || request("noop"))?;
        time(&mut echo, batch, || request("echo"))?;
    }
    let one_cpu = placement.is_some();
    drop(placement);
    // The same across two CPUs, and asleep, for comparison.
    let placement = Placement::pin(&servers, Cpus::Two);
    let (mut floor_two, mut noop_two, mut asleep) = Default::default();
    time(&mut Samples::default(), batch, || bare.round_trip())?;
    time(&mut Samples::default(), batch, || request("noop"))?;
    for _ in 0..rounds.div_ceil(2) {
        time(&mut floor_two, batch, || bare.round_trip())?;
        time(&mut asleep, batch, || sleepy.round_trip())?;
        time(&mut noop_two, batch, || request("noop"))?;
    }
    let floor_is = if one_cpu {
        "a bare round trip: bounded channel, one-shot reply, a server thread doing nothing, both polling as the host does; client and server on one CPU"
    } else {
        "a bare round trip: bounded channel, one-shot reply, a server thread doing nothing, both polling as the host does (threads not pinned)"
    };
    let floor_two_is = "the same bare round trip, client and server on two CPUs";
    let mut rows = vec![
        Row::new(
            "request/reply to noop (64 B), median",
            (micros(noop.median()), micros(floor.median())),
            "µs",
            floor_is,
            Goal::RatioAtMost(1.5),
            noop.len(),
        )
        .with_spread(&noop.in_order(micros), &floor.in_order(micros), 0.5),
        Row::new(
            "request/reply to noop (64 B), p90",
            (micros(noop.quantile(0.9)), micros(floor.quantile(0.9))),
            "µs",
            floor_is,
            Goal::RatioAtMost(1.5),
            noop.len(),
        )
        .with_spread(&noop.in_order(micros), &floor.in_order(micros), 0.9),
        Row::new(
            "request/reply to echo (JSON reply), median",
            (micros(echo.median()), micros(floor.median())),
            "µs",
            floor_is,
            Goal::None,
            echo.len(),
        )
        .with_spread(&echo.in_order(micros), &floor.in_order(micros), 0.5),
        Row::new(
            "request/reply to noop (64 B), median, on two CPUs",
            (micros(noop_two.median()), micros(floor_two.median())),
            "µs",
            floor_two_is,
            Goal::None,
            noop_two.len(),
        )
        .with_spread(&noop_two.in_order(micros), &floor_two.in_order(micros), 0.5),
        Row::new(
            "bare round trip, threads sleeping at once (no polling)",
            (micros(asleep.median()), micros(floor_two.median())),
            "µs",
            floor_two_is,
            Goal::None,
            asleep.len(),
        )
        .with_spread(&asleep.in_order(micros), &floor_two.in_order(micros), 0.5),
    ];

    // Events, one way, pipelined: as many as the mailbox takes, then a request behind them
    // (answered once every event before it was handled).
    let events = bench.effort.pick(100_000, 50_000, 1000);
    // On two CPUs (the placement above): one way, the client and the service each fill one.
    let (mut kernel_rates, mut bare_rates) = (Vec::new(), Vec::new());
    for _ in 0..rounds.min(10) {
        let started = Instant::now();
        for _ in 0..events {
            send_until_taken(|| {
                bare.tx
                    .try_send(BareMessage::Event(PAYLOAD.to_vec()))
                    .map_err(|e| e.to_string())
            })?;
        }
        bare.round_trip()?;
        bare_rates.push(events as f64 / started.elapsed().as_secs_f64() / 1000.0);
        let started = Instant::now();
        for _ in 0..events {
            send_until_taken(|| kernel.emit("noop", "event", &PAYLOAD))?;
        }
        request("noop")?;
        kernel_rates.push(events as f64 / started.elapsed().as_secs_f64() / 1000.0);
    }
    let pinned = placement.is_some();
    let (kernel_order, bare_order) = (kernel_rates.clone(), bare_rates.clone());
    rows.push(
        Row::new(
            if pinned {
                "events to noop, one way, pipelined"
            } else {
                "events to noop, one way, pipelined (threads not pinned)"
            },
            (median(&mut kernel_rates), median(&mut bare_rates)),
            "k/s",
            "the bare channel's throughput, same capacity",
            Goal::RatioAtLeast(0.5),
            kernel_rates.len(),
        )
        .with_spread(&kernel_order, &bare_order, 0.5),
    );

    drop(placement);
    // What a plugin in another process costs: JSON lines over a Unix socket.
    let mut peer = Peer::spawn()?;
    let mut remote = Samples::default();
    time(&mut Samples::default(), batch, || peer.round_trip())?;
    for _ in 0..rounds {
        time(&mut remote, batch, || peer.round_trip())?;
    }
    rows.push(Row::new(
        "out-of-process plugin: JSON line over a Unix socket",
        (micros(remote.median()), micros(floor.median())),
        "µs",
        floor_is,
        Goal::None,
        remote.len(),
    ));
    kernel.shutdown();
    Ok(rows)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

/// A child process answering JSON lines, the way socket-based plugin systems talk to their
/// plugins: `microkernel bench-peer` (see [`serve_json_lines`]).
pub(super) struct Peer {
    child: std::process::Child,
    stream: UnixStream,
    reader: BufReader<UnixStream>,
    line: String,
    request: Vec<u8>,
}

impl Peer {
    pub(super) fn spawn() -> anyhow::Result<Peer> {
        let (ours, theirs) = UnixStream::pair()?;
        let exe = std::env::current_exe().context("finding this program")?;
        let child = Command::new(&exe)
            .arg("bench-peer")
            .stdin(Stdio::from(std::os::fd::OwnedFd::from(theirs.try_clone()?)))
            .stdout(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {} bench-peer", exe.display()))?;
        ours.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut request = serde_json::to_vec(&serde_json::json!({
            "to": "noop",
            "kind": "noop",
            "payload": hex::encode(PAYLOAD),
        }))?;
        request.push(b'\n');
        Ok(Peer {
            child,
            reader: BufReader::new(ours.try_clone()?),
            stream: ours,
            line: String::new(),
            request,
        })
    }

    pub(super) fn round_trip(&mut self) -> anyhow::Result<()> {
        self.stream
            .write_all(&self.request)
            .context("writing to the peer process")?;
        self.line.clear();
        self.reader
            .read_line(&mut self.line)
            .context("reading the peer process's answer")?;
        let reply: serde_json::Value = serde_json::from_str(&self.line)
            .with_context(|| format!("the peer process answered {:?}", self.line))?;
        if reply["code"] != 0 {
            bail!("the peer process answered {reply}");
        }
        Ok(())
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        let _ = self.child.wait();
    }
}

/// `microkernel bench-peer`: answers each JSON line of standard input (a request) with a
/// JSON line on standard output (an empty reply), until the end of the input.
pub fn serve_json_lines() -> anyhow::Result<()> {
    let stdin = std::io::stdin().lock();
    let mut stdout = std::io::stdout().lock();
    for line in stdin.lines() {
        let line = line?;
        let request: serde_json::Value = serde_json::from_str(&line)?;
        let payload = hex::decode(request["payload"].as_str().unwrap_or_default())?;
        drop(payload);
        let mut reply = serde_json::to_vec(&serde_json::json!({ "code": 0, "data": "" }))?;
        reply.push(b'\n');
        stdout.write_all(&reply)?;
        stdout.flush()?;
    }
    Ok(())
}
