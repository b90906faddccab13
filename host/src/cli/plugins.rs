//! `comms plugins list` and `comms plugins inspect`.

use super::CliError;
use comms_host::{plugin_search, PluginLibrary};
use comms_plugin_api::{host_side::layout_check, PluginDescription, Provides};
use std::{
    cmp::Ordering,
    path::{Path, PathBuf},
    process::ExitCode,
};

fn provides(description: &PluginDescription) -> String {
    let mut parts = Vec::new();
    if description.provides.contains(Provides::TRANSPORT) {
        parts.push("transport");
    }
    if description.provides.contains(Provides::DISCOVERY) {
        parts.push("discovery");
    }
    if description.provides.contains(Provides::LAYER) {
        parts.push("layer");
    }
    parts.join("+")
}

pub(super) fn list(dirs: &[PathBuf]) -> Result<ExitCode, CliError> {
    let dirs = if dirs.is_empty() { plugin_search::search_dirs(&[]) } else { dirs.to_vec() };
    let mut found = 0;
    for dir in &dirs {
        for file in plugin_search::plugin_files_in(dir) {
            found += 1;
            match PluginLibrary::load(&file) {
                Ok(library) => {
                    let d = library.description();
                    println!("{:<20} {:<10} {:<20} {}", d.name, d.version, provides(d), file.display());
                }
                Err(error) => println!("{:<20} {:<10} {:<20} {}", "(unloadable)", "-", "-", error),
            }
        }
    }
    if found == 0 {
        let searched: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
        println!("no plugin files (libcomms_*) in: {}", searched.join(", "));
    }
    Ok(ExitCode::SUCCESS)
}

/// The plugin's contract version and how it relates to this host's: `1.0 (this host's)`.
fn interface(description: &PluginDescription) -> String {
    let (plugin, host) = (description.interface_version, PluginLibrary::interface_version());
    let relation = match plugin.cmp(&host) {
        Ordering::Equal => "this host's".to_string(),
        Ordering::Less => format!("older than this host's {host}: what came later runs its defaults"),
        Ordering::Greater => format!("newer than this host's {host}"),
    };
    format!("{plugin} ({relation})")
}

pub(super) fn inspect(file: &Path) -> Result<ExitCode, CliError> {
    let library = PluginLibrary::load(file).map_err(CliError::Load)?;
    let d = library.description();
    println!("file:        {}", file.display());
    println!("name:        {}", d.name);
    println!("version:     {}", d.version);
    println!("provides:    {}", provides(d));
    println!("interface:   {}", interface(d));
    if d.interface_version > PluginLibrary::interface_version() {
        // A newer minor (a newer major does not load): what it added, this host ignores.
        let unused = layout_check::additions_in_library(file);
        let unused = if unused.is_empty() { "nothing it can name".to_string() } else { unused.join(", ") };
        println!("not used:    {unused} (unknown to this host)");
    }
    println!("description: {}", d.description);
    Ok(ExitCode::SUCCESS)
}
