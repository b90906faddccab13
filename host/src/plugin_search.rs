//! Finding plugin libraries by name.
//!
//! A plugin called `tcp` lives in a file called `libcomms_tcp.so` (`libcomms_tcp.dylib` on macOS,
//! `comms_tcp.dll` on Windows); dashes in the name become underscores, as cargo names them.
//! Directories are searched in this order: the ones the config names, the ones in
//! `$COMMS_PLUGIN_PATH` (separated like `PATH`), the directory of the running executable.

use std::{
    env::consts::{DLL_PREFIX, DLL_SUFFIX},
    path::{Path, PathBuf},
};

/// Environment variable with extra plugin directories.
pub const PLUGIN_PATH_VARIABLE: &str = "COMMS_PLUGIN_PATH";

/// The file name of plugin `name` on this platform.
pub fn plugin_file_name(name: &str) -> String {
    format!("{DLL_PREFIX}comms_{}{DLL_SUFFIX}", name.replace('-', "_"))
}

/// The directories searched for plugins, given the configured ones (in this order, deduplicated).
pub fn search_dirs(configured: &[PathBuf]) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = configured.to_vec();
    if let Some(paths) = std::env::var_os(PLUGIN_PATH_VARIABLE) {
        dirs.extend(std::env::split_paths(&paths).filter(|p| !p.as_os_str().is_empty()));
    }
    if let Some(exe_dir) = std::env::current_exe().ok().and_then(|exe| exe.parent().map(Path::to_path_buf)) {
        dirs.push(exe_dir);
    }
    let mut unique = Vec::new();
    for dir in dirs {
        if !unique.contains(&dir) {
            unique.push(dir);
        }
    }
    unique
}

/// The first file for plugin `name` in `dirs`.
pub fn find_plugin(name: &str, dirs: &[PathBuf]) -> Option<PathBuf> {
    let file = plugin_file_name(name);
    dirs.iter().map(|dir| dir.join(&file)).find(|path| path.is_file())
}

/// Every file in `dir` named like a comms plugin, sorted.
pub fn plugin_files_in(dir: &Path) -> Vec<PathBuf> {
    let prefix = format!("{DLL_PREFIX}comms_");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| {
            path.is_file()
                && path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(DLL_SUFFIX))
        })
        .collect();
    files.sort();
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_follow_cargo() {
        let name = plugin_file_name("fixture-panicking");
        assert!(name.contains("comms_fixture_panicking"), "{name}");
        assert!(name.ends_with(DLL_SUFFIX));
    }

    #[test]
    fn configured_dirs_come_first_and_found_files_are_returned() {
        let dir = std::env::temp_dir().join(format!("comms-search-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(plugin_file_name("demo")), b"").unwrap();
        let dirs = search_dirs(std::slice::from_ref(&dir));
        assert_eq!(dirs[0], dir);
        assert_eq!(find_plugin("demo", &dirs), Some(dir.join(plugin_file_name("demo"))));
        assert_eq!(find_plugin("absent", &dirs), None);
        assert_eq!(plugin_files_in(&dir), vec![dir.join(plugin_file_name("demo"))]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
