//! The chunk layer as a transport: splits on the way down, reassembles on the way up.

use crate::{
    part::{self, Layout, HEADER},
    reassembly::{self, Complete, Handled, Reassembler},
    Settings,
};
use comms_plugin_api::{
    async_trait, log_rate::LogRateLimit, Envelope, ErrorCode, Inbound, MessageId, Outbound, PluginError,
    SendFailure, Settlement, Transport, TransportInfo, TransportStats,
};
use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc, Mutex, MutexGuard,
    },
    time::Instant,
};
use tokio::{sync::watch, task::JoinHandle};

/// Parts handed to the inner transport in one `send_batch`, at most: about this many bytes.
const BATCH_BYTES: u64 = 8 << 20;
/// And at most this many parts.
const BATCH_PARTS: u64 = 64;
/// Bytes of parts copied into reassembly buffers between two yields of `receive`, so that one
/// poll never copies a whole batch of large parts.
const COPY_BYTES_PER_POLL: u64 = 16 << 20;

/// One refused or malformed part per line, a few lines per interval: a peer can send many.
static DROPPED_PARTS: LogRateLimit = LogRateLimit::standard();
static EXPIRED: LogRateLimit = LogRateLimit::standard();
static SETTLE_FAILED: LogRateLimit = LogRateLimit::standard();

/// Counters of the sending side, reported with the prefix `chunk.`.
#[derive(Debug, Default)]
struct SendCounters {
    messages_split: AtomicU64,
    parts_sent: AtomicU64,
}

/// State shared with the timer task.
struct Shared {
    inner: Arc<dyn Transport>,
    machine: Mutex<Reassembler>,
}

impl Shared {
    fn machine(&self) -> MutexGuard<'_, Reassembler> {
        // Counters and buffers: every update completes before anything can panic.
        self.machine.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Settles `settlements` on the inner transport in the background: nothing waits for it, so
    /// `receive` never holds on to messages it has taken.
    fn settle_in_background(self: &Arc<Self>, settlements: Vec<Settlement>) {
        if settlements.is_empty() {
            return;
        }
        let shared = Arc::clone(self);
        tokio::spawn(async move {
            if let Err(error) = shared.inner.settle(settlements).await {
                if let Some(repeats) = SETTLE_FAILED.check() {
                    tracing::warn!("chunk layer: cannot settle parts: {}{repeats}", error.message);
                }
            }
        });
    }

    /// Drops what expired at `now`, logging it, and settles its parts.
    fn expire(self: &Arc<Self>, now: Instant) {
        let (expired, settlements) = {
            let mut machine = self.machine();
            (machine.handle_timeout(now), machine.take_settlements())
        };
        if expired > 0 {
            if let Some(repeats) = EXPIRED.check() {
                tracing::warn!(
                    "chunk layer: dropped {expired} incomplete message(s): no new part within \
                     reassembly_timeout_ms{repeats}"
                );
            }
        }
        self.settle_in_background(settlements);
    }
}

/// The layer over one inner transport. See the crate documentation.
pub struct ChunkLayer {
    shared: Arc<Shared>,
    info: TransportInfo,
    part_size: u64,
    acknowledging: bool,
    /// Fresh ids for parts: a random high half, a counter in the low half.
    id_high: u64,
    next_part: AtomicU64,
    /// Delivery tags handed up, and the inner tags of their parts.
    tags: Mutex<HashMap<u64, Vec<u64>>>,
    next_tag: AtomicU64,
    counters: SendCounters,
    closing: watch::Sender<bool>,
    timer: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for ChunkLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkLayer").field("info", &self.info).field("part_size", &self.part_size).finish()
    }
}

impl Drop for ChunkLayer {
    fn drop(&mut self) {
        if let Some(timer) = self.timer.get_mut().unwrap_or_else(|poisoned| poisoned.into_inner()).take() {
            timer.abort();
        }
    }
}

impl ChunkLayer {
    /// The layer over `inner` with resolved `settings`; starts the task that drops expired
    /// messages, so it must run inside a tokio runtime.
    pub fn new(inner: Arc<dyn Transport>, settings: Settings) -> Self {
        let mut info = inner.info();
        info.max_message_size = settings.max_message_size;
        let acknowledging = settings.acknowledging;
        let machine = Reassembler::new(reassembly::Config {
            max_message_size: settings.max_message_size,
            max_reassembly_bytes: settings.max_reassembly_bytes,
            timeout: settings.reassembly_timeout,
            acknowledging,
        });
        let shared = Arc::new(Shared { inner, machine: Mutex::new(machine) });
        let closing = watch::channel(false).0;
        let timer = tokio::spawn(expire_on_time(
            Arc::clone(&shared),
            closing.subscribe(),
            settings.reassembly_timeout,
        ));
        Self {
            shared,
            info,
            part_size: settings.part_size,
            acknowledging,
            id_high: random_u64(),
            next_part: AtomicU64::new(0),
            tags: Mutex::new(HashMap::new()),
            next_tag: AtomicU64::new(1),
            counters: SendCounters::default(),
            closing,
            timer: Mutex::new(Some(timer)),
        }
    }

    fn inner(&self) -> &Arc<dyn Transport> {
        &self.shared.inner
    }

    fn tags(&self) -> MutexGuard<'_, HashMap<u64, Vec<u64>>> {
        self.tags.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// What `send` refuses before anything is sent.
    fn check(&self, envelope: &Envelope) -> Result<(), PluginError> {
        let size = envelope.payload.len() as u64;
        let max = self.info.max_message_size;
        if size > max {
            return Err(PluginError::new(
                ErrorCode::TOO_LARGE,
                format!("chunk layer: payload of {size} bytes exceeds max_message_size {max}"),
            ));
        }
        if size > self.part_size && envelope.headers.get(HEADER).is_some() {
            return Err(PluginError::unsupported(format!(
                "chunk layer: message {} is already a part (header `{HEADER}`): are two chunk layers stacked?",
                envelope.id
            )));
        }
        Ok(())
    }

    /// Sends `envelope` as parts, in order, in batches of bounded size, each batch taken by the
    /// inner transport before the next is made: the sender holds the original payload and the
    /// headers of one batch, nothing more.
    async fn send_parts(&self, address: &str, envelope: Envelope) -> Result<(), PluginError> {
        let layout = Layout::cut(envelope.payload.len() as u64, self.part_size);
        let per_batch = (BATCH_BYTES / layout.part_len.max(1)).clamp(1, BATCH_PARTS);
        self.counters.messages_split.fetch_add(1, Relaxed);
        let mut index = 0;
        while index < layout.count {
            let end = (index + per_batch).min(layout.count);
            let mut batch = Vec::with_capacity((end - index) as usize);
            for part_index in index..end {
                let part = part::part(&envelope, &layout, part_index, self.part_id()).ok_or_else(|| {
                    PluginError::new(
                        ErrorCode::OTHER,
                        format!("chunk layer: part {part_index} out of bounds"),
                    )
                })?;
                batch.push(Outbound { address: address.into(), envelope: part });
            }
            if let Some(failure) = self.inner().send_batch(batch).await.into_iter().next() {
                let failed = index + failure.index as u64;
                let message = format!(
                    "chunk layer: part {failed} of {} of message {} ({} bytes) was not sent: {}",
                    layout.count, envelope.id, layout.total, failure.error.message
                );
                return Err(PluginError { message, ..failure.error });
            }
            self.counters.parts_sent.fetch_add(end - index, Relaxed);
            index = end;
        }
        Ok(())
    }

    fn part_id(&self) -> MessageId {
        let low = self.next_part.fetch_add(1, Relaxed);
        MessageId::from_u128((u128::from(self.id_high) << 64) | u128::from(low))
    }

    /// A message going up, with a tag of this layer's standing for `inner_tags` (0 without
    /// acknowledgements).
    fn up(&self, envelope: Envelope, inner_tags: Vec<u64>) -> Inbound {
        if !self.acknowledging {
            return Inbound { envelope, delivery_tag: 0 };
        }
        let delivery_tag = self.next_tag.fetch_add(1, Relaxed);
        self.tags().insert(delivery_tag, inner_tags);
        Inbound { envelope, delivery_tag }
    }

    /// Sends the small items gathered in `pending` as one batch, recording failures at their
    /// positions in the caller's batch.
    async fn flush(&self, pending: &mut Vec<(usize, Outbound)>, failures: &mut Vec<SendFailure>) {
        if pending.is_empty() {
            return;
        }
        let (positions, batch): (Vec<usize>, Vec<Outbound>) = std::mem::take(pending).into_iter().unzip();
        for failure in self.inner().send_batch(batch).await {
            if let Some(&index) = positions.get(failure.index) {
                failures.push(SendFailure { index, error: failure.error });
            }
        }
    }
}

#[async_trait]
impl Transport for ChunkLayer {
    fn info(&self) -> TransportInfo {
        self.info.clone()
    }

    async fn send(&self, address: &str, envelope: Envelope) -> Result<(), PluginError> {
        self.check(&envelope)?;
        if envelope.payload.len() as u64 <= self.part_size {
            return self.inner().send(address, envelope).await;
        }
        self.send_parts(address, envelope).await
    }

    /// Small items go down in batches as they come; a large one is sent as its parts, in its
    /// place, so the order per address is kept.
    async fn send_batch(&self, batch: Vec<Outbound>) -> Vec<SendFailure> {
        let mut failures = Vec::new();
        let mut pending = Vec::new();
        for (index, Outbound { address, envelope }) in batch.into_iter().enumerate() {
            if let Err(error) = self.check(&envelope) {
                failures.push(SendFailure { index, error });
                continue;
            }
            if envelope.payload.len() as u64 <= self.part_size {
                pending.push((index, Outbound { address, envelope }));
                continue;
            }
            self.flush(&mut pending, &mut failures).await;
            if let Err(error) = self.send_parts(&address, envelope).await {
                failures.push(SendFailure { index, error });
            }
        }
        self.flush(&mut pending, &mut failures).await;
        failures.sort_by_key(|failure| failure.index);
        failures
    }

    /// Hands up messages without the part header as they are, and each message whose last part
    /// arrived; parts go into reassembly. Waits for more rather than returning an empty batch
    /// (which would tell the host the transport is closed).
    async fn receive(&self, max_batch: usize) -> Result<Vec<Inbound>, PluginError> {
        loop {
            let batch = self.inner().receive(max_batch).await?;
            if batch.is_empty() {
                return Ok(batch);
            }
            let now = Instant::now();
            let mut out = Vec::new();
            let mut copied = 0;
            for Inbound { envelope, delivery_tag } in batch {
                if envelope.headers.get(HEADER).is_none() {
                    out.push(self.up(envelope, vec![delivery_tag]));
                    continue;
                }
                let size = envelope.payload.len() as u64;
                let handled = self.shared.machine().handle_part(now, envelope, delivery_tag);
                match handled {
                    Handled::Complete(complete) => {
                        let Complete { envelope, inner_tags } = *complete;
                        out.push(self.up(envelope, inner_tags));
                    }
                    Handled::Held | Handled::Duplicate => {}
                    Handled::Refused(reason) | Handled::Malformed(reason) => {
                        if let Some(repeats) = DROPPED_PARTS.check() {
                            tracing::warn!("chunk layer: dropped a part: {reason}{repeats}");
                        }
                    }
                }
                copied += size;
                if copied >= COPY_BYTES_PER_POLL {
                    copied = 0;
                    tokio::task::yield_now().await;
                }
            }
            self.shared.expire(now);
            if !out.is_empty() {
                return Ok(out);
            }
        }
    }

    /// The host's outcome for a message applies to every part it was made of.
    async fn settle(&self, settlements: Vec<Settlement>) -> Result<(), PluginError> {
        if !self.acknowledging {
            return Ok(());
        }
        let inner: Vec<Settlement> = {
            let mut tags = self.tags();
            settlements
                .iter()
                .filter_map(|settlement| {
                    tags.remove(&settlement.delivery_tag).map(|inner| (inner, settlement.outcome))
                })
                .flat_map(|(inner, outcome)| {
                    inner.into_iter().map(move |delivery_tag| Settlement { delivery_tag, outcome })
                })
                .collect()
        };
        if inner.is_empty() {
            return Ok(());
        }
        self.inner().settle(inner).await
    }

    async fn subscribe(&self, pattern: &str) -> Result<(), PluginError> {
        self.inner().subscribe(pattern).await
    }

    async fn unsubscribe(&self, pattern: &str) -> Result<(), PluginError> {
        self.inner().unsubscribe(pattern).await
    }

    /// The inner transport's statistics, plus the `chunk.` counters; parts dropped (malformed,
    /// refused) and messages expired count as errors.
    fn stats(&self) -> TransportStats {
        let mut stats = self.inner().stats();
        let machine = self.shared.machine().stats().clone();
        stats.errors += machine.malformed_parts + machine.refused_parts + machine.expired_messages;
        stats.counters.extend([
            ("chunk.messages_split".to_string(), self.counters.messages_split.load(Relaxed)),
            ("chunk.parts_sent".to_string(), self.counters.parts_sent.load(Relaxed)),
            ("chunk.parts_received".to_string(), machine.parts_received),
            ("chunk.messages_reassembled".to_string(), machine.messages_reassembled),
            ("chunk.duplicate_parts".to_string(), machine.duplicate_parts),
            ("chunk.malformed_parts".to_string(), machine.malformed_parts),
            ("chunk.refused_parts".to_string(), machine.refused_parts),
            ("chunk.partial_messages_dropped".to_string(), machine.expired_messages),
            ("chunk.partial_messages".to_string(), machine.partial_messages),
            ("chunk.bytes_held".to_string(), machine.bytes_held),
            ("chunk.bytes_held_peak".to_string(), machine.bytes_held_peak),
        ]);
        stats
    }

    /// Stops the timer, settles the parts held for redelivery (they can complete at the next
    /// consumer), then closes the inner transport.
    async fn close(&self) -> Result<(), PluginError> {
        self.closing.send_replace(true);
        let settlements = {
            let mut machine = self.shared.machine();
            machine.abandon_all();
            machine.take_settlements()
        };
        if !settlements.is_empty() {
            if let Err(error) = self.inner().settle(settlements).await {
                tracing::warn!("chunk layer: cannot requeue the parts held at close: {}", error.message);
            }
        }
        self.inner().close().await
    }
}

/// Drops expired messages on time even when no part arrives (their parts then get settled, and
/// their bytes freed).
async fn expire_on_time(
    shared: Arc<Shared>,
    mut closing: watch::Receiver<bool>,
    timeout: std::time::Duration,
) {
    loop {
        // A message started later expires later than `now + timeout`, so this wakes in time.
        let deadline = shared.machine().poll_timeout().unwrap_or_else(|| Instant::now() + timeout);
        tokio::select! {
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)) => {}
            _ = closing.wait_for(|closing| *closing) => return,
        }
        shared.expire(Instant::now());
    }
}

/// A number that differs between layers and runs, from std's randomly keyed hasher (no
/// dependency needed for 64 random bits that only have to differ).
fn random_u64() -> u64 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one((std::process::id(), Instant::now()))
}
