//! The routing table: 256 k-buckets of contacts, least recently seen first.
//!
//! A contact enters only when it was heard from directly (a request or a response from its own
//! address), never because another node named it: that keeps a liar from filling the table. A
//! full bucket keeps its old contacts, which have proved to stay up: the newcomer waits as the
//! bucket's one *pending* candidate while the caller pings the least recently seen contact
//! ([`Insert::Full`]); if the ping is answered the old contact stays ([`RoutingTable::insert`] again
//! moves it to the back), if it times out [`RoutingTable::remove`] drops it and promotes the
//! candidate. At most `k` contacts per bucket, so at most 256 k contacts and 256 candidates.

use crate::{
    key::{Key, KEY_BITS},
    protocol::Contact,
};
use std::{
    collections::HashMap,
    hash::Hash,
    time::{Duration, Instant},
};

#[derive(Debug, Clone)]
struct Entry<A> {
    contact: Contact<A>,
    last_seen: Instant,
    /// Requests in a row it did not answer.
    failures: u32,
}

#[derive(Debug, Clone)]
struct Bucket<A> {
    /// Least recently seen first.
    entries: Vec<Entry<A>>,
    /// The newest contact that found the bucket full.
    pending: Option<Entry<A>>,
    /// The last lookup of a key in this bucket's range (or the last contact added).
    last_refreshed: Option<Instant>,
}

/// Unanswered requests in a row after which a contact is dropped.
pub const MAX_FAILURES: u32 = 2;

/// What [`RoutingTable::insert`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Insert<A> {
    /// A new contact.
    Added,
    /// A known contact, moved to the back (its address updated).
    Refreshed,
    /// The bucket is full: the contact waits as the candidate; ping `oldest` and call
    /// [`RoutingTable::remove`] if it does not answer.
    Full {
        /// The least recently seen contact of the bucket.
        oldest: Contact<A>,
    },
    /// Our own key.
    Ignored,
}

/// k-buckets around our own key.
#[derive(Debug, Clone)]
pub struct RoutingTable<A> {
    own: Key,
    k: usize,
    buckets: Vec<Bucket<A>>,
    len: usize,
    /// The contact at each address: one node per address, so a new key there replaces it.
    by_address: HashMap<A, Key>,
}

impl<A: Copy + Eq + Hash> RoutingTable<A> {
    /// An empty table for the node with key `own`, `k` contacts per bucket (at least 1).
    pub fn new(own: Key, k: usize) -> Self {
        let empty = Bucket { entries: Vec::new(), pending: None, last_refreshed: None };
        Self { own, k: k.max(1), buckets: vec![empty; KEY_BITS], len: 0, by_address: HashMap::new() }
    }

    /// Contacts in the table (candidates not counted).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the table has no contact.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether `key` is a contact.
    pub fn contains(&self, key: &Key) -> bool {
        self.bucket_of(key).is_some_and(|bucket| bucket.entries.iter().any(|e| e.contact.key == *key))
    }

    /// The address of contact `key`.
    pub fn address_of(&self, key: &Key) -> Option<A> {
        let bucket = self.bucket_of(key)?;
        bucket.entries.iter().find(|e| e.contact.key == *key).map(|e| e.contact.address)
    }

    /// The contact at `address`, if any.
    pub fn key_at(&self, address: &A) -> Option<Key> {
        self.by_address.get(address).copied()
    }

    fn bucket_of(&self, key: &Key) -> Option<&Bucket<A>> {
        self.own.bucket_index(key).map(|index| &self.buckets[index])
    }

    /// Records that `contact` was heard from directly at `now`.
    pub fn insert(&mut self, contact: Contact<A>, now: Instant) -> Insert<A> {
        let Some(index) = self.own.bucket_index(&contact.key) else { return Insert::Ignored };
        let k = self.k;
        let bucket = &mut self.buckets[index];
        if let Some(position) = bucket.entries.iter().position(|e| e.contact.key == contact.key) {
            let mut entry = bucket.entries.remove(position);
            if entry.contact.address != contact.address {
                self.by_address.remove(&entry.contact.address);
                self.by_address.insert(contact.address, contact.key);
            }
            entry.contact.address = contact.address;
            entry.last_seen = now;
            entry.failures = 0;
            bucket.entries.push(entry);
            return Insert::Refreshed;
        }
        if bucket.entries.len() < k {
            bucket.entries.push(Entry { contact, last_seen: now, failures: 0 });
            bucket.last_refreshed.get_or_insert(now);
            self.len += 1;
            self.by_address.insert(contact.address, contact.key);
            return Insert::Added;
        }
        bucket.pending = Some(Entry { contact, last_seen: now, failures: 0 });
        Insert::Full { oldest: bucket.entries[0].contact }
    }

    /// Removes contact `key` (it stopped answering or said goodbye), promoting the bucket's
    /// candidate if there is one. Returns the removed contact and the promoted one.
    pub fn remove(&mut self, key: &Key) -> Option<(Contact<A>, Option<Contact<A>>)> {
        let index = self.own.bucket_index(key)?;
        let bucket = &mut self.buckets[index];
        let position = bucket.entries.iter().position(|e| e.contact.key == *key)?;
        let removed = bucket.entries.remove(position).contact;
        let promoted = bucket.pending.take().map(|entry| {
            let contact = entry.contact;
            bucket.entries.push(entry);
            contact
        });
        if self.by_address.get(&removed.address) == Some(&removed.key) {
            self.by_address.remove(&removed.address);
        }
        if let Some(promoted) = promoted {
            self.by_address.insert(promoted.address, promoted.key);
        }
        if promoted.is_none() {
            self.len -= 1;
        }
        Some((removed, promoted))
    }

    /// Contact `key` did not answer a request that timed out at `now`: it is removed (as by
    /// [`RoutingTable::remove`]) once it has failed [`MAX_FAILURES`] requests in a row *and*
    /// has been silent for at least `silence` (the caller passes two request timeouts), or at
    /// once if a candidate waits for its place. Returns what `remove` returns when it was
    /// removed.
    ///
    /// A lost datagram alone does not cost a live contact its place, and neither do requests
    /// that time out together: two lookups that asked the contact at the same moment fail at
    /// the same moment, which on a loaded machine (a process starved of CPU for a second)
    /// says no more than one failure does. Counted alone, they dropped live contacts, and the
    /// table churned (dropped, learned again) for as long as the load lasted.
    pub fn fail(
        &mut self,
        key: &Key,
        now: Instant,
        silence: Duration,
    ) -> Option<(Contact<A>, Option<Contact<A>>)> {
        let index = self.own.bucket_index(key)?;
        let bucket = &mut self.buckets[index];
        let entry = bucket.entries.iter_mut().find(|e| e.contact.key == *key)?;
        entry.failures += 1;
        let silent_long_enough = now.saturating_duration_since(entry.last_seen) >= silence;
        if (entry.failures >= MAX_FAILURES && silent_long_enough) || bucket.pending.is_some() {
            return self.remove(key);
        }
        None
    }

    /// Drops the candidate of `key`'s bucket (its oldest contact answered the ping).
    pub fn drop_pending(&mut self, key: &Key) {
        if let Some(index) = self.own.bucket_index(key) {
            self.buckets[index].pending = None;
        }
    }

    /// Up to `n` contacts closest to `target`, closest first.
    pub fn closest(&self, target: &Key, n: usize) -> Vec<Contact<A>> {
        let mut all: Vec<(Key, Contact<A>)> = self
            .buckets
            .iter()
            .flat_map(|bucket| bucket.entries.iter())
            .map(|entry| (entry.contact.key.distance(target), entry.contact))
            .collect();
        if n == 0 {
            return Vec::new();
        }
        if all.len() > n {
            // Every FIND answer asks for this: partition first, sort only the n kept.
            all.select_nth_unstable_by(n - 1, |a, b| a.0.cmp(&b.0));
            all.truncate(n);
        }
        all.sort_unstable_by_key(|entry| entry.0);
        all.into_iter().map(|(_, contact)| contact).collect()
    }

    /// How many contacts are closer to `target` than `distance`, counting up to `limit`.
    pub fn count_closer(&self, target: &Key, distance: &Key, limit: usize) -> usize {
        let mut count = 0;
        for entry in self.buckets.iter().flat_map(|bucket| bucket.entries.iter()) {
            if entry.contact.key.distance(target) < *distance {
                count += 1;
                if count >= limit {
                    break;
                }
            }
        }
        count
    }

    /// Every contact.
    pub fn contacts(&self) -> impl Iterator<Item = Contact<A>> + '_ {
        self.buckets.iter().flat_map(|bucket| bucket.entries.iter().map(|entry| entry.contact))
    }

    /// Notes a lookup of `target`: its bucket counts as refreshed.
    pub fn mark_refreshed(&mut self, target: &Key, now: Instant) {
        if let Some(index) = self.own.bucket_index(target) {
            self.buckets[index].last_refreshed = Some(now);
        }
    }

    /// Indexes of non-empty buckets not refreshed since `since`.
    pub fn stale_buckets(&self, since: Instant) -> Vec<usize> {
        self.buckets
            .iter()
            .enumerate()
            .filter(|(_, bucket)| !bucket.entries.is_empty())
            .filter(|(_, bucket)| bucket.last_refreshed.is_none_or(|at| at < since))
            .map(|(index, _)| index)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_full_bucket_keeps_its_oldest_until_it_fails_then_promotes_the_candidate() {
        let own = Key::ZERO;
        let mut table = RoutingTable::<u32>::new(own, 2);
        let now = Instant::now();
        // Keys in bucket 255: first bit set.
        let key = |n: u8| {
            let mut key = Key::ZERO;
            key.0[0] = 0x80;
            key.0[31] = n;
            key
        };
        assert_eq!(table.insert(Contact { key: key(1), address: 1 }, now), Insert::Added);
        assert_eq!(table.insert(Contact { key: key(2), address: 2 }, now), Insert::Added);
        assert_eq!(
            table.insert(Contact { key: key(3), address: 3 }, now),
            Insert::Full { oldest: Contact { key: key(1), address: 1 } }
        );
        assert_eq!(table.len(), 2);
        // The oldest answered: it moves to the back, the candidate is dropped.
        assert_eq!(
            table.insert(Contact { key: key(1), address: 1 }, now + Duration::from_secs(1)),
            Insert::Refreshed
        );
        table.drop_pending(&key(1));
        assert_eq!(table.remove(&key(2)).unwrap().1, None);
        assert_eq!(table.len(), 1);
        table.insert(Contact { key: key(2), address: 2 }, now);
        table.insert(Contact { key: key(4), address: 4 }, now);
        assert_eq!(table.remove(&key(1)).unwrap().1.map(|c| c.address), Some(4));
        assert_eq!(table.len(), 2);
        assert_eq!(table.insert(Contact { key: own, address: 0 }, now), Insert::Ignored);
        // One failure is forgiven, two in a row are not, once the contact was silent long enough.
        let silence = Duration::from_secs(2);
        assert!(table.fail(&key(2), now + silence, silence).is_none());
        assert!(table.fail(&key(2), now + silence, silence).is_some());
        assert!(!table.contains(&key(2)));
        assert_eq!(table.closest(&key(4), 1)[0].address, 4);
    }

    #[test]
    fn requests_that_fail_together_do_not_drop_a_contact_heard_from_lately() {
        let mut table = RoutingTable::<u32>::new(Key::ZERO, 20);
        let start = Instant::now();
        let silence = Duration::from_secs(2);
        let contact = Contact { key: Key::for_node("b"), address: 2 };
        table.insert(contact, start);
        // Heard at 0 s; three requests sent then all time out at 1 s (a starved process): the
        // contact was silent for half the required time, so it stays, failures and all.
        for _ in 0..3 {
            assert!(table.fail(&contact.key, start + silence / 2, silence).is_none());
        }
        assert!(table.contains(&contact.key));
        // Heard again: the count starts over.
        table.insert(contact, start + silence);
        assert!(table.fail(&contact.key, start + 3 * silence, silence).is_none(), "one failure is forgiven");
        assert!(table.contains(&contact.key));
        // A second failure in a row, 4 s after it was last heard (2 s are required): dropped.
        assert_eq!(
            table.fail(&contact.key, start + 3 * silence, silence).map(|(removed, _)| removed),
            Some(contact)
        );
        assert!(!table.contains(&contact.key));
        assert_eq!(table.len(), 0);
    }
}
