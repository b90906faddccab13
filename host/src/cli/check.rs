//! `comms check PLUGIN_FILE [--config F]`: the conformance suite against any plugin file.

use super::CliError;
use std::{path::Path, process::ExitCode};

pub(super) async fn run(_file: &Path, _config: Option<&Path>) -> Result<ExitCode, CliError> {
    Err(super::other("comms check is not implemented yet"))
}
