//! The task that owns one outgoing connection: encodes queued envelopes straight into its write
//! buffer, writes them in batches, reconnects, says goodbye.
//!
//! A peer that closes says goodbye and then reads on until this side closes its half of the
//! connection (see [`super::StreamTransport::close`]). So the writer looks for the goodbye
//! before every batch, without waiting: a batch is either written whole before the goodbye was
//! seen (the peer's drain reads it) or written to the next connection, never given to a
//! connection the peer is about to drop. A batch whose write fails is written again after
//! reconnecting, whole (which is how a peer that does not drain, or a cut drain, can yield
//! duplicates).

use super::{
    encrypted::LinkStream,
    handshake::{self, OpenError, Opened},
    protocol,
    queue::{PeerQueue, Queued, Take},
    reader::write_flushed,
    Shared, StreamMedium,
};
use crate::{log_rate::LogRateLimit, ErrorCode, NodeId, PluginError};
use std::{
    sync::{atomic::Ordering::Relaxed, Arc},
    time::Duration,
};
use tokio::io::{split, AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};

pub(super) struct PeerWriter<M: StreamMedium> {
    pub(super) shared: Arc<Shared>,
    pub(super) medium: Arc<M>,
    pub(super) address: String,
    pub(super) queue: Arc<PeerQueue>,
}

struct Connection<S> {
    read: ReadHalf<LinkStream<S>>,
    write: WriteHalf<LinkStream<S>>,
    peer: NodeId,
}

impl<M: StreamMedium> PeerWriter<M> {
    pub(super) async fn run(self) {
        let settings = &self.shared.settings;
        let mut connection: Option<Connection<M::Stream>> = None;
        // The frames of one write, encoded in place; kept (and reused) until written.
        let mut batch = Vec::with_capacity(settings.write_batch_bytes);
        let mut batch_frames = 0usize;
        // Of them, those `undelivered` counts if the batch is given up (`counts_as_undelivered`).
        let mut batch_counted = 0usize;
        let mut taken: Vec<Queued> = Vec::new();
        let mut failed_writes = 0u32;
        let mut connected_before = false;
        loop {
            if batch.is_empty() {
                match self.queue.take(settings.write_batch_bytes, &mut taken) {
                    Take::Taken => {}
                    Take::Finished => break,
                    Take::Empty => {
                        let peer_closed = match connection.as_mut() {
                            Some(open) => tokio::select! {
                                biased;
                                () = self.queue.ready() => None,
                                reason = peer_closed(&mut open.read) => Some(reason),
                            },
                            None => {
                                self.queue.ready().await;
                                None
                            }
                        };
                        if let Some(reason) = peer_closed {
                            if let Some(open) = connection.take() {
                                self.leave(open, &reason).await;
                            }
                        }
                        continue;
                    }
                }
                for item in taken.drain(..) {
                    // `send` checked the frame size, so encoding cannot fail; if it did, that
                    // one message is dropped, not the batch.
                    let counted = crate::counts_as_undelivered(&item.envelope);
                    match protocol::append_envelope_frame(&item.envelope, &mut batch) {
                        Ok(()) => {
                            batch_frames += 1;
                            batch_counted += usize::from(counted);
                        }
                        Err(error) => {
                            self.shared.counters.incidents.failed();
                            self.shared.counters.incidents.undelivered(u64::from(counted));
                            self.shared.counters.send_queue_depth.fetch_sub(1, Relaxed);
                            tracing::warn!(backend = self.shared.backend, peer = %self.address, %error, "message dropped: cannot encode it");
                        }
                    }
                }
                if batch.is_empty() {
                    continue;
                }
            }
            if connection.is_none() {
                match self.connect().await {
                    Ok(open) => {
                        if connected_before {
                            self.shared.counters.incidents.reconnected();
                        }
                        connected_before = true;
                        connection = Some(open);
                    }
                    Err(error) => return self.give_up(error, batch_frames, batch_counted),
                }
            }
            let Some(open) = connection.as_mut() else { continue };
            // Under steady load the queue is never empty, so this is where a goodbye is seen.
            if let Some(reason) = peer_closed_now(&mut open.read).await {
                if let Some(open) = connection.take() {
                    self.leave(open, &reason).await;
                }
                // The batch goes to the next connection (dialled with backoff: the peer's
                // successor on this address may not listen yet).
                continue;
            }
            match write_flushed(&mut open.write, &batch).await {
                Ok(()) => {
                    self.shared.counters.writes.fetch_add(1, Relaxed);
                    self.shared.counters.send_queue_depth.fetch_sub(batch_frames as u64, Relaxed);
                    batch.clear();
                    batch_frames = 0;
                    batch_counted = 0;
                    failed_writes = 0;
                    // One huge message must not keep a huge buffer for the life of the link.
                    if batch.capacity() > 4 * settings.write_batch_bytes {
                        batch.shrink_to(settings.write_batch_bytes);
                    }
                }
                Err(error) => {
                    failed_writes += 1;
                    self.shared.counters.incidents.failed();
                    tracing::warn!(
                        backend = self.shared.backend, peer = %self.address, node = %open.peer, %error,
                        "write failed; reconnecting to write the batch again"
                    );
                    connection = None;
                    if failed_writes >= settings.reconnect_attempts {
                        let error = PluginError::retryable(
                            ErrorCode::UNREACHABLE,
                            format!(
                                "{} peer {}: {failed_writes} writes failed in a row: {error}",
                                self.shared.backend, self.address
                            ),
                        );
                        return self.give_up(error, batch_frames, batch_counted);
                    }
                }
            }
        }
        if let Some(mut open) = connection {
            if write_flushed(&mut open.write, &protocol::goodbye_frame()).await.is_ok() {
                self.leave(open, "goodbye said").await;
            }
        }
    }

    /// Ends a connection: closes this side (the end a closing peer drains until), then waits
    /// (up to `close_timeout_ms`) for the peer's end before dropping it. Dropping a socket with
    /// unread bytes (a goodbye not read whole) would reset the connection, and a reset can
    /// discard what the peer has received and not read yet.
    async fn leave(&self, mut open: Connection<M::Stream>, reason: &str) {
        tracing::debug!(backend = self.shared.backend, peer = %self.address, node = %open.peer, reason, "closing the connection");
        if open.write.shutdown().await.is_err() {
            return;
        }
        let linger = Duration::from_millis(self.shared.settings.close_timeout_ms);
        let _ = tokio::time::timeout(linger, read_to_end(&mut open.read)).await;
    }

    /// Dials with backoff and exchanges hellos. Once the transport is closing, no more waiting:
    /// one last attempt (so that what was queued just before `close` still goes out), then give up.
    async fn connect(&self) -> Result<Connection<M::Stream>, PluginError> {
        let settings = &self.shared.settings;
        let backoff = settings.reconnect_backoff();
        let mut shutdown = self.shared.shutdown.subscribe();
        let mut attempt = 1;
        loop {
            let reason = match self.dial().await {
                Ok(connection) => return Ok(connection),
                Err(OpenError::Refused(reason)) => {
                    // A security check or a mode mismatch: another attempt would be refused too.
                    tracing::warn!(backend = self.shared.backend, peer = %self.address, %reason, "connection refused");
                    return Err(PluginError::new(
                        ErrorCode::UNREACHABLE,
                        format!("{} peer {} refused: {reason}", self.shared.backend, self.address),
                    ));
                }
                Err(OpenError::Failed(reason)) => reason,
                Err(OpenError::ClosedEarly) => "connection closed".to_string(),
            };
            tracing::debug!(backend = self.shared.backend, peer = %self.address, attempt, %reason, "connect failed");
            let closing = *shutdown.borrow();
            let delay = if closing { None } else { backoff.delay_after(attempt) };
            let Some(delay) = delay else {
                return Err(PluginError::retryable(
                    ErrorCode::UNREACHABLE,
                    format!(
                        "{} peer {} unreachable after {attempt} attempts: {reason}",
                        self.shared.backend, self.address
                    ),
                ));
            };
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = super::shut_down(&mut shutdown) => {}
            }
            attempt += 1;
        }
    }

    /// One attempt: connect within `connect_timeout_ms`, then handshake within
    /// `handshake_timeout_ms`.
    async fn dial(&self) -> Result<Connection<M::Stream>, OpenError> {
        let settings = &self.shared.settings;
        let connect_timeout = Duration::from_millis(settings.connect_timeout_ms);
        let stream = match tokio::time::timeout(connect_timeout, self.medium.connect(&self.address)).await {
            Ok(connected) => connected.map_err(|e| OpenError::Failed(e.to_string()))?,
            Err(_) => {
                return Err(OpenError::Failed(format!("no answer within {} ms", connect_timeout.as_millis())))
            }
        };
        let handshake_timeout = Duration::from_millis(settings.handshake_timeout_ms);
        let opened = tokio::time::timeout(handshake_timeout, handshake::dial(&self.shared, stream)).await;
        let Opened { stream, peer, key } = opened.map_err(|_| {
            OpenError::Failed(format!("handshake not completed within {} ms", handshake_timeout.as_millis()))
        })??;
        match key {
            Some(key) => {
                tracing::debug!(backend = self.shared.backend, peer = %self.address, node = %peer, %key, "connected (encrypted)")
            }
            None => {
                tracing::debug!(backend = self.shared.backend, peer = %self.address, node = %peer, "connected")
            }
        }
        let (read, write) = split(stream);
        Ok(Connection { read, write, peer })
    }

    /// Records why this peer is unreachable and drops what was queued for it, so that senders
    /// learn of the failure instead of waiting forever. `in_batch` frames were encoded and not
    /// written, `counted` of them counted as undelivered if lost.
    fn give_up(self, error: PluginError, in_batch: usize, counted: usize) {
        // The queue keeps the reason: a sender that finds it closed reads it.
        let queued = self.queue.fail(error.clone());
        let dropped = in_batch + queued.len();
        let undelivered =
            counted + queued.iter().filter(|item| crate::counts_as_undelivered(&item.envelope)).count();
        let counters = &self.shared.counters;
        // Counted before the queue depth falls: the host's flush, which waits for the depth to
        // reach 0, then reads this count, so a message `send` took is never lost silently.
        counters.incidents.undelivered(undelivered as u64);
        counters.dropped_messages.fetch_add(dropped as u64, Relaxed);
        counters.send_queue_depth.fetch_sub(dropped as u64, Relaxed);
        counters.incidents.failed();
        // One per unreachable address, which a peer's forged record can name: rate-limited.
        static GAVE_UP: LogRateLimit = LogRateLimit::standard();
        if let Some(repeats) = GAVE_UP.check() {
            tracing::warn!(
                backend = self.shared.backend, peer = %self.address, dropped, undelivered, %error,
                "giving up on peer; queued messages dropped{repeats}"
            );
        }
    }
}

/// Whether the peer has closed the connection or said goodbye already, without waiting: a read
/// that is not ready is given up at once (reading is cancel-safe: nothing is lost by trying).
async fn peer_closed_now<S: super::ByteStream>(read: &mut ReadHalf<S>) -> Option<String> {
    tokio::select! {
        biased;
        reason = peer_closed(read) => Some(reason),
        () = std::future::ready(()) => None,
    }
}

/// Reads and discards until the peer closes its side (or the connection fails).
async fn read_to_end<S: super::ByteStream>(read: &mut ReadHalf<S>) {
    let mut buffer = [0u8; 256];
    while matches!(read.read(&mut buffer).await, Ok(1..)) {}
}

/// Completes when the peer closes the connection or says goodbye (an accepting side sends
/// nothing else after its hello).
async fn peer_closed<S: super::ByteStream>(read: &mut ReadHalf<S>) -> String {
    let mut buffer = [0u8; 16];
    match read.read(&mut buffer).await {
        Ok(0) => "end of stream".to_string(),
        Ok(_) => "goodbye".to_string(),
        Err(error) => error.to_string(),
    }
}
