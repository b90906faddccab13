//! Messages waiting for room in a full local queue, in the order they came, with the counts the
//! engine asks about on every message kept up to date, so that the hot path never scans.

use super::{DeliveryId, Local};
use comms_plugin_api::Envelope;
use std::{
    collections::{HashMap, VecDeque},
    time::Instant,
};

/// A message waiting for room in a full destination.
#[derive(Debug)]
pub(crate) struct Parked {
    pub(crate) to: Local,
    pub(crate) envelope: Envelope,
    pub(crate) delivery: DeliveryId,
    pub(crate) transport: usize,
    /// When it goes back to its transport (transports with acknowledgements); `None`: it waits
    /// for room, its transport paused meanwhile.
    pub(crate) until: Option<Instant>,
}

#[derive(Debug, Default)]
pub(crate) struct ParkedQueue {
    items: VecDeque<Parked>,
    by_local: HashMap<Local, usize>,
    by_transport: HashMap<usize, usize>,
    /// Per transport, the parked messages without a deadline: the transport stays paused while
    /// there is any.
    holding: HashMap<usize, usize>,
}

fn decrement<K: std::hash::Hash + Eq>(counts: &mut HashMap<K, usize>, key: &K) {
    if let Some(count) = counts.get_mut(key) {
        *count -= 1;
        if *count == 0 {
            counts.remove(key);
        }
    }
}

impl ParkedQueue {
    pub(crate) fn push(&mut self, parked: Parked) {
        *self.by_local.entry(parked.to.clone()).or_default() += 1;
        *self.by_transport.entry(parked.transport).or_default() += 1;
        if parked.until.is_none() {
            *self.holding.entry(parked.transport).or_default() += 1;
        }
        self.items.push_back(parked);
    }

    fn forget(&mut self, parked: &Parked) {
        decrement(&mut self.by_local, &parked.to);
        decrement(&mut self.by_transport, &parked.transport);
        if parked.until.is_none() {
            decrement(&mut self.holding, &parked.transport);
        }
    }

    /// Whether a message waits for `local` (a newer one must queue behind it).
    pub(crate) fn waits_for(&self, local: &Local) -> bool {
        self.by_local.contains_key(local)
    }

    /// How many messages of `transport` wait.
    pub(crate) fn count_from(&self, transport: usize) -> usize {
        self.by_transport.get(&transport).copied().unwrap_or(0)
    }

    /// Whether a message of `transport` waits with no deadline (its transport stays paused).
    pub(crate) fn holds(&self, transport: usize) -> bool {
        self.holding.contains_key(&transport)
    }

    /// The oldest message waiting for `local`, taken out.
    pub(crate) fn take_first_for(&mut self, local: &Local) -> Option<Parked> {
        if !self.waits_for(local) {
            return None;
        }
        let position = self.items.iter().position(|parked| parked.to == *local)?;
        let parked = self.items.remove(position)?;
        self.forget(&parked);
        Some(parked)
    }

    /// Every waiting message, taken out in order.
    pub(crate) fn take_all(&mut self) -> Vec<Parked> {
        self.by_local.clear();
        self.by_transport.clear();
        self.holding.clear();
        self.items.drain(..).collect()
    }

    /// The earliest deadline. Messages are parked in time order with the same wait, so it is
    /// the first one that has a deadline.
    pub(crate) fn earliest_deadline(&self) -> Option<Instant> {
        self.items.iter().find_map(|parked| parked.until)
    }

    /// Whether nothing waits.
    pub(crate) fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}
