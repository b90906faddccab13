//! Sends that overlap, gathered into one batched call across the plugin boundary.
//!
//! For a transport whose I/O runs on the plugin's own runtime (a broker client), every `send`
//! is one call across the boundary, one confirmation and one wake-up of the sending task from
//! the plugin's thread. When sends overlap (many tasks sending at once, or one task with many
//! sends in flight), that cost can be paid once per batch: while [`MAX_CALLS`] calls are in
//! flight, the sends that come in wait in a bounded queue, and all of them go in one
//! `send_batch` as soon as a call returns (a group commit, with no timer).
//!
//! A send that finds a call free leads it: it yields to the scheduler once, and the sends made
//! meanwhile join its call. That is the moment a batch's answers come back: its senders send
//! again together, and without the yield the first [`MAX_CALLS`] of them would each take a call
//! alone while the rest wait for one of those to end. Measured with the PostgreSQL plugin and 64
//! sends in flight (2026-12-05), the plugin then committed batches of 63 and of 1 to 5 in turn,
//! a log flush each; with the yield, 64 at a time. A lone send pays one yield.
//!
//! The lead makes the batched call from its own task, so that the batch's answer wakes the task
//! that waits for it; only if the lead's caller stops waiting mid-call does the call go on in a
//! task of its own. A batch that queued behind busy calls goes out from a task of its own. With
//! the PostgreSQL plugin and 64 sends in flight, the call made from a task of its own (one thread
//! crossing more each way) published 76k to 84k msg/s, the call made from the lead's task 86k to
//! 101k (2026-12-07, alternating runs; docs/benchmarks.md).
//!
//! Used only for transports that declare [`Capabilities::BATCHED_SEND`]: for one whose
//! `send_batch` sends the items one after the other, gathering would put one after the other
//! sends that used to overlap.
//!
//! Guarantees:
//! - every caller gets the outcome of its own message;
//! - queued messages go out in the order they were queued, and a new send waits behind them;
//!   a task's own messages keep their order, since it awaits each send before the next;
//! - a caller that stops waiting (its future dropped) does not take back a queued message, as
//!   with a message already handed to the transport;
//! - at most [`MAX_QUEUED`] messages wait; a send that finds the queue full goes out alone.
//!
//! [`Capabilities::BATCHED_SEND`]: comms_plugin_api::Capabilities::BATCHED_SEND

use comms_plugin_api::{host_side::LoadedTransport, Envelope, ErrorCode, Outbound, PluginError, Text};
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

/// Messages that may wait for a call to end; also the largest batch handed over at once.
pub(crate) const MAX_QUEUED: usize = 1024;

/// Calls in flight at once before sends start to wait and gather: enough to keep a broker's
/// pipeline full (one call waiting for its confirmations while others are written), few enough
/// that sends under load gather into batches.
pub(crate) const MAX_CALLS: usize = 4;

type Outcome = Result<(), PluginError>;

/// A message waiting for a call to end, and where its outcome goes.
struct Queued {
    outbound: Outbound,
    outcome: oneshot::Sender<Outcome>,
}

#[derive(Default)]
struct State {
    /// Calls in flight (lone sends, or batches being drained), at most [`MAX_CALLS`].
    calls: usize,
    /// A lead has taken a call and lets the sends that come at the same moment join it.
    forming: bool,
    queue: Vec<Queued>,
}

/// The gathering of one transport's sends.
pub(crate) struct GatheredSends {
    transport: Arc<LoadedTransport>,
    state: Mutex<State>,
}

impl std::fmt::Debug for GatheredSends {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatheredSends").finish_non_exhaustive()
    }
}

/// What a send does, decided under the lock.
enum Turn {
    /// A call is free and nobody waits: send now, then hand the queue over.
    Lead(Box<Envelope>),
    /// Every call is taken: wait for the batch this message joined.
    Wait(oneshot::Receiver<Outcome>),
    /// The queue is full: send alone.
    Alone(Box<Envelope>),
}

impl GatheredSends {
    pub(crate) fn new(transport: Arc<LoadedTransport>) -> Arc<Self> {
        Arc::new(Self { transport, state: Mutex::new(State::default()) })
    }

    /// Sends `envelope` to `address`, in a batch with the sends that overlap it.
    pub(crate) async fn send(self: &Arc<Self>, address: &str, envelope: Box<Envelope>) -> Outcome {
        let turn = {
            let mut state = super::lock(&self.state);
            if state.calls < MAX_CALLS && state.queue.is_empty() && !state.forming {
                state.calls += 1;
                state.forming = true;
                Turn::Lead(envelope)
            } else if state.queue.len() < MAX_QUEUED {
                let (outcome, waiting) = oneshot::channel();
                state.queue.push(Queued {
                    outbound: Outbound { address: Text::from(address), envelope: *envelope },
                    outcome,
                });
                Turn::Wait(waiting)
            } else {
                Turn::Alone(envelope)
            }
        };
        match turn {
            Turn::Lead(envelope) => {
                // Handed over when this future ends, also when it is dropped mid-call.
                let lead = Lead(Some(Arc::clone(self)));
                // Sends that are ready at the same moment (the senders a batch just answered,
                // coming back) join this call instead of taking the other calls one by one.
                tokio::task::yield_now().await;
                let joined = {
                    let mut state = super::lock(&self.state);
                    state.forming = false;
                    std::mem::take(&mut state.queue)
                };
                if joined.is_empty() {
                    return self.transport.send(address, *envelope).await;
                }
                let (outcome, waiting) = oneshot::channel();
                let mut batch = Vec::with_capacity(1 + joined.len());
                batch.push(Queued {
                    outbound: Outbound { address: Text::from(address), envelope: *envelope },
                    outcome,
                });
                batch.extend(joined);
                lead.call_here(batch).await;
                wait(waiting).await
            }
            Turn::Alone(envelope) => self.transport.send(address, *envelope).await,
            Turn::Wait(waiting) => wait(waiting).await,
        }
    }

    /// A lead's call ended: the queue goes out in a task of its own that keeps the call (so that
    /// the caller that led gets its outcome now), or the call is free again.
    fn hand_over(self: &Arc<Self>) {
        let batch = {
            let mut state = super::lock(&self.state);
            // A lead dropped while its batch formed.
            state.forming = false;
            if state.queue.is_empty() {
                state.calls -= 1;
                return;
            }
            std::mem::take(&mut state.queue)
        };
        self.drain_in_task(batch);
    }

    /// Sends `batch` and every batch queued meanwhile in a task of its own, which keeps the
    /// call that is handed to it.
    fn drain_in_task(self: &Arc<Self>, batch: Vec<Queued>) {
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn(Arc::clone(self).drain(batch))),
            // Outside a runtime (a node dropped after its runtime): the waiters hear that the
            // send was abandoned.
            Err(_) => {
                drop(batch);
                super::lock(&self.state).calls -= 1;
            }
        }
    }

    /// Sends `batch` and every batch queued meanwhile, until the queue is empty.
    async fn drain(self: Arc<Self>, mut batch: Vec<Queued>) {
        loop {
            self.send_batch(batch).await;
            batch = {
                let mut state = super::lock(&self.state);
                if state.queue.is_empty() {
                    state.calls -= 1;
                    return;
                }
                std::mem::take(&mut state.queue)
            };
        }
    }

    /// One call for the whole batch; each waiter gets its own item's outcome.
    async fn send_batch(&self, batch: Vec<Queued>) {
        let (outbounds, outcomes): (Vec<Outbound>, Vec<_>) =
            batch.into_iter().map(|queued| (queued.outbound, queued.outcome)).unzip();
        let mut results: Vec<Outcome> = vec![Ok(()); outcomes.len()];
        if let [_] = outbounds.as_slice() {
            for (Outbound { address, envelope }, result) in outbounds.into_iter().zip(&mut results) {
                *result = self.transport.send(address.as_str(), envelope).await;
            }
        } else {
            for failure in self.transport.send_batch(outbounds).await {
                if let Some(result) = results.get_mut(failure.index) {
                    *result = Err(failure.error);
                }
            }
        }
        for (outcome, result) in outcomes.into_iter().zip(results) {
            // A caller that stopped waiting needs no answer.
            let _ = outcome.send(result);
        }
    }
}

/// The outcome of a queued message.
async fn wait(waiting: oneshot::Receiver<Outcome>) -> Outcome {
    waiting.await.unwrap_or_else(|_| {
        Err(PluginError::new(ErrorCode::CLOSED, "the send was abandoned: the node's runtime stopped"))
    })
}

/// The lead of a call in flight; hands the queue over when dropped.
struct Lead(Option<Arc<GatheredSends>>);

impl Lead {
    /// Makes the call for `batch` in the leading send's own future, so that the batch's answer
    /// wakes the sending task directly; then hands the queue over. Should the caller stop
    /// waiting mid-call, the call goes on in a task of its own ([`CallInFlight`]): a caller
    /// that stops waiting takes back nothing that joined it (nor its own message).
    fn call_here(mut self, batch: Vec<Queued>) -> CallInFlight {
        let gathered = self.0.take().expect("a lead holds its gathering until it calls");
        let call = {
            let gathered = Arc::clone(&gathered);
            Box::pin(async move {
                gathered.send_batch(batch).await;
                gathered.hand_over();
            })
        };
        CallInFlight { call: Some(call), gathered }
    }
}

/// A lead's call, polled by the leading send; finished in a task of its own if that send's
/// future is dropped first.
struct CallInFlight {
    call: Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>>,
    gathered: Arc<GatheredSends>,
}

impl std::future::Future for CallInFlight {
    type Output = ();

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        if let Some(call) = self.call.as_mut() {
            std::task::ready!(call.as_mut().poll(cx));
            self.call = None;
        }
        std::task::Poll::Ready(())
    }
}

impl Drop for CallInFlight {
    fn drop(&mut self) {
        let Some(call) = self.call.take() else { return };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn(call)),
            // Outside a runtime (a node dropped after its runtime): the waiters hear that the
            // send was abandoned, and the call is free again.
            Err(_) => {
                drop(call);
                super::lock(&self.gathered.state).calls -= 1;
            }
        }
    }
}

impl Drop for Lead {
    fn drop(&mut self) {
        if let Some(gathered) = self.0.take() {
            gathered.hand_over();
        }
    }
}

#[cfg(test)]
mod tests;
