//! The [`Discovery`] the host loads: one UDP socket and a driver task around a [`DhtNode`].
//!
//! All protocol logic is in [`crate::node`]; this module binds the socket, resolves the seeds,
//! moves datagrams between the socket and the state machine, wakes it at its next timeout, and
//! turns its peer events into the host's event stream. With link security (the node runs with
//! `security.links = "noise"`) it also gives the state machine the wall-clock time that
//! authenticated datagrams carry and are checked against.

use crate::{
    auth::{LinkSecurity, WallClock},
    node::{Config, DhtNode, Event, LookupPurpose},
    protocol::MAX_DATAGRAM,
};
use comms_plugin_api::{
    async_trait,
    datagram_carrier::{Carrier, DatagramCarrier},
    log_rate::LogRateLimit,
    peer_events::{peer_event_queue, PeerEventQueue, PeerEventSender},
    socket_address, Discovery, ErrorCode, NodeId, NodeRecord, PeerEvent, PluginError,
};
use serde::Deserialize;
use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};
use tokio::{
    sync::{oneshot, watch, Notify},
    task::JoinHandle,
};

/// Listen address when the config names none.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:0";
/// Nodes whose peer events may wait for the host (one event each, the latest:
/// [`comms_plugin_api::peer_events`]; an event about one more node is dropped and logged, and
/// `peers()` stays exact).
pub const EVENT_CAPACITY: usize = 1024;
/// Datagrams read per turn of the driver before it sends again.
const RECEIVE_BATCH: usize = 64;

/// The `[discovery]` table of `plugin = "kademlia"`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KademliaSettings {
    /// Address to bind (UDP, or TCP with `carrier = "tcp"`); default [`DEFAULT_LISTEN`].
    pub listen: Option<String>,
    /// `"udp"` (default) or `"tcp"`: the datagrams of the protocol framed over TCP connections,
    /// where UDP does not pass (see [`comms_plugin_api::datagram_carrier`]). Every node of a
    /// network uses the same.
    #[serde(default)]
    pub carrier: Carrier,
    /// `host:port` of nodes already in the network; none for the first node.
    #[serde(default)]
    pub seeds: Vec<String>,
    /// Bucket size and replication factor, 1..=32; default 20.
    pub k: Option<usize>,
    /// Parallel queries per lookup, 1..=k; default 3.
    pub alpha: Option<usize>,
    /// Time to live of our records at other nodes (republished every half of it), 1 s..=24 h;
    /// default 10 min.
    pub record_ttl_ms: Option<u64>,
    /// How often idle buckets are refreshed, 1 s..=24 h; default 1 h.
    pub refresh_interval_ms: Option<u64>,
    /// How long a request may go unanswered, 10 ms..=60 s; default 1 s.
    pub request_timeout_ms: Option<u64>,
    /// Services whose providers are looked up periodically.
    #[serde(default)]
    pub find_services: Vec<String>,
    /// How often `find_services` are looked up, 100 ms..=24 h; default 30 s.
    pub find_interval_ms: Option<u64>,
    /// How often the seeds are pinged while no node is known, 100 ms..=1 h; default 2 s.
    pub bootstrap_retry_ms: Option<u64>,
}

fn millis(
    key: &str,
    value: Option<u64>,
    default: Duration,
    range: (u64, u64),
) -> Result<Duration, PluginError> {
    let Some(value) = value else { return Ok(default) };
    if !(range.0..=range.1).contains(&value) {
        return Err(PluginError::invalid_config(format!(
            "key `{key}`: {value} is outside {}..={}",
            range.0, range.1
        )));
    }
    Ok(Duration::from_millis(value))
}

impl KademliaSettings {
    /// The state machine's config, or an error naming the key that is out of range.
    pub fn node_config(&self) -> Result<Config, PluginError> {
        let defaults = Config::default();
        let k = self.k.unwrap_or(defaults.k);
        if !(1..=crate::protocol::MAX_CONTACTS).contains(&k) {
            return Err(PluginError::invalid_config(format!(
                "key `k`: {k} is outside 1..={}",
                crate::protocol::MAX_CONTACTS
            )));
        }
        let alpha = self.alpha.unwrap_or(defaults.alpha.min(k));
        if !(1..=k).contains(&alpha) {
            return Err(PluginError::invalid_config(format!("key `alpha`: {alpha} is outside 1..={k} (k)")));
        }
        const HOUR: u64 = 3_600_000;
        Ok(Config {
            k,
            alpha,
            record_ttl: millis("record_ttl_ms", self.record_ttl_ms, defaults.record_ttl, (1000, 24 * HOUR))?,
            refresh_interval: millis(
                "refresh_interval_ms",
                self.refresh_interval_ms,
                defaults.refresh_interval,
                (1000, 24 * HOUR),
            )?,
            request_timeout: millis(
                "request_timeout_ms",
                self.request_timeout_ms,
                defaults.request_timeout,
                (10, 60_000),
            )?,
            find_interval: millis(
                "find_interval_ms",
                self.find_interval_ms,
                defaults.find_interval,
                (100, 24 * HOUR),
            )?,
            bootstrap_retry: millis(
                "bootstrap_retry_ms",
                self.bootstrap_retry_ms,
                defaults.bootstrap_retry,
                (100, HOUR),
            )?,
            seed: random_seed(),
            ..defaults
        })
    }
}

/// Transaction ids must be unguessable by an off-path forger: seed from std's per-process
/// random keys and the clock.
fn random_seed() -> u64 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one(std::time::SystemTime::now())
}

struct Shared {
    node: Mutex<DhtNode<SocketAddr>>,
    /// Something was queued: the driver has datagrams to send.
    wake: Notify,
    /// Callers of `find_service` waiting for their lookup, by service (at most
    /// [`MAX_WAITING_LOOKUPS`]).
    waiting: Mutex<Vec<(String, oneshot::Sender<Vec<NodeRecord>>)>>,
}

/// `find_service` calls that may wait for a lookup at once; more get the providers known now.
const MAX_WAITING_LOOKUPS: usize = 256;

impl Shared {
    fn node(&self) -> MutexGuard<'_, DhtNode<SocketAddr>> {
        // The state machine stays usable after a panic elsewhere: availability matters more.
        self.node.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn waiting(&self) -> MutexGuard<'_, Vec<(String, oneshot::Sender<Vec<NodeRecord>>)>> {
        self.waiting.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Hands the providers a lookup of `service` found to every caller waiting for one.
    fn found(&self, service: &str, providers: &[NodeRecord]) {
        let mut waiting = self.waiting();
        let (done, still): (Vec<_>, Vec<_>) = waiting.drain(..).partition(|(name, _)| name == service);
        *waiting = still;
        for (_, caller) in done {
            let _ = caller.send(providers.to_vec());
        }
    }
}

/// Discovery by a Kademlia DHT.
pub struct KademliaDiscovery {
    shared: Arc<Shared>,
    local: SocketAddr,
    own: NodeId,
    events: PeerEventQueue,
    shutdown: watch::Sender<bool>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for KademliaDiscovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KademliaDiscovery")
            .field("local", &self.local)
            .field("own", &self.own)
            .finish_non_exhaustive()
    }
}

/// `host:port` to a socket address, or an error naming the key.
async fn resolve(key: &str, address: &str) -> Result<SocketAddr, PluginError> {
    socket_address::resolve(&format!("kademlia: key `{key}`"), address).await
}

impl KademliaDiscovery {
    /// Binds the socket, resolves the seeds and starts the driver, in plaintext. Must run inside
    /// a tokio runtime.
    pub async fn start(own: NodeId, settings: KademliaSettings) -> Result<Self, PluginError> {
        Self::start_with(own, settings, None).await
    }

    /// [`KademliaDiscovery::start`], authenticated when `security` is given (the node's link
    /// security, `security.links = "noise"`): datagrams signed by this node's identity, only
    /// those of allowed keys accepted, records signed by their nodes (see [`crate::node`]).
    /// `own` must be bound to the identity's key.
    pub async fn start_with(
        own: NodeId,
        settings: KademliaSettings,
        security: Option<LinkSecurity>,
    ) -> Result<Self, PluginError> {
        let config = settings.node_config()?;
        let listen = settings.listen.as_deref().unwrap_or(DEFAULT_LISTEN);
        let listen_address = resolve("listen", listen).await?;
        let mut seeds = Vec::with_capacity(settings.seeds.len());
        for seed in &settings.seeds {
            seeds.push(resolve("seeds", seed).await?);
        }
        let socket =
            DatagramCarrier::bind(settings.carrier, listen_address, MAX_DATAGRAM).await.map_err(|error| {
                let mut error = PluginError::from(error);
                error.message = format!(
                    "kademlia: binding {} {listen_address} (keys `listen`, `carrier`): {}",
                    settings.carrier, error.message
                );
                error
            })?;
        let local = socket.local_addr().map_err(PluginError::from)?;
        let now = Instant::now();
        let mut node = DhtNode::new(own.as_str(), config, now);
        if let Some(security) = security {
            node.authenticate(security, now, WallClock::system_unix_ms()).map_err(|why| {
                PluginError::invalid_config(format!("kademlia: authenticated datagrams: {why}"))
            })?;
        }
        // A node is not its own seed (a shared config may list every node).
        seeds.retain(|seed| *seed != local);
        node.bootstrap(seeds, now);
        node.set_find_services(settings.find_services.clone(), now);
        let shared =
            Arc::new(Shared { node: Mutex::new(node), wake: Notify::new(), waiting: Mutex::new(Vec::new()) });
        let (sender, receiver) = peer_event_queue(EVENT_CAPACITY);
        let shutdown = watch::channel(false).0;
        let task = tokio::spawn(drive(socket, shared.clone(), sender, shutdown.subscribe(), local));
        Ok(Self { shared, local, own, events: receiver, shutdown, task: Mutex::new(Some(task)) })
    }

    /// The bound UDP address (what other nodes list in `seeds`).
    pub fn local_address(&self) -> SocketAddr {
        self.local
    }
}

#[async_trait]
impl Discovery for KademliaDiscovery {
    async fn announce(&self, record: NodeRecord) -> Result<(), PluginError> {
        if record.id != self.own {
            return Err(PluginError::invalid_config(format!(
                "kademlia: this discovery serves node `{}`, not `{}`",
                self.own, record.id
            )));
        }
        self.shared
            .node()
            .publish(record, Instant::now())
            .map_err(|error| PluginError::new(ErrorCode::TOO_LARGE, format!("kademlia announce: {error}")))?;
        self.shared.wake.notify_one();
        Ok(())
    }

    async fn withdraw(&self, node: NodeId) -> Result<(), PluginError> {
        if node == self.own {
            self.shared.node().withdraw(Instant::now());
            self.shared.wake.notify_one();
        }
        Ok(())
    }

    async fn peers(&self) -> Result<Vec<NodeRecord>, PluginError> {
        Ok(self.shared.node().known_records())
    }

    async fn next_event(&self) -> Result<Option<PeerEvent>, PluginError> {
        Ok(self.events.next(self.shutdown.subscribe()).await)
    }

    /// Looks the providers of `service` up in the DHT now (the host asks when it knows none)
    /// and returns those found; if too many lookups are running, the providers known already.
    async fn find_service(&self, service: &str) -> Result<Vec<NodeRecord>, PluginError> {
        let known = |node: &DhtNode<SocketAddr>| -> Vec<NodeRecord> {
            let offers = |record: &NodeRecord| record.services.iter().any(|name| name == service);
            node.known_records().into_iter().filter(offers).collect()
        };
        let (sender, found) = oneshot::channel();
        {
            let mut node = self.shared.node();
            let mut waiting = self.shared.waiting();
            if waiting.len() >= MAX_WAITING_LOOKUPS || node.find_service(service, Instant::now()).is_none() {
                return Ok(known(&node));
            }
            waiting.push((service.to_string(), sender));
        }
        self.shared.wake.notify_one();
        let mut closing = self.shutdown.subscribe();
        tokio::select! {
            found = found => Ok(found.unwrap_or_default()),
            _ = closing.wait_for(|closed| *closed) => Ok(Vec::new()),
        }
    }

    async fn close(&self) -> Result<(), PluginError> {
        // GOODBYE to every contact (and removal of our values): peers see us leave now rather
        // than when our records expire. The driver sends what is queued before it stops.
        self.shared.node().withdraw(Instant::now());
        self.shutdown.send_replace(true);
        let task = self.task.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take();
        if let Some(task) = task {
            let _ = task.await;
        }
        Ok(())
    }
}

fn forward(shared: &Shared, events: &PeerEventSender, local: SocketAddr, event: Event) {
    match event {
        Event::Peer(event) => {
            let kind = event.kind;
            // Rate-limited: a flood of records (a hostile peer's) must not flood the log too.
            static EVENTS_DROPPED: LogRateLimit = LogRateLimit::standard();
            if let Err(full) = events.push(event) {
                if let Some(repeats) = EVENTS_DROPPED.check() {
                    let node = &full.0.record.id;
                    tracing::warn!(
                        %node,
                        "kademlia {local}: the event queue is full; a {kind:?} event was dropped{repeats}"
                    );
                }
            }
        }
        Event::Lookup(report) => {
            if let LookupPurpose::FindService(service) = &report.purpose {
                shared.found(service, &report.providers);
            }
            tracing::debug!(
                "kademlia {local}: {:?} lookup of {} finished: {} queries, {} answers, {} provider(s), {:?}",
                report.purpose,
                report.target,
                report.queries,
                report.answers,
                report.providers.len(),
                report.duration
            );
        }
    }
}

/// One turn of the state machine: fire due timers, take what it wants sent and reported.
fn step(
    shared: &Shared,
    events: &PeerEventSender,
    local: SocketAddr,
) -> (Vec<(SocketAddr, Vec<u8>)>, Option<Instant>) {
    let mut node = shared.node();
    let now = Instant::now();
    node.set_wall_clock(now, WallClock::system_unix_ms());
    if node.next_timeout().is_some_and(|at| at <= now) {
        node.handle_timeout(now);
    }
    let transmits: Vec<_> = std::iter::from_fn(|| node.poll_transmit()).collect();
    while let Some(event) = node.poll_event() {
        forward(shared, events, local, event);
    }
    (transmits, node.next_timeout())
}

async fn send_all(socket: &DatagramCarrier, local: SocketAddr, transmits: Vec<(SocketAddr, Vec<u8>)>) {
    for (to, datagram) in transmits {
        if let Err(error) = socket.send_to(&datagram, to).await {
            tracing::debug!("kademlia {local}: sending to {to} failed: {error}");
        }
    }
}

/// Hands one datagram to the state machine; logs (rate-limited) why one was refused for its
/// authentication. (Malformed plaintext datagrams are only counted, as before.)
fn receive(node: &mut DhtNode<SocketAddr>, local: SocketAddr, from: SocketAddr, datagram: &[u8]) {
    static UNAUTHENTICATED: LogRateLimit = LogRateLimit::standard();
    if let Err(error) = node.handle_datagram_checked(from, datagram, Instant::now()) {
        if error.is_authentication() {
            if let Some(repeats) = UNAUTHENTICATED.check() {
                tracing::warn!(
                    "kademlia {local}: dropped a datagram of {} bytes from {from}: {error}{repeats}",
                    datagram.len()
                );
            }
        }
    }
}

/// Moves datagrams between the socket and the state machine until shutdown.
async fn drive(
    socket: DatagramCarrier,
    shared: Arc<Shared>,
    events: PeerEventSender,
    mut shutdown: watch::Receiver<bool>,
    local: SocketAddr,
) {
    // One byte more than the largest datagram, so that an oversized one is seen as such.
    let mut buffer = vec![0u8; MAX_DATAGRAM + 1];
    loop {
        let (transmits, timeout) = step(&shared, &events, local);
        send_all(&socket, local, transmits).await;
        if *shutdown.borrow() {
            // What close queued (GOODBYEs) goes out before the task ends.
            let (transmits, _) = step(&shared, &events, local);
            send_all(&socket, local, transmits).await;
            return;
        }
        let sleep = async {
            match timeout {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.changed() => {}
            received = socket.recv_from(&mut buffer) => match received {
                Ok((n, from)) => {
                    let mut node = shared.node();
                    node.set_wall_clock(Instant::now(), WallClock::system_unix_ms());
                    receive(&mut node, local, from, &buffer[..n]);
                    for _ in 0..RECEIVE_BATCH {
                        match socket.try_recv_from(&mut buffer) {
                            Ok((n, from)) => receive(&mut node, local, from, &buffer[..n]),
                            Err(_) => break,
                        }
                    }
                }
                // ICMP "port unreachable" from a vanished peer surfaces here on some systems.
                Err(error) => tracing::debug!("kademlia {local}: receiving failed: {error}"),
            },
            _ = sleep => {}
            _ = shared.wake.notified() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use comms_plugin_api::{config::parse_config, PeerEventKind};

    #[test]
    fn unknown_keys_and_out_of_range_values_are_errors_naming_the_key() {
        let error = parse_config::<KademliaSettings>("sedes = []").unwrap_err();
        assert!(error.message.contains("sedes"), "{error}");
        for (text, key) in
            [("k = 0", "k"), ("k = 40", "k"), ("alpha = 21", "alpha"), ("record_ttl_ms = 5", "record_ttl_ms")]
        {
            let settings: KademliaSettings = parse_config(text).unwrap();
            let error = settings.node_config().unwrap_err();
            assert!(error.message.contains(&format!("`{key}`")), "{text}: {error}");
        }
        let settings: KademliaSettings = parse_config(
            "listen = \"127.0.0.1:0\"\nseeds = [\"127.0.0.1:9\"]\nk = 8\nfind_services = [\"echo\"]",
        )
        .unwrap();
        assert_eq!(settings.node_config().unwrap().k, 8);
    }

    fn record(id: &str, services: &[&str]) -> NodeRecord {
        let mut record = NodeRecord::new(NodeId::new(id));
        record.addresses = vec![("tcp".into(), format!("127.0.0.1:{}", 7000 + id.len()))];
        record.services = services.iter().map(|s| s.to_string()).collect();
        record
    }

    async fn next_about(discovery: &KademliaDiscovery, id: &str) -> PeerEvent {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let event = discovery.next_event().await.unwrap().expect("open");
                if event.record.id.as_str() == id {
                    return event;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no event about {id}"))
    }

    /// `find_service` (what the host calls when it knows no provider) runs a lookup and returns
    /// what it found, for a node that looks up nothing by itself; a service nobody provides
    /// ends with nothing, not a hang.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn find_service_looks_the_providers_up_on_demand() {
        let settings = |seeds: Vec<String>| KademliaSettings {
            listen: Some("127.0.0.1:0".into()),
            seeds,
            bootstrap_retry_ms: Some(100),
            request_timeout_ms: Some(200),
            ..Default::default()
        };
        let seed = KademliaDiscovery::start(NodeId::new("seed"), settings(vec![])).await.unwrap();
        let seeds = vec![seed.local_address().to_string()];
        let provider =
            KademliaDiscovery::start(NodeId::new("provider"), settings(seeds.clone())).await.unwrap();
        let client = KademliaDiscovery::start(NodeId::new("client"), settings(seeds)).await.unwrap();
        seed.announce(record("seed", &[])).await.unwrap();
        provider.announce(record("provider", &["echo"])).await.unwrap();
        client.announce(record("client", &[])).await.unwrap();
        // The provider's STORE reaches the nodes closest to the key soon after it joined: each
        // call is one lookup, repeated until one finds it.
        let started = Instant::now();
        let found = loop {
            let found = client.find_service("echo").await.unwrap();
            if !found.is_empty() {
                break found;
            }
            assert!(started.elapsed() < Duration::from_secs(10), "no lookup found the provider");
        };
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(
            (found[0].id.as_str(), found[0].services.as_slice()),
            ("provider", &["echo".to_string()][..])
        );
        let nobody = tokio::time::timeout(Duration::from_secs(10), client.find_service("nobody")).await;
        assert_eq!(nobody.expect("a lookup ends").unwrap(), Vec::<NodeRecord>::new());
        for discovery in [client, provider, seed] {
            discovery.close().await.unwrap();
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn three_nodes_over_loopback_join_find_a_provider_and_see_a_close() {
        let settings = |seeds: Vec<String>| KademliaSettings {
            listen: Some("127.0.0.1:0".into()),
            seeds,
            find_services: vec!["echo".into()],
            find_interval_ms: Some(200),
            bootstrap_retry_ms: Some(100),
            ..Default::default()
        };
        let a = KademliaDiscovery::start(NodeId::new("a"), settings(vec![])).await.unwrap();
        let seed = vec![a.local_address().to_string()];
        let b = KademliaDiscovery::start(NodeId::new("b"), settings(seed.clone())).await.unwrap();
        let c = KademliaDiscovery::start(NodeId::new("c"), settings(seed)).await.unwrap();
        a.announce(record("a", &[])).await.unwrap();
        b.announce(record("b", &["echo"])).await.unwrap();
        c.announce(record("c", &[])).await.unwrap();
        let joined = next_about(&c, "b").await;
        assert_eq!(joined.kind, PeerEventKind::Joined);
        // The record may arrive before or after b's service is in it.
        let started = Instant::now();
        while !c.peers().await.unwrap().iter().any(|r| r.id.as_str() == "b" && r.services == ["echo"]) {
            assert!(started.elapsed() < Duration::from_secs(10), "c never saw b's service");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(c.peers().await.unwrap().iter().all(|r| r.id.as_str() != "c"), "not itself");
        // Garbage and oversized datagrams at the seed change nothing: a new node still joins
        // through it.
        let junk = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        for n in 0..200u32 {
            let length = (n as usize * 37) % 300;
            let bytes: Vec<u8> = (0..length).map(|i| (i as u32 * 31 + n) as u8).collect();
            junk.send_to(&bytes, a.local_address()).unwrap();
        }
        junk.send_to(&vec![crate::protocol::MAGIC; MAX_DATAGRAM + 100], a.local_address()).unwrap();
        let d = KademliaDiscovery::start(NodeId::new("d"), settings(vec![a.local_address().to_string()]))
            .await
            .unwrap();
        d.announce(record("d", &[])).await.unwrap();
        assert_eq!(next_about(&c, "d").await.kind, PeerEventKind::Joined);
        assert!(a.shared.node().stats().malformed >= 200, "{:?}", a.shared.node().stats());
        d.close().await.unwrap();
        b.close().await.unwrap();
        let started = Instant::now();
        while c.peers().await.unwrap().iter().any(|r| r.id.as_str() == "b") {
            assert!(started.elapsed() < Duration::from_secs(10), "b never left c's view");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        a.close().await.unwrap();
        c.close().await.unwrap();
        // What was queued drains, then the stream ends.
        tokio::time::timeout(Duration::from_secs(5), async {
            while c.next_event().await.unwrap().is_some() {}
        })
        .await
        .expect("next_event ends once closed");
    }
}
