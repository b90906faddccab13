//! The listener side: accepts connections and turns their frames into inbound messages.

use super::{
    handshake::{self, OpenError, Opened},
    protocol, shut_down, Acceptor, Shared,
};
use crate::{framing::read_frame, wire::decode_envelope, Inbound};
use std::{sync::Arc, time::Duration};
use tokio::{
    io::{split, AsyncWrite, AsyncWriteExt, BufReader},
    sync::mpsc,
};

/// Read buffer per connection: large enough that small frames cost far less than a syscall each.
const READ_BUFFER_BYTES: usize = 64 * 1024;

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
    let (read, mut write) = split(stream);
    let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, read);
    let hello = protocol::hello_frame(&shared.local_node);
    if let Err(error) = write_flushed(&mut write, &hello).await {
        return log_closed(&shared, &label, Some(&peer), Closed::Refused(format!("writing hello: {error}")));
    }

    let closed = loop {
        let frame = tokio::select! {
            frame = read_frame(&mut reader, settings.max_frame_size) => frame,
            _ = shut_down(&mut shutdown) => {
                let _ = write_flushed(&mut write, &protocol::goodbye_frame()).await;
                break Closed::Clean("transport closed");
            }
        };
        let body = match frame {
            Ok(Some(body)) => body,
            Ok(None) => break Closed::Clean("peer closed the connection"),
            Err(error) => break Closed::Refused(error.to_string()),
        };
        match body.first() {
            Some(&protocol::KIND_ENVELOPE) => match decode_envelope(&body[1..]) {
                Ok(envelope) => {
                    let delivered = tokio::select! {
                        sent = inbound.send(Inbound { envelope, delivery_tag: 0 }) => sent.is_ok(),
                        _ = shut_down(&mut shutdown) => false,
                    };
                    if !delivered {
                        break Closed::Clean("transport closed");
                    }
                }
                Err(error) => break Closed::Refused(format!("malformed envelope: {error}")),
            },
            Some(&protocol::KIND_GOODBYE) => break Closed::Clean("peer said goodbye"),
            Some(kind) => break Closed::Refused(format!("unexpected frame kind {kind}")),
            None => break Closed::Refused("empty frame".to_string()),
        }
    };
    log_closed(&shared, &label, Some(&peer), closed);
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
            tracing::warn!(backend = shared.backend, from = label, node, %reason, "closing connection")
        }
    }
}
