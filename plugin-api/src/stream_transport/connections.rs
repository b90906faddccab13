//! The incoming connections of one transport: how many are open and from where, and which one
//! to close to make room for a new one (`max_connections`, `max_connections_per_address`).
//!
//! Every accepted connection is admitted here before its handshake and stays until its task
//! ends. A connection over a limit is not refused: the connection most likely to be dead or
//! hostile is evicted instead, so that a legitimate peer always gets in: the one idle longest,
//! counting from its last complete frame, or from its accept while it is in its handshake. A
//! live peer sends heartbeats and a new one has just connected, so neither is the idlest;
//! connections opened by a flood and left idle are. (Preferring connections in their handshake
//! would evict the very newcomer the room is made for, once a node is at its limit.)

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc, Mutex,
    },
    time::Instant,
};
use tokio::sync::Notify;

/// The open incoming connections and the limits they are kept under.
#[derive(Debug)]
pub(super) struct ConnectionTable {
    max_total: usize,
    max_per_address: usize,
    /// Activity is kept in milliseconds since this instant (an atomic, updated without a lock).
    epoch: Instant,
    entries: Mutex<Entries>,
}

#[derive(Debug, Default)]
struct Entries {
    next_id: u64,
    open: HashMap<u64, Entry>,
    per_address: HashMap<String, usize>,
}

#[derive(Debug)]
struct Entry {
    /// The IP address, when the connection has one (a Unix socket has none).
    address: Option<String>,
    slot: Arc<ConnectionSlot>,
}

/// What the table knows of one connection, shared with the task serving it.
#[derive(Debug, Default)]
pub(super) struct ConnectionSlot {
    /// When the connection last completed a frame (or was accepted), in the table's milliseconds.
    last_active_ms: AtomicU64,
    /// Signalled once when the connection is evicted (a permit is kept if nobody waits yet).
    evicted: Notify,
}

impl ConnectionSlot {
    /// Completes once the connection has been evicted to make room for another.
    pub(super) async fn evicted(&self) {
        self.evicted.notified().await
    }
}

/// A connection's place in the table; dropping it frees the place.
#[derive(Debug)]
pub(super) struct Admission {
    table: Arc<ConnectionTable>,
    id: u64,
    slot: Arc<ConnectionSlot>,
}

impl Admission {
    /// What the table knows of this connection.
    pub(super) fn slot(&self) -> &ConnectionSlot {
        &self.slot
    }

    /// The connection completed a frame just now.
    pub(super) fn active(&self) {
        self.slot.last_active_ms.store(self.table.now_ms(), Relaxed);
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.table.lock().remove(self.id);
    }
}

impl ConnectionTable {
    pub(super) fn new(max_total: usize, max_per_address: usize) -> Self {
        Self { max_total, max_per_address, epoch: Instant::now(), entries: Mutex::default() }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Connections open now.
    pub(super) fn len(&self) -> usize {
        self.lock().open.len()
    }

    /// Admits a connection from `address` (its IP address, see [`address_key`]), evicting
    /// connections to stay within the limits; returns its place and how many were evicted.
    pub(super) fn admit(self: &Arc<Self>, address: Option<String>) -> (Admission, u64) {
        let mut entries = self.lock();
        let mut evicted = 0;
        if let Some(address) = &address {
            if entries.per_address.get(address).copied().unwrap_or(0) >= self.max_per_address {
                evicted += u64::from(entries.evict(Some(address)));
            }
        }
        if entries.open.len() >= self.max_total {
            evicted += u64::from(entries.evict(None));
        }
        let slot = Arc::new(ConnectionSlot::default());
        slot.last_active_ms.store(self.now_ms(), Relaxed);
        let id = entries.next_id;
        entries.next_id += 1;
        if let Some(address) = &address {
            *entries.per_address.entry(address.clone()).or_default() += 1;
        }
        entries.open.insert(id, Entry { address, slot: Arc::clone(&slot) });
        (Admission { table: Arc::clone(self), id, slot }, evicted)
    }

    /// Evicts the connection most likely dead or hostile, to free its file descriptor; whether
    /// there was one.
    pub(super) fn evict_one(&self) -> bool {
        self.lock().evict(None)
    }
}

impl Entries {
    fn remove(&mut self, id: u64) -> Option<Entry> {
        let entry = self.open.remove(&id)?;
        if let Some(address) = &entry.address {
            if let Some(count) = self.per_address.get_mut(address) {
                *count -= 1;
                if *count == 0 {
                    self.per_address.remove(address);
                }
            }
        }
        Some(entry)
    }

    /// Evicts (from `address` only, if given) the connection idle longest. A linear scan: it
    /// runs only when a limit is reached.
    fn evict(&mut self, address: Option<&str>) -> bool {
        let victim = self
            .open
            .iter()
            .filter(|(_, entry)| address.is_none_or(|address| entry.address.as_deref() == Some(address)))
            .min_by_key(|(id, entry)| (entry.slot.last_active_ms.load(Relaxed), **id))
            .map(|(id, _)| *id);
        match victim.and_then(|id| self.remove(id)) {
            Some(entry) => {
                entry.slot.evicted.notify_one();
                true
            }
            None => false,
        }
    }
}

/// The address a connection is counted under for `max_connections_per_address`: the IP of an
/// `ip:port` label. Other labels (a Unix socket's) have none: only the total limit applies.
pub(super) fn address_key(label: &str) -> Option<String> {
    label.parse::<std::net::SocketAddr>().ok().map(|socket| socket.ip().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(total: usize, per_address: usize) -> Arc<ConnectionTable> {
        Arc::new(ConnectionTable::new(total, per_address))
    }

    /// Whether `admission` was evicted (its signal is pending).
    fn was_evicted(admission: &Admission) -> bool {
        use std::future::Future;
        let waker = std::task::Waker::noop();
        let mut context = std::task::Context::from_waker(waker);
        let mut evicted = std::pin::pin!(admission.slot().evicted());
        evicted.as_mut().poll(&mut context).is_ready()
    }

    #[test]
    fn the_per_address_limit_evicts_from_that_address_only() {
        let table = table(10, 2);
        let other = table.admit(Some("10.0.0.9".into())).0;
        let first = table.admit(Some("10.0.0.1".into())).0;
        let second = table.admit(Some("10.0.0.1".into())).0;
        let (third, evicted) = table.admit(Some("10.0.0.1".into()));
        assert_eq!(evicted, 1);
        assert!(was_evicted(&first) && !was_evicted(&second) && !was_evicted(&other));
        assert_eq!(table.len(), 3);
        drop((first, second, third, other));
        assert_eq!(table.len(), 0, "dropping an admission frees its place, evicted or not");
    }

    #[test]
    fn the_total_limit_evicts_the_connection_idle_longest() {
        let table = table(3, 10);
        let idle = table.admit(Some("a".into())).0;
        let busy = table.admit(Some("b".into())).0;
        let newcomer = table.admit(Some("c".into())).0;
        // `busy` completed a frame after the others connected (milliseconds since the epoch).
        busy.slot.last_active_ms.store(u64::MAX, Relaxed);
        let (next, evicted) = table.admit(Some("d".into()));
        assert_eq!(evicted, 1);
        assert!(was_evicted(&idle) && !was_evicted(&busy) && !was_evicted(&newcomer));
        assert_eq!(table.len(), 3);
        assert!(table.evict_one(), "an out-of-files eviction takes the idlest too");
        assert!(was_evicted(&newcomer) && !was_evicted(&next), "the earlier of two equally idle goes");
    }

    #[test]
    fn addresses_are_counted_by_ip() {
        assert_eq!(address_key("127.0.0.2:4000").as_deref(), Some("127.0.0.2"));
        assert_eq!(address_key("[::1]:4000").as_deref(), Some("::1"));
        assert_eq!(address_key("unix socket peer"), None);
    }
}
