//! A builder applied to a running node: the steps of [`crate::Node::reload`] (what they mean
//! is in [`crate::reload`]; how a transport is swapped, in the driver's `reload` module).

use super::{search_dirs, NodeBuilder};
use crate::{
    driver::{Attempt, Driver, StartFailure},
    error::ReloadError,
    plugin_search::find_plugin,
    reload::{AppliedConfig, PluginFile, PluginSetup, ReloadReport},
    spec::{PluginChoice, PluginSource, TransportSpec},
    static_discovery::STATIC_DISCOVERY,
};
use std::{path::PathBuf, sync::Arc};

/// How a configuration names a plugin, for comparing two configurations.
fn plugin_label(choice: &PluginChoice) -> String {
    match choice {
        PluginChoice::Source(PluginSource::Name(name)) => format!("name {name}"),
        PluginChoice::Source(PluginSource::Path(path)) => format!("file {}", path.display()),
        PluginChoice::Library(library) => {
            let description = library.description();
            match library.path() {
                Some(path) => format!("file {}", path.display()),
                None => format!("linked {} {}", description.name, description.version),
            }
        }
    }
}

/// The library file a plugin choice loads (looked up in `dirs` by name), as it is on disk now.
fn plugin_file(choice: &PluginChoice, dirs: &[PathBuf]) -> Option<PluginFile> {
    let path = match choice {
        PluginChoice::Source(PluginSource::Name(name)) => find_plugin(name, dirs)?,
        PluginChoice::Source(PluginSource::Path(path)) => path.clone(),
        PluginChoice::Library(library) => library.path()?.to_path_buf(),
    };
    PluginFile::at(&path)
}

fn transport_setup(spec: &TransportSpec, dirs: &[PathBuf]) -> PluginSetup {
    PluginSetup {
        plugin: plugin_label(&spec.plugin),
        config_toml: spec.config_toml.clone(),
        layers: spec
            .layers
            .iter()
            .map(|layer| (plugin_label(&layer.plugin), layer.config_toml.clone()))
            .collect(),
        layer_files: spec.layers.iter().map(|layer| plugin_file(&layer.plugin, dirs)).collect(),
        static_peers: Vec::new(),
        file: plugin_file(&spec.plugin, dirs),
    }
}

impl crate::Node {
    /// Applies the configuration of `builder` to this running node: transports added, removed
    /// or replaced (a new plugin file or new settings), the discovery replaced; nothing queued
    /// or received is lost on the way. Settings that cannot change live are refused with a
    /// reason each, and the node keeps running what it ran. See [`crate::reload`];
    /// [`crate::Node::reload_file`] reads a config file for it.
    ///
    /// ```no_run
    /// # async fn f(node: comms_host::Node) -> Result<(), Box<dyn std::error::Error>> {
    /// let report = node.reload(comms_host::config::load("node.toml".as_ref())?).await?;
    /// println!("{report}"); // e.g. "replaced transport `tcp`"
    /// # Ok(()) }
    /// ```
    pub async fn reload(&self, builder: NodeBuilder) -> Result<ReloadReport, ReloadError> {
        builder.apply_to(self.driver()).await
    }
}

impl NodeBuilder {
    /// The configuration as a reload compares it (taken before `build` changes anything).
    pub(crate) fn applied_config(&self) -> AppliedConfig {
        let s = &self.settings;
        let fixed = vec![
            ("node.id", self.id.to_string()),
            ("node.key_file", format!("{:?}", self.key_file)),
            ("node.identity (builder)", self.identity.is_some().to_string()),
            ("node.codec", format!("{:?}", s.codec)),
            ("node.receive_queue_capacity", s.receive_queue_capacity.to_string()),
            ("node.heartbeat_interval_ms", format!("{:?}", s.heartbeat_interval)),
            ("node.peer_timeout_ms", format!("{:?}", s.peer_timeout)),
            ("node.balancing", format!("{:?}", s.balancing)),
            (
                "node.request_timeout_ms, request_attempts, request_backoff_ms",
                format!("{:?}", s.request_options),
            ),
            ("node.close_timeout_ms", format!("{:?}", s.close_timeout)),
            ("node.relay", s.relay.to_string()),
            ("node.dedup_window", s.dedup_window.to_string()),
            ("node.plugin_dirs", format!("{:?}", self.plugin_dirs)),
            ("node.plugin_threads", self.plugin_threads.to_string()),
            ("security", format!("{:?}", self.security)),
            ("admin.keys", format!("{:?}", self.admin_keys)),
            ("metrics.listen", format!("{:?}", self.metrics_listen)),
        ];
        let dirs = search_dirs(&self.plugin_dirs);
        let discovery = match &self.discovery {
            Some((choice, config_toml)) => {
                (plugin_label(choice), config_toml.clone(), plugin_file(choice, &dirs))
            }
            None => (format!("name {STATIC_DISCOVERY}"), String::new(), None),
        };
        AppliedConfig {
            file: self.config_file.clone(),
            fixed,
            transports: self
                .transports
                .iter()
                .map(|spec| (spec.name.clone(), transport_setup(spec, &dirs)))
                .collect(),
            specs: self.transports.clone(),
            discovery: Some(PluginSetup {
                plugin: discovery.0,
                config_toml: discovery.1,
                layers: Vec::new(),
                layer_files: Vec::new(),
                static_peers: self.static_peers.clone(),
                file: discovery.2,
            }),
        }
    }

    /// Applies this configuration to the running node of `driver` (see [`crate::reload`]).
    pub(crate) async fn apply_to(mut self, driver: &Arc<Driver>) -> Result<ReloadReport, ReloadError> {
        // Held to the end: one reload at a time, each compared with what the last one applied.
        let mut applied = driver.applied.lock().await;
        if driver.check_open().is_err() {
            return Err(ReloadError::Closed);
        }
        let wanted = self.applied_config();
        let plan = crate::reload::plan(&applied, &wanted)
            .map_err(|reasons| ReloadError::Refused { file: self.config_file.clone(), reasons })?;
        let mut report = ReloadReport::default();
        if plan == Default::default() {
            return Ok(report);
        }
        self.settings.validate().map_err(crate::BuildError::InvalidSettings)?;
        let (link_table, _) = self.resolve_security()?;
        let link_table = link_table.as_ref();
        let dirs = search_dirs(&self.plugin_dirs);
        let failed = |step: String, reason: String, report: &ReloadReport| ReloadError::Failed {
            step,
            reason,
            applied: report.clone(),
        };
        let spec_of =
            |config: &AppliedConfig, name: &str| config.specs.iter().find(|s| s.name == name).cloned();
        for name in &plan.add {
            let Some(spec) = spec_of(&wanted, name) else { continue };
            let transport = self
                .start_transport(spec.clone(), &dirs, link_table)
                .await
                .map_err(|error| failed(format!("adding transport `{name}`"), error.to_string(), &report))?;
            driver
                .add_transport(transport)
                .await
                .map_err(|reason| failed(format!("adding transport `{name}`"), reason, &report))?;
            applied.set_transport(
                spec,
                wanted.transports.iter().find(|(n, _)| n == name).map(|(_, s)| s.clone()),
            );
            report.added.push(name.clone());
        }
        for name in &plan.replace {
            let (Some(old), Some(new)) = (spec_of(&applied, name), spec_of(&wanted, name)) else { continue };
            let Some(index) = driver.serving_index(name) else { continue };
            let this = &self;
            let start = |attempt: Attempt| {
                let spec = if attempt == Attempt::OldAgain { old.clone() } else { new.clone() };
                let dirs = &dirs;
                async move {
                    this.start_transport(spec, dirs, link_table).await.map_err(|error| StartFailure {
                        may_start_alone: matches!(error, crate::BuildError::Start { .. }),
                        reason: error.to_string(),
                    })
                }
            };
            let outcome = driver
                .replace_transport(index, start)
                .await
                .map_err(|reason| failed(format!("replacing transport `{name}`"), reason, &report))?;
            tracing::info!(transport = %name, started_beside_the_old_one = outcome.beside, "transport replaced");
            report.warnings.extend(outcome.retire_problem);
            applied.set_transport(
                new,
                wanted.transports.iter().find(|(n, _)| n == name).map(|(_, s)| s.clone()),
            );
            report.replaced.push(name.clone());
        }
        for name in &plan.remove {
            let Some(index) = driver.serving_index(name) else { continue };
            if let Err(problem) = driver.remove_transport(index).await {
                report.warnings.push(problem);
            }
            applied.remove_transport(name);
            report.removed.push(name.clone());
        }
        if plan.discovery {
            let (discovery, plugin) = self
                .new_discovery(&dirs, link_table)
                .await
                .map_err(|error| failed("replacing the discovery".into(), error.to_string(), &report))?;
            let peers = discovery.peers().await.map_err(|error| {
                failed("replacing the discovery".into(), format!("plugin `{plugin}`: {error}"), &report)
            })?;
            if let Err(problem) = driver.replace_discovery(discovery, peers).await {
                report.warnings.push(problem);
            }
            report.discovery_replaced = true;
        }
        *applied = wanted;
        tracing::info!(%report, "configuration reloaded");
        Ok(report)
    }
}
