//! The extension area: room for new attributes in structs whose layout is frozen.

use abi_stable::{
    std_types::{RString, RVec},
    StableAbi,
};

/// One attribute of an extension area: a key and its value as bytes.
///
/// Structs that cross the boundary by value ([`crate::Envelope`], [`crate::TransportInfo`],
/// [`crate::PluginSetup`], [`crate::NodeRecord`], ...) can never gain a field without breaking
/// every plugin already built. Each carries `extensions: RVec<Extension>` instead: a later minor
/// version of the contract defines new keys, and a side that does not know a key ignores it.
///
/// Keys starting with `comms.` are reserved for the contract (each one is documented where it
/// is defined, with the contract version that added it); plugins may use their own keys with a
/// prefix of their own (`myplugin.`). An area keeps its order; a key appears at most once.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq, Hash)]
pub struct Extension {
    /// What the value means, e.g. `comms.priority`.
    pub key: RString,
    /// The value; its encoding is part of the key's definition.
    pub value: RVec<u8>,
}
