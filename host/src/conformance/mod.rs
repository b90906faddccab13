//! The conformance suite: one set of cases every transport plugin must pass.
//!
//! It runs against a [`PluginLibrary`] (a loaded `.so` or a plugin linked into the program) and
//! the plugin's config table as TOML text, exactly as `comms check FILE [--config F]` does and as
//! the workspace's tests do for every in-tree backend:
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use comms_host::{conformance, PluginLibrary};
//!
//! let library = PluginLibrary::load("target/debug/libcomms_tcp.so".as_ref())?;
//! let report = conformance::run_suite(&library, &conformance::SuiteConfig::default()).await;
//! print!("{report}"); // `PASS name` / `FAIL name: reason` / `SKIP name: reason`, then a summary
//! assert!(report.passed());
//! # Ok(()) }
//! ```
//!
//! ## What a plugin must allow
//!
//! Every case creates its own transport instances with the same config text, several at once
//! (up to 50), each for a node id never used before (short, made of `[a-z0-9-]`). The plugin's
//! config must therefore allow many instances side by side: listen on port 0, derive a socket
//! path from the node id, and so on. Each case closes every instance it opened, also when it
//! fails or times out.
//!
//! ## Cases
//!
//! [`cases()`] lists them with the capabilities each needs, and [`case_table()`] (printed by
//! `comms check --list`) as a Markdown table; a case whose capability the transport does not
//! declare is reported as skipped with the reason (`needs capability acknowledgements`). Every
//! capability a plugin can declare turns on at least one case of its own (ordered:
//! `order_per_sender`; acknowledgements: `redelivery_after_reject`; durable: `durable_resume`;
//! reliable: `reliable_delivery`; native topics: `topic_isolation`, `topic_fan_out`; encrypted:
//! `encrypted_links`), and [`SuiteConfig::assume`] runs a capability's cases before the plugin
//! declares it. `create_transport` always runs first (the others depend on it) and reads the
//! capabilities from the first instance. Messages go point to point with
//! `send(address, envelope)`, `address` being the receiver's
//! [`TransportInfo::local_address`](comms_plugin_api::TransportInfo); topic messages go with an
//! empty address. Cases run one after the other.
//!
//! ## A plugin that blocks the host's thread
//!
//! The host times every poll of a plugin future
//! ([`poll_watch`](comms_plugin_api::host_side::poll_watch)). While a case runs, the suite looks
//! at those timings; a poll that held the thread for [`SuiteConfig::blocking_poll_limit`] (500 ms
//! by default) ends the case at once, failing it with the poll watch's words (`plugin spool
//! blocked a thread for 5.0 s in receive: use tokio::time or spawn_blocking`), the cases after
//! it are not run, and the last case, `no_blocking_polls`, fails with the same words. Shorter
//! polls over the host's 100 ms logging threshold are only noted there: a busy machine holds a
//! thread that long by itself now and then.
//!
//! ## Encrypted links
//!
//! [`SuiteConfig::with_noise_links`] runs the same cases with Noise links, as a node with
//! `[security] links = "noise"` would: the transport must then declare
//! [`Capabilities::ENCRYPTED`](comms_plugin_api::Capabilities::ENCRYPTED) (`create_transport`
//! fails otherwise), and the node ids are `<name>-<hex of the key>` (about 85 characters).
//!
//! ## Limits of what it proves
//!
//! - Every case has a time limit ([`SuiteConfig::case_timeout`]); waits for messages end at 80%
//!   of it so that a failure can say what was missing. A correct transport on one machine needs
//!   a small fraction of the default 30 s.
//! - "Nothing else arrives" is checked by waiting [`QUIET_PERIOD`]: a message delivered later
//!   than that goes unnoticed.
//! - The suite talks to the transport through its contract only: it cannot inject malformed
//!   bytes or restart a broker, and it checks only that a send to a dead address returns or
//!   queues without blocking other traffic, not that the message is eventually reported lost.
//!   For addresses of the form `ip:port` it puts a loopback relay (TCP and UDP) between two
//!   instances, to cut the link (`reliable_delivery`) and to look for payloads in the clear
//!   (`encrypted_links`); other addresses skip those parts, with a note saying so.
//! - A blocking poll is seen when it ends: a plugin that blocks a thread for ever is caught by
//!   the case time limit only, and only when the runtime has another thread to run the suite.

mod cases;
mod harness;
mod relay;
mod report;
mod runner;

#[cfg(test)]
mod reference_transport;

pub use report::{CaseOutcome, CaseReport, SuiteReport};
pub use runner::{case_table, cases, run_suite, run_suite_with_progress, CaseDescription};

use crate::spec::PluginSource;
use comms_plugin_api::{
    host_side::PluginLibrary,
    security::{Identity, LinkMode, LinkSecurityConfig, PublicKey},
    Capabilities,
};
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

/// How long a case waits to make sure that nothing (more) arrives.
pub const QUIET_PERIOD: Duration = Duration::from_millis(500);

/// Default of [`SuiteConfig::blocking_poll_limit`].
pub const BLOCKING_POLL_LIMIT: Duration = Duration::from_millis(500);

/// How to run the suite.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SuiteConfig {
    /// The plugin's own config table as TOML text (what would be under `[transports.NAME]`),
    /// used for every transport instance; empty for the plugin's defaults.
    pub config_toml: String,
    /// Time limit of one case, and separately of closing what it opened. A case that takes
    /// longer fails with a reason saying so.
    pub case_timeout: Duration,
    /// Runs only the cases whose name contains this text (`create_transport` always runs).
    pub filter: Option<String>,
    /// When set, every node id the suite makes is bound to this key (`<name>-<hex>`), as a
    /// transport with encrypted links requires of the nodes it connects. Set by
    /// [`SuiteConfig::with_noise_links`].
    pub node_key: Option<PublicKey>,
    /// Capabilities to check as if the transport declared them: a plugin author can see
    /// whether a transport would pass a capability's cases before declaring it.
    pub assume: Capabilities,
    /// A poll of a plugin future that holds the host's thread this long fails the suite
    /// (`no_blocking_polls`) and stops it early; shorter ones over the host's logging threshold
    /// ([`BLOCKING_POLL`](comms_plugin_api::host_side::poll_watch::BLOCKING_POLL), 100 ms) are
    /// only noted, because a busy machine can hold a thread that long by itself.
    pub blocking_poll_limit: Duration,
    /// Layers stacked over every transport instance, the outermost first: the suite then checks
    /// the stack as the node would use it (`layers` in `comms check --config`).
    pub layers: Vec<SuiteLayer>,
}

/// A layer of [`SuiteConfig::layers`]: its library and its own config text.
#[derive(Debug, Clone)]
pub struct SuiteLayer {
    /// The layer's plugin library.
    pub library: PluginLibrary,
    /// Its config table as TOML text.
    pub config_toml: String,
}

/// The same library (file, or name and version when linked) with the same settings.
impl PartialEq for SuiteLayer {
    fn eq(&self, other: &Self) -> bool {
        let identity = |layer: &Self| {
            let description = layer.library.description();
            (
                layer.library.path().map(Path::to_path_buf),
                description.name.clone(),
                description.version.clone(),
            )
        };
        identity(self) == identity(other) && self.config_toml == other.config_toml
    }
}

impl Eq for SuiteLayer {}

impl SuiteConfig {
    /// The default config with the given plugin config text.
    pub fn new(config_toml: impl Into<String>) -> Self {
        Self { config_toml: config_toml.into(), ..Self::default() }
    }

    /// The suite over encrypted links: every instance gets the link security the host would
    /// give it with `[security] links = "noise"` and the identity in `key_file` (allowing only
    /// that key: the suite's nodes all share it), and every node id the suite makes is bound to
    /// that key. `comms check FILE --key-file K` runs this. Errors name the key file, or say
    /// what is wrong with the config text.
    pub fn with_noise_links(mut self, key_file: &Path) -> Result<Self, String> {
        let identity = Identity::load(key_file).map_err(|error| error.to_string())?;
        let config = LinkSecurityConfig {
            links: LinkMode::Noise,
            key_file: Some(key_file.to_path_buf()),
            allow: vec![identity.public_key().to_hex()],
            network_key_file: None,
        };
        let table = crate::security::link_security_table(&config);
        self.config_toml = crate::security::with_link_security(&self.config_toml, &table)
            .map_err(|message| format!("plugin config: {message}"))?;
        self.node_key = Some(identity.public_key());
        Ok(self)
    }

    /// Takes a `layers` key out of the plugin config text, in the syntax of a node's transport
    /// table (`layers = ["compress", { path = "libcomms_chunk.so", part_size = 65536 }]`), and
    /// loads those layers into [`SuiteConfig::layers`]: `comms check` on a stack. Names are
    /// looked for in `plugin_dirs` and the default plugin directories (`"faults"` is built in),
    /// relative paths are taken from `base`. Errors name the key and the file or name that
    /// could not be loaded.
    pub fn with_layers_from_config(mut self, base: &Path, plugin_dirs: &[PathBuf]) -> Result<Self, String> {
        let mut table: toml::Table = toml::from_str(&self.config_toml)
            .map_err(|error| format!("plugin config: {}", error.message()))?;
        let Some(value) = table.remove("layers") else { return Ok(self) };
        let dirs = crate::plugin_search::search_dirs(plugin_dirs);
        for (position, (source, config_toml)) in crate::config::layer_entries(value, base, "check")
            .map_err(|message| message.replace("check.", ""))?
            .into_iter()
            .enumerate()
        {
            let library = match source {
                PluginSource::Name(name) if name == crate::spec::FAULTS_LAYER => {
                    crate::fault_injection::library()
                }
                PluginSource::Name(name) => {
                    let path = crate::plugin_search::find_plugin(&name, &dirs).ok_or_else(|| {
                        format!(
                            "key `layers[{position}]`: no plugin `{name}` ({}) in {}",
                            crate::plugin_search::plugin_file_name(&name),
                            dirs.iter().map(|dir| dir.display().to_string()).collect::<Vec<_>>().join(", ")
                        )
                    })?;
                    PluginLibrary::load(&path)
                        .map_err(|error| format!("key `layers[{position}]`: {error}"))?
                }
                PluginSource::Path(path) => PluginLibrary::load(&path)
                    .map_err(|error| format!("key `layers[{position}]`: {error}"))?,
            };
            self.layers.push(SuiteLayer { library, config_toml });
        }
        self.config_toml = toml::to_string(&table).map_err(|error| format!("plugin config: {error}"))?;
        Ok(self)
    }

    /// Whether the case called `name` is selected by [`SuiteConfig::filter`].
    pub fn selects(&self, name: &str) -> bool {
        self.filter.as_deref().is_none_or(|filter| name.contains(filter))
    }
}

impl Default for SuiteConfig {
    /// Empty plugin config, 30 s per case, every case, nothing assumed, polls may hold a
    /// thread up to [`BLOCKING_POLL_LIMIT`].
    fn default() -> Self {
        Self {
            config_toml: String::new(),
            case_timeout: Duration::from_secs(30),
            filter: None,
            node_key: None,
            assume: Capabilities::NONE,
            blocking_poll_limit: BLOCKING_POLL_LIMIT,
            layers: Vec::new(),
        }
    }
}
