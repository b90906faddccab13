//! Who is out there and alive: the peer table, fed by discovery, heartbeats and goodbyes.
//!
//! A peer is **up** from the moment discovery reports it or it is heard from (any message
//! counts), and **down** once nothing has been heard from it for `peer_timeout`, or at once when
//! it says goodbye. A peer whose transport keeps an inbox (a durable one) and that closed cleanly
//! is **offline**: it is not alive, but messages sent to it wait in its inbox until it returns,
//! so it stays addressable. A down or offline peer that is heard from again is up again.
//!
//! Every change is reported as a [`PeerEvent`]: `Joined` (up), `Left` (down, offline or
//! withdrawn), `Updated` (its record changed: addresses, services, topics). The table is plain
//! data: time is passed in, events are returned, nothing here waits or locks.

use crate::control::revision;
use comms_plugin_api::{NodeId, NodeRecord, PeerEvent, PeerEventKind};
use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

/// Whether a peer is considered alive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerStatus {
    /// Heard from within the timeout (or just reported by discovery).
    Up,
    /// Silent for longer than the timeout, or said goodbye.
    Down,
    /// Closed cleanly, and its transport keeps its inbox: messages sent now wait for it.
    Offline,
}

impl PeerStatus {
    /// `up`, `down` or `offline`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Up => "up",
            Self::Down => "down",
            Self::Offline => "offline",
        }
    }
}

/// A peer as this node sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerInfo {
    /// Its latest record.
    pub record: NodeRecord,
    /// Up, down or offline.
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

/// What learning a record changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Learned {
    /// A peer this node did not know.
    New,
    /// A known peer came back, or its record changed.
    Changed,
    /// Nothing new (same record, or an older revision arriving late).
    Nothing,
}

/// The peer table.
#[derive(Debug)]
pub(crate) struct Membership {
    local: NodeId,
    peers: HashMap<NodeId, PeerEntry>,
    /// `None`: liveness is off, peers never expire.
    timeout: Option<Duration>,
}

impl Membership {
    pub(crate) fn new(local: NodeId, timeout: Option<Duration>) -> Self {
        Self { local, peers: HashMap::new(), timeout }
    }

    /// Discovery reports `record`, or a peer sent it (hello, heartbeat): a record that says the
    /// node is offline makes it offline, any other makes it up.
    pub(crate) fn learn(&mut self, record: NodeRecord, now: Instant, events: &mut Vec<PeerEvent>) -> Learned {
        if record.id == self.local {
            return Learned::Nothing;
        }
        let status = if record.is_offline() { PeerStatus::Offline } else { PeerStatus::Up };
        match self.peers.get_mut(&record.id) {
            None => {
                let kind = if status == PeerStatus::Up { PeerEventKind::Joined } else { PeerEventKind::Left };
                events.push(PeerEvent { kind, record: record.clone() });
                self.peers.insert(record.id.clone(), PeerEntry { record, status, last_seen: now });
                Learned::New
            }
            Some(entry) => {
                let stale = matches!((revision(&entry.record), revision(&record)), (Some(known), Some(new)) if new < known);
                if stale {
                    // An older copy arriving late still says the peer is alive.
                    if status == PeerStatus::Up {
                        entry.last_seen = now;
                        return Self::revive(entry, events);
                    }
                    return Learned::Nothing;
                }
                entry.last_seen = now;
                let changed = entry.record != record;
                entry.record = record;
                let before = entry.status;
                entry.status = status;
                match (before, status) {
                    (PeerStatus::Up, PeerStatus::Up) if changed => {
                        events.push(PeerEvent { kind: PeerEventKind::Updated, record: entry.record.clone() });
                        Learned::Changed
                    }
                    (PeerStatus::Up, PeerStatus::Up) => Learned::Nothing,
                    (_, PeerStatus::Up) => {
                        events.push(PeerEvent { kind: PeerEventKind::Joined, record: entry.record.clone() });
                        Learned::Changed
                    }
                    (PeerStatus::Up, _) => {
                        events.push(PeerEvent { kind: PeerEventKind::Left, record: entry.record.clone() });
                        Learned::Changed
                    }
                    _ if changed => Learned::Changed,
                    _ => Learned::Nothing,
                }
            }
        }
    }

    fn revive(entry: &mut PeerEntry, events: &mut Vec<PeerEvent>) -> Learned {
        if entry.status == PeerStatus::Up {
            return Learned::Nothing;
        }
        entry.status = PeerStatus::Up;
        events.push(PeerEvent { kind: PeerEventKind::Joined, record: entry.record.clone() });
        Learned::Changed
    }

    /// Any message from `id`: it is alive. `false` if `id` is not in the table.
    pub(crate) fn heard_from(&mut self, id: &NodeId, now: Instant, events: &mut Vec<PeerEvent>) -> bool {
        match self.peers.get_mut(id) {
            Some(entry) => {
                entry.last_seen = now;
                Self::revive(entry, events);
                true
            }
            None => false,
        }
    }

    /// `id` said goodbye: down now, or offline if it said its inbox keeps messages for it.
    pub(crate) fn goodbye(&mut self, id: &NodeId, offline: bool, events: &mut Vec<PeerEvent>) {
        if let Some(entry) = self.peers.get_mut(id) {
            let was_up = entry.status == PeerStatus::Up;
            entry.status = if offline { PeerStatus::Offline } else { PeerStatus::Down };
            if was_up {
                events.push(PeerEvent { kind: PeerEventKind::Left, record: entry.record.clone() });
            }
        }
    }

    /// Discovery says `id` left (withdrew or expired): forgotten.
    pub(crate) fn withdrawn(&mut self, id: &NodeId, events: &mut Vec<PeerEvent>) {
        if let Some(entry) = self.peers.remove(id).filter(|entry| entry.status == PeerStatus::Up) {
            events.push(PeerEvent { kind: PeerEventKind::Left, record: entry.record });
        }
    }

    /// Marks down every up peer silent for longer than the timeout.
    pub(crate) fn expire(&mut self, now: Instant, events: &mut Vec<PeerEvent>) {
        let Some(timeout) = self.timeout else { return };
        for entry in self.peers.values_mut() {
            if entry.status == PeerStatus::Up && now.saturating_duration_since(entry.last_seen) > timeout {
                entry.status = PeerStatus::Down;
                events.push(PeerEvent { kind: PeerEventKind::Left, record: entry.record.clone() });
            }
        }
    }

    /// When the next peer would expire, if any can.
    pub(crate) fn next_expiry(&self) -> Option<Instant> {
        let timeout = self.timeout?;
        self.peers.values().filter(|e| e.status == PeerStatus::Up).map(|e| e.last_seen + timeout).min()
    }

    /// The latest record of `id` and its status.
    pub(crate) fn get(&self, id: &NodeId) -> Option<(&NodeRecord, PeerStatus)> {
        self.peers.get(id).map(|entry| (&entry.record, entry.status))
    }

    /// The up peers for which `keep` holds, sorted by id.
    pub(crate) fn live(&self, keep: impl Fn(&NodeRecord) -> bool) -> Vec<&NodeRecord> {
        let mut live: Vec<&NodeRecord> = self
            .peers
            .values()
            .filter(|entry| entry.status == PeerStatus::Up && keep(&entry.record))
            .map(|entry| &entry.record)
            .collect();
        live.sort_by(|a, b| a.id.cmp(&b.id));
        live
    }

    /// The table, sorted by id.
    pub(crate) fn snapshot(&self, now: Instant) -> Vec<PeerInfo> {
        let mut list: Vec<PeerInfo> = self
            .peers
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
    use crate::control::set_revision;

    fn record(id: &str, services: &[&str]) -> NodeRecord {
        let mut record = NodeRecord::new(id);
        record.services = services.iter().map(|s| s.to_string()).collect();
        record
    }

    fn kinds(events: &[PeerEvent]) -> Vec<(PeerEventKind, String)> {
        events.iter().map(|event| (event.kind, event.record.id.to_string())).collect()
    }

    #[test]
    fn join_update_expire_return_and_goodbye() {
        let start = Instant::now();
        let mut membership = Membership::new(NodeId::new("me"), Some(Duration::from_millis(100)));
        let mut events = Vec::new();
        assert_eq!(membership.learn(record("a", &[]), start, &mut events), Learned::New);
        assert_eq!(membership.learn(record("a", &[]), start, &mut events), Learned::Nothing);
        assert_eq!(membership.learn(record("a", &["echo"]), start, &mut events), Learned::Changed);
        assert_eq!(membership.live(|r| r.services.contains(&"echo".to_string())).len(), 1);
        assert_eq!(membership.next_expiry(), Some(start + Duration::from_millis(100)));
        membership.expire(start + Duration::from_millis(150), &mut events);
        assert!(membership.live(|_| true).is_empty());
        membership.heard_from(&NodeId::new("a"), start + Duration::from_millis(160), &mut events);
        membership.goodbye(&NodeId::new("a"), false, &mut events);
        membership.goodbye(&NodeId::new("a"), false, &mut events);
        use PeerEventKind::*;
        assert_eq!(
            kinds(&events),
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
    fn an_older_revision_arriving_late_does_not_replace_the_newer_record() {
        let now = Instant::now();
        let mut membership = Membership::new(NodeId::new("me"), None);
        let mut events = Vec::new();
        let mut old = record("peer", &[]);
        set_revision(&mut old, 7);
        let mut new = record("peer", &["svc"]);
        set_revision(&mut new, 8);
        membership.learn(new.clone(), now, &mut events);
        assert_eq!(membership.learn(old, now, &mut events), Learned::Nothing);
        assert_eq!(membership.snapshot(now)[0].record, new, "the late, older heartbeat was ignored");
        let mut newer = record("peer", &[]);
        set_revision(&mut newer, 9);
        membership.learn(newer.clone(), now, &mut events);
        assert_eq!(membership.snapshot(now)[0].record, newer);
        // A record without a revision (an older host) still replaces what is known.
        membership.learn(record("peer", &["x"]), now, &mut events);
        assert_eq!(membership.snapshot(now)[0].record.services, vec!["x".to_string()]);
    }

    #[test]
    fn an_offline_peer_stays_addressable_and_comes_back() {
        let now = Instant::now();
        let mut membership = Membership::new(NodeId::new("me"), Some(Duration::from_secs(1)));
        let mut events = Vec::new();
        membership.learn(record("d", &[]), now, &mut events);
        membership.goodbye(&NodeId::new("d"), true, &mut events);
        assert_eq!(membership.get(&NodeId::new("d")).map(|(_, s)| s), Some(PeerStatus::Offline));
        assert!(membership.live(|_| true).is_empty(), "offline is not live");
        membership.expire(now + Duration::from_secs(10), &mut events);
        assert_eq!(
            membership.get(&NodeId::new("d")).map(|(_, s)| s),
            Some(PeerStatus::Offline),
            "never expires"
        );
        // A record marked offline (from discovery) makes a new peer offline at once.
        let mut gone = record("e", &[]);
        gone.mark_offline();
        membership.learn(gone, now, &mut events);
        assert_eq!(membership.get(&NodeId::new("e")).map(|(_, s)| s), Some(PeerStatus::Offline));
        membership.heard_from(&NodeId::new("d"), now, &mut events);
        assert_eq!(membership.get(&NodeId::new("d")).map(|(_, s)| s), Some(PeerStatus::Up));
        use PeerEventKind::*;
        assert_eq!(
            kinds(&events),
            vec![(Joined, "d".into()), (Left, "d".into()), (Left, "e".into()), (Joined, "d".into())]
        );
    }

    #[test]
    fn own_records_are_ignored_and_withdrawal_removes() {
        let now = Instant::now();
        let mut membership = Membership::new(NodeId::new("me"), None);
        let mut events = Vec::new();
        membership.learn(record("me", &[]), now, &mut events);
        membership.learn(record("b", &[]), now, &mut events);
        membership.expire(now + Duration::from_secs(3600), &mut events);
        assert_eq!(membership.live(|_| true).len(), 1, "no timeout: never expires");
        membership.withdrawn(&NodeId::new("b"), &mut events);
        assert!(membership.snapshot(now).is_empty());
    }
}
