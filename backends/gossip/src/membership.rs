//! The member table: who is alive, suspect, dead or gone, at which incarnation, with which
//! record; and the rules that merge an update into it.
//!
//! ## Incarnations and precedence
//!
//! Every member owns a counter, its incarnation, that only it raises: to refute a suspicion (or
//! a death) about itself, and to publish a changed record. For an update about member `m` at
//! incarnation `i` against the table's incarnation `j` of `m`:
//!
//! - `Alive(i)` wins if `i > j` (or `m` is unknown): it carries the address and record, so a
//!   record change spreads as an `Alive` with a higher incarnation.
//! - `Suspect(i)` wins over an alive or suspect `m` if `i >= j`; it starts the suspicion timer.
//! - `Dead(i)` and `Left(i)` win over a live `m` if `i >= j`.
//! - An update about an unknown member that is not `Alive` is ignored (there is no record to
//!   keep).
//!
//! About **this** node: a `Suspect` or `Dead` at its incarnation or above is refuted by raising
//! the incarnation above it and gossiping `Alive` again, as is an `Alive` that contradicts the
//! local record (a stale or forged one). A `Left` about this node that it did not send is
//! refuted the same way.
//!
//! ## Bounds
//!
//! At most `max_members` entries, tombstones (dead and left members, kept for the retention time
//! so that stale gossip cannot resurrect them) included; when full, an `Alive` about a new member
//! evicts the oldest tombstone, or is refused and counted. An `Alive` whose id fails
//! `NodeId::check`, or whose record fails `NodeRecord::check` or does not fit in one update of
//! the configured datagram size, is refused and counted.
//!
//! ## Authenticated mode
//!
//! With [`Membership::authenticate`] (the node runs with `security.links = "noise"`), this
//! node's `Alive` carries its signature ([`crate::protocol::sign_alive`]), re-made whenever its
//! incarnation changes, and an `Alive` about another member is accepted only with that member's
//! signature by an allowed key bound to its id ([`crate::protocol::verify_alive`]): a member
//! relays other members' records but cannot forge or alter them. The signature is checked only
//! when the update is news (a higher incarnation or an unknown member); stale copies are dropped
//! unchecked, as in plaintext mode. An `Alive` about this node that fails the check is ignored
//! (nobody else accepts it either), not refuted.

use crate::{
    auth::LinkSecurity,
    protocol::{
        encode_update, finish_datagram, sign_alive, verify_alive, Address, RecordBytes, Update, COUNT_BYTES,
        MAX_INCARNATION, MAX_UPDATES_PER_DATAGRAM,
    },
};
use comms_plugin_api::{NodeId, NodeRecord, PeerEventKind};
use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

/// A member's state as this node sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Answering probes (as far as we know).
    Alive,
    /// Someone failed to reach it; dead unless it refutes within the suspicion timeout.
    Suspect,
    /// Declared dead after the suspicion timeout (a tombstone).
    Dead,
    /// Left gracefully (a tombstone).
    Left,
}

impl Status {
    /// Alive or suspect: still a peer.
    pub fn is_live(self) -> bool {
        matches!(self, Status::Alive | Status::Suspect)
    }
}

/// One member.
#[derive(Debug, Clone)]
pub struct Member<A> {
    /// Its incarnation.
    pub incarnation: u64,
    /// Its state.
    pub status: Status,
    /// Its gossip address.
    pub address: A,
    /// Its record.
    pub record: NodeRecord,
    /// Its `Alive` update, encoded once for state transfers.
    alive: Vec<u8>,
    /// When the status last changed.
    since: Instant,
    /// When a suspicion turns into death.
    suspect_until: Option<Instant>,
}

/// A change of peers for the application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberEvent {
    /// Joined, updated or left.
    pub kind: PeerEventKind,
    /// The member's record (for `Left`, the last one known).
    pub record: NodeRecord,
}

/// What merging one update did.
#[derive(Debug, Default)]
pub struct Outcome {
    /// The update changed the table: gossip it on.
    pub rebroadcast: bool,
    /// The update contradicted this node: its incarnation was raised; gossip its `Alive`.
    pub refuted: bool,
    /// The change the application hears of.
    pub event: Option<MemberEvent>,
    /// A member became live (new, or back from a tombstone): add it to the probe order.
    pub now_live: bool,
}

/// Counters of refused updates.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MembershipStats {
    /// `Alive` updates with an invalid id or record, or a record too large.
    pub invalid: u64,
    /// `Alive` updates about new members refused because the table was full.
    pub table_full: u64,
    /// Refutations of updates about this node.
    pub refutations: u64,
    /// `Alive` updates refused in authenticated mode: not signed by the member they are about
    /// (with an allowed key bound to its id).
    pub unauthenticated: u64,
}

/// This node's own state.
#[derive(Debug, Clone)]
struct Local<A> {
    id: String,
    address: A,
    incarnation: u64,
    record: Option<NodeRecord>,
    /// `record` as carried on the wire (without a signature).
    wire: Option<RecordBytes>,
    alive: Option<Vec<u8>>,
    left: bool,
}

/// The member table. See the [module documentation](self).
#[derive(Debug, Clone)]
pub struct Membership<A> {
    local: Local<A>,
    /// Ordered, so that iteration (probe order, table transfers, random choices) is the same
    /// in every run of a seeded simulation.
    members: BTreeMap<String, Member<A>>,
    suspicions: BTreeSet<(Instant, String)>,
    live: usize,
    max_members: usize,
    max_update_bytes: usize,
    /// Authenticated mode: sign our `Alive`, check the others'.
    security: Option<LinkSecurity>,
    stats: MembershipStats,
}

/// Why this node's record was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordError {
    /// The record names another node.
    WrongId {
        /// This node.
        expected: String,
        /// The record's id.
        found: String,
    },
    /// `NodeRecord::check` failed.
    Invalid(String),
    /// The encoded update would not fit in a datagram.
    TooLarge {
        /// Its size.
        bytes: usize,
        /// The limit.
        limit: usize,
    },
}

impl std::fmt::Display for RecordError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecordError::WrongId { expected, found } => {
                write!(f, "the record names node `{found}` but this gossip member is `{expected}`")
            }
            RecordError::Invalid(why) => write!(f, "{why}"),
            RecordError::TooLarge { bytes, limit } => write!(
                f,
                "the record takes {bytes} bytes on the wire; one gossip datagram carries at most {limit} \
                 (raise max_datagram, or announce fewer services, topics or metadata)"
            ),
        }
    }
}

impl std::error::Error for RecordError {}

impl<A: Address> Membership<A> {
    /// The table of node `id` gossiping at `address`: at most `max_members` entries and records
    /// whose `Alive` update takes at most `max_update_bytes`.
    pub fn new(id: &str, address: A, max_members: usize, max_update_bytes: usize) -> Self {
        Self {
            local: Local {
                id: id.to_string(),
                address,
                incarnation: 0,
                record: None,
                wire: None,
                alive: None,
                left: false,
            },
            members: BTreeMap::new(),
            suspicions: BTreeSet::new(),
            live: 0,
            max_members: max_members.max(1),
            max_update_bytes,
            security: None,
            stats: MembershipStats::default(),
        }
    }

    /// Switches to authenticated mode (see the [module documentation](self)) with records whose
    /// `Alive` takes at most `max_update_bytes`, signature included. Call before the first
    /// [`Membership::set_local_record`].
    pub fn authenticate(&mut self, security: LinkSecurity, max_update_bytes: usize) {
        self.security = Some(security);
        self.max_update_bytes = max_update_bytes;
        if let Some(wire) = self.local.wire.clone() {
            self.local.alive = Some(self.encode_local_alive(self.local.incarnation, &wire));
        }
    }

    /// Whether `Alive` updates are signed and checked.
    pub fn is_authenticated(&self) -> bool {
        self.security.is_some()
    }

    /// This node's `Alive` at `incarnation` with `wire`, signed in authenticated mode.
    fn encode_local_alive(&self, incarnation: u64, wire: &RecordBytes) -> Vec<u8> {
        let (id, address) = (self.local.id.clone(), self.local.address);
        let record = match &self.security {
            Some(security) => sign_alive(security, &id, incarnation, address, wire),
            None => wire.clone(),
        };
        encode_update(&Update::Alive { id, incarnation, address, record })
    }

    /// The record of an `Alive` without its signature: checked in authenticated mode (`None`,
    /// counted, if the signature is not its member's).
    fn checked_record(&mut self, update: &Update<A>) -> Option<RecordBytes> {
        let Update::Alive { record, .. } = update else { return None };
        let Some(security) = &self.security else { return Some(record.clone()) };
        match verify_alive(security, update) {
            Ok(record) => Some(record),
            Err(_) => {
                self.stats.unauthenticated += 1;
                None
            }
        }
    }

    /// This node's id.
    pub fn local_id(&self) -> &str {
        &self.local.id
    }

    /// This node's gossip address.
    pub fn local_address(&self) -> A {
        self.local.address
    }

    /// This node's incarnation.
    pub fn local_incarnation(&self) -> u64 {
        self.local.incarnation
    }

    /// Whether this node has a record and has not left: it is a member.
    pub fn is_member(&self) -> bool {
        self.local.alive.is_some() && !self.local.left
    }

    /// Whether this node left (and has not announced itself again).
    pub fn has_left(&self) -> bool {
        self.local.left
    }

    /// This node's `Alive` update, encoded, if it has a record.
    pub fn local_alive(&self) -> Option<&[u8]> {
        self.local.alive.as_deref()
    }

    /// Sets this node's record; raises the incarnation if it had one before or had left.
    /// `Ok(false)` if nothing changed.
    pub fn set_local_record(&mut self, record: NodeRecord) -> Result<bool, RecordError> {
        if record.id.as_str() != self.local.id {
            return Err(RecordError::WrongId {
                expected: self.local.id.clone(),
                found: record.id.to_string(),
            });
        }
        record.check().map_err(RecordError::Invalid)?;
        if self.local.record.as_ref() == Some(&record) && !self.local.left {
            return Ok(false);
        }
        let incarnation = if self.local.record.is_some() || self.local.left {
            self.local.incarnation + 1
        } else {
            self.local.incarnation
        };
        let wire = RecordBytes::from_record(&record);
        let alive = self.encode_local_alive(incarnation, &wire);
        if alive.len() > self.max_update_bytes {
            return Err(RecordError::TooLarge { bytes: alive.len(), limit: self.max_update_bytes });
        }
        self.local.incarnation = incarnation;
        self.local.record = Some(record);
        self.local.wire = Some(wire);
        self.local.alive = Some(alive);
        self.local.left = false;
        Ok(true)
    }

    /// Marks this node as leaving and returns its encoded `Left` update (`None` without a record).
    pub fn leave(&mut self) -> Option<Vec<u8>> {
        self.local.alive.as_ref()?;
        self.local.left = true;
        self.local.incarnation += 1;
        Some(encode_update::<A>(&Update::Left {
            id: self.local.id.clone(),
            incarnation: self.local.incarnation,
        }))
    }

    /// Raises this node's incarnation above `seen` and re-encodes its `Alive`.
    fn refute(&mut self, seen: u64) {
        self.stats.refutations += 1;
        self.local.incarnation = self.local.incarnation.max(seen).saturating_add(1).min(MAX_INCARNATION);
        if let Some(wire) = self.local.wire.clone() {
            self.local.alive = Some(self.encode_local_alive(self.local.incarnation, &wire));
        }
    }

    fn set_status(&mut self, id: &str, status: Status, now: Instant) {
        let Some(member) = self.members.get_mut(id) else { return };
        if let Some(until) = member.suspect_until.take() {
            self.suspicions.remove(&(until, id.to_string()));
        }
        match (member.status.is_live(), status.is_live()) {
            (true, false) => self.live -= 1,
            (false, true) => self.live += 1,
            _ => {}
        }
        member.status = status;
        member.since = now;
    }

    /// Merges one update. `suspicion_timeout` applies to a suspicion it starts.
    pub fn apply(&mut self, update: &Update<A>, now: Instant, suspicion_timeout: Duration) -> Outcome {
        let mut outcome = Outcome::default();
        if update.id() == self.local.id {
            self.apply_about_self(update, &mut outcome);
            return outcome;
        }
        match update {
            Update::Alive { id, incarnation, address, .. } => {
                let known = self.members.get(id.as_str()).map(|m| (m.incarnation, m.status));
                if known.is_some_and(|(current, _)| *incarnation <= current) {
                    return outcome;
                }
                // News: only now is the owner's signature checked (authenticated mode).
                let Some(record) = self.checked_record(update) else { return outcome };
                let alive = encode_update(update);
                let new_record = match record.to_record(id) {
                    Ok(new_record)
                        if NodeId::new(id.as_str()).check().is_ok()
                            && new_record.check().is_ok()
                            && alive.len() <= self.max_update_bytes =>
                    {
                        new_record
                    }
                    _ => {
                        self.stats.invalid += 1;
                        return outcome;
                    }
                };
                if known.is_none() && self.members.len() >= self.max_members && !self.evict_oldest_tombstone()
                {
                    self.stats.table_full += 1;
                    return outcome;
                }
                outcome.rebroadcast = true;
                match known {
                    None => {
                        self.members.insert(
                            id.clone(),
                            Member {
                                incarnation: *incarnation,
                                status: Status::Alive,
                                address: *address,
                                record: new_record.clone(),
                                alive,
                                since: now,
                                suspect_until: None,
                            },
                        );
                        self.live += 1;
                        outcome.now_live = true;
                        outcome.event = Some(MemberEvent { kind: PeerEventKind::Joined, record: new_record });
                    }
                    Some((_, status)) => {
                        self.set_status(id, Status::Alive, now);
                        let Some(member) = self.members.get_mut(id.as_str()) else { return outcome };
                        let changed = member.record != new_record;
                        member.incarnation = *incarnation;
                        member.address = *address;
                        member.record = new_record.clone();
                        member.alive = alive;
                        if !status.is_live() {
                            outcome.now_live = true;
                            outcome.event =
                                Some(MemberEvent { kind: PeerEventKind::Joined, record: new_record });
                        } else if changed {
                            outcome.event =
                                Some(MemberEvent { kind: PeerEventKind::Updated, record: new_record });
                        }
                    }
                }
            }
            Update::Suspect { id, incarnation } => {
                let Some(member) = self.members.get_mut(id.as_str()) else { return outcome };
                if !member.status.is_live() || *incarnation < member.incarnation {
                    return outcome;
                }
                if member.status == Status::Suspect && *incarnation == member.incarnation {
                    return outcome; // already suspected: keep the running timer
                }
                member.incarnation = *incarnation;
                self.set_status(id, Status::Suspect, now);
                let until = now + suspicion_timeout;
                if let Some(member) = self.members.get_mut(id.as_str()) {
                    member.suspect_until = Some(until);
                }
                self.suspicions.insert((until, id.clone()));
                outcome.rebroadcast = true;
            }
            Update::Dead { id, incarnation } | Update::Left { id, incarnation } => {
                let Some(member) = self.members.get_mut(id.as_str()) else { return outcome };
                if !member.status.is_live() || *incarnation < member.incarnation {
                    return outcome;
                }
                member.incarnation = *incarnation;
                let record = member.record.clone();
                let status = if matches!(update, Update::Left { .. }) { Status::Left } else { Status::Dead };
                self.set_status(id, status, now);
                outcome.rebroadcast = true;
                outcome.event = Some(MemberEvent { kind: PeerEventKind::Left, record });
            }
        }
        outcome
    }

    fn apply_about_self(&mut self, update: &Update<A>, outcome: &mut Outcome) {
        if self.local.alive.is_none() || self.local.left {
            return; // not a member (yet, or any more): nothing to defend
        }
        let contradicts = match update {
            Update::Alive { incarnation, address, .. } => {
                // Our own `Alive` gossiped back to us: nothing to check.
                let ours = *incarnation == self.local.incarnation
                    && self.local.alive.as_deref() == Some(encode_update(update).as_slice());
                let newer_or_same = *incarnation >= self.local.incarnation && !ours;
                // Authenticated mode: only what this node signed can be about it; what fails
                // the check is ignored, not refuted (nobody else accepts it either).
                match newer_or_same.then(|| self.checked_record(update)).flatten() {
                    None => false,
                    Some(record) => {
                        *incarnation > self.local.incarnation
                            || *address != self.local.address
                            || self.local.wire.as_ref() != Some(&record)
                    }
                }
            }
            Update::Suspect { incarnation, .. }
            | Update::Dead { incarnation, .. }
            | Update::Left { incarnation, .. } => *incarnation >= self.local.incarnation,
        };
        if contradicts {
            self.refute(update.incarnation());
            outcome.refuted = true;
        }
    }

    fn evict_oldest_tombstone(&mut self) -> bool {
        let oldest = self
            .members
            .iter()
            .filter(|(_, member)| !member.status.is_live())
            .min_by_key(|(_, member)| member.since)
            .map(|(id, _)| id.clone());
        match oldest {
            Some(id) => {
                self.members.remove(&id);
                true
            }
            None => false,
        }
    }

    /// Suspicions whose timeout passed: `(id, incarnation)` to declare dead.
    pub fn expired_suspicions(&self, now: Instant) -> Vec<(String, u64)> {
        self.suspicions
            .iter()
            .take_while(|(until, _)| *until <= now)
            .filter_map(|(_, id)| self.members.get(id).map(|member| (id.clone(), member.incarnation)))
            .collect()
    }

    /// The earliest suspicion timeout.
    pub fn next_suspicion_timeout(&self) -> Option<Instant> {
        self.suspicions.first().map(|(until, _)| *until)
    }

    /// Forgets tombstones older than `retention`.
    pub fn forget_tombstones(&mut self, now: Instant, retention: Duration) {
        if self.members.len() == self.live {
            return; // no tombstone: spare the walk over the table every period
        }
        self.members.retain(|_, member| {
            member.status.is_live() || now.saturating_duration_since(member.since) < retention
        });
    }

    /// A member.
    pub fn get(&self, id: &str) -> Option<&Member<A>> {
        self.members.get(id)
    }

    /// Alive and suspect members (not this node).
    pub fn live_count(&self) -> usize {
        self.live
    }

    /// Entries, tombstones included.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Every entry.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Member<A>)> + '_ {
        self.members.iter().map(|(id, member)| (id.as_str(), member))
    }

    /// Live members' ids.
    pub fn live_ids(&self) -> impl Iterator<Item = &str> + '_ {
        self.iter().filter(|(_, member)| member.status.is_live()).map(|(id, _)| id)
    }

    /// The table as datagrams: `start` (a started datagram) followed by encoded updates, this
    /// node first, then each member's `Alive`, followed by `Suspect`, or only `Dead` or `Left`,
    /// where that is its state; each datagram at most `max_datagram` bytes.
    pub fn snapshot_datagrams(&self, start: &[u8], max_datagram: usize) -> Vec<Vec<u8>> {
        let room = max_datagram.saturating_sub(start.len() + COUNT_BYTES);
        let mut datagrams = Vec::new();
        let mut chunk: Vec<&[u8]> = Vec::new();
        let mut used = 0;
        let mut add = |update: &[u8], chunk: &mut Vec<&[u8]>, datagrams: &mut Vec<Vec<u8>>| {
            if (used + update.len() > room || chunk.len() == MAX_UPDATES_PER_DATAGRAM) && !chunk.is_empty() {
                datagrams.push(finish_datagram(start.to_vec(), chunk));
                chunk.clear();
                used = 0;
            }
            used += update.len();
        };
        // Suspicion and tombstone updates are encoded here (there are few); `chunk` borrows them.
        let extra: Vec<Vec<u8>> = self
            .members
            .iter()
            .filter(|(_, member)| member.status != Status::Alive)
            .map(|(id, member)| {
                let (id, incarnation) = (id.clone(), member.incarnation);
                encode_update(&match member.status {
                    Status::Suspect => Update::<A>::Suspect { id, incarnation },
                    Status::Dead => Update::Dead { id, incarnation },
                    _ => Update::Left { id, incarnation },
                })
            })
            .collect();
        let mut updates: Vec<&[u8]> = Vec::with_capacity(self.members.len() + 1);
        if let (Some(alive), false) = (&self.local.alive, self.local.left) {
            updates.push(alive);
        }
        updates.extend(
            self.members
                .values()
                .filter(|member| member.status.is_live())
                .map(|member| member.alive.as_slice()),
        );
        // Suspicions come after every Alive, so a receiver knows the member before it is suspected.
        updates.extend(extra.iter().map(Vec::as_slice));
        for update in updates {
            if update.len() > room {
                continue;
            }
            add(update, &mut chunk, &mut datagrams);
            chunk.push(update);
        }
        if !chunk.is_empty() || datagrams.is_empty() {
            datagrams.push(finish_datagram(start.to_vec(), &chunk));
        }
        datagrams
    }

    /// Counters.
    pub fn stats(&self) -> &MembershipStats {
        &self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(5);

    fn alive(id: &str, incarnation: u64, service: &str) -> Update<u32> {
        let mut record = NodeRecord::new(id);
        record.services = vec![service.into()];
        Update::Alive { id: id.into(), incarnation, address: 9, record: RecordBytes::from_record(&record) }
    }

    fn table() -> Membership<u32> {
        let mut table = Membership::new("me", 1, 4, 1000);
        table.set_local_record(NodeRecord::new("me")).unwrap();
        table
    }

    #[test]
    fn join_update_suspect_refute_and_death_follow_incarnations() {
        let now = Instant::now();
        let mut table = table();
        let joined = table.apply(&alive("a", 0, "x"), now, TIMEOUT);
        assert!(joined.rebroadcast && joined.now_live);
        assert_eq!(joined.event.unwrap().kind, PeerEventKind::Joined);
        assert!(!table.apply(&alive("a", 0, "y"), now, TIMEOUT).rebroadcast, "same incarnation: stale");
        let updated = table.apply(&alive("a", 1, "y"), now, TIMEOUT);
        assert_eq!(updated.event.unwrap().kind, PeerEventKind::Updated);
        assert!(!table.apply(&Update::Suspect { id: "a".into(), incarnation: 0 }, now, TIMEOUT).rebroadcast);
        assert!(table.apply(&Update::Suspect { id: "a".into(), incarnation: 1 }, now, TIMEOUT).rebroadcast);
        assert_eq!(table.get("a").unwrap().status, Status::Suspect);
        assert_eq!(table.live_count(), 1, "a suspect is still a peer");
        assert_eq!(table.next_suspicion_timeout(), Some(now + TIMEOUT));
        // Refuted by a higher incarnation: alive again, timer gone.
        assert!(table.apply(&alive("a", 2, "y"), now, TIMEOUT).rebroadcast);
        assert_eq!(table.get("a").unwrap().status, Status::Alive);
        assert!(table.expired_suspicions(now + TIMEOUT).is_empty());
        table.apply(&Update::Suspect { id: "a".into(), incarnation: 2 }, now, TIMEOUT);
        assert_eq!(table.expired_suspicions(now + TIMEOUT), vec![("a".to_string(), 2)]);
        let dead = table.apply(&Update::Dead { id: "a".into(), incarnation: 2 }, now, TIMEOUT);
        assert_eq!(dead.event.unwrap().kind, PeerEventKind::Left);
        assert_eq!(table.live_count(), 0);
        assert!(!table.apply(&alive("a", 2, "y"), now, TIMEOUT).rebroadcast, "no resurrection");
        let back = table.apply(&alive("a", 3, "y"), now, TIMEOUT);
        assert_eq!(back.event.unwrap().kind, PeerEventKind::Joined, "rejoined with a new incarnation");
        table.forget_tombstones(now + TIMEOUT, TIMEOUT);
        assert_eq!(table.len(), 1, "a live member is never forgotten");
    }

    #[test]
    fn suspicion_or_death_of_this_node_is_refuted() {
        let now = Instant::now();
        let mut table = table();
        for update in [
            Update::Suspect { id: "me".into(), incarnation: 0 },
            Update::Dead { id: "me".into(), incarnation: 5 },
            Update::Left { id: "me".into(), incarnation: 6 },
            alive("me", 7, "forged"),
        ] {
            let before = table.local_incarnation();
            assert!(table.apply(&update, now, TIMEOUT).refuted, "{update:?}");
            assert!(table.local_incarnation() > before.max(update.incarnation()));
        }
        assert!(!table.apply(&Update::Suspect { id: "me".into(), incarnation: 0 }, now, TIMEOUT).refuted);
        assert_eq!(table.len(), 0);
    }

    #[test]
    fn bounds_refuse_invalid_records_and_a_full_table() {
        let now = Instant::now();
        let mut table = table();
        assert!(!table.apply(&alive("bad\nid", 0, "x"), now, TIMEOUT).rebroadcast);
        assert!(!table.apply(&alive("big", 0, &"x".repeat(2000)), now, TIMEOUT).rebroadcast);
        assert_eq!(table.stats().invalid, 2);
        for id in ["a", "b", "c", "d"] {
            assert!(table.apply(&alive(id, 0, "x"), now, TIMEOUT).rebroadcast);
        }
        assert!(!table.apply(&alive("e", 0, "x"), now, TIMEOUT).rebroadcast);
        assert_eq!(table.stats().table_full, 1);
        table.apply(&Update::Left { id: "a".into(), incarnation: 0 }, now, TIMEOUT);
        assert!(table.apply(&alive("e", 0, "x"), now, TIMEOUT).rebroadcast, "a tombstone makes room");
        assert_eq!(table.len(), 4);
    }

    #[test]
    fn the_local_record_must_name_this_node_and_fit() {
        let mut table = Membership::<u32>::new("me", 1, 4, 100);
        assert!(matches!(table.set_local_record(NodeRecord::new("other")), Err(RecordError::WrongId { .. })));
        let mut big = NodeRecord::new("me");
        big.services = vec!["s".repeat(200)];
        assert!(matches!(table.set_local_record(big), Err(RecordError::TooLarge { .. })));
        assert_eq!(table.set_local_record(NodeRecord::new("me")), Ok(true));
        assert_eq!(table.set_local_record(NodeRecord::new("me")), Ok(false));
        let mut changed = NodeRecord::new("me");
        changed.services = vec!["new".into()];
        assert_eq!(table.set_local_record(changed), Ok(true));
        assert_eq!(table.local_incarnation(), 1);
    }
}
