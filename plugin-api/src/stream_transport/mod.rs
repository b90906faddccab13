//! A complete transport over any reliable byte stream (TCP, Unix-domain sockets, ...).
//!
//! A backend supplies a [`StreamMedium`] (how to dial an address) and an [`Acceptor`] (its
//! listener); [`StreamTransport`] does the rest, identically for every medium:
//!
//! - [`protocol`]: hello handshake carrying the node id, envelope frames, goodbye;
//! - with link security ([`crate::security`]): a Noise handshake first, authenticating both
//!   ends by their identity keys and the allow-list, then everything in [`encrypted`] records;
//! - one connection per destination address, reused for every message, dialled on first use;
//! - a bounded queue per peer; a writer task gathers queued frames into one write of up to
//!   `write_batch_bytes`, so many small messages do not cost one syscall each;
//! - reconnect with exponential backoff; after `reconnect_attempts` failures the queued messages
//!   for that peer are dropped (logged with their count) and `send` reports the peer unreachable;
//! - a listener serving any number of peers at once; a malformed, oversized or unexpected frame
//!   closes that one connection with a logged reason, every other connection keeps working;
//! - graceful close: stop accepting, write what is queued (bounded by `close_timeout_ms`), say
//!   goodbye.
//!
//! Guarantees: messages from one sender to one receiver arrive in order. Delivery is
//! at-most-once except that a batch whose write failed is written again after reconnecting, so a
//! message can arrive twice (with the same id) when a connection breaks mid-write. Nothing is
//! acknowledged end to end: a message written to a peer that then crashes is lost.

pub mod encrypted;
mod handshake;
pub mod protocol;
mod reader;
mod settings;
mod writer;

pub use settings::StreamSettings;

use crate::{
    async_trait,
    security::{self, noise::NoiseIdentity, LinkSecurity},
    Capabilities, Envelope, ErrorCode, Inbound, NodeId, PluginError, Transport, TransportInfo,
};
use std::{
    collections::HashMap,
    future::Future,
    io,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::{mpsc, watch},
    task::JoinHandle,
};

/// A byte stream a [`StreamTransport`] can use.
pub trait ByteStream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> ByteStream for T {}

/// How to reach an address: the only outgoing part a backend writes.
pub trait StreamMedium: Send + Sync + 'static {
    /// The connected stream type.
    type Stream: ByteStream;
    /// Opens a connection to `address` (the caller applies the timeout).
    fn connect(&self, address: &str) -> impl Future<Output = io::Result<Self::Stream>> + Send;
}

/// A listener: the only incoming part a backend writes.
pub trait Acceptor: Send + 'static {
    /// The accepted stream type.
    type Stream: ByteStream;
    /// Waits for the next connection; returns it with a label for logs (the peer address).
    fn accept(&mut self) -> impl Future<Output = io::Result<(Self::Stream, String)>> + Send;
}

/// Shared state of the tasks of one transport.
struct Shared {
    /// Name of the backend, for logs ("tcp").
    backend: &'static str,
    local_node: NodeId,
    settings: StreamSettings,
    /// Flips to `true` once when the transport closes.
    shutdown: watch::Sender<bool>,
    /// Link security: `Some` when every link is a Noise-encrypted, authenticated one.
    noise: Option<Arc<NoiseIdentity>>,
}

/// One peer's outgoing queue and the error that ended its writer, if it ended.
struct PeerLink {
    queue: mpsc::Sender<Vec<u8>>,
    failure: Arc<Mutex<Option<PluginError>>>,
}

/// The transport. Construct it with [`StreamTransport::start`] inside the plugin runtime.
pub struct StreamTransport<M: StreamMedium> {
    shared: Arc<Shared>,
    medium: Arc<M>,
    local_address: String,
    links: Mutex<HashMap<String, PeerLink>>,
    writers: Mutex<Vec<JoinHandle<()>>>,
    /// The accept loop; `close` waits for it so that the listener is released on return.
    acceptor: Mutex<Option<JoinHandle<()>>>,
    inbound: tokio::sync::Mutex<mpsc::Receiver<Inbound>>,
    closed: AtomicBool,
}

impl<M: StreamMedium> std::fmt::Debug for StreamTransport<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamTransport")
            .field("backend", &self.shared.backend)
            .field("local_address", &self.local_address)
            .finish_non_exhaustive()
    }
}

impl<M: StreamMedium> StreamTransport<M> {
    /// Starts serving `acceptor` and returns the transport. `local_address` is the bound address
    /// (replaced by `settings.advertise` when set). With `security` (from
    /// [`crate::Setup::link_security`]) every link, incoming and outgoing, is encrypted and
    /// authenticated, and plaintext peers are refused; without it links are plain.
    pub fn start<A: Acceptor>(
        backend: &'static str,
        local_node: NodeId,
        settings: StreamSettings,
        security: Option<LinkSecurity>,
        medium: M,
        acceptor: A,
        local_address: String,
    ) -> Result<Self, PluginError> {
        settings.validate()?;
        let noise = match &security {
            Some(security) => {
                // Peers check our hello against our key: refuse to start with an id they would refuse.
                security::noise::verify_node_id(&local_node, &security.identity.public_key()).map_err(
                    |_| {
                        PluginError::invalid_config(format!(
                        "key `node.id`: with encrypted links the node id must be bound to the node's key \
                         (`{}` or `<label>-{}`), not `{local_node}`",
                        security.identity.public_key(),
                        security.identity.public_key()
                    ))
                    },
                )?;
                Some(
                    NoiseIdentity::new(security)
                        .map_err(|error| PluginError::new(ErrorCode::OTHER, error.to_string()))?,
                )
            }
            None => None,
        };
        let (shutdown, _) = watch::channel(false);
        let (inbound_tx, inbound_rx) = mpsc::channel(settings.receive_queue_capacity);
        let local_address = settings.advertise.clone().unwrap_or(local_address);
        let shared = Arc::new(Shared { backend, local_node, settings, shutdown, noise });
        let acceptor = tokio::spawn(reader::accept_loop(Arc::clone(&shared), acceptor, inbound_tx));
        Ok(Self {
            shared,
            medium: Arc::new(medium),
            local_address,
            links: Mutex::new(HashMap::new()),
            writers: Mutex::new(Vec::new()),
            acceptor: Mutex::new(Some(acceptor)),
            inbound: tokio::sync::Mutex::new(inbound_rx),
            closed: AtomicBool::new(false),
        })
    }

    /// What to report from [`crate::Transport::info`].
    pub fn info(&self) -> TransportInfo {
        TransportInfo {
            capabilities: match self.shared.noise {
                Some(_) => Capabilities::ORDERED | Capabilities::ENCRYPTED,
                None => Capabilities::ORDERED,
            },
            local_address: self.local_address.clone(),
            max_message_size: u64::from(max_payload(self.shared.settings.max_frame_size)),
        }
    }

    /// Queues `envelope` for the peer at `address`, dialling it on first use.
    pub async fn send(&self, address: &str, envelope: Envelope) -> Result<(), PluginError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(PluginError::closed(&format!("{} transport", self.shared.backend)));
        }
        let max_payload = max_payload(self.shared.settings.max_frame_size);
        if envelope.payload.len() > max_payload as usize {
            return Err(PluginError::new(
                ErrorCode::TOO_LARGE,
                format!("payload of {} bytes exceeds max_message_size {max_payload}", envelope.payload.len()),
            ));
        }
        let frame = protocol::envelope_frame(&envelope, self.shared.settings.max_frame_size)?;
        let (queue, failure) = self.link(address)?;
        if queue.send(frame).await.is_ok() {
            return Ok(());
        }
        // The writer gave up on this peer: forget the link so the next send dials afresh.
        let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        if links.get(address).is_some_and(|link| link.queue.same_channel(&queue)) {
            links.remove(address);
        }
        let error = failure.lock().unwrap_or_else(|p| p.into_inner()).clone();
        Err(error.unwrap_or_else(|| PluginError::closed(&format!("{} transport", self.shared.backend))))
    }

    /// The link to `address`, dialled on first use. If the writer of the previous link gave up,
    /// its error is returned once (so the sender learns the peer is unreachable) and the next
    /// call dials afresh.
    #[allow(clippy::type_complexity)]
    fn link(
        &self,
        address: &str,
    ) -> Result<(mpsc::Sender<Vec<u8>>, Arc<Mutex<Option<PluginError>>>), PluginError> {
        let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(link) = links.get(address) {
            if !link.queue.is_closed() {
                return Ok((link.queue.clone(), Arc::clone(&link.failure)));
            }
            let failure = link.failure.lock().unwrap_or_else(|p| p.into_inner()).clone();
            links.remove(address);
            if let Some(failure) = failure {
                return Err(failure);
            }
        }
        let (queue, frames) = mpsc::channel(self.shared.settings.send_queue_capacity);
        let failure = Arc::new(Mutex::new(None));
        let writer = writer::PeerWriter {
            shared: Arc::clone(&self.shared),
            medium: Arc::clone(&self.medium),
            address: address.to_string(),
            failure: Arc::clone(&failure),
        };
        let handle = tokio::spawn(writer.run(frames));
        let mut writers = self.writers.lock().unwrap_or_else(|p| p.into_inner());
        writers.retain(|handle| !handle.is_finished());
        writers.push(handle);
        links.insert(address.to_string(), PeerLink { queue: queue.clone(), failure: Arc::clone(&failure) });
        Ok((queue, failure))
    }

    /// Waits for at least one message; returns up to `max_batch`, or nothing once closed.
    pub async fn receive(&self, max_batch: usize) -> Result<Vec<Inbound>, PluginError> {
        let mut inbound = self.inbound.lock().await;
        let mut shutdown = self.shared.shutdown.subscribe();
        Ok(crate::inbound::receive_batch(&mut inbound, max_batch, &mut shutdown).await)
    }

    /// Stops accepting, flushes queued messages (up to `close_timeout_ms`), says goodbye.
    pub async fn close(&self) -> Result<(), PluginError> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        self.shared.shutdown.send_replace(true);
        let acceptor = self.acceptor.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(acceptor) = acceptor {
            let _ = acceptor.await;
        }
        // Dropping the queues lets each writer drain what is queued, then say goodbye.
        self.links.lock().unwrap_or_else(|p| p.into_inner()).clear();
        let writers = std::mem::take(&mut *self.writers.lock().unwrap_or_else(|p| p.into_inner()));
        let deadline = Duration::from_millis(self.shared.settings.close_timeout_ms);
        let pending = writers.len();
        let all = futures_join_all(writers);
        if tokio::time::timeout(deadline, all).await.is_err() {
            tracing::warn!(
                backend = self.shared.backend,
                writers = pending,
                "close: queued messages were not all written within close_timeout_ms; dropping them"
            );
            return Err(PluginError::new(
                ErrorCode::TIMEOUT,
                format!("close did not flush queued messages within {} ms", deadline.as_millis()),
            ));
        }
        Ok(())
    }
}

/// A stream transport is a complete [`Transport`]: a backend returns it as is.
#[async_trait]
impl<M: StreamMedium> Transport for StreamTransport<M> {
    fn info(&self) -> TransportInfo {
        StreamTransport::info(self)
    }

    async fn send(&self, address: &str, envelope: Envelope) -> Result<(), PluginError> {
        StreamTransport::send(self, address, envelope).await
    }

    async fn receive(&self, max_batch: usize) -> Result<Vec<Inbound>, PluginError> {
        StreamTransport::receive(self, max_batch).await
    }

    async fn close(&self) -> Result<(), PluginError> {
        StreamTransport::close(self).await
    }
}

impl<M: StreamMedium> Drop for StreamTransport<M> {
    fn drop(&mut self) {
        // Stops the listener and readers even if the host never called close.
        self.shared.shutdown.send_replace(true);
    }
}

/// The largest payload announced for a frame limit: the frame minus room for the envelope's
/// header (ids, node names, headers), 1 KiB or half of a small frame. A message whose header
/// needs more than that room can still be refused as too large.
pub fn max_payload(max_frame_size: u32) -> u32 {
    let reserved = 1024.min(max_frame_size / 2);
    max_frame_size - reserved
}

/// Completes once the transport is closing (or its state is gone).
async fn shut_down(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|closed| *closed).await;
}

/// Awaits every handle, aborting the remaining ones if the returned future is dropped.
async fn futures_join_all(handles: Vec<JoinHandle<()>>) {
    struct AbortOnDrop(Vec<JoinHandle<()>>);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.iter().for_each(JoinHandle::abort);
        }
    }
    let mut guard = AbortOnDrop(handles);
    while let Some(handle) = guard.0.last_mut() {
        let _ = handle.await;
        guard.0.pop();
    }
}
