//! The NAT traversal state machine in a simulated network with a simulated clock: a public
//! rendezvous, two clients each behind its own simulated NAT (endpoint-independent "cone"
//! mapping, or a "symmetric" one with a new public port per destination; both filter inbound
//! datagrams by the remote address and port the mapping has sent to, as Linux conntrack does),
//! and the reliability core on top of every node, wired as the transport wires them.

use super::*;
use crate::reliability::{self, Endpoint};
use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};

const RENDEZVOUS: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 1)), 7000);
const LATENCY: Duration = Duration::from_millis(5);
const STEP: Duration = Duration::from_millis(1);
const A: usize = 1;
const B: usize = 2;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mapping {
    Cone,
    Symmetric,
}

struct NatBox {
    public: Ipv4Addr,
    mapping: Mapping,
    out: HashMap<(SocketAddr, Option<SocketAddr>), u16>,
    back: HashMap<u16, (SocketAddr, HashSet<SocketAddr>)>,
    next_port: u16,
}

impl NatBox {
    fn new(public: Ipv4Addr, mapping: Mapping, first_port: u16) -> Self {
        Self { public, mapping, out: HashMap::new(), back: HashMap::new(), next_port: first_port }
    }

    /// The public source of a datagram from `private` to `to`; opens the filter for `to`.
    fn outbound(&mut self, private: SocketAddr, to: SocketAddr) -> SocketAddr {
        let key = (private, (self.mapping == Mapping::Symmetric).then_some(to));
        let port = match self.out.get(&key) {
            Some(port) => *port,
            None => {
                let port = self.next_port;
                self.next_port += 7;
                self.out.insert(key, port);
                port
            }
        };
        self.back.entry(port).or_insert_with(|| (private, HashSet::new())).1.insert(to);
        SocketAddr::new(IpAddr::V4(self.public), port)
    }

    /// The private destination of a datagram from `from` to the public `port`, if the filter
    /// lets it in.
    fn inbound(&self, from: SocketAddr, port: u16) -> Option<SocketAddr> {
        let (private, allowed) = self.back.get(&port)?;
        allowed.contains(&from).then_some(*private)
    }
}

struct Host {
    address: SocketAddr,
    behind: Option<usize>,
    nat: Nat,
    endpoint: Endpoint<Peer>,
    received: Vec<(Peer, Vec<u8>)>,
}

/// Decides whether a datagram `(time since start, bytes)` is lost.
type DropRule = Box<dyn FnMut(Duration, &[u8]) -> bool>;

struct Sim {
    now: Instant,
    hosts: Vec<Host>,
    boxes: Vec<NatBox>,
    in_flight: Vec<(Instant, SocketAddr, SocketAddr, Vec<u8>)>,
    /// Drops a datagram `(time since start, bytes)` when it returns true.
    drop: DropRule,
    start: Instant,
    /// RELAY frames that reached the rendezvous.
    relay_frames: usize,
    /// Reliability datagrams that went from one NAT's public address to the other's.
    direct_datagrams: usize,
    /// Datagrams the NAT filters dropped.
    filtered: usize,
}

fn config() -> Config {
    Config::default()
}

fn endpoint(epoch: u32) -> Endpoint<Peer> {
    Endpoint::new(reliability::Config::default(), epoch)
}

impl Sim {
    /// The rendezvous (host 0) and clients `a` (host 1) and `b` (host 2) behind NATs of the
    /// given kinds.
    fn new(a: Mapping, b: Mapping, config: Config) -> Self {
        let now = Instant::now();
        let private_a: SocketAddr = "192.168.1.10:5000".parse().unwrap();
        // The same private address behind the other NAT: only public addresses tell them apart.
        let private_b: SocketAddr = "192.168.1.10:5000".parse().unwrap();
        let hosts = vec![
            Host {
                address: RENDEZVOUS,
                behind: None,
                nat: Nat::server(config.clone(), now),
                endpoint: endpoint(1),
                received: Vec::new(),
            },
            Host {
                address: private_a,
                behind: Some(0),
                nat: Nat::client(config.clone(), RENDEZVOUS, b"a", now).unwrap(),
                endpoint: endpoint(2),
                received: Vec::new(),
            },
            Host {
                address: private_b,
                behind: Some(1),
                nat: Nat::client(config, RENDEZVOUS, b"b", now).unwrap(),
                endpoint: endpoint(3),
                received: Vec::new(),
            },
        ];
        Self {
            now,
            hosts,
            boxes: vec![
                NatBox::new(Ipv4Addr::new(198, 51, 100, 1), a, 40_000),
                NatBox::new(Ipv4Addr::new(198, 51, 100, 2), b, 50_000),
            ],
            in_flight: Vec::new(),
            drop: Box::new(|_, _| false),
            start: now,
            relay_frames: 0,
            direct_datagrams: 0,
            filtered: 0,
        }
    }

    fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    /// Host `from` sends `message` to the client registered as `name`.
    fn send_to_name(&mut self, from: usize, name: &str, message: &[u8]) {
        let now = self.now;
        let host = &mut self.hosts[from];
        let id = host.nat.peer(now, name.as_bytes()).unwrap();
        host.endpoint.send(now, Peer::Nat(id), message).unwrap();
    }

    fn id_of(&mut self, host: usize, name: &str) -> PeerId {
        let now = self.now;
        self.hosts[host].nat.peer(now, name.as_bytes()).unwrap()
    }

    fn path(&mut self, host: usize, name: &str) -> PathKind {
        let id = self.id_of(host, name);
        self.hosts[host].nat.path(id).unwrap()
    }

    fn pump(&mut self, index: usize) {
        let now = self.now;
        let host = &mut self.hosts[index];
        if host.endpoint.poll_timeout().is_some_and(|at| at <= now) {
            host.endpoint.handle_timeout(now);
        }
        if host.nat.poll_timeout().is_some_and(|at| at <= now) {
            host.nat.handle_timeout(now);
        }
        let mut out = Vec::new();
        while let Some((peer, datagram)) = host.endpoint.poll_transmit(now) {
            match peer {
                Peer::Addr(to) => out.push((to, datagram)),
                Peer::Nat(id) => host.nat.send(now, id, datagram),
            }
        }
        while let Some(transmit) = host.nat.poll_transmit() {
            out.push(transmit);
        }
        while let Some(message) = host.endpoint.poll_message() {
            host.received.push(message);
        }
        let (private, behind) = (host.address, host.behind);
        for (to, datagram) in out {
            let from = match behind {
                Some(nat) => self.boxes[nat].outbound(private, to),
                None => private,
            };
            if (self.drop)(self.now - self.start, &datagram) {
                continue;
            }
            self.in_flight.push((now + LATENCY, from, to, datagram));
        }
    }

    fn deliver(&mut self, from: SocketAddr, to: SocketAddr, datagram: Vec<u8>) {
        let now = self.now;
        let nat_publics: Vec<IpAddr> = self.boxes.iter().map(|b| IpAddr::V4(b.public)).collect();
        let target = match nat_publics.iter().position(|ip| *ip == to.ip()) {
            Some(nat) => match self.boxes[nat].inbound(from, to.port()) {
                Some(private) => {
                    if nat_publics.contains(&from.ip()) && datagram.first() == Some(&0xCD) {
                        self.direct_datagrams += 1;
                    }
                    self.hosts.iter().position(|host| host.behind == Some(nat) && host.address == private)
                }
                None => {
                    self.filtered += 1;
                    None
                }
            },
            None => self.hosts.iter().position(|host| host.behind.is_none() && host.address == to),
        };
        let Some(target) = target else { return };
        if target == 0 && datagram.get(..2) == Some(&[MAGIC, KIND_RELAY][..]) {
            self.relay_frames += 1;
        }
        let host = &mut self.hosts[target];
        if datagram.first() == Some(&MAGIC) {
            if let Some((id, payload)) = host.nat.handle_datagram(now, from, &datagram) {
                host.endpoint.handle_datagram(now, Peer::Nat(id), payload);
            }
        } else {
            let peer = host.nat.classify(now, from);
            host.endpoint.handle_datagram(now, peer, &datagram);
        }
    }

    fn step(&mut self) {
        for index in 0..self.hosts.len() {
            self.pump(index);
        }
        self.now += STEP;
        let now = self.now;
        let (due, later): (Vec<_>, Vec<_>) = self.in_flight.drain(..).partition(|(at, ..)| *at <= now);
        self.in_flight = later;
        for (_, from, to, datagram) in due {
            self.deliver(from, to, datagram);
        }
    }

    /// Steps until `done` or `limit` of simulated time passed; returns whether `done`.
    fn run_until(&mut self, limit: Duration, mut done: impl FnMut(&Sim) -> bool) -> bool {
        let until = self.now + limit;
        while self.now < until {
            if done(self) {
                return true;
            }
            self.step();
        }
        done(self)
    }

    fn texts(&self, host: usize) -> Vec<Vec<u8>> {
        self.hosts[host].received.iter().map(|(_, bytes)| bytes.clone()).collect()
    }

    fn registered(&self) -> bool {
        [A, B].iter().all(|host| self.hosts[*host].nat.reflexive().is_some())
    }
}

fn messages(prefix: &str, n: usize) -> Vec<Vec<u8>> {
    (0..n).map(|i| format!("{prefix} {i} {}", "x".repeat(i * 50)).into_bytes()).collect()
}

/// A sends `n` messages to B (before either has a path), B answers each: everything arrives,
/// in order, once.
fn exchange(sim: &mut Sim, n: usize, limit: Duration) {
    let requests = messages("request", n);
    for request in &requests {
        sim.send_to_name(A, "b", request);
    }
    assert!(
        sim.run_until(limit, |sim| sim.hosts[B].received.len() >= n),
        "B received {} of {n} at {:?}",
        sim.hosts[B].received.len(),
        sim.elapsed()
    );
    assert_eq!(sim.texts(B), requests, "in order, once");
    // B answers the peer key the requests came with: the same id its name has.
    let from = sim.hosts[B].received[0].0;
    let a_on_b = sim.id_of(B, "a");
    assert_eq!(from, Peer::Nat(a_on_b), "keyed by the name's id, whatever the path");
    let responses = messages("response", n);
    for response in &responses {
        let now = sim.now;
        sim.hosts[B].endpoint.send(now, from, response).unwrap();
    }
    assert!(
        sim.run_until(limit, |sim| sim.hosts[A].received.len() >= n),
        "A received {} of {n}",
        sim.hosts[A].received.len()
    );
    assert_eq!(sim.texts(A), responses);
}

#[test]
fn clients_register_and_learn_their_reflexive_address() {
    let mut sim = Sim::new(Mapping::Cone, Mapping::Symmetric, config());
    assert!(sim.run_until(Duration::from_millis(100), Sim::registered));
    let a = sim.hosts[A].nat.reflexive().unwrap();
    assert_eq!(a.ip(), IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1)));
    assert_eq!(sim.hosts[0].nat.registered(b"a"), Some(a));
    assert_eq!(sim.hosts[0].nat.registration_count(), 2);
    assert_eq!(sim.hosts[A].nat.poll_event(), Some(Event::Registered { reflexive: a }));
    // Keepalive: one registration per interval, and the mapping stays the same.
    let sent = sim.hosts[A].nat.stats().registrations_sent;
    sim.run_until(Duration::from_secs(46), |_| false);
    let renewals = sim.hosts[A].nat.stats().registrations_sent - sent;
    assert_eq!(renewals, 3, "one registration per 15 s keepalive");
    assert_eq!(sim.hosts[A].nat.reflexive(), Some(a));
    assert_eq!(sim.hosts[A].nat.poll_event(), None, "no new event while the address stays");
}

#[test]
fn cone_nats_get_a_direct_path_and_nothing_is_relayed() {
    let mut sim = Sim::new(Mapping::Cone, Mapping::Cone, config());
    exchange(&mut sim, 30, Duration::from_secs(2));
    assert!(sim.elapsed() < Duration::from_millis(200), "no wait for the punch timeout: {:?}", sim.elapsed());
    let (a_public, b_public) = (sim.hosts[A].nat.reflexive().unwrap(), sim.hosts[B].nat.reflexive().unwrap());
    assert_eq!(sim.path(A, "b"), PathKind::Direct(b_public));
    assert_eq!(sim.path(B, "a"), PathKind::Direct(a_public));
    assert_eq!(sim.relay_frames, 0, "nothing went through the relay");
    assert!(sim.direct_datagrams >= 60, "data went straight between the NATs: {}", sim.direct_datagrams);
    assert_eq!(sim.hosts[0].nat.stats().relayed, 0);
    for host in [A, B] {
        let stats = sim.hosts[host].nat.stats();
        assert_eq!((stats.direct_paths, stats.relayed_paths, stats.held_dropped), (1, 0, 0), "{stats:?}");
        assert_eq!(sim.hosts[host].nat.held_bytes(), 0);
    }
}

#[test]
fn a_symmetric_nat_falls_back_to_the_relay_without_losing_messages() {
    for (a, b) in [(Mapping::Symmetric, Mapping::Symmetric), (Mapping::Cone, Mapping::Symmetric)] {
        let mut sim = Sim::new(a, b, config());
        exchange(&mut sim, 30, Duration::from_secs(8));
        assert!(sim.elapsed() >= Duration::from_secs(3), "after the punch timeout: {:?}", sim.elapsed());
        assert_eq!(sim.path(A, "b"), PathKind::Relayed, "{a:?}/{b:?}");
        assert_eq!(sim.path(B, "a"), PathKind::Relayed, "{a:?}/{b:?}");
        assert!(sim.relay_frames >= 60, "relayed: {}", sim.relay_frames);
        assert!(sim.filtered > 0, "the punches were filtered");
        assert_eq!(sim.direct_datagrams, 0);
        let rendezvous = sim.hosts[0].nat.stats();
        assert_eq!(rendezvous.relayed as usize, sim.relay_frames);
        assert_eq!(rendezvous.refused, 0);
        // More messages take the relay at once.
        let more = messages("more", 5);
        let started = sim.now;
        for message in &more {
            sim.send_to_name(A, "b", message);
        }
        assert!(sim.run_until(Duration::from_secs(1), |sim| sim.hosts[B].received.len() == 35));
        assert!(sim.now - started < Duration::from_millis(100));
        assert_eq!(&sim.texts(B)[30..], &more[..]);
    }
}

#[test]
fn lost_punches_and_introductions_are_repeated() {
    // Every punch, punch ack and introduction in the first 400 ms is lost, and half of them
    // (at random) after.
    let mut sim = Sim::new(Mapping::Cone, Mapping::Cone, config());
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    sim.drop = Box::new(move |at, datagram| {
        let kind = datagram.get(..2);
        let lossy = kind == Some(&[MAGIC, KIND_PUNCH][..])
            || kind == Some(&[MAGIC, KIND_PUNCH_ACK][..])
            || kind == Some(&[MAGIC, KIND_PEER][..]);
        if !lossy {
            return false;
        }
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        at < Duration::from_millis(400) || rng % 2 == 0
    });
    exchange(&mut sim, 10, Duration::from_secs(3));
    assert!(sim.elapsed() < Duration::from_secs(3), "direct before the punch timeout");
    assert!(matches!(sim.path(A, "b"), PathKind::Direct(_)));
    assert!(matches!(sim.path(B, "a"), PathKind::Direct(_)));
    assert_eq!(sim.relay_frames, 0);
    let punches = sim.hosts[A].nat.stats().punches_sent + sim.hosts[B].nat.stats().punches_sent;
    assert!(punches >= 3, "punches: {punches}");
    assert!(sim.elapsed() > Duration::from_millis(400), "nothing got through the first 400 ms");
}

#[test]
fn a_rendezvous_restart_is_healed_by_registering_again() {
    let mut sim = Sim::new(Mapping::Symmetric, Mapping::Symmetric, config());
    exchange(&mut sim, 5, Duration::from_secs(8));
    assert_eq!(sim.path(A, "b"), PathKind::Relayed);
    // The rendezvous restarts: every registration is gone.
    let now = sim.now;
    sim.hosts[0].nat = Nat::server(config(), now);
    let more = messages("after restart", 20);
    for message in &more {
        sim.send_to_name(A, "b", message);
    }
    assert!(
        sim.run_until(Duration::from_secs(5), |sim| sim.hosts[B].received.len() == 25),
        "B received {} of 25",
        sim.hosts[B].received.len()
    );
    assert_eq!(&sim.texts(B)[5..], &more[..], "nothing lost or repeated across the restart");
    assert!(sim.elapsed() < Duration::from_secs(15), "healed long before the 15 s keepalive");
    assert_eq!(sim.hosts[0].nat.registration_count(), 2, "both registered again");
    assert!(sim.hosts[0].nat.stats().refused > 0, "relays from the forgotten client were refused");
}

#[test]
fn a_direct_path_survives_a_rendezvous_restart() {
    let mut sim = Sim::new(Mapping::Cone, Mapping::Cone, config());
    exchange(&mut sim, 5, Duration::from_secs(2));
    let now = sim.now;
    sim.hosts[0].nat = Nat::server(config(), now);
    let more = messages("after restart", 10);
    for message in &more {
        sim.send_to_name(A, "b", message);
    }
    assert!(sim.run_until(Duration::from_millis(200), |sim| sim.hosts[B].received.len() == 15));
    assert_eq!(sim.relay_frames, 0);
}

#[test]
fn an_unknown_peer_is_unresolved_and_its_held_datagrams_dropped() {
    let mut sim = Sim::new(Mapping::Cone, Mapping::Cone, config());
    sim.send_to_name(A, "nobody", b"hello");
    let id = sim.id_of(A, "nobody");
    assert!(sim.run_until(Duration::from_secs(4), |sim| sim.hosts[A].nat.stats().unresolved == 1));
    assert!(sim.elapsed() >= Duration::from_secs(3), "held for the punch timeout");
    assert!(sim.hosts[A].nat.stats().held_dropped > 0);
    // (The reliability core's next retransmission starts connecting again at once.)
    assert!(matches!(sim.hosts[A].nat.path(id), Some(PathKind::Idle | PathKind::Connecting)));
    assert!(sim.hosts[A].nat.stats().unknown_peer > 0);
    let events: Vec<Event> = std::iter::from_fn(|| sim.hosts[A].nat.poll_event()).collect();
    assert!(events.iter().any(|event| matches!(event, Event::Unresolved { name, .. } if name == "nobody")));
}

#[test]
fn held_datagrams_are_bounded() {
    let now = Instant::now();
    let config = Config { max_held_datagrams: 10, max_held_bytes: 5_000, ..config() };
    let mut nat = Nat::client(config, RENDEZVOUS, b"a", now).unwrap();
    let first = nat.peer(now, b"b").unwrap();
    let second = nat.peer(now, b"c").unwrap();
    for _ in 0..100 {
        nat.send(now, first, vec![0xCD; 100]);
    }
    assert_eq!(nat.held_bytes(), 1_000, "10 per peer");
    for _ in 0..100 {
        nat.send(now, second, vec![0xCD; 1_000]);
    }
    assert_eq!(nat.held_bytes(), 5_000, "5,000 bytes overall");
    assert_eq!(nat.stats().held_dropped, 90 + 96);
    assert_eq!(nat.path(first), Some(PathKind::Connecting));
    // Nobody answers: after the punch timeout the hold is empty.
    nat.handle_timeout(now + Duration::from_secs(3));
    assert_eq!(nat.held_bytes(), 0);
    assert_eq!(nat.path(first), Some(PathKind::Idle));
}

#[test]
fn the_peer_table_is_bounded_and_ids_are_never_reused() {
    let now = Instant::now();
    let mut nat = Nat::client(Config { max_peers: 3, ..config() }, RENDEZVOUS, b"a", now).unwrap();
    let ids: Vec<PeerId> = (0..3).map(|i| nat.peer(now, format!("p{i}").as_bytes()).unwrap()).collect();
    // All connecting (something held): none can be evicted.
    for id in &ids {
        nat.send(now, *id, vec![0xCD; 10]);
    }
    assert_eq!(nat.peer(now, b"p3"), Err(PeerError::PeerLimit));
    nat.handle_timeout(now + Duration::from_secs(3));
    let new = nat.peer(now + Duration::from_secs(3), b"p3").unwrap();
    assert!(!ids.contains(&new));
    assert_eq!(nat.peer(now, b""), Err(PeerError::BadName));
    assert_eq!(nat.peer(now, &[b'x'; 256]), Err(PeerError::BadName));
    assert!(Nat::client(config(), RENDEZVOUS, b"", now).is_err());
}

#[test]
fn the_rendezvous_relays_only_between_registered_clients_within_the_rate() {
    let now = Instant::now();
    let config = Config { relay_rate: 10, max_relay_payload: 100, ..config() };
    let mut server = Nat::server(config, now);
    let (a, b, stranger): (SocketAddr, SocketAddr, SocketAddr) = (
        "198.51.100.1:1".parse().unwrap(),
        "198.51.100.2:2".parse().unwrap(),
        "198.51.100.3:3".parse().unwrap(),
    );
    let relay = |name: &[u8], payload: &[u8]| encode(&Message::Relay { name, payload });
    // Not registered: refused, answered NOT_REGISTERED.
    assert_eq!(server.handle_datagram(now, stranger, &relay(b"b", b"x")), None);
    assert_eq!(server.poll_transmit(), Some((stranger, encode(&Message::NotRegistered))));
    server.handle_datagram(now, a, &encode(&Message::Register { name: b"a" }));
    assert_eq!(server.poll_transmit(), Some((a, encode(&Message::Registered { address: a }))));
    // To an unknown name: refused, UNKNOWN_PEER.
    server.handle_datagram(now, a, &relay(b"b", b"x"));
    assert_eq!(server.poll_transmit(), Some((a, encode(&Message::UnknownPeer { name: b"b" }))));
    server.handle_datagram(now, b, &encode(&Message::Register { name: b"b" }));
    server.poll_transmit();
    // Registered both: relayed, with the sender's name.
    server.handle_datagram(now, a, &relay(b"b", b"hello"));
    assert_eq!(
        server.poll_transmit(),
        Some((b, encode(&Message::Relayed { name: b"a", payload: b"hello" })))
    );
    // Too large.
    server.handle_datagram(now, a, &relay(b"b", &[0xCD; 101]));
    assert_eq!(server.poll_transmit(), None);
    // The rate: 10 per second (9 tokens left), then one more per 100 ms.
    for _ in 0..20 {
        server.handle_datagram(now, a, &relay(b"b", b"x"));
    }
    assert_eq!(std::iter::from_fn(|| server.poll_transmit()).count(), 9);
    server.handle_datagram(now + Duration::from_millis(100), a, &relay(b"b", b"x"));
    assert_eq!(std::iter::from_fn(|| server.poll_transmit()).count(), 1);
    assert_eq!(server.stats().relayed, 11);
    assert_eq!(server.stats().refused, 2 + 1 + 11);
    // Refusal answers are rate-limited too: a flood from a stranger gets at most REPLY_RATE.
    for _ in 0..1000 {
        server.handle_datagram(now, stranger, &relay(b"b", b"x"));
    }
    assert!(std::iter::from_fn(|| server.poll_transmit()).count() <= REPLY_RATE as usize);
    // Registrations expire.
    server.handle_timeout(now + Duration::from_secs(61));
    assert_eq!(server.registration_count(), 0);
}

#[test]
fn registrations_are_bounded_and_one_per_address() {
    let now = Instant::now();
    let mut server = Nat::server(Config { max_registrations: 2, ..config() }, now);
    let address = |n: u16| SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 9)), n);
    server.handle_datagram(now, address(1), &encode(&Message::Register { name: b"one" }));
    // The same address under another name: replaces it.
    server.handle_datagram(now, address(1), &encode(&Message::Register { name: b"uno" }));
    assert_eq!(server.registration_count(), 1);
    assert_eq!(server.registered(b"one"), None);
    server.handle_datagram(now, address(2), &encode(&Message::Register { name: b"two" }));
    server.handle_datagram(now, address(3), &encode(&Message::Register { name: b"three" }));
    assert_eq!(server.registration_count(), 2, "full");
    assert_eq!(server.stats().refused, 1);
    // The same name from a new address (the NAT rebound): moves.
    server.handle_datagram(now, address(4), &encode(&Message::Register { name: b"two" }));
    assert_eq!(server.registered(b"two"), Some(address(4)));
    assert_eq!(server.registration_count(), 2);
}

#[test]
fn a_forged_punch_does_not_divert_the_path() {
    let mut sim = Sim::new(Mapping::Cone, Mapping::Cone, config());
    exchange(&mut sim, 3, Duration::from_secs(2));
    let before = sim.path(A, "b");
    let now = sim.now;
    let forger: SocketAddr = "198.51.100.66:6666".parse().unwrap();
    let forged = encode(&Message::Punch { ack: true, token: 12345, name: b"b" });
    assert_eq!(sim.hosts[A].nat.handle_datagram(now, forger, &forged), None);
    let unknown = encode(&Message::Punch { ack: false, token: 12345, name: b"zed" });
    sim.hosts[A].nat.handle_datagram(now, forger, &unknown);
    assert_eq!(sim.path(A, "b"), before);
    assert_eq!(sim.hosts[A].nat.stats().bad_punches, 2);
    assert_eq!(sim.hosts[A].nat.poll_transmit(), None, "no answer to a forged punch");
    // Rendezvous messages from anyone but the rendezvous are dropped.
    let fake = encode(&Message::PeerInfo { token: 1, address: forger, name: b"b" });
    sim.hosts[A].nat.handle_datagram(now, forger, &fake);
    assert_eq!(sim.path(A, "b"), before);
    let relayed = encode(&Message::Relayed { name: b"b", payload: &[0xCD, 1] });
    assert_eq!(sim.hosts[A].nat.handle_datagram(now, forger, &relayed), None);
    assert_eq!(sim.hosts[A].nat.stats().malformed, 2);
}

#[test]
fn every_message_kind_round_trips_and_malformed_datagrams_are_counted() {
    let v4: SocketAddr = "198.51.100.1:65535".parse().unwrap();
    let v6: SocketAddr = "[2001:db8::1]:1".parse().unwrap();
    let name = [b'n'; MAX_NAME];
    let all = [
        Message::Register { name: b"a" },
        Message::Registered { address: v4 },
        Message::Registered { address: v6 },
        Message::Connect { name: &name },
        Message::PeerInfo { token: u64::MAX, address: v6, name: b"b" },
        Message::UnknownPeer { name: b"c" },
        Message::Punch { ack: false, token: 7, name: b"d" },
        Message::Punch { ack: true, token: 8, name: b"e" },
        Message::Relay { name: b"f", payload: &[0xCD, 1, 2] },
        Message::Relayed { name: b"g", payload: &[0xCD] },
        Message::NotRegistered,
    ];
    let now = Instant::now();
    let mut client = Nat::client(config(), RENDEZVOUS, b"me", now).unwrap();
    let mut server = Nat::server(config(), now);
    let mut malformed = 0;
    for message in &all {
        let bytes = encode(message);
        assert_eq!(parse(&bytes).as_ref(), Some(message));
        // Every truncation of a fixed-size message and every extension of one is malformed.
        let fixed = !matches!(message, Message::Relay { .. } | Message::Relayed { .. });
        for cut in 0..bytes.len() {
            if fixed || cut < bytes.len() - 1 {
                let truncated = &bytes[..cut];
                if !matches!(message, Message::Relay { .. } | Message::Relayed { .. })
                    || parse(truncated).is_none()
                {
                    assert_eq!(parse(truncated), None, "{message:?} cut at {cut}");
                    client.handle_datagram(now, RENDEZVOUS, truncated);
                    server.handle_datagram(now, v4, truncated);
                    malformed += 2;
                }
            }
        }
        if fixed {
            let mut longer = bytes.clone();
            longer.push(0);
            assert_eq!(parse(&longer), None, "{message:?} with a trailing byte");
        }
    }
    assert_eq!(client.stats().malformed + server.stats().malformed, malformed);
    // Zero-length names, unknown kinds and families, garbage: dropped, counted, no panic.
    let mut rng = 0x1234_5678_9abc_def1u64;
    for length in 0..2000usize {
        let mut bytes = vec![MAGIC];
        for _ in 0..length % 40 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            bytes.push(rng as u8 % 12);
        }
        let _ = client.handle_datagram(now, RENDEZVOUS, &bytes);
        let _ = server.handle_datagram(now, v4, &bytes);
    }
    assert_eq!(parse(&[MAGIC, KIND_REGISTER, 0]), None, "empty name");
    assert_eq!(parse(&[MAGIC, 11]), None, "unknown kind");
    assert_eq!(parse(&[MAGIC, KIND_REGISTERED, 5, 0, 0, 0, 0, 0, 0]), None, "unknown family");
    // The server takes no client kinds, the client no server kinds.
    let before = server.stats().malformed;
    server.handle_datagram(now, v4, &encode(&Message::Punch { ack: false, token: 1, name: b"x" }));
    assert_eq!(server.stats().malformed, before + 1);
    let before = client.stats().malformed;
    client.handle_datagram(now, RENDEZVOUS, &encode(&Message::Register { name: b"x" }));
    assert_eq!(client.stats().malformed, before + 1);
    assert!(client.held_bytes() == 0 && server.registration_count() <= 1);
}

#[test]
fn an_idle_direct_path_is_kept_alive_then_forgotten() {
    let mut sim = Sim::new(Mapping::Cone, Mapping::Cone, config());
    exchange(&mut sim, 1, Duration::from_secs(2));
    let punches = sim.hosts[A].nat.stats().punches_sent;
    // In use (just exchanged): keepalive punches every 15 s keep it direct.
    sim.run_until(Duration::from_secs(40), |_| false);
    assert!(sim.hosts[A].nat.stats().punches_sent > punches, "keepalive punches");
    assert!(matches!(sim.path(A, "b"), PathKind::Direct(_)));
    // Unused for path_idle: no more keepalives, and once nothing was heard for path_idle the
    // path is forgotten; the next message connects again and arrives.
    sim.run_until(Duration::from_secs(120), |_| false);
    for host in [A, B] {
        assert_eq!(sim.hosts[host].endpoint.stats().gave_up, 0, "an idle peer is not a silent one");
    }
    assert_eq!(sim.path(A, "b"), PathKind::Idle);
    sim.send_to_name(A, "b", b"again");
    assert!(sim.run_until(Duration::from_secs(2), |sim| sim.hosts[B].received.len() == 2));
    assert!(matches!(sim.path(A, "b"), PathKind::Direct(_)));
}

#[test]
fn split_address_takes_the_last_at_sign() {
    assert_eq!(split_address("a@b@1.2.3.4:5"), Some(("a@b", "1.2.3.4:5")));
    assert_eq!(split_address("1.2.3.4:5"), None);
    assert_eq!(split_address("@1.2.3.4:5"), None);
    assert_eq!(split_address("a@"), None);
}
