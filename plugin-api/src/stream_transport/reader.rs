//! The listener side: accepts connections and turns their frames into inbound messages.

use super::{
    connections::{address_key, Admission},
    handshake::{self, OpenError, Opened},
    protocol,
    receive_queue::{ChunkSender, Gone},
    shut_down, Acceptor, Feeder, Shared,
};
use crate::{
    framing::{FrameReader, Frames, ReadStep},
    wire::{decode_envelope, decode_envelope_shared},
    Inbound,
};
use std::{
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering::Relaxed},
        Arc,
    },
    time::Duration,
};
use tokio::{
    io::{split, AsyncWrite, AsyncWriteExt},
    sync::watch,
    time::Instant,
};

/// Accepts connections until the transport closes, then drops `acceptor` (the listener: its
/// address is free again once this ends). `_feeding` is held until then: connections may come.
pub(super) async fn accept_loop<A: Acceptor>(
    shared: Arc<Shared>,
    mut acceptor: A,
    inbound: ChunkSender,
    _feeding: Feeder,
) {
    let mut shutdown = shared.shutdown.subscribe();
    let mut failures = AcceptFailures::default();
    loop {
        let accepted = tokio::select! {
            accepted = acceptor.accept() => accepted,
            _ = shut_down(&mut shutdown) => return,
        };
        match accepted {
            Ok((stream, label)) => {
                failures.recovered();
                let (admission, evicted) = shared.connections.admit(address_key(&label));
                shared.counters.evicted.fetch_add(evicted, Relaxed);
                // Counted before the task starts, so that `receive` never ends before it does.
                let feeding = Feeder::new(&shared);
                let connection =
                    serve_connection(Arc::clone(&shared), stream, label, admission, inbound.clone(), feeding);
                drop(crate::runtime::spawn(connection));
            }
            Err(error) => {
                // Out of file descriptors: close the idlest connection so that the next accept
                // (a peer that may well be legitimate, waiting in the backlog) finds one.
                if is_out_of_files(&error) && shared.connections.evict_one() {
                    shared.counters.evicted.fetch_add(1, Relaxed);
                }
                let delay = failures.failed(&shared, &error);
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    _ = shut_down(&mut shutdown) => return,
                }
            }
        }
    }
}

/// `EMFILE` or `ENFILE` (the same numbers on Linux, the BSDs and macOS).
fn is_out_of_files(error: &std::io::Error) -> bool {
    matches!(error.raw_os_error(), Some(23 | 24))
}

/// Failed accepts: each streak backs off (so that a persistent failure does not spin), and
/// the failures are logged at most once every [`AcceptFailures::LOG_EVERY`], with their count
/// (a node out of file descriptors fails and recovers many times a second).
#[derive(Debug, Default)]
struct AcceptFailures {
    /// Failures since the last accepted connection.
    streak: u32,
    /// Failures not logged yet, and when failures were last logged.
    unlogged: u64,
    logged_at: Option<Instant>,
}

impl AcceptFailures {
    const FIRST_DELAY: Duration = Duration::from_millis(10);
    const MAX_DELAY: Duration = Duration::from_secs(1);
    const LOG_EVERY: Duration = Duration::from_secs(10);

    /// Counts a failure; the delay before accepting again.
    fn failed(&mut self, shared: &Shared, error: &std::io::Error) -> Duration {
        self.streak = self.streak.saturating_add(1);
        self.unlogged += 1;
        if self.logged_at.is_none_or(|at| at.elapsed() >= Self::LOG_EVERY) {
            tracing::warn!(
                backend = shared.backend,
                %error,
                failures = self.unlogged,
                "accept failed; backing off (logged at most every 10 s, with the count since)"
            );
            self.unlogged = 0;
            self.logged_at = Some(Instant::now());
        }
        let doublings = (self.streak - 1).min(16);
        Self::FIRST_DELAY.saturating_mul(1 << doublings).min(Self::MAX_DELAY)
    }

    /// A connection was accepted: the next failure starts a new streak.
    fn recovered(&mut self) {
        self.streak = 0;
    }
}

/// Why a connection was closed; logged once.
enum Closed {
    Clean(&'static str),
    Refused(String),
}

/// Why a connection stops waiting (for bytes, or for room in the receive queue).
enum Stop {
    /// The transport started closing: say goodbye, then drain.
    Closing,
    /// The drain's time (`close_timeout_ms` from `close`) is up: what the peer sent and was not
    /// read yet is lost.
    Cut,
    /// The receive queue is gone (the transport was dropped): nothing can be delivered.
    Gone,
}

/// The close of the transport, as one connection sees it. When the transport closes, the
/// connection tells its peer goodbye and goes on reading and delivering until the peer closes
/// its side (a comms peer does so as soon as it sees the goodbye, after the batch it may be
/// writing), so that nothing the peer had written is lost; but only until the close deadline.
struct Closing {
    shutdown: watch::Receiver<bool>,
    /// Set once the goodbye is said: when the drain is cut.
    drain_until: Option<Instant>,
}

impl Closing {
    fn draining(&self) -> bool {
        self.drain_until.is_some()
    }

    /// The next stop: the transport starting to close (before the drain), or the drain's time
    /// running out (during it). A future of its own, borrowing nothing: a connection keeps it
    /// across its reads and asks for the next one only after it completed.
    fn next_stop(&self) -> NextStop {
        match self.drain_until {
            None => {
                let mut shutdown = self.shutdown.clone();
                Box::pin(async move {
                    shut_down(&mut shutdown).await;
                    Stop::Closing
                })
            }
            Some(until) => Box::pin(async move {
                tokio::time::sleep_until(until).await;
                Stop::Cut
            }),
        }
    }

    /// Says goodbye (within the close deadline: a peer that does not read cannot hold it) and
    /// starts the drain.
    async fn start_drain<W: AsyncWrite + Unpin>(&mut self, shared: &Shared, write: &mut W) {
        let until = shared.close_deadline();
        self.drain_until = Some(until);
        let _ = tokio::time::timeout_at(until, write_flushed(write, &protocol::goodbye_frame())).await;
    }
}

/// A connection's wait for its next [`Stop`] (see [`Closing::next_stop`]).
type NextStop = Pin<Box<dyn Future<Output = Stop> + Send>>;

/// Which bound the read loop of a connection waits against.
#[derive(Clone, Copy)]
enum Deadline {
    /// No frame is under way: the connection is idle.
    Idle,
    /// A frame has started and must end.
    Frame,
}

async fn serve_connection<S: super::ByteStream>(
    shared: Arc<Shared>,
    stream: S,
    label: String,
    admission: Admission,
    inbound: ChunkSender,
    _feeding: Feeder,
) {
    let mut closing = Closing { shutdown: shared.shutdown.subscribe(), drain_until: None };
    let settings = &shared.settings;
    let handshake = tokio::time::timeout(
        Duration::from_millis(settings.handshake_timeout_ms),
        handshake::accept(&shared, stream),
    );
    let opened = tokio::select! {
        opened = handshake => opened,
        () = admission.slot().evicted() => {
            return log_closed(&shared, &label, None, Closed::Clean("evicted during its handshake (connection limit)"));
        }
        // The peer writes no message before our hello: nothing is lost, it dials again.
        _ = shut_down(&mut closing.shutdown) => {
            return log_closed(&shared, &label, None, Closed::Clean("transport closed during the handshake"));
        }
    };
    let Opened { stream, peer, key } = match opened {
        Ok(Ok(opened)) => opened,
        Ok(Err(OpenError::ClosedEarly)) => {
            return log_closed(&shared, &label, None, Closed::Clean("closed before the handshake"))
        }
        Ok(Err(OpenError::Failed(reason) | OpenError::Refused(reason))) => {
            // Nothing from this connection reached the application.
            shared.counters.refused();
            tracing::warn!(backend = shared.backend, from = %label, %reason, "connection refused");
            return;
        }
        Err(_) => {
            return log_closed(
                &shared,
                &label,
                None,
                Closed::Refused("handshake not completed within handshake_timeout_ms".into()),
            )
        }
    };
    if let Some(key) = &key {
        tracing::debug!(backend = shared.backend, from = %label, node = %peer, %key, "encrypted link accepted");
    }
    admission.active();
    let (mut read, mut write) = split(stream);
    let hello = protocol::hello_frame(&shared.local_node);
    if let Err(error) = write_flushed(&mut write, &hello).await {
        return log_closed(&shared, &label, Some(&peer), Closed::Refused(format!("writing hello: {error}")));
    }
    shared.counters.accepted.fetch_add(1, Relaxed);

    let idle_timeout = Duration::from_millis(settings.idle_timeout_ms);
    let frame_timeout = Duration::from_millis(settings.frame_read_timeout_ms);
    let mut reader = FrameReader::new(settings.max_frame_size).with_budget(Arc::clone(&shared.frame_budget));
    let mut received = Vec::new();
    // When the frame under way (if any) started, and when the last one ended.
    let mut frame_started: Option<Instant> = None;
    let mut last_frame = Instant::now();
    // The waits that end a connection are made once and kept across its reads (made anew for
    // every read they cost as much as the read's own work, in a profile of the round trip), and
    // are polled only when the read waits: a wait polled again takes a lock, so a busy reader
    // would pay for them on every read. After 64 reads in a row that did not wait, the reader
    // yields and then polls them first, so that a peer that never stops sending cannot keep
    // the connection from closing (nor hold the thread). The timer is moved only
    // when its deadline comes nearer (a frame under way); a deadline that frames since moved
    // on is checked when the timer fires.
    let timer = tokio::time::sleep_until(last_frame + idle_timeout);
    tokio::pin!(timer);
    let evicted = admission.slot().evicted();
    tokio::pin!(evicted);
    let mut stop = closing.next_stop();
    // Steps in a row whose read did not wait.
    let mut ready_steps = 0u32;
    let read_waited = AtomicBool::new(false);
    let closed = loop {
        if read_waited.swap(false, Relaxed) {
            ready_steps = 0;
        } else {
            ready_steps += 1;
        }
        let waits_first = ready_steps >= 64;
        if waits_first {
            ready_steps = 0;
            // Also gives the thread to other tasks: a peer whose bytes are always there would
            // otherwise hold it, and a wait polled after the task's cooperative budget ran out
            // does not see what it waits for.
            tokio::task::yield_now().await;
        }
        let draining = closing.draining();
        let deadline = match frame_started {
            Some(started) => (started + frame_timeout, Deadline::Frame),
            None => (last_frame + idle_timeout, Deadline::Idle),
        };
        if deadline.0 < timer.deadline() {
            timer.as_mut().reset(deadline.0);
        }
        let step = tokio::select! {
            biased;
            step = noting_a_wait(reader.read_step(&mut read), &read_waited), if !waits_first => step,
            // While draining only the close deadline counts.
            () = &mut timer, if !draining => {
                if Instant::now() < deadline.0 {
                    timer.as_mut().reset(deadline.0);
                    continue;
                }
                match deadline.1 {
                    Deadline::Idle => {
                        shared.counters.idle_closed.fetch_add(1, Relaxed);
                        let _ = write_flushed(&mut write, &protocol::goodbye_frame()).await;
                        break Closed::Clean("idle for idle_timeout_ms");
                    }
                    Deadline::Frame => {
                        shared.counters.frame_timeouts.fetch_add(1, Relaxed);
                        break Closed::Refused(format!(
                            "a frame was not received whole within frame_read_timeout_ms ({} bytes of it arrived)",
                            reader.pending_bytes()
                        ));
                    }
                }
            },
            () = &mut evicted, if !draining => {
                let _ = write_flushed(&mut write, &protocol::goodbye_frame()).await;
                break Closed::Clean("evicted to make room for another connection (connection limit)");
            }
            reason = &mut stop => match reason {
                Stop::Closing => {
                    closing.start_drain(&shared, &mut write).await;
                    stop = closing.next_stop();
                    continue;
                }
                Stop::Cut | Stop::Gone => break Closed::Clean(CUT),
            },
            // A dropped transport also starts the close (its `Drop`), so the queue's end matters
            // only during the drain, which it then ends at once.
            () = inbound.closed(), if draining => break Closed::Clean(DROPPED),
            // None of the waits is over: back to reading.
            () = std::future::ready(()), if waits_first => continue,
        };
        let ended = match step {
            Ok(ReadStep::Frames(frames)) => decode(&frames, &mut received),
            Ok(ReadStep::More) => {
                // The first bytes of a frame start its clock.
                frame_started.get_or_insert_with(Instant::now);
                continue;
            }
            // The end of a drain, or of a connection the peer closed.
            Ok(ReadStep::End) => Some(Closed::Clean("peer closed the connection")),
            Err(error) => Some(Closed::Refused(error.to_string())),
        };
        admission.active();
        // What came before a bad frame or a goodbye is delivered; during a drain too.
        let stopped = loop {
            match deliver(&inbound, &mut received, &mut stop).await {
                Ok(()) => break None,
                Err(Stop::Closing) => {
                    closing.start_drain(&shared, &mut write).await;
                    stop = closing.next_stop();
                }
                Err(Stop::Cut) => break Some(Closed::Clean(CUT)),
                Err(Stop::Gone) => break Some(Closed::Clean(DROPPED)),
            }
        };
        if let Some(closed) = stopped.or(ended) {
            break closed;
        }
        // Clocks start after the delivery: waiting for the application is not the peer's fault.
        last_frame = Instant::now();
        frame_started = (reader.pending_bytes() > 0).then_some(last_frame);
    };
    log_closed(&shared, &label, Some(&peer), closed);
}

/// Decodes the envelopes of `frames` into `out`, payloads sharing the buffer that was read when
/// the frames are shared; stops at the first frame that ends the connection and says why.
fn decode(frames: &Frames<'_>, out: &mut Vec<Inbound>) -> Option<Closed> {
    out.reserve(frames.len());
    for frame in frames.iter() {
        match frame.body().first() {
            Some(&protocol::KIND_ENVELOPE) => {
                let decoded = match frame.shared() {
                    Some((buffer, body)) => decode_envelope_shared(buffer, body.start + 1..body.end),
                    None => decode_envelope(&frame.body()[1..]),
                };
                match decoded {
                    Ok(envelope) => out.push(Inbound { envelope, delivery_tag: 0 }),
                    Err(error) => return Some(Closed::Refused(format!("malformed envelope: {error}"))),
                }
            }
            Some(&protocol::KIND_GOODBYE) => return Some(Closed::Clean("peer said goodbye")),
            Some(kind) => return Some(Closed::Refused(format!("unexpected frame kind {kind}"))),
            None => return Some(Closed::Refused("empty frame".to_string())),
        }
    }
    None
}

/// `future`, setting `waited` when it returns pending.
async fn noting_a_wait<F: Future>(future: F, waited: &AtomicBool) -> F::Output {
    let mut future = std::pin::pin!(future);
    std::future::poll_fn(|cx| {
        let poll = future.as_mut().poll(cx);
        if poll.is_pending() {
            waited.store(true, Relaxed);
        }
        poll
    })
    .await
}

/// Why a connection cut by the close deadline was closed.
const CUT: &str =
    "cut: close_timeout_ms passed before the peer closed its side (what it sent and was not read is lost)";

/// Why a connection whose transport was dropped (without `close`) was closed.
const DROPPED: &str = "transport dropped: nothing can be delivered";

/// Hands `received` to the receive queue as one chunk, waiting for room (in parts when it is
/// larger than the queue). Stops waiting when `stop` completes (or the queue is gone); what was
/// not delivered then stays in `received`.
async fn deliver(
    inbound: &ChunkSender,
    received: &mut Vec<Inbound>,
    stop: &mut NextStop,
) -> Result<(), Stop> {
    while !received.is_empty() {
        let wanted = received.len().min(inbound.capacity());
        // Room is usually there: taken without setting up the wait.
        if !inbound.try_reserve(wanted).map_err(|Gone| Stop::Gone)? {
            tokio::select! {
                reserved = inbound.reserve(wanted) => reserved.map_err(|Gone| Stop::Gone)?,
                reason = &mut *stop => return Err(reason),
            }
        }
        let chunk = if wanted == received.len() {
            std::mem::take(received)
        } else {
            received.drain(..wanted).collect()
        };
        inbound.put(chunk).map_err(|Gone| Stop::Gone)?;
    }
    Ok(())
}

/// Writes `bytes` and flushes (an encrypted stream buffers what it seals).
pub(super) async fn write_flushed<W: AsyncWrite + Unpin>(write: &mut W, bytes: &[u8]) -> std::io::Result<()> {
    write.write_all(bytes).await?;
    write.flush().await
}

fn log_closed(shared: &Shared, label: &str, peer: Option<&crate::NodeId>, closed: Closed) {
    let node = peer.map(|p| p.as_str()).unwrap_or("(before hello)");
    match closed {
        Closed::Clean(reason) => {
            tracing::debug!(backend = shared.backend, from = label, node, reason, "connection closed")
        }
        Closed::Refused(reason) => {
            shared.counters.refused();
            tracing::warn!(backend = shared.backend, from = label, node, %reason, "closing connection")
        }
    }
}
