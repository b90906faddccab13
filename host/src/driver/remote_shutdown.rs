//! The built-in service [`SHUTDOWN_SERVICE`]: a node closes itself gracefully when a node whose
//! key is one of its `[admin] keys` asks (qb's shutdown message, Pythomnic3k's remote control).
//!
//! The caller is known by its node id, which is bound to its public key, and proven by the
//! envelope's signature: the builder refuses admin keys unless `[security] signatures =
//! "require"`, so a forged sender never reaches this handler.

use super::Driver;
use crate::admin::SHUTDOWN_SERVICE;
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

impl Driver {
    /// Starts closing the node if `from` is an admin. The close waits for the requests in
    /// flight, this one included, so the caller gets its answer before the node leaves.
    fn shutdown_requested(self: &Arc<Self>, from: &NodeId) -> Result<String, String> {
        let Some(admins) = &self.spec.admins else {
            return Err(format!(
                "node {} does not take {SHUTDOWN_SERVICE} requests: it has no `[admin] keys`",
                self.id
            ));
        };
        if !PublicKey::of_node(from).is_some_and(|key| admins.permits(&key)) {
            tracing::warn!(%from, "remote shutdown refused: the caller's key is not in [admin] keys");
            return Err(format!(
                "node {from} may not shut down node {}: its key is not in `[admin] keys`",
                self.id
            ));
        }
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
