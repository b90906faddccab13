//! `comms`: inspect plugins, run a node, send and receive from the command line, and a demo.
//!
//! Logs go to stderr and follow `RUST_LOG` (default `warn`); command output goes to stdout.
//! Built with the cargo feature `otel`, spans (info level and above) are exported over OTLP when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set
//! (`comms_host::telemetry`).

mod cli;

use clap::Parser;
use std::process::ExitCode;
use tracing_subscriber::{layer::SubscriberExt, util::SubscriberInitExt, Layer};

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    // Kept to the end of `main`: dropping it exports the spans still waiting.
    let _span_export = match init_logging_and_span_export() {
        Ok(export) => export,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let verbose = args.verbose;
    match runtime.block_on(cli::run(args)) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error}");
            if verbose {
                if let Some(details) = error.details() {
                    eprintln!("\n{details}");
                }
            }
            ExitCode::FAILURE
        }
    }
}

/// The span exporter, when the build has one; dropping it flushes.
#[cfg(feature = "otel")]
type SpanExport = Option<comms_host::telemetry::OtlpTracing>;
/// Nothing to flush: built without `otel`.
#[cfg(not(feature = "otel"))]
struct SpanExport;

/// Logs to stderr, and spans to an OTLP collector when the variables ask for it.
fn init_logging_and_span_export() -> Result<SpanExport, String> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_filter(filter);
    #[cfg(feature = "otel")]
    {
        let export =
            comms_host::telemetry::OtlpTracing::from_env("comms").map_err(|error| error.to_string())?;
        let spans = export
            .as_ref()
            .map(|export| export.layer().with_filter(tracing_subscriber::filter::LevelFilter::INFO));
        tracing_subscriber::registry().with(logs).with(spans).init();
        Ok(export)
    }
    #[cfg(not(feature = "otel"))]
    {
        tracing_subscriber::registry().with(logs).init();
        for variable in ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] {
            if std::env::var_os(variable).is_some() {
                tracing::warn!(
                    "{variable} is set, but this `comms` was built without the `otel` feature: no spans are \
                     exported (cargo install comms-host --features otel)"
                );
            }
        }
        Ok(SpanExport)
    }
}
