//! `comms check PLUGIN_FILE [--config F] [--key-file K] [--assume CAPS]`: the conformance suite
//! against any plugin file; `comms check --list`: its cases as a Markdown table.
//!
//! `F` holds the plugin's own config table (what would be under `[transports.NAME]`); without
//! it the plugin runs with its defaults, which must allow several instances at once. A `layers`
//! key in it, as in a node's transport table, stacks layers over every instance, so that the
//! suite checks the stack (e.g. `layers = [{ path = "libcomms_chunk.so" }]`). With `K` (a
//! key file from `comms keygen`) the suite runs over encrypted links, as with `[security] links =
//! "noise"`: see [`SuiteConfig::with_noise_links`]. Prints a
//! line per case as it finishes (`PASS name`, `FAIL name: reason`, `SKIP name: reason`), then
//! `N passed, M failed, K skipped`. Exits 0 iff no case failed. With `--assume reliable` (any
//! capability names, comma separated) the cases of those capabilities run as if the plugin
//! declared them: a way to see whether a transport would keep a promise before making it.

use super::{other, CliError};
use comms_host::{
    conformance::{case_table, run_suite_with_progress, SuiteConfig},
    PluginLibrary,
};
use comms_plugin_api::{Capabilities, Provides};
use std::{io::Write, path::Path, process::ExitCode};

/// `comms check --list`.
pub(super) fn list() -> ExitCode {
    print!("{}", case_table());
    ExitCode::SUCCESS
}

/// The flags named in `--assume`.
fn assumed(names: &[String]) -> Result<Capabilities, CliError> {
    let flags = (0..64).map(|bit| Capabilities(1 << bit)).filter(|flag| !flag.names().is_empty());
    let known: Vec<(Capabilities, &str)> = flags.map(|flag| (flag, flag.names()[0])).collect();
    names.iter().map(|name| name.trim()).filter(|name| !name.is_empty()).try_fold(
        Capabilities::NONE,
        |set, name| match known.iter().find(|(_, known)| *known == name) {
            Some((flag, _)) => Ok(set | *flag),
            None => Err(other(format!(
                "--assume: no capability `{name}` (known: {})",
                known.iter().map(|(_, name)| *name).collect::<Vec<_>>().join(", ")
            ))),
        },
    )
}

pub(super) async fn run(
    file: &Path,
    config: Option<&Path>,
    key_file: Option<&Path>,
    assume: &[String],
) -> Result<ExitCode, CliError> {
    let assume = assumed(assume)?;
    let library = PluginLibrary::load(file).map_err(CliError::Load)?;
    let description = library.description();
    if !description.provides.contains(Provides::TRANSPORT) {
        return Err(other(format!(
            "{} (plugin `{}`) provides no transport; comms check tests transports",
            file.display(),
            description.name
        )));
    }
    let config_toml = match config {
        None => String::new(),
        Some(path) => read_config(path)?,
    };
    let base = config.and_then(Path::parent).unwrap_or(Path::new("."));
    let mut suite = SuiteConfig::new(config_toml).with_layers_from_config(base, &[]).map_err(|message| {
        other(format!("{}: {message}", config.map_or("plugin config".into(), |p| p.display().to_string())))
    })?;
    suite.assume = assume;
    let mut links = "plain links";
    if let Some(key_file) = key_file {
        suite = suite.with_noise_links(key_file).map_err(other)?;
        links = "encrypted links (noise)";
    }

    let assuming = match assume.names().as_slice() {
        [] => String::new(),
        names => format!(", assuming {}", names.join(" and ")),
    };
    let stack: String = suite
        .layers
        .iter()
        .map(|layer| format!("layer `{}` over ", layer.library.description().name))
        .collect();
    println!(
        "checking {stack}plugin `{}` {} from {} over {links}{assuming}",
        description.name,
        description.version,
        file.display()
    );
    let report = run_suite_with_progress(&library, &suite, |case| {
        println!("{case}");
        let _ = std::io::stdout().flush();
    })
    .await;
    println!("{}", report.summary());
    Ok(if report.passed() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// The config file's text, once it is known to be a TOML table (the plugin names bad keys).
fn read_config(path: &Path) -> Result<String, CliError> {
    let text = std::fs::read_to_string(path)
        .map_err(|error| other(format!("cannot read config file {}: {error}", path.display())))?;
    text.parse::<toml::Table>().map_err(|error| {
        let reason = error.message().to_string();
        let line = error.span().map(|span| text[..span.start].lines().count().max(1));
        match line {
            Some(line) => other(format!("config file {} line {line}: {reason}", path.display())),
            None => other(format!("config file {}: {reason}", path.display())),
        }
    })?;
    Ok(text)
}
