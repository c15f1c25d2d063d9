//! Threads: which ones the host made, which ones appeared since a moment, and waiting for
//! one to end with a deadline.
//!
//! A library may only be closed when no plugin code can run any more. Host-owned threads
//! (executors) are joined first; but plugin code can also run on threads the host did not
//! create (a C library's worker started with `pthread_create`, a detached `std::thread`).
//! Those are found by a census of the process's threads (`/proc/self/task`): a thread alive
//! now that was not alive when the library was opened, and that the host did not start, is
//! presumed to run the library's code and keeps it loaded.
//!
//! Threads are identified by their kernel thread id *and* their start time, so a thread id
//! reused by a new thread is not mistaken for the old one.
//!
//! A thread is attributed to the library whose code started it where that can be seen: each
//! call into an instance's lifecycle (`new`, `import_state`, `start`, `stop`, drop) is
//! surrounded by a census ([`CallCensus`]), and a thread that appears during such calls of
//! other libraries only does not keep this one loaded. So a new version's runtime (its
//! threads started in `start`) does not pin every older version. A thread that appeared
//! outside such calls (in a request, on a thread of the plugin's own) is still presumed to
//! run the code of every library opened before it: the safe side.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs, io,
    sync::Mutex,
    thread,
    time::{Duration, Instant},
};

/// A thread of this process: its kernel thread id and its start time (clock ticks since
/// boot), which together never name two threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ThreadKey {
    tid: i32,
    start: u64,
}

/// A thread seen by a census: who it is and its name (`comm`, at most 15 bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThreadInfo {
    /// Who it is.
    pub key: ThreadKey,
    /// Its name, as the kernel shows it.
    pub name: String,
}

impl ThreadInfo {
    /// Stands for the threads that could not be listed.
    pub(crate) fn unknown(error: &io::Error) -> ThreadInfo {
        ThreadInfo {
            key: ThreadKey { tid: 0, start: 0 },
            name: format!("threads unknown: /proc/self/task: {error}"),
        }
    }
}

impl std::fmt::Display for ThreadInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.key.tid, self.name)
    }
}

/// The threads alive at one moment.
#[derive(Debug, Clone, Default)]
pub struct Census {
    threads: BTreeSet<ThreadKey>,
}

impl Census {
    /// Lists the threads of this process now.
    pub fn take() -> io::Result<Census> {
        Ok(Census {
            threads: live_threads()?.into_iter().map(|t| t.key).collect(),
        })
    }
}

/// Threads alive now that were not in `baseline`, that the host did not start, that were not
/// seen appearing only during calls into other libraries of the same service (see
/// [`CallCensus`]), and that `elsewhere` does not attribute to someone else (by name): the
/// threads that may run code of the library `library` of `service`, opened when `baseline`
/// was taken.
///
/// Only the same service's other versions can take a thread off a library: a thread that
/// appeared while a call into service X ran may have been started by another service Y's
/// thread at that moment, so for Y's libraries it stays a suspect.
pub fn newcomers(
    baseline: &Census,
    (service, library): (&str, LibraryId),
    elsewhere: &dyn Fn(&str) -> bool,
) -> io::Result<Vec<ThreadInfo>> {
    let live = live_threads()?;
    let alive: BTreeSet<ThreadKey> = live.iter().map(|t| t.key).collect();
    let mut host = lock_registry();
    // Threads that have ended are forgotten (their keys can never come back).
    host.retain(|key| alive.contains(key));
    let mut attributed = lock_attributed();
    attributed.retain(|key, _| alive.contains(key));
    Ok(live
        .into_iter()
        .filter(|t| !baseline.threads.contains(&t.key) && !host.contains(&t.key))
        .filter(|t| {
            attributed.get(&t.key).is_none_or(|libraries| {
                libraries.contains(&(service.to_owned(), library))
                    || libraries.iter().any(|(other, _)| other != service)
            })
        })
        .filter(|t| !elsewhere(&t.name))
        .collect())
}

/// Names one opened library for attribution; never reused within a process.
pub type LibraryId = u64;

/// Threads seen appearing during calls into libraries' code, and which libraries' (their
/// service and id; more than one when calls overlapped).
type Attributed = BTreeMap<ThreadKey, BTreeSet<(String, LibraryId)>>;
static ATTRIBUTED: Mutex<Attributed> = Mutex::new(BTreeMap::new());

fn lock_attributed() -> std::sync::MutexGuard<'static, Attributed> {
    ATTRIBUTED.lock().unwrap_or_else(|p| p.into_inner())
}

/// The thread ids alive before a call into a library's code; [`CallCensus::attribute`] after
/// the call gives the threads that appeared meanwhile to that library. Costs one listing of
/// `/proc/self/task` before, and one after (plus a read per new thread).
#[derive(Debug)]
pub(crate) struct CallCensus(Option<BTreeSet<i32>>);

impl CallCensus {
    pub(crate) fn before() -> CallCensus {
        CallCensus(thread_ids().ok())
    }

    /// Threads alive now and not before, that the host did not start, are `library`'s (of
    /// `service`).
    pub(crate) fn attribute(self, (service, library): (&str, LibraryId)) {
        let (Some(before), Ok(now)) = (self.0, thread_ids()) else {
            return;
        };
        let appeared: Vec<ThreadKey> = now
            .difference(&before)
            .filter_map(|&tid| read_thread(tid))
            .map(|t| t.key)
            .collect();
        if appeared.is_empty() {
            return;
        }
        let host = lock_registry();
        let mut attributed = lock_attributed();
        // Threads that have ended are forgotten here too, not only when a library is closed:
        // a host that never closes one must not keep every thread its plugins ever started.
        attributed.retain(|key, _| now.contains(&key.tid));
        for key in appeared.into_iter().filter(|key| !host.contains(key)) {
            attributed
                .entry(key)
                .or_default()
                .insert((service.to_owned(), library));
        }
    }
}

fn thread_ids() -> io::Result<BTreeSet<i32>> {
    let mut tids = BTreeSet::new();
    for entry in fs::read_dir("/proc/self/task")? {
        if let Some(tid) = entry?.file_name().to_str().and_then(|s| s.parse().ok()) {
            tids.insert(tid);
        }
    }
    Ok(tids)
}

/// The name the kernel gives a thread named `name`: its first 15 bytes.
pub fn kernel_name(name: &str) -> &str {
    let mut end = name.len().min(15);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    &name[..end]
}

fn live_threads() -> io::Result<Vec<ThreadInfo>> {
    let mut threads = Vec::new();
    for entry in fs::read_dir("/proc/self/task")? {
        let entry = entry?;
        let Some(tid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        // A thread that ended between the listing and the read is simply gone.
        if let Some(thread) = read_thread(tid) {
            threads.push(thread);
        }
    }
    Ok(threads)
}

/// Reads `/proc/self/task/<tid>/stat`: `tid (comm) state ...`, the start time being the
/// 22nd field. The name may hold spaces and parentheses: it ends at the last `)`.
fn read_thread(tid: i32) -> Option<ThreadInfo> {
    let stat = fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let name = stat.get(open + 1..close)?.to_owned();
    // After the name: field 3 (state) onwards; the start time is field 22.
    let start = stat
        .get(close + 1..)?
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()?;
    Some(ThreadInfo {
        key: ThreadKey { tid, start },
        name,
    })
}

/// The threads the host started or adopted: never plugin threads.
static HOST_THREADS: Mutex<BTreeSet<ThreadKey>> = Mutex::new(BTreeSet::new());

fn lock_registry() -> std::sync::MutexGuard<'static, BTreeSet<ThreadKey>> {
    HOST_THREADS.lock().unwrap_or_else(|p| p.into_inner())
}

fn current_key() -> Option<ThreadKey> {
    read_thread(nix::unistd::gettid().as_raw()).map(|t| t.key)
}

/// Marks the calling thread as the host's (or the embedding program's) for the rest of its
/// life: it never runs plugin code on its own, so it never keeps a library loaded. The
/// daemon's main thread and the tests' threads adopt themselves; threads made with
/// [`spawn`] and [`spawn_detached`] are adopted already.
///
/// A thread stays adopted until it has ended (a thread that returned from its function may
/// still be running thread-local destructors): the registry forgets threads once a census
/// no longer finds them.
pub fn adopt_current_thread() {
    if let Some(key) = current_key() {
        lock_registry().insert(key);
    }
}

/// A host thread that is waited for with a deadline ([`HostThread::join_until`]). Dropped
/// unjoined, it is detached.
#[derive(Debug)]
pub struct HostThread {
    key: Option<ThreadKey>,
    /// `None` once joined.
    pthread: Option<libc::pthread_t>,
}

/// Starts a host thread named `name` running `f`. The thread counts as the host's (see
/// [`adopt_current_thread`]).
pub fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> io::Result<HostThread> {
    let (key_tx, key_rx) = std::sync::mpsc::sync_channel(1);
    let handle = thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            let key = current_key();
            if let Some(key) = key {
                lock_registry().insert(key);
            }
            let _ = key_tx.send(key);
            f();
        })?;
    // The thread sends its identity before anything else: this wait is on host code only.
    let key = key_rx.recv().ok().flatten();
    use std::os::unix::thread::JoinHandleExt;
    Ok(HostThread {
        key,
        pthread: Some(handle.into_pthread_t()),
    })
}

/// Starts a host thread that is never joined (a connection's thread, the signal thread). It
/// counts as the host's.
pub fn spawn_detached(name: &str, f: impl FnOnce() + Send + 'static) -> io::Result<()> {
    thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            adopt_current_thread();
            f();
        })?;
    Ok(())
}

impl HostThread {
    /// The kernel's id of the thread, when it could be read.
    pub fn tid(&self) -> Option<i32> {
        self.key.map(|k| k.tid)
    }

    /// Waits until the thread has ended (thread-local destructors included: after this no
    /// code can run on it), at most until `deadline`. Returns whether it has ended; once it
    /// has, later calls return `true` at once.
    pub fn join_until(&mut self, deadline: Instant) -> bool {
        let Some(pthread) = self.pthread else {
            return true;
        };
        loop {
            // Short slices against the real-time clock, bounded by the monotonic deadline:
            // a jump of the wall clock cannot stretch the wait.
            let slice = deadline
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(50));
            if timed_join(pthread, slice) {
                self.pthread = None;
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
        }
    }
}

impl Drop for HostThread {
    fn drop(&mut self) {
        if let Some(pthread) = self.pthread.take() {
            // SAFETY: `pthread` came from `into_pthread_t`, which hands over the only right
            // to join or detach it, and it was neither joined (`join_until` clears it) nor
            // detached before.
            unsafe { libc::pthread_detach(pthread) };
        }
    }
}

/// Joins `pthread` if it ends within `slice`. Returns whether it was joined.
fn timed_join(pthread: libc::pthread_t, slice: Duration) -> bool {
    use nix::{sys::time::TimeSpec, time::ClockId};
    let Ok(now) = nix::time::clock_gettime(ClockId::CLOCK_REALTIME) else {
        return false;
    };
    let until = now + TimeSpec::from_duration(slice);
    // SAFETY: `pthread` is a joinable thread of this process that has not been joined or
    // detached (the caller's `HostThread` owns that right, and clears it when this returns
    // `true`); the result pointer may be null.
    let result =
        unsafe { libc::pthread_timedjoin_np(pthread, std::ptr::null_mut(), until.as_ref()) };
    result == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_census_sees_the_thread_that_takes_it_and_a_new_thread_is_a_newcomer() {
        let before = Census::take().unwrap();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
        let stranger = std::thread::Builder::new()
            .name("stranger".into())
            .spawn(move || {
                // The thread names itself when it starts: seen from outside only after that.
                let _ = ready_tx.send(());
                let _ = stop_rx.recv();
            })
            .unwrap();
        ready_rx.recv().unwrap();
        let found = newcomers(&before, ("svc", 1), &|_| false).unwrap();
        assert!(found.iter().any(|t| t.name == "stranger"), "{found:?}");
        let elsewhere = newcomers(&before, ("svc", 1), &|name| name == "stranger").unwrap();
        assert!(!elsewhere.iter().any(|t| t.name == "stranger"));
        drop(stop_tx);
        stranger.join().unwrap();
    }

    #[test]
    fn a_host_thread_is_no_newcomer_and_is_joined_within_a_deadline() {
        let before = Census::take().unwrap();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let mut thread = spawn("host-own", move || {
            let _ = stop_rx.recv();
        })
        .unwrap();
        let found = newcomers(&before, ("svc", 1), &|_| false).unwrap();
        assert!(!found.iter().any(|t| t.name == "host-own"), "{found:?}");
        assert!(!thread.join_until(Instant::now() + Duration::from_millis(30)));
        drop(stop_tx);
        assert!(thread.join_until(Instant::now() + Duration::from_secs(10)));
        // Joined: asking again answers at once.
        assert!(thread.join_until(Instant::now()));
    }

    #[test]
    fn a_thread_started_in_another_versions_call_is_not_its_newcomer_but_another_services() {
        let before = Census::take().unwrap();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
        // Library 102's `start` starts a worker, as a runtime does.
        let call = CallCensus::before();
        let worker = std::thread::Builder::new()
            .name("worker-of-102".into())
            .spawn(move || {
                let _ = ready_tx.send(());
                let _ = stop_rx.recv();
            })
            .unwrap();
        ready_rx.recv().unwrap();
        call.attribute(("svc", 102));
        let older = newcomers(&before, ("svc", 101), &|_| false).unwrap();
        assert!(
            !older.iter().any(|t| t.name == "worker-of-102"),
            "{older:?}"
        );
        let its_own = newcomers(&before, ("svc", 102), &|_| false).unwrap();
        assert!(
            its_own.iter().any(|t| t.name == "worker-of-102"),
            "{its_own:?}"
        );
        // Another service's thread may have started it at that moment: a suspect there.
        let other = newcomers(&before, ("other", 7), &|_| false).unwrap();
        assert!(other.iter().any(|t| t.name == "worker-of-102"), "{other:?}");
        drop(stop_tx);
        worker.join().unwrap();
    }

    #[test]
    fn kernel_names_are_cut_at_fifteen_bytes() {
        assert_eq!(kernel_name("svc-a-very-long-service"), "svc-a-very-long");
        assert_eq!(kernel_name("svc-echo"), "svc-echo");
    }
}
