//! `comms`: inspect plugins, run a node, send and receive from the command line, and a demo.
//!
//! Logs go to stderr and follow `RUST_LOG` (default `warn`); command output goes to stdout.

mod cli;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
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
