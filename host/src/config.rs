//! The node config file.
//!
//! ```toml
//! [node]
//! id = "alice"                 # this node's id (a label when key_file is set: "alice-<public key>");
//!                              # 1 to 255 bytes, no control character
//! key_file = "alice.key"       # optional identity (`comms keygen`); relative to this file
//! codec = "binary"             # "binary" (default, compact) or "json"
//! plugin_dirs = ["plugins"]    # searched first; relative to this file
//! receive_queue_capacity = 1024
//! heartbeat_interval_ms = 1000 # 0 turns liveness off
//! peer_timeout_ms = 5000       # silence after which a peer is down
//! balancing = "least-outstanding"   # or "round-robin": how requests spread over replicas
//! request_timeout_ms = 5000    # per attempt
//! request_attempts = 3
//! request_backoff_ms = 50      # before the 2nd attempt; doubles
//! close_timeout_ms = 5000      # how long close waits for requests in flight, and flush for sends
//! relay = false                # forward messages for other nodes (a bridge between backends)
//! dedup_window = 0             # >0: drop repeats among the last N message ids (each message once)
//! plugin_threads = 0           # worker threads per plugin library (0: the plugin's default, 1 or 2)
//!
//! [transports.tcp]             # a transport named "tcp"; peers' addresses use this name
//! plugin = "tcp"               # optional, defaults to the table name (libcomms_tcp.so)
//! # path = "/opt/comms/libcomms_tcp.so"   # or an explicit file
//! listen = "127.0.0.1:7001"    # every other key is the plugin's own config
//! # layers = ["compress", { plugin = "chunk", part_size = 65536 }]   # outermost first; see docs/layers.md
//! # faults = { drop = 0.1, delay_ms = 5, jitter_ms = 5, duplicate = 0.01, reorder = 0.05, seed = 7 }
//! #                            # the built-in `faults` layer, under the others
//!
//! [security]                   # optional; see docs/security.md
//! links = "plain"              # or "noise": every transport must encrypt and authenticate links
//! allow = ["<public key>", "bob-<public key>"]   # or ["*"]: who may connect / send
//! network_key_file = "net.key" # optional shared network key (Noise links)
//! signatures = "off"           # "sign" or "require": end-to-end envelope signatures
//! max_clock_skew_ms = 300000   # signatures: how old / early a signed-at may be
//! replay_cache_size = 100000   # signatures: recent message ids remembered against replays
//!
//! [admin]                      # optional; see comms_host::admin
//! keys = ["<public key>"]      # who may shut this node down (needs signatures = "require")
//!
//! [metrics]                    # optional; see comms_host::metrics
//! listen = "127.0.0.1:9464"    # serve Prometheus metrics at http://127.0.0.1:9464/metrics
//!
//! [discovery]                  # optional; defaults to static discovery with no peers
//! plugin = "static"            # "static" is built in; any other name is a plugin
//! peers = [
//!   { id = "bob", addresses = { tcp = "127.0.0.1:7002" } },
//! ]
//! ```
//!
//! Every error names the file and the key: an unknown key, a wrong type, a plugin rejecting its
//! own table.

pub use crate::builder::PluginSource;
pub use crate::error::ConfigError;
use crate::{
    builder::NodeBuilder,
    codec::Codec,
    fault_injection::FaultConfig,
    request_response::{Balancing, RequestOptions},
    security::{Security, SignatureMode},
    spec::NodeSpec,
    static_discovery::STATIC_DISCOVERY,
};
use comms_plugin_api::{
    config::parse_config,
    security::{AllowList, LinkMode},
};
use serde::Deserialize;
use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    node: NodeSection,
    #[serde(default)]
    transports: toml::Table,
    #[serde(default)]
    discovery: toml::Table,
    #[serde(default)]
    security: SecuritySection,
    #[serde(default)]
    metrics: MetricsSection,
    #[serde(default)]
    admin: AdminSection,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AdminSection {
    #[serde(default)]
    keys: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MetricsSection {
    listen: Option<std::net::SocketAddr>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SecuritySection {
    #[serde(default)]
    links: LinkMode,
    #[serde(default)]
    allow: Vec<String>,
    network_key_file: Option<PathBuf>,
    #[serde(default)]
    signatures: SignatureMode,
    max_clock_skew_ms: Option<u64>,
    replay_cache_size: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeSection {
    id: Option<String>,
    key_file: Option<PathBuf>,
    #[serde(default)]
    codec: Codec,
    #[serde(default)]
    plugin_dirs: Vec<PathBuf>,
    receive_queue_capacity: Option<usize>,
    heartbeat_interval_ms: Option<u64>,
    peer_timeout_ms: Option<u64>,
    #[serde(default)]
    balancing: Balancing,
    request_timeout_ms: Option<u64>,
    request_attempts: Option<u32>,
    request_backoff_ms: Option<u64>,
    close_timeout_ms: Option<u64>,
    #[serde(default)]
    relay: bool,
    #[serde(default)]
    dedup_window: usize,
    #[serde(default)]
    plugin_threads: u32,
}

impl crate::Node {
    /// Builds the node a config file describes (see [`crate::config`]). Such a node reads the
    /// file again when an admin asks ([`crate::admin::RELOAD_SERVICE`]).
    pub async fn from_config(path: impl AsRef<Path>) -> Result<crate::Node, crate::BuildError> {
        let node = load(path.as_ref())?.build().await?;
        let reloader: crate::driver::Reloader = Arc::new(|driver| {
            Box::pin(async move {
                match reload_file(&driver, None).await {
                    Ok(report) => Ok(format!("node {} reloaded its config file: {report}", driver.id)),
                    Err(error) => Err(error.to_string()),
                }
            })
        });
        let _ = node.driver().reloader.set(reloader);
        Ok(node)
    }

    /// Reads config file `path` and applies it ([`crate::Node::reload`]); `None`: the file
    /// this node was built from, read again (what `SIGHUP` to `comms run` and `comms reload`
    /// do).
    pub async fn reload_file(&self, path: Option<&Path>) -> Result<crate::ReloadReport, crate::ReloadError> {
        reload_file(self.driver(), path).await
    }
}

/// Reads config file `path` (`None`: the one the node was built from) and applies it.
async fn reload_file(
    driver: &Arc<crate::driver::Driver>,
    path: Option<&Path>,
) -> Result<crate::ReloadReport, crate::ReloadError> {
    let path = match path {
        Some(path) => path.to_path_buf(),
        None => driver.applied.lock().await.file.clone().ok_or(crate::ReloadError::NoConfigFile)?,
    };
    let builder = load(&path).map_err(crate::BuildError::Config)?;
    builder.apply_to(driver).await
}

/// Reads `path` into a [`NodeBuilder`].
pub fn load(path: &Path) -> Result<NodeBuilder, ConfigError> {
    let error = |message: String| ConfigError { file: path.to_path_buf(), message };
    let text = std::fs::read_to_string(path).map_err(|e| error(format!("cannot read: {e}")))?;
    let file: ConfigFile = match toml::from_str::<toml::Table>(&text) {
        Err(syntax) => return Err(error(syntax.message().to_string() + &line_of(&text, syntax.span()))),
        Ok(_) => parse_config(&text).map_err(|e| error(e.message))?,
    };
    let base = path.parent().unwrap_or(Path::new("."));
    let absolute = |relative: &Path| {
        let joined = base.join(relative);
        std::path::absolute(&joined).unwrap_or(joined)
    };
    let label =
        match (&file.node.id, &file.node.key_file) {
            (Some(id), _) => id.clone(),
            (None, Some(_)) => String::new(),
            (None, None) => return Err(error(
                "key `node.id`: missing (give the node an id, or `node.key_file` to derive it from a key)"
                    .into(),
            )),
        };
    if file.node.id.is_some() {
        // Checked here too (the builder checks the id it ends up with), so that an explicit
        // `id = ""` is refused even with a key file.
        NodeSpec::validate_id(&label.as_str().into()).map_err(error)?;
    }
    let mut builder = NodeBuilder::new(label.as_str()).codec(file.node.codec).config_file(path);
    if let Some(key_file) = &file.node.key_file {
        builder = builder.key_file(absolute(key_file));
    }
    let section = &file.security;
    AllowList::parse(&section.allow, "security.allow").map_err(|e| error(e.message))?;
    if section.replay_cache_size == Some(0) {
        return Err(error("key `security.replay_cache_size`: must be at least 1".into()));
    }
    builder = builder.security(Security {
        links: section.links,
        allow: section.allow.clone(),
        network_key_file: section.network_key_file.as_deref().map(absolute),
        signatures: section.signatures,
        max_clock_skew: section
            .max_clock_skew_ms
            .map(std::time::Duration::from_millis)
            .unwrap_or(crate::security::DEFAULT_MAX_CLOCK_SKEW),
        replay_cache_size: section.replay_cache_size.unwrap_or(crate::security::DEFAULT_REPLAY_CACHE_SIZE),
    });
    builder = builder.admin_keys(file.admin.keys.iter().cloned());
    if let Some(address) = file.metrics.listen {
        builder = builder.metrics_listen(address);
    }
    for dir in &file.node.plugin_dirs {
        builder = builder.plugin_dir(base.join(dir));
    }
    if let Some(capacity) = file.node.receive_queue_capacity {
        builder = builder.receive_queue_capacity(capacity);
    }
    let node = &file.node;
    let defaults = RequestOptions::default();
    let millis = std::time::Duration::from_millis;
    let default_heartbeat = crate::builder::DEFAULT_HEARTBEAT_INTERVAL.as_millis() as u64;
    let heartbeat = millis(node.heartbeat_interval_ms.unwrap_or(default_heartbeat));
    let peer_timeout = node.peer_timeout_ms.map(millis).unwrap_or(crate::builder::DEFAULT_PEER_TIMEOUT);
    builder = builder.liveness(Some(heartbeat), peer_timeout).balancing(node.balancing).request_options(
        RequestOptions {
            timeout: node.request_timeout_ms.map(millis).unwrap_or(defaults.timeout),
            attempts: node.request_attempts.unwrap_or(defaults.attempts),
            backoff: node.request_backoff_ms.map(millis).unwrap_or(defaults.backoff),
        },
    );
    builder = builder.relay(node.relay).dedup_window(node.dedup_window).plugin_threads(node.plugin_threads);
    // The same check the builder makes, here so that the error names the file.
    builder.settings().validate().map_err(error)?;
    if let Some(close) = node.close_timeout_ms {
        builder = builder.close_timeout(millis(close));
    }
    for (name, value) in file.transports {
        let toml::Value::Table(table) = value else {
            return Err(error(format!("key `transports.{name}`: must be a table like [transports.{name}]")));
        };
        let at = format!("transports.{name}");
        let mut table = table;
        let layers = match table.remove("layers") {
            None => Vec::new(),
            Some(value) => layer_entries(value, base, &at).map_err(error)?,
        };
        let faults = match table.remove("faults") {
            None => None,
            Some(value) => Some(fault_config(value, &at).map_err(error)?),
        };
        let (source, config) = split_plugin_keys(table, &name, base, &at).map_err(error)?;
        builder = builder.transport_from(name, source, config);
        for (source, config) in layers {
            builder = builder.layer_from(source, config);
        }
        if let Some(faults) = faults {
            builder = builder.faults(faults);
        }
    }
    let (source, config) =
        split_plugin_keys(file.discovery, STATIC_DISCOVERY, base, "discovery").map_err(error)?;
    builder = builder.discovery_from(source, config);
    Ok(builder)
}

/// The entries of a transport's `layers` key: a plugin name, or a table with `plugin` or `path`
/// and the layer's own keys.
pub(crate) fn layer_entries(
    value: toml::Value,
    base: &Path,
    at: &str,
) -> Result<Vec<(PluginSource, String)>, String> {
    let toml::Value::Array(entries) = value else {
        return Err(format!(
            "key `{at}.layers`: expected a list like [\"compress\", {{ plugin = \"chunk\" }}], found {}",
            value.type_str()
        ));
    };
    let mut layers = Vec::with_capacity(entries.len());
    for (position, entry) in entries.into_iter().enumerate() {
        let entry_at = format!("{at}.layers[{position}]");
        layers.push(match entry {
            toml::Value::String(name) => (PluginSource::Name(name), String::new()),
            toml::Value::Table(table) => {
                if !table.contains_key("plugin") && !table.contains_key("path") {
                    return Err(format!(
                        "key `{entry_at}.plugin`: missing (name the layer's plugin, or give `path`)"
                    ));
                }
                split_plugin_keys(table, "", base, &entry_at)?
            }
            other => {
                return Err(format!(
                    "key `{entry_at}`: expected a plugin name or a table, found {}",
                    other.type_str()
                ))
            }
        });
    }
    Ok(layers)
}

/// A transport's `faults` key: the settings of the built-in fault-injection layer, checked here
/// so that an error names the key and the file.
fn fault_config(value: toml::Value, at: &str) -> Result<FaultConfig, String> {
    let text = match value {
        toml::Value::Table(table) => {
            toml::to_string(&table).map_err(|e| format!("key `{at}.faults`: {e}"))?
        }
        other => {
            return Err(format!(
                "key `{at}.faults`: expected a table like {{ drop = 0.1 }}, found {}",
                other.type_str()
            ))
        }
    };
    let faults: FaultConfig = parse_config(&text).map_err(|e| format!("key `{at}.faults`: {}", e.message))?;
    // The layer names its keys relative to its table: `key `drop`: ...`.
    faults.validate().map_err(|message| match message.strip_prefix("key `") {
        Some(rest) => format!("key `{at}.faults.{rest}"),
        None => format!("key `{at}.faults`: {message}"),
    })?;
    Ok(faults)
}

/// Takes the host's own keys (`plugin`, `path`) out of a plugin table; the rest is the plugin's.
fn split_plugin_keys(
    mut table: toml::Table,
    default_name: &str,
    base: &Path,
    at: &str,
) -> Result<(PluginSource, String), String> {
    let text_key = |table: &mut toml::Table, key: &str| match table.remove(key) {
        None => Ok(None),
        Some(toml::Value::String(text)) => Ok(Some(text)),
        Some(other) => Err(format!("key `{at}.{key}`: expected a string, found {}", other.type_str())),
    };
    let plugin = text_key(&mut table, "plugin")?;
    let path = text_key(&mut table, "path")?;
    let source = match (plugin, path) {
        (Some(_), Some(_)) => return Err(format!("keys `{at}.plugin` and `{at}.path`: give one, not both")),
        (_, Some(path)) => PluginSource::Path(base.join(path)),
        (Some(name), None) => PluginSource::Name(name),
        (None, None) => PluginSource::Name(default_name.to_string()),
    };
    let config = toml::to_string(&table).map_err(|e| format!("table `{at}`: {e}"))?;
    Ok((source, config))
}

fn line_of(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    match span {
        Some(span) => format!(" (line {})", text[..span.start.min(text.len())].lines().count().max(1)),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, text: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!("comms-config-{}-{name}.toml", std::process::id()));
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn unknown_node_key_names_key_and_file() {
        let path = write("unknown", "[node]\nid = \"a\"\nidd = \"b\"\n");
        let error = load(&path).unwrap_err();
        let text = error.to_string();
        assert!(text.contains("`idd`"), "{text}");
        assert!(text.contains(&path.display().to_string()), "{text}");
    }

    #[test]
    fn mistyped_key_names_the_key() {
        let path = write("mistyped", "[node]\nid = 5\n");
        let text = load(&path).unwrap_err().to_string();
        assert!(text.contains("node.id"), "{text}");
    }

    #[test]
    fn syntax_error_names_the_line() {
        let path = write("syntax", "[node]\nid = \"a\"\nbroken = \n");
        let text = load(&path).unwrap_err().to_string();
        assert!(text.contains("line 3"), "{text}");
    }

    #[test]
    fn a_metrics_address_that_is_not_one_names_the_key() {
        let path = write("metrics", "[node]\nid = \"a\"\n[metrics]\nlisten = \"localhost\"\n");
        let text = load(&path).unwrap_err().to_string();
        assert!(text.contains("metrics.listen"), "{text}");
        assert!(text.contains(&path.display().to_string()), "{text}");
    }

    #[test]
    fn plugin_and_path_keys_are_the_hosts() {
        let mut table = toml::Table::new();
        table.insert("path".into(), "lib/libcomms_x.so".into());
        table.insert("listen".into(), "127.0.0.1:1".into());
        let (source, config) =
            split_plugin_keys(table, "x", Path::new("/etc/comms"), "transports.x").unwrap();
        assert_eq!(source, PluginSource::Path(PathBuf::from("/etc/comms/lib/libcomms_x.so")));
        assert_eq!(config.trim(), "listen = \"127.0.0.1:1\"");
    }
}
