//! The process-wide table of memory transports: address -> inbound queue.
//!
//! A `static` of this library, so it is shared by every instance the library serves in the
//! process (and only by those: another copy of the library has its own).

use crate::ADDRESS_SCHEME;
use comms_plugin_api::{Envelope, ErrorCode, NodeId, PluginError};
use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex, MutexGuard,
    },
};
use tokio::sync::mpsc;

/// What a sender needs to reach one instance.
#[derive(Debug, Clone)]
pub(crate) struct Mailbox {
    /// The instance's bounded inbound queue.
    pub(crate) queue: mpsc::Sender<Envelope>,
    /// The largest payload the instance accepts.
    pub(crate) max_message_size: u64,
    /// Tells this registration from a later one at the same address.
    registration: u64,
}

static MAILBOXES: Mutex<BTreeMap<String, Mailbox>> = Mutex::new(BTreeMap::new());
/// Numbers registrations, so that a stale one never removes its successor.
static NEXT_REGISTRATION: AtomicU64 = AtomicU64::new(0);
/// The `<n>` of generated addresses.
static NEXT_GENERATED: AtomicU64 = AtomicU64::new(0);

fn mailboxes() -> MutexGuard<'static, BTreeMap<String, Mailbox>> {
    // The map is valid after any panic (every update is a single insert or remove).
    MAILBOXES.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// An address registered by one instance. Unregisters it when dropped.
#[derive(Debug)]
pub(crate) struct Registration {
    address: String,
    id: u64,
}

impl Registration {
    /// Registers `queue` at `address`, or at a generated `memory://<node id>-<n>` address that
    /// is free. A configured address already in use is a config error naming the key.
    pub(crate) fn new(
        address: Option<&str>,
        node_id: &NodeId,
        queue: mpsc::Sender<Envelope>,
        max_message_size: u64,
    ) -> Result<Self, PluginError> {
        let mut mailboxes = mailboxes();
        let address = match address {
            Some(address) if mailboxes.contains_key(address) => {
                return Err(PluginError::invalid_config(format!(
                    "key `address`: `{address}` is already in use by another memory transport in this \
                     process; choose another address or leave it out to get a generated one"
                )));
            }
            Some(address) => address.to_string(),
            None => loop {
                let n = NEXT_GENERATED.fetch_add(1, Ordering::Relaxed);
                let candidate = format!("{ADDRESS_SCHEME}{node_id}-{n}");
                if !mailboxes.contains_key(&candidate) {
                    break candidate;
                }
            },
        };
        let id = NEXT_REGISTRATION.fetch_add(1, Ordering::Relaxed);
        mailboxes.insert(address.clone(), Mailbox { queue, max_message_size, registration: id });
        Ok(Self { address, id })
    }

    /// The registered address.
    pub(crate) fn address(&self) -> &str {
        &self.address
    }

    /// Removes the address from the registry (if it is still this registration's). Idempotent.
    pub(crate) fn unregister(&self) {
        let mut mailboxes = mailboxes();
        if mailboxes.get(&self.address).is_some_and(|mailbox| mailbox.registration == self.id) {
            mailboxes.remove(&self.address);
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.unregister();
    }
}

/// The mailbox registered at `address`; a retryable [`ErrorCode::UNREACHABLE`] if there is none.
pub(crate) fn lookup(address: &str) -> Result<Mailbox, PluginError> {
    mailboxes().get(address).cloned().ok_or_else(|| {
        PluginError::retryable(
            ErrorCode::UNREACHABLE,
            format!(
                "no memory transport is registered at `{address}` in this process \
                 (not started yet, or closed)"
            ),
        )
    })
}
