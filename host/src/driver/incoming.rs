//! What comes in: messages from each transport, discovery's events, the passing of time. Each
//! loop turns what happened into engine inputs and carries out the answer; none of them waits
//! for the application (the engine parks or pauses instead).

use super::{now, Driver};
use crate::engine::Input;
use comms_plugin_api::{
    log_rate::LogRateLimit, Capabilities, Envelope, ErrorCode, Inbound, Settlement, SettlementOutcome,
};
use std::{sync::Arc, time::Duration};
use tokio::sync::watch;

/// Messages taken from a transport per call across the plugin boundary.
const RECEIVE_BATCH: u32 = 256;

async fn flag_set(flag: &mut watch::Receiver<bool>) {
    let _ = flag.wait_for(|set| *set).await;
}

/// Moves messages from the transport `index` into the engine.
pub(super) async fn receive_loop(driver: Arc<Driver>, index: usize) {
    let Some(transport) = driver.transport(index) else { return };
    let acknowledges = transport.has(Capabilities::ACKNOWLEDGEMENTS);
    let mut shutdown = driver.shutdown.subscribe();
    let mut closing = driver.closing.subscribe();
    // A transport a reload takes out of service stops as at close (see below).
    let mut retiring = transport.retiring.subscribe();
    let mut paused = transport.paused.subscribe();
    let mut failures = 0u32;
    // Whether to stop taking from the transport: at shutdown, and for a transport with
    // acknowledgements also when the node closes or a reload retires the transport (it keeps
    // what this node has not taken yet and hands it to the next consumer, so the node stops
    // taking at once and settles everything it took before its transport closes; without
    // acknowledgements the node drains instead: what the transport buffered is received after it
    // closes). One future for the whole loop: a message then costs one registration with these
    // flags, not one per flag per call.
    let stop = async {
        tokio::select! {
            _ = flag_set(&mut shutdown) => {}
            _ = flag_set(&mut closing), if acknowledges => {}
            _ = flag_set(&mut retiring), if acknowledges => {}
        }
    };
    tokio::pin!(stop);
    loop {
        // Backpressure: the engine has no room for more from this transport yet.
        if *paused.borrow_and_update() {
            tokio::select! {
                _ = paused.wait_for(|paused| !*paused) => {}
                () = &mut stop => return,
            }
        }
        // Each message becomes the engine's input as it comes out of the plugin's batch.
        let mut taken = 0usize;
        let each = |inbound: Inbound| {
            taken += 1;
            if !admitted(&driver, &transport.name, &inbound.envelope) {
                if acknowledges {
                    // Refused for good: never delivered again.
                    let outcome = SettlementOutcome::REJECTED_DISCARD;
                    transport.settle_lane.settle(Settlement { delivery_tag: inbound.delivery_tag, outcome });
                }
                return None;
            }
            Some(Input::Received { transport: index, envelope: inbound.envelope, tag: inbound.delivery_tag })
        };
        let received = tokio::select! {
            biased;
            () = &mut stop => return,
            received = transport.loaded.receive_each(RECEIVE_BATCH, each) => received,
        };
        match received {
            // Empty from the plugin: the transport is closed and nothing more will come.
            Ok(_) if taken == 0 => return,
            Ok(inputs) => {
                failures = 0;
                driver.run_received(driver.handle_all(inputs)).await;
            }
            Err(error)
                if error.code == ErrorCode::CLOSED
                    || *driver.closing.borrow()
                    || *transport.retiring.borrow() =>
            {
                return
            }
            Err(error) => {
                failures += 1;
                tracing::warn!(transport = %transport.name, %error, failures, "receive failed; retrying");
                driver.report_failure(&transport.name, error);
                let delay = Duration::from_millis(50u64.saturating_mul(1 << failures.min(7)));
                let (mut closing, mut shutdown) = (driver.closing.subscribe(), driver.shutdown.subscribe());
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = flag_set(&mut closing) => return,
                    _ = flag_set(&mut shutdown) => return,
                }
            }
        }
    }
}

/// One line per refused envelope would let a forger fill the log: a few per interval, then a
/// count (`Node::rejected_count` has the total).
static SIGNATURE_REFUSED: LogRateLimit = LogRateLimit::standard();

/// Whether an incoming envelope passes the node's signature checks (always, unless
/// `signatures = "require"`). A refused one is logged and counted.
fn admitted(driver: &Driver, transport: &str, envelope: &Envelope) -> bool {
    let Some(signatures) = &driver.signatures else { return true };
    match signatures.check(envelope) {
        Ok(()) => true,
        Err(reason) => {
            driver.rejected.add();
            if let Some(repeats) = SIGNATURE_REFUSED.check() {
                tracing::warn!(
                    transport,
                    // Debug-quoted: not checked yet, it may hold a newline.
                    from = ?envelope.from.as_str(),
                    id = %envelope.id,
                    reason,
                    "incoming envelope refused{repeats}"
                );
            }
            false
        }
    }
}

/// Ticks the engine at its deadlines: heartbeats, peers' expiry, parked messages going back.
pub(super) async fn timer(driver: Arc<Driver>) {
    let mut closing = driver.closing.subscribe();
    let mut shutdown = driver.shutdown.subscribe();
    loop {
        let deadline = driver.engine().next_deadline();
        let sleep = async {
            match deadline {
                Some(deadline) => {
                    let wait = deadline.saturating_duration_since(now());
                    tokio::time::sleep(wait).await;
                }
                None => futures::future::pending().await,
            }
        };
        tokio::select! {
            _ = sleep => driver.run(driver.handle(Input::Tick)),
            _ = driver.timer.notified() => {}
            _ = flag_set(&mut closing) => return,
            _ = flag_set(&mut shutdown) => return,
        }
    }
}

/// Feeds discovery's events into the engine.
///
/// Watches the discovery in service when it starts; a reload that replaces the discovery
/// starts another watcher, and this one ends when its discovery closes.
pub(super) async fn watch_discovery(driver: Arc<Driver>) {
    let discovery = driver.discovery();
    let mut shutdown = driver.shutdown.subscribe();
    loop {
        let event = tokio::select! {
            event = discovery.next_event() => event,
            _ = flag_set(&mut shutdown) => return,
        };
        match event {
            Ok(Some(event)) => driver.run(driver.handle(Input::Discovery(event))),
            Ok(None) => return,
            Err(_) if !Arc::ptr_eq(&discovery, &driver.discovery()) => return,
            Err(error) => {
                tracing::warn!(%error, "discovery failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = flag_set(&mut shutdown) => return,
                }
            }
        }
    }
}
