//! Plugin side of logging: a dynamically loaded plugin's `tracing` records go to the host's log.
//!
//! A plugin library links its own copy of `tracing`, whose global dispatcher the host's
//! subscriber never sees. When the host loads the library it hands over its
//! [`HostServices`](comms_core::HostServices); [`attach_host`] then makes this library's global
//! subscriber a forwarder to the host, so `RUST_LOG` filters and formats plugin records exactly
//! like the host's own (with the plugin's targets, e.g. `RUST_LOG=comms_tcp=debug`).
//!
//! It also replaces this library's panic hook (a library has its own copy of std, and so of the
//! hook): a panic becomes one `error` record, with the backtrace only when `RUST_BACKTRACE`
//! asks for one, instead of Rust's banner on stderr. The panic itself is still caught at the
//! boundary and returned to the host as an error.
//!
//! A plugin linked into the program instead shares the program's `tracing` and std: nothing here
//! runs for it.

use comms_core::{
    abi_stable::std_types::{RStr, RString, RVec},
    HostServicesBox, LogLevel, LogRecord,
};
use std::fmt::Write;
use tracing::{
    field::{Field, Visit},
    level_filters::LevelFilter,
    span, Event, Level, Metadata, Subscriber,
};

/// Targets (prefixes) of dependencies whose records are forwarded at `DEBUG` at most.
static DEMOTED: std::sync::Mutex<Vec<&'static str>> = std::sync::Mutex::new(Vec::new());

/// Forwards the records of `target` (a module path prefix, e.g. `lapin::returned_messages`) at
/// `DEBUG` level at most: for a dependency that logs, at `WARN`, what the plugin reports better
/// itself (lapin logs every returned message with its whole body). They stay visible with
/// `RUST_LOG=<target>=debug`.
///
/// Applies to a plugin loaded from its library file; a plugin linked into the program shares
/// the program's `tracing`, whose subscriber decides.
pub fn demote_to_debug(target: &'static str) {
    let mut demoted = DEMOTED.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if !demoted.contains(&target) {
        demoted.push(target);
        drop(demoted);
        // Callsites already registered cached their interest under the old level.
        tracing::callsite::rebuild_interest_cache();
    }
}

/// The level a record of `target` is forwarded at.
fn forwarded_level(level: Level, target: &str) -> Level {
    if level >= Level::DEBUG {
        return level;
    }
    let demoted = DEMOTED.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if demoted.iter().any(|prefix| target.starts_with(prefix)) {
        Level::DEBUG
    } else {
        level
    }
}

/// Called once by the host right after loading the library.
/// `default_threads` sizes the plugin's runtime unless the host asks for a number.
pub(crate) fn attach_host(plugin: &'static str, default_threads: usize, host: HostServicesBox) {
    let host = crate::host_driven::attach(host);
    let threads = match host.worker_threads() {
        0 => default_threads,
        asked => asked as usize,
    };
    crate::runtime::request_worker_threads(plugin, threads);
    let max_level = level_filter(host.max_log_level());
    let forwarder = HostLog { host, max_level };
    if tracing::subscriber::set_global_default(forwarder).is_ok() {
        install_panic_hook(plugin);
    }
}

fn install_panic_hook(plugin: &'static str) {
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a non-string panic payload".to_string());
        let location = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
        let backtrace = std::backtrace::Backtrace::capture();
        match backtrace.status() {
            std::backtrace::BacktraceStatus::Captured => {
                tracing::error!(target: "comms_plugin::panic", "plugin {plugin} panicked{location}: {message}\n{backtrace}")
            }
            _ => tracing::error!(
                target: "comms_plugin::panic",
                "plugin {plugin} panicked{location}: {message} (RUST_BACKTRACE=1 shows where)"
            ),
        }
    }));
}

fn level_filter(level: LogLevel) -> LevelFilter {
    match level {
        LogLevel::TRACE => LevelFilter::TRACE,
        LogLevel::DEBUG => LevelFilter::DEBUG,
        LogLevel::INFO => LevelFilter::INFO,
        LogLevel::WARN => LevelFilter::WARN,
        LogLevel::ERROR => LevelFilter::ERROR,
        _ => LevelFilter::OFF,
    }
}

fn log_level(level: &Level) -> LogLevel {
    match *level {
        Level::TRACE => LogLevel::TRACE,
        Level::DEBUG => LogLevel::DEBUG,
        Level::INFO => LogLevel::INFO,
        Level::WARN => LogLevel::WARN,
        _ => LogLevel::ERROR,
    }
}

/// The library's global subscriber once the host is attached: forwards events, ignores spans.
struct HostLog {
    host: &'static HostServicesBox,
    max_level: LevelFilter,
}

impl Subscriber for HostLog {
    fn register_callsite(&self, metadata: &'static Metadata<'static>) -> tracing::subscriber::Interest {
        if self.enabled(metadata) {
            tracing::subscriber::Interest::always()
        } else {
            tracing::subscriber::Interest::never()
        }
    }

    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        let level = forwarded_level(*metadata.level(), metadata.target());
        metadata.is_event()
            && level <= self.max_level
            && self.host.log_enabled(log_level(&level), RStr::from(metadata.target()))
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(self.max_level)
    }

    fn new_span(&self, _: &span::Attributes<'_>) -> span::Id {
        span::Id::from_u64(1)
    }

    fn record(&self, _: &span::Id, _: &span::Record<'_>) {}

    fn record_follows_from(&self, _: &span::Id, _: &span::Id) {}

    fn event(&self, event: &Event<'_>) {
        let mut message = MessageText::default();
        event.record(&mut message);
        let metadata = event.metadata();
        self.host.log(LogRecord {
            level: log_level(&forwarded_level(*metadata.level(), metadata.target())),
            target: RString::from(metadata.target()),
            message: RString::from(message.0),
            extensions: RVec::new(),
        });
    }

    fn enter(&self, _: &span::Id) {}

    fn exit(&self, _: &span::Id) {}
}

/// The message followed by ` name=value` for every other field, as the host's formatter prints
/// its own records.
#[derive(Default)]
struct MessageText(String);

impl Visit for MessageText {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let fields = std::mem::take(&mut self.0);
            let _ = write!(self.0, "{value:?}{fields}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            let fields = std::mem::take(&mut self.0);
            self.0 = format!("{value}{fields}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demoted_targets_are_forwarded_at_debug_at_most() {
        demote_to_debug("noisy_dependency::returns");
        assert_eq!(forwarded_level(Level::WARN, "noisy_dependency::returns"), Level::DEBUG);
        assert_eq!(forwarded_level(Level::ERROR, "noisy_dependency::returns::inner"), Level::DEBUG);
        assert_eq!(forwarded_level(Level::TRACE, "noisy_dependency::returns"), Level::TRACE);
        assert_eq!(forwarded_level(Level::WARN, "noisy_dependency::other"), Level::WARN);
    }
}
