//! Test helpers for plugin authors (feature `testing`): an in-process pair of transports to put
//! a layer on, with what crossed it on record.
//!
//! ```
//! # async fn demo() {
//! use comms_plugin_api::{testing::link_pair, Capabilities, Destination, Envelope, MessageId, Transport};
//!
//! let (a, b) = link_pair(Capabilities::ACKNOWLEDGEMENTS, 1 << 20);
//! let hello = Envelope::new(MessageId::from_u128(1), "a", Destination::node("b"), b"hi".to_vec());
//! a.send("link://b", hello.clone()).await.unwrap();
//! let received = b.receive(16).await.unwrap();
//! assert_eq!(received[0].envelope, hello);
//! assert_eq!(a.wire(), [hello]);
//! # }
//! ```
//!
//! A layer's unit tests wrap each end in the layer and check what the far layer hands up, what
//! went over the link between them ([`Link::wire`]) and what reached the transport below
//! ([`Link::settled`], [`Link::is_closed`]).
//!
//! [`gaps_between_deliveries`] measures a loaded transport's requeue delay, and
//! [`deliveries_of_a_message_always_requeued`] its limit on deliveries.

mod requeue;

pub use requeue::{deliveries_of_a_message_always_requeued, gaps_between_deliveries};

use crate::{
    async_trait, Capabilities, Envelope, ErrorCode, Inbound, PluginError, Settlement, Transport,
    TransportInfo,
};
use std::sync::{
    atomic::{AtomicBool, AtomicU64, Ordering},
    Arc, Mutex,
};
use tokio::sync::mpsc;

/// Messages one end holds for the other before `send` waits.
const LINK_CAPACITY: usize = 1024;

/// One end of an in-process link: what it sends lands in the other end's queue, in order.
/// Refuses a payload larger than its `max_message_size` (`TOO_LARGE`); with
/// [`Capabilities::ACKNOWLEDGEMENTS`] each message gets a delivery tag (1, 2, ... shared by
/// both ends), else tag 0. Records what it sent (the "wire"), what it was asked to settle, and
/// whether it was closed.
#[derive(Debug)]
pub struct Link {
    info: TransportInfo,
    inbound: tokio::sync::Mutex<mpsc::Receiver<Inbound>>,
    peer: mpsc::Sender<Inbound>,
    next_tag: Arc<AtomicU64>,
    wire: Mutex<Vec<Envelope>>,
    settled: Mutex<Vec<Settlement>>,
    closed: AtomicBool,
}

/// Two linked ends, at addresses `link://a` and `link://b`, with `capabilities` and
/// `max_message_size`.
pub fn link_pair(capabilities: Capabilities, max_message_size: u64) -> (Arc<Link>, Arc<Link>) {
    let (to_a, from_b) = mpsc::channel(LINK_CAPACITY);
    let (to_b, from_a) = mpsc::channel(LINK_CAPACITY);
    let tags = Arc::new(AtomicU64::new(1));
    let end = |inbound, peer, address: &str| {
        Arc::new(Link {
            info: TransportInfo::new(capabilities, address, max_message_size),
            inbound: tokio::sync::Mutex::new(inbound),
            peer,
            next_tag: Arc::clone(&tags),
            wire: Mutex::new(Vec::new()),
            settled: Mutex::new(Vec::new()),
            closed: AtomicBool::new(false),
        })
    };
    (end(from_b, to_b, "link://a"), end(from_a, to_a, "link://b"))
}

impl Link {
    /// Every envelope this end sent, in order.
    pub fn wire(&self) -> Vec<Envelope> {
        self.wire.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Every settlement this end was given, in order.
    pub fn settled(&self) -> Vec<Settlement> {
        self.settled.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Whether `close` was called.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }
}

#[async_trait]
impl Transport for Link {
    fn info(&self) -> TransportInfo {
        self.info.clone()
    }

    async fn send(&self, _address: &str, envelope: Envelope) -> Result<(), PluginError> {
        if envelope.payload.len() as u64 > self.info.max_message_size {
            return Err(PluginError::new(ErrorCode::TOO_LARGE, "too large for the link"));
        }
        self.wire.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(envelope.clone());
        let acknowledging = self.info.capabilities.contains(Capabilities::ACKNOWLEDGEMENTS);
        let delivery_tag = if acknowledging { self.next_tag.fetch_add(1, Ordering::Relaxed) } else { 0 };
        self.peer
            .send(Inbound { envelope, delivery_tag })
            .await
            .map_err(|_| PluginError::new(ErrorCode::UNREACHABLE, "peer gone"))
    }

    /// Waits for one message, then takes what waits behind it, up to `max_batch`; empty once
    /// the other end is gone.
    async fn receive(&self, max_batch: usize) -> Result<Vec<Inbound>, PluginError> {
        let mut inbound = self.inbound.lock().await;
        let Some(first) = inbound.recv().await else { return Ok(Vec::new()) };
        let mut batch = vec![first];
        while batch.len() < max_batch {
            match inbound.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        Ok(batch)
    }

    async fn settle(&self, settlements: Vec<Settlement>) -> Result<(), PluginError> {
        self.settled.lock().unwrap_or_else(std::sync::PoisonError::into_inner).extend(settlements);
        Ok(())
    }

    async fn close(&self) -> Result<(), PluginError> {
        self.closed.store(true, Ordering::Relaxed);
        Ok(())
    }
}
