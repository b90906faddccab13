//! The one error type that crosses the plugin boundary.

use crate::Extension;
use abi_stable::{
    std_types::{RString, RVec},
    StableAbi,
};
use std::fmt;

/// What kind of failure a [`CommsError`] reports.
///
/// An integer with named constants (not an enum) so that codes can be added without changing the
/// layout; an unknown code from a newer plugin displays as `code N`.
#[repr(transparent)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ErrorCode(pub u16);

impl ErrorCode {
    /// Anything not covered by a more precise code.
    pub const OTHER: Self = Self(0);
    /// The plugin's configuration was rejected (the message names the key).
    pub const INVALID_CONFIG: Self = Self(1);
    /// A peer, listener or broker could not be reached.
    pub const UNREACHABLE: Self = Self(2);
    /// The transport or discovery was closed.
    pub const CLOSED: Self = Self(3);
    /// Bytes that do not form a valid frame or envelope.
    pub const MALFORMED: Self = Self(4);
    /// A message larger than the transport's maximum.
    pub const TOO_LARGE: Self = Self(5);
    /// An operation did not finish in time.
    pub const TIMEOUT: Self = Self(6);
    /// Code inside the plugin panicked; the panic was caught at the boundary.
    pub const PANICKED: Self = Self(7);
    /// An operating-system I/O error.
    pub const IO: Self = Self(8);
    /// The plugin does not provide the requested operation.
    pub const UNSUPPORTED: Self = Self(9);
    /// The address given to the transport is not one it understands.
    pub const INVALID_ADDRESS: Self = Self(10);

    /// A short lowercase name, used in messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::OTHER => "error",
            Self::INVALID_CONFIG => "invalid config",
            Self::UNREACHABLE => "unreachable",
            Self::CLOSED => "closed",
            Self::MALFORMED => "malformed",
            Self::TOO_LARGE => "too large",
            Self::TIMEOUT => "timeout",
            Self::PANICKED => "panicked",
            Self::IO => "i/o error",
            Self::UNSUPPORTED => "unsupported",
            Self::INVALID_ADDRESS => "invalid address",
            _ => "unknown error code",
        }
    }
}

/// An error returned across the plugin boundary: a code, a human-readable message and whether
/// trying the same operation again may succeed.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq)]
pub struct CommsError {
    /// What kind of failure this is.
    pub code: ErrorCode,
    /// What failed, for a human. Never contains credentials.
    pub message: RString,
    /// Whether retrying the operation later may succeed (a peer that is restarting, a full queue).
    pub retryable: bool,
    /// Details added by later minor versions of the contract (none in 1.0).
    pub extensions: RVec<Extension>,
}

impl CommsError {
    /// An error that retrying will not fix.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: RString::from(message.into()), retryable: false, extensions: RVec::new() }
    }

    /// An error that may go away if the operation is tried again later.
    pub fn retryable(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { retryable: true, ..Self::new(code, message) }
    }
}

impl fmt::Display for CommsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.message)?;
        if self.code == ErrorCode::OTHER || self.message.contains(self.code.name()) {
            Ok(())
        } else if self.code.name() == "unknown error code" {
            write!(f, " (code {})", self.code.0)
        } else {
            write!(f, " ({})", self.code.name())
        }
    }
}

impl std::error::Error for CommsError {}
