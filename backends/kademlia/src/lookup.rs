//! One iterative lookup: FIND_NODE (the k closest nodes to a key) or FIND_VALUE (also the
//! values stored there).
//!
//! The lookup starts from the k closest contacts of the routing table, keeps at most `alpha`
//! queries in flight, always querying the closest candidate not asked yet, and learns closer
//! candidates from every answer. It is finished when the k closest candidates that did not fail
//! have all answered (a candidate fails when its query times out: the caller reports that with
//! [`Lookup::on_failure`]). Pure state: the caller sends the queries [`Lookup::next_queries`]
//! hands out and feeds back answers and timeouts.
//!
//! Bounded: at most `8 k` candidates are kept (the farthest unasked ones are dropped), at most
//! [`MAX_VALUES`] distinct values.

use crate::{
    key::Key,
    protocol::{Contact, Value},
};
use std::collections::BTreeMap;

/// The most distinct values one lookup collects.
pub const MAX_VALUES: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Waiting,
    InFlight,
    Answered,
    Failed,
}

#[derive(Debug, Clone)]
struct Candidate<A> {
    contact: Contact<A>,
    state: State,
    /// 1 for a contact of our own table, n + 1 for one named by a candidate at n.
    hops: u32,
}

/// An iterative lookup of `target`.
#[derive(Debug, Clone)]
pub struct Lookup<A> {
    target: Key,
    own: Key,
    k: usize,
    alpha: usize,
    /// By distance to the target.
    candidates: BTreeMap<Key, Candidate<A>>,
    values: Vec<Value>,
    value_hops: Option<u32>,
    queries: u32,
    answers: u32,
}

impl<A: Copy + Eq> Lookup<A> {
    /// A lookup of `target` by the node `own`, starting from `seeds` (the routing table's
    /// closest contacts).
    pub fn new(target: Key, own: Key, seeds: Vec<Contact<A>>, k: usize, alpha: usize) -> Self {
        let mut lookup = Self {
            target,
            own,
            k: k.max(1),
            alpha: alpha.max(1),
            candidates: BTreeMap::new(),
            values: Vec::new(),
            value_hops: None,
            queries: 0,
            answers: 0,
        };
        for seed in seeds {
            lookup.add_candidate(seed, 1);
        }
        lookup
    }

    /// The key looked up.
    pub fn target(&self) -> Key {
        self.target
    }

    fn add_candidate(&mut self, contact: Contact<A>, hops: u32) {
        if contact.key == self.own {
            return;
        }
        let distance = contact.key.distance(&self.target);
        let candidate =
            self.candidates.entry(distance).or_insert(Candidate { contact, state: State::Waiting, hops });
        candidate.hops = candidate.hops.min(hops);
        let limit = self.k * 8;
        while self.candidates.len() > limit {
            // Drop the farthest candidate that is not in flight (an answer from a dropped one
            // is simply ignored).
            let farthest = self
                .candidates
                .iter()
                .rev()
                .find(|(_, candidate)| candidate.state != State::InFlight)
                .map(|(distance, _)| *distance);
            match farthest {
                Some(distance) => {
                    self.candidates.remove(&distance);
                }
                None => break,
            }
        }
    }

    /// The k closest candidates that have not failed.
    fn closest_live(&self) -> impl Iterator<Item = &Candidate<A>> + '_ {
        self.candidates.values().filter(|candidate| candidate.state != State::Failed).take(self.k)
    }

    /// The contacts to query now (marked in flight): the closest unasked ones among the k
    /// closest live candidates, so that at most `alpha` queries are in flight.
    pub fn next_queries(&mut self) -> Vec<Contact<A>> {
        let in_flight = self.candidates.values().filter(|c| c.state == State::InFlight).count();
        let room = self.alpha.saturating_sub(in_flight);
        let chosen: Vec<Key> = self
            .candidates
            .iter()
            .filter(|(_, candidate)| candidate.state != State::Failed)
            .take(self.k)
            .filter(|(_, candidate)| candidate.state == State::Waiting)
            .take(room)
            .map(|(distance, _)| *distance)
            .collect();
        let mut out = Vec::with_capacity(chosen.len());
        for distance in chosen {
            if let Some(candidate) = self.candidates.get_mut(&distance) {
                candidate.state = State::InFlight;
                self.queries += 1;
                out.push(candidate.contact);
            }
        }
        out
    }

    /// `from` answered with `contacts` closer to the target and `values` stored there.
    pub fn on_response(&mut self, from: &Key, contacts: &[Contact<A>], values: Vec<Value>) {
        let distance = from.distance(&self.target);
        let Some(candidate) = self.candidates.get_mut(&distance) else { return };
        if candidate.state != State::InFlight {
            return;
        }
        candidate.state = State::Answered;
        let hops = candidate.hops;
        self.answers += 1;
        if !values.is_empty() {
            self.value_hops = Some(self.value_hops.map_or(hops, |known| known.min(hops)));
        }
        for value in values {
            let room = self.values.len() < MAX_VALUES;
            match self.values.iter_mut().find(|known| known.record == value.record) {
                Some(known) => known.ttl_ms = known.ttl_ms.max(value.ttl_ms),
                None if room => self.values.push(value),
                None => {}
            }
        }
        for contact in contacts {
            self.add_candidate(*contact, hops + 1);
        }
    }

    /// The query to `from` timed out (or it said goodbye).
    pub fn on_failure(&mut self, from: &Key) {
        let distance = from.distance(&self.target);
        if let Some(candidate) = self.candidates.get_mut(&distance) {
            if candidate.state == State::InFlight || candidate.state == State::Waiting {
                candidate.state = State::Failed;
            }
        }
    }

    /// Whether the k closest live candidates have all answered (or there are none).
    pub fn is_finished(&self) -> bool {
        self.closest_live().all(|candidate| candidate.state == State::Answered)
    }

    /// The k closest candidates that answered, closest first: where to store.
    pub fn closest_answered(&self) -> Vec<Contact<A>> {
        self.closest_live()
            .filter(|candidate| candidate.state == State::Answered)
            .map(|candidate| candidate.contact)
            .collect()
    }

    /// The distinct values collected.
    pub fn values(&self) -> &[Value] {
        &self.values
    }

    /// Takes the values collected.
    pub fn take_values(&mut self) -> Vec<Value> {
        std::mem::take(&mut self.values)
    }

    /// Queries sent.
    pub fn queries(&self) -> u32 {
        self.queries
    }

    /// Answers received.
    pub fn answers(&self) -> u32 {
        self.answers
    }

    /// Hops to the closest node that returned a value (1: a contact of our own table).
    pub fn value_hops(&self) -> Option<u32> {
        self.value_hops
    }

    /// The deepest hop among the k closest that answered.
    pub fn hops(&self) -> u32 {
        self.closest_live().filter(|c| c.state == State::Answered).map(|c| c.hops).max().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contact(n: u32) -> Contact<u32> {
        Contact { key: Key::for_node(&n.to_string()), address: n }
    }

    #[test]
    fn queries_alpha_at_a_time_and_finishes_when_the_k_closest_answered() {
        let target = Key::for_node("target");
        let mut lookup = Lookup::new(target, Key::ZERO, (0..10).map(contact).collect(), 3, 2);
        let first = lookup.next_queries();
        assert_eq!(first.len(), 2, "alpha in flight");
        assert!(lookup.next_queries().is_empty(), "no room until one answers");
        lookup.on_response(&first[0].key, &[contact(20)], vec![]);
        lookup.on_failure(&first[1].key);
        assert!(!lookup.is_finished());
        let mut rounds = 0;
        while !lookup.is_finished() {
            for query in lookup.next_queries() {
                lookup.on_response(
                    &query.key,
                    &[],
                    vec![Value { ttl_ms: 1, record: vec![query.address as u8] }],
                );
            }
            rounds += 1;
            assert!(rounds < 20, "never finished");
        }
        assert_eq!(lookup.closest_answered().len(), 3);
        assert!(!lookup.values().is_empty());
        assert_eq!(lookup.value_hops(), Some(1));
    }

    #[test]
    fn a_lookup_without_contacts_is_finished_at_once() {
        let lookup = Lookup::<u32>::new(Key::ZERO, Key::ZERO, vec![], 20, 3);
        assert!(lookup.is_finished());
    }
}
