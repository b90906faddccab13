//! Changing the transports and the discovery of a running node ([`crate::Node::reload`]).
//!
//! What is decided (which transports are added, replaced or removed) is worked out from the
//! configurations in [`crate::reload`]; this carries it out without losing what is under way.
//!
//! **Replacing a transport.** The new instance is started first ("make before break"). When it
//! starts, it takes the old one's place in the preference order at once, the node's record with
//! its address goes to discovery and to every live peer, and the old instance keeps receiving
//! for a linger of one heartbeat interval (peers that still send to its address while they learn
//! the new one lose nothing) before it is retired. When the new instance cannot start while the
//! old one runs (typically: both want the same listen address), the old one is retired first
//! ("break before make") and the new one started after; sends meanwhile wait for it instead of
//! failing. If the new one still cannot start, the old configuration is started again and the
//! reload reports the error.
//!
//! **Retiring a transport** (replaced or removed): sends routed to it from now on wait for its
//! successor; the sends under way finish; a transport with acknowledgements stops taking
//! messages and hands over the settlements given so far (messages the application still holds
//! go back to the broker when it closes, which delivers them again); the transport is closed,
//! which flushes what it queued; what it had received (transports without acknowledgements)
//! is still taken into the node. Each wait is bounded by the node's close timeout.
//!
//! The old library stays mapped (abi_stable never unloads one), and the old instance keeps its
//! index in the transport table ([`super::TransportTable`]), so that a late settlement can only
//! reach the instance that received the message.

use super::{lock, Driver, Input, NodeTransport};
use comms_plugin_api::{
    host_side::LoadedDiscovery, Capabilities, ErrorCode, NodeRecord, PeerEvent, PeerEventKind, PluginError,
};
use std::{
    future::Future,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};
use tokio::sync::Notify;

/// The shortest linger of a replaced transport that was started beside its successor.
const MIN_LINGER: Duration = Duration::from_millis(500);

/// Which configuration of a replaced transport to start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Attempt {
    /// The new configuration, beside the old instance.
    NewBeside,
    /// The new configuration, after the old instance was retired.
    NewAfter,
    /// The old configuration again (the new one did not start).
    OldAgain,
}

/// Why a transport did not start, and whether it may start once the one it replaces is gone
/// (the plugin refused to start, e.g. its listen address is in use) or never will (a config
/// error, a plugin file that is missing or incompatible).
#[derive(Debug)]
pub(crate) struct StartFailure {
    pub(crate) reason: String,
    pub(crate) may_start_alone: bool,
}

/// The sends under way on one transport, so that retiring it waits for them.
#[derive(Debug, Default)]
pub(crate) struct InUse {
    sending: AtomicUsize,
    retiring: AtomicBool,
    idle: Notify,
}

/// A send under way on a transport in service (see [`InUse`]).
pub(crate) struct SendGuard(Arc<NodeTransport>);

impl SendGuard {
    /// The transport back if it is being retired. Takes the `Arc` rather than cloning it: this
    /// runs on every send.
    pub(crate) fn begin(transport: Arc<NodeTransport>) -> Result<SendGuard, Arc<NodeTransport>> {
        // SeqCst on both sides: either this send sees `retiring`, or the retiring side sees
        // this send in the count and waits for it.
        transport.in_use.sending.fetch_add(1, Ordering::SeqCst);
        let guard = SendGuard(transport);
        if guard.0.in_use.retiring.load(Ordering::SeqCst) {
            // Dropping the guard takes this send out of the count again.
            return Err(Arc::clone(&guard.0));
        }
        Ok(guard)
    }
}

impl std::ops::Deref for SendGuard {
    type Target = NodeTransport;

    fn deref(&self) -> &NodeTransport {
        &self.0
    }
}

impl Drop for SendGuard {
    fn drop(&mut self) {
        let in_use = &self.0.in_use;
        if in_use.sending.fetch_sub(1, Ordering::SeqCst) == 1 && in_use.retiring.load(Ordering::SeqCst) {
            in_use.idle.notify_waiters();
        }
    }
}

/// What a send through a retired transport reports when its successor did not come.
pub(crate) fn retired_error(transport: &NodeTransport) -> PluginError {
    PluginError::new(
        ErrorCode::CLOSED,
        format!("transport `{}` was taken out of service by a reload and has no successor", transport.name),
    )
}

impl Driver {
    /// Waits until `transport` is out of service and its successor (if any) in service, for at
    /// most the close timeout plus the time a transport takes to start.
    pub(crate) async fn wait_for_swap(&self, transport: &Arc<NodeTransport>) {
        let mut swaps = self.swaps.subscribe();
        let limit = self.spec.close_timeout * 2 + Duration::from_secs(5);
        let swapped = async {
            loop {
                let serving = self.serving_transports().iter().any(|(_, t)| Arc::ptr_eq(t, transport));
                if !serving || swaps.changed().await.is_err() {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(limit, swapped).await;
    }

    /// Puts `transport` in service: in the place of `replacing` (an index), or last. The engine
    /// is told, so the node's record goes out with the new address.
    fn install(self: &Arc<Self>, transport: NodeTransport, replacing: Option<usize>) -> usize {
        let (index, input) = {
            let mut table = self.transports.write().unwrap_or_else(|poisoned| poisoned.into_inner());
            let index = table.all.len();
            table.all.push(Arc::new(transport));
            match replacing.and_then(|old| table.serving.iter().position(|i| *i == old)) {
                Some(position) => table.serving[position] = index,
                None => table.serving.push(index),
            }
            (index, table.engine_input())
        };
        self.start_receive_loop(index);
        self.run(self.handle(input));
        index
    }

    /// Takes the transport at `index` out of the preference order (the engine routes nothing
    /// more to it), without closing it.
    fn withdraw_from_service(self: &Arc<Self>, index: usize) {
        let input = {
            let mut table = self.transports.write().unwrap_or_else(|poisoned| poisoned.into_inner());
            table.serving.retain(|i| *i != index);
            table.engine_input()
        };
        self.run(self.handle(input));
    }

    /// Adds a started transport to the node (last in the preference order).
    pub(crate) async fn add_transport(self: &Arc<Self>, transport: NodeTransport) -> Result<(), String> {
        if *self.closing.borrow() {
            let _ = transport.loaded.close().await;
            return Err("the node is closing".into());
        }
        self.subscribe_all(&transport).await?;
        self.install(transport, None);
        self.finish_swap();
        Ok(())
    }

    /// A new transport with native topics subscribes to the node's patterns before it serves.
    async fn subscribe_all(&self, transport: &NodeTransport) -> Result<(), String> {
        if !transport.has(Capabilities::NATIVE_TOPICS) {
            return Ok(());
        }
        let patterns = self.engine().record().topics.clone();
        for pattern in patterns {
            if let Err(error) = transport.loaded.subscribe(&pattern).await {
                let _ = transport.loaded.close().await;
                return Err(format!("subscribing the new transport to `{pattern}`: {error}"));
            }
        }
        Ok(())
    }

    /// Starts a transport for a swap and subscribes it (see [`Driver::subscribe_all`]).
    async fn start_for_swap<F, Fut>(
        &self,
        start: &mut F,
        attempt: Attempt,
    ) -> Result<NodeTransport, StartFailure>
    where
        F: FnMut(Attempt) -> Fut,
        Fut: Future<Output = Result<NodeTransport, StartFailure>>,
    {
        let transport = start(attempt).await?;
        if *self.closing.borrow() {
            // A close started meanwhile: it does not know this transport, so nothing would close it.
            let _ = transport.loaded.close().await;
            return Err(StartFailure { reason: "the node is closing".into(), may_start_alone: false });
        }
        self.subscribe_all(&transport)
            .await
            .map_err(|reason| StartFailure { reason, may_start_alone: false })?;
        Ok(transport)
    }

    /// Takes the transport at `index` out of service and retires it.
    pub(crate) async fn remove_transport(self: &Arc<Self>, index: usize) -> Result<(), String> {
        let Some(transport) = self.transport(index) else { return Ok(()) };
        begin_retiring(&transport);
        self.withdraw_from_service(index);
        let retired = self.retire(index, &transport).await;
        self.finish_swap();
        retired
    }

    /// Replaces the transport at `index` with one that `start` starts (see the module docs).
    /// On an error the node runs the old configuration again, or, if even that cannot start,
    /// goes on without the transport (the error says which).
    pub(crate) async fn replace_transport<F, Fut>(
        self: &Arc<Self>,
        index: usize,
        mut start: F,
    ) -> Result<ReplaceOutcome, String>
    where
        F: FnMut(Attempt) -> Fut,
        Fut: Future<Output = Result<NodeTransport, StartFailure>>,
    {
        let Some(old) = self.transport(index) else {
            return Err(format!("no transport at index {index}"));
        };
        let outcome = match self.start_for_swap(&mut start, Attempt::NewBeside).await {
            Ok(new) => {
                self.install(new, Some(index));
                begin_retiring(&old);
                // Peers learn the new address from the record just sent; what they had queued
                // for the old one still arrives meanwhile.
                let linger = self.spec.heartbeat_interval.unwrap_or(Duration::from_secs(1)).max(MIN_LINGER);
                let mut closing = self.closing.subscribe();
                tokio::select! {
                    _ = tokio::time::sleep(linger) => {}
                    _ = closing.wait_for(|closing| *closing) => {}
                }
                let retired = self.retire(index, &old).await;
                Ok(ReplaceOutcome { beside: true, retire_problem: retired.err() })
            }
            Err(StartFailure { reason, may_start_alone: false }) => {
                Err(format!("{reason}; the node keeps the transport it had"))
            }
            Err(StartFailure { reason: beside_error, .. }) => {
                tracing::info!(
                    transport = %old.name,
                    reason = %beside_error,
                    "the new transport cannot start beside the old one; retiring the old one first"
                );
                begin_retiring(&old);
                let retired = self.retire(index, &old).await;
                match self.start_for_swap(&mut start, Attempt::NewAfter).await {
                    Ok(new) => {
                        self.install(new, Some(index));
                        Ok(ReplaceOutcome { beside: false, retire_problem: retired.err() })
                    }
                    Err(StartFailure { reason: error, .. }) => {
                        match self.start_for_swap(&mut start, Attempt::OldAgain).await {
                            Ok(again) => {
                                self.install(again, Some(index));
                                Err(format!("{error}; the old configuration runs again"))
                            }
                            Err(StartFailure { reason: again_error, .. }) => {
                                self.withdraw_from_service(index);
                                Err(format!(
                                "{error}; the old configuration could not start again either ({again_error}): \
                                 the node runs without transport `{}`",
                                old.name
                            ))
                            }
                        }
                    }
                }
            }
        };
        self.finish_swap();
        outcome
    }

    /// Stops what the transport at `index` does, in the order that loses nothing (module docs).
    async fn retire(self: &Arc<Self>, index: usize, transport: &Arc<NodeTransport>) -> Result<(), String> {
        let limit = self.spec.close_timeout;
        let mut problems = Vec::new();
        let idle = async {
            loop {
                let notified = transport.in_use.idle.notified();
                if transport.in_use.sending.load(Ordering::SeqCst) == 0 {
                    return;
                }
                notified.await;
            }
        };
        if tokio::time::timeout(limit, idle).await.is_err() {
            problems.push("sends under way did not finish within the close timeout".to_string());
        }
        let mut receive_loop = {
            let mut loops = lock(&self.receive_loops);
            let position = loops.iter().position(|(i, _)| *i == index);
            position.map(|position| loops.swap_remove(position).1)
        };
        let acknowledges = transport.has(Capabilities::ACKNOWLEDGEMENTS);
        if acknowledges {
            // The loop stops taking once `retiring` is set; the settlements given so far go to
            // the transport before it closes.
            if let Some(handle) = receive_loop.as_mut() {
                let _ = tokio::time::timeout(limit, handle).await;
            }
            if tokio::time::timeout(limit, transport.settle_lane.flush()).await.is_err() {
                problems.push("settlements could not be handed to the transport in time".to_string());
            }
        }
        if let Err(error) = transport.loaded.close().await {
            problems.push(format!("closing it: {error}"));
        }
        if let (false, Some(handle)) = (acknowledges, receive_loop) {
            // What it received is taken into the node (the loop ends when the transport is empty).
            if tokio::time::timeout(limit, handle).await.is_err() {
                problems
                    .push("what it had received could not be handed over in time (inbox full)".to_string());
            }
        }
        tracing::info!(transport = %transport.name, plugin = %transport.plugin, version = %transport.plugin_version, "transport retired");
        if problems.is_empty() {
            Ok(())
        } else {
            Err(format!("transport `{}` (retired): {}", transport.name, problems.join("; ")))
        }
    }

    /// Wakes the sends that waited for a swap.
    fn finish_swap(&self) {
        self.swaps.send_modify(|count| *count += 1);
    }

    /// Puts `discovery` in service (started, with this node's record announced, `peers` what it
    /// knew), feeds its peers to the engine, and closes the old one (without withdrawing this
    /// node: the new one may share its registry).
    pub(crate) async fn replace_discovery(
        self: &Arc<Self>,
        discovery: LoadedDiscovery,
        peers: Vec<NodeRecord>,
    ) -> Result<(), String> {
        let old = {
            let mut current = self.discovery.write().unwrap_or_else(|poisoned| poisoned.into_inner());
            std::mem::replace(&mut *current, Arc::new(discovery))
        };
        // The new discovery has no record of this node yet, whatever the old one had.
        *self.announcing.lock().await = 0;
        let watcher = tokio::spawn(super::incoming::watch_discovery(Arc::clone(self)));
        lock(&self.tasks).push(watcher);
        for record in peers {
            self.run(self.handle(Input::Discovery(PeerEvent { kind: PeerEventKind::Joined, record })));
        }
        self.announce_latest().await;
        old.close().await.map_err(|error| format!("closing the old discovery: {error}"))
    }
}

/// Sends routed to `transport` from now on wait for its successor; its receive loop stops
/// taking (transports with acknowledgements).
fn begin_retiring(transport: &NodeTransport) {
    transport.in_use.retiring.store(true, Ordering::SeqCst);
    transport.retiring.send_replace(true);
}

/// How a replacement went.
#[derive(Debug)]
pub(crate) struct ReplaceOutcome {
    /// The new instance started beside the old one (`false`: after it was retired).
    pub(crate) beside: bool,
    /// What went wrong while retiring the old instance, if anything.
    pub(crate) retire_problem: Option<String>,
}
