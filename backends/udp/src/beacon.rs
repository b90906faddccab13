//! Zero-config discovery by multicast beacons.
//!
//! Every node periodically multicasts a beacon with its [`NodeRecord`] (id, transport addresses,
//! services, topics, metadata) to a group; every node listening on the group keeps the records it
//! hears. A peer joins when its first beacon arrives, leaves when it withdraws (a goodbye beacon)
//! or when `missed_beacons` beacons in a row did not arrive.
//!
//! ```toml
//! [discovery]
//! plugin = "udp"
//! group = "239.255.67.1"   # default; an IPv6 group works too, e.g. "ff02::4353:1"
//! port = 47800             # default
//! interface = "10.0.0.5"   # IPv4: the address of the interface to use; IPv6: its name ("eth0")
//!                          # or index; default: the kernel's choice (name one for ff02:: groups)
//! ttl = 1                  # TTL / hop limit; default 1: the local network only
//! interval_ms = 250        # default 250
//! missed_beacons = 4       # default 4, so a silent peer leaves after about a second
//! ```
//!
//! ## Beacon format (version 1)
//!
//! ```text
//! [4]  magic "CMB1"
//! u8   kind: 1 announce, 2 withdraw
//! u32  interval in milliseconds of the sender
//! str  node id; then for announce only:
//! u16  address count, (str transport, str address) each
//! u16  service count, str each
//! u16  topic count, str each
//! u16  metadata count, (str name, str value) each
//! str = u16 big-endian byte length, then UTF-8
//! ```
//!
//! Limits: a record must encode into one datagram ([`MAX_BEACON`] bytes); at most
//! [`MAX_PEERS`] peers are tracked (beacons from further nodes are ignored until one leaves);
//! events about at most [`EVENT_CAPACITY`] nodes wait for the host (one per node, the latest:
//! [`comms_plugin_api::peer_events`]; an event about one more node is dropped and logged, and
//! [`Discovery::peers`] stays exact). One address family per beacon: an IPv6 group needs nodes
//! that listen on IPv6 too, and the transport addresses in the records are whatever the
//! transports advertise (see the transport's `listen` and `advertise`).

use comms_plugin_api::{
    async_trait,
    peer_events::{peer_event_queue, PeerEventQueue, PeerEventSender},
    Discovery, NodeId, NodeRecord, PeerEvent, PeerEventKind, PluginError,
};
use serde::Deserialize;
use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio::{net::UdpSocket, sync::watch, task::JoinHandle, time::Instant};

/// The largest beacon.
pub const MAX_BEACON: usize = 60_000;
/// Peers tracked at once.
pub const MAX_PEERS: usize = 4096;
/// Nodes whose events may wait for the host (one event each).
pub const EVENT_CAPACITY: usize = 1024;
const MAGIC: &[u8; 4] = b"CMB1";
const KIND_ANNOUNCE: u8 = 1;
const KIND_WITHDRAW: u8 = 2;

/// The discovery's config table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BeaconSettings {
    /// Multicast group, IPv4 or IPv6.
    pub group: IpAddr,
    /// UDP port of the group.
    pub port: u16,
    /// The interface to send and join on: for an IPv4 group its address, for an IPv6 group its
    /// name or index. `None` (or `0.0.0.0`, or `0`) lets the kernel choose.
    pub interface: Option<String>,
    /// Multicast TTL (IPv4) or hop limit (IPv6): 1 keeps beacons on the local network.
    pub ttl: u32,
    /// Milliseconds between beacons.
    pub interval_ms: u64,
    /// Beacons a peer may miss before it is taken for gone.
    pub missed_beacons: u32,
}

impl Default for BeaconSettings {
    fn default() -> Self {
        Self {
            group: IpAddr::V4(Ipv4Addr::new(239, 255, 67, 1)),
            port: 47800,
            interface: None,
            ttl: 1,
            interval_ms: 250,
            missed_beacons: 4,
        }
    }
}

struct Known {
    record: NodeRecord,
    expires: Instant,
}

struct State {
    own: Option<NodeRecord>,
    peers: HashMap<NodeId, Known>,
}

/// A discovery by multicast beacons.
pub struct MulticastBeacon {
    socket: Arc<UdpSocket>,
    target: SocketAddr,
    interval: Duration,
    state: Arc<Mutex<State>>,
    events: PeerEventQueue,
    shutdown: watch::Sender<bool>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for MulticastBeacon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MulticastBeacon").field("target", &self.target).finish_non_exhaustive()
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl MulticastBeacon {
    /// Joins the group and starts beaconing and listening. Must run inside a tokio runtime.
    pub fn start(settings: BeaconSettings) -> Result<Self, PluginError> {
        if !settings.group.is_multicast() {
            return Err(PluginError::invalid_config(format!(
                "key `group`: {} is not a multicast address",
                settings.group
            )));
        }
        if settings.interval_ms == 0 || settings.missed_beacons == 0 {
            return Err(PluginError::invalid_config(
                "keys `interval_ms` and `missed_beacons` must be positive",
            ));
        }
        let what = format!("multicast group {}:{}", settings.group, settings.port);
        let fail = |error: std::io::Error| PluginError::from(error).with_context(&what);
        let (socket, target) = match settings.group {
            IpAddr::V4(group) => {
                let interface = ipv4_interface(settings.interface.as_deref())?;
                let socket = socket2::Socket::new(
                    socket2::Domain::IPV4,
                    socket2::Type::DGRAM,
                    Some(socket2::Protocol::UDP),
                )
                .map_err(fail)?;
                socket.set_reuse_address(true).map_err(fail)?;
                socket.set_reuse_port(true).map_err(fail)?;
                socket.bind(&SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, settings.port).into()).map_err(fail)?;
                socket.join_multicast_v4(&group, &interface).map_err(fail)?;
                socket.set_multicast_if_v4(&interface).map_err(fail)?;
                socket.set_multicast_ttl_v4(settings.ttl).map_err(fail)?;
                socket.set_multicast_loop_v4(true).map_err(fail)?;
                (socket, SocketAddr::V4(SocketAddrV4::new(group, settings.port)))
            }
            IpAddr::V6(group) => {
                let index = ipv6_interface(settings.interface.as_deref())?;
                let socket = socket2::Socket::new(
                    socket2::Domain::IPV6,
                    socket2::Type::DGRAM,
                    Some(socket2::Protocol::UDP),
                )
                .map_err(fail)?;
                socket.set_only_v6(true).map_err(fail)?;
                socket.set_reuse_address(true).map_err(fail)?;
                socket.set_reuse_port(true).map_err(fail)?;
                socket
                    .bind(&SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, settings.port, 0, 0).into())
                    .map_err(fail)?;
                socket.join_multicast_v6(&group, index).map_err(fail)?;
                if index != 0 {
                    socket.set_multicast_if_v6(index).map_err(fail)?;
                }
                socket.set_multicast_hops_v6(settings.ttl).map_err(fail)?;
                socket.set_multicast_loop_v6(true).map_err(fail)?;
                (socket, SocketAddr::V6(SocketAddrV6::new(group, settings.port, 0, index)))
            }
        };
        socket.set_nonblocking(true).map_err(fail)?;
        let socket = Arc::new(UdpSocket::from_std(socket.into()).map_err(fail)?);
        let interval = Duration::from_millis(settings.interval_ms);
        let state = Arc::new(Mutex::new(State { own: None, peers: HashMap::new() }));
        let (sender, receiver) = peer_event_queue(EVENT_CAPACITY);
        let shutdown = watch::channel(false).0;
        let task = tokio::spawn(run(
            socket.clone(),
            target,
            interval,
            settings.missed_beacons,
            state.clone(),
            sender,
            shutdown.subscribe(),
        ));
        Ok(Self { socket, target, interval, state, events: receiver, shutdown, task: Mutex::new(Some(task)) })
    }
}

/// The `interface` key for an IPv4 group: the interface's address.
fn ipv4_interface(interface: Option<&str>) -> Result<Ipv4Addr, PluginError> {
    match interface {
        None => Ok(Ipv4Addr::UNSPECIFIED),
        Some(text) => text.parse().map_err(|_| {
            PluginError::invalid_config(format!(
                "key `interface`: `{text}` is not an IPv4 address (with an IPv4 group, name the interface by its address)"
            ))
        }),
    }
}

/// The `interface` key for an IPv6 group: an interface index, or a name looked up in
/// `/sys/class/net`; 0 lets the kernel choose.
fn ipv6_interface(interface: Option<&str>) -> Result<u32, PluginError> {
    let Some(text) = interface else { return Ok(0) };
    if let Ok(index) = text.parse::<u32>() {
        return Ok(index);
    }
    // Interface names never contain '/'; "." and ".." would name other directories.
    let valid_name = !text.is_empty() && !text.contains('/') && text != "." && text != "..";
    let index = valid_name
        .then(|| std::fs::read_to_string(format!("/sys/class/net/{text}/ifindex")).ok())
        .flatten()
        .and_then(|index| index.trim().parse::<u32>().ok());
    index.ok_or_else(|| {
        PluginError::invalid_config(format!(
            "key `interface`: no network interface named `{text}` (with an IPv6 group, give an interface name or index)"
        ))
    })
}

trait WithContext {
    fn with_context(self, what: &str) -> Self;
}

impl WithContext for PluginError {
    fn with_context(mut self, what: &str) -> Self {
        self.message = format!("{what}: {}", self.message);
        self
    }
}

#[async_trait]
impl Discovery for MulticastBeacon {
    async fn announce(&self, record: NodeRecord) -> Result<(), PluginError> {
        let beacon = encode(KIND_ANNOUNCE, self.interval, &record)?;
        lock(&self.state).own = Some(record);
        let _ = self.socket.send_to(&beacon, self.target).await;
        Ok(())
    }

    async fn withdraw(&self, node: NodeId) -> Result<(), PluginError> {
        let own = lock(&self.state).own.take();
        if let Some(own) = own.filter(|own| own.id == node) {
            let beacon = encode(KIND_WITHDRAW, self.interval, &own)?;
            self.socket.send_to(&beacon, self.target).await.map_err(|error| {
                PluginError::from(error).with_context(&format!("withdraw beacon to {}", self.target))
            })?;
        }
        Ok(())
    }

    async fn peers(&self) -> Result<Vec<NodeRecord>, PluginError> {
        Ok(lock(&self.state).peers.values().map(|known| known.record.clone()).collect())
    }

    async fn next_event(&self) -> Result<Option<PeerEvent>, PluginError> {
        Ok(self.events.next(self.shutdown.subscribe()).await)
    }

    async fn close(&self) -> Result<(), PluginError> {
        let own = lock(&self.state).own.clone();
        if let Some(own) = own {
            self.withdraw(own.id).await?;
        }
        self.shutdown.send_replace(true);
        let task = self.task.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take();
        if let Some(task) = task {
            let _ = task.await;
        }
        Ok(())
    }
}

fn emit(events: &PeerEventSender, kind: PeerEventKind, record: NodeRecord) {
    if let Err(full) = events.push(PeerEvent { kind, record }) {
        let node = &full.0.record.id;
        tracing::warn!(%node, "udp discovery: the event queue is full; a {kind:?} event was dropped");
    }
}

async fn run(
    socket: Arc<UdpSocket>,
    target: SocketAddr,
    interval: Duration,
    missed: u32,
    state: Arc<Mutex<State>>,
    events: PeerEventSender,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(interval);
    let mut buffer = vec![0u8; MAX_BEACON + 1];
    loop {
        tokio::select! {
            // `wait_for`'s guard is not Send: drop it inside the branch future.
            _ = async { drop(shutdown.wait_for(|closing| *closing).await) } => return,
            _ = ticker.tick() => {
                let beacon = expire_and_encode(&state, &events, interval);
                if let Some(beacon) = beacon {
                    if let Err(error) = socket.send_to(&beacon, target).await {
                        tracing::debug!("udp discovery: beacon to {target} failed: {error}");
                    }
                }
            }
            received = socket.recv_from(&mut buffer) => {
                if let Ok((n, from)) = received {
                    handle_beacon(&state, &events, missed, &buffer[..n], from);
                }
            }
        }
    }
}

/// Drops peers whose beacons stopped, and encodes this node's beacon (if it announced).
fn expire_and_encode(state: &Mutex<State>, events: &PeerEventSender, interval: Duration) -> Option<Vec<u8>> {
    let mut state = lock(state);
    let now = Instant::now();
    let expired: Vec<NodeId> =
        state.peers.iter().filter(|(_, known)| known.expires <= now).map(|(id, _)| id.clone()).collect();
    for id in expired {
        if let Some(known) = state.peers.remove(&id) {
            emit(events, PeerEventKind::Left, known.record);
        }
    }
    state.own.as_ref().and_then(|own| encode(KIND_ANNOUNCE, interval, own).ok())
}

/// Updates the peer table from one received beacon.
fn handle_beacon(
    state: &Mutex<State>,
    events: &PeerEventSender,
    missed: u32,
    bytes: &[u8],
    from: SocketAddr,
) {
    let Some((kind, their_interval, record)) = decode(bytes) else {
        tracing::debug!("udp discovery: dropped a malformed beacon from {from}");
        return;
    };
    let mut state = lock(state);
    if state.own.as_ref().is_some_and(|own| own.id == record.id) {
        return;
    }
    if kind == KIND_WITHDRAW {
        if let Some(known) = state.peers.remove(&record.id) {
            emit(events, PeerEventKind::Left, known.record);
        }
        return;
    }
    let expires = Instant::now() + their_interval.max(Duration::from_millis(10)) * missed;
    let tracked = state.peers.len();
    match state.peers.get_mut(&record.id) {
        Some(known) => {
            known.expires = expires;
            if known.record != record {
                known.record = record.clone();
                emit(events, PeerEventKind::Updated, record);
            }
        }
        None if tracked < MAX_PEERS => {
            state.peers.insert(record.id.clone(), Known { record: record.clone(), expires });
            emit(events, PeerEventKind::Joined, record);
        }
        None => {}
    }
}

fn put_str(out: &mut Vec<u8>, text: &str) -> Result<(), PluginError> {
    let length = u16::try_from(text.len()).map_err(|_| {
        PluginError::invalid_config(format!(
            "a record field of {} bytes is too long for a beacon",
            text.len()
        ))
    })?;
    out.extend_from_slice(&length.to_be_bytes());
    out.extend_from_slice(text.as_bytes());
    Ok(())
}

fn put_count(out: &mut Vec<u8>, n: usize) -> Result<(), PluginError> {
    let n = u16::try_from(n)
        .map_err(|_| PluginError::invalid_config("a record list is too long for a beacon"))?;
    out.extend_from_slice(&n.to_be_bytes());
    Ok(())
}

fn encode(kind: u8, interval: Duration, record: &NodeRecord) -> Result<Vec<u8>, PluginError> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(MAGIC);
    out.push(kind);
    out.extend_from_slice(&(interval.as_millis().min(u32::MAX as u128) as u32).to_be_bytes());
    put_str(&mut out, record.id.as_str())?;
    if kind == KIND_ANNOUNCE {
        put_count(&mut out, record.addresses.len())?;
        for (transport, address) in &record.addresses {
            put_str(&mut out, transport)?;
            put_str(&mut out, address)?;
        }
        for list in [&record.services, &record.topics] {
            put_count(&mut out, list.len())?;
            for item in list {
                put_str(&mut out, item)?;
            }
        }
        put_count(&mut out, record.metadata.len())?;
        for (name, value) in &record.metadata {
            put_str(&mut out, name)?;
            put_str(&mut out, value)?;
        }
    }
    if out.len() > MAX_BEACON {
        return Err(PluginError::new(
            comms_plugin_api::ErrorCode::TOO_LARGE,
            format!(
                "the record of node {} needs a {}-byte beacon; the limit is {MAX_BEACON}",
                record.id,
                out.len()
            ),
        ));
    }
    Ok(out)
}

fn decode(bytes: &[u8]) -> Option<(u8, Duration, NodeRecord)> {
    let mut r = bytes;
    fn take<'a>(r: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        (r.len() >= n).then(|| {
            let (head, rest) = r.split_at(n);
            *r = rest;
            head
        })
    }
    fn count(r: &mut &[u8]) -> Option<usize> {
        take(r, 2).map(|b| u16::from_be_bytes([b[0], b[1]]) as usize)
    }
    fn string(r: &mut &[u8]) -> Option<String> {
        let n = count(r)?;
        String::from_utf8(take(r, n)?.to_vec()).ok()
    }
    if take(&mut r, 4)? != MAGIC {
        return None;
    }
    let kind = take(&mut r, 1)?[0];
    let interval = Duration::from_millis(u32::from_be_bytes(take(&mut r, 4)?.try_into().ok()?) as u64);
    let id = NodeId::new(string(&mut r)?);
    let mut record = NodeRecord::new(id);
    match kind {
        KIND_WITHDRAW => {}
        KIND_ANNOUNCE => {
            for _ in 0..count(&mut r)? {
                record.addresses.push((string(&mut r)?, string(&mut r)?));
            }
            for _ in 0..count(&mut r)? {
                record.services.push(string(&mut r)?);
            }
            for _ in 0..count(&mut r)? {
                record.topics.push(string(&mut r)?);
            }
            for _ in 0..count(&mut r)? {
                record.metadata.push((string(&mut r)?, string(&mut r)?));
            }
        }
        _ => return None,
    }
    r.is_empty().then_some((kind, interval, record))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> NodeRecord {
        {
            let mut value = NodeRecord::new(NodeId::new(id));
            value.addresses = vec![("udp".into(), "127.0.0.1:1234".into())];
            value.services = vec!["echo".into()];
            value.topics = vec!["news.>".into()];
            value.metadata = vec![("k".into(), "v".into())];
            value
        }
    }

    #[test]
    fn beacons_round_trip_and_garbage_is_rejected() {
        let bytes = encode(KIND_ANNOUNCE, Duration::from_millis(250), &record("a")).unwrap();
        assert_eq!(decode(&bytes), Some((KIND_ANNOUNCE, Duration::from_millis(250), record("a"))));
        for cut in 0..bytes.len() {
            assert!(decode(&bytes[..cut]).is_none(), "cut at {cut}");
        }
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(decode(&trailing).is_none());
    }

    #[tokio::test]
    async fn two_nodes_find_each_other_and_see_a_withdraw() {
        // A port of its own so that parallel tests do not hear each other.
        let port = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let settings = BeaconSettings { port, interval_ms: 50, ..Default::default() };
        let a = MulticastBeacon::start(settings.clone()).unwrap();
        let b = MulticastBeacon::start(settings).unwrap();
        a.announce(record("a")).await.unwrap();
        b.announce(record("b")).await.unwrap();
        let joined =
            tokio::time::timeout(Duration::from_secs(5), a.next_event()).await.unwrap().unwrap().unwrap();
        assert_eq!((joined.kind, joined.record), (PeerEventKind::Joined, record("b")));
        assert_eq!(a.peers().await.unwrap(), vec![record("b")], "excludes itself");
        b.withdraw(NodeId::new("b")).await.unwrap();
        let left =
            tokio::time::timeout(Duration::from_secs(5), a.next_event()).await.unwrap().unwrap().unwrap();
        assert_eq!(left.kind, PeerEventKind::Left);
        assert!(a.peers().await.unwrap().is_empty());
        a.close().await.unwrap();
        assert!(a.next_event().await.unwrap().is_none(), "closed");
        b.close().await.unwrap();
    }

    /// More changes than events could wait for, while the host does not read: it still learns
    /// where every peer is now (with a queue of events, the last ones were dropped).
    #[tokio::test]
    async fn a_host_that_reads_late_gets_every_peers_latest_state() {
        let state = Mutex::new(State { own: None, peers: HashMap::new() });
        let (events, queue) = peer_event_queue(EVENT_CAPACITY);
        let from: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let beacon = |kind: u8, id: &str, version: usize| {
            let mut value = record(id);
            value.metadata = vec![("version".into(), version.to_string())];
            encode(kind, Duration::from_millis(50), &value).unwrap()
        };
        handle_beacon(&state, &events, 3, &beacon(KIND_ANNOUNCE, "gone", 0), from);
        let last = 2 * EVENT_CAPACITY;
        for version in 1..=last {
            handle_beacon(&state, &events, 3, &beacon(KIND_ANNOUNCE, "busy", version), from);
        }
        handle_beacon(&state, &events, 3, &beacon(KIND_WITHDRAW, "gone", 0), from);

        let (_open, closing) = watch::channel(false);
        let gone = queue.next(closing.clone()).await.unwrap();
        assert_eq!((gone.kind, gone.record.id.as_str()), (PeerEventKind::Left, "gone"));
        let busy = queue.next(closing).await.unwrap();
        assert_eq!((busy.kind, busy.record.id.as_str()), (PeerEventKind::Joined, "busy"));
        assert_eq!(busy.record.metadata, vec![("version".into(), last.to_string())]);
        assert!(queue.is_empty());
    }

    #[test]
    fn a_group_that_is_not_multicast_is_refused_naming_the_key() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        for group in ["10.0.0.1", "fd00::1"] {
            let settings = BeaconSettings { group: group.parse().unwrap(), ..Default::default() };
            let error = runtime.block_on(async { MulticastBeacon::start(settings).unwrap_err() });
            assert!(error.message.contains("group"), "{error}");
        }
        for (group, interface) in [("239.255.67.1", "eth-that-is-not-there"), ("ff02::4353:1", "no/such/if")]
        {
            let settings = BeaconSettings {
                group: group.parse().unwrap(),
                interface: Some(interface.into()),
                ..Default::default()
            };
            let error = runtime.block_on(async { MulticastBeacon::start(settings).unwrap_err() });
            assert!(error.message.contains("interface") && error.message.contains(interface), "{error}");
        }
    }
}
