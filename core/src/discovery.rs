//! The `Discovery` object: who is out there and how to reach them.

use crate::{CommsResult, Extension, Header, NodeId};
use abi_stable::{
    sabi_trait,
    std_types::{RBox, ROption, RString, RVec},
    StableAbi,
};
use async_ffi::FfiFuture;

/// One way to reach a node: the name of a transport (as configured, e.g. `"tcp"`) and an address
/// that transport understands.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq, Hash)]
pub struct TransportAddress {
    /// Transport name, matching the `[transports.NAME]` table on both nodes.
    pub transport: RString,
    /// Transport-specific address.
    pub address: RString,
}

/// What a node announces about itself.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq)]
pub struct NodeRecord {
    /// The node.
    pub id: NodeId,
    /// One address per transport the node listens on.
    pub addresses: RVec<TransportAddress>,
    /// Services the node serves.
    pub services: RVec<RString>,
    /// Topic patterns the node subscribes to.
    pub topics: RVec<RString>,
    /// Free-form metadata (version, zone, ...).
    pub metadata: RVec<Header>,
    /// Attributes added by later minor versions of the contract (none in 1.0). A discovery
    /// stores and returns them with the rest of the record.
    pub extensions: RVec<Extension>,
}

/// Whether a peer joined, left or changed its record.
#[repr(transparent)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PeerEventKind(pub u8);

impl PeerEventKind {
    /// A node appeared.
    pub const JOINED: Self = Self(0);
    /// A node withdrew or expired.
    pub const LEFT: Self = Self(1);
    /// A known node changed its record.
    pub const UPDATED: Self = Self(2);
}

/// A change in the set of known peers.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq)]
pub struct PeerEvent {
    /// What happened.
    pub kind: PeerEventKind,
    /// The peer's record (for [`PeerEventKind::LEFT`], the last one known).
    pub record: NodeRecord,
}

/// Announces this node, lists peers and streams changes. Independent of the transports: any
/// discovery works with any transport whose addresses it carries.
///
/// Methods added after contract 1.0 go after [`Discovery::close`], each with a default body.
#[sabi_trait]
pub trait Discovery: Send + Sync {
    /// Publishes (or replaces) this node's record.
    fn announce(&self, record: NodeRecord) -> FfiFuture<CommsResult<()>>;

    /// Removes this node's record; peers see it leave.
    fn withdraw(&self, node: NodeId) -> FfiFuture<CommsResult<()>>;

    /// The peers known now, excluding this node.
    fn peers(&self) -> FfiFuture<CommsResult<RVec<NodeRecord>>>;

    /// Waits for the next change, or returns `None` once the discovery is closed.
    fn next_event(&self) -> FfiFuture<CommsResult<ROption<PeerEvent>>>;

    /// Stops background work and releases resources.
    #[sabi(last_prefix_field)]
    fn close(&self) -> FfiFuture<CommsResult<()>>;

    /// Looks for the nodes that provide `service` now, beyond what [`Discovery::peers`] and
    /// [`Discovery::next_event`] reported: a discovery that does not hold every record (a DHT)
    /// looks them up. The host calls it when it knows no provider of a service it is asked to
    /// call, and learns the records returned. Added in 1.2; the default (what the host gets from
    /// a discovery built for 1.0 or 1.1, and right for one that reports every record anyway)
    /// finds nothing more.
    fn find_service(&self, service: RString) -> FfiFuture<CommsResult<RVec<NodeRecord>>> {
        let _ = service;
        async_ffi::FutureExt::into_ffi(async { CommsResult::ROk(RVec::new()) })
    }
}

/// A boxed discovery object as plugins return it.
pub type DiscoveryBox = Discovery_TO<'static, RBox<()>>;
