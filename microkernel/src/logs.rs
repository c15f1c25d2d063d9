//! Where the host's log lines go: standard error, never at the cost of a service.
//!
//! A log reader that goes away (`microkernel run 2>&1 | head -1`) or stalls (a paused pager,
//! a stuck log shipper) must cost log lines, counted, and never block or end the host:
//! - the daemon writes through a bounded queue drained by a thread of its own
//!   (`tracing-appender`'s non-blocking writer, lossy): when the queue is full, a line is
//!   dropped and counted ([`dropped`]), and no thread of the host waits;
//! - a write that fails (a reader gone) is not reported on the same standard error (which
//!   `eprintln!` would turn into a panic): the subscriber's own error reports are off.

use std::{
    io::IsTerminal as _,
    sync::{Mutex, OnceLock},
};

use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::{fmt::writer::BoxMakeWriter, EnvFilter};

use crate::cli::LogFormat;

/// How many lines may wait for a slow reader before lines are dropped.
pub const QUEUED_LINES: usize = 16_384;

/// The daemon's writer: what it dropped, and the guard that flushes it.
struct Sink {
    dropped: ErrorCounter,
    guard: Mutex<Option<WorkerGuard>>,
}

static SINK: OnceLock<Sink> = OnceLock::new();

/// Installs the process's subscriber: `filter` and `format`, to standard error, through the
/// bounded queue when `queued` (the daemon), directly otherwise.
pub fn init(filter: EnvFilter, format: LogFormat, queued: bool) {
    let writer = if queued {
        let (writer, guard) = NonBlockingBuilder::default()
            .lossy(true)
            .buffered_lines_limit(QUEUED_LINES)
            .thread_name("log-writer")
            .finish(std::io::stderr());
        let _ = SINK.set(Sink {
            dropped: writer.error_counter(),
            guard: Mutex::new(Some(guard)),
        });
        BoxMakeWriter::new(writer)
    } else {
        BoxMakeWriter::new(std::io::stderr)
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .log_internal_errors(false)
        .with_writer(writer);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// How many log lines were dropped because their reader did not keep up.
pub fn dropped() -> u64 {
    SINK.get()
        .map_or(0, |sink| sink.dropped.dropped_lines() as u64)
}

/// Writes out what is queued, waiting a bounded time (about a second) for a slow reader:
/// before the process ends.
pub fn flush() {
    if let Some(sink) = SINK.get() {
        let guard = sink.guard.lock().unwrap_or_else(|p| p.into_inner()).take();
        drop(guard);
    }
}

/// Checks a `--log-level`: a filter `tracing-subscriber` parses, whose bare words (a
/// directive with no `=`) are levels. `loud`, `warning` or `inof` would parse as a target
/// name, enable nothing else, and silence the log.
pub fn check_level(filter: &str) -> Result<(), String> {
    tracing_subscriber::EnvFilter::try_new(filter).map_err(|e| e.to_string())?;
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    for directive in filter.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        if !directive.contains('=') && !LEVELS.contains(&directive.to_ascii_lowercase().as_str()) {
            return Err(format!(
                "{directive:?} is not a level (off, error, warn, info, debug, trace); name a target's level as `TARGET=LEVEL`"
            ));
        }
    }
    Ok(())
}
