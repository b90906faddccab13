//! SWIM's failure detector: one probe per protocol period, direct then indirect.
//!
//! Each protocol period the node probes one member, chosen round-robin over a shuffled list of
//! the live members (reshuffled each round; a new member goes to a random place in the rest of
//! the round), so every member is probed within two rounds and the load is even. The probe:
//!
//! 1. a `Ping` to the member; an `Ack` within the probe timeout ends it;
//! 2. otherwise a `PingReq` to `k` other live members, each of which pings the target and
//!    forwards its ack (the relays); any ack before the period ends ends it;
//! 3. otherwise, at the end of the period, the member is suspected (the caller gossips
//!    `Suspect`).
//!
//! So a node sends one ping per period and answers about one (O(1) datagrams per node per
//! period, `k` more only on a failed direct probe), whatever the group size.
//!
//! Bounds: one probe at a time; at most [`MAX_RELAYS`] relayed probes pending, each forgotten
//! after one protocol period (a flood of `PingReq`s beyond that is dropped, not queued).

use crate::{membership::Membership, protocol::Address};
use rand::{seq::SliceRandom, Rng};
use std::{collections::HashMap, time::Instant};

/// Relayed probes pending at once.
pub const MAX_RELAYS: usize = 1024;

/// The probe of this period.
#[derive(Debug, Clone)]
pub struct Probe<A> {
    /// The member probed.
    pub target: String,
    /// Its address.
    pub address: A,
    /// The sequence number its ack must carry.
    pub seq: u32,
    /// When the indirect probes go out if no ack came.
    pub indirect_at: Instant,
    /// An ack came.
    pub acked: bool,
    /// The indirect probes went out.
    pub indirect_sent: bool,
}

#[derive(Debug, Clone)]
struct Relay<A> {
    origin: A,
    origin_seq: u32,
    expires: Instant,
}

/// What an ack answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AckFor<A> {
    /// This node's probe.
    Probe,
    /// A probe relayed for `origin`: forward the ack with `seq`.
    Relay {
        /// Who asked.
        origin: A,
        /// Its sequence number.
        seq: u32,
    },
    /// Nothing pending (late, duplicate or forged).
    Nothing,
}

/// The probe schedule and relays. See the [module documentation](self).
#[derive(Debug, Clone)]
pub struct FailureDetector<A> {
    order: Vec<String>,
    next: usize,
    probe: Option<Probe<A>>,
    sequence: u32,
    relays: HashMap<u32, Relay<A>>,
}

impl<A: Address> FailureDetector<A> {
    /// A detector whose sequence numbers start at `first_seq` (random, so that an ack is hard to
    /// forge off the path).
    pub fn new(first_seq: u32) -> Self {
        Self { order: Vec::new(), next: 0, probe: None, sequence: first_seq, relays: HashMap::new() }
    }

    fn next_seq(&mut self) -> u32 {
        self.sequence = self.sequence.wrapping_add(1);
        self.sequence
    }

    /// Adds a member that became live to the rest of this round, at a random place.
    pub fn insert(&mut self, id: &str, rng: &mut impl Rng) {
        let at = rng.gen_range(self.next.min(self.order.len())..=self.order.len());
        self.order.insert(at, id.to_string());
    }

    /// The next member to probe, round-robin over the shuffled live members.
    fn next_target(&mut self, membership: &Membership<A>, rng: &mut impl Rng) -> Option<(String, A)> {
        for _ in 0..2 {
            while self.next < self.order.len() {
                let id = &self.order[self.next];
                self.next += 1;
                if let Some(member) = membership.get(id).filter(|member| member.status.is_live()) {
                    return Some((id.clone(), member.address));
                }
            }
            // A new round: stale ids (dead, gone) are dropped here.
            self.order = membership.live_ids().map(str::to_string).collect();
            self.order.shuffle(rng);
            self.next = 0;
        }
        None
    }

    /// Starts this period's probe: the target, its address and the ping's sequence number.
    pub fn start_probe(
        &mut self,
        membership: &Membership<A>,
        now: Instant,
        probe_timeout: std::time::Duration,
        rng: &mut impl Rng,
    ) -> Option<Probe<A>> {
        let (target, address) = self.next_target(membership, rng)?;
        let seq = self.next_seq();
        let probe = Probe {
            target,
            address,
            seq,
            indirect_at: now + probe_timeout,
            acked: false,
            indirect_sent: false,
        };
        self.probe = Some(probe.clone());
        Some(probe)
    }

    /// Ends the period's probe: the target if no ack came (to suspect).
    pub fn finish_probe(&mut self) -> Option<Probe<A>> {
        self.probe.take().filter(|probe| !probe.acked)
    }

    /// The probe waiting for its indirect stage at `now`, marked as sent.
    pub fn indirect_due(&mut self, now: Instant) -> Option<Probe<A>> {
        let probe = self.probe.as_mut().filter(|p| !p.acked && !p.indirect_sent && p.indirect_at <= now)?;
        probe.indirect_sent = true;
        Some(probe.clone())
    }

    /// When the indirect stage is due, if it is still to come.
    pub fn next_timeout(&self) -> Option<Instant> {
        self.probe.as_ref().filter(|p| !p.acked && !p.indirect_sent).map(|p| p.indirect_at)
    }

    /// Registers a relayed probe for `origin`; the sequence number to ping the target with, or
    /// `None` when too many are pending.
    pub fn add_relay(&mut self, origin: A, origin_seq: u32, expires: Instant) -> Option<u32> {
        if self.relays.len() >= MAX_RELAYS {
            return None;
        }
        let seq = self.next_seq();
        self.relays.insert(seq, Relay { origin, origin_seq, expires });
        Some(seq)
    }

    /// Forgets relays whose time is over.
    pub fn expire_relays(&mut self, now: Instant) {
        self.relays.retain(|_, relay| relay.expires > now);
    }

    /// What an ack with `seq` answers.
    pub fn on_ack(&mut self, seq: u32) -> AckFor<A> {
        if let Some(probe) = self.probe.as_mut().filter(|probe| probe.seq == seq) {
            probe.acked = true;
            return AckFor::Probe;
        }
        match self.relays.remove(&seq) {
            Some(relay) => AckFor::Relay { origin: relay.origin, seq: relay.origin_seq },
            None => AckFor::Nothing,
        }
    }

    /// Relays pending.
    pub fn relays(&self) -> usize {
        self.relays.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{RecordBytes, Update};
    use comms_plugin_api::NodeRecord;
    use rand::{rngs::StdRng, SeedableRng};
    use std::time::Duration;

    fn table(n: u32) -> Membership<u32> {
        let mut table = Membership::new("me", 0, 100, 1000);
        for i in 1..=n {
            let id = format!("m{i}");
            let update = Update::Alive {
                id: id.clone(),
                incarnation: 0,
                address: i,
                record: RecordBytes::from_record(&NodeRecord::new(id.as_str())),
            };
            table.apply(&update, Instant::now(), Duration::from_secs(1));
        }
        table
    }

    #[test]
    fn every_member_is_probed_once_per_round() {
        let table = table(10);
        let mut rng = StdRng::seed_from_u64(1);
        let mut detector = FailureDetector::new(0);
        let now = Instant::now();
        for _round in 0..3 {
            let mut seen: Vec<u32> = (0..10)
                .map(|_| {
                    let probe =
                        detector.start_probe(&table, now, Duration::from_millis(100), &mut rng).unwrap();
                    detector.finish_probe();
                    probe.address
                })
                .collect();
            seen.sort();
            assert_eq!(seen, (1..=10).collect::<Vec<_>>());
        }
        let empty = Membership::<u32>::new("me", 0, 10, 1000);
        assert!(detector.start_probe(&empty, now, Duration::from_millis(100), &mut rng).is_none());
    }

    #[test]
    fn acks_end_probes_and_relays_forward_once() {
        let table = table(3);
        let mut rng = StdRng::seed_from_u64(1);
        let mut detector = FailureDetector::new(u32::MAX); // wraps
        let now = Instant::now();
        let probe = detector.start_probe(&table, now, Duration::from_millis(100), &mut rng).unwrap();
        assert!(detector.indirect_due(now).is_none(), "not before the probe timeout");
        assert_eq!(detector.next_timeout(), Some(now + Duration::from_millis(100)));
        assert!(detector.indirect_due(now + Duration::from_millis(100)).is_some());
        assert!(detector.indirect_due(now + Duration::from_millis(100)).is_none(), "once");
        assert_eq!(detector.on_ack(probe.seq.wrapping_add(7)), AckFor::Nothing);
        assert_eq!(detector.on_ack(probe.seq), AckFor::Probe);
        assert!(detector.finish_probe().is_none(), "acked: nobody to suspect");
        detector.start_probe(&table, now, Duration::from_millis(100), &mut rng).unwrap();
        assert!(detector.finish_probe().is_some(), "unacked: suspect");

        let seq = detector.add_relay(42, 9, now + Duration::from_secs(1)).unwrap();
        assert_eq!(detector.on_ack(seq), AckFor::Relay { origin: 42, seq: 9 });
        assert_eq!(detector.on_ack(seq), AckFor::Nothing);
        for i in 0..MAX_RELAYS as u32 {
            assert!(detector.add_relay(i, i, now + Duration::from_secs(1)).is_some());
        }
        assert!(detector.add_relay(0, 0, now).is_none(), "bounded");
        detector.expire_relays(now + Duration::from_secs(1));
        assert_eq!(detector.relays(), 0);
    }
}
