//! One in-memory transport instance: a registered bounded inbound queue.

use crate::{
    registry::{self, Mailbox, Registration},
    MemoryConfig,
};
use comms_plugin_api::{
    async_trait, queued, Capabilities, Envelope, ErrorCode, Inbound, NodeId, Outbound, PluginError,
    SendFailure, Text, Transport, TransportInfo, TransportStats,
};
use tokio::sync::{
    mpsc::{self, error::TrySendError},
    watch,
};

/// An in-memory transport: see the crate documentation for guarantees and limits.
///
/// Normally built by the host through the plugin; [`MemoryTransport::register`] builds one
/// directly (in a program that links this crate).
#[derive(Debug)]
pub struct MemoryTransport {
    registration: Registration,
    max_message_size: u64,
    inbound: tokio::sync::Mutex<mpsc::Receiver<Envelope>>,
    /// The sending side of `inbound`, kept only to count what waits in it.
    inbound_depth: mpsc::Sender<Envelope>,
    /// Flips to `true` once, on `close`.
    shutdown: watch::Sender<bool>,
}

impl MemoryTransport {
    /// Validates `config` and registers a new instance for `node_id` in this library's registry.
    ///
    /// Fails with [`ErrorCode::INVALID_CONFIG`] naming the key for an invalid value or a
    /// configured address already registered.
    pub fn register(node_id: &NodeId, config: MemoryConfig) -> Result<Self, PluginError> {
        config.validate()?;
        let (queue, inbound) = mpsc::channel(config.queue_capacity);
        let inbound_depth = queue.clone();
        let registration =
            Registration::new(config.address.as_deref(), node_id, queue, config.max_message_size)?;
        Ok(Self {
            registration,
            max_message_size: config.max_message_size,
            inbound: tokio::sync::Mutex::new(inbound),
            inbound_depth,
            shutdown: watch::channel(false).0,
        })
    }

    /// The address peers send to.
    pub fn address(&self) -> &str {
        self.registration.address()
    }

    fn is_closed(&self) -> bool {
        *self.shutdown.borrow()
    }

    fn closed_error(&self) -> PluginError {
        PluginError::closed(&format!("memory transport `{}`", self.address()))
    }

    fn too_large(size: u64, limit: u64, whose: String) -> PluginError {
        PluginError::new(
            ErrorCode::TOO_LARGE,
            format!("payload of {size} bytes exceeds max_message_size {limit} of {whose}"),
        )
    }

    /// What this side refuses, before looking for the receiver.
    fn check_sendable(&self, envelope: &Envelope) -> Result<(), PluginError> {
        if self.is_closed() {
            return Err(self.closed_error());
        }
        let size = envelope.payload.len() as u64;
        if size > self.max_message_size {
            let whose = format!("the sending memory transport `{}`", self.address());
            return Err(Self::too_large(size, self.max_message_size, whose));
        }
        Ok(())
    }

    /// Puts `envelope` into `mailbox` (registered at `address`), waiting while it is full.
    async fn put(&self, address: &str, mailbox: &Mailbox, envelope: Envelope) -> Result<(), PluginError> {
        let size = envelope.payload.len() as u64;
        if size > mailbox.max_message_size {
            let whose = format!("the receiving memory transport `{address}`");
            return Err(Self::too_large(size, mailbox.max_message_size, whose));
        }
        let receiver_closed = || {
            PluginError::retryable(
                ErrorCode::UNREACHABLE,
                format!("the memory transport at `{address}` closed before it took the message"),
            )
        };
        // Fast path without a shutdown subscription; the queue usually has room.
        let envelope = match mailbox.queue.try_send(envelope) {
            Ok(()) => return Ok(()),
            Err(TrySendError::Closed(_)) => return Err(receiver_closed()),
            Err(TrySendError::Full(envelope)) => envelope,
        };
        // Backpressure: wait for room, unless this transport closes meanwhile.
        let mut shutdown = self.shutdown.subscribe();
        tokio::select! {
            sent = mailbox.queue.send(envelope) => sent.map_err(|_| receiver_closed()),
            _ = closing(&mut shutdown) => Err(self.closed_error()),
        }
    }
}

#[async_trait]
impl Transport for MemoryTransport {
    fn info(&self) -> TransportInfo {
        TransportInfo::new(
            Capabilities::ORDERED | Capabilities::RELIABLE,
            self.address().to_string(),
            self.max_message_size,
        )
    }

    /// Puts `envelope` into the queue of the instance registered at `address`, waiting while
    /// that queue is full.
    async fn send(&self, address: &str, envelope: Envelope) -> Result<(), PluginError> {
        self.check_sendable(&envelope)?;
        let mailbox = registry::lookup(address)?;
        self.put(address, &mailbox, envelope).await
    }

    /// Like `send` for each item, in order, with one registry lookup per address.
    async fn send_batch(&self, batch: Vec<Outbound>) -> Vec<SendFailure> {
        let mut failures = Vec::new();
        let mut mailboxes: Vec<(Text, Result<Mailbox, PluginError>)> = Vec::new();
        for (index, Outbound { address, envelope }) in batch.into_iter().enumerate() {
            if let Err(error) = self.check_sendable(&envelope) {
                failures.push(SendFailure { index, error });
                continue;
            }
            let known = mailboxes.iter().position(|(known, _)| *known == address);
            let position = known.unwrap_or_else(|| {
                mailboxes.push((address.clone(), registry::lookup(&address)));
                mailboxes.len() - 1
            });
            let sent = match &mailboxes[position].1 {
                Ok(mailbox) => self.put(&address, mailbox, envelope).await,
                Err(error) => Err(error.clone()),
            };
            if let Err(error) = sent {
                failures.push(SendFailure { index, error });
            }
        }
        failures
    }

    async fn receive(&self, max_batch: usize) -> Result<Vec<Inbound>, PluginError> {
        let mut inbound = self.inbound.lock().await;
        let mut shutdown = self.shutdown.subscribe();
        let received = tokio::select! {
            envelope = inbound.recv() => Some(envelope),
            _ = closing(&mut shutdown) => None,
        };
        let first = match received {
            Some(envelope) => envelope,
            None => {
                // Closing: refuse further messages (waiting senders fail), hand out what is queued.
                inbound.close();
                inbound.recv().await
            }
        };
        let Some(first) = first else {
            return Ok(Vec::new());
        };
        let mut batch = vec![Inbound { envelope: first, delivery_tag: 0 }];
        while batch.len() < max_batch {
            match inbound.try_recv() {
                Ok(envelope) => batch.push(Inbound { envelope, delivery_tag: 0 }),
                Err(_) => break,
            }
        }
        Ok(batch)
    }

    /// Messages waiting in this instance's queue (nothing waits on the sending side).
    fn stats(&self) -> TransportStats {
        let mut stats = TransportStats::default();
        stats.receive_queue_depth = queued(&self.inbound_depth);
        stats
    }

    /// Unregisters the address, fails sends waiting for room in this queue, and lets `receive`
    /// drain what is queued. Idempotent.
    async fn close(&self) -> Result<(), PluginError> {
        self.registration.unregister();
        self.shutdown.send_replace(true);
        self.inbound.lock().await.close();
        Ok(())
    }
}

/// Completes once the transport is closing.
async fn closing(shutdown: &mut watch::Receiver<bool>) {
    // The sender lives as long as the transport, so waiting cannot fail.
    let _ = shutdown.wait_for(|closed| *closed).await;
}
