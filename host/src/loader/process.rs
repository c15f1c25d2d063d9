//! What the process does around plugin code: ends without running library destructors,
//! and sets the allocator's arenas.

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
