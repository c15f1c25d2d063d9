//! What the process does around plugin code: ends without running library destructors,
//! sets the allocator's arenas, and leaves a line when plugin code ends the process (a
//! fatal signal, `exit`).

/// Ends the process now with `code`, without running anything registered to run at exit:
/// in particular not the destructors of the plugin libraries still loaded (plugin code,
/// which could hang or crash the process at its very end). Standard error is unbuffered;
/// flush anything else first.
pub fn exit_without_destructors(code: i32) -> ! {
    // SAFETY: `_exit` ends the process at once; no Rust invariant depends on destructors or
    // `atexit` handlers running (the kernel's state is already saved by the caller).
    unsafe { libc::_exit(code) }
}

/// Limits glibc's malloc to `arenas` arenas, unless the environment says otherwise
/// (`MALLOC_ARENA_MAX`). Call it before starting threads. By default glibc keeps up to eight
/// arenas per core, one more for each thread that finds the others busy; a host that starts
/// a thread per service instance then grows for hundreds of hot replaces before its
/// resident memory settles (1.6 MB over 400 swaps here, against 0.1 MB with two arenas).
/// The fewer the arenas, the less of a swap's large buffers lands on pages an arena just gave
/// back (each page faulted in again): with one arena a 16 MiB swap pause is 0.92 of its
/// floor on a 2-CPU machine, with two 1.12 to 1.17 (see docs/PERFORMANCE.md).
pub fn limit_malloc_arenas(arenas: i32) {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return;
    }
    // SAFETY: `mallopt` only sets a parameter of the C allocator; M_ARENA_MAX takes effect
    // for arenas created from now on, and no Rust invariant depends on it.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, arenas);
    }
}

/// The status the process ends with when plugin code calls `exit`.
pub const PLUGIN_EXIT_STATUS: i32 = 2;

/// The fatal signals reported, and their names.
const FATAL_SIGNALS: [(libc::c_int, &str); 5] = [
    (libc::SIGSEGV, "SIGSEGV"),
    (libc::SIGBUS, "SIGBUS"),
    (libc::SIGILL, "SIGILL"),
    (libc::SIGFPE, "SIGFPE"),
    (libc::SIGABRT, "SIGABRT"),
];

/// Writes `parts` to standard error with `write(2)`: no allocation, no lock (callable from
/// a signal handler).
fn say(parts: &[&[u8]]) {
    for part in parts {
        let mut rest = *part;
        while !rest.is_empty() {
            // SAFETY: `rest` is a live slice of `rest.len()` bytes; `write` is
            // async-signal-safe and reads only them.
            let written = unsafe { libc::write(2, rest.as_ptr().cast(), rest.len()) };
            let Ok(written) = usize::try_from(written) else {
                return;
            };
            if written == 0 {
                return;
            }
            rest = &rest[written..];
        }
    }
}

/// Says where this thread was: `(service `kv`, in `handle`)`, or that it is no executor.
fn say_where() {
    let (name, len, call) = crate::last_words::context();
    if len == 0 {
        say(&[b"on a thread of the host's, not in plugin code"]);
        return;
    }
    say(&[b"in plugin code (service `", &name[..len], b"`"]);
    if call.is_empty() {
        say(&[b", between two plugin calls)"]);
    } else {
        say(&[b", in `", call.as_bytes(), b"`)"]);
    }
}

/// Set in a worker process (see [`report_fatal_signals_in_worker`]).
static IN_WORKER: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_fatal_signal(signal: libc::c_int) {
    let name = FATAL_SIGNALS
        .iter()
        .find(|(number, _)| *number == signal)
        .map_or("a fatal signal", |(_, name)| name);
    if IN_WORKER.load(std::sync::atomic::Ordering::Relaxed) {
        say(&[b"microkernel worker: ", name.as_bytes(), b" "]);
        say_where();
        say(&[b": the worker ends; the host restarts it from the service's last checkpoint\n"]);
        return;
    }
    say(&[b"microkernel: ", name.as_bytes(), b" "]);
    say_where();
    say(&[
        b": the host ends; what the services acknowledged since their last checkpoint is lost\n",
    ]);
    // The handler was reset to the default (SA_RESETHAND): returning re-runs the faulting
    // instruction, or `abort` raises again, and the process ends by the signal.
}

extern "C" fn on_exit_call() {
    say(&[b"microkernel: exit() was called "]);
    say_where();
    say(&[b": the host ends with status 2; what the services acknowledged since their last checkpoint is lost\n"]);
    // SAFETY: `_exit` ends the process at once (nothing of the process is used after it).
    unsafe { libc::_exit(PLUGIN_EXIT_STATUS) }
}

/// For a daemon that ends only by [`exit_without_destructors`]: when plugin code ends the
/// process instead (a fatal signal, a call to `exit`), leaves one line on standard error
/// naming the service and the call (see [`crate::last_words`]); an `exit` then ends the
/// process with [`PLUGIN_EXIT_STATUS`]. Call it once, at start-up, before any plugin is
/// loaded.
pub fn report_fatal_ends() -> std::io::Result<()> {
    install_signal_reporters()?;
    // SAFETY: `on_exit_call` is an `extern "C" fn()` that writes to standard error and ends
    // the process; `atexit` only records it.
    if unsafe { libc::atexit(on_exit_call) } != 0 {
        return Err(std::io::Error::other("atexit refused the handler"));
    }
    Ok(())
}

/// For a worker process (see [`crate::worker`]): a fatal signal in plugin code leaves one
/// line naming the service and the call, as in the host; an `exit` is left alone (the host
/// reports the status, and the call it was in).
pub fn report_fatal_signals_in_worker() -> std::io::Result<()> {
    IN_WORKER.store(true, std::sync::atomic::Ordering::Relaxed);
    install_signal_reporters()
}

fn install_signal_reporters() -> std::io::Result<()> {
    for (signal, _) in FATAL_SIGNALS {
        // SAFETY: a zeroed `sigaction` is a valid empty one; the handler is an
        // `extern "C" fn(c_int)` (no SA_SIGINFO) that only reads thread-locals needing no
        // initialization and calls `write`, both async-signal-safe; SA_RESETHAND restores
        // the default action before it runs, so a second fault ends the process.
        let installed = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_fatal_signal as extern "C" fn(libc::c_int) as usize;
            action.sa_flags = libc::SA_RESETHAND;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut())
        };
        if installed != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}
