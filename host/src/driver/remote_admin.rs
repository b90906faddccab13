//! The built-in admin services: [`SHUTDOWN_SERVICE`] (a node closes itself gracefully; qb's
//! shutdown message) and [`RELOAD_SERVICE`] (it reads its config file again and applies it;
//! Pythomnic3k's online changes), each obeyed only when a node whose key is one of its
//! `[admin] keys` asks.
//!
//! The caller is known by its node id, which is bound to its public key, and proven by the
//! envelope's signature: the builder refuses admin keys unless `[security] signatures =
//! "require"`, so a forged sender never reaches these handlers.

use super::Driver;
use crate::admin::{RELOAD_SERVICE, SHUTDOWN_SERVICE};
use comms_plugin_api::{security::PublicKey, NodeId};
use std::sync::{atomic::Ordering, Arc, Weak};

/// The handler of [`SHUTDOWN_SERVICE`]; holds the node weakly, as the status handler does.
pub(super) fn shutdown_handler(codec: crate::Codec, node: Weak<Driver>) -> crate::service::Handler {
    crate::service::ServiceHandler::new(codec, move |request: crate::Received<()>| {
        let answer = match node.upgrade() {
            Some(driver) => driver.shutdown_requested(&request.from),
            None => Err("the node has stopped".to_string()),
        };
        async move { answer }
    })
    .0
}

/// The handler of [`RELOAD_SERVICE`]: the answer is what the reload changed
/// ([`crate::ReloadReport`]), or why it did not apply.
pub(super) fn reload_handler(codec: crate::Codec, node: Weak<Driver>) -> crate::service::Handler {
    crate::service::ServiceHandler::new(codec, move |request: crate::Received<()>| {
        let node = node.clone();
        async move {
            let Some(driver) = node.upgrade() else { return Err("the node has stopped".to_string()) };
            driver.check_admin(&request.from, RELOAD_SERVICE, "reload")?;
            tracing::warn!(from = %request.from, "reloading the config file at the request of an admin");
            let Some(reloader) = driver.reloader.get().cloned() else {
                return Err(format!(
                    "node {} was not built from a config file (`Node::from_config`, `comms run`): nothing to read again",
                    driver.id
                ));
            };
            reloader(driver).await
        }
    })
    .0
}

impl Driver {
    /// `Ok` if `from` is one of the node's `[admin] keys`; otherwise the refusal, naming
    /// `service` and what it would have done.
    fn check_admin(&self, from: &NodeId, service: &str, action: &str) -> Result<(), String> {
        let Some(admins) = &self.spec.admins else {
            return Err(format!(
                "node {} does not take {service} requests: it has no `[admin] keys`",
                self.id
            ));
        };
        if !PublicKey::of_node(from).is_some_and(|key| admins.permits(&key)) {
            tracing::warn!(%from, service, "admin request refused: the caller's key is not in [admin] keys");
            return Err(format!(
                "node {from} may not {action} node {}: its key is not in `[admin] keys`",
                self.id
            ));
        }
        Ok(())
    }

    /// Starts closing the node if `from` is an admin. The close waits for the requests in
    /// flight, this one included, so the caller gets its answer before the node leaves.
    fn shutdown_requested(self: &Arc<Self>, from: &NodeId) -> Result<String, String> {
        self.check_admin(from, SHUTDOWN_SERVICE, "shut down")?;
        if !self.closed.swap(true, Ordering::AcqRel) {
            tracing::warn!(%from, "shutting down at the request of an admin");
            let driver = Arc::clone(self);
            tokio::spawn(async move {
                if let Err(error) = driver.close().await {
                    tracing::warn!(%error, "closing at an admin's request");
                }
            });
        }
        Ok(format!("node {} is shutting down", self.id))
    }
}
