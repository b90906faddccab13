//! A reference transport for testing the suite itself (test builds only).
//!
//! In-process, with every capability the suite knows but `encrypted` (so that each capability's
//! cases run here too), and with faults chosen by config so that tests can prove each case
//! notices what it is meant to notice:
//!
//! ```toml
//! capabilities = ["ordered", "acknowledgements"]   # default: all of them
//! fault = "drop-every-tenth"                       # default: "none"
//! ```
//!
//! Each node has a mailbox (a bounded queue) in one process-wide registry, addressed
//! `reference://<node id>`. With `durable`, a closed node's mailbox stays and keeps receiving;
//! reopening the node takes it over, unsettled messages first.

use comms_plugin_api::{
    async_trait, Capabilities, Destination, Envelope, ErrorCode, Inbound, NodeId, Outbound, Plugin,
    PluginError, Provides, SendFailure, Settlement, SettlementOutcome, Setup, Transport, TransportInfo,
};
use serde::Deserialize;
use std::{
    collections::{HashMap, VecDeque},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, LazyLock, Mutex,
    },
    time::Duration,
};
use tokio::sync::Notify;

const MAX_MESSAGE_SIZE: u64 = 1 << 20;
const MAILBOX_CAPACITY: usize = 4096;

/// A deliberate defect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Fault {
    /// A correct transport.
    #[default]
    None,
    /// Every tenth message an instance sends vanishes (send still succeeds).
    DropEveryTenth,
    /// Every two consecutive messages to one address arrive the wrong way round.
    SwapPairs,
    /// Every tenth message goes to some other open mailbox.
    Misdeliver,
    /// Messages above the limit are accepted.
    AcceptOversized,
    /// A send to an address with no mailbox never returns.
    HangOnDeadAddress,
    /// Sends after close succeed (and go nowhere).
    SendAfterClose,
    /// `REJECTED_REQUEUE` is treated as `ACCEPTED`.
    IgnoreRequeue,
    /// Closing drops whatever the mailbox still holds.
    LoseOnClose,
    /// Subscriptions match topic names literally: no `*`, no `>`.
    ExactTopicsOnly,
    /// The receiving mailbox holds 256 messages and drops what arrives while it is full (a
    /// best-effort transport's socket buffer), although `send` succeeded.
    DropWhenFull,
    /// `receive` sleeps for a second on the host's thread before it waits for messages.
    BlockInReceive,
    /// A send to an address with no mailbox (a closed node) succeeds, and the message is lost.
    AcceptWhileGone,
    /// `send_batch` keeps the first 512 items of a longer batch and reports none lost (a
    /// batch writer whose buffer is too small).
    TruncateLargeBatches,
}

/// Items a [`Fault::TruncateLargeBatches`] batch keeps.
const TRUNCATED_BATCH: usize = 512;

/// What a [`Fault::DropWhenFull`] mailbox holds.
const DROPPING_CAPACITY: usize = 256;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct ReferenceConfig {
    capabilities: Option<Vec<String>>,
    fault: Fault,
}

#[derive(Debug, Default)]
struct MailboxState {
    queue: VecDeque<Envelope>,
    unsettled: HashMap<u64, Envelope>,
    next_tag: u64,
    /// Patterns of the open instance, and whether it matches them literally.
    subscriptions: Vec<String>,
    exact_topics: bool,
    /// The fault of the instance that has it open.
    owner_fault: Fault,
    /// An instance is attached.
    open: bool,
}

#[derive(Debug, Default)]
struct Mailbox {
    state: Mutex<MailboxState>,
    changed: Notify,
}

impl Mailbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, MailboxState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends, waiting while the mailbox is full.
    async fn push(&self, envelope: Envelope) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let mut state = self.lock();
                if state.owner_fault == Fault::DropWhenFull && state.queue.len() >= DROPPING_CAPACITY {
                    return;
                }
                if state.queue.len() < MAILBOX_CAPACITY {
                    state.queue.push_back(envelope);
                    drop(state);
                    self.changed.notify_waiters();
                    return;
                }
            }
            changed.await;
        }
    }
}

static REGISTRY: LazyLock<Mutex<HashMap<String, Arc<Mailbox>>>> = LazyLock::new(Default::default);

fn registry() -> std::sync::MutexGuard<'static, HashMap<String, Arc<Mailbox>>> {
    REGISTRY.lock().unwrap_or_else(|p| p.into_inner())
}

fn topic_matches(pattern: &str, topic: &str) -> bool {
    let (mut pattern, mut topic) = (pattern.split('.'), topic.split('.'));
    loop {
        match (pattern.next(), topic.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(p), Some(t)) if p == t => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// One instance.
#[derive(Debug)]
struct ReferenceTransport {
    address: String,
    mailbox: Arc<Mailbox>,
    capabilities: Capabilities,
    fault: Fault,
    closed: AtomicBool,
    sent: AtomicU64,
    /// For [`Fault::SwapPairs`]: the message waiting for the next one to the same address.
    held: Arc<Mutex<Option<(String, Envelope)>>>,
    /// For [`Fault::Misdeliver`]: the addresses this instance has sent to, so that a misdelivered
    /// message reaches another of its destinations (a receiver that can tell), never a mailbox
    /// nobody reads.
    sent_to: Mutex<Vec<String>>,
}

impl ReferenceTransport {
    fn open(node: &NodeId, config: ReferenceConfig) -> Result<Self, PluginError> {
        let all = [
            Capabilities::ORDERED,
            Capabilities::ACKNOWLEDGEMENTS,
            Capabilities::DURABLE,
            Capabilities::NATIVE_TOPICS,
            Capabilities::RELIABLE,
            Capabilities::BATCHED_SEND,
        ];
        let capabilities = match &config.capabilities {
            None => all.into_iter().fold(Capabilities::NONE, Capabilities::union),
            Some(names) => names.iter().try_fold(Capabilities::NONE, |set, name| {
                let flag = all.into_iter().find(|flag| flag.names() == [name.as_str()]);
                flag.map(|flag| set | flag).ok_or_else(|| {
                    PluginError::invalid_config(format!("key `capabilities`: unknown `{name}`"))
                })
            })?,
        };
        let address = format!("reference://{node}");
        let mut registry = registry();
        let mailbox = Arc::clone(registry.entry(address.clone()).or_default());
        let mut state = mailbox.lock();
        if state.open {
            return Err(PluginError::invalid_config(format!("node {node} is already open")));
        }
        state.open = true;
        state.exact_topics = config.fault == Fault::ExactTopicsOnly;
        state.owner_fault = config.fault;
        // Unsettled messages of an earlier instance of this node come first.
        let unsettled: Vec<Envelope> = state.unsettled.drain().map(|(_, envelope)| envelope).collect();
        for envelope in unsettled {
            state.queue.push_front(envelope);
        }
        drop(state);
        Ok(Self {
            address,
            mailbox,
            capabilities,
            fault: config.fault,
            closed: AtomicBool::new(false),
            sent: AtomicU64::new(0),
            held: Arc::default(),
            sent_to: Mutex::default(),
        })
    }

    fn has(&self, capability: Capabilities) -> bool {
        self.capabilities.contains(capability)
    }

    async fn deliver(&self, address: &str, envelope: Envelope, nth: u64) -> Result<(), PluginError> {
        let target = if self.fault == Fault::Misdeliver {
            let wrong = {
                let mut sent_to = self.sent_to.lock().unwrap_or_else(|p| p.into_inner());
                if !sent_to.iter().any(|known| known == address) {
                    sent_to.push(address.to_string());
                }
                // Every tenth message goes to another address this instance sends to.
                sent_to.iter().find(|known| *known != address).filter(|_| nth % 10 == 9).cloned()
            };
            registry().get(wrong.as_deref().unwrap_or(address)).cloned()
        } else {
            registry().get(address).cloned()
        };
        match target {
            Some(mailbox) => {
                mailbox.push(envelope).await;
                Ok(())
            }
            None if self.fault == Fault::HangOnDeadAddress => std::future::pending().await,
            None if self.fault == Fault::AcceptWhileGone => Ok(()),
            None => Err(PluginError::new(ErrorCode::UNREACHABLE, format!("nobody at {address}"))),
        }
    }

    async fn publish(&self, topic: &str, envelope: Envelope) -> Result<(), PluginError> {
        if !self.has(Capabilities::NATIVE_TOPICS) {
            return Err(PluginError::unsupported("no native topics"));
        }
        let mailboxes: Vec<Arc<Mailbox>> = registry()
            .values()
            .filter(|mailbox| {
                let state = mailbox.lock();
                state.open
                    && state.subscriptions.iter().any(|pattern| {
                        if state.exact_topics {
                            pattern == topic
                        } else {
                            topic_matches(pattern, topic)
                        }
                    })
            })
            .cloned()
            .collect();
        for mailbox in mailboxes {
            mailbox.push(envelope.clone()).await;
        }
        Ok(())
    }
}

#[async_trait]
impl Transport for ReferenceTransport {
    fn info(&self) -> TransportInfo {
        TransportInfo::new(self.capabilities, self.address.clone(), MAX_MESSAGE_SIZE)
    }

    async fn send(&self, address: &str, envelope: Envelope) -> Result<(), PluginError> {
        if self.closed.load(Ordering::Acquire) {
            return match self.fault {
                Fault::SendAfterClose => Ok(()),
                _ => Err(PluginError::closed("reference transport")),
            };
        }
        if envelope.payload.len() as u64 > MAX_MESSAGE_SIZE && self.fault != Fault::AcceptOversized {
            return Err(PluginError::new(ErrorCode::TOO_LARGE, "payload above 1 MiB"));
        }
        let nth = self.sent.fetch_add(1, Ordering::Relaxed);
        if self.fault == Fault::DropEveryTenth && nth % 10 == 9 {
            return Ok(());
        }
        if let (Destination::Topic(topic), "") = (&envelope.to, address) {
            let topic = topic.clone();
            return self.publish(&topic, envelope).await;
        }
        if self.fault != Fault::SwapPairs {
            return self.deliver(address, envelope, nth).await;
        }
        let earlier = self.held.lock().unwrap_or_else(|p| p.into_inner()).take();
        match earlier {
            Some((held_for, held)) if held_for == address => {
                self.deliver(address, envelope, nth).await?;
                self.deliver(address, held, nth).await
            }
            earlier => {
                if let Some((held_for, held)) = earlier {
                    self.deliver(&held_for, held, nth).await?;
                }
                let id = envelope.id;
                *self.held.lock().unwrap_or_else(|p| p.into_inner()) = Some((address.to_string(), envelope));
                // A message with no successor goes on its own after a moment.
                let held = Arc::clone(&self.held);
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    let taken = {
                        let mut slot = held.lock().unwrap_or_else(|p| p.into_inner());
                        match slot.as_ref() {
                            Some((_, envelope)) if envelope.id == id => slot.take(),
                            _ => None,
                        }
                    };
                    if let Some((address, envelope)) = taken {
                        let mailbox = registry().get(&address).cloned();
                        if let Some(mailbox) = mailbox {
                            mailbox.push(envelope).await;
                        }
                    }
                });
                Ok(())
            }
        }
    }

    /// One by one, as the trait's default does (an in-process send costs no more in a batch).
    async fn send_batch(&self, mut batch: Vec<Outbound>) -> Vec<SendFailure> {
        if self.fault == Fault::TruncateLargeBatches {
            batch.truncate(TRUNCATED_BATCH);
        }
        let mut failures = Vec::new();
        for (index, outbound) in batch.into_iter().enumerate() {
            if let Err(error) = self.send(&outbound.address, outbound.envelope).await {
                failures.push(SendFailure { index, error });
            }
        }
        failures
    }

    async fn receive(&self, max_batch: usize) -> Result<Vec<Inbound>, PluginError> {
        if self.fault == Fault::BlockInReceive {
            std::thread::sleep(Duration::from_secs(1));
        }
        loop {
            let changed = self.mailbox.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let closed = self.closed.load(Ordering::Acquire);
            {
                let mut state = self.mailbox.lock();
                // After close, what the mailbox holds is still handed out, then an empty batch;
                // a durable one keeps it for the node's next instance instead.
                if closed && (state.queue.is_empty() || self.has(Capabilities::DURABLE)) {
                    return Ok(Vec::new());
                }
                if !state.queue.is_empty() {
                    let count = state.queue.len().min(max_batch.max(1));
                    let acknowledging = self.has(Capabilities::ACKNOWLEDGEMENTS);
                    let mut batch = Vec::with_capacity(count);
                    for _ in 0..count {
                        let envelope = state.queue.pop_front().expect("counted");
                        state.next_tag += 1;
                        let delivery_tag = state.next_tag;
                        if acknowledging {
                            state.unsettled.insert(delivery_tag, envelope.clone());
                        }
                        batch.push(Inbound { envelope, delivery_tag });
                    }
                    drop(state);
                    self.mailbox.changed.notify_waiters();
                    return Ok(batch);
                }
            }
            changed.await;
        }
    }

    async fn settle(&self, settlements: Vec<Settlement>) -> Result<(), PluginError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(PluginError::closed("reference transport"));
        }
        if !self.has(Capabilities::ACKNOWLEDGEMENTS) {
            return Ok(());
        }
        let mut state = self.mailbox.lock();
        for settlement in settlements {
            let Some(envelope) = state.unsettled.remove(&settlement.delivery_tag) else { continue };
            if settlement.outcome == SettlementOutcome::REJECTED_REQUEUE && self.fault != Fault::IgnoreRequeue
            {
                state.queue.push_front(envelope);
            }
        }
        drop(state);
        self.mailbox.changed.notify_waiters();
        Ok(())
    }

    async fn subscribe(&self, pattern: &str) -> Result<(), PluginError> {
        if !self.has(Capabilities::NATIVE_TOPICS) {
            return Err(PluginError::unsupported("no native topics"));
        }
        self.mailbox.lock().subscriptions.push(pattern.to_string());
        Ok(())
    }

    async fn unsubscribe(&self, pattern: &str) -> Result<(), PluginError> {
        self.mailbox.lock().subscriptions.retain(|p| p != pattern);
        Ok(())
    }

    async fn close(&self) -> Result<(), PluginError> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let mut registry = registry();
        let mut state = self.mailbox.lock();
        state.open = false;
        state.subscriptions.clear();
        if self.fault == Fault::LoseOnClose {
            state.queue.clear();
            state.unsettled.clear();
        }
        if !self.has(Capabilities::DURABLE) {
            registry.remove(&self.address);
        }
        drop(state);
        drop(registry);
        self.mailbox.changed.notify_waiters();
        Ok(())
    }
}

/// The plugin, for `PluginLibrary::linked::<ReferencePlugin>()`.
#[derive(Debug)]
pub(crate) struct ReferencePlugin;

#[async_trait]
impl Plugin for ReferencePlugin {
    const NAME: &'static str = "reference";
    const VERSION: &'static str = "0.0.0";
    const DESCRIPTION: &'static str = "in-process reference transport for testing the conformance suite";
    const PROVIDES: Provides = Provides::TRANSPORT;

    async fn new_transport(setup: Setup) -> Result<Arc<dyn Transport>, PluginError> {
        let config: ReferenceConfig = setup.config()?;
        Ok(Arc::new(ReferenceTransport::open(&setup.node_id, config)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::{cases, run_suite, CaseOutcome, SuiteConfig};
    use comms_plugin_api::host_side::PluginLibrary;

    fn library() -> PluginLibrary {
        PluginLibrary::linked::<ReferencePlugin>()
    }

    /// Short limits: a correct in-process transport needs milliseconds, and failing cases wait
    /// until their deadline.
    fn config(toml: &str, filter: Option<&str>) -> SuiteConfig {
        SuiteConfig {
            config_toml: toml.to_string(),
            case_timeout: Duration::from_secs(4),
            filter: filter.map(str::to_string),
            ..SuiteConfig::default()
        }
    }

    #[test]
    fn topic_patterns() {
        assert!(topic_matches("a.*", "a.b"));
        assert!(!topic_matches("a.*", "a.b.c"));
        assert!(!topic_matches("a.*", "a"));
        assert!(topic_matches("a.>", "a.b.c"));
        assert!(!topic_matches("a.>", "a"));
        assert!(topic_matches("a.b", "a.b"));
        assert!(!topic_matches("a.b", "a.c"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_correct_transport_with_every_capability_passes_every_case() {
        let report = run_suite(&library(), &config("", None)).await;
        assert!(report.passed(), "{report}");
        assert_eq!(report.cases.len(), cases().len(), "{report}");
        // It cannot encrypt: that case runs over the real plugins (tests/tests/security_links.rs).
        assert_eq!(report.skipped_names(), ["encrypted_links"], "{report}");
        let reliable = report.case("reliable_delivery").expect("reported");
        assert!(
            reliable
                .notes
                .iter()
                .any(|note| note.contains("is not ip:port: the link outage was not checked")),
            "the phase it cannot run is named: {reliable}"
        );
    }

    /// A plugin that sleeps on the host's thread in `receive` fails `no_blocking_polls` with the
    /// poll watch's words, and the suite stops early instead of waiting out every case.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_transport_that_blocks_the_thread_fails_no_blocking_polls_quickly() {
        let started = std::time::Instant::now();
        let suite = SuiteConfig {
            blocking_poll_limit: Duration::from_millis(300),
            ..config("fault = \"block-in-receive\"", None)
        };
        let report = run_suite(&library(), &suite).await;
        assert!(started.elapsed() < Duration::from_secs(20), "took {:?}:\n{report}", started.elapsed());
        assert!(report.case("create_transport").is_some_and(|case| case.passed()), "{report}");
        let CaseOutcome::Failed(why) = &report.case("no_blocking_polls").expect("reported").outcome else {
            panic!("no_blocking_polls must fail:\n{report}");
        };
        // The plugin sleeps 1 s; a loaded machine measures more (1.4 s seen in CI).
        assert!(
            why.starts_with("plugin reference blocked a thread for ")
                && why.contains(" s in receive: use tokio::time or spawn_blocking"),
            "{why}"
        );
        assert!(why.contains("(in envelope_round_trip; the cases after it were not run)"), "{why}");
        let stopped = report.case("envelope_round_trip").expect("reported");
        assert!(
            matches!(&stopped.outcome, CaseOutcome::Failed(reason) if reason.starts_with("plugin reference blocked a thread")),
            "{stopped}"
        );
        let not_run = report.case("concurrent_senders").expect("reported");
        assert_eq!(
            not_run.outcome,
            CaseOutcome::Skipped(
                "not run: plugin reference blocks the host's threads (see no_blocking_polls)".into()
            )
        );
        assert_eq!(report.failed_names(), ["envelope_round_trip", "no_blocking_polls"], "{report}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_blocking_polls_runs_alone_and_notices_a_blocking_receive() {
        let suite = SuiteConfig {
            blocking_poll_limit: Duration::from_millis(300),
            ..config("fault = \"block-in-receive\"", Some("no_blocking_polls"))
        };
        let report = run_suite(&library(), &suite).await;
        assert_eq!(report.failed_names(), ["no_blocking_polls"], "{report}");
        let report = run_suite(&library(), &config("", Some("no_blocking_polls"))).await;
        assert!(report.passed(), "{report}");
    }

    /// A case gated by a capability runs when the suite is told to assume it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn assumed_capabilities_run_their_cases() {
        let suite = SuiteConfig {
            assume: Capabilities::RELIABLE,
            ..config("capabilities = []\nfault = \"drop-when-full\"", Some("reliable"))
        };
        let report = run_suite(&library(), &suite).await;
        assert_eq!(report.failed_names(), ["reliable_delivery"], "{report}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn capabilities_decide_which_cases_run() {
        let report = run_suite(&library(), &config("capabilities = []", None)).await;
        assert!(report.passed(), "{report}");
        assert_eq!(
            report.skipped_names(),
            [
                "order_per_sender",
                "batches_and_sends_at_once",
                "redelivery_after_reject",
                "durable_resume",
                "reliable_delivery",
                "topic_isolation",
                "topic_fan_out",
                "encrypted_links"
            ],
            "{report}"
        );
        let reason = |name| report.case(name).map(|case| case.outcome.clone());
        assert_eq!(
            reason("redelivery_after_reject"),
            Some(CaseOutcome::Skipped("needs capability acknowledgements".into()))
        );
        assert_eq!(reason("durable_resume"), Some(CaseOutcome::Skipped("needs capability durable".into())));
        assert_eq!(
            reason("topic_isolation"),
            Some(CaseOutcome::Skipped("needs capability native-topics".into()))
        );
        assert_eq!(reason("order_per_sender"), Some(CaseOutcome::Skipped("needs capability ordered".into())));
        assert_eq!(
            reason("reliable_delivery"),
            Some(CaseOutcome::Skipped("needs capability reliable".into()))
        );
        assert_eq!(
            reason("encrypted_links"),
            Some(CaseOutcome::Skipped("needs capability encrypted".into()))
        );

        let report = run_suite(&library(), &config(r#"capabilities = ["acknowledgements"]"#, None)).await;
        assert!(report.passed(), "{report}");
        assert!(report.case("redelivery_after_reject").is_some_and(|case| case.passed()), "{report}");
    }

    #[tokio::test]
    async fn a_transport_that_cannot_be_created_fails_create_transport_and_skips_the_rest() {
        let report = run_suite(&library(), &config("no_such_key = 1", None)).await;
        assert!(!report.passed());
        assert_eq!(report.failed_names(), ["create_transport"], "{report}");
        let CaseOutcome::Failed(reason) = &report.cases[0].outcome else { unreachable!() };
        assert!(reason.contains("no_such_key"), "the plugin's error is kept: {reason}");
        assert_eq!(report.skipped_names().len(), cases().len() - 1, "{report}");
        assert!(report.to_string().contains("SKIP close: no working transport instance"), "{report}");
    }

    #[tokio::test]
    async fn the_filter_selects_cases_by_name() {
        let report = run_suite(&library(), &config("", Some("topic"))).await;
        let names: Vec<_> = report.cases.iter().map(|case| case.name).collect();
        assert_eq!(names, ["create_transport", "topic_isolation", "topic_fan_out"]);
        assert!(report.passed(), "{report}");
    }

    /// Each deliberate defect makes the case meant to catch it fail, with a reason that says
    /// what went wrong.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn broken_transports_fail_the_cases_that_check_what_they_break() {
        let expectations: [(&str, &str, &str, &str); 13] = [
            ("drop-every-tenth", "", "concurrent_senders", "senders lost messages"),
            ("drop-every-tenth", "", "concurrent_receivers", "receivers are missing messages"),
            ("swap-pairs", "", "order_per_sender", "arrived after its message"),
            ("misdeliver", "", "concurrent_receivers", "reached a receiver they were not sent to"),
            ("accept-oversized", "", "oversized_message", "was accepted; it must be refused"),
            (
                "hang-on-dead-address",
                r#"capabilities = ["ordered"]"#,
                "unreachable_address",
                "did not return within",
            ),
            ("send-after-close", "", "close", "send after close succeeded"),
            ("ignore-requeue", "", "redelivery_after_reject", "REJECTED_REQUEUE was not delivered again"),
            ("lose-on-close", "", "durable_resume", "missing"),
            ("exact-topics-only", "", "topic_isolation", "of `orders.*` got 0 of 1 messages"),
            ("drop-when-full", "", "reliable_delivery", "did not call receive for the first 1 s"),
            ("truncate-large-batches", "", "batches_and_sends_at_once", "senders lost messages"),
            (
                "accept-while-gone",
                r#"capabilities = ["reliable"]"#,
                "reliable_delivery",
                "reopened at the same address",
            ),
        ];
        let runs = expectations.iter().map(|(fault, extra, case, _)| async move {
            let toml = format!("fault = {fault:?}\n{extra}");
            run_suite(&library(), &config(&toml, Some(case))).await
        });
        let reports = futures::future::join_all(runs).await;
        for ((fault, _, case, reason), report) in expectations.iter().zip(reports) {
            let outcome = &report.case(case).expect("the case ran").outcome;
            match outcome {
                CaseOutcome::Failed(why) => {
                    assert!(why.contains(reason), "{fault}: {case} failed, but: {why}")
                }
                other => panic!("{fault}: {case} should fail, got {other:?}\n{report}"),
            }
            assert!(report.case("create_transport").is_some_and(|c| c.passed()), "{fault}: {report}");
        }
    }
}
