//! The discovery trait a plugin author implements, and the records it exchanges.

use crate::{Extensions, NodeId, PluginError};
use async_trait::async_trait;
use comms_core::abi_stable::std_types::RString;

/// What a node announces about itself.
///
/// Build one with [`NodeRecord::new`] and set the fields (the struct is `#[non_exhaustive]` so
/// that the contract can grow without breaking plugin source).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct NodeRecord {
    /// The node.
    pub id: NodeId,
    /// `(transport name, address)` pairs, one per transport the node listens on.
    pub addresses: Vec<(String, String)>,
    /// Services the node serves.
    pub services: Vec<String>,
    /// Topic patterns it subscribes to.
    pub topics: Vec<String>,
    /// Free-form metadata.
    pub metadata: Vec<(String, String)>,
    /// Attributes of later contract versions; a discovery stores and returns them.
    pub extensions: Extensions,
}

/// The metadata key and value of an offline record ([`NodeRecord::is_offline`]).
pub const OFFLINE_KEY: &str = "comms-status";
/// See [`OFFLINE_KEY`].
pub const OFFLINE_VALUE: &str = "offline";

impl NodeRecord {
    /// A record with nothing but the node's id.
    pub fn new(id: impl Into<NodeId>) -> Self {
        Self { id: id.into(), ..Self::default() }
    }

    /// The node's address for the transport called `transport`, if it has one.
    pub fn address_for(&self, transport: &str) -> Option<&str> {
        self.addresses.iter().find(|(name, _)| name == transport).map(|(_, address)| address.as_str())
    }

    /// Whether the record says its node is offline: it closed cleanly and a durable transport
    /// keeps its inbox, so messages sent to it wait for it. A discovery keeps such a record
    /// (without expiry) until the node announces itself again or withdraws.
    pub fn is_offline(&self) -> bool {
        self.metadata.iter().any(|(key, value)| key == OFFLINE_KEY && value == OFFLINE_VALUE)
    }

    /// Marks the record offline (see [`NodeRecord::is_offline`]).
    pub fn mark_offline(&mut self) {
        self.metadata.retain(|(key, _)| key != OFFLINE_KEY);
        self.metadata.push((OFFLINE_KEY.to_string(), OFFLINE_VALUE.to_string()));
    }

    /// To the boundary type.
    pub(crate) fn into_abi(self) -> comms_core::NodeRecord {
        let pairs = |pairs: Vec<(String, String)>| {
            pairs
                .into_iter()
                .map(|(name, value)| comms_core::Header { name: name.into(), value: value.into() })
                .collect()
        };
        comms_core::NodeRecord {
            id: self.id.into_abi(),
            addresses: self
                .addresses
                .into_iter()
                .map(|(transport, address)| comms_core::TransportAddress {
                    transport: transport.into(),
                    address: address.into(),
                })
                .collect(),
            services: self.services.into_iter().map(RString::from).collect(),
            topics: self.topics.into_iter().map(RString::from).collect(),
            metadata: pairs(self.metadata),
            extensions: self.extensions.into_abi(),
        }
    }

    /// From the boundary type. Records are small and rare, so the strings are copied into
    /// plain `String`s.
    pub(crate) fn from_abi(record: comms_core::NodeRecord) -> Self {
        let text = |text: &RString| text.as_str().to_owned();
        Self {
            id: NodeId::from_abi(record.id),
            addresses: record.addresses.iter().map(|a| (text(&a.transport), text(&a.address))).collect(),
            services: record.services.iter().map(text).collect(),
            topics: record.topics.iter().map(text).collect(),
            metadata: record.metadata.iter().map(|h| (text(&h.name), text(&h.value))).collect(),
            extensions: Extensions::from_abi(record.extensions),
        }
    }
}

/// Whether a peer joined, left or changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerEventKind {
    /// A node appeared.
    Joined,
    /// A node withdrew or expired.
    Left,
    /// A known node changed its record.
    Updated,
}

/// A change in the set of known peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerEvent {
    /// What happened.
    pub kind: PeerEventKind,
    /// The record (for `Left`, the last one known).
    pub record: NodeRecord,
}

impl PeerEvent {
    /// To the boundary type.
    pub(crate) fn into_abi(self) -> comms_core::PeerEvent {
        let kind = match self.kind {
            PeerEventKind::Joined => comms_core::PeerEventKind::JOINED,
            PeerEventKind::Left => comms_core::PeerEventKind::LEFT,
            PeerEventKind::Updated => comms_core::PeerEventKind::UPDATED,
        };
        comms_core::PeerEvent { kind, record: self.record.into_abi() }
    }

    /// From the boundary type; an unknown kind from a newer plugin reads as `Updated`.
    pub(crate) fn from_abi(event: comms_core::PeerEvent) -> Self {
        let kind = match event.kind {
            comms_core::PeerEventKind::JOINED => PeerEventKind::Joined,
            comms_core::PeerEventKind::LEFT => PeerEventKind::Left,
            _ => PeerEventKind::Updated,
        };
        Self { kind, record: NodeRecord::from_abi(event.record) }
    }
}

/// What changed between two reads of a registry, both keyed by node id: `Joined` and `Updated`
/// in id order, then `Left` (with the last record known) in id order. For discoveries that
/// read the whole set of live peers each time (the database registries).
pub fn snapshot_changes(
    known: &std::collections::BTreeMap<String, NodeRecord>,
    live: &std::collections::BTreeMap<String, NodeRecord>,
) -> Vec<PeerEvent> {
    let appeared_or_changed = live.iter().filter_map(|(id, record)| {
        let kind = match known.get(id) {
            None => PeerEventKind::Joined,
            Some(old) if old != record => PeerEventKind::Updated,
            Some(_) => return None,
        };
        Some(PeerEvent { kind, record: record.clone() })
    });
    let gone = known
        .iter()
        .filter(|(id, _)| !live.contains_key(*id))
        .map(|(_, record)| PeerEvent { kind: PeerEventKind::Left, record: record.clone() });
    appeared_or_changed.chain(gone).collect()
}

/// Finds peers. Implement this, then export it with [`crate::export_plugin!`].
#[async_trait]
pub trait Discovery: Send + Sync + 'static {
    /// Publishes or replaces this node's record.
    async fn announce(&self, record: NodeRecord) -> Result<(), PluginError>;
    /// Removes this node's record.
    async fn withdraw(&self, node: NodeId) -> Result<(), PluginError>;
    /// The peers known now, excluding this node.
    async fn peers(&self) -> Result<Vec<NodeRecord>, PluginError>;
    /// Waits for the next change; `None` once closed.
    async fn next_event(&self) -> Result<Option<PeerEvent>, PluginError>;
    /// Stops background work.
    async fn close(&self) -> Result<(), PluginError>;
    /// The nodes that provide `service`, looked up now: for a discovery that does not hold every
    /// record (a DHT). The host calls it when it knows no provider of a service it is asked to
    /// call, and learns the records returned (contract 1.2; an older host never calls it). The
    /// default finds nothing beyond what `peers` and `next_event` report.
    async fn find_service(&self, service: &str) -> Result<Vec<NodeRecord>, PluginError> {
        let _ = service;
        Ok(Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn records(entries: &[(&str, &str)]) -> BTreeMap<String, NodeRecord> {
        entries
            .iter()
            .map(|(id, address)| {
                let mut record = NodeRecord::new(*id);
                record.addresses.push(("tcp".into(), (*address).into()));
                (id.to_string(), record)
            })
            .collect()
    }

    #[test]
    fn snapshot_changes_name_who_joined_changed_and_left_in_id_order() {
        let known = records(&[("a", "1"), ("b", "1"), ("c", "1")]);
        let live = records(&[("a", "1"), ("b", "2"), ("d", "1"), ("0", "1")]);
        let changes: Vec<(PeerEventKind, String, String)> = snapshot_changes(&known, &live)
            .into_iter()
            .map(|event| (event.kind, event.record.id.to_string(), event.record.addresses[0].1.clone()))
            .collect();
        let expected = [
            (PeerEventKind::Joined, "0", "1"),
            (PeerEventKind::Updated, "b", "2"),
            (PeerEventKind::Joined, "d", "1"),
            (PeerEventKind::Left, "c", "1"),
        ];
        let expected: Vec<(PeerEventKind, String, String)> =
            expected.iter().map(|(kind, id, address)| (*kind, id.to_string(), address.to_string())).collect();
        assert_eq!(changes, expected);
        assert!(snapshot_changes(&live, &live).is_empty(), "no change, no event");
    }
}
