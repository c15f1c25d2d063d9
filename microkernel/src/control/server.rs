//! The listening side: one thread that accepts connections, reads requests and writes
//! answers without blocking on any client, and the workers that carry requests out.

use std::{
    io::{Read, Write},
    os::{
        fd::AsFd,
        unix::{
            fs::{FileTypeExt, PermissionsExt},
            net::{UnixListener, UnixStream},
        },
    },
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use nix::poll::{PollFd, PollFlags, PollTimeout};

use super::{
    commands::{begin, handle, parse, Context, Outcome, Pending},
    Request, Response,
};
use host::{loader::threads, reload::Verdicts, Kernel};

use crate::event::Event;

/// The listening side. Removes its socket file when dropped.
#[derive(Debug)]
pub struct ControlServer {
    path: PathBuf,
    /// (device, inode) of the socket file bound: only that file is removed at the end (the
    /// path may lead to another host's socket by then).
    bound: Option<(u64, u64)>,
    /// Until [`ControlServer::serve`] hands it to the control thread.
    listener: Option<UnixListener>,
    /// The fleet this host is one of, for `fleet`.
    fleet: Option<Arc<fleet::Fleet>>,
}

impl ControlServer {
    /// Binds the socket (refusing to steal one a live host listens on), mode 0600.
    /// Connections wait in the backlog until [`ControlServer::serve`].
    pub fn bind(path: &Path) -> anyhow::Result<Self> {
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => {
                if UnixStream::connect(path).is_ok() {
                    bail!(
                        "another host is already listening on control socket {}",
                        path.display()
                    );
                }
                // A socket no host answers on: what a host that died left behind.
                std::fs::remove_file(path).with_context(|| {
                    format!("removing stale control socket {}", path.display())
                })?;
            }
            Ok(meta) => bail!(
                "control socket {} exists and is not a socket (it is {}); refusing to replace it: choose another --socket path",
                path.display(),
                describe_file_type(meta.file_type())
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("checking control socket path {}", path.display())
                })
            }
        }
        let listener = UnixListener::bind(path)
            .with_context(|| format!("binding control socket {}", path.display()))?;
        // From here on, dropping `self` removes the socket file.
        let server = ControlServer {
            path: path.to_owned(),
            bound: socket_identity(path),
            listener: Some(listener),
            fleet: None,
        };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("setting the mode of control socket {}", path.display()))?;
        Ok(server)
    }

    /// Answers `fleet` about `fleet` (set before serving).
    pub fn set_fleet(&mut self, fleet: Arc<fleet::Fleet>) {
        self.fleet = Some(fleet);
    }

    /// Serves the socket from now on (see [`Limits`]): one thread reads every connection,
    /// a few workers carry the requests out.
    pub fn serve(
        &mut self,
        kernel: Arc<Kernel>,
        verdicts: Verdicts,
        events: Sender<Event>,
    ) -> anyhow::Result<()> {
        self.serve_with(kernel, verdicts, events, Limits::for_this_process())
    }

    /// Like [`ControlServer::serve`], with the given limits.
    pub fn serve_with(
        &mut self,
        kernel: Arc<Kernel>,
        verdicts: Verdicts,
        events: Sender<Event>,
        limits: Limits,
    ) -> anyhow::Result<()> {
        let Some(listener) = self.listener.take() else {
            bail!("control socket {} is already served", self.path.display());
        };
        listener
            .set_nonblocking(true)
            .with_context(|| format!("control socket {}", self.path.display()))?;
        let (wake_rx, wake_tx) =
            UnixStream::pair().context("creating the control socket's wake-up pair")?;
        wake_rx
            .set_nonblocking(true)
            .and_then(|()| wake_tx.set_nonblocking(true))
            .context("making the control socket's wake-up pair non-blocking")?;
        // One descriptor, shared by every worker.
        let wake_tx = Arc::new(wake_tx);
        let (back_tx, back) = unbounded::<Conn>();
        let context = Arc::new(Context {
            kernel,
            verdicts,
            events,
            checkpoint: Default::default(),
            fleet: self.fleet.clone(),
        });
        let busy = Arc::new(AtomicUsize::new(0));
        let sends = Arc::new(Sends::default());
        // Workers for the commands that wait on a service's operations lock (stop, start).
        let (operations, jobs) = bounded::<Job>(limits.connections);
        for _ in 0..limits.workers {
            let jobs = jobs.clone();
            let back = back_tx.clone();
            let wake = wake_tx.clone();
            let context = context.clone();
            let busy = busy.clone();
            threads::spawn_detached("control-worker", move || {
                work(&jobs, &back, &wake, &busy, &context)
            })
            .context("starting a control worker")?;
        }
        // One thread waits for every answer to come (replies, rescans, checkpoints).
        let (waiter, waiting) = unbounded::<Waiting>();
        {
            let back = back_tx.clone();
            let wake = wake_tx.clone();
            let busy = busy.clone();
            let sends = sends.clone();
            threads::spawn_detached("control-wait", move || {
                wait_for_answers(&waiting, &back, &wake, &busy, &sends)
            })
            .context("starting the control socket's waiting thread")?;
        }
        tracing::info!(
            socket = %self.path.display(),
            max_connections = limits.connections,
            max_request_bytes = limits.request_bytes,
            "control socket serving"
        );
        let owner = nix::unistd::getuid();
        threads::spawn_detached("control", move || {
            Acceptor {
                listener,
                wake: wake_rx,
                owner,
                limits,
                conns: Vec::new(),
                operations,
                waiter,
                sends,
                context,
                back,
                refused_at: None,
                busy,
            }
            .run()
        })
        .context("starting the control thread")?;
        Ok(())
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        if self.bound.is_some() && socket_identity(&self.path) == self.bound {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn socket_identity(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// The control socket's bounds: what one buggy or hostile client can hold.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections open at once. At the cap, a new connection closes the oldest idle one;
    /// when none is idle, it is answered "busy" and closed.
    pub connections: usize,
    /// The longest request line, in bytes: longer is answered with an error and closed.
    pub request_bytes: usize,
    /// How long a connection may take to send a whole request (from its opening, or from
    /// its last answer): then it is closed.
    pub idle: Duration,
    /// How long a client may take to read its answer (one that does not read): then the
    /// connection is closed.
    pub write: Duration,
    /// `stop` and `start` commands carried out at once (each on a worker thread; nothing
    /// else takes a thread: answers that take time are waited for by one thread, all
    /// together).
    pub workers: usize,
}

impl Limits {
    /// At most 64 connections, and never more than a quarter of the descriptors this
    /// process may still open (the rest is for plugins and state writes); 1 MiB requests;
    /// 5 s to send a request or read an answer; 4 workers for `stop` and `start`; requests
    /// to services waiting for replies at most the cap less a reserve for other commands.
    pub fn for_this_process() -> Self {
        let limit = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map(|(soft, _)| usize::try_from(soft).unwrap_or(usize::MAX))
            .unwrap_or(1024);
        let open = std::fs::read_dir("/proc/self/fd").map_or(0, Iterator::count);
        Limits {
            connections: (limit.saturating_sub(open) / 4).clamp(1, 64),
            request_bytes: 1 << 20,
            idle: Duration::from_secs(5),
            write: Duration::from_secs(5),
            workers: 4,
        }
    }
}

/// An open control connection, owned by the acceptor while it waits for a request, and by
/// a worker while its request is carried out.
#[derive(Debug)]
struct Conn {
    stream: UnixStream,
    /// What was read of the next request (and, pipelined, after it).
    buf: Vec<u8>,
    /// Since when it has been waiting for a whole request.
    since: Instant,
    /// A number, for the log.
    id: u64,
    /// An answer still to send (written by the acceptor as the client reads it), and how
    /// much of it is sent.
    out: Vec<u8>,
    out_at: usize,
}

impl Conn {
    /// When it is closed if nothing happens: `idle` after it began waiting for a request,
    /// or `write` after its answer was ready.
    fn deadline(&self, limits: &Limits) -> Instant {
        if self.out.is_empty() {
            self.since + limits.idle
        } else {
            self.since + limits.write
        }
    }
}

/// A request for a worker, with its connection.
struct Job {
    conn: Conn,
    request: Request,
}

/// The thread that accepts connections and reads requests, for all of them, without
/// blocking on any: `poll` over the listener, the idle connections and a wake-up socket the
/// workers write to when they hand a connection back.
struct Acceptor {
    listener: UnixListener,
    wake: UnixStream,
    owner: nix::unistd::Uid,
    limits: Limits,
    /// Connections waiting for a request (idle or part-way through one).
    conns: Vec<Conn>,
    /// Workers for `stop` and `start`.
    operations: Sender<Job>,
    /// The thread that waits for answers to come.
    waiter: Sender<Waiting>,
    /// How many requests to services wait for their replies.
    sends: Arc<Sends>,
    context: Arc<Context>,
    back: Receiver<Conn>,
    /// When accepting last failed for want of descriptors: accepting pauses a moment.
    refused_at: Option<Instant>,
    /// How many connections are with the workers (counted against the cap too).
    busy: Arc<AtomicUsize>,
}

impl Acceptor {
    fn run(mut self) {
        let mut next_id = 0u64;
        loop {
            let timeout = self.next_timeout();
            let (accept, wake, readable) = {
                let listen = self
                    .refused_at
                    .is_none_or(|at| at.elapsed() > Duration::from_millis(100));
                let mut fds = Vec::with_capacity(self.conns.len() + 2);
                fds.push(PollFd::new(
                    self.listener.as_fd(),
                    if listen {
                        PollFlags::POLLIN
                    } else {
                        PollFlags::empty()
                    },
                ));
                fds.push(PollFd::new(self.wake.as_fd(), PollFlags::POLLIN));
                for conn in &self.conns {
                    // Nothing more is read from a connection while it has a whole request
                    // (or a full buffer) waiting: a client that pipelines faster than it is
                    // served holds one request's worth of memory, not all it sent.
                    let wanted = if !conn.out.is_empty() {
                        PollFlags::POLLOUT
                    } else if conn.buf.contains(&b'\n')
                        || conn.buf.len() > self.limits.request_bytes
                    {
                        PollFlags::empty()
                    } else {
                        PollFlags::POLLIN
                    };
                    fds.push(PollFd::new(conn.stream.as_fd(), wanted));
                }
                match nix::poll::poll(&mut fds, timeout) {
                    Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                    Err(error) => {
                        tracing::error!(%error, "control socket: poll failed; control stops");
                        return;
                    }
                }
                let ready = |fd: &PollFd| fd.any().unwrap_or(false);
                let readable: Vec<usize> = fds[2..]
                    .iter()
                    .enumerate()
                    .filter(|(_, fd)| ready(fd))
                    .map(|(i, _)| i)
                    .collect();
                (ready(&fds[0]), ready(&fds[1]), readable)
            };
            if wake {
                let mut sink = [0u8; 64];
                while matches!((&self.wake).read(&mut sink), Ok(n) if n > 0) {}
            }
            // Reading and writing may close connections: from the last index down.
            for index in readable.into_iter().rev() {
                if self.conns[index].out.is_empty() {
                    self.read(index);
                } else {
                    self.flush(index);
                }
            }
            // Answers from the workers: most go out at once.
            for conn in self.back.try_iter().collect::<Vec<_>>() {
                self.conns.push(conn);
                self.flush(self.conns.len() - 1);
            }
            // Pipelined requests already read are dispatched too.
            for index in (0..self.conns.len()).rev() {
                self.dispatch_if_complete(index);
            }
            self.close_idle();
            if accept {
                self.accept(&mut next_id);
            }
        }
    }

    /// How long `poll` may wait: until the next connection's deadline (to send a request,
    /// or to read its answer), or the end of a pause in accepting.
    fn next_timeout(&self) -> PollTimeout {
        // A whole request already read (pipelined) is served at once.
        if self
            .conns
            .iter()
            .any(|c| c.out.is_empty() && c.buf.contains(&b'\n'))
        {
            return PollTimeout::ZERO;
        }
        let next = self
            .conns
            .iter()
            .map(|c| c.deadline(&self.limits))
            .chain(self.refused_at.map(|at| at + Duration::from_millis(100)))
            .min();
        match next {
            None => PollTimeout::NONE,
            Some(at) => {
                let wait = at.saturating_duration_since(Instant::now()) + Duration::from_millis(1);
                PollTimeout::try_from(wait).unwrap_or(PollTimeout::MAX)
            }
        }
    }

    fn accept(&mut self, next_id: &mut u64) {
        loop {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(error) => {
                    // Out of descriptors (EMFILE, ENFILE): pause accepting a moment.
                    tracing::warn!(%error, "control socket: accept failed; pausing");
                    self.refused_at = Some(Instant::now());
                    return;
                }
            };
            self.refused_at = None;
            if let Err(message) = self.admit(&stream) {
                refuse(stream, &message);
                continue;
            }
            let busy = self.busy.load(Ordering::Relaxed);
            if self.conns.len() + busy >= self.limits.connections {
                // The oldest idle connection gives way; if none is idle, the newcomer does.
                // Those just accepted may hold a request not read yet: read first.
                for index in (0..self.conns.len()).rev() {
                    if self.conns[index].buf.is_empty() && self.conns[index].out.is_empty() {
                        self.read(index);
                    }
                }
                let idle = self
                    .conns
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| c.buf.is_empty() && c.out.is_empty())
                    .min_by_key(|(_, c)| c.since)
                    .map(|(i, _)| i);
                match idle {
                    Some(index) => {
                        let evicted = self.conns.swap_remove(index);
                        refuse(
                            evicted.stream,
                            "closed: this connection was idle and the control socket is at its connection limit",
                        );
                    }
                    None => {
                        refuse(
                            stream,
                            &format!(
                                "busy: {} control connections are open, none of them idle; try again",
                                self.limits.connections
                            ),
                        );
                        continue;
                    }
                }
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            *next_id += 1;
            self.conns.push(Conn {
                stream,
                buf: Vec::new(),
                since: Instant::now(),
                id: *next_id,
                out: Vec::new(),
                out_at: 0,
            });
        }
    }

    /// Only the host's own user may talk to it.
    fn admit(&self, stream: &UnixStream) -> Result<(), String> {
        match nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials) {
            Ok(credentials) if credentials.uid() == self.owner.as_raw() => Ok(()),
            Ok(credentials) => {
                tracing::warn!(
                    uid = credentials.uid(),
                    "control connection from another user refused"
                );
                Err(format!(
                    "refused: uid {} is not the host's uid {}",
                    credentials.uid(),
                    self.owner
                ))
            }
            Err(error) => {
                tracing::warn!(%error, "control connection refused: peer credentials unavailable");
                Err(format!("refused: peer credentials unavailable ({error})"))
            }
        }
    }

    /// Reads what connection `index` sent; closes it at end of file, on an error, or when
    /// its request grows past the limit.
    fn read(&mut self, index: usize) {
        let conn = &mut self.conns[index];
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match (&conn.stream).read(&mut chunk) {
                Ok(0) => {
                    let conn = self.conns.swap_remove(index);
                    if !conn.buf.is_empty() {
                        refuse(
                            conn.stream,
                            "bad control request: the connection ended before the request's newline",
                        );
                    }
                    return;
                }
                Ok(n) => {
                    conn.buf.extend_from_slice(&chunk[..n]);
                    if conn.buf.contains(&b'\n') {
                        return;
                    }
                    if conn.buf.len() > self.limits.request_bytes {
                        let conn = self.conns.swap_remove(index);
                        refuse(
                            conn.stream,
                            &format!(
                                "request too large: more than {} bytes without a newline",
                                self.limits.request_bytes
                            ),
                        );
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.conns.swap_remove(index);
                    return;
                }
            }
        }
    }

    /// Writes what connection `index` has to send, as far as it goes without waiting;
    /// closes it on an error. Once all is written, it waits for its next request.
    fn flush(&mut self, index: usize) {
        let conn = &mut self.conns[index];
        while conn.out_at < conn.out.len() {
            match (&conn.stream).write(&conn.out[conn.out_at..]) {
                Ok(0) => break,
                Ok(n) => conn.out_at += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.conns.swap_remove(index);
                    return;
                }
            }
        }
        conn.out = Vec::new();
        conn.out_at = 0;
        conn.since = Instant::now();
    }

    /// Hands connection `index` to a worker if it holds a whole request line (and has no
    /// answer still to send).
    fn dispatch_if_complete(&mut self, index: usize) {
        if !self.conns[index].out.is_empty() {
            return;
        }
        let Some(end) = self.conns[index].buf.iter().position(|&b| b == b'\n') else {
            return;
        };
        if end > self.limits.request_bytes {
            let conn = self.conns.swap_remove(index);
            refuse(
                conn.stream,
                &format!(
                    "request too large: more than {} bytes",
                    self.limits.request_bytes
                ),
            );
            return;
        }
        let mut conn = self.conns.swap_remove(index);
        let rest = conn.buf.split_off(end + 1);
        let mut line = std::mem::replace(&mut conn.buf, rest);
        line.pop();
        let request = match parse(&line) {
            Ok(request) => request,
            Err(response) => return self.answer_now(conn, &response),
        };
        // Requests to services may wait long: some room is always left for the other
        // commands, and for the other services.
        let send_to = match &request {
            Request::Send { service, .. } if service != "kernel" => Some(service.clone()),
            _ => None,
        };
        if let Some(service) = &send_to {
            let reserve = (self.limits.connections / 4).clamp(1, 4);
            let most = self.limits.connections.saturating_sub(reserve).max(1);
            if let Err(message) = self.sends.admit(service, most) {
                return self.answer_now(conn, &Response::Error { message });
            }
        }
        // Nothing here waits: an answer known at once goes out, one to come is waited for
        // by the waiting thread, and `stop` and `start` go to a worker.
        let request = match begin(request, &self.context) {
            Ok(Outcome::Now(response)) => {
                if let Some(service) = &send_to {
                    self.sends.done(service);
                }
                return self.answer_now(conn, &response);
            }
            Ok(Outcome::Later(pending)) => {
                self.busy.fetch_add(1, Ordering::Relaxed);
                let _ = self.waiter.send(Waiting {
                    conn,
                    pending,
                    send_to,
                });
                return;
            }
            Err(request) => request,
        };
        self.busy.fetch_add(1, Ordering::Relaxed);
        if let Err(returned) = self.operations.try_send(Job { conn, request }) {
            self.busy.fetch_sub(1, Ordering::Relaxed);
            let job = returned.into_inner();
            refuse(
                job.conn.stream,
                "busy: too many control requests under way; try again",
            );
        }
    }

    /// Sends `response` on `conn` (as far as it goes without waiting).
    fn answer_now(&mut self, conn: Conn, response: &Response) {
        let mut out = serde_json::to_vec(response).unwrap_or_default();
        out.push(b'\n');
        self.conns.push(Conn {
            since: Instant::now(),
            out,
            out_at: 0,
            ..conn
        });
        self.flush(self.conns.len() - 1);
    }

    /// Closes the connections that have not sent a whole request, or read their answer, in
    /// time.
    fn close_idle(&mut self) {
        let now = Instant::now();
        let (stale, fresh): (Vec<Conn>, Vec<Conn>) = std::mem::take(&mut self.conns)
            .into_iter()
            .partition(|c| c.deadline(&self.limits) <= now);
        self.conns = fresh;
        for conn in stale {
            if conn.out.is_empty() {
                refuse(
                    conn.stream,
                    &format!("closed: no whole request within {:?}", self.limits.idle),
                );
            } else {
                tracing::debug!(
                    connection = conn.id,
                    "control client did not read its answer in time; connection closed"
                );
            }
        }
    }
}

/// A connection whose answer is to come.
struct Waiting {
    conn: Conn,
    pending: Pending,
    /// The service, for a request to one (counted apart).
    send_to: Option<String>,
}

/// Requests to services waiting for their replies, by service.
#[derive(Debug, Default)]
struct Sends(std::sync::Mutex<std::collections::HashMap<String, usize>>);

impl Sends {
    /// Counts one more request to `service`, unless `most` wait already, or half of them for
    /// that one service: a busy service does not hold back requests to the others.
    fn admit(&self, service: &str, most: usize) -> Result<(), String> {
        let mut waiting = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let all: usize = waiting.values().sum();
        let theirs = waiting.get(service).copied().unwrap_or(0);
        let share = (most / 2).max(1);
        if all >= most {
            return Err(format!(
                "busy: {all} requests to services are waiting for their replies; try again"
            ));
        }
        if theirs >= share {
            return Err(format!(
                "busy: {theirs} requests to `{service}` are waiting for its replies; try again"
            ));
        }
        *waiting.entry(service.to_owned()).or_default() += 1;
        Ok(())
    }

    /// One request to `service` has its answer.
    fn done(&self, service: &str) {
        let mut waiting = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = waiting.get_mut(service) {
            *count -= 1;
            if *count == 0 {
                waiting.remove(service);
            }
        }
    }
}

/// The waiting thread: waits for every answer to come at once (`select` over their
/// channels), and hands each connection back with its answer; a reply that does not come
/// by its request's deadline is answered as timed out.
fn wait_for_answers(
    new: &Receiver<Waiting>,
    back: &Sender<Conn>,
    wake: &UnixStream,
    busy: &AtomicUsize,
    sends: &Sends,
) {
    let mut waiting: Vec<Waiting> = Vec::new();
    // Hands `conn` back with `response`; false once the acceptor is gone.
    let answer = |conn: Conn, send_to: Option<String>, response: Response| {
        busy.fetch_sub(1, Ordering::Relaxed);
        if let Some(service) = &send_to {
            sends.done(service);
        }
        let mut out = serde_json::to_vec(&response).unwrap_or_default();
        out.push(b'\n');
        let conn = Conn {
            since: Instant::now(),
            out,
            out_at: 0,
            ..conn
        };
        let sent = back.send(conn).is_ok();
        let _ = { wake }.write(&[1]);
        sent
    };
    loop {
        // Index 0 is the channel of new items; index i + 1 is `waiting[i]`.
        let ready = {
            let mut select = crossbeam_channel::Select::new();
            select.recv(new);
            for item in &waiting {
                item.pending.add_to(&mut select);
            }
            match waiting.iter().filter_map(|w| w.pending.deadline()).min() {
                Some(deadline) => select.ready_deadline(deadline).ok(),
                None => Some(select.ready()),
            }
        };
        match ready {
            Some(0) => match new.try_recv() {
                Ok(item) => waiting.push(item),
                // The acceptor is gone (it never goes while the host runs).
                Err(crossbeam_channel::TryRecvError::Disconnected) => return,
                Err(crossbeam_channel::TryRecvError::Empty) => {}
            },
            Some(index) => {
                let Waiting {
                    conn,
                    pending,
                    send_to,
                } = waiting.swap_remove(index - 1);
                match pending.try_answer() {
                    Ok(response) => {
                        if !answer(conn, send_to, response) {
                            return;
                        }
                    }
                    Err(pending) => waiting.push(Waiting {
                        conn,
                        pending,
                        send_to,
                    }),
                }
            }
            None => {
                let now = Instant::now();
                let (late, on_time): (Vec<Waiting>, Vec<Waiting>) = waiting
                    .into_iter()
                    .partition(|w| w.pending.deadline().is_some_and(|d| d <= now));
                waiting = on_time;
                for Waiting {
                    conn,
                    pending,
                    send_to,
                } in late
                {
                    if !answer(conn, send_to, pending.timed_out()) {
                        return;
                    }
                }
            }
        }
    }
}

/// Answers an error, without waiting for the client to read it, and closes.
fn refuse(stream: UnixStream, message: &str) {
    let _ = stream.set_nonblocking(true);
    let _ = write_response(
        &stream,
        &Response::Error {
            message: message.to_owned(),
        },
    );
}

fn write_response(mut stream: &UnixStream, response: &Response) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(response).unwrap_or_default();
    line.push(b'\n');
    stream.write_all(&line)
}

/// A worker: carries requests out and hands each connection back with its answer, which
/// the acceptor sends as the client reads it: a client that does not read holds no worker.
fn work(
    jobs: &Receiver<Job>,
    back: &Sender<Conn>,
    mut wake: &UnixStream,
    busy: &AtomicUsize,
    context: &Context,
) {
    for Job { conn, request } in jobs.iter() {
        let mut out = serde_json::to_vec(&handle(request, context)).unwrap_or_default();
        out.push(b'\n');
        busy.fetch_sub(1, Ordering::Relaxed);
        let conn = Conn {
            since: Instant::now(),
            out,
            out_at: 0,
            ..conn
        };
        if back.send(conn).is_err() {
            return;
        }
        let _ = wake.write(&[1]);
    }
}

/// Names a kind of file, for messages.
fn describe_file_type(kind: std::fs::FileType) -> &'static str {
    if kind.is_dir() {
        "a directory"
    } else if kind.is_symlink() {
        "a symbolic link"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_block_device() || kind.is_char_device() {
        "a device"
    } else {
        "a regular file"
    }
}
