//! In-process wake-up: when a transport of this process commits messages for a node, the
//! receivers of that node in this process are woken at once instead of at their next poll.
//!
//! A `static` of this library: the dynamic loader maps a plugin once per process, so every
//! instance shares it. Keys are the canonical database path and the node id.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, OnceLock, Weak},
};
use tokio::sync::Notify;

type Key = (String, String);

fn registry() -> &'static Mutex<HashMap<Key, Vec<Weak<Notify>>>> {
    static REGISTRY: OnceLock<Mutex<HashMap<Key, Vec<Weak<Notify>>>>> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

/// A receiver's registration; unregisters when dropped.
#[derive(Debug)]
pub(crate) struct WakeRegistration {
    key: Key,
    notify: Arc<Notify>,
}

impl WakeRegistration {
    /// Registers a receiver of `node` on the database `path`.
    pub(crate) fn register(path: &str, node: &str) -> Self {
        let key = (path.to_string(), node.to_string());
        let notify = Arc::new(Notify::new());
        let mut map = registry().lock().unwrap_or_else(|p| p.into_inner());
        map.entry(key.clone()).or_default().push(Arc::downgrade(&notify));
        Self { key, notify }
    }

    /// Completes when woken (or at once if woken since the last wait).
    pub(crate) fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.notify.notified()
    }
}

impl Drop for WakeRegistration {
    fn drop(&mut self) {
        let mut map = registry().lock().unwrap_or_else(|p| p.into_inner());
        if let Some(list) = map.get_mut(&self.key) {
            list.retain(|weak| {
                weak.strong_count() > 0 && !std::ptr::eq(weak.as_ptr(), Arc::as_ptr(&self.notify))
            });
            if list.is_empty() {
                map.remove(&self.key);
            }
        }
    }
}

/// Wakes every receiver of each of `nodes` on the database `path` in this process.
pub(crate) fn wake<'a>(path: &str, nodes: impl IntoIterator<Item = &'a str>) {
    let map = registry().lock().unwrap_or_else(|p| p.into_inner());
    if map.is_empty() {
        return;
    }
    let mut key = (path.to_string(), String::new());
    for node in nodes {
        node.clone_into(&mut key.1);
        for notify in map.get(&key).into_iter().flatten().filter_map(Weak::upgrade) {
            // Stores a permit if the receiver is not waiting yet, so no wake-up is lost.
            notify.notify_one();
        }
    }
}
