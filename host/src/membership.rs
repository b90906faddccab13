//! Who is out there and alive: the peer table, fed by discovery, heartbeats and goodbyes.
//!
//! A peer is **up** from the moment discovery reports it or it is heard from (any message
//! counts, heartbeats included), and **down** once nothing has been heard from it for
//! `peer_timeout`, or at once when it says goodbye. A down peer that is heard from again is up
//! again. Every change is published as a [`PeerEvent`]: `Joined` (up), `Left` (down or
//! withdrawn), `Updated` (its record changed: addresses, services, topics).

use comms_plugin_api::{NodeId, NodeRecord, PeerEvent, PeerEventKind};
use std::{
    collections::HashMap,
    sync::RwLock,
    time::{Duration, Instant},
};
use tokio::sync::broadcast;

/// Events buffered per `peer_events()` stream; a consumer that falls further behind skips.
const EVENT_BUFFER: usize = 256;

/// The metadata key of a node record's revision: a number the node raises whenever its record
/// changes, so that an older copy arriving late (a heartbeat sent just before the node began
/// serving, overtaken by the new discovery record) cannot replace a newer one.
pub(crate) const REVISION_KEY: &str = "comms-revision";

/// The revision a record carries, if any.
pub(crate) fn revision(record: &NodeRecord) -> Option<u64> {
    record.metadata.iter().find(|(key, _)| key == REVISION_KEY).and_then(|(_, value)| value.parse().ok())
}

/// Sets (or replaces) the revision of `record`.
pub(crate) fn set_revision(record: &mut NodeRecord, revision: u64) {
    record.metadata.retain(|(key, _)| key != REVISION_KEY);
    record.metadata.push((REVISION_KEY.to_string(), revision.to_string()));
}

/// Whether a peer is considered alive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerStatus {
    /// Heard from within the timeout (or just reported by discovery).
    Up,
    /// Silent for longer than the timeout, or said goodbye.
    Down,
    /// Closed cleanly, and a durable transport keeps its inbox: messages sent to it wait there
    /// until it comes back. Not a replica for requests, not a subscriber for publications.
    Offline,
}

/// A peer as this node sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerInfo {
    /// Its latest record.
    pub record: NodeRecord,
    /// Up or down.
    pub status: PeerStatus,
    /// Time since it was last heard from (or reported by discovery).
    pub last_seen: Duration,
}

#[derive(Debug)]
struct PeerEntry {
    record: NodeRecord,
    status: PeerStatus,
    last_seen: Instant,
}

/// The peer table.
#[derive(Debug)]
pub(crate) struct Membership {
    local: NodeId,
    peers: RwLock<HashMap<NodeId, PeerEntry>>,
    events: broadcast::Sender<PeerEvent>,
    /// `None`: liveness is off, peers never expire.
    timeout: Option<Duration>,
}

impl Membership {
    pub(crate) fn new(local: NodeId, timeout: Option<Duration>) -> Self {
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        Self { local, peers: RwLock::new(HashMap::new()), events, timeout }
    }

    fn emit(&self, kind: PeerEventKind, record: &NodeRecord) {
        let _ = self.events.send(PeerEvent { kind, record: record.clone() });
    }

    /// A stream of changes from now on.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<PeerEvent> {
        self.events.subscribe()
    }

    /// Discovery reports `record` (joined or updated); `true` when the peer was not known.
    pub(crate) fn discovered(&self, record: NodeRecord) -> bool {
        if record.id == self.local {
            return false;
        }
        self.learn(record, Instant::now())
    }

    /// Discovery says `id` left (withdrew or expired).
    pub(crate) fn withdrawn(&self, id: &NodeId) {
        let removed = self.peers.write().unwrap_or_else(|p| p.into_inner()).remove(id);
        if let Some(entry) = removed.filter(|entry| entry.status == PeerStatus::Up) {
            self.emit(PeerEventKind::Left, &entry.record);
        }
    }

    /// A heartbeat from `record.id` carrying its current record.
    pub(crate) fn heartbeat(&self, record: NodeRecord) {
        if record.id == self.local {
            return;
        }
        self.learn(record, Instant::now());
    }

    /// Whether `id` is known and up.
    pub(crate) fn is_up(&self, id: &NodeId) -> bool {
        let peers = self.peers.read().unwrap_or_else(|p| p.into_inner());
        peers.get(id).is_some_and(|entry| entry.status == PeerStatus::Up)
    }

    /// Takes `record` as the peer's latest (unless it is older than the one known); `true` when
    /// the peer was not known before.
    fn learn(&self, record: NodeRecord, now: Instant) -> bool {
        let mut peers = self.peers.write().unwrap_or_else(|p| p.into_inner());
        match peers.get_mut(&record.id) {
            None => {
                let status = if record.is_offline() { PeerStatus::Offline } else { PeerStatus::Up };
                if status == PeerStatus::Up {
                    self.emit(PeerEventKind::Joined, &record);
                }
                peers.insert(record.id.clone(), PeerEntry { record, status, last_seen: now });
                true
            }
            Some(entry) => {
                entry.last_seen = now;
                let stale = matches!((revision(&entry.record), revision(&record)), (Some(known), Some(new)) if new < known);
                if !stale && record.is_offline() {
                    // Its offline record (from discovery): it is gone, its inbox stays.
                    let was_up = entry.status == PeerStatus::Up;
                    entry.record = record;
                    entry.status = PeerStatus::Offline;
                    if was_up {
                        self.emit(PeerEventKind::Left, &entry.record);
                    }
                    return false;
                }
                let came_back = entry.status != PeerStatus::Up;
                let changed = !stale && entry.record != record;
                if !stale {
                    entry.record = record;
                }
                entry.status = PeerStatus::Up;
                if came_back {
                    self.emit(PeerEventKind::Joined, &entry.record);
                } else if changed {
                    self.emit(PeerEventKind::Updated, &entry.record);
                }
                false
            }
        }
    }

    /// Any message from `id`: it is alive.
    pub(crate) fn heard_from(&self, id: &NodeId) {
        let mut peers = self.peers.write().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = peers.get_mut(id) {
            entry.last_seen = Instant::now();
            if entry.status != PeerStatus::Up {
                entry.status = PeerStatus::Up;
                self.emit(PeerEventKind::Joined, &entry.record);
            }
        }
    }

    /// `id` said goodbye: down now, or offline (`offline`: its durable inbox keeps messages).
    pub(crate) fn goodbye(&self, id: &NodeId, offline: bool) {
        let mut peers = self.peers.write().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = peers.get_mut(id) {
            let was_up = entry.status == PeerStatus::Up;
            if offline {
                entry.status = PeerStatus::Offline;
                entry.record.mark_offline();
            } else if was_up {
                entry.status = PeerStatus::Down;
            }
            if was_up {
                self.emit(PeerEventKind::Left, &entry.record);
            }
        }
    }

    /// Marks down every peer silent for longer than the timeout.
    pub(crate) fn expire(&self, now: Instant) {
        let Some(timeout) = self.timeout else { return };
        let mut peers = self.peers.write().unwrap_or_else(|p| p.into_inner());
        for entry in peers.values_mut() {
            if entry.status == PeerStatus::Up && now.saturating_duration_since(entry.last_seen) > timeout {
                entry.status = PeerStatus::Down;
                self.emit(PeerEventKind::Left, &entry.record);
            }
        }
    }

    /// The latest record of `id`, up or down.
    pub(crate) fn record(&self, id: &NodeId) -> Option<NodeRecord> {
        self.peers.read().unwrap_or_else(|p| p.into_inner()).get(id).map(|entry| entry.record.clone())
    }

    /// Records of the up peers for which `keep` holds.
    pub(crate) fn live(&self, keep: impl Fn(&NodeRecord) -> bool) -> Vec<NodeRecord> {
        let peers = self.peers.read().unwrap_or_else(|p| p.into_inner());
        let mut live: Vec<NodeRecord> = peers
            .values()
            .filter(|entry| entry.status == PeerStatus::Up && keep(&entry.record))
            .map(|entry| entry.record.clone())
            .collect();
        live.sort_by(|a, b| a.id.cmp(&b.id));
        live
    }

    /// The table, sorted by id.
    pub(crate) fn snapshot(&self) -> Vec<PeerInfo> {
        let now = Instant::now();
        let peers = self.peers.read().unwrap_or_else(|p| p.into_inner());
        let mut list: Vec<PeerInfo> = peers
            .values()
            .map(|entry| PeerInfo {
                record: entry.record.clone(),
                status: entry.status,
                last_seen: now.saturating_duration_since(entry.last_seen),
            })
            .collect();
        list.sort_by(|a, b| a.record.id.cmp(&b.record.id));
        list
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, services: &[&str]) -> NodeRecord {
        {
            let mut value = NodeRecord::default();
            value.id = NodeId::new(id);
            value.services = services.iter().map(|s| s.to_string()).collect();
            value
        }
    }

    fn kinds(events: &mut broadcast::Receiver<PeerEvent>) -> Vec<(PeerEventKind, String)> {
        let mut seen = Vec::new();
        while let Ok(event) = events.try_recv() {
            seen.push((event.kind, event.record.id.to_string()));
        }
        seen
    }

    #[test]
    fn join_update_expire_return_and_goodbye() {
        let membership = Membership::new(NodeId::new("me"), Some(Duration::from_millis(100)));
        let mut events = membership.subscribe();
        membership.discovered(record("a", &[]));
        membership.heartbeat(record("a", &[]));
        membership.heartbeat(record("a", &["echo"]));
        assert_eq!(membership.live(|r| r.services.contains(&"echo".to_string())).len(), 1);
        membership.expire(Instant::now() + Duration::from_millis(150));
        assert!(membership.live(|_| true).is_empty());
        membership.heard_from(&NodeId::new("a"));
        membership.goodbye(&NodeId::new("a"), false);
        membership.goodbye(&NodeId::new("a"), false);
        use PeerEventKind::*;
        assert_eq!(
            kinds(&mut events),
            vec![
                (Joined, "a".into()),
                (Updated, "a".into()),
                (Left, "a".into()),
                (Joined, "a".into()),
                (Left, "a".into())
            ]
        );
    }

    #[test]
    fn an_offline_peer_keeps_its_record_and_comes_back() {
        let membership = Membership::new(NodeId::new("me"), Some(Duration::from_millis(100)));
        let mut events = membership.subscribe();
        let status = |id: &str| {
            membership.snapshot().into_iter().find(|p| p.record.id.as_str() == id).map(|p| p.status)
        };
        // Said goodbye with a durable inbox: offline, record kept, marked, never expired.
        membership.discovered(record("a", &["echo"]));
        membership.goodbye(&NodeId::new("a"), true);
        assert_eq!(status("a"), Some(PeerStatus::Offline));
        assert!(membership.record(&NodeId::new("a")).unwrap().is_offline());
        assert!(membership.live(|_| true).is_empty(), "not a replica, not a subscriber");
        membership.expire(Instant::now() + Duration::from_secs(60));
        assert_eq!(status("a"), Some(PeerStatus::Offline));
        // Learnt offline from discovery (a node started after it left): no Joined event.
        let mut gone = record("b", &[]);
        gone.mark_offline();
        assert!(membership.discovered(gone));
        assert_eq!(status("b"), Some(PeerStatus::Offline));
        // Back: its fresh record makes it up again.
        membership.heartbeat(record("a", &["echo"]));
        assert_eq!(status("a"), Some(PeerStatus::Up));
        use PeerEventKind::*;
        assert_eq!(kinds(&mut events), vec![(Joined, "a".into()), (Left, "a".into()), (Joined, "a".into())]);
    }

    #[test]
    fn an_older_revision_arriving_late_does_not_replace_the_newer_record() {
        let membership = Membership::new(NodeId::new("me"), None);
        let mut old = record("peer", &[]);
        set_revision(&mut old, 7);
        let mut new = record("peer", &["svc"]);
        set_revision(&mut new, 8);
        membership.discovered(new.clone());
        membership.heartbeat(old);
        assert_eq!(membership.snapshot()[0].record, new, "the late, older heartbeat was ignored");
        let mut newer = record("peer", &[]);
        set_revision(&mut newer, 9);
        membership.heartbeat(newer.clone());
        assert_eq!(membership.snapshot()[0].record, newer);
        // A record without a revision (an older host) still replaces what is known.
        membership.heartbeat(record("peer", &["x"]));
        assert_eq!(membership.snapshot()[0].record.services, vec!["x".to_string()]);
    }

    #[test]
    fn own_records_are_ignored_and_withdrawal_removes() {
        let membership = Membership::new(NodeId::new("me"), None);
        membership.discovered(record("me", &[]));
        membership.discovered(record("b", &[]));
        membership.expire(Instant::now() + Duration::from_secs(3600));
        assert_eq!(membership.live(|_| true).len(), 1, "no timeout: never expires");
        membership.withdrawn(&NodeId::new("b"));
        assert!(membership.snapshot().is_empty());
    }
}
