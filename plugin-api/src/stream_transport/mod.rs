//! A complete transport over any reliable byte stream (TCP, Unix-domain sockets, ...).
//!
//! A backend supplies a [`StreamMedium`] (how to dial an address) and an [`Acceptor`] (its
//! listener); [`StreamTransport`] does the rest, identically for every medium:
//!
//! - [`protocol`]: hello handshake carrying the node id, envelope frames, goodbye;
//! - with link security ([`crate::security`]): a Noise handshake first, authenticating both
//!   ends by their identity keys and the allow-list, then everything in [`encrypted`] records;
//! - one connection per destination address, reused for every message, dialled on first use;
//! - a bounded queue of envelopes per peer (`send_queue_capacity` messages; `send` waits while
//!   it is full); the peer's writer task encodes what is queued straight into its write buffer,
//!   up to `write_batch_bytes`, and writes it at once, so many small messages do not cost one
//!   syscall each, and each message is encoded once, into the buffer that is written;
//! - batched sends ([`StreamTransport::send_batch`]): the items for one peer are queued
//!   together, with one wake of its writer;
//! - receiving without copying payloads: frames are read in chunks ([`crate::framing::FrameReader`])
//!   and a bulk of envelopes is decoded with payloads that are ranges of the chunk they were
//!   read into (a payload the application keeps keeps its chunk, 64 KiB or one large frame,
//!   alive; a few small messages per read are copied out instead);
//! - reconnect with exponential backoff; after `reconnect_attempts` failures the queued messages
//!   for that peer are dropped (logged with their count) and `send` reports the peer unreachable;
//! - a listener serving many peers at once; a malformed, oversized or unexpected frame
//!   closes that one connection with a logged reason, every other connection keeps working;
//! - bounds on what peers that are not trusted can make a node hold: memory of partly received
//!   frames (grown as bytes arrive, within one budget per transport), time (a frame must arrive
//!   whole within a bound, an idle incoming connection is closed) and incoming connections (in
//!   all and per IP address, the idlest evicted to make room); see [`StreamSettings`];
//! - graceful close ([`StreamTransport::close`], bounded by `close_timeout_ms`): stop accepting
//!   (the address is free at once, for a successor to bind), tell each incoming connection
//!   goodbye and read on until its peer closes its side, delivering all of it; write what is
//!   queued, say goodbye;
//! - a writer looks for its peer's goodbye before every batch, also under load: it then closes
//!   its side (ending the peer's drain) and writes the rest to whoever listens on the address
//!   next, dialled with the reconnect backoff. So a transport can be replaced by another on the
//!   same address (hot swap) while peers keep sending, without losing messages;
//! - statistics ([`StreamTransport::stats`]): queue depths, reconnects, connections closed for
//!   bad input and failed writes (errors), and counters `<backend>.writes`,
//!   `<backend>.connections.accepted`, `<backend>.connections.refused`,
//!   `<backend>.messages.dropped`, `<backend>.connections.evicted` (to stay within the
//!   connection limits), `<backend>.connections.idle_closed`,
//!   `<backend>.connections.frame_timeouts`, and two gauges: `<backend>.connections.open`
//!   (incoming connections now) and `<backend>.frames.partial_bytes` (budget held by partly
//!   received frames now), and the contract's `undelivered` (messages to a node taken
//!   by `send` and then given up on, which the host's `flush` and `close` report), and
//!   `io.host_driven_sockets`: sockets of this plugin library the host's reactor drives now
//!   (all its transports together; see [`crate::host_driven`]);
//! - tasks on the host's executor ([`crate::runtime::spawn`]): with a host that offers it
//!   (contract 1.1) and a medium whose streams it can drive ([`crate::host_driven::adopt`]), a
//!   connection's reader and writer run on the host's threads, woken by the host's reactor.
//!
//! Guarantees: messages from one sender to one receiver arrive in order. Delivery is
//! at-most-once except that a batch whose write failed is written again after reconnecting, so a
//! message can arrive twice (with the same id) when a connection breaks mid-write.
//!
//! A receiver that closes gracefully loses nothing a comms peer had written to it, if the drain
//! ends within `close_timeout_ms`: a peer with this drain (this version or later) closes its
//! side as soon as it sees the goodbye, after at most the batch it is writing, and the host
//! must go on calling `receive` meanwhile (the receive queue is bounded). What the peer writes
//! after that goes to the next listener on the address, if one is up before the peer's
//! reconnect backoff runs out (with the defaults, 8 attempts with waits of 20 ms doubling up to
//! 1.28 s between them: 2.54 s in all), else it is dropped and counted as undelivered. A peer
//! built before this drain does not look for the goodbye while it has messages queued: under
//! load it keeps writing, and the receiver reads it until the deadline. A connection still open
//! at the deadline is cut (with a warning giving the count) and what its peer had sent and was
//! not read is lost.
//!
//! Nothing is acknowledged end to end: a message written to a peer that then crashes, or that
//! is dropped without `close`, is lost.

mod connections;
pub mod encrypted;
mod handshake;
pub mod protocol;
mod queue;
mod reader;
mod receive_queue;
mod settings;
mod writer;

pub use settings::StreamSettings;

use handshake::NoiseIdentity;

use crate::runtime::Task;
use crate::{
    async_trait, security::LinkSecurity, transport::IncidentCounters, Capabilities, Envelope, ErrorCode,
    Inbound, NodeId, Outbound, PluginError, SendFailure, Transport, TransportInfo, TransportStats,
};
use queue::{PeerQueue, Queued};
use std::{
    collections::HashMap,
    future::Future,
    io,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering, Ordering::Relaxed},
        Arc, Mutex, OnceLock,
    },
    time::Duration,
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::watch,
    time::Instant,
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
    /// Set when the transport closes, before `shutdown` flips: incoming connections drain
    /// until then, and `close` waits until then.
    close_deadline: OnceLock<Instant>,
    /// How many tasks may still put messages into the receive queue ([`Feeder`]s).
    feeders: watch::Sender<usize>,
    /// Link security: `Some` when every link is a Noise-encrypted, authenticated one.
    noise: Option<Arc<NoiseIdentity>>,
    counters: Counters,
    /// The incoming connections, kept within `max_connections` and `max_connections_per_address`.
    connections: Arc<connections::ConnectionTable>,
    /// What partly received frames of every incoming connection may hold beyond one chunk each.
    frame_budget: Arc<crate::framing::FrameBudget>,
}

impl Shared {
    /// When the drain of incoming connections and the flush of queued messages end: set by the
    /// first call, `close_timeout_ms` from then.
    fn close_deadline(&self) -> Instant {
        *self
            .close_deadline
            .get_or_init(|| Instant::now() + Duration::from_millis(self.settings.close_timeout_ms))
    }
}

/// A task that may still put messages into the receive queue: the accept loop (until the
/// transport closes) or one incoming connection (until it is drained or cut). While one lives,
/// [`StreamTransport::receive`] waits for messages; once none does, nothing more can come, and
/// `receive` ends after handing over what is buffered.
struct Feeder(Arc<Shared>);

impl Feeder {
    /// Counts one more feeder: before its task is spawned, so that the count never touches 0
    /// while a feeder is on its way.
    fn new(shared: &Arc<Shared>) -> Self {
        shared.feeders.send_modify(|feeders| *feeders += 1);
        Self(Arc::clone(shared))
    }
}

impl Drop for Feeder {
    fn drop(&mut self) {
        self.0.feeders.send_modify(|feeders| *feeders -= 1);
    }
}

/// What the tasks of one transport count for [`StreamTransport::stats`].
#[derive(Debug, Default)]
struct Counters {
    /// Reconnects; errors: connections closed for bad input, failed writes, peers given up.
    incidents: IncidentCounters,
    /// Messages queued for every peer and not yet written (or dropped).
    send_queue_depth: AtomicU64,
    /// Writes of a batch of frames.
    writes: AtomicU64,
    /// Connections accepted and past the handshake.
    accepted: AtomicU64,
    /// Connections refused or closed for bad input.
    refused: AtomicU64,
    /// Queued messages dropped because their peer stayed unreachable.
    dropped_messages: AtomicU64,
    /// Incoming connections closed to stay within the connection limits.
    evicted: AtomicU64,
    /// Incoming connections closed after `idle_timeout_ms` without a frame.
    idle_closed: AtomicU64,
    /// Incoming connections closed because a frame took longer than `frame_read_timeout_ms`.
    frame_timeouts: AtomicU64,
}

impl Counters {
    /// A connection was refused or closed for bad input.
    fn refused(&self) {
        self.refused.fetch_add(1, Relaxed);
        self.incidents.failed();
    }
}

/// The transport. Construct it with [`StreamTransport::start`] inside the plugin runtime.
pub struct StreamTransport<M: StreamMedium> {
    shared: Arc<Shared>,
    medium: Arc<M>,
    local_address: String,
    /// The queue of each peer address, and the writer task that empties it.
    links: Mutex<HashMap<String, Arc<PeerQueue>>>,
    writers: Mutex<Vec<Task>>,
    /// The accept loop; `close` waits for it so that the listener is released on return.
    acceptor: Mutex<Option<Task>>,
    inbound: tokio::sync::Mutex<receive_queue::ReceiveQueue>,
    /// How many messages wait in `inbound`.
    inbound_depth: receive_queue::QueueDepth,
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
    /// authenticated, and plaintext peers are refused; without it links are plain. Encrypted links
    /// need the cargo feature `noise`.
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
        // Refused by a build without the cargo feature `noise`.
        let noise =
            security.as_ref().map(|security| handshake::noise_identity(&local_node, security)).transpose()?;
        let (shutdown, _) = watch::channel(false);
        let (inbound_tx, inbound_rx, inbound_depth) =
            receive_queue::receive_queue(settings.receive_queue_capacity);
        let local_address = settings.advertise.clone().unwrap_or(local_address);
        let connections = Arc::new(connections::ConnectionTable::new(
            settings.max_connections,
            settings.max_connections_per_address,
        ));
        let budget = usize::try_from(settings.partial_frames_budget()).unwrap_or(usize::MAX);
        let shared = Arc::new(Shared {
            backend,
            local_node,
            settings,
            shutdown,
            close_deadline: OnceLock::new(),
            feeders: watch::Sender::new(0),
            noise,
            counters: Counters::default(),
            connections,
            frame_budget: Arc::new(crate::framing::FrameBudget::new(budget)),
        });
        let feeding = Feeder::new(&shared);
        let acceptor =
            crate::runtime::spawn(reader::accept_loop(Arc::clone(&shared), acceptor, inbound_tx, feeding));
        Ok(Self {
            shared,
            medium: Arc::new(medium),
            local_address,
            links: Mutex::new(HashMap::new()),
            writers: Mutex::new(Vec::new()),
            acceptor: Mutex::new(Some(acceptor)),
            inbound: tokio::sync::Mutex::new(inbound_rx),
            inbound_depth,
            closed: AtomicBool::new(false),
        })
    }

    /// What to report from [`crate::Transport::info`].
    pub fn info(&self) -> TransportInfo {
        let capabilities = match self.shared.noise {
            Some(_) => Capabilities::ORDERED | Capabilities::ENCRYPTED,
            None => Capabilities::ORDERED,
        };
        TransportInfo::new(
            capabilities,
            self.local_address.clone(),
            u64::from(max_payload(self.shared.settings.max_frame_size)),
        )
    }

    /// Queues `envelope` for the peer at `address`, dialling it on first use; waits while the
    /// peer's queue is full. Fails with [`ErrorCode::TOO_LARGE`] for a message whose frame would
    /// exceed `max_frame_size` (nothing is queued), with the writer's error once when it gave up
    /// on the peer, and with [`ErrorCode::CLOSED`] once the transport is closing.
    pub async fn send(&self, address: &str, envelope: Envelope) -> Result<(), PluginError> {
        let item = self.prepare(envelope)?;
        let queue = self.link(address)?;
        self.push(address, &queue, &mut std::iter::once(item)).await
    }

    /// Queues every item of `batch`, in order per address: the items for one peer are queued
    /// together (in parts of at most `send_queue_capacity`) with one wake of its writer. Returns
    /// the items that were not queued, by index, each with the error [`StreamTransport::send`]
    /// would have returned for it.
    pub async fn send_batch(&self, batch: Vec<Outbound>) -> Vec<SendFailure> {
        let mut failures = Vec::new();
        // Per address, in the order addresses first appear: its items' indexes and the items.
        let mut peers: Vec<(crate::Text, Vec<usize>, Vec<Queued>)> = Vec::new();
        let count = batch.len();
        for (index, Outbound { address, envelope }) in batch.into_iter().enumerate() {
            let item = match self.prepare(envelope) {
                Ok(item) => item,
                Err(error) => {
                    failures.push(SendFailure { index, error });
                    continue;
                }
            };
            // A batch usually goes to one peer or a few: a linear search beats hashing.
            let position = match peers.iter().position(|(peer, _, _)| *peer == address) {
                Some(position) => position,
                None => {
                    // Sized once for the first peer (growing a vector moves its items again);
                    // a batch to many peers lets the others grow.
                    let room = if peers.is_empty() { count - index } else { 0 };
                    peers.push((address, Vec::with_capacity(room), Vec::with_capacity(room)));
                    peers.len() - 1
                }
            };
            peers[position].1.push(index);
            peers[position].2.push(item);
        }
        for (address, indexes, items) in peers {
            // How many of the peer's items were queued before the error.
            let (queued, error) = match self.link(&address) {
                Ok(queue) => {
                    let mut items = items.into_iter();
                    match self.push(&address, &queue, &mut items).await {
                        Ok(()) => continue,
                        Err(error) => (indexes.len() - items.len(), error),
                    }
                }
                Err(error) => (0, error),
            };
            failures
                .extend(indexes[queued..].iter().map(|&index| SendFailure { index, error: error.clone() }));
        }
        failures.sort_by_key(|failure| failure.index);
        failures
    }

    /// Checks `envelope` against the limits and sizes its frame: everything `send` can refuse
    /// before queueing.
    fn prepare(&self, envelope: Envelope) -> Result<Queued, PluginError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(self.closed_error());
        }
        let max_frame_size = self.shared.settings.max_frame_size;
        let max_payload = max_payload(max_frame_size);
        if envelope.payload.len() > max_payload as usize {
            return Err(PluginError::new(
                ErrorCode::TOO_LARGE,
                format!("payload of {} bytes exceeds max_message_size {max_payload}", envelope.payload.len()),
            ));
        }
        let frame_bytes = protocol::envelope_frame_len(&envelope, max_frame_size)?;
        Ok(Queued { envelope, frame_bytes })
    }

    /// Puts `items` into `queue` (the link to `address`). If the queue no longer takes sends,
    /// the items left in `items` were not queued, and the error says why.
    async fn push<I: ExactSizeIterator<Item = Queued>>(
        &self,
        address: &str,
        queue: &Arc<PeerQueue>,
        items: &mut I,
    ) -> Result<(), PluginError> {
        let count = items.len();
        let counters = &self.shared.counters;
        counters.send_queue_depth.fetch_add(count as u64, Relaxed);
        if queue.push(items).await.is_ok() {
            return Ok(());
        }
        counters.send_queue_depth.fetch_sub(items.len() as u64, Relaxed);
        // The writer gave up on this peer (or the transport is closing): forget the link so the
        // next send dials afresh.
        let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        if links.get(address).is_some_and(|link| Arc::ptr_eq(link, queue)) {
            links.remove(address);
        }
        Err(queue.failure().unwrap_or_else(|| self.closed_error()))
    }

    fn closed_error(&self) -> PluginError {
        PluginError::closed(&format!("{} transport", self.shared.backend))
    }

    /// The queue of the link to `address`, dialled on first use. If the writer of the previous
    /// link gave up, its error is returned once (so the sender learns the peer is unreachable)
    /// and the next call dials afresh.
    fn link(&self, address: &str) -> Result<Arc<PeerQueue>, PluginError> {
        let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(queue) = links.get(address) {
            if queue.is_open() {
                return Ok(Arc::clone(queue));
            }
            let failure = queue.failure();
            links.remove(address);
            if let Some(failure) = failure {
                return Err(failure);
            }
        }
        // Checked under the lock `close` empties the links with: no writer starts after it.
        if self.closed.load(Ordering::Acquire) {
            return Err(self.closed_error());
        }
        let queue = Arc::new(PeerQueue::new(self.shared.settings.send_queue_capacity));
        let writer = writer::PeerWriter {
            shared: Arc::clone(&self.shared),
            medium: Arc::clone(&self.medium),
            address: address.to_string(),
            queue: Arc::clone(&queue),
        };
        let handle = crate::runtime::spawn(writer.run());
        let mut writers = self.writers.lock().unwrap_or_else(|p| p.into_inner());
        writers.retain_mut(|handle| !handle.is_finished());
        writers.push(handle);
        links.insert(address.to_string(), Arc::clone(&queue));
        Ok(queue)
    }

    /// Queue depths, reconnects (a connection to a peer dialled again after it was lost), errors
    /// (connections refused or closed for bad input, failed writes, peers given up) and the
    /// counters listed in the module documentation. Cheap: atomics only.
    pub fn stats(&self) -> TransportStats {
        let counters = &self.shared.counters;
        let mut stats = counters.incidents.stats();
        stats.send_queue_depth = counters.send_queue_depth.load(Relaxed);
        stats.receive_queue_depth = self.inbound_depth.get();
        let backend = self.shared.backend;
        stats.counters.extend([
            (format!("{backend}.writes"), counters.writes.load(Relaxed)),
            (format!("{backend}.connections.accepted"), counters.accepted.load(Relaxed)),
            (format!("{backend}.connections.refused"), counters.refused.load(Relaxed)),
            (format!("{backend}.messages.dropped"), counters.dropped_messages.load(Relaxed)),
            (format!("{backend}.connections.evicted"), counters.evicted.load(Relaxed)),
            (format!("{backend}.connections.idle_closed"), counters.idle_closed.load(Relaxed)),
            (format!("{backend}.connections.frame_timeouts"), counters.frame_timeouts.load(Relaxed)),
            (format!("{backend}.connections.open"), self.shared.connections.len() as u64),
            (format!("{backend}.frames.partial_bytes"), self.shared.frame_budget.in_use() as u64),
            ("io.host_driven_sockets".to_string(), crate::host_driven::host_driven_sockets()),
        ]);
        stats
    }

    /// Stops every writer once it has written what is queued for its peer.
    fn finish_links(&self) {
        let links = std::mem::take(&mut *self.links.lock().unwrap_or_else(|p| p.into_inner()));
        for queue in links.values() {
            queue.finish();
        }
    }

    /// Waits for at least one message; returns up to `max_batch`. Once the transport is closing,
    /// returns what is buffered and what incoming connections deliver while they drain, and the
    /// empty batch (the end) only once the listener and every incoming connection have finished
    /// and everything they delivered was returned. Cancel-safe.
    pub async fn receive(&self, max_batch: usize) -> Result<Vec<Inbound>, PluginError> {
        // An empty batch: every feeder (the listener, each incoming connection) has dropped its
        // sender and what they delivered was taken.
        Ok(self.inbound.lock().await.take(max_batch).await)
    }

    /// Closes gracefully, within `close_timeout_ms`:
    ///
    /// - stops accepting: the listener is dropped before anything else is waited for, so that
    ///   its address is free at once (a new transport can bind it while this one drains);
    /// - incoming connections: tells each peer goodbye, then goes on reading and delivering
    ///   until the peer closes its side, which a comms peer does as soon as it sees the goodbye
    ///   (after the batch it may be writing; it writes what follows to whoever listens on the
    ///   address next). [`StreamTransport::receive`] hands all of it over and ends after it. So
    ///   nothing a comms peer had written is lost, unless the drain outlasts the deadline (the
    ///   host does not call `receive`, a peer built before this drain keeps writing under load,
    ///   a peer that is gone does not answer): the connections still open then are cut, with a
    ///   warning saying how many, and what their peers sent that was not read is lost;
    /// - outgoing links: each writer writes what is queued, says goodbye and closes its side;
    ///   what is not written by the deadline is dropped and the call fails with
    ///   [`ErrorCode::TIMEOUT`].
    ///
    /// Both happen at once, bounded by the same deadline.
    pub async fn close(&self) -> Result<(), PluginError> {
        {
            // Under the links' lock, so that no send starts a writer after this.
            let _links = self.links.lock().unwrap_or_else(|p| p.into_inner());
            if self.closed.swap(true, Ordering::AcqRel) {
                return Ok(());
            }
        }
        // Set before the readers learn of the close: they drain until then.
        let deadline = self.shared.close_deadline();
        self.shared.shutdown.send_replace(true);
        // The accept loop drops the listener as it ends.
        let acceptor = self.acceptor.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(mut acceptor) = acceptor {
            acceptor.wait().await;
        }
        // Each writer writes what is queued, then says goodbye.
        self.finish_links();
        let writers = std::mem::take(&mut *self.writers.lock().unwrap_or_else(|p| p.into_inner()));
        let pending = writers.len();
        let mut feeders = self.shared.feeders.subscribe();
        let (written, drained) = tokio::join!(
            async { tokio::time::timeout_at(deadline, futures_join_all(writers)).await.is_ok() },
            async {
                tokio::time::timeout_at(deadline, feeders.wait_for(|feeders| *feeders == 0)).await.is_ok()
            },
        );
        if !drained {
            // The connections cut themselves at the same deadline.
            tracing::warn!(
                backend = self.shared.backend,
                connections = *self.shared.feeders.borrow(),
                "close: incoming connections were not drained within close_timeout_ms; cut them \
                 (what their peers sent and was not read is lost)"
            );
        }
        if !written {
            tracing::warn!(
                backend = self.shared.backend,
                writers = pending,
                "close: queued messages were not all written within close_timeout_ms; dropping them"
            );
            return Err(PluginError::new(
                ErrorCode::TIMEOUT,
                format!(
                    "close did not flush queued messages within {} ms",
                    self.shared.settings.close_timeout_ms
                ),
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

    async fn send_batch(&self, batch: Vec<Outbound>) -> Vec<SendFailure> {
        StreamTransport::send_batch(self, batch).await
    }

    async fn receive(&self, max_batch: usize) -> Result<Vec<Inbound>, PluginError> {
        StreamTransport::receive(self, max_batch).await
    }

    fn stats(&self) -> TransportStats {
        StreamTransport::stats(self)
    }

    async fn close(&self) -> Result<(), PluginError> {
        StreamTransport::close(self).await
    }
}

impl<M: StreamMedium> Drop for StreamTransport<M> {
    fn drop(&mut self) {
        // Stops the listener, readers and writers even if the host never called close. The
        // receive queue is gone with this: readers stop at once, nothing can be delivered.
        let _ = self.shared.close_deadline();
        self.shared.shutdown.send_replace(true);
        self.finish_links();
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

/// Awaits every task, stopping the remaining ones if the returned future is dropped.
async fn futures_join_all(tasks: Vec<Task>) {
    struct AbortOnDrop(Vec<Task>);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.iter_mut().for_each(Task::abort);
        }
    }
    let mut guard = AbortOnDrop(tasks);
    while let Some(task) = guard.0.last_mut() {
        task.wait().await;
        guard.0.pop();
    }
}

#[cfg(test)]
mod tests;
