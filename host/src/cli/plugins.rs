//! `comms plugins list` and `comms plugins inspect`.

use super::CliError;
use comms_host::{plugin_search, PluginLibrary};
use comms_plugin_api::{PluginDescription, Provides};
use std::{
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

pub(super) fn inspect(file: &Path) -> Result<ExitCode, CliError> {
    let library = PluginLibrary::load(file).map_err(CliError::Load)?;
    let d = library.description();
    println!("file:        {}", file.display());
    println!("name:        {}", d.name);
    println!("version:     {}", d.version);
    println!("provides:    {}", provides(d));
    println!("interface:   {} (compatible with this host)", PluginLibrary::interface_version());
    println!("description: {}", d.description);
    Ok(ExitCode::SUCCESS)
}
