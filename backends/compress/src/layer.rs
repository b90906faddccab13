//! The compress layer as a transport: compresses on the way down, decompresses on the way up.

use crate::{codec, CompressConfig, BLOCKING_THRESHOLD, HEADER, ZSTD};
use comms_plugin_api::{
    async_trait, log_rate::LogRateLimit, Capabilities, Envelope, ErrorCode, Inbound, Outbound, Payload,
    PluginError, SendFailure, Settlement, SettlementOutcome, Transport, TransportInfo, TransportStats,
};
use std::sync::{
    atomic::{AtomicU64, Ordering::Relaxed},
    Arc,
};

/// Counters reported in [`Transport::stats`] with the prefix `compress.`.
#[derive(Debug, Default)]
struct Counters {
    messages_compressed: AtomicU64,
    bytes_before: AtomicU64,
    bytes_after: AtomicU64,
    not_smaller: AtomicU64,
    messages_decompressed: AtomicU64,
    decompress_failures: AtomicU64,
}

/// One refused message per line, a few lines per interval: a peer can send many.
static REFUSED: LogRateLimit = LogRateLimit::standard();

/// The layer over one inner transport. See the crate documentation.
pub struct CompressLayer {
    inner: Arc<dyn Transport>,
    info: TransportInfo,
    threshold: u64,
    level: i32,
    /// What this layer sends and what a compressed message may decompress to.
    max_message_size: u64,
    /// The inner transport settles: refused messages are settled as discarded.
    acknowledging: bool,
    counters: Counters,
}

impl std::fmt::Debug for CompressLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompressLayer").field("info", &self.info).finish_non_exhaustive()
    }
}

impl CompressLayer {
    /// The layer over `inner` with a validated `config`.
    pub fn new(inner: Arc<dyn Transport>, config: &CompressConfig) -> Result<Self, PluginError> {
        config.validate()?;
        let mut info = inner.info();
        let max_message_size = config.max_message_size.unwrap_or(info.max_message_size);
        info.max_message_size = max_message_size;
        let acknowledging = info.capabilities.contains(Capabilities::ACKNOWLEDGEMENTS);
        Ok(Self {
            inner,
            info,
            threshold: config.threshold,
            level: config.level,
            max_message_size,
            acknowledging,
            counters: Counters::default(),
        })
    }

    /// `envelope` as it goes to the inner transport: compressed if it is at least `threshold`
    /// bytes and compression makes it smaller.
    async fn pack(&self, mut envelope: Envelope) -> Result<Envelope, PluginError> {
        let size = envelope.payload.len() as u64;
        if size > self.max_message_size {
            return Err(PluginError::new(
                ErrorCode::TOO_LARGE,
                format!(
                    "compress layer: payload of {size} bytes exceeds max_message_size {}",
                    self.max_message_size
                ),
            ));
        }
        // A header already there means a compress layer above did it: compressing twice gains
        // nothing, and a second header would be ambiguous.
        if size < self.threshold || envelope.headers.get(HEADER).is_some() {
            return Ok(envelope);
        }
        let level = self.level;
        let compressed = if size >= BLOCKING_THRESHOLD {
            // Megabytes of zstd would hold a runtime thread for milliseconds or more.
            let payload = envelope.payload.clone();
            tokio::task::spawn_blocking(move || codec::compress(&payload, level)).await.unwrap_or_else(
                |error| {
                    tracing::warn!("compress layer: compression task failed ({error}); sending uncompressed");
                    None
                },
            )
        } else {
            codec::compress(&envelope.payload, level)
        };
        match compressed {
            Some(bytes) => {
                self.counters.messages_compressed.fetch_add(1, Relaxed);
                self.counters.bytes_before.fetch_add(size, Relaxed);
                self.counters.bytes_after.fetch_add(bytes.len() as u64, Relaxed);
                envelope.payload = Payload::from_vec(bytes);
                envelope.headers.push(HEADER, ZSTD);
            }
            None => {
                self.counters.not_smaller.fetch_add(1, Relaxed);
            }
        }
        Ok(envelope)
    }

    /// `envelope` as it goes up: decompressed and without the header, or why it is refused.
    async fn unpack(&self, mut envelope: Envelope) -> Result<Envelope, String> {
        let Some(method) = envelope.headers.get(HEADER) else {
            return Ok(envelope);
        };
        if method != ZSTD {
            return Err(format!("unknown compression `{method}` in header `{HEADER}`"));
        }
        let limit = self.max_message_size;
        let decompressed = if codec::is_heavy(&envelope.payload, BLOCKING_THRESHOLD) {
            let payload = envelope.payload.clone();
            tokio::task::spawn_blocking(move || codec::decompress(&payload, limit))
                .await
                .map_err(|error| format!("decompression task failed: {error}"))?
        } else {
            codec::decompress(&envelope.payload, limit)
        };
        let bytes =
            decompressed.map_err(|error| format!("{} compressed bytes: {error}", envelope.payload.len()))?;
        envelope.payload = Payload::from_vec(bytes);
        envelope.headers.remove(HEADER);
        self.counters.messages_decompressed.fetch_add(1, Relaxed);
        Ok(envelope)
    }
}

#[async_trait]
impl Transport for CompressLayer {
    fn info(&self) -> TransportInfo {
        self.info.clone()
    }

    async fn send(&self, address: &str, envelope: Envelope) -> Result<(), PluginError> {
        let envelope = self.pack(envelope).await?;
        self.inner.send(address, envelope).await
    }

    /// Compresses every item, then hands the batch down as one; positions are kept.
    async fn send_batch(&self, batch: Vec<Outbound>) -> Vec<SendFailure> {
        let mut failures = Vec::new();
        let mut packed = Vec::with_capacity(batch.len());
        // Positions in `batch` of the items in `packed`.
        let mut positions = Vec::with_capacity(batch.len());
        for (index, Outbound { address, envelope }) in batch.into_iter().enumerate() {
            match self.pack(envelope).await {
                Ok(envelope) => {
                    positions.push(index);
                    packed.push(Outbound { address, envelope });
                }
                Err(error) => failures.push(SendFailure { index, error }),
            }
        }
        if !packed.is_empty() {
            for failure in self.inner.send_batch(packed).await {
                if let Some(&index) = positions.get(failure.index) {
                    failures.push(SendFailure { index, error: failure.error });
                }
            }
        }
        failures.sort_by_key(|failure| failure.index);
        failures
    }

    /// Decompresses what carries the header. A message that cannot be (a zip bomb over
    /// `max_message_size`, corrupt bytes, an unknown method) is dropped, counted and logged; with
    /// an acknowledging inner transport it is settled as discarded (it would fail again).
    async fn receive(&self, max_batch: usize) -> Result<Vec<Inbound>, PluginError> {
        loop {
            let batch = self.inner.receive(max_batch).await?;
            if batch.is_empty() {
                return Ok(batch);
            }
            let mut out = Vec::with_capacity(batch.len());
            let mut refused = Vec::new();
            for Inbound { envelope, delivery_tag } in batch {
                let (id, from) = (envelope.id, envelope.from.clone());
                match self.unpack(envelope).await {
                    Ok(envelope) => out.push(Inbound { envelope, delivery_tag }),
                    Err(reason) => {
                        self.counters.decompress_failures.fetch_add(1, Relaxed);
                        if let Some(repeats) = REFUSED.check() {
                            tracing::warn!(
                                "compress layer: dropped message {id} from {from}: {reason}{repeats}"
                            );
                        }
                        if self.acknowledging {
                            refused.push(Settlement {
                                delivery_tag,
                                outcome: SettlementOutcome::REJECTED_DISCARD,
                            });
                        }
                    }
                }
            }
            if !refused.is_empty() {
                if let Err(error) = self.inner.settle(refused).await {
                    tracing::warn!("compress layer: cannot settle refused messages: {}", error.message);
                }
            }
            // An empty batch would tell the host the transport is closed: wait for more instead.
            if !out.is_empty() {
                return Ok(out);
            }
        }
    }

    /// Tags are the inner transport's own: passed through.
    async fn settle(&self, settlements: Vec<Settlement>) -> Result<(), PluginError> {
        self.inner.settle(settlements).await
    }

    async fn subscribe(&self, pattern: &str) -> Result<(), PluginError> {
        self.inner.subscribe(pattern).await
    }

    async fn unsubscribe(&self, pattern: &str) -> Result<(), PluginError> {
        self.inner.unsubscribe(pattern).await
    }

    /// The inner transport's statistics, plus the `compress.` counters; refused messages count
    /// as errors.
    fn stats(&self) -> TransportStats {
        let mut stats = self.inner.stats();
        let counters = &self.counters;
        let failures = counters.decompress_failures.load(Relaxed);
        stats.errors += failures;
        stats.counters.extend([
            ("compress.messages_compressed".to_string(), counters.messages_compressed.load(Relaxed)),
            ("compress.bytes_before".to_string(), counters.bytes_before.load(Relaxed)),
            ("compress.bytes_after".to_string(), counters.bytes_after.load(Relaxed)),
            ("compress.messages_not_smaller".to_string(), counters.not_smaller.load(Relaxed)),
            ("compress.messages_decompressed".to_string(), counters.messages_decompressed.load(Relaxed)),
            ("compress.decompress_failures".to_string(), failures),
        ]);
        stats
    }

    /// Nothing is held here: closes the inner transport.
    async fn close(&self) -> Result<(), PluginError> {
        self.inner.close().await
    }
}
