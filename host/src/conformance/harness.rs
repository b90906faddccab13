//! What a case works with: fresh transport instances ([`Endpoint`]s), a task per receiving
//! instance that hands its messages to the case ([`Inbox`]), unique names, and the case's
//! deadlines. The harness remembers everything it opened and closes it after the case.

use super::SuiteConfig;
use comms_plugin_api::{
    host_side::{BlockingPoll, LoadedTransport, PluginLibrary},
    security::PublicKey,
    Capabilities, Destination, Envelope, ErrorCode, Inbound, MessageId, NodeId, PluginError, Settlement,
    SettlementOutcome, TransportInfo,
};
use futures::future::join_all;
use std::{
    future::Future,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, OnceLock,
    },
    time::Duration,
};
use tokio::{sync::mpsc, task::JoinHandle, time::Instant};

/// Largest batch an inbox asks the transport for.
const RECEIVE_BATCH: u32 = 256;

/// Messages an inbox holds for the case before its receive task waits (backpressure reaches the
/// transport, which is what a host does too).
const INBOX_CAPACITY: usize = 1024;

/// Why a case did not pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CaseError {
    /// A check failed.
    Failed(String),
    /// The case found out while running that it does not apply.
    Skipped(String),
}

/// What a case returns.
pub(crate) type CaseResult = Result<(), CaseError>;

/// A failed check.
pub(crate) fn failed(reason: impl Into<String>) -> CaseError {
    CaseError::Failed(reason.into())
}

/// Fails the case with a formatted reason unless the condition holds.
macro_rules! ensure {
    ($condition:expr, $($reason:tt)+) => {
        if !$condition {
            return Err($crate::conformance::harness::failed(format!($($reason)+)));
        }
    };
}
pub(crate) use ensure;

/// Runs `future`, failing the case if it takes longer than `limit`; `what` completes
/// "... did not finish within 5 s".
pub(crate) async fn within<T>(
    what: &str,
    limit: Duration,
    future: impl Future<Output = T>,
) -> Result<T, CaseError> {
    tokio::time::timeout(limit, future)
        .await
        .map_err(|_| failed(format!("{what} did not finish within {}", seconds(limit))))
}

/// `2.5 s`, or `40 ms` below a second.
pub(crate) fn seconds(duration: Duration) -> String {
    if duration < Duration::from_secs(1) {
        format!("{} ms", duration.as_millis())
    } else {
        format!("{} s", (duration.as_secs_f64() * 10.0).round() / 10.0)
    }
}

/// Text unique to this process and run, safe in node ids, socket paths and topic segments.
fn process_nonce() -> &'static str {
    static NONCE: OnceLock<String> = OnceLock::new();
    NONCE.get_or_init(|| format!("{:x}{:06x}", std::process::id(), rand::random::<u32>() & 0xff_ffff))
}

static SEQUENCE: AtomicU64 = AtomicU64::new(0);

/// `conf-<nonce>-<n>`: never handed out before in this process.
fn unique_prefix() -> String {
    format!("conf-{}-{}", process_nonce(), SEQUENCE.fetch_add(1, Ordering::Relaxed))
}

/// A name never handed out before in this process, `conf-<nonce>-<n>-<role>`.
pub(crate) fn unique_name(role: &str) -> String {
    format!("{}-{role}", unique_prefix())
}

/// A node id never handed out before in this process: `conf-<nonce>-<n>-<role>`, or, bound to
/// `key`, `conf-<nonce>-<n>-<hex>` (the role left out: socket paths derived from the id must
/// stay under 108 bytes).
pub(crate) fn unique_node_id(role: &str, key: Option<&PublicKey>) -> NodeId {
    match key {
        None => NodeId::new(unique_name(role)),
        Some(key) => key.node_id(Some(&unique_prefix())),
    }
}

/// A message id never used before in this process (random high half per process).
pub(crate) fn fresh_message_id() -> MessageId {
    static HIGH: OnceLock<u64> = OnceLock::new();
    let high = *HIGH.get_or_init(rand::random);
    MessageId { high, low: SEQUENCE.fetch_add(1, Ordering::Relaxed) }
}

/// An envelope from `from` to `to` with a fresh id, no correlation id and no headers.
pub(crate) fn envelope(from: &Endpoint, to: Destination, payload: Vec<u8>) -> Envelope {
    Envelope::new(fresh_message_id(), from.node.clone(), to, payload)
}

/// Payload made of big-endian `u32`s, so a receiver can tell who sent what to whom.
pub(crate) fn tag_payload(numbers: &[u32]) -> Vec<u8> {
    numbers.iter().flat_map(|n| n.to_be_bytes()).collect()
}

/// The `u32`s of a [`tag_payload`], or `None` if the payload is not `N` of them.
pub(crate) fn read_tag<const N: usize>(payload: &[u8]) -> Option<[u32; N]> {
    if payload.len() != 4 * N {
        return None;
    }
    let mut numbers = [0; N];
    for (number, chunk) in numbers.iter_mut().zip(payload.chunks_exact(4)) {
        *number = u32::from_be_bytes(chunk.try_into().ok()?);
    }
    Some(numbers)
}

/// `len` bytes that look random (xorshift from `seed`): every byte value, no pattern a
/// transport could compress away or get right by accident.
pub(crate) fn pseudo_random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut bytes = Vec::with_capacity(len + 8);
    while bytes.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        bytes.extend_from_slice(&state.to_le_bytes());
    }
    bytes.truncate(len);
    bytes
}

/// Waits for `receiving` while `sending` runs: a send error ends the wait at once (it explains
/// more than the messages that then never arrive). Returns what `receiving` produced and
/// whether every send had returned by then.
pub(crate) async fn while_sending<T>(
    sending: impl Future<Output = CaseResult>,
    receiving: impl Future<Output = Result<T, CaseError>>,
) -> Result<(T, bool), CaseError> {
    tokio::pin!(sending, receiving);
    let mut sent = false;
    loop {
        tokio::select! {
            result = &mut sending, if !sent => {
                result?;
                sent = true;
            }
            result = &mut receiving => return Ok((result?, sent)),
        }
    }
}

/// `12 of 500 missing (3, 17, 18, ...)`: what a failure says about numbers that did not arrive.
pub(crate) fn describe_missing(expected: usize, missing: &[u32]) -> String {
    const SHOWN: usize = 8;
    let mut listed: Vec<String> = missing.iter().take(SHOWN).map(u32::to_string).collect();
    if missing.len() > SHOWN {
        listed.push("...".into());
    }
    format!("{} of {expected} missing ({})", missing.len(), listed.join(", "))
}

/// One transport instance opened for a case, with the node id it serves.
pub(crate) struct Endpoint {
    /// The node id it was created for (unique unless the case reopened a node on purpose).
    pub(crate) node: NodeId,
    /// What the case calls it, for failure messages (`receiver`, `sender 3`).
    pub(crate) role: String,
    transport: LoadedTransport,
    closed: AtomicBool,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint").field("node", &self.node).field("role", &self.role).finish_non_exhaustive()
    }
}

impl Endpoint {
    /// The address other instances send to.
    pub(crate) fn address(&self) -> &str {
        &self.transport.info().local_address
    }

    /// What the instance declared.
    pub(crate) fn info(&self) -> &TransportInfo {
        self.transport.info()
    }

    /// The transport itself, for cases that call it directly.
    pub(crate) fn transport(&self) -> &LoadedTransport {
        &self.transport
    }

    /// Sends to `address`; errors are the transport's.
    pub(crate) async fn send(&self, address: &str, envelope: Envelope) -> Result<(), PluginError> {
        self.transport.send(address, envelope).await
    }

    /// Sends to another endpoint; an error fails the case, naming both ends.
    pub(crate) async fn send_to(&self, to: &Endpoint, envelope: Envelope) -> CaseResult {
        self.transport.send(to.address(), envelope).await.map_err(|error| {
            failed(format!("{} could not send to {} at {}: {error}", self.role, to.role, to.address()))
        })
    }

    /// Closes the instance; the harness will not close it again.
    pub(crate) async fn close(&self) -> Result<(), PluginError> {
        self.closed.store(true, Ordering::Release);
        self.transport.close().await
    }
}

/// Whether an inbox settles what it receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settling {
    /// Settles every message as accepted once it is in the inbox (when the transport has
    /// acknowledgements), as a host does.
    AcceptAll,
    /// The case settles by itself.
    ByCase,
}

/// The messages one endpoint receives, fed by a task that calls `receive` in a loop until the
/// transport returns an empty batch (closed) or an error.
#[derive(Debug)]
pub(crate) struct Inbox {
    role: String,
    messages: mpsc::Receiver<Result<Inbound, PluginError>>,
    ended: bool,
}

impl Inbox {
    /// The next message, or `None` once `deadline` passes or the transport has ended its stream
    /// (returned an empty batch: it is closed). A receive error fails the case.
    pub(crate) async fn next_before(&mut self, deadline: Instant) -> Result<Option<Inbound>, CaseError> {
        if self.ended {
            return Ok(None);
        }
        match tokio::time::timeout_at(deadline, self.messages.recv()).await {
            Err(_) => Ok(None),
            Ok(None) => {
                self.ended = true;
                Ok(None)
            }
            Ok(Some(Ok(inbound))) => Ok(Some(inbound)),
            Ok(Some(Err(error))) => {
                self.ended = true;
                Err(failed(format!("receive on {} failed: {error}", self.role)))
            }
        }
    }

    /// Receives until `wanted` messages arrived, the deadline passed or the stream ended.
    pub(crate) async fn collect(
        &mut self,
        wanted: usize,
        deadline: Instant,
    ) -> Result<Vec<Inbound>, CaseError> {
        let mut received = Vec::with_capacity(wanted);
        while received.len() < wanted {
            match self.next_before(deadline).await? {
                Some(inbound) => received.push(inbound),
                None => break,
            }
        }
        Ok(received)
    }

    /// Fails if anything arrives within [`super::QUIET_PERIOD`]; `context` says why nothing
    /// should.
    pub(crate) async fn expect_nothing(&mut self, context: &str) -> CaseResult {
        let deadline = Instant::now() + super::QUIET_PERIOD;
        match self.next_before(deadline).await? {
            None => Ok(()),
            Some(inbound) => Err(failed(format!(
                "{} received message {} ({} bytes) although {context}",
                self.role,
                inbound.envelope.id,
                inbound.envelope.payload.len()
            ))),
        }
    }

    /// Who receives here, for failure messages.
    pub(crate) fn role(&self) -> &str {
        &self.role
    }

    /// Whether the transport ended the stream (returned an empty batch) or failed it.
    pub(crate) fn ended(&self) -> bool {
        self.ended
    }
}

/// `plugin spool blocked a thread for 5.0 s in receive: use tokio::time or spawn_blocking`: what
/// the host's poll watch logs, and what the suite reports.
pub(crate) fn describe_blocking(plugin: &str, blocked: &BlockingPoll) -> String {
    format!(
        "plugin {plugin} blocked a thread for {:.1} s in {}: use tokio::time or spawn_blocking",
        blocked.duration.as_secs_f64(),
        blocked.operation
    )
}

/// Everything one case uses; see the module docs.
#[derive(Debug)]
pub(crate) struct Harness {
    library: PluginLibrary,
    config_toml: String,
    layers: Vec<super::SuiteLayer>,
    node_key: Option<PublicKey>,
    info: Option<TransportInfo>,
    assume: Capabilities,
    case_timeout: Duration,
    blocking_poll_limit: Duration,
    started: Instant,
    opened: Mutex<Vec<Arc<Endpoint>>>,
    /// Every instance the case opened, closed or not: their poll watches.
    every: Mutex<Vec<Arc<Endpoint>>>,
    receivers: Mutex<Vec<JoinHandle<()>>>,
    notes: Mutex<Vec<String>>,
    found: Mutex<Option<TransportInfo>>,
    /// The longest blocking poll of the cases before this one, and the case.
    earlier_blocking: Option<(BlockingPoll, &'static str)>,
}

impl Harness {
    /// A harness for one case. `info` is what the first instance declared (`None` while that
    /// is being found out).
    pub(crate) fn new(library: &PluginLibrary, config: &SuiteConfig, info: Option<TransportInfo>) -> Self {
        Self {
            library: library.clone(),
            config_toml: config.config_toml.clone(),
            layers: config.layers.clone(),
            node_key: config.node_key,
            info,
            assume: config.assume,
            case_timeout: config.case_timeout,
            blocking_poll_limit: config.blocking_poll_limit,
            started: Instant::now(),
            opened: Mutex::new(Vec::new()),
            every: Mutex::new(Vec::new()),
            receivers: Mutex::new(Vec::new()),
            notes: Mutex::new(Vec::new()),
            found: Mutex::new(None),
            earlier_blocking: None,
        }
    }

    /// Tells the harness the longest blocking poll of the cases that ran before it.
    pub(crate) fn with_earlier_blocking(mut self, earlier: Option<(BlockingPoll, &'static str)>) -> Self {
        self.earlier_blocking = earlier;
        self
    }

    /// The longest blocking poll of the cases that ran before this one, and in which case.
    pub(crate) fn earlier_blocking(&self) -> Option<(BlockingPoll, &'static str)> {
        self.earlier_blocking
    }

    /// The plugin's name, as reports use it.
    pub(crate) fn plugin_name(&self) -> &str {
        &self.library.description().name
    }

    /// Capabilities the transport declared, and those the suite was told to assume.
    pub(crate) fn capabilities(&self) -> Capabilities {
        self.info.as_ref().map_or(Capabilities::NONE, |info| info.capabilities) | self.assume
    }

    /// The poll that a case fails for: held a thread at least this long.
    pub(crate) fn blocking_poll_limit(&self) -> Duration {
        self.blocking_poll_limit
    }

    /// The longest poll of any instance this case opened that held the host's thread (over
    /// the poll watch's threshold), if one did.
    pub(crate) fn longest_blocking_poll(&self) -> Option<BlockingPoll> {
        let every = self.every.lock().unwrap_or_else(|p| p.into_inner());
        every
            .iter()
            .filter_map(|endpoint| endpoint.transport.blocking_poll())
            .max_by_key(|blocked| blocked.duration)
    }

    /// The plugin config text every instance gets.
    pub(crate) fn config_toml(&self) -> &str {
        &self.config_toml
    }

    /// The largest payload the transport declared it accepts.
    pub(crate) fn max_message_size(&self) -> u64 {
        self.info.as_ref().map_or(0, |info| info.max_message_size)
    }

    /// When waits for messages give up: 80% into the case's time limit, so that the case can
    /// still say what was missing before the limit cuts it off.
    pub(crate) fn deadline(&self) -> Instant {
        self.started + self.case_timeout.mul_f64(0.8)
    }

    /// How long one operation that must not hang (a send, a close, a receive after close) may
    /// take: a third of the case's time limit.
    pub(crate) fn operation_limit(&self) -> Duration {
        self.case_timeout / 3
    }

    /// Records a remark for the report.
    pub(crate) fn note(&self, note: impl Into<String>) {
        self.notes.lock().unwrap_or_else(|p| p.into_inner()).push(note.into());
    }

    /// Records what the first instance declared (`create_transport` does, for the later cases).
    pub(crate) fn record_info(&self, info: TransportInfo) {
        *self.found.lock().unwrap_or_else(|p| p.into_inner()) = Some(info);
    }

    pub(crate) fn found_info(&self) -> Option<TransportInfo> {
        self.found.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(crate) fn take_notes(&self) -> Vec<String> {
        std::mem::take(&mut *self.notes.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Opens a transport instance for a new node; `role` names it in failures.
    pub(crate) async fn open(&self, role: &str) -> Result<Arc<Endpoint>, CaseError> {
        // Short and plain: some transports build socket paths (at most 108 bytes) from it.
        let label: String = role.split(' ').filter(|word| !matches!(*word, "the" | "a" | "an")).collect();
        let label: String = label.chars().filter(char::is_ascii_alphanumeric).take(12).collect();
        let node = self.new_node_id(&label.to_ascii_lowercase());
        self.open_node(role, node).await
    }

    /// A fresh node id for `role`, bound to [`SuiteConfig::node_key`](super::SuiteConfig) if set.
    pub(crate) fn new_node_id(&self, role: &str) -> NodeId {
        unique_node_id(role, self.node_key.as_ref())
    }

    /// Whether the suite runs over encrypted links ([`SuiteConfig::with_noise_links`]).
    pub(crate) fn noise_links(&self) -> bool {
        self.node_key.is_some()
    }

    /// Opens `count` instances at once, roles `"{role} 0"`, `"{role} 1"`, ...
    pub(crate) async fn open_many(&self, role: &str, count: usize) -> Result<Vec<Arc<Endpoint>>, CaseError> {
        join_all((0..count).map(|i| async move { self.open(&format!("{role} {i}")).await }))
            .await
            .into_iter()
            .collect()
    }

    /// Opens an instance for `node` (again, for a case that reopens a node).
    pub(crate) async fn open_node(&self, role: &str, node: NodeId) -> Result<Arc<Endpoint>, CaseError> {
        self.open_node_with_config(role, node, &self.config_toml).await
    }

    /// Opens an instance for `node` with a config text of the case's own.
    pub(crate) async fn open_node_with_config(
        &self,
        role: &str,
        node: NodeId,
        config_toml: &str,
    ) -> Result<Arc<Endpoint>, CaseError> {
        let what = format!("creating the transport for {role} (node {node})");
        let instance = self.library.description().name.clone();
        let created =
            within(&what, self.operation_limit(), self.library.new_transport(&node, &instance, config_toml))
                .await?;
        let mut transport = created.map_err(|error| failed(format!("{what} failed: {error}")))?;
        // Innermost first, as a node stacks them.
        for layer in self.layers.iter().rev() {
            let name = &layer.library.description().name;
            let what = format!("stacking layer `{name}` for {role} (node {node})");
            let instance = format!("{instance}.{name}");
            let stacked = layer.library.new_layer(&node, &instance, &layer.config_toml, transport);
            transport = within(&what, self.operation_limit(), stacked)
                .await?
                .map_err(|error| failed(format!("{what} failed: {error}")))?;
        }
        let endpoint =
            Arc::new(Endpoint { node, role: role.to_string(), transport, closed: AtomicBool::new(false) });
        self.opened.lock().unwrap_or_else(|p| p.into_inner()).push(Arc::clone(&endpoint));
        self.every.lock().unwrap_or_else(|p| p.into_inner()).push(Arc::clone(&endpoint));
        Ok(endpoint)
    }

    /// Starts receiving on `endpoint`.
    pub(crate) fn inbox(&self, endpoint: &Arc<Endpoint>, settling: Settling) -> Inbox {
        let (sender, messages) = mpsc::channel(INBOX_CAPACITY);
        let accept =
            settling == Settling::AcceptAll && self.capabilities().contains(Capabilities::ACKNOWLEDGEMENTS);
        let task = tokio::spawn(receive_loop(Arc::clone(endpoint), sender, accept));
        self.receivers.lock().unwrap_or_else(|p| p.into_inner()).push(task);
        Inbox { role: endpoint.role.clone(), messages, ended: false }
    }

    /// Stops the receive tasks at once (a plugin that blocks the host's thread in `receive`
    /// would otherwise block it again for every call until the cleanup closes it).
    pub(crate) fn stop_receiving(&self) {
        for task in std::mem::take(&mut *self.receivers.lock().unwrap_or_else(|p| p.into_inner())) {
            task.abort();
        }
    }

    /// Closes every instance the case left open, all at once, each within `limit`, then stops
    /// the receive tasks. Returns what went wrong, one entry per instance.
    pub(crate) async fn close_all(&self, limit: Duration) -> Vec<String> {
        let open: Vec<Arc<Endpoint>> =
            std::mem::take(&mut *self.opened.lock().unwrap_or_else(|p| p.into_inner()))
                .into_iter()
                .filter(|endpoint| !endpoint.closed.load(Ordering::Acquire))
                .collect();
        let problems = join_all(open.iter().map(|endpoint| async move {
            match tokio::time::timeout(limit, endpoint.close()).await {
                Ok(Ok(())) => None,
                // Closed by the case through the transport directly: nothing to clean up.
                Ok(Err(error)) if error.code == ErrorCode::CLOSED => None,
                Ok(Err(error)) => Some(format!("closing {} failed: {error}", endpoint.role)),
                Err(_) => Some(format!("closing {} did not finish within {}", endpoint.role, seconds(limit))),
            }
        }))
        .await;
        self.stop_receiving();
        problems.into_iter().flatten().collect()
    }
}

/// Feeds an [`Inbox`]: receive, hand over, settle as accepted if asked to.
async fn receive_loop(
    endpoint: Arc<Endpoint>,
    inbox: mpsc::Sender<Result<Inbound, PluginError>>,
    accept: bool,
) {
    loop {
        let batch = match endpoint.transport.receive(RECEIVE_BATCH).await {
            Ok(batch) if batch.is_empty() => return,
            Ok(batch) => batch,
            // The case closed the transport under this loop: the end of the stream, not a failure.
            Err(error) if error.code == ErrorCode::CLOSED && endpoint.closed.load(Ordering::Acquire) => {
                return
            }
            Err(error) => {
                let _ = inbox.send(Err(error)).await;
                return;
            }
        };
        let settlements: Vec<Settlement> = batch
            .iter()
            .map(|inbound| Settlement {
                delivery_tag: inbound.delivery_tag,
                outcome: SettlementOutcome::ACCEPTED,
            })
            .collect();
        for inbound in batch {
            if inbox.send(Ok(inbound)).await.is_err() {
                return;
            }
        }
        if accept {
            match endpoint.transport.settle(settlements).await {
                Ok(()) => {}
                // Closed by the case meanwhile; a transport that acknowledges redelivers these.
                Err(error) if error.code == ErrorCode::CLOSED && endpoint.closed.load(Ordering::Acquire) => {
                    return
                }
                Err(error) => {
                    let _ = inbox.send(Err(error)).await;
                    return;
                }
            }
        }
    }
}
