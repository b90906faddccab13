//! The records this node keeps for others.
//!
//! A STORE puts one value, a publisher's encoded [`NodeRecord`](comms_plugin_api::NodeRecord),
//! under a key for a time to live. Only well-formed values are kept: the key must be the
//! record's node key or the service key of a service the record lists. A publisher has one value
//! per key (a new STORE replaces it; a STORE with ttl 0 from the publisher removes it). Values
//! expire; their originator republishes them before that.
//!
//! Bounds: [`StoreLimits::max_records`] values and [`StoreLimits::max_bytes`] bytes overall,
//! [`StoreLimits::max_values_per_key`] publishers per key, ttl capped at
//! [`StoreLimits::max_ttl`], and at most [`StoreLimits::stores_per_window`] STOREs per sender
//! address per [`StoreLimits::window`] (tracked for at most [`StoreLimits::max_senders`]
//! addresses at once; a STORE from one more is refused until a window ends).
//!
//! Between authenticated nodes ([`RecordStore::set_signed`]) a value is a record followed by its
//! node's signature, checked when the STORE's datagram was opened
//! ([`crate::protocol::open`]): a node can store (and so publish as a provider of a service)
//! only what the record's own node signed.

use crate::{
    key::Key,
    protocol::{decode_value, Value},
};
use std::{
    collections::HashMap,
    hash::Hash,
    time::{Duration, Instant},
};

/// Bounds of a [`RecordStore`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreLimits {
    /// Values kept overall.
    pub max_records: usize,
    /// Bytes of values kept overall.
    pub max_bytes: usize,
    /// Publishers per key.
    pub max_values_per_key: usize,
    /// The longest time to live accepted (longer ones are cut to it).
    pub max_ttl: Duration,
    /// STOREs accepted per sender address per window.
    pub stores_per_window: u32,
    /// The rate limit's window.
    pub window: Duration,
    /// Sender addresses tracked by the rate limit.
    pub max_senders: usize,
}

impl Default for StoreLimits {
    fn default() -> Self {
        Self {
            max_records: 10_000,
            max_bytes: 8 << 20,
            max_values_per_key: 64,
            max_ttl: Duration::from_secs(24 * 3600),
            stores_per_window: 64,
            window: Duration::from_secs(10),
            max_senders: 4096,
        }
    }
}

/// What a STORE did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreOutcome {
    /// Kept (new or replacing the publisher's earlier value).
    Stored,
    /// The publisher's value was removed (ttl 0).
    Removed,
    /// The sender sent too many STOREs this window.
    RateLimited,
    /// A bound was reached.
    Full,
    /// The value is not a record of the sender for this key.
    Invalid(&'static str),
}

#[derive(Debug, Clone)]
struct Stored {
    publisher: Key,
    record: Vec<u8>,
    expires: Instant,
}

#[derive(Debug, Clone, Copy)]
struct Rate {
    window_start: Instant,
    count: u32,
}

/// Values kept for other nodes, with expiry and bounds.
#[derive(Debug)]
pub struct RecordStore<A> {
    limits: StoreLimits,
    entries: HashMap<Key, Vec<Stored>>,
    records: usize,
    bytes: usize,
    senders: HashMap<A, Rate>,
    /// Values are signed records (authenticated nodes).
    signed: bool,
}

impl<A: Copy + Eq + Hash> RecordStore<A> {
    /// An empty store.
    pub fn new(limits: StoreLimits) -> Self {
        Self { limits, entries: HashMap::new(), records: 0, bytes: 0, senders: HashMap::new(), signed: false }
    }

    /// Values are signed records (see the [module documentation](self)).
    pub fn set_signed(&mut self, signed: bool) {
        self.signed = signed;
    }

    /// Values kept.
    pub fn len(&self) -> usize {
        self.records
    }

    /// Whether nothing is kept.
    pub fn is_empty(&self) -> bool {
        self.records == 0
    }

    /// Bytes of values kept.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Handles a STORE from address `from`, sent by the node with key `sender` (which need not
    /// be the record's node: there is no authentication). A value is kept per
    /// publisher (the record's node) and key; a copy that would expire sooner than the value
    /// already kept does not replace it, so an old copy never undoes a fresh publication.
    /// Only the publisher itself may remove its value (ttl 0).
    pub fn put(
        &mut self,
        from: A,
        sender: Key,
        key: Key,
        ttl: Duration,
        record: Vec<u8>,
        now: Instant,
    ) -> StoreOutcome {
        if !self.admit(from, now) {
            return StoreOutcome::RateLimited;
        }
        if ttl.is_zero() {
            return match self.remove(&key, &sender) {
                true => StoreOutcome::Removed,
                false => StoreOutcome::Invalid("nothing of the sender's to remove"),
            };
        }
        let publisher = match validate_value(key, &record, self.signed) {
            Ok(publisher) => publisher,
            Err(why) => return StoreOutcome::Invalid(why),
        };
        let expires = now + ttl.min(self.limits.max_ttl);
        let size = record.len();
        let values = self.entries.entry(key).or_default();
        if let Some(existing) = values.iter_mut().find(|stored| stored.publisher == publisher) {
            if existing.expires > expires && existing.record != record {
                return StoreOutcome::Stored;
            }
            if self.bytes - existing.record.len() + size > self.limits.max_bytes {
                return StoreOutcome::Full;
            }
            self.bytes = self.bytes - existing.record.len() + size;
            existing.record = record;
            existing.expires = existing.expires.max(expires);
            return StoreOutcome::Stored;
        }
        if values.len() >= self.limits.max_values_per_key
            || self.records >= self.limits.max_records
            || self.bytes + size > self.limits.max_bytes
        {
            if values.is_empty() {
                self.entries.remove(&key);
            }
            return StoreOutcome::Full;
        }
        values.push(Stored { publisher, record, expires });
        self.records += 1;
        self.bytes += size;
        StoreOutcome::Stored
    }

    /// The keys with values.
    pub fn keys(&self) -> impl Iterator<Item = &Key> + '_ {
        self.entries.keys()
    }

    /// The fixed-window rate limit per sender address.
    fn admit(&mut self, from: A, now: Instant) -> bool {
        let window = self.limits.window;
        if !self.senders.contains_key(&from) && self.senders.len() >= self.limits.max_senders {
            self.senders.retain(|_, rate| now.saturating_duration_since(rate.window_start) < window);
            if self.senders.len() >= self.limits.max_senders {
                return false;
            }
        }
        let rate = self.senders.entry(from).or_insert(Rate { window_start: now, count: 0 });
        if now.saturating_duration_since(rate.window_start) >= window {
            *rate = Rate { window_start: now, count: 0 };
        }
        rate.count = rate.count.saturating_add(1);
        rate.count <= self.limits.stores_per_window
    }

    fn remove(&mut self, key: &Key, publisher: &Key) -> bool {
        let Some(values) = self.entries.get_mut(key) else { return false };
        let Some(position) = values.iter().position(|stored| stored.publisher == *publisher) else {
            return false;
        };
        let removed = values.swap_remove(position);
        self.records -= 1;
        self.bytes -= removed.record.len();
        if values.is_empty() {
            self.entries.remove(key);
        }
        true
    }

    /// The live values under `key`, with their remaining time to live.
    pub fn get(&self, key: &Key, now: Instant) -> Vec<Value> {
        let Some(values) = self.entries.get(key) else { return Vec::new() };
        values
            .iter()
            .filter(|stored| stored.expires > now)
            .map(|stored| Value {
                ttl_ms: stored.expires.duration_since(now).as_millis().min(u32::MAX as u128) as u32,
                record: stored.record.clone(),
            })
            .collect()
    }

    /// Drops expired values (and idle rate-limit entries); returns how many values went.
    pub fn expire(&mut self, now: Instant) -> usize {
        let mut removed = 0;
        let mut bytes = 0;
        self.entries.retain(|_, values| {
            values.retain(|stored| {
                let live = stored.expires > now;
                if !live {
                    removed += 1;
                    bytes += stored.record.len();
                }
                live
            });
            !values.is_empty()
        });
        self.records -= removed;
        self.bytes -= bytes;
        let window = self.limits.window;
        self.senders.retain(|_, rate| now.saturating_duration_since(rate.window_start) < window);
        removed
    }
}

/// Whether `record` may be stored under `key`: it must be the record's node key or the service
/// key of one of its services. Returns the publisher (the record's node key).
pub fn validate(key: Key, record: &[u8]) -> Result<Key, &'static str> {
    validate_value(key, record, false)
}

fn validate_value(key: Key, record: &[u8], signed: bool) -> Result<Key, &'static str> {
    let record = decode_value(record, signed).map_err(|_| "a malformed record")?;
    let publisher = Key::for_node(record.id.as_str());
    if key == publisher || record.services.iter().any(|service| Key::for_service(service) == key) {
        Ok(publisher)
    } else {
        Err("a key that is neither the record's node nor one of its services")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::encode_record;
    use comms_plugin_api::{NodeId, NodeRecord};

    fn record(id: &str, services: &[&str]) -> (Key, Vec<u8>) {
        let mut record = NodeRecord::new(NodeId::new(id));
        record.services = services.iter().map(|s| s.to_string()).collect();
        (Key::for_node(id), encode_record(&record).unwrap())
    }

    #[test]
    fn values_are_validated_replaced_removed_and_expired() {
        let now = Instant::now();
        let mut store = RecordStore::<u32>::new(StoreLimits::default());
        let (alice, bytes) = record("alice", &["echo"]);
        let ttl = Duration::from_secs(10);
        assert_eq!(store.put(1, alice, alice, ttl, bytes.clone(), now), StoreOutcome::Stored);
        let echo = Key::for_service("echo");
        assert_eq!(store.put(1, alice, echo, ttl, bytes.clone(), now), StoreOutcome::Stored);
        assert!(matches!(
            store.put(1, alice, Key::for_service("other"), ttl, bytes.clone(), now),
            StoreOutcome::Invalid(_)
        ));
        let (bob, _) = record("bob", &[]);
        assert!(matches!(store.put(1, bob, bob, ttl, bytes.clone(), now), StoreOutcome::Invalid(_)));
        assert!(
            matches!(store.put(1, bob, alice, Duration::ZERO, vec![], now), StoreOutcome::Invalid(_)),
            "only the publisher removes"
        );
        assert_eq!(store.put(1, alice, alice, ttl, bytes.clone(), now), StoreOutcome::Stored, "replaced");
        assert_eq!(store.len(), 2);
        assert_eq!(store.get(&echo, now).len(), 1);
        assert_eq!(store.put(1, alice, echo, Duration::ZERO, vec![], now), StoreOutcome::Removed);
        assert!(store.get(&echo, now).is_empty());
        assert_eq!(store.expire(now + ttl), 1);
        assert!(store.is_empty() && store.bytes() == 0);
    }

    #[test]
    fn a_flooding_sender_is_rate_limited_and_the_store_stays_bounded() {
        let now = Instant::now();
        let limits = StoreLimits { max_records: 50, stores_per_window: 10, ..StoreLimits::default() };
        let mut store = RecordStore::<u32>::new(limits);
        let ttl = Duration::from_secs(60);
        let mut accepted = 0;
        for n in 0..1000 {
            let (key, bytes) = record(&format!("n{n}"), &[]);
            if store.put(7, key, key, ttl, bytes, now) == StoreOutcome::Stored {
                accepted += 1;
            }
        }
        assert_eq!(accepted, 10, "one sender gets its window's worth");
        // Many senders: the overall bound holds.
        for n in 0..1000u32 {
            let (key, bytes) = record(&format!("m{n}"), &[]);
            store.put(100 + n, key, key, ttl, bytes, now);
        }
        assert_eq!(store.len(), 50);
        // A new window admits the first sender again.
        let (key, bytes) = record("late", &[]);
        store.expire(now + Duration::from_secs(11));
        assert_eq!(store.put(7, key, key, ttl, bytes, now + Duration::from_secs(11)), StoreOutcome::Full);
    }
}
