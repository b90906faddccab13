//! The discovery the host loads: one UDP socket and a driver task around the sans-IO
//! [`GossipNode`].
//!
//! The driver moves datagrams between the socket and the state machine, wakes it at
//! [`GossipNode::next_timeout`], and hands membership changes to the host through a bounded
//! queue. All protocol decisions are the state machine's. With link security (the node runs
//! with `security.links = "noise"`) it also gives the state machine the wall-clock time that
//! authenticated datagrams carry and are checked against.

use crate::{
    auth::{LinkSecurity, WallClock},
    membership::{MemberEvent, RecordError},
    node::{Config, GossipNode},
    protocol::MAX_DATAGRAM,
};
use comms_plugin_api::{
    async_trait,
    datagram_carrier::{Carrier, DatagramCarrier},
    log_rate::LogRateLimit,
    peer_events::{peer_event_queue, PeerEventQueue, PeerEventSender},
    serde::Deserialize,
    socket_address, Discovery, ErrorCode, NodeId, NodeRecord, PeerEvent, PluginError,
};
use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};
use tokio::{
    sync::{watch, Notify},
    task::JoinHandle,
};

/// Listen address when the config names none: any free port on every IPv4 interface.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:0";
/// Nodes whose events may wait for the host (one event each, the latest:
/// [`comms_plugin_api::peer_events`]); an event about one more node is dropped and logged
/// (`peers` stays exact).
pub const EVENT_CAPACITY: usize = 1024;
/// Datagrams read per turn of the driver before it lets the state machine send.
const RECEIVE_BATCH: usize = 64;

static MALFORMED: LogRateLimit = LogRateLimit::standard();
static UNAUTHENTICATED: LogRateLimit = LogRateLimit::standard();
static EVENTS_DROPPED: LogRateLimit = LogRateLimit::standard();

/// The `[discovery]` table of a node whose `plugin = "gossip"`. Every key is optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(crate = "comms_plugin_api::serde", deny_unknown_fields)]
pub struct GossipSettings {
    /// Address to bind (UDP, or TCP with `carrier = "tcp"`); default [`DEFAULT_LISTEN`].
    pub listen: Option<String>,
    /// `"udp"` (default) or `"tcp"`: the gossip datagrams framed over TCP connections, where UDP
    /// does not pass (see [`comms_plugin_api::datagram_carrier`]). Every member uses the same.
    #[serde(default)]
    pub carrier: Carrier,
    /// The gossip address other members are told (`host:port`); default: the bound address, or
    /// for an unspecified IP (`0.0.0.0`, `[::]`) the IP of the interface with the default route.
    pub advertise: Option<String>,
    /// Gossip addresses (`host:port`) of members to join through; empty: this node waits to be
    /// joined.
    #[serde(default)]
    pub seeds: Vec<String>,
    /// Milliseconds per protocol period (one probe each); default 1000.
    pub protocol_period_ms: Option<u64>,
    /// Milliseconds a direct ping may take before indirect probes go out; default half the
    /// period, at most 500.
    pub probe_timeout_ms: Option<u64>,
    /// Members asked to probe indirectly (k); default 3.
    pub indirect_probes: Option<usize>,
    /// Suspicion timeout = this · max(1, log10(n)) · period; default 4.
    pub suspicion_multiplier: Option<u32>,
    /// Each update is piggybacked this · ceil(log10(n + 1)) times; default 4.
    pub retransmit_multiplier: Option<u32>,
    /// Member table entries, tombstones included; default 4096.
    pub max_members: Option<usize>,
    /// The largest datagram sent or accepted; default 1400 (fits an Ethernet MTU).
    pub max_datagram: Option<usize>,
    /// Milliseconds between full table syncs with a random member (scaled up with the group's
    /// size beyond 32 members); default 30000.
    pub sync_interval_ms: Option<u64>,
}

impl GossipSettings {
    /// The state machine's config, or an error naming the key that is out of range.
    pub fn config(&self) -> Result<Config, PluginError> {
        let defaults = Config::default();
        let period = self.protocol_period_ms.map(Duration::from_millis).unwrap_or(defaults.protocol_period);
        let config = Config {
            protocol_period: period,
            probe_timeout: self
                .probe_timeout_ms
                .map(Duration::from_millis)
                .unwrap_or_else(|| (period / 2).min(defaults.probe_timeout)),
            indirect_probes: self.indirect_probes.unwrap_or(defaults.indirect_probes),
            suspicion_multiplier: self.suspicion_multiplier.unwrap_or(defaults.suspicion_multiplier),
            retransmit_multiplier: self.retransmit_multiplier.unwrap_or(defaults.retransmit_multiplier),
            max_members: self.max_members.unwrap_or(defaults.max_members),
            max_datagram: self.max_datagram.unwrap_or(defaults.max_datagram),
            sync_interval: self.sync_interval_ms.map(Duration::from_millis).unwrap_or(defaults.sync_interval),
            ..defaults
        };
        config.validate().map_err(|(field, why)| {
            let key = match field {
                "protocol_period" => "protocol_period_ms",
                "probe_timeout" => "probe_timeout_ms",
                "sync_interval" => "sync_interval_ms",
                other => other,
            };
            PluginError::invalid_config(format!("key `{key}`: {why}"))
        })?;
        Ok(config)
    }
}

struct Shared {
    node: Mutex<GossipNode<SocketAddr>>,
    socket: DatagramCarrier,
    seeds: Vec<SocketAddr>,
    /// The node announced itself at least once (and so joined through the seeds).
    announced: Mutex<bool>,
    /// Something was queued: the driver has datagrams to write or a new timeout.
    wake: Notify,
    shutdown: watch::Sender<bool>,
}

impl Shared {
    fn node(&self) -> std::sync::MutexGuard<'_, GossipNode<SocketAddr>> {
        // The state machine keeps its invariants between calls; a panic inside one (a bug) must
        // not also stop discovery for good.
        self.node.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Writes what the state machine has queued, now (for leaving before the driver stops).
    async fn flush(&self) {
        let transmits: Vec<_> = std::iter::from_fn(|| self.node().poll_transmit()).collect();
        for (to, datagram) in transmits {
            if let Err(error) = self.socket.send_to(&datagram, to).await {
                tracing::debug!("gossip: sending a datagram to {to} failed: {error}");
            }
        }
    }
}

/// Discovery by SWIM-style gossip over UDP. See the [crate documentation](crate).
pub struct GossipDiscovery {
    shared: Arc<Shared>,
    local: SocketAddr,
    node_id: NodeId,
    events: PeerEventQueue,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for GossipDiscovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GossipDiscovery")
            .field("node_id", &self.node_id)
            .field("local", &self.local)
            .field("seeds", &self.shared.seeds)
            .finish_non_exhaustive()
    }
}

impl GossipDiscovery {
    /// Binds the socket, resolves the seeds and starts the driver, in plaintext. Must run inside
    /// a tokio runtime. The node joins the group with its first [`Discovery::announce`].
    pub async fn start(node_id: NodeId, settings: GossipSettings) -> Result<Self, PluginError> {
        Self::start_with(node_id, settings, None).await
    }

    /// [`GossipDiscovery::start`], authenticated when `security` is given (the node's link
    /// security, `security.links = "noise"`): datagrams signed by this node's identity, only
    /// those of allowed keys accepted, records signed by their owners (see
    /// [`crate::node`]). `node_id` must be bound to the identity's key.
    pub async fn start_with(
        node_id: NodeId,
        settings: GossipSettings,
        security: Option<LinkSecurity>,
    ) -> Result<Self, PluginError> {
        let config = settings.config()?;
        let listen = settings.listen.as_deref().unwrap_or(DEFAULT_LISTEN);
        let bind_to = resolve("listen", listen).await?;
        let socket =
            DatagramCarrier::bind(settings.carrier, bind_to, config.max_datagram).await.map_err(|error| {
                PluginError::new(
                    ErrorCode::INVALID_ADDRESS,
                    format!(
                        "gossip: binding {} {bind_to} (keys `listen`, `carrier`) failed: {error}",
                        settings.carrier
                    ),
                )
            })?;
        let bound = socket.local_addr().map_err(PluginError::from)?;
        let local = match settings.advertise.as_deref() {
            Some(advertise) => resolve("advertise", advertise).await?,
            // The interface with the default route (addresses of the documentation ranges: nothing
            // is sent).
            None => socket_address::advertised(
                bound,
                std::net::Ipv4Addr::new(192, 0, 2, 1),
                std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1),
            ),
        };
        // Over TCP, the address members reply to (a UDP datagram carries it as its source).
        socket.set_reply_address(local);
        let mut seeds = Vec::with_capacity(settings.seeds.len());
        for seed in &settings.seeds {
            seeds.push(resolve("seeds", seed).await?);
        }
        let now = Instant::now();
        let mut node = GossipNode::new(node_id.as_str(), local, config, rand::random(), now);
        if let Some(security) = security {
            node.authenticate(security, now, WallClock::system_unix_ms())
                .map_err(|why| PluginError::invalid_config(format!("gossip: authenticated gossip: {why}")))?;
        }
        let (sender, receiver) = peer_event_queue(EVENT_CAPACITY);
        let shared = Arc::new(Shared {
            node: Mutex::new(node),
            socket,
            seeds,
            announced: Mutex::new(false),
            wake: Notify::new(),
            shutdown: watch::channel(false).0,
        });
        let task = tokio::spawn(drive(shared.clone(), sender));
        tracing::debug!(
            "gossip {node_id}: listening on {bound}, advertised as {local}{}",
            if shared.node().is_authenticated() { ", authenticated" } else { "" }
        );
        Ok(Self { shared, local, node_id, events: receiver, task: Mutex::new(Some(task)) })
    }

    /// The gossip address other members are told.
    pub fn local_address(&self) -> SocketAddr {
        self.local
    }

    /// Leaves gracefully and writes the leave at once.
    async fn leave(&self) {
        self.shared.node().leave();
        self.shared.flush().await;
    }
}

#[async_trait]
impl Discovery for GossipDiscovery {
    async fn announce(&self, record: NodeRecord) -> Result<(), PluginError> {
        {
            let now = Instant::now();
            let mut node = self.shared.node();
            node.set_record(record, now).map_err(|error| {
                let code = match error {
                    RecordError::TooLarge { .. } => ErrorCode::TOO_LARGE,
                    RecordError::WrongId { .. } | RecordError::Invalid(_) => ErrorCode::MALFORMED,
                };
                PluginError::new(code, format!("gossip: announcing node {}: {error}", self.node_id))
            })?;
            let mut announced = self.shared.announced.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if !*announced {
                *announced = true;
                node.join(&self.shared.seeds, now);
            }
        }
        self.shared.wake.notify_one();
        Ok(())
    }

    async fn withdraw(&self, node: NodeId) -> Result<(), PluginError> {
        if node == self.node_id {
            self.leave().await;
        }
        Ok(())
    }

    async fn peers(&self) -> Result<Vec<NodeRecord>, PluginError> {
        Ok(self.shared.node().peers())
    }

    async fn next_event(&self) -> Result<Option<PeerEvent>, PluginError> {
        Ok(self.events.next(self.shared.shutdown.subscribe()).await)
    }

    /// Leaves gracefully (if this node is still a member) and stops the driver.
    async fn close(&self) -> Result<(), PluginError> {
        let member = self.shared.node().membership().is_member();
        if member {
            self.leave().await;
        }
        self.shared.shutdown.send_replace(true);
        let task = self.task.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take();
        if let Some(task) = task {
            let _ = task.await;
        }
        Ok(())
    }
}

impl Drop for GossipDiscovery {
    fn drop(&mut self) {
        // Dropped without close: stop the driver (no leave: peers find out by probing).
        self.shared.shutdown.send_replace(true);
    }
}

/// `host:port` to a socket address, or an error naming the key.
async fn resolve(key: &str, address: &str) -> Result<SocketAddr, PluginError> {
    socket_address::resolve(&format!("gossip: key `{key}`"), address).await
}

fn emit(events: &PeerEventSender, event: MemberEvent) {
    let kind = event.kind;
    if let Err(full) = events.push(PeerEvent { kind, record: event.record }) {
        if let Some(repeats) = EVENTS_DROPPED.check() {
            let node = &full.0.record.id;
            tracing::warn!(%node, "gossip: the event queue is full; a {kind:?} event was dropped{repeats}");
        }
    }
}

/// Moves datagrams between the socket and the state machine until shutdown.
async fn drive(shared: Arc<Shared>, events: PeerEventSender) {
    let mut shutdown = shared.shutdown.subscribe();
    let max_datagram = shared.node().config().max_datagram;
    // One byte more than accepted, so that an oversized datagram is seen as such.
    let mut buffer = vec![0u8; (max_datagram + 1).min(MAX_DATAGRAM + 1)];
    loop {
        let (transmits, changes, deadline) = {
            let mut node = shared.node();
            let now = Instant::now();
            node.set_wall_clock(now, WallClock::system_unix_ms());
            if node.next_timeout() <= now {
                node.handle_timeout(now);
            }
            let transmits: Vec<_> = std::iter::from_fn(|| node.poll_transmit()).collect();
            let changes: Vec<_> = std::iter::from_fn(|| node.poll_event()).collect();
            (transmits, changes, node.next_timeout())
        };
        for change in changes {
            emit(&events, change);
        }
        for (to, datagram) in transmits {
            if let Err(error) = shared.socket.send_to(&datagram, to).await {
                tracing::debug!("gossip: sending a datagram to {to} failed: {error}");
            }
        }
        tokio::select! {
            biased;
            // `wait_for`'s guard is not Send: drop it inside the branch future.
            _ = async { drop(shutdown.wait_for(|closing| *closing).await) } => return,
            received = shared.socket.recv_from(&mut buffer) => match received {
                Ok((n, from)) => {
                    let mut node = shared.node();
                    node.set_wall_clock(Instant::now(), WallClock::system_unix_ms());
                    receive(&mut node, from, &buffer[..n]);
                    for _ in 0..RECEIVE_BATCH {
                        match shared.socket.try_recv_from(&mut buffer) {
                            Ok((n, from)) => receive(&mut node, from, &buffer[..n]),
                            Err(_) => break,
                        }
                    }
                }
                // ICMP port unreachable from a dead member surfaces here on some systems.
                Err(error) => tracing::debug!("gossip: receiving failed: {error}"),
            },
            _ = tokio::time::sleep_until(deadline.into()) => {}
            _ = shared.wake.notified() => {}
        }
    }
}

fn receive(node: &mut GossipNode<SocketAddr>, from: SocketAddr, datagram: &[u8]) {
    if let Err(error) = node.handle_datagram(from, datagram, Instant::now()) {
        let limit = if error.is_authentication() { &UNAUTHENTICATED } else { &MALFORMED };
        if let Some(repeats) = limit.check() {
            tracing::warn!(
                "gossip: dropped a datagram of {} bytes from {from}: {error}{repeats}",
                datagram.len()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, service: &str) -> NodeRecord {
        let mut record = NodeRecord::new(id);
        record.addresses = vec![("tcp".into(), format!("127.0.0.1:1/{id}"))];
        record.services = vec![service.into()];
        record
    }

    async fn next(discovery: &GossipDiscovery) -> PeerEvent {
        tokio::time::timeout(Duration::from_secs(10), discovery.next_event())
            .await
            .expect("an event within 10 s")
            .unwrap()
            .expect("open")
    }

    fn settings(seeds: &[SocketAddr]) -> GossipSettings {
        GossipSettings {
            listen: Some("127.0.0.1:0".into()),
            seeds: seeds.iter().map(ToString::to_string).collect(),
            protocol_period_ms: Some(100),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn two_nodes_join_update_and_leave() {
        let a = GossipDiscovery::start(NodeId::new("a"), settings(&[])).await.unwrap();
        let b = GossipDiscovery::start(NodeId::new("b"), settings(&[a.local_address()])).await.unwrap();
        a.announce(record("a", "one")).await.unwrap();
        b.announce(record("b", "two")).await.unwrap();
        let joined = next(&a).await;
        assert_eq!(
            (joined.kind, joined.record.clone()),
            (comms_plugin_api::PeerEventKind::Joined, record("b", "two"))
        );
        assert_eq!(next(&b).await.record, record("a", "one"));
        assert_eq!(a.peers().await.unwrap(), vec![record("b", "two")], "excludes itself");
        b.announce(record("b", "three")).await.unwrap();
        let updated = next(&a).await;
        assert_eq!(
            (updated.kind, updated.record.services),
            (comms_plugin_api::PeerEventKind::Updated, vec!["three".into()])
        );
        b.withdraw(NodeId::new("b")).await.unwrap();
        assert_eq!(next(&a).await.kind, comms_plugin_api::PeerEventKind::Left);
        assert!(a.peers().await.unwrap().is_empty());
        b.close().await.unwrap();
        a.close().await.unwrap();
        assert!(a.next_event().await.unwrap().is_none(), "closed");
    }

    #[tokio::test]
    async fn unknown_keys_and_bad_values_are_errors_naming_the_key() {
        let error = comms_plugin_api::config::parse_config::<GossipSettings>("seedz = []").unwrap_err();
        assert!(error.message.contains("seedz"), "{error}");
        let settings = GossipSettings {
            protocol_period_ms: Some(100),
            probe_timeout_ms: Some(200),
            ..Default::default()
        };
        let error = settings.config().unwrap_err();
        assert!(error.message.contains("`probe_timeout_ms`"), "{error}");
        let settings = GossipSettings { seeds: vec!["no port".into()], ..Default::default() };
        let error = GossipDiscovery::start(NodeId::new("a"), settings).await.unwrap_err();
        assert!(error.message.contains("`seeds`") && error.message.contains("no port"), "{error}");
    }
}
