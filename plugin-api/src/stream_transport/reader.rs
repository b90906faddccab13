//! The listener side: accepts connections and turns their frames into inbound messages.

use super::{
    handshake::{self, OpenError, Opened},
    protocol, shut_down, Acceptor, Shared,
};
use crate::{
    framing::{FrameReader, Frames},
    wire::{decode_envelope, decode_envelope_shared},
    Inbound,
};
use std::{
    sync::{atomic::Ordering::Relaxed, Arc},
    time::Duration,
};
use tokio::{
    io::{split, AsyncWrite, AsyncWriteExt},
    sync::{mpsc, watch},
};

pub(super) async fn accept_loop<A: Acceptor>(
    shared: Arc<Shared>,
    mut acceptor: A,
    inbound: mpsc::Sender<Inbound>,
) {
    let mut shutdown = shared.shutdown.subscribe();
    loop {
        let accepted = tokio::select! {
            accepted = acceptor.accept() => accepted,
            _ = shut_down(&mut shutdown) => return,
        };
        match accepted {
            Ok((stream, label)) => {
                tokio::spawn(serve_connection(Arc::clone(&shared), stream, label, inbound.clone()));
            }
            Err(error) => {
                // Out of file descriptors and the like: keep serving the connections we have.
                tracing::warn!(backend = shared.backend, %error, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Why a connection was closed; logged once.
enum Closed {
    Clean(&'static str),
    Refused(String),
}

async fn serve_connection<S: super::ByteStream>(
    shared: Arc<Shared>,
    stream: S,
    label: String,
    inbound: mpsc::Sender<Inbound>,
) {
    let mut shutdown = shared.shutdown.subscribe();
    let settings = &shared.settings;
    let opened = tokio::time::timeout(
        Duration::from_millis(settings.handshake_timeout_ms),
        handshake::accept(&shared, stream),
    )
    .await;
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
    let (mut read, mut write) = split(stream);
    let hello = protocol::hello_frame(&shared.local_node);
    if let Err(error) = write_flushed(&mut write, &hello).await {
        return log_closed(&shared, &label, Some(&peer), Closed::Refused(format!("writing hello: {error}")));
    }
    shared.counters.accepted.fetch_add(1, Relaxed);

    let mut reader = FrameReader::new(settings.max_frame_size);
    let mut received = Vec::new();
    let closed = loop {
        let frames = tokio::select! {
            frames = reader.read(&mut read) => frames,
            _ = shut_down(&mut shutdown) => {
                let _ = write_flushed(&mut write, &protocol::goodbye_frame()).await;
                break Closed::Clean("transport closed");
            }
        };
        let ended = match frames {
            Ok(Some(frames)) => decode(&frames, &mut received),
            Ok(None) => Some(Closed::Clean("peer closed the connection")),
            Err(error) => Some(Closed::Refused(error.to_string())),
        };
        // What came before a bad frame or a goodbye is delivered.
        if !deliver(&inbound, &mut received, &mut shutdown).await {
            break Closed::Clean("transport closed");
        }
        if let Some(closed) = ended {
            break closed;
        }
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

/// Hands `received` to the receive queue, waiting for room (a whole batch at a time when it
/// fits); `false` once the transport is closing.
async fn deliver(
    inbound: &mpsc::Sender<Inbound>,
    received: &mut Vec<Inbound>,
    shutdown: &mut watch::Receiver<bool>,
) -> bool {
    let mut items = received.drain(..);
    while items.len() > 0 {
        let wanted = items.len().min(inbound.max_capacity());
        let permits = tokio::select! {
            permits = inbound.reserve_many(wanted) => permits,
            _ = shut_down(shutdown) => return false,
        };
        let Ok(permits) = permits else { return false };
        for (permit, item) in permits.zip(items.by_ref()) {
            permit.send(item);
        }
    }
    true
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
