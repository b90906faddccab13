//! Host side of logging: the [`HostServices`] a loaded plugin library logs through.
//!
//! A plugin's records arrive with a target (the plugin's module path) and a level known only at
//! run time, while `tracing` wants both in a `'static` callsite. Each distinct (target, level)
//! gets one callsite, made once and kept for the life of the process (a plugin has a bounded
//! number of targets), and registered with `tracing` so that the host's filter (`RUST_LOG`)
//! decides about plugin records exactly as about its own, and formats them the same.

use comms_core::{
    abi_stable::{
        sabi_trait::TD_Opaque,
        std_types::{ROption, RStr},
    },
    async_ffi::FfiFuture,
    HostServices, HostServicesBox, HostServices_TO, HostSocketBox, LogLevel, LogRecord,
};
use std::{
    collections::HashMap,
    sync::{Mutex, OnceLock},
};
use tracing::{
    callsite::{Callsite, Identifier},
    field::{FieldSet, Value},
    level_filters::LevelFilter,
    metadata::Kind,
    subscriber::Interest,
    Event, Level, Metadata,
};

/// The services this host gives a plugin library: its log (this module), its thread budget and
/// its executor and reactor ([`super::host_reactor`]).
pub(crate) fn host_services(worker_threads: u32) -> HostServicesBox {
    HostServices_TO::from_value(HostLog { worker_threads }, TD_Opaque)
}

struct HostLog {
    worker_threads: u32,
}

impl HostServices for HostLog {
    fn max_log_level(&self) -> LogLevel {
        match LevelFilter::current().into_level() {
            None => LogLevel::OFF,
            Some(Level::TRACE) => LogLevel::TRACE,
            Some(Level::DEBUG) => LogLevel::DEBUG,
            Some(Level::INFO) => LogLevel::INFO,
            Some(Level::WARN) => LogLevel::WARN,
            Some(_) => LogLevel::ERROR,
        }
    }

    fn log_enabled(&self, level: LogLevel, target: RStr<'_>) -> bool {
        let Some(level) = tracing_level(level) else { return false };
        let callsite = PluginCallsite::get(target.as_str(), level);
        tracing::dispatcher::get_default(|dispatch| dispatch.enabled(callsite.metadata()))
    }

    fn worker_threads(&self) -> u32 {
        self.worker_threads
    }

    fn spawn(&self, task: FfiFuture<()>) -> ROption<FfiFuture<()>> {
        super::host_reactor::spawn(task)
    }

    fn adopt_socket(&self, fd: i32) -> ROption<HostSocketBox> {
        super::host_reactor::adopt_socket(fd)
    }

    fn log(&self, record: LogRecord) {
        let Some(level) = tracing_level(record.level) else { return };
        let callsite = PluginCallsite::get(record.target.as_str(), level);
        let metadata = callsite.metadata();
        let Some(message_field) = metadata.fields().field("message") else { return };
        let message = record.message.as_str();
        let values = [(&message_field, Some(&message as &dyn Value))];
        let values = metadata.fields().value_set(&values);
        // As tracing's own macros do: ask the filter first, then dispatch.
        tracing::dispatcher::get_default(|dispatch| {
            if dispatch.enabled(metadata) {
                dispatch.event(&Event::new(metadata, &values));
            }
        });
    }
}

fn tracing_level(level: LogLevel) -> Option<Level> {
    match level {
        LogLevel::TRACE => Some(Level::TRACE),
        LogLevel::DEBUG => Some(Level::DEBUG),
        LogLevel::INFO => Some(Level::INFO),
        LogLevel::WARN => Some(Level::WARN),
        LogLevel::ERROR => Some(Level::ERROR),
        _ => None,
    }
}

/// A callsite made at run time for one plugin target and level.
struct PluginCallsite {
    metadata: OnceLock<Metadata<'static>>,
}

impl PluginCallsite {
    /// The callsite for `target` at `level`, made and registered on first use.
    fn get(target: &str, level: Level) -> &'static PluginCallsite {
        static CALLSITES: OnceLock<Mutex<HashMap<(String, Level), &'static PluginCallsite>>> =
            OnceLock::new();
        let mut callsites = CALLSITES.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
        if let Some(callsite) = callsites.get(&(target.to_string(), level)) {
            return callsite;
        }
        // Leaked on purpose: tracing keeps callsites for the life of the process.
        let callsite: &'static PluginCallsite =
            Box::leak(Box::new(PluginCallsite { metadata: OnceLock::new() }));
        let target: &'static str = Box::leak(target.to_string().into_boxed_str());
        let _ = callsite.metadata.set(Metadata::new(
            "plugin event",
            target,
            level,
            None,
            None,
            None,
            FieldSet::new(&["message"], Identifier(callsite)),
            Kind::EVENT,
        ));
        tracing::callsite::register(callsite);
        callsites.insert((target.to_string(), level), callsite);
        callsite
    }
}

impl Callsite for PluginCallsite {
    fn set_interest(&self, _: Interest) {}

    fn metadata(&self) -> &Metadata<'_> {
        self.metadata.get().expect("set before the callsite is registered")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use comms_core::abi_stable::std_types::{RString, RVec};
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn plugin_records_are_filtered_by_their_own_target_and_formatted_like_host_records() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("warn,comms_spool=debug"))
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let host = host_services(0);
            assert!(host.log_enabled(LogLevel::DEBUG, RStr::from("comms_spool::reader")));
            assert!(!host.log_enabled(LogLevel::DEBUG, RStr::from("comms_other")));
            assert!(host.log_enabled(LogLevel::WARN, RStr::from("comms_other")));
            for (level, target, message) in [
                (LogLevel::DEBUG, "comms_spool::reader", "read 3 frames peer=\"a\""),
                (LogLevel::DEBUG, "comms_other", "filtered out"),
            ] {
                host.log(LogRecord {
                    level,
                    target: RString::from(target),
                    message: RString::from(message),
                    extensions: RVec::new(),
                });
            }
        });
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        assert!(text.contains("DEBUG comms_spool::reader: read 3 frames peer=\"a\""), "{text}");
        assert!(!text.contains("filtered out"), "{text}");
    }
}
