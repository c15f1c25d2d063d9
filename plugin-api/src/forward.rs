//! Forwards the `log` and `tracing` records of a plugin, and of every library it uses, to
//! the host, as the SDK's own logging macros go: with their level and target.
//!
//! A plugin library has its own copy of `log` and `tracing-core` (of their statics above
//! all), so a logger and a dispatcher set here are that library's alone: the host's, and
//! other plugins', are untouched. They are set once, when the host opens the library
//! ([`crate::export_service!`]'s root module calls [`install`]), never by the test kit or by
//! a service linked into a host, whose `log` and `tracing` are the program's own.
//!
//! Records go to the host of the library's live instance; a record made when none is live
//! (a thread the plugin left running after `stop`) is dropped. Levels above
//! `MICROKERNEL_PLUGIN_LOG` (from the host's environment: `off`, `error`, `warn`, `info`,
//! `debug` or `trace`, in any case; `info` when unset, empty or anything else) are not
//! formatted at all, the SDK's own macros' included; the host's filter then applies to what
//! arrives (target `plugin`).

use std::{
    fmt::Write as _,
    sync::{
        atomic::{AtomicU8, Ordering},
        Once,
    },
};

use plugin_abi::LogLevel;
use tracing_core::{
    field::{Field, Visit},
    span, Event, Level, LevelFilter, Metadata, Subscriber,
};

/// The environment variable that sets the most detailed level forwarded.
pub const LEVEL_VARIABLE: &str = "MICROKERNEL_PLUGIN_LOG";

/// The most detailed level formatted: a [`log::LevelFilter`] as a number, which is also the
/// [`LogLevel`] number of that level (error 1 … trace 5; 0 is off). Until [`install`] sets it
/// (in a library a host opened), everything is: the test kit records every line.
static MAX: AtomicU8 = AtomicU8::new(log::LevelFilter::Trace as u8);

/// Whether a record at `level` is formatted and sent at all.
pub(crate) fn enabled(level: LogLevel) -> bool {
    (level as u8) <= MAX.load(Ordering::Relaxed)
}

/// The level `MICROKERNEL_PLUGIN_LOG` names: one of the six words, in any case, around
/// spaces; `info` for anything else (unset, empty, a number, a typo).
fn max_level(value: Option<&str>) -> log::LevelFilter {
    match value.map(|v| v.trim().to_ascii_lowercase()).as_deref() {
        Some("off") => log::LevelFilter::Off,
        Some("error") => log::LevelFilter::Error,
        Some("warn") => log::LevelFilter::Warn,
        Some("debug") => log::LevelFilter::Debug,
        Some("trace") => log::LevelFilter::Trace,
        _ => log::LevelFilter::Info,
    }
}

/// Sets this library's `log` logger and `tracing` dispatcher to forward to the host, once.
/// A plugin that sets its own later gets the error those crates give for a second one.
pub fn install() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let max = max_level(std::env::var(LEVEL_VARIABLE).ok().as_deref());
        MAX.store(max as u8, Ordering::Relaxed);
        if log::set_logger(&LogForward).is_ok() {
            log::set_max_level(max);
        }
        let max = match max {
            log::LevelFilter::Off => LevelFilter::OFF,
            log::LevelFilter::Error => LevelFilter::ERROR,
            log::LevelFilter::Warn => LevelFilter::WARN,
            log::LevelFilter::Info => LevelFilter::INFO,
            log::LevelFilter::Debug => LevelFilter::DEBUG,
            log::LevelFilter::Trace => LevelFilter::TRACE,
        };
        let _ = tracing_core::dispatcher::set_global_default(tracing_core::Dispatch::new(
            TracingForward { max },
        ));
    });
}

struct LogForward;

impl log::Log for LogForward {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        let level = match record.level() {
            log::Level::Error => LogLevel::Error,
            log::Level::Warn => LogLevel::Warn,
            log::Level::Info => LogLevel::Info,
            log::Level::Debug => LogLevel::Debug,
            log::Level::Trace => LogLevel::Trace,
        };
        crate::sdk::__log(level, record.target(), *record.args());
    }

    fn flush(&self) {}
}

/// A `tracing` subscriber that forwards events (their message, then their other fields as
/// `name=value`) and ignores spans.
struct TracingForward {
    max: LevelFilter,
}

/// Collects an event's fields into one line.
#[derive(Default)]
struct Line {
    message: String,
    fields: String,
}

impl Visit for Line {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            let _ = write!(self.fields, " {}={value}", field.name());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            let _ = write!(self.fields, " {}={value:?}", field.name());
        }
    }
}

impl Subscriber for TracingForward {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.is_event() && *metadata.level() <= self.max
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(self.max)
    }

    fn new_span(&self, _: &span::Attributes<'_>) -> span::Id {
        // Spans are not forwarded (`enabled` refuses them); an id is still owed.
        span::Id::from_u64(1)
    }

    fn record(&self, _: &span::Id, _: &span::Record<'_>) {}

    fn record_follows_from(&self, _: &span::Id, _: &span::Id) {}

    fn event(&self, event: &Event<'_>) {
        let metadata = event.metadata();
        let level = match *metadata.level() {
            Level::ERROR => LogLevel::Error,
            Level::WARN => LogLevel::Warn,
            Level::INFO => LogLevel::Info,
            Level::DEBUG => LogLevel::Debug,
            _ => LogLevel::Trace,
        };
        let mut line = Line::default();
        event.record(&mut line);
        crate::sdk::__log(
            level,
            metadata.target(),
            format_args!("{}{}", line.message, line.fields),
        );
    }

    fn enter(&self, _: &span::Id) {}

    fn exit(&self, _: &span::Id) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_level_variable_takes_the_six_words_and_nothing_else() {
        assert_eq!(max_level(Some(" TRACE ")), log::LevelFilter::Trace);
        assert_eq!(max_level(Some("off")), log::LevelFilter::Off);
        assert_eq!(max_level(Some("Warn")), log::LevelFilter::Warn);
        for other in [None, Some(""), Some("5"), Some("verbose")] {
            assert_eq!(max_level(other), log::LevelFilter::Info, "{other:?}");
        }
        // The number stored is the number of the ABI's level: the two scales agree.
        assert_eq!(log::LevelFilter::Error as u8, LogLevel::Error as u8);
        assert_eq!(log::LevelFilter::Trace as u8, LogLevel::Trace as u8);
    }
}
