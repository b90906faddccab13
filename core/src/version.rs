//! The contract's version, and the rule that decides whether a plugin and a host load each other.

use crate::{INTERFACE_MAJOR, INTERFACE_MINOR};
use abi_stable::StableAbi;
use std::fmt;

/// A version of the comms plugin contract: `major.minor`.
///
/// It belongs to the contract, not to a crate: releases of comms-core, comms-plugin-api and the
/// host that leave the contract alone keep it unchanged (see `COMPATIBILITY.md` in this crate).
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InterfaceVersion {
    /// Changes only with a change that breaks plugins already built.
    pub major: u16,
    /// Grows with every compatible addition.
    pub minor: u16,
}

/// The version of the contract this crate defines.
pub const INTERFACE_VERSION: InterfaceVersion =
    InterfaceVersion { major: INTERFACE_MAJOR, minor: INTERFACE_MINOR };

/// How a plugin built for one contract version relates to a host built for another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compatibility {
    /// Same major and minor.
    Same,
    /// Same major, the plugin is older: it loads, and the host uses its defaults for what the
    /// plugin does not have.
    PluginOlder,
    /// Same major, the plugin is newer: it loads, and the host ignores what it does not know.
    PluginNewer,
    /// Different majors: never loads.
    Incompatible,
}

impl InterfaceVersion {
    /// Reads `major.minor` or `major.minor.patch` (the patch is ignored).
    pub fn parse(text: &str) -> Option<Self> {
        let mut parts = text.trim().split('.');
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next()?.parse().ok()?;
        match parts.next() {
            None => {}
            Some(patch) if patch.parse::<u32>().is_ok() && parts.next().is_none() => {}
            Some(_) => return None,
        }
        Some(Self { major, minor })
    }

    /// How a plugin built for `plugin` relates to a host built for `self`.
    pub const fn compatibility(self, plugin: InterfaceVersion) -> Compatibility {
        if self.major != plugin.major {
            Compatibility::Incompatible
        } else if self.minor == plugin.minor {
            Compatibility::Same
        } else if plugin.minor < self.minor {
            Compatibility::PluginOlder
        } else {
            Compatibility::PluginNewer
        }
    }
}

impl fmt::Display for InterfaceVersion {
    /// `major.minor`, e.g. `1.0`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn v(major: u16, minor: u16) -> InterfaceVersion {
        InterfaceVersion { major, minor }
    }

    #[test]
    fn same_major_loads_both_ways_and_other_majors_never() {
        assert_eq!(v(1, 2).compatibility(v(1, 2)), Compatibility::Same);
        assert_eq!(v(1, 2).compatibility(v(1, 0)), Compatibility::PluginOlder);
        assert_eq!(v(1, 2).compatibility(v(1, 5)), Compatibility::PluginNewer);
        assert_eq!(v(1, 2).compatibility(v(2, 0)), Compatibility::Incompatible);
        assert_eq!(v(2, 0).compatibility(v(1, 9)), Compatibility::Incompatible);
    }

    #[test]
    fn parses_what_abi_stable_records() {
        assert_eq!(InterfaceVersion::parse("1.0.0"), Some(v(1, 0)));
        assert_eq!(InterfaceVersion::parse("1.3"), Some(v(1, 3)));
        assert_eq!(InterfaceVersion::parse("0.7.0"), Some(v(0, 7)));
        assert_eq!(InterfaceVersion::parse("1"), None);
        assert_eq!(InterfaceVersion::parse("1.x.0"), None);
        assert_eq!(InterfaceVersion::parse("1.0.0.0"), None);
    }

    #[test]
    fn the_types_carry_the_contract_version_not_the_crate_version() {
        assert_eq!(env!("CARGO_PKG_VERSION"), format!("{}.0", INTERFACE_VERSION));
    }
}
