//! The task that owns one outgoing connection: batches queued frames, reconnects, says goodbye.

use super::{
    encrypted::LinkStream,
    handshake::{self, OpenError, Opened},
    protocol,
    reader::write_flushed,
    Shared, StreamMedium,
};
use crate::{ErrorCode, NodeId, PluginError};
use std::{
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio::{
    io::{split, AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf},
    sync::mpsc,
};

pub(super) struct PeerWriter<M: StreamMedium> {
    pub(super) shared: Arc<Shared>,
    pub(super) medium: Arc<M>,
    pub(super) address: String,
    pub(super) failure: Arc<Mutex<Option<PluginError>>>,
}

struct Connection<S> {
    read: ReadHalf<LinkStream<S>>,
    write: WriteHalf<LinkStream<S>>,
    peer: NodeId,
}

/// What woke the writer while it had nothing to write.
enum Wake {
    Frame(Option<Vec<u8>>),
    PeerClosed(String),
}

impl<M: StreamMedium> PeerWriter<M> {
    pub(super) async fn run(self, mut frames: mpsc::Receiver<Vec<u8>>) {
        let settings = &self.shared.settings;
        let mut connection: Option<Connection<M::Stream>> = None;
        let mut batch = Vec::with_capacity(settings.write_batch_bytes);
        let mut batch_frames = 0usize;
        let mut failed_writes = 0u32;
        loop {
            if batch.is_empty() {
                let wake = match connection.as_mut() {
                    Some(open) => tokio::select! {
                        biased;
                        frame = frames.recv() => Wake::Frame(frame),
                        reason = peer_closed(&mut open.read) => Wake::PeerClosed(reason),
                    },
                    None => Wake::Frame(frames.recv().await),
                };
                match wake {
                    Wake::Frame(Some(frame)) => {
                        batch.extend_from_slice(&frame);
                        batch_frames = 1;
                    }
                    Wake::Frame(None) => break,
                    Wake::PeerClosed(reason) => {
                        tracing::debug!(backend = self.shared.backend, peer = %self.address, %reason, "peer closed the connection");
                        connection = None;
                        continue;
                    }
                }
                while batch.len() < settings.write_batch_bytes {
                    match frames.try_recv() {
                        Ok(frame) => {
                            batch.extend_from_slice(&frame);
                            batch_frames += 1;
                        }
                        Err(_) => break,
                    }
                }
            }
            if connection.is_none() {
                match self.connect().await {
                    Ok(open) => connection = Some(open),
                    Err(error) => return self.give_up(error, frames, batch_frames),
                }
            }
            let Some(open) = connection.as_mut() else { continue };
            match write_flushed(&mut open.write, &batch).await {
                Ok(()) => {
                    batch.clear();
                    failed_writes = 0;
                }
                Err(error) => {
                    failed_writes += 1;
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
                        return self.give_up(error, frames, batch_frames);
                    }
                }
            }
        }
        if let Some(mut open) = connection {
            let _ = write_flushed(&mut open.write, &protocol::goodbye_frame()).await;
            let _ = open.write.shutdown().await;
        }
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
    /// learn of the failure instead of waiting forever.
    fn give_up(self, error: PluginError, mut frames: mpsc::Receiver<Vec<u8>>, in_batch: usize) {
        // Record the reason before closing the queue: a sender that sees the queue closed reads it.
        *self.failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(error.clone());
        frames.close();
        let mut dropped = in_batch;
        while frames.try_recv().is_ok() {
            dropped += 1;
        }
        tracing::warn!(
            backend = self.shared.backend, peer = %self.address, dropped, %error,
            "giving up on peer; queued messages dropped"
        );
    }
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
