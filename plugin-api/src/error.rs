//! The error type plugin code returns, and its conversion to the boundary's `CommsError`.

use comms_core::CommsError;
pub use comms_core::ErrorCode;
use std::fmt;

/// An error from a transport, a discovery or a plugin constructor: a code, a message and whether
/// retrying may help. The host receives exactly these three things.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginError {
    /// What kind of failure.
    pub code: ErrorCode,
    /// What failed, for a human. Must never contain credentials.
    pub message: String,
    /// Whether the same operation may succeed if tried again later.
    pub retryable: bool,
}

impl PluginError {
    /// An error that retrying will not fix.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into(), retryable: false }
    }

    /// An error that may go away if the operation is tried again.
    pub fn retryable(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { retryable: true, ..Self::new(code, message) }
    }

    /// The plugin's configuration was rejected.
    pub fn invalid_config(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::INVALID_CONFIG, message)
    }

    /// The transport or discovery has been closed.
    pub fn closed(what: &str) -> Self {
        Self::new(ErrorCode::CLOSED, format!("{what} is closed"))
    }

    /// The plugin does not provide this operation.
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::UNSUPPORTED, message)
    }

    /// A panic caught at the plugin boundary.
    pub(crate) fn panicked(place: &str, payload: &(dyn std::any::Any + Send)) -> Self {
        let what = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a non-string panic payload".to_string());
        Self::new(ErrorCode::PANICKED, format!("plugin panicked in {place}: {what}"))
    }

    /// For the boundary.
    pub(crate) fn into_abi(self) -> CommsError {
        CommsError { retryable: self.retryable, ..CommsError::new(self.code, self.message) }
    }

    /// From the boundary.
    pub(crate) fn from_abi(error: CommsError) -> Self {
        Self { code: error.code, message: error.message.as_str().to_owned(), retryable: error.retryable }
    }
}

impl fmt::Display for PluginError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.clone().into_abi(), f)
    }
}

impl std::error::Error for PluginError {}

impl From<std::io::Error> for PluginError {
    fn from(error: std::io::Error) -> Self {
        use std::io::ErrorKind::*;
        let retryable = matches!(
            error.kind(),
            ConnectionRefused | ConnectionReset | ConnectionAborted | BrokenPipe | TimedOut | Interrupted
        );
        Self { code: ErrorCode::IO, message: error.to_string(), retryable }
    }
}
