//! Host side of the boundary: loading plugin libraries and calling into them with idiomatic types.
//!
//! The comms host uses this module; plugin authors do not need it. It is here, next to the
//! plugin-side adapters, so that every `abi_stable` type stays inside comms-core and this crate.
//!
//! Loading checks, in order: the file exists; it is a shared library exporting an `abi_stable`
//! root module; its interface version matches [`comms_core::INTERFACE_VERSION`] (0.x: same
//! minor); the layout of every type reachable from the root module matches. Each failure is a
//! [`LoadError`] whose `Display` is one sentence naming the file; [`LoadError::details`] keeps
//! the long form. Libraries are never unloaded (abi_stable leaks them by design).

use crate::{
    export::plugin_module, Envelope, Inbound, NodeId, NodeRecord, PeerEvent, Plugin, PluginDescription,
    PluginError, Provides, TransportInfo,
};
use comms_core::{
    abi_stable::{
        library::{lib_header_from_path, LibraryError},
        std_types::{RString, RVec},
    },
    DiscoveryBox, PluginModuleRef, PluginSetup, Settlement, SettlementOutcome, TransportBox,
    INTERFACE_VERSION,
};
use std::path::{Path, PathBuf};

/// Why a plugin library could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// No file at the path.
    #[error("plugin file {} does not exist", .path.display())]
    NotFound {
        /// The path that was tried.
        path: PathBuf,
    },
    /// The file is not a shared library, or does not export a comms root module.
    #[error("{} is not a comms plugin: {reason}", .path.display())]
    NotAPlugin {
        /// The file.
        path: PathBuf,
        /// What the dynamic loader or abi_stable said.
        reason: String,
    },
    /// Built against another interface version.
    #[error(
        "{} is incompatible: it was built against comms plugin interface {found}, \
         this host provides {expected} (while 0.x the minor versions must match); rebuild the plugin",
        .path.display()
    )]
    IncompatibleVersion {
        /// The file.
        path: PathBuf,
        /// This host's interface version.
        expected: String,
        /// The plugin's interface version.
        found: String,
    },
    /// Same version, but the types differ in layout.
    #[error(
        "{} is incompatible: interface {found} claims to match this host's {expected} but its \
         types differ; first mismatch: {first_mismatch} (run with --verbose for the full report)",
        .path.display()
    )]
    IncompatibleLayout {
        /// The file.
        path: PathBuf,
        /// This host's interface version.
        expected: String,
        /// The plugin's interface version.
        found: String,
        /// One line from the layout checker.
        first_mismatch: String,
        /// The checker's full report.
        details: String,
    },
    /// Built with an abi_stable or Rust ABI this host cannot talk to, or its loader failed.
    #[error("{} cannot be loaded: {reason}", .path.display())]
    Unloadable {
        /// The file.
        path: PathBuf,
        /// One line.
        reason: String,
        /// The full error.
        details: String,
    },
}

impl LoadError {
    /// The long form of the error, where there is one (for `--verbose`).
    pub fn details(&self) -> Option<&str> {
        match self {
            Self::IncompatibleLayout { details, .. } | Self::Unloadable { details, .. } => Some(details),
            _ => None,
        }
    }

    fn from_library_error(path: &Path, found: Option<String>, error: LibraryError) -> Self {
        let path = path.to_path_buf();
        let expected = INTERFACE_VERSION.to_string();
        match error {
            LibraryError::OpenError { err, .. } => {
                // The loader's message usually starts with the path again; say it once.
                let reason = err.to_string();
                let absolute = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
                let prefix = format!("{}: ", absolute.display());
                let reason = reason.strip_prefix(&prefix).unwrap_or(&reason).to_string();
                Self::NotAPlugin { path, reason }
            }
            LibraryError::GetSymbolError { .. } => {
                Self::NotAPlugin { path, reason: "it exports no abi_stable root module".to_string() }
            }
            LibraryError::IncompatibleVersionNumber { actual_version, .. } => {
                Self::IncompatibleVersion { path, expected, found: actual_version.to_string() }
            }
            // abi_stable reports a version difference it finds inside the layout check as a
            // layout error; to the user it is a version mismatch.
            LibraryError::AbiInstability(_)
                if found.as_deref().is_some_and(|f| !same_interface(&expected, f)) =>
            {
                Self::IncompatibleVersion { path, expected, found: found.unwrap_or_default() }
            }
            LibraryError::AbiInstability(report) => {
                let details = report.to_string();
                Self::IncompatibleLayout {
                    path,
                    expected,
                    found: found.unwrap_or_else(|| "unknown".to_string()),
                    first_mismatch: first_mismatch(&details),
                    details,
                }
            }
            other => {
                let details = other.to_string();
                let reason = details.lines().find(|l| !l.trim().is_empty()).unwrap_or("unknown error").trim();
                Self::Unloadable { path, reason: reason.to_string(), details: details.clone() }
            }
        }
    }
}

/// Picks the most useful line of abi_stable's layout report, for [`LoadError::IncompatibleLayout`]:
/// where the first mismatch is and what was expected and found, at most 200 characters, e.g.
/// `` `TransportInfo.max_message_size`: mismatched type: expected `u64`, found `u32` ``.
///
/// The report (abi_stable 0.11's `AbiInstabilityErrors` display) is a dump of both root layouts
/// followed by one block per checked type, starting at column 0 with `N error(s)`. A block
/// lists the path of fields leading to the type (`field_name:` / `type:` pairs, four spaces in),
/// both layouts, then each error as `Error:<what>`, `Expected:` and `Found:` with indented values.
/// This takes the first block with errors, prefers an error that names something (an unexpected
/// field, a mismatched type) over one that only counts (size, number of fields), and describes
/// the place from the last steps of the path. A report it cannot parse gives its first `Error:`
/// line, or else its first line that mentions an error or a mismatch.
fn first_mismatch(report: &str) -> String {
    const MAX_CHARS: usize = 200;
    /// Errors that only count or measure, least useful last; any other error says more.
    const VAGUE: [&str; 6] = [
        "too many fields",
        "too many variants",
        "prefix-types have a different prefix",
        "incompatible amount of generic parameters",
        "incompatible type size",
        "incompatible type alignment",
    ];
    /// Errors about the identity of the type at the end of the path rather than its contents.
    const ABOUT_THE_FIELD: [&str; 6] = [
        "mismatched type",
        "mismatched package",
        "incompatible primitive",
        "function pointers",
        "field references different lifetimes",
        "mismatched non-zeroness",
    ];
    const FN_POINTER: &str = "AFunctionPointer";

    struct Step<'a> {
        field: &'a str,
        ty: &'a str,
    }

    /// One indented value of `Expected:`/`Found:` as a short phrase.
    fn summary(lines: &[&str]) -> String {
        let value = |key: &str| lines.iter().find_map(|l| l.trim().strip_prefix(key));
        let signature =
            lines.iter().map(|l| l.trim()).find(|l| l.starts_with("fn(") || l.starts_with("extern"));
        let text = match (value("field_name:"), value("type:")) {
            (Some(name), Some(ty)) => {
                let ty = if ty == FN_POINTER { signature.unwrap_or(ty) } else { ty };
                format!("{name}: {ty}")
            }
            (None, Some(ty)) => ty.to_string(),
            _ => lines.iter().map(|l| l.trim()).find(|l| !l.is_empty()).unwrap_or("?").to_string(),
        };
        // abi_stable prints parameters as `name,: Type`.
        text.replace(",:", ":")
    }

    /// Where step `i` of the path is, e.g. `TransportInfo.max_message_size`.
    fn place(path: &[Step<'_>], i: usize) -> String {
        let step = &path[i];
        match i.checked_sub(1).map(|p| &path[p]) {
            None => step.ty.to_string(),
            Some(parent) if parent.ty == FN_POINTER => {
                if step.field == "__returns" {
                    format!("the return type of `{}`", place(path, i - 1))
                } else {
                    format!("parameter `{}` of `{}`", step.field, place(path, i - 1))
                }
            }
            Some(parent) => format!("{}.{}", parent.ty, step.field),
        }
    }

    let is_count = |l: &str| l.split_once(" error(s)").is_some_and(|(n, _)| n.parse::<usize>().is_ok());
    let lines: Vec<&str> = report.lines().collect();
    let starts: Vec<usize> = (0..lines.len()).filter(|&i| is_count(lines[i])).collect();
    let blocks = starts.iter().enumerate().map(|(k, &start)| {
        let end = starts.get(k + 1).copied().unwrap_or(lines.len());
        &lines[start..end]
    });

    let mut found = None;
    for block in blocks {
        if block[0].starts_with("0 ") {
            continue;
        }
        // The path: `field_name:`/`type:` pairs indented by exactly four spaces, before the layouts.
        let mut path = Vec::new();
        let head = block.iter().take_while(|l| !l.starts_with("Layout of") && !l.starts_with("Error:"));
        let mut pending_field = None;
        for line in head {
            if let Some(field) = line.strip_prefix("    field_name:") {
                pending_field = Some(field);
            } else if let (Some(ty), Some(field)) = (line.strip_prefix("    type:"), pending_field) {
                path.push(Step { field, ty });
                pending_field = None;
            }
        }
        // The errors: `Error:<what>`, `Expected:`, values, `Found:`, values.
        let mut errors: Vec<(&str, String, String)> = Vec::new();
        let mut i = 0;
        while i < block.len() {
            if let Some(what) = block[i].strip_prefix("Error:") {
                let values = |from: usize| -> (Vec<&str>, usize) {
                    let end =
                        (from..block.len()).find(|&j| !block[j].starts_with(' ')).unwrap_or(block.len());
                    (block[from..end].to_vec(), end)
                };
                if block.get(i + 1) == Some(&"Expected:") {
                    let (expected, end) = values(i + 2);
                    if block.get(end) == Some(&"Found:") {
                        let (found_lines, end2) = values(end + 1);
                        errors.push((what, summary(&expected), summary(&found_lines)));
                        i = end2;
                        continue;
                    }
                }
            } else if block[i] == "Extra:" {
                if let Some(extra) = block[i + 1..].iter().map(|l| l.trim()).find(|l| !l.is_empty()) {
                    errors.push(("", extra.to_string(), String::new()));
                }
            }
            i += 1;
        }
        let vagueness = |what: &str| VAGUE.iter().position(|v| *v == what).map_or(0, |p| p + 1);
        let Some((what, expected, found_text)) = errors.into_iter().min_by_key(|(what, ..)| vagueness(what))
        else {
            continue;
        };
        let location = match path.len() {
            0 => String::new(),
            n if path[n - 1].ty == FN_POINTER || ABOUT_THE_FIELD.iter().any(|a| what.starts_with(a)) => {
                format!("`{}`: ", place(&path, n - 1))
            }
            1 => format!("`{}`: ", path[0].ty),
            n => format!("`{}` ({}): ", path[n - 1].ty, place(&path, n - 1)),
        };
        found = Some(if what.is_empty() {
            format!("{location}{expected}")
        } else {
            format!("{location}{what}: expected `{expected}`, found `{found_text}`")
        });
        break;
    }

    let line = found.unwrap_or_else(|| {
        let trimmed = || report.lines().map(str::trim).filter(|l| !l.is_empty());
        trimmed()
            .find_map(|l| l.strip_prefix("Error:").filter(|what| !what.is_empty()))
            .or_else(|| trimmed().find(|l| !is_count(l) && (l.contains("error") || l.contains("mismatch"))))
            .unwrap_or("the layouts differ")
            .trim_end_matches(':')
            .to_string()
    });
    if line.chars().count() > MAX_CHARS {
        let mut short: String = line.chars().take(MAX_CHARS - 1).collect();
        short.push('…');
        short
    } else {
        line
    }
}

/// Whether two interface versions are compatible: same major, and while 0.x same minor.
fn same_interface(expected: &str, found: &str) -> bool {
    let parts = |v: &str| -> Vec<String> { v.split('.').take(2).map(str::to_string).collect() };
    let (expected, found) = (parts(expected), parts(found));
    match (expected.first().map(String::as_str), found.first().map(String::as_str)) {
        (Some("0"), Some("0")) => expected.get(1) == found.get(1),
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

/// A loaded plugin library (or a plugin linked into this program), ready to construct
/// transports and discoveries.
#[derive(Debug, Clone)]
pub struct PluginLibrary {
    path: Option<PathBuf>,
    module: PluginModuleRef,
    description: PluginDescription,
}

impl PluginLibrary {
    /// Loads the plugin library at `path` and checks that it is compatible with this host.
    pub fn load(path: &Path) -> Result<Self, LoadError> {
        if path.is_dir() {
            return Err(LoadError::NotAPlugin {
                path: path.to_path_buf(),
                reason: "it is a directory".into(),
            });
        }
        if !path.is_file() {
            return Err(LoadError::NotFound { path: path.to_path_buf() });
        }
        // An absolute path, so the dynamic loader never searches its library path instead.
        let absolute = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        let header =
            lib_header_from_path(&absolute).map_err(|e| LoadError::from_library_error(path, None, e))?;
        let found = header.version_strings().version.to_string();
        // abi_stable alone would accept a plugin with a *newer* 0.x minor; ours must match.
        if !same_interface(INTERFACE_VERSION, &found) {
            return Err(LoadError::IncompatibleVersion {
                path: path.to_path_buf(),
                expected: INTERFACE_VERSION.to_string(),
                found,
            });
        }
        let module = header
            .init_root_module::<PluginModuleRef>()
            .map_err(|e| LoadError::from_library_error(path, Some(found), e))?;
        Ok(Self::from_module(Some(path.to_path_buf()), module))
    }

    /// A plugin crate linked into this program (no shared library involved): the same
    /// boundary, the same runtime separation, without `dlopen`.
    pub fn linked<P: Plugin>() -> Self {
        Self::from_module(None, plugin_module::<P>())
    }

    fn from_module(path: Option<PathBuf>, module: PluginModuleRef) -> Self {
        let info = (module.info())();
        let description = PluginDescription {
            name: info.name.into_string(),
            version: info.version.into_string(),
            description: info.description.into_string(),
            provides: info.provides,
        };
        Self { path, module, description }
    }

    /// The file it was loaded from; `None` for a linked plugin.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Name, version, description, what it provides.
    pub fn description(&self) -> &PluginDescription {
        &self.description
    }

    /// The interface version of this host (and so of every plugin it accepted).
    pub fn interface_version() -> &'static str {
        INTERFACE_VERSION
    }

    fn setup(node_id: &NodeId, instance_name: &str, config_toml: &str) -> PluginSetup {
        PluginSetup {
            node_id: comms_core::NodeId(RString::from(node_id.as_str())),
            instance_name: RString::from(instance_name),
            config_toml: RString::from(config_toml),
        }
    }

    /// Constructs a transport; `config_toml` is the plugin's own table as TOML text.
    pub async fn new_transport(
        &self,
        node_id: &NodeId,
        instance_name: &str,
        config_toml: &str,
    ) -> Result<LoadedTransport, PluginError> {
        if !self.description.provides.contains(Provides::TRANSPORT) {
            return Err(PluginError::unsupported(format!(
                "plugin `{}` provides no transport",
                self.description.name
            )));
        }
        let setup = Self::setup(node_id, instance_name, config_toml);
        let inner =
            (self.module.new_transport())(setup).await.into_result().map_err(PluginError::from_abi)?;
        let info = inner.info().into_result().map_err(PluginError::from_abi)?;
        let info = TransportInfo {
            capabilities: info.capabilities,
            local_address: info.local_address.into_string(),
            max_message_size: info.max_message_size,
        };
        Ok(LoadedTransport { inner, info })
    }

    /// Constructs a discovery; `config_toml` is the plugin's own table as TOML text.
    pub async fn new_discovery(
        &self,
        node_id: &NodeId,
        instance_name: &str,
        config_toml: &str,
    ) -> Result<LoadedDiscovery, PluginError> {
        if !self.description.provides.contains(Provides::DISCOVERY) {
            return Err(PluginError::unsupported(format!(
                "plugin `{}` provides no discovery",
                self.description.name
            )));
        }
        let setup = Self::setup(node_id, instance_name, config_toml);
        let inner =
            (self.module.new_discovery())(setup).await.into_result().map_err(PluginError::from_abi)?;
        Ok(LoadedDiscovery { inner })
    }
}

/// A transport constructed by a plugin, called with idiomatic types.
pub struct LoadedTransport {
    inner: TransportBox,
    info: TransportInfo,
}

impl std::fmt::Debug for LoadedTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedTransport").field("info", &self.info).finish_non_exhaustive()
    }
}

impl LoadedTransport {
    /// What the transport declared when it was constructed.
    pub fn info(&self) -> &TransportInfo {
        &self.info
    }

    /// See [`crate::Transport::send`].
    pub async fn send(&self, address: &str, envelope: Envelope) -> Result<(), PluginError> {
        self.inner
            .send(RString::from(address), envelope.into_abi())
            .await
            .into_result()
            .map_err(PluginError::from_abi)
    }

    /// See [`crate::Transport::receive`]. A message this host cannot represent (a destination
    /// kind from a newer interface) is settled as discarded and logged, never handed on.
    pub async fn receive(&self, max_batch: u32) -> Result<Vec<Inbound>, PluginError> {
        let batch = self.inner.receive(max_batch).await.into_result().map_err(PluginError::from_abi)?;
        let mut accepted = Vec::with_capacity(batch.len());
        let mut discarded = RVec::new();
        for inbound in batch {
            let delivery_tag = inbound.delivery_tag;
            match Envelope::from_abi(inbound.envelope) {
                Ok(envelope) => accepted.push(Inbound { envelope, delivery_tag }),
                Err(error) => {
                    tracing::warn!(%error, "discarding a message this host cannot represent");
                    discarded.push(Settlement { delivery_tag, outcome: SettlementOutcome::REJECTED_DISCARD });
                }
            }
        }
        if !discarded.is_empty() {
            self.inner.settle(discarded).await.into_result().map_err(PluginError::from_abi)?;
        }
        Ok(accepted)
    }

    /// See [`crate::Transport::settle`].
    pub async fn settle(&self, settlements: Vec<Settlement>) -> Result<(), PluginError> {
        self.inner.settle(RVec::from(settlements)).await.into_result().map_err(PluginError::from_abi)
    }

    /// See [`crate::Transport::subscribe`].
    pub async fn subscribe(&self, pattern: &str) -> Result<(), PluginError> {
        self.inner.subscribe(RString::from(pattern)).await.into_result().map_err(PluginError::from_abi)
    }

    /// See [`crate::Transport::unsubscribe`].
    pub async fn unsubscribe(&self, pattern: &str) -> Result<(), PluginError> {
        self.inner.unsubscribe(RString::from(pattern)).await.into_result().map_err(PluginError::from_abi)
    }

    /// See [`crate::Transport::close`].
    pub async fn close(&self) -> Result<(), PluginError> {
        self.inner.close().await.into_result().map_err(PluginError::from_abi)
    }
}

/// A discovery constructed by a plugin, called with idiomatic types.
pub struct LoadedDiscovery {
    inner: DiscoveryBox,
}

impl std::fmt::Debug for LoadedDiscovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedDiscovery").finish_non_exhaustive()
    }
}

impl LoadedDiscovery {
    /// See [`crate::Discovery::announce`].
    pub async fn announce(&self, record: NodeRecord) -> Result<(), PluginError> {
        self.inner.announce(record.into_abi()).await.into_result().map_err(PluginError::from_abi)
    }

    /// See [`crate::Discovery::withdraw`].
    pub async fn withdraw(&self, node: &NodeId) -> Result<(), PluginError> {
        let node = comms_core::NodeId(RString::from(node.as_str()));
        self.inner.withdraw(node).await.into_result().map_err(PluginError::from_abi)
    }

    /// See [`crate::Discovery::peers`].
    pub async fn peers(&self) -> Result<Vec<NodeRecord>, PluginError> {
        let peers = self.inner.peers().await.into_result().map_err(PluginError::from_abi)?;
        Ok(peers.into_iter().map(NodeRecord::from_abi).collect())
    }

    /// See [`crate::Discovery::next_event`].
    pub async fn next_event(&self) -> Result<Option<PeerEvent>, PluginError> {
        let event = self.inner.next_event().await.into_result().map_err(PluginError::from_abi)?;
        Ok(event.into_option().map(PeerEvent::from_abi))
    }

    /// See [`crate::Discovery::close`].
    pub async fn close(&self) -> Result<(), PluginError> {
        self.inner.close().await.into_result().map_err(PluginError::from_abi)
    }
}
