//! `comms plugins new NAME [--dir DIR] [--plugin-api PATH]`: a new plugin crate from the
//! template in `host/templates/plugin/`.
//!
//! The crate is `comms-NAME` (library `comms_NAME`, so the host finds it as `libcomms_NAME.so`),
//! a `cdylib` with a `[workspace]` table of its own, depending on comms-plugin-api by path: by
//! default the plugin-api of the comms checkout this binary was built from. It holds an
//! in-process transport that passes `comms check` as generated, and a README on building,
//! checking and shipping it. Nothing is overwritten: an existing `DIR` is refused.

use super::{other, CliError};
use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

/// The template's files: (path in the new crate, text with `{{placeholders}}`).
const TEMPLATE: [(&str, &str); 4] = [
    ("Cargo.toml", include_str!("../../templates/plugin/Cargo.toml.tmpl")),
    ("src/lib.rs", include_str!("../../templates/plugin/src/lib.rs.tmpl")),
    ("README.md", include_str!("../../templates/plugin/README.md.tmpl")),
    (".gitignore", include_str!("../../templates/plugin/gitignore.tmpl")),
];

/// The plugin-api of the checkout this binary was built from.
fn default_plugin_api() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugin-api")
}

pub(super) fn run(name: &str, dir: Option<&Path>, plugin_api: Option<&Path>) -> Result<ExitCode, CliError> {
    check_name(name).map_err(other)?;
    let dir = dir.map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from(format!("comms-{name}")));
    if dir.exists() || dir.symlink_metadata().is_ok() {
        return Err(other(format!(
            "{} already exists; choose another directory with --dir (nothing was written)",
            dir.display()
        )));
    }
    let plugin_api = find_plugin_api(plugin_api)?;
    let files = render(name, &plugin_api);
    for (path, text) in &files {
        let path = dir.join(path);
        let parent = path.parent().unwrap_or(&dir);
        std::fs::create_dir_all(parent)
            .and_then(|()| std::fs::write(&path, text))
            .map_err(|error| other(format!("cannot write {}: {error}", path.display())))?;
    }
    let lib = library_name(name);
    println!("created plugin crate comms-{name} in {}", dir.display());
    println!("  depends on comms-plugin-api at {}", plugin_api.display());
    println!("next:");
    println!("  cd {}", dir.display());
    println!("  cargo build");
    println!("  comms check target/debug/lib{lib}.so");
    Ok(ExitCode::SUCCESS)
}

/// A plugin name: lowercase letters, digits, `-` and `_`, starting with a letter; it becomes
/// the crate name `comms-NAME`, the library `comms_NAME` and the config table
/// `[transports.NAME]`.
fn check_name(name: &str) -> Result<(), String> {
    let valid = name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    match valid {
        true => Ok(()),
        false => Err(format!(
            "invalid plugin name `{name}`: use lowercase letters, digits, `-` and `_`, starting with a letter \
             (at most 64 characters), e.g. `my-transport`"
        )),
    }
}

/// `comms_NAME` with `-` as `_`, as cargo names the library (and the host looks for it).
fn library_name(name: &str) -> String {
    format!("comms_{}", name.replace('-', "_"))
}

/// `my-fast_udp` -> `MyFastUdp`: the prefix of the template's type names.
fn type_prefix(name: &str) -> String {
    name.split(['-', '_'])
        .filter(|part| !part.is_empty())
        .map(|part| {
            let mut chars = part.chars();
            chars
                .next()
                .map(|first| first.to_ascii_uppercase().to_string() + chars.as_str())
                .unwrap_or_default()
        })
        .collect()
}

/// The plugin-api directory, absolute, checked to be comms-plugin-api.
fn find_plugin_api(given: Option<&Path>) -> Result<PathBuf, CliError> {
    let (path, hint) = match given {
        Some(path) => (path.to_path_buf(), "--plugin-api"),
        None => (
            default_plugin_api(),
            "the comms checkout this binary was built from; pass --plugin-api PATH to its plugin-api/",
        ),
    };
    let manifest = path.join("Cargo.toml");
    let text = std::fs::read_to_string(&manifest)
        .map_err(|error| other(format!("no comms-plugin-api at {} ({hint}): {error}", path.display())))?;
    let is_plugin_api = text
        .parse::<toml::Table>()
        .ok()
        .and_then(|table| table.get("package")?.get("name")?.as_str().map(|name| name == "comms-plugin-api"))
        .unwrap_or(false);
    if !is_plugin_api {
        return Err(other(format!("{} is not the comms-plugin-api crate ({hint})", manifest.display())));
    }
    std::fs::canonicalize(&path).map_err(|error| other(format!("{}: {error}", path.display())))
}

/// The template's files with every placeholder replaced.
fn render(name: &str, plugin_api: &Path) -> Vec<(&'static str, String)> {
    let mut dependency = toml::Table::new();
    dependency.insert("path".into(), plugin_api.display().to_string().into());
    // An inline table: `{ path = "..." }`, quoted as TOML quotes it.
    let dependency = toml::Value::Table(dependency).to_string();
    let values = [
        ("{{name}}", name.to_string()),
        ("{{crate}}", format!("comms-{name}")),
        ("{{lib}}", library_name(name)),
        ("{{Type}}", type_prefix(name)),
        ("{{plugin_api_dependency}}", dependency),
        ("{{comms_version}}", env!("CARGO_PKG_VERSION").to_string()),
        ("{{interface_version}}", comms_plugin_api::INTERFACE_VERSION.to_string()),
    ];
    TEMPLATE
        .iter()
        .map(|(path, template)| {
            let text =
                values.iter().fold(template.to_string(), |text, (key, value)| text.replace(key, value));
            (*path, text)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for good in ["udp", "my-transport", "x2_fast", "a"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in ["", "My", "9p", "-x", "a b", "a/b", "über", "a.b", &"a".repeat(65)] {
            let error = check_name(bad).unwrap_err();
            assert!(error.contains(&format!("`{bad}`")), "{error}");
        }
    }

    #[test]
    fn names_become_crate_library_and_type_names() {
        assert_eq!(library_name("my-fast_udp"), "comms_my_fast_udp");
        assert_eq!(type_prefix("my-fast_udp"), "MyFastUdp");
        assert_eq!(type_prefix("x2"), "X2");
    }

    #[test]
    fn every_placeholder_is_filled() {
        let files = render("my-probe", Path::new("/some where/\"quoted\"/plugin-api"));
        assert_eq!(files.len(), TEMPLATE.len());
        for (path, text) in &files {
            assert!(!text.contains("{{") && !text.contains("}}"), "{path}: a placeholder is left");
        }
        let manifest: toml::Table = files[0].1.parse().expect("Cargo.toml is TOML");
        assert_eq!(manifest["package"]["name"].as_str(), Some("comms-my-probe"));
        assert!(manifest.contains_key("workspace"), "a workspace of its own");
        let path = manifest["dependencies"]["comms-plugin-api"]["path"].as_str();
        assert_eq!(path, Some("/some where/\"quoted\"/plugin-api"));
        assert!(files[1].1.contains("pub struct MyProbePlugin;"));
    }

    #[test]
    fn the_default_plugin_api_is_this_checkouts() {
        let path = find_plugin_api(None).unwrap();
        assert!(path.is_absolute() && path.ends_with("plugin-api"), "{}", path.display());
        let error = find_plugin_api(Some(Path::new(env!("CARGO_MANIFEST_DIR")))).unwrap_err();
        assert!(error.to_string().contains("is not the comms-plugin-api crate"), "{error}");
    }

    #[test]
    fn an_existing_directory_is_never_touched() {
        let dir = std::env::temp_dir().join(format!("comms-new-plugin-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let error = run("probe", Some(&dir), None).unwrap_err();
        assert!(error.to_string().contains("already exists"), "{error}");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        std::fs::remove_dir(&dir).unwrap();
    }
}
