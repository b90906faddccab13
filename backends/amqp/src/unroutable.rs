//! Sends the broker returned because no queue has the address: logged once per address, in
//! one short line, until a send to it works again.
//!
//! The host keeps sending to a static peer that never started (a heartbeat every second);
//! each send fails with `UNREACHABLE`, which the host reports, so a line per send would only
//! repeat it. lapin's own record of each returned message (at `WARN`, with the whole message)
//! is forwarded at `DEBUG` (see [`comms_plugin_api::demote_to_debug`]).

use std::{
    collections::HashSet,
    sync::{
        atomic::{AtomicBool, Ordering},
        Mutex,
    },
};

/// lapin's target for returned messages.
pub(crate) const LAPIN_RETURNS_TARGET: &str = "lapin::returned_messages";

/// Addresses remembered at most; past that the set starts again (a few repeated lines, never
/// unbounded memory).
const CAPACITY: usize = 1024;

/// The addresses already reported as having no queue.
#[derive(Debug, Default)]
pub(crate) struct UnroutableLog {
    addresses: Mutex<HashSet<String>>,
    /// Whether `addresses` may be non-empty: spares sends the lock while nothing is unroutable.
    any: AtomicBool,
}

impl UnroutableLog {
    /// Records that a send to `address` came back; `true` the first time (log it).
    pub(crate) fn returned(&self, address: &str) -> bool {
        let mut addresses = self.addresses.lock().unwrap_or_else(|p| p.into_inner());
        if addresses.contains(address) {
            return false;
        }
        if addresses.len() >= CAPACITY {
            addresses.clear();
        }
        addresses.insert(address.to_string());
        self.any.store(true, Ordering::Release);
        true
    }

    /// Records that a send to `address` was routed: its next return is logged again.
    pub(crate) fn routed(&self, address: &str) {
        if !self.any.load(Ordering::Acquire) {
            return;
        }
        let mut addresses = self.addresses.lock().unwrap_or_else(|p| p.into_inner());
        addresses.remove(address);
        if addresses.is_empty() {
            self.any.store(false, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_reported_once_until_it_works_again() {
        let log = UnroutableLog::default();
        assert!(log.returned("comms.inbox.ghost"));
        assert!(!log.returned("comms.inbox.ghost"));
        assert!(log.returned("comms.inbox.other"));
        log.routed("comms.inbox.ghost");
        assert!(log.returned("comms.inbox.ghost"), "gone again after it worked: reported again");
    }

    #[test]
    fn memory_stays_bounded() {
        let log = UnroutableLog::default();
        for n in 0..(3 * CAPACITY) {
            log.returned(&format!("q{n}"));
        }
        assert!(log.addresses.lock().unwrap().len() <= CAPACITY);
    }
}
