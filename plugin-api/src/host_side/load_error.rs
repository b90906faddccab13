//! Why a plugin library could not be loaded, in one sentence (and a longer form for
//! `--verbose`).

use comms_core::{abi_stable::library::LibraryError, InterfaceVersion};
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
    /// Built for another major version of the contract.
    #[error(
        "{} is incompatible: it was built for comms plugin interface {found}, this host speaks \
         {expected} (only the same major version loads); rebuild it with a comms-plugin-api for \
         interface {}.x",
        .path.display(), .expected.major
    )]
    IncompatibleVersion {
        /// The file.
        path: PathBuf,
        /// This host's contract version.
        expected: InterfaceVersion,
        /// The plugin's contract version, as it recorded it.
        found: String,
    },
    /// A compatible version, but the types differ: the plugin was built from a contract that
    /// was changed without a new major version.
    #[error("{}: {mismatch} (plugin built for interface {found}, host {expected}; --verbose shows where)", .path.display())]
    IncompatibleLayout {
        /// The file.
        path: PathBuf,
        /// This host's contract version.
        expected: InterfaceVersion,
        /// The plugin's contract version.
        found: InterfaceVersion,
        /// The first mismatch in the contract's words, e.g.
        /// `Transport::send(envelope): Envelope has 8 fields, this host expects 7`
        /// (see [`super::layout_check`]).
        mismatch: String,
        /// The mismatch, the path from the root module to it, and the mismatched type as the
        /// plugin and this host have it: at most about 100 lines.
        details: String,
    },
    /// Built with an abi_stable or Rust ABI this host cannot talk to, or its loader failed.
    #[error("{} cannot be loaded: {reason}", .path.display())]
    Unloadable {
        /// The file.
        path: PathBuf,
        /// One line.
        reason: String,
        /// The loader's error (its first 100 lines).
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

    /// An error of abi_stable's loader, for the file at `path`.
    pub(crate) fn from_library_error(path: &Path, expected: InterfaceVersion, error: LibraryError) -> Self {
        let path = path.to_path_buf();
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
            other => {
                let report = other.to_string();
                let reason = report.lines().find(|l| !l.trim().is_empty()).unwrap_or("unknown error").trim();
                // abi_stable's reports can run to thousands of lines; `--verbose` shows the start.
                let details = report.lines().take(100).collect::<Vec<_>>().join("\n");
                Self::Unloadable { path, reason: reason.to_string(), details }
            }
        }
    }
}
