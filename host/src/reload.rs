//! Reloading a running node's configuration: [`crate::Node::reload`],
//! [`crate::Node::reload_file`], `SIGHUP` to `comms run`, and `comms reload NODE` from an admin.
//!
//! What can change on a running node:
//!
//! - **a transport's plugin or its settings** (`[transports.NAME]`): the transport is replaced
//!   by a new instance, from the new plugin file if it names one; nothing queued or received is
//!   lost on the way (see the driver's `reload` module for how), and `comms status` shows the
//!   new plugin version;
//! - **transports added or removed** (a new `[transports.NAME]` table comes last in the
//!   preference order; a removed one is retired the same way as a replaced one);
//! - **the discovery** (`[discovery]`, static peers included): the new one is started and
//!   given this node's record, the old one closed.
//!
//! Everything else (the `[node]` settings, `[security]`, `[admin]`, `[metrics]`, the order of
//! the transports that stay) cannot change while the node runs: a reload that changes it is
//! refused as a whole, with one reason per key, and the node keeps running the configuration
//! it had. A reload changes nothing when the configuration is the same.
//!
//! Limits:
//!
//! - A plugin file is known by its path: to swap in a new build, install it under a new file
//!   name or directory and point the configuration at it. A file replaced at the same path is
//!   not loaded again (the dynamic loader hands back the library it has mapped), so a reload
//!   that finds a loaded plugin's file changed on disk (its size, modification time or inode) is
//!   refused with that reason; writing over a mapped library in place can crash the process.
//!   The same holds for each layer file of a transport's stack (a layer is compared with the one
//!   named at the same place in the stack before).
//! - A library is never unloaded (abi_stable's rule): each plugin file loaded stays mapped for
//!   the life of the process.
//! - A transport that wants the listen address of the one it replaces (the same fixed port)
//!   starts only after the old one is closed: peers reconnect with their backoff meanwhile, and
//!   this node's sends wait for the new instance (at most the close timeout, plus its start).

use crate::{spec::TransportSpec, static_discovery::StaticPeer};
use std::{fmt, path::PathBuf};

/// What a reload changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReloadReport {
    /// Transports started, by name.
    pub added: Vec<String>,
    /// Transports replaced by a new instance, by name.
    pub replaced: Vec<String>,
    /// Transports retired, by name.
    pub removed: Vec<String>,
    /// Whether the discovery was replaced.
    pub discovery_replaced: bool,
    /// What went wrong without undoing the reload (a retired transport that did not flush in
    /// time, say).
    pub warnings: Vec<String>,
}

impl ReloadReport {
    /// Whether the reload changed nothing.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.replaced.is_empty()
            && self.removed.is_empty()
            && !self.discovery_replaced
    }
}

impl fmt::Display for ReloadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return write!(f, "nothing changed");
        }
        let mut parts = Vec::new();
        let list = |names: &[String]| names.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ");
        if !self.replaced.is_empty() {
            parts.push(format!("replaced transport {}", list(&self.replaced)));
        }
        if !self.added.is_empty() {
            parts.push(format!("added transport {}", list(&self.added)));
        }
        if !self.removed.is_empty() {
            parts.push(format!("removed transport {}", list(&self.removed)));
        }
        if self.discovery_replaced {
            parts.push("replaced the discovery".to_string());
        }
        write!(f, "{}", parts.join("; "))?;
        for warning in &self.warnings {
            write!(f, "; warning: {warning}")?;
        }
        Ok(())
    }
}

/// A plugin as a configuration names it, in a form that can be compared.
#[derive(Debug, Clone)]
pub(crate) struct PluginSetup {
    /// The plugin's name, file, or (linked in code) name and version.
    pub(crate) plugin: String,
    pub(crate) config_toml: String,
    /// Transports only: each layer's plugin (as [`PluginSetup::plugin`]) and settings, outermost
    /// first.
    pub(crate) layers: Vec<(String, String)>,
    /// Transports only: each layer's library file as [`PluginSetup::file`], in the order of
    /// `layers`.
    pub(crate) layer_files: Vec<Option<PluginFile>>,
    /// Discovery only: the static peers.
    pub(crate) static_peers: Vec<StaticPeer>,
    /// The library file the plugin comes from, as it was on disk when the configuration was
    /// read; `None` for a plugin linked in code, or a file not found.
    pub(crate) file: Option<PluginFile>,
}

/// Two setups are the same configuration when they name the same plugin with the same
/// settings. The file's stamp is not compared: a changed file at the same path cannot be loaded
/// again, so [`plan`] refuses it instead of replacing the transport with the old library.
impl PartialEq for PluginSetup {
    fn eq(&self, other: &Self) -> bool {
        self.plugin == other.plugin
            && self.config_toml == other.config_toml
            && self.layers == other.layers
            && self.static_peers == other.static_peers
    }
}

/// A plugin library file and what identifies its contents on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PluginFile {
    pub(crate) path: PathBuf,
    /// Size, modification time and (on Unix) device and inode: a new build copied or renamed
    /// over the file changes at least one.
    pub(crate) stamp: (u64, Option<std::time::SystemTime>, u64, u64),
}

impl PluginFile {
    /// `path` as it is now; `None` if it cannot be read.
    pub(crate) fn at(path: &std::path::Path) -> Option<Self> {
        let metadata = std::fs::metadata(path).ok()?;
        #[cfg(unix)]
        let (device, inode) = {
            use std::os::unix::fs::MetadataExt;
            (metadata.dev(), metadata.ino())
        };
        #[cfg(not(unix))]
        let (device, inode) = (0, 0);
        Some(Self {
            path: path.to_path_buf(),
            stamp: (metadata.len(), metadata.modified().ok(), device, inode),
        })
    }
}

/// The configuration a node runs, as far as a reload compares it.
#[derive(Debug, Clone, Default)]
pub(crate) struct AppliedConfig {
    /// The file it came from, if any (`SIGHUP` and `comms reload` read it again).
    pub(crate) file: Option<PathBuf>,
    /// Settings that cannot change on a running node: the config key, and its value as text.
    pub(crate) fixed: Vec<(&'static str, String)>,
    /// The transports by name, in preference order.
    pub(crate) transports: Vec<(String, PluginSetup)>,
    /// The same transports as the builder had them (to start one again).
    pub(crate) specs: Vec<TransportSpec>,
    pub(crate) discovery: Option<PluginSetup>,
}

impl AppliedConfig {
    /// Records that transport `spec.name` now runs `spec` (appended if new).
    pub(crate) fn set_transport(&mut self, spec: TransportSpec, setup: Option<PluginSetup>) {
        if let Some(setup) = setup {
            match self.transports.iter_mut().find(|(name, _)| *name == spec.name) {
                Some(entry) => entry.1 = setup,
                None => self.transports.push((spec.name.clone(), setup)),
            }
        }
        match self.specs.iter_mut().find(|s| s.name == spec.name) {
            Some(entry) => *entry = spec,
            None => self.specs.push(spec),
        }
    }

    /// Records that transport `name` was removed.
    pub(crate) fn remove_transport(&mut self, name: &str) {
        self.transports.retain(|(n, _)| n != name);
        self.specs.retain(|s| s.name != name);
    }
}

/// What a reload does, worked out from the running configuration and the new one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ReloadPlan {
    pub(crate) add: Vec<String>,
    pub(crate) replace: Vec<String>,
    pub(crate) remove: Vec<String>,
    pub(crate) discovery: bool,
}

/// The plan, or every reason the new configuration cannot be applied live.
pub(crate) fn plan(running: &AppliedConfig, wanted: &AppliedConfig) -> Result<ReloadPlan, Vec<String>> {
    let mut refusals = Vec::new();
    for (key, value) in &wanted.fixed {
        let before = running.fixed.iter().find(|(k, _)| k == key).map(|(_, v)| v);
        if before != Some(value) {
            refusals.push(format!("key `{key}` cannot change on a running node (restart it to change it)"));
        }
    }
    let names = |config: &AppliedConfig| config.transports.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    let (before, after) = (names(running), names(wanted));
    if after.is_empty() {
        refusals.push("a node needs at least one transport: the new configuration has none".to_string());
    }
    let kept_before: Vec<&String> = before.iter().filter(|n| after.contains(n)).collect();
    let kept_after: Vec<&String> = after.iter().filter(|n| before.contains(n)).collect();
    if kept_before != kept_after {
        refusals.push(format!(
            "the order of the transports cannot change on a running node (it is {}, the new configuration says {})",
            quoted(&kept_before),
            quoted(&kept_after)
        ));
    }
    // Added transports come last in the preference order, so they must be last in the file.
    if let Some(first_added) = after.iter().position(|n| !before.contains(n)) {
        if after[first_added..].iter().any(|n| before.contains(n)) {
            refusals.push(format!(
                "transport `{}` is new: a running node adds transports last in the preference order, so list \
                 it after the ones it runs",
                after[first_added]
            ));
        }
    }
    let setup = |config: &AppliedConfig, name: &str| {
        config.transports.iter().find(|(n, _)| n == name).map(|(_, setup)| setup.clone())
    };
    let mut loaded_files = Vec::new();
    for name in &kept_after {
        let (Some(before), Some(after)) = (setup(running, name), setup(wanted, name)) else { continue };
        loaded_files.push((format!("transport `{name}`"), before.file.clone(), after.file.clone()));
        // A layer is the same plugin when it is named the same at the same place in the stack.
        for (index, (before_layer, after_layer)) in before.layers.iter().zip(&after.layers).enumerate() {
            if before_layer.0 == after_layer.0 {
                let file = |setup: &PluginSetup| setup.layer_files.get(index).cloned().flatten();
                let what = format!("layer `{}` of transport `{name}`", after_layer.0);
                loaded_files.push((what, file(&before), file(&after)));
            }
        }
    }
    let discovery_file = |config: &AppliedConfig| config.discovery.as_ref().and_then(|d| d.file.clone());
    loaded_files.push(("the discovery".to_string(), discovery_file(running), discovery_file(wanted)));
    for (what, before, after) in loaded_files {
        if let Some(path) = file_changed_in_place(before.as_ref(), after.as_ref()) {
            refusals.push(format!(
                "the plugin file {} of {what} changed on disk since the node loaded it: a running process cannot \
                 load a new build from the same path (the loader hands back the library it has mapped); install \
                 the new build under a new file name and name that file in the configuration",
                path.display()
            ));
        }
    }
    if !refusals.is_empty() {
        return Err(refusals);
    }
    Ok(ReloadPlan {
        add: after.iter().filter(|n| !before.contains(n)).cloned().collect(),
        replace: kept_after
            .iter()
            .filter(|n| setup(running, n) != setup(wanted, n))
            .map(|n| n.to_string())
            .collect(),
        remove: before.iter().filter(|n| !after.contains(n)).cloned().collect(),
        discovery: running.discovery != wanted.discovery,
    })
}

/// The path of a loaded plugin file that is named again but is no longer the file loaded.
fn file_changed_in_place<'a>(
    before: Option<&PluginFile>,
    after: Option<&'a PluginFile>,
) -> Option<&'a PathBuf> {
    let (before, after) = (before?, after?);
    (before.path == after.path && before.stamp != after.stamp).then_some(&after.path)
}

fn quoted(names: &[&String]) -> String {
    names.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(plugin: &str, config: &str) -> PluginSetup {
        PluginSetup {
            plugin: plugin.into(),
            config_toml: config.into(),
            layers: Vec::new(),
            layer_files: Vec::new(),
            static_peers: Vec::new(),
            file: None,
        }
    }

    fn config(transports: &[(&str, PluginSetup)]) -> AppliedConfig {
        AppliedConfig {
            file: None,
            fixed: vec![("node.id", "a".into()), ("node.codec", "Binary".into())],
            transports: transports.iter().map(|(n, s)| (n.to_string(), s.clone())).collect(),
            specs: Vec::new(),
            discovery: Some(setup("static", "")),
        }
    }

    #[test]
    fn the_same_configuration_changes_nothing() {
        let running = config(&[("tcp", setup("tcp", "listen = \"127.0.0.1:7001\""))]);
        assert_eq!(plan(&running, &running.clone()), Ok(ReloadPlan::default()));
    }

    #[test]
    fn a_new_plugin_file_or_new_settings_replace_the_transport() {
        let running = config(&[("tcp", setup("tcp", "")), ("redis", setup("redis", "url = \"a\""))]);
        let wanted = config(&[
            ("tcp", setup("/opt/v2/libcomms_tcp.so", "")),
            ("redis", setup("redis", "url = \"b\"")),
        ]);
        let plan = plan(&running, &wanted).expect("applies");
        assert_eq!(plan.replace, vec!["tcp", "redis"]);
        assert!(plan.add.is_empty() && plan.remove.is_empty() && !plan.discovery);
    }

    #[test]
    fn layers_count_as_a_change_of_the_transport() {
        let running = config(&[("tcp", setup("tcp", ""))]);
        let mut faulty = setup("tcp", "");
        faulty.layers = vec![("linked faults 0.1.0".into(), "drop = 0.5".into())];
        assert_eq!(plan(&running, &config(&[("tcp", faulty)])).expect("applies").replace, vec!["tcp"]);
    }

    #[test]
    fn a_layer_file_changed_at_the_same_path_is_refused() {
        let file =
            |size: u64| PluginFile { path: "/opt/libcomms_chunk.so".into(), stamp: (size, None, 1, 9) };
        let stacked = |size: u64| PluginSetup {
            layers: vec![("name compress".into(), String::new()), ("name chunk".into(), String::new())],
            layer_files: vec![None, Some(file(size))],
            ..setup("tcp", "")
        };
        let running = config(&[("tcp", stacked(100))]);
        assert_eq!(plan(&running, &config(&[("tcp", stacked(100))])), Ok(ReloadPlan::default()));
        let refused =
            plan(&running, &config(&[("tcp", stacked(120))])).expect_err("a rebuilt layer is refused");
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert!(
            refused[0]
                .contains("/opt/libcomms_chunk.so of layer `name chunk` of transport `tcp` changed on disk"),
            "{refused:?}"
        );
        // The layer removed from the stack: no longer loaded from that file, nothing to refuse.
        let mut without = stacked(120);
        without.layers.pop();
        without.layer_files.pop();
        assert_eq!(plan(&running, &config(&[("tcp", without)])).expect("applies").replace, vec!["tcp"]);
    }

    #[test]
    fn transports_are_added_last_and_removed() {
        let running = config(&[("tcp", setup("tcp", "")), ("udp", setup("udp", ""))]);
        let wanted = config(&[("tcp", setup("tcp", "")), ("redis", setup("redis", ""))]);
        let plan = plan(&running, &wanted).expect("applies");
        assert_eq!((plan.add, plan.remove), (vec!["redis".to_string()], vec!["udp".to_string()]));
        let first = config(&[("redis", setup("redis", "")), ("tcp", setup("tcp", ""))]);
        let refused = super::plan(&running, &first).expect_err("a new transport first is refused");
        assert!(refused[0].contains("`redis` is new"), "{refused:?}");
    }

    #[test]
    fn fixed_settings_order_and_an_empty_list_are_refused_with_one_reason_each() {
        let running = config(&[("tcp", setup("tcp", "")), ("udp", setup("udp", ""))]);
        let mut wanted = config(&[("udp", setup("udp", "")), ("tcp", setup("tcp", ""))]);
        wanted.fixed[1].1 = "Json".into();
        let refused = plan(&running, &wanted).expect_err("refused");
        assert_eq!(refused.len(), 2, "{refused:?}");
        assert!(refused[0].contains("key `node.codec` cannot change"), "{refused:?}");
        assert!(refused[1].contains("order of the transports"), "{refused:?}");
        let refused = plan(&running, &config(&[])).expect_err("refused");
        assert!(refused[0].contains("at least one transport"), "{refused:?}");
    }

    #[test]
    fn a_changed_discovery_or_static_peer_replaces_the_discovery() {
        let running = config(&[("tcp", setup("tcp", ""))]);
        let mut wanted = running.clone();
        let peer = StaticPeer {
            id: "b".into(),
            addresses: Default::default(),
            services: Vec::new(),
            topics: Vec::new(),
        };
        wanted.discovery.as_mut().expect("set").static_peers.push(peer);
        assert!(plan(&running, &wanted).expect("applies").discovery);
    }

    #[test]
    fn a_plugin_file_changed_at_the_same_path_is_refused_and_a_new_path_is_a_replacement() {
        let file = |path: &str, size: u64| PluginFile { path: path.into(), stamp: (size, None, 1, 7) };
        let with_file =
            |file: PluginFile| PluginSetup { file: Some(file), ..setup("file /opt/libcomms_tcp.so", "") };
        let running = config(&[("tcp", with_file(file("/opt/libcomms_tcp.so", 100)))]);
        assert_eq!(plan(&running, &running.clone()), Ok(ReloadPlan::default()));

        let rebuilt = config(&[("tcp", with_file(file("/opt/libcomms_tcp.so", 120)))]);
        let refused = plan(&running, &rebuilt).expect_err("a new build at the loaded path is refused");
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert!(
            refused[0].contains("/opt/libcomms_tcp.so of transport `tcp` changed on disk"),
            "{refused:?}"
        );
        assert!(refused[0].contains("new file name"), "{refused:?}");

        let elsewhere = PluginSetup {
            file: Some(file("/opt/v2/libcomms_tcp.so", 120)),
            ..setup("file /opt/v2/libcomms_tcp.so", "")
        };
        assert_eq!(plan(&running, &config(&[("tcp", elsewhere)])).expect("applies").replace, ["tcp"]);
        // A file that cannot be read now (uninstalled) is no reason to refuse.
        let gone = config(&[("tcp", PluginSetup { file: None, ..setup("file /opt/libcomms_tcp.so", "") })]);
        assert_eq!(plan(&running, &gone), Ok(ReloadPlan::default()));
    }

    #[test]
    fn the_report_says_what_changed() {
        let report =
            ReloadReport { replaced: vec!["tcp".into()], discovery_replaced: true, ..Default::default() };
        assert_eq!(report.to_string(), "replaced transport `tcp`; replaced the discovery");
        assert_eq!(ReloadReport::default().to_string(), "nothing changed");
    }
}
