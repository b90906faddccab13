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
//!
//! ## Bounds
//!
//! Anyone who can reach a node can send it a hello or a heartbeat, under any id: what they
//! make the table hold is bounded.
//!
//! - A record larger than [`MAX_RECORD_BYTES`](comms_plugin_api::node_limits::MAX_RECORD_BYTES) or with an invalid id ([`NodeRecord::check`])
//!   is refused, whoever reports it.
//! - A peer known only from its own hellos and heartbeats (**heard**, not reported by
//!   discovery) is removed once it has been down or offline for [`FORGET_AFTER_TIMEOUTS`]
//!   peer timeouts (it is learnt again from its next heartbeat). At most [`HEARD_PEER_LIMIT`]
//!   are kept: when that many are known, a new one takes the place of the one down the
//!   longest, and is refused if all are up.
//! - A peer reported by discovery (the static list of the config file, a discovery plugin) is
//!   kept while discovery reports it, down or offline, so that it stays addressable (a durable
//!   inbox takes what is sent to it). At most [`PEER_LIMIT`] peers are known in all; discovery
//!   reporting more is refused. When discovery stops reporting a peer that was itself heard
//!   from within the peer timeout, the peer stays as a heard one (see
//!   [`Membership::withdrawn`]).
//!
//! ## Cost
//!
//! What the engine asks for each message does not walk the table:
//! - the next instant a peer may expire is a bound kept as entries change: at or before the
//!   earliest expiry, exact after each [`Membership::expire`];
//! - the replicas of a service, and the subscribers of a topic, come from an index of the
//!   records (`RecordIndex`); patterns with a wildcard are in a tree of their segments
//!   (`PatternIndex`), which a publication walks along its topic's segments.
//!
//! `expire`, heartbeats to every peer, and the lists of all peers (`live`, `snapshot`) walk it.
//! `tests/benches/peer_table.rs` measures a message's cost with 2 and with 1,002 peers known.

use super::pattern_index::PatternIndex;
use crate::control::revision;
use comms_plugin_api::{NodeId, NodeRecord, PeerEvent, PeerEventKind};
use std::{
    collections::{BTreeSet, HashMap},
    time::{Duration, Instant},
};

/// Peers known only from their own hellos and heartbeats (see the module documentation).
pub(crate) const HEARD_PEER_LIMIT: usize = 1024;

/// Peers known in all, discovery's included.
pub(crate) const PEER_LIMIT: usize = 16 * 1024;

/// A heard peer down (or offline) for this many peer timeouts is removed.
pub(crate) const FORGET_AFTER_TIMEOUTS: u32 = 10;

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
    /// When the peer itself was last heard from (any message of its own), if ever.
    heard_at: Option<Instant>,
    /// Reported by discovery (kept while discovery reports it), not only heard from.
    announced: bool,
    /// When it last went down or offline; `None` while up.
    down_since: Option<Instant>,
}

impl PeerEntry {
    fn set_status(&mut self, status: PeerStatus, now: Instant) {
        if status == PeerStatus::Up {
            self.down_since = None;
        } else if self.status == PeerStatus::Up || self.down_since.is_none() {
            self.down_since = Some(now);
        }
        self.status = status;
    }
}

/// Who reports a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// Discovery (the config file's static list, a discovery plugin).
    Discovery,
    /// The peer itself (a hello or heartbeat): anyone can send one, under any id.
    Heard,
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
    /// How many entries of `peers` are not `announced`.
    heard: usize,
    /// `None`: liveness is off, peers never expire.
    timeout: Option<Duration>,
    /// No peer goes down or is forgotten before this: at or before the earliest such instant
    /// (see [`Membership::next_expiry`]).
    expiry_bound: Option<Instant>,
    /// The peers by the services and topics their records list.
    index: RecordIndex,
}

/// The peers (any status) by what their records list, so that a request finds the replicas of
/// its service, and a publication the subscribers of its topic, without a walk over the table.
#[derive(Debug, Default)]
struct RecordIndex {
    by_service: HashMap<String, BTreeSet<NodeId>>,
    /// Topic patterns without wildcards: each matches only itself.
    by_topic: HashMap<String, BTreeSet<NodeId>>,
    /// Topic patterns with a wildcard (`*`, `>`), in a tree of their segments.
    by_wildcard_pattern: PatternIndex,
}

fn has_wildcard(pattern: &str) -> bool {
    pattern.split('.').any(|segment| segment == "*" || segment == ">")
}

fn services(record: Option<&NodeRecord>) -> Vec<&String> {
    record.map(|record| record.services.iter().collect()).unwrap_or_default()
}

/// The topic patterns with (`true`) or without (`false`) wildcards.
fn topics(record: Option<&NodeRecord>, wildcards: bool) -> Vec<&String> {
    record
        .map(|record| record.topics.iter().filter(|pattern| has_wildcard(pattern) == wildcards).collect())
        .unwrap_or_default()
}

/// Moves `id` in `index` from the keys `old` to the keys `new`.
fn move_keys(index: &mut HashMap<String, BTreeSet<NodeId>>, id: &NodeId, old: &[&String], new: &[&String]) {
    for key in old.iter().filter(|key| !new.contains(key)) {
        if let Some(ids) = index.get_mut(key.as_str()) {
            ids.remove(id);
            if ids.is_empty() {
                index.remove(key.as_str());
            }
        }
    }
    for key in new.iter().filter(|key| !old.contains(key)) {
        index.entry((*key).clone()).or_default().insert(id.clone());
    }
}

impl RecordIndex {
    /// The record of `id` goes from `old` to `new` (`None`: not in the table).
    fn update(&mut self, id: &NodeId, old: Option<&NodeRecord>, new: Option<&NodeRecord>) {
        move_keys(&mut self.by_service, id, &services(old), &services(new));
        move_keys(&mut self.by_topic, id, &topics(old, false), &topics(new, false));
        let (old, new) = (topics(old, true), topics(new, true));
        for pattern in old.iter().filter(|pattern| !new.contains(pattern)) {
            self.by_wildcard_pattern.remove(pattern, id);
        }
        for pattern in new.iter().filter(|pattern| !old.contains(pattern)) {
            self.by_wildcard_pattern.insert(pattern, id);
        }
    }
}

/// How long a peer heard from (not announced by discovery) is remembered after it went down.
fn forget_after(timeout: Duration) -> Duration {
    timeout * FORGET_AFTER_TIMEOUTS
}

/// When `entry` goes down (while up) or is forgotten (a heard peer while down), if ever.
fn expiry_of(entry: &PeerEntry, timeout: Duration) -> Option<Instant> {
    match entry.down_since {
        None => Some(entry.last_seen + timeout),
        Some(since) if !entry.announced => Some(since + forget_after(timeout)),
        Some(_) => None,
    }
}

/// Brings `bound` forward to `entry`'s expiry, if that is earlier. Called after every change to
/// an entry, so that the bound never passes the earliest expiry. An entry whose expiry moves
/// later, or that is removed, leaves the bound early: the timer then ticks early once, and
/// [`Membership::expire`] sets the bound exactly.
fn bound_expiry(bound: &mut Option<Instant>, timeout: Option<Duration>, entry: &PeerEntry) {
    if let Some(expiry) = timeout.and_then(|timeout| expiry_of(entry, timeout)) {
        *bound = Some(bound.map_or(expiry, |bound| bound.min(expiry)));
    }
}

impl Membership {
    pub(crate) fn new(local: NodeId, timeout: Option<Duration>) -> Self {
        Self {
            local,
            peers: HashMap::new(),
            heard: 0,
            timeout,
            expiry_bound: None,
            index: RecordIndex::default(),
        }
    }

    /// Brings the expiry bound forward to the entry of `id`'s, if that is earlier.
    fn bound_expiry_of(&mut self, id: &NodeId) {
        if let Some(entry) = self.peers.get(id) {
            bound_expiry(&mut self.expiry_bound, self.timeout, entry);
        }
    }

    /// How long a heard peer stays in the table once down; `None`: liveness is off, peers
    /// are never down (the heard ones stay bounded by [`HEARD_PEER_LIMIT`]).
    fn forget_after(&self) -> Option<Duration> {
        self.timeout.map(forget_after)
    }

    /// `source` reports `record`: a record that says the node is offline makes it offline, any
    /// other makes it up. `Err` with the reason (for the log) when it is refused: an invalid id,
    /// a record over `MAX_RECORD_BYTES`, or no room (see the module documentation).
    pub(crate) fn learn(
        &mut self,
        record: NodeRecord,
        source: Source,
        now: Instant,
        events: &mut Vec<PeerEvent>,
    ) -> Result<Learned, String> {
        let id = record.id.clone();
        let learned = self.learn_record(record, source, now, events);
        if learned.is_ok() {
            self.bound_expiry_of(&id);
        }
        learned
    }

    fn learn_record(
        &mut self,
        record: NodeRecord,
        source: Source,
        now: Instant,
        events: &mut Vec<PeerEvent>,
    ) -> Result<Learned, String> {
        if record.id == self.local {
            return Ok(Learned::Nothing);
        }
        record.check()?;
        let status = if record.is_offline() { PeerStatus::Offline } else { PeerStatus::Up };
        match self.peers.get_mut(&record.id) {
            None => {
                self.make_room(&record.id, source)?;
                let kind = if status == PeerStatus::Up { PeerEventKind::Joined } else { PeerEventKind::Left };
                events.push(PeerEvent { kind, record: record.clone() });
                let announced = source == Source::Discovery;
                let down_since = (status != PeerStatus::Up).then_some(now);
                if !announced {
                    self.heard += 1;
                }
                self.index.update(&record.id, None, Some(&record));
                let heard_at = (source == Source::Heard).then_some(now);
                let entry = PeerEntry { record, status, last_seen: now, heard_at, announced, down_since };
                self.peers.insert(entry.record.id.clone(), entry);
                Ok(Learned::New)
            }
            Some(entry) => {
                if source == Source::Discovery && !entry.announced {
                    entry.announced = true;
                    self.heard -= 1;
                }
                if source == Source::Heard {
                    entry.heard_at = Some(now);
                }
                let stale = matches!((revision(&entry.record), revision(&record)), (Some(known), Some(new)) if new < known);
                if stale {
                    // An older copy arriving late still says the peer is alive.
                    if status == PeerStatus::Up {
                        entry.last_seen = now;
                        return Ok(Self::revive(entry, events));
                    }
                    return Ok(Learned::Nothing);
                }
                entry.last_seen = now;
                let changed = entry.record != record;
                if entry.record.services != record.services || entry.record.topics != record.topics {
                    self.index.update(&record.id, Some(&entry.record), Some(&record));
                }
                entry.record = record;
                let before = entry.status;
                entry.set_status(status, now);
                Ok(match (before, status) {
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
                })
            }
        }
    }

    /// Makes room for a new peer `id` from `source`, or says why there is none.
    fn make_room(&mut self, id: &NodeId, source: Source) -> Result<(), String> {
        if self.peers.len() >= PEER_LIMIT {
            // Room is made from heard peers only: discovery's are kept while it reports them.
            if self.forget_longest_down_heard().is_none() {
                return Err(format!(
                    "peer `{id}` not added: the node knows {PEER_LIMIT} peers, its limit (none of them \
                     down and known only from its heartbeats)"
                ));
            }
        }
        if source == Source::Heard
            && self.heard >= HEARD_PEER_LIMIT
            && self.forget_longest_down_heard().is_none()
        {
            return Err(format!(
                "peer `{id}` not added: {HEARD_PEER_LIMIT} peers known only from their own heartbeats are up, \
                 the limit (a peer reported by discovery is always added)"
            ));
        }
        Ok(())
    }

    /// Removes the heard peer that has been down (or offline) the longest, if any is.
    fn forget_longest_down_heard(&mut self) -> Option<NodeId> {
        let id = self
            .peers
            .values()
            .filter(|entry| !entry.announced)
            .filter_map(|entry| entry.down_since.map(|since| (since, &entry.record.id)))
            .min()
            .map(|(_, id)| id.clone())?;
        self.remove(&id);
        Some(id)
    }

    fn remove(&mut self, id: &NodeId) -> Option<PeerEntry> {
        let entry = self.peers.remove(id)?;
        self.index.update(id, Some(&entry.record), None);
        if !entry.announced {
            self.heard -= 1;
        }
        Some(entry)
    }

    fn revive(entry: &mut PeerEntry, events: &mut Vec<PeerEvent>) -> Learned {
        if entry.status == PeerStatus::Up {
            return Learned::Nothing;
        }
        entry.status = PeerStatus::Up;
        entry.down_since = None;
        events.push(PeerEvent { kind: PeerEventKind::Joined, record: entry.record.clone() });
        Learned::Changed
    }

    /// Any message from `id`: it is alive. `false` if `id` is not in the table.
    pub(crate) fn heard_from(&mut self, id: &NodeId, now: Instant, events: &mut Vec<PeerEvent>) -> bool {
        match self.peers.get_mut(id) {
            Some(entry) => {
                entry.last_seen = now;
                entry.heard_at = Some(now);
                Self::revive(entry, events);
                bound_expiry(&mut self.expiry_bound, self.timeout, entry);
                true
            }
            None => false,
        }
    }

    /// `id` said goodbye: down now, or offline if it said its inbox keeps messages for it.
    pub(crate) fn goodbye(&mut self, id: &NodeId, offline: bool, now: Instant, events: &mut Vec<PeerEvent>) {
        if let Some(entry) = self.peers.get_mut(id) {
            let was_up = entry.status == PeerStatus::Up;
            entry.set_status(if offline { PeerStatus::Offline } else { PeerStatus::Down }, now);
            if was_up {
                events.push(PeerEvent { kind: PeerEventKind::Left, record: entry.record.clone() });
            }
            self.bound_expiry_of(id);
        }
    }

    /// Discovery says `id` left (withdrew, expired, or stopped answering discovery's own
    /// requests): forgotten, unless the peer itself was heard from within the peer timeout.
    /// Such a peer stays, as one known only from its own messages, and goes down as any of
    /// those does once it falls silent: discovery's view can be wrong while the peer talks to
    /// this node (a Kademlia contact that missed two requests on a loaded machine was withdrawn
    /// while its messages kept coming, and a message from it then could not be answered).
    /// With liveness off nothing would ever take such a peer down, so it is forgotten.
    pub(crate) fn withdrawn(&mut self, id: &NodeId, now: Instant, events: &mut Vec<PeerEvent>) {
        let Some(entry) = self.peers.get_mut(id) else { return };
        let heard_lately = self
            .timeout
            .zip(entry.heard_at)
            .is_some_and(|(timeout, heard_at)| now.saturating_duration_since(heard_at) <= timeout);
        if heard_lately
            && entry.status == PeerStatus::Up
            && (!entry.announced || self.heard < HEARD_PEER_LIMIT)
        {
            if entry.announced {
                entry.announced = false;
                self.heard += 1;
            }
            self.bound_expiry_of(id);
            return;
        }
        if let Some(entry) = self.remove(id).filter(|entry| entry.status == PeerStatus::Up) {
            events.push(PeerEvent { kind: PeerEventKind::Left, record: entry.record });
        }
    }

    /// Marks down every up peer silent for longer than the timeout, and removes the heard
    /// peers down for [`FORGET_AFTER_TIMEOUTS`] timeouts; returns the ids removed.
    pub(crate) fn expire(&mut self, now: Instant, events: &mut Vec<PeerEvent>) -> Vec<NodeId> {
        let (Some(timeout), Some(forget_after)) = (self.timeout, self.forget_after()) else {
            return Vec::new();
        };
        let mut forgotten = Vec::new();
        for entry in self.peers.values_mut() {
            if entry.status == PeerStatus::Up && now.saturating_duration_since(entry.last_seen) > timeout {
                entry.set_status(PeerStatus::Down, now);
                events.push(PeerEvent { kind: PeerEventKind::Left, record: entry.record.clone() });
            }
            let forget =
                entry.down_since.is_some_and(|since| now.saturating_duration_since(since) >= forget_after);
            if forget && !entry.announced {
                forgotten.push(entry.record.id.clone());
            }
        }
        for id in &forgotten {
            self.remove(id);
        }
        self.expiry_bound = self.earliest_expiry();
        forgotten
    }

    /// When [`Membership::expire`] is next due: at or before the instant the next peer would go
    /// down or be removed (exactly that after an `expire`; earlier when a peer was heard from
    /// since, which moved its own expiry later). Taken after every message, so it is kept as it
    /// changes instead of found by a walk over the table.
    pub(crate) fn next_expiry(&self) -> Option<Instant> {
        self.timeout.and(self.expiry_bound)
    }

    /// The instant the next peer would go down or be removed, if any can: a walk over the table.
    fn earliest_expiry(&self) -> Option<Instant> {
        let timeout = self.timeout?;
        self.peers.values().filter_map(|entry| expiry_of(entry, timeout)).min()
    }

    /// How many peers are known, and how many of them only from their own heartbeats.
    #[cfg(test)]
    pub(crate) fn size(&self) -> (usize, usize) {
        (self.peers.len(), self.heard)
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

    /// The up peers whose records list `service`, sorted by id: from the index, without a walk
    /// over the table.
    pub(crate) fn live_serving(&self, service: &str) -> Vec<&NodeRecord> {
        let Some(ids) = self.index.by_service.get(service) else { return Vec::new() };
        ids.iter()
            .filter_map(|id| self.peers.get(id))
            .filter(|entry| entry.status == PeerStatus::Up)
            .map(|entry| &entry.record)
            .collect()
    }

    /// Whether an up peer's record lists `service`.
    pub(crate) fn any_live_serving(&self, service: &str) -> bool {
        self.index.by_service.get(service).is_some_and(|ids| {
            ids.iter().any(|id| self.peers.get(id).is_some_and(|entry| entry.status == PeerStatus::Up))
        })
    }

    /// The up peers with a topic pattern matching `topic` for which `keep` holds, sorted by id:
    /// those with the topic itself and those with a wildcard pattern that matches it, from the
    /// index (their patterns are checked again here).
    pub(crate) fn live_subscribed(
        &self,
        topic: &str,
        keep: impl Fn(&NodeRecord) -> bool,
    ) -> Vec<&NodeRecord> {
        let mut candidates: BTreeSet<&NodeId> =
            self.index.by_topic.get(topic).into_iter().flatten().collect();
        self.index.by_wildcard_pattern.matching(topic, &mut candidates);
        candidates
            .into_iter()
            .filter_map(|id| self.peers.get(id))
            .filter(|entry| {
                entry.status == PeerStatus::Up
                    && entry.record.topics.iter().any(|pattern| crate::topics::matches(pattern, topic))
                    && keep(&entry.record)
            })
            .map(|entry| &entry.record)
            .collect()
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

    /// A number below its argument at each call, from a xorshift sequence started at `seed`.
    fn pseudo_random(mut seed: u64) -> impl FnMut(u64) -> u64 {
        move |below| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % below
        }
    }

    fn kinds(events: &[PeerEvent]) -> Vec<(PeerEventKind, String)> {
        events.iter().map(|event| (event.kind, event.record.id.to_string())).collect()
    }

    #[test]
    fn join_update_expire_return_and_goodbye() {
        let start = Instant::now();
        let mut membership = Membership::new(NodeId::new("me"), Some(Duration::from_millis(100)));
        let mut events = Vec::new();
        assert_eq!(
            membership.learn(record("a", &[]), Source::Discovery, start, &mut events),
            Ok(Learned::New)
        );
        assert_eq!(
            membership.learn(record("a", &[]), Source::Discovery, start, &mut events),
            Ok(Learned::Nothing)
        );
        assert_eq!(
            membership.learn(record("a", &["echo"]), Source::Discovery, start, &mut events),
            Ok(Learned::Changed)
        );
        assert_eq!(membership.live(|r| r.services.contains(&"echo".to_string())).len(), 1);
        assert_eq!(membership.next_expiry(), Some(start + Duration::from_millis(100)));
        let _ = membership.expire(start + Duration::from_millis(150), &mut events);
        assert!(membership.live(|_| true).is_empty());
        membership.heard_from(&NodeId::new("a"), start + Duration::from_millis(160), &mut events);
        membership.goodbye(&NodeId::new("a"), false, start, &mut events);
        membership.goodbye(&NodeId::new("a"), false, start, &mut events);
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
        membership.learn(new.clone(), Source::Discovery, now, &mut events).unwrap();
        assert_eq!(membership.learn(old, Source::Discovery, now, &mut events), Ok(Learned::Nothing));
        assert_eq!(membership.snapshot(now)[0].record, new, "the late, older heartbeat was ignored");
        let mut newer = record("peer", &[]);
        set_revision(&mut newer, 9);
        membership.learn(newer.clone(), Source::Discovery, now, &mut events).unwrap();
        assert_eq!(membership.snapshot(now)[0].record, newer);
        // A record without a revision (an older host) still replaces what is known.
        membership.learn(record("peer", &["x"]), Source::Discovery, now, &mut events).unwrap();
        assert_eq!(membership.snapshot(now)[0].record.services, vec!["x".to_string()]);
    }

    #[test]
    fn an_offline_peer_stays_addressable_and_comes_back() {
        let now = Instant::now();
        let mut membership = Membership::new(NodeId::new("me"), Some(Duration::from_secs(1)));
        let mut events = Vec::new();
        membership.learn(record("d", &[]), Source::Discovery, now, &mut events).unwrap();
        membership.goodbye(&NodeId::new("d"), true, now, &mut events);
        assert_eq!(membership.get(&NodeId::new("d")).map(|(_, s)| s), Some(PeerStatus::Offline));
        assert!(membership.live(|_| true).is_empty(), "offline is not live");
        let _ = membership.expire(now + Duration::from_secs(10), &mut events);
        assert_eq!(
            membership.get(&NodeId::new("d")).map(|(_, s)| s),
            Some(PeerStatus::Offline),
            "never expires"
        );
        // A record marked offline (from discovery) makes a new peer offline at once.
        let mut gone = record("e", &[]);
        gone.mark_offline();
        membership.learn(gone, Source::Discovery, now, &mut events).unwrap();
        assert_eq!(membership.get(&NodeId::new("e")).map(|(_, s)| s), Some(PeerStatus::Offline));
        membership.heard_from(&NodeId::new("d"), now, &mut events);
        assert_eq!(membership.get(&NodeId::new("d")).map(|(_, s)| s), Some(PeerStatus::Up));
        use PeerEventKind::*;
        assert_eq!(
            kinds(&events),
            vec![(Joined, "d".into()), (Left, "d".into()), (Left, "e".into()), (Joined, "d".into())]
        );
    }

    /// The timer sleeps until `next_expiry`, which is kept as peers change rather than found
    /// by a walk over the table: it must never pass the earliest expiry (a peer would then stay
    /// up past its timeout), and an `expire` makes it exact. Random changes, simulated time.
    #[test]
    fn the_next_expiry_never_passes_the_earliest_and_expire_makes_it_exact() {
        let timeout = Duration::from_millis(100);
        let mut now = Instant::now();
        let mut membership = Membership::new(NodeId::new("me"), Some(timeout));
        let mut events = Vec::new();
        let mut next = pseudo_random(0x2545_f491_4f6c_dd1du64);
        let (mut ticks, mut went_down) = (0, 0);
        for step in 0..20_000 {
            now += Duration::from_millis(next(15));
            // The engine's timer: a tick once the bound is due.
            if membership.next_expiry().is_some_and(|due| due <= now) {
                ticks += 1;
                let _ = membership.expire(now, &mut events);
                assert_eq!(membership.next_expiry(), membership.earliest_expiry(), "exact after expire");
            }
            let id = NodeId::new(format!("peer-{}", next(40)));
            match next(6) {
                0 | 1 => {
                    let mut peer = record(id.as_str(), &[]);
                    if next(5) == 0 {
                        peer.mark_offline();
                    }
                    let source = if next(2) == 0 { Source::Discovery } else { Source::Heard };
                    let _ = membership.learn(peer, source, now, &mut events);
                }
                2 | 3 => {
                    membership.heard_from(&id, now, &mut events);
                }
                4 => membership.goodbye(&id, next(2) == 0, now, &mut events),
                _ => membership.withdrawn(&id, now, &mut events),
            }
            let (bound, exact) = (membership.next_expiry(), membership.earliest_expiry());
            assert!(
                exact.is_none_or(|exact| bound.is_some_and(|bound| bound <= exact)),
                "step {step}: the timer would sleep until {bound:?}, past the earliest expiry {exact:?}"
            );
            // No peer is up past its timeout by more than a step (the ticks keep up).
            for info in membership.snapshot(now) {
                if info.status == PeerStatus::Up && info.last_seen > timeout + Duration::from_millis(15) {
                    panic!("step {step}: {} up, silent for {:?}", info.record.id, info.last_seen);
                }
            }
            went_down += events.iter().filter(|event| event.kind == PeerEventKind::Left).count();
            events.clear();
        }
        // The walk ran at the ticks only, and the ticks were not one per change.
        assert!(ticks > 100 && ticks < 10_000, "{ticks} ticks");
        assert!(went_down > 100, "peers went down ({went_down})");
    }

    /// The replicas of a service and the subscribers of a topic come from an index kept as
    /// records change: under random joins, record changes, goodbyes, expiry and withdrawals it
    /// always says what a walk over the table says.
    #[test]
    fn replicas_and_subscribers_from_the_index_are_those_a_walk_finds() {
        let timeout = Duration::from_millis(100);
        let mut now = Instant::now();
        let mut membership = Membership::new(NodeId::new("me"), Some(timeout));
        let mut events = Vec::new();
        let mut next = pseudo_random(0x9e37_79b9_7f4a_7c15u64);
        let services = ["echo", "store", "auth", "none"];
        // `orders.>.late` is invalid (`>` before the end); a peer that does not check sends it.
        let patterns = [
            "orders.eu",
            "orders.*",
            "orders.>",
            "audit",
            ">",
            "*.us",
            "orders.*.late",
            "*.*",
            "orders.>.late",
        ];
        let topics = ["orders.eu", "orders.us", "orders.eu.late", "audit", "audit.us", "other"];
        let mut found = 0;
        let mut subscribed = 0;
        for step in 0..20_000 {
            now += Duration::from_millis(next(10));
            let id = NodeId::new(format!("peer-{}", next(30)));
            match next(7) {
                0..=2 => {
                    let offered: Vec<&str> = services[..3].iter().copied().filter(|_| next(2) == 0).collect();
                    let mut peer = record(id.as_str(), &offered);
                    peer.topics = patterns.iter().filter(|_| next(3) == 0).map(|p| p.to_string()).collect();
                    if next(6) == 0 {
                        peer.mark_offline();
                    }
                    let source = if next(2) == 0 { Source::Discovery } else { Source::Heard };
                    let _ = membership.learn(peer, source, now, &mut events);
                }
                3 => {
                    membership.heard_from(&id, now, &mut events);
                }
                4 => membership.goodbye(&id, next(2) == 0, now, &mut events),
                5 => membership.withdrawn(&id, now, &mut events),
                _ => {
                    let _ = membership.expire(now, &mut events);
                }
            }
            for service in services {
                let walked = membership.live(|record| record.services.iter().any(|s| s == service));
                let indexed = membership.live_serving(service);
                assert_eq!(
                    indexed.iter().map(|r| &r.id).collect::<Vec<_>>(),
                    walked.iter().map(|r| &r.id).collect::<Vec<_>>(),
                    "step {step}: the replicas of {service}"
                );
                assert_eq!(membership.any_live_serving(service), !walked.is_empty());
                found += walked.len();
            }
            for topic in topics {
                // As the engine asks: some peers left out (those a native transport reaches).
                let keep = |record: &NodeRecord| !record.id.as_str().ends_with('7');
                let walked = membership.live(|record| {
                    record.topics.iter().any(|pattern| crate::topics::matches(pattern, topic)) && keep(record)
                });
                let indexed = membership.live_subscribed(topic, keep);
                assert_eq!(
                    indexed.iter().map(|r| &r.id).collect::<Vec<_>>(),
                    walked.iter().map(|r| &r.id).collect::<Vec<_>>(),
                    "step {step}: the subscribers of {topic}"
                );
                subscribed += walked.len();
            }
        }
        assert!(subscribed > 10_000, "subscribers were found ({subscribed})");
        assert!(membership.index.by_topic.values().all(|ids| !ids.is_empty()));
        assert!(found > 10_000, "replicas were found ({found})");
        assert!(membership.index.by_service.values().all(|ids| !ids.is_empty()), "no empty sets kept");
        assert!(membership.index.by_service.len() <= 3);
    }

    #[test]
    fn a_peer_heard_from_again_after_its_goodbye_is_timed_again() {
        let (timeout, now) = (Duration::from_millis(100), Instant::now());
        let mut membership = Membership::new(NodeId::new("me"), Some(timeout));
        let mut events = Vec::new();
        membership.learn(record("a", &[]), Source::Discovery, now, &mut events).unwrap();
        assert_eq!(membership.next_expiry(), Some(now + timeout));
        membership.goodbye(&NodeId::new("a"), false, now, &mut events);
        let _ = membership.expire(now, &mut events);
        assert_eq!(membership.next_expiry(), None, "down and reported by discovery: kept, never expires");
        let back = now + Duration::from_millis(10);
        membership.heard_from(&NodeId::new("a"), back, &mut events);
        assert_eq!(membership.next_expiry(), Some(back + timeout), "up again: down after a silent timeout");
    }

    #[test]
    fn a_withdrawn_peer_that_talks_to_this_node_stays_until_it_falls_silent() {
        let timeout = Duration::from_millis(100);
        let start = Instant::now();
        let mut membership = Membership::new(NodeId::new("me"), Some(timeout));
        let mut events = Vec::new();
        for id in ["talks", "reported", "talked-long-ago"] {
            membership.learn(record(id, &["echo"]), Source::Discovery, start, &mut events).unwrap();
        }
        let heard = start + Duration::from_millis(150);
        membership.heard_from(&NodeId::new("talked-long-ago"), start, &mut events);
        membership.heard_from(&NodeId::new("talks"), heard, &mut events);
        events.clear();
        let withdrawn = heard + Duration::from_millis(50);
        for id in ["talks", "reported", "talked-long-ago"] {
            membership.withdrawn(&NodeId::new(id), withdrawn, &mut events);
        }
        let left: Vec<&str> = events.iter().map(|event| event.record.id.as_str()).collect();
        assert_eq!(left, ["reported", "talked-long-ago"], "only the one heard within the timeout stays");
        let serving: Vec<&str> = membership.live_serving("echo").iter().map(|r| r.id.as_str()).collect();
        assert_eq!(serving, ["talks"], "still up, and still a replica of its services");
        // It is now a peer known from its own messages: down once silent for the timeout, then
        // forgotten as such a peer is.
        events.clear();
        assert!(membership.expire(heard + timeout, &mut events).is_empty() && events.is_empty());
        let silent = heard + timeout + Duration::from_millis(1);
        let _ = membership.expire(silent, &mut events);
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!((events[0].kind, events[0].record.id.as_str()), (PeerEventKind::Left, "talks"));
        let forgotten = membership.expire(silent + forget_after(timeout), &mut events);
        assert_eq!(forgotten, [NodeId::new("talks")]);
        assert!(membership.snapshot(silent).is_empty());
    }

    #[test]
    fn own_records_are_ignored_and_withdrawal_removes() {
        let now = Instant::now();
        let mut membership = Membership::new(NodeId::new("me"), None);
        let mut events = Vec::new();
        membership.learn(record("me", &[]), Source::Discovery, now, &mut events).unwrap();
        membership.learn(record("b", &[]), Source::Discovery, now, &mut events).unwrap();
        let _ = membership.expire(now + Duration::from_secs(3600), &mut events);
        assert_eq!(membership.live(|_| true).len(), 1, "no timeout: never expires");
        membership.withdrawn(&NodeId::new("b"), now, &mut events);
        assert!(membership.snapshot(now).is_empty());
    }
}
