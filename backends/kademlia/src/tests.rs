//! Deterministic simulations of whole networks of [`DhtNode`]s: no sockets, a simulated clock,
//! a seeded random number generator, integer addresses. Run with `--nocapture` to see the
//! numbers.

use crate::{
    key::Key,
    node::{Config, DhtNode, Event, LookupPurpose, LookupReport},
    protocol::{encode_record, Body, Message, MAX_DATAGRAM},
    store::StoreLimits,
};
use comms_plugin_api::{NodeId, NodeRecord, PeerEventKind};
use std::{
    cmp::Reverse,
    collections::{BTreeSet, BinaryHeap, HashMap},
    time::{Duration, Instant},
};

/// xorshift64*: every run is the same.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A datagram on its way: (due, sequence, to, from, bytes).
type InTransit = Reverse<(Instant, u64, u32, u32, Vec<u8>)>;

/// A network of nodes at addresses 0, 1, 2, ... with random latency per datagram.
struct Sim {
    start: Instant,
    now: Instant,
    nodes: Vec<Option<DhtNode<u32>>>,
    in_transit: BinaryHeap<InTransit>,
    /// (due, node): lazily checked against the node's real next timeout.
    timers: BinaryHeap<Reverse<(Instant, u32)>>,
    /// The earliest entry in `timers` per node, so that one is pushed only when it is sooner.
    scheduled: Vec<Option<Instant>>,
    sequence: u64,
    rng: Rng,
    reports: Vec<(u32, LookupReport)>,
    peer_events: Vec<(u32, PeerEventKind, String)>,
    datagrams: u64,
    max_latency_ms: u64,
    /// Datagrams lost in the network, in percent.
    loss_percent: u64,
}

impl Sim {
    fn new(seed: u64) -> Self {
        let now = Instant::now();
        Self {
            start: now,
            now,
            nodes: Vec::new(),
            in_transit: BinaryHeap::new(),
            timers: BinaryHeap::new(),
            scheduled: Vec::new(),
            sequence: 0,
            rng: Rng(seed | 1),
            reports: Vec::new(),
            peer_events: Vec::new(),
            datagrams: 0,
            max_latency_ms: 20,
            loss_percent: 0,
        }
    }

    /// Adds a node; returns its address.
    fn add(&mut self, id: &str, config: Config) -> u32 {
        let address = self.nodes.len() as u32;
        let config = Config { seed: self.rng.next(), ..config };
        self.nodes.push(Some(DhtNode::new(id, config, self.now)));
        self.scheduled.push(None);
        self.after(address);
        address
    }

    fn node(&mut self, address: u32) -> &mut DhtNode<u32> {
        self.nodes[address as usize].as_mut().expect("a live node")
    }

    /// Takes a node's output and schedules its next timeout.
    fn after(&mut self, address: u32) {
        let now = self.now;
        let Some(node) = self.nodes[address as usize].as_mut() else { return };
        let mut sent = Vec::new();
        while let Some(transmit) = node.poll_transmit() {
            sent.push(transmit);
        }
        while let Some(event) = node.poll_event() {
            match event {
                Event::Lookup(report) => self.reports.push((address, report)),
                Event::Peer(event) => {
                    self.peer_events.push((address, event.kind, event.record.id.to_string()))
                }
            }
        }
        let timeout = node.next_timeout();
        for (to, datagram) in sent {
            assert!(datagram.len() <= MAX_DATAGRAM);
            self.datagrams += 1;
            if self.loss_percent > 0 && self.rng.below(100) < self.loss_percent {
                continue;
            }
            let latency = Duration::from_millis(1 + self.rng.below(self.max_latency_ms));
            self.sequence += 1;
            self.in_transit.push(Reverse((now + latency, self.sequence, to, address, datagram)));
        }
        if let Some(at) = timeout {
            let at = at.max(now);
            let scheduled = &mut self.scheduled[address as usize];
            if scheduled.is_none_or(|earlier| at < earlier) {
                *scheduled = Some(at);
                self.timers.push(Reverse((at, address)));
            }
        }
    }

    /// Runs until `until` (simulated).
    fn run_until(&mut self, until: Instant) {
        loop {
            let datagram_at = self.in_transit.peek().map(|Reverse((at, ..))| *at);
            let timer_at = self.timers.peek().map(|Reverse((at, _))| *at);
            let next = match (datagram_at, timer_at) {
                (Some(a), Some(b)) => a.min(b),
                (a, b) => match a.or(b) {
                    Some(at) => at,
                    None => break,
                },
            };
            if next > until {
                break;
            }
            self.now = next;
            if datagram_at == Some(next) {
                let Some(Reverse((_, _, to, from, datagram))) = self.in_transit.pop() else { break };
                if let Some(node) = self.nodes.get_mut(to as usize).and_then(Option::as_mut) {
                    node.handle_datagram(from, &datagram, next);
                    self.after(to);
                }
            } else {
                let Some(Reverse((at, address))) = self.timers.pop() else { break };
                if self.scheduled[address as usize] == Some(at) {
                    self.scheduled[address as usize] = None;
                }
                let now = self.now;
                let Some(node) = self.nodes[address as usize].as_mut() else { continue };
                if node.next_timeout().is_some_and(|at| at <= now) {
                    node.handle_timeout(now);
                }
                self.after(address);
            }
        }
        self.now = self.now.max(until);
    }

    fn run_for(&mut self, duration: Duration) {
        let until = self.now + duration;
        self.run_until(until);
    }

    fn elapsed(&self) -> Duration {
        self.now - self.start
    }
}

fn record(id: &str, services: &[String]) -> NodeRecord {
    let mut record = NodeRecord::new(NodeId::new(id));
    record.addresses = vec![("tcp".into(), format!("10.0.0.1:{}", 1000 + id.len()))];
    record.services = services.to_vec();
    record
}

fn sim_config() -> Config {
    Config {
        request_timeout: Duration::from_millis(500),
        record_ttl: Duration::from_secs(20),
        find_interval: Duration::from_secs(3600),
        // Contact records are the plugin's view for small networks; the simulation measures
        // what the DHT itself costs.
        learn_contact_records: false,
        ..Config::default()
    }
}

fn percentile(values: &mut [u64], p: usize) -> u64 {
    if values.is_empty() {
        return 0;
    }
    values.sort_unstable();
    values[(values.len() - 1) * p / 100]
}

/// Starts every live node's lookup of every service, runs until they finish, and returns the
/// reports.
fn find_everything(sim: &mut Sim, services: &[String]) -> Vec<(u32, LookupReport)> {
    sim.reports.clear();
    let live: Vec<u32> = (0..sim.nodes.len() as u32).filter(|a| sim.nodes[*a as usize].is_some()).collect();
    for &address in &live {
        let now = sim.now;
        for service in services {
            sim.node(address).find_service(service, now);
        }
        sim.after(address);
    }
    let wanted = live.len() * services.len();
    let finding = |sim: &Sim| {
        sim.reports
            .iter()
            .filter(|(_, report)| matches!(report.purpose, LookupPurpose::FindService(_)))
            .count()
    };
    for _ in 0..50 {
        if finding(sim) >= wanted {
            break;
        }
        sim.run_for(Duration::from_millis(200));
    }
    let reports: Vec<_> = std::mem::take(&mut sim.reports)
        .into_iter()
        .filter(|(_, report)| matches!(report.purpose, LookupPurpose::FindService(_)))
        .collect();
    assert_eq!(reports.len(), live.len() * services.len(), "every lookup finished");
    reports
}

fn print_lookup_numbers(label: &str, reports: &[(u32, LookupReport)]) {
    let mut hops: Vec<u64> = reports.iter().filter_map(|(_, r)| r.value_hops.map(u64::from)).collect();
    let mut queries: Vec<u64> = reports.iter().map(|(_, r)| r.queries as u64).collect();
    let mut millis: Vec<u64> = reports.iter().map(|(_, r)| r.duration.as_millis() as u64).collect();
    eprintln!(
        "{label}: {} lookups; hops to the first value median {} max {}; FIND queries per lookup \
         median {} p99 {} max {}; simulated duration median {} ms max {} ms",
        reports.len(),
        percentile(&mut hops, 50),
        percentile(&mut hops, 100),
        percentile(&mut queries, 50),
        percentile(&mut queries, 99),
        percentile(&mut queries, 100),
        percentile(&mut millis, 50),
        percentile(&mut millis, 100),
    );
}

#[test]
fn a_thousand_nodes_find_every_provider_and_survive_churn() {
    let wall = std::time::Instant::now();
    const NODES: u32 = 1000;
    const SEEDS: u32 = 3;
    let services: Vec<String> = (0..3).map(|n| format!("svc-{n}")).collect();
    let mut sim = Sim::new(42);
    // Each service has 3 providers spread over the network.
    let mut providers: HashMap<String, BTreeSet<String>> = HashMap::new();
    let mut serves: HashMap<u32, Vec<String>> = HashMap::new();
    for (n, service) in services.iter().enumerate() {
        for replica in 0..3u32 {
            let address = 10 + n as u32 * 97 + replica * 300;
            serves.entry(address).or_default().push(service.clone());
            providers.entry(service.clone()).or_default().insert(format!("n{address}"));
        }
    }
    // Nodes join one every 10 ms, each bootstrapping from the seeds and publishing its record.
    for address in 0..NODES {
        let id = format!("n{address}");
        sim.add(&id, sim_config());
        let now = sim.now;
        let seeds: Vec<u32> = (0..SEEDS.min(address)).collect();
        let mine = serves.get(&address).cloned().unwrap_or_default();
        let node = sim.node(address);
        node.bootstrap(seeds, now);
        node.publish(record(&id, &mine), now).unwrap();
        sim.after(address);
        sim.run_for(Duration::from_millis(10));
    }
    // The first seeds had nobody to bootstrap from: they learn of the others as those join.
    sim.run_for(Duration::from_secs(5));
    let joined_at = sim.elapsed();
    let datagrams_to_join = sim.datagrams;
    let contacts: Vec<u64> = sim.nodes.iter().flatten().map(|n| n.contact_count() as u64).collect();
    eprintln!(
        "[wall {:?}] {NODES} nodes joined in {joined_at:?} simulated, {datagrams_to_join} datagrams ({} per node); \
         contacts per node min {} max {}",
        wall.elapsed(),
        datagrams_to_join / NODES as u64,
        contacts.iter().min().unwrap(),
        contacts.iter().max().unwrap()
    );

    // Every node looks up every service.
    let before = sim.datagrams;
    let reports = find_everything(&mut sim, &services);
    let mut complete = 0;
    for (address, report) in &reports {
        let LookupPurpose::FindService(service) = &report.purpose else { unreachable!() };
        let found: BTreeSet<String> = report.providers.iter().map(|r| r.id.to_string()).collect();
        if found == providers[service] {
            complete += 1;
        } else {
            eprintln!("node {address} found {found:?} for {service}, expected {:?}", providers[service]);
        }
    }
    eprintln!("[wall {:?}] steady-state lookups done", wall.elapsed());
    print_lookup_numbers("steady state", &reports);
    eprintln!(
        "steady state: {complete}/{} lookups found every provider; {} datagrams per lookup (queries and answers)",
        reports.len(),
        (sim.datagrams - before) / reports.len() as u64
    );
    assert_eq!(complete, reports.len(), "every node finds every provider");
    let max_queries = reports.iter().map(|(_, r)| r.queries).max().unwrap_or(0);
    assert!(max_queries <= 100, "a lookup took {max_queries} queries");
    assert!(reports.iter().all(|(_, r)| r.value_hops.is_some_and(|h| h <= 6)), "bounded hops");

    // Churn: 20% of the nodes vanish without a word (among them one provider of each service),
    // and as many new nodes join through random survivors.
    let mut gone = BTreeSet::new();
    for set in providers.values_mut() {
        let victim = set.iter().next().cloned().unwrap();
        set.remove(&victim);
        gone.insert(victim[1..].parse::<u32>().unwrap());
    }
    while gone.len() < (NODES / 5) as usize {
        let address = SEEDS + sim.rng.below((NODES - SEEDS) as u64) as u32;
        if !serves.contains_key(&address) {
            gone.insert(address);
        }
    }
    for &address in &gone {
        sim.nodes[address as usize] = None;
    }
    for n in 0..NODES / 5 {
        let id = format!("new{n}");
        let address = sim.add(&id, sim_config());
        let seed = loop {
            let candidate = sim.rng.below(NODES as u64) as u32;
            if !gone.contains(&candidate) {
                break candidate;
            }
        };
        let now = sim.now;
        let node = sim.node(address);
        node.bootstrap(vec![seed], now);
        node.publish(record(&id, &[]), now).unwrap();
        sim.after(address);
        sim.run_for(Duration::from_millis(10));
    }
    // Past the records' time to live: the vanished providers' values expire, the survivors
    // republish theirs (every ttl / 2).
    sim.run_for(sim_config().record_ttl + Duration::from_secs(5));
    eprintln!("[wall {:?}] churn done, {} datagrams so far", wall.elapsed(), sim.datagrams);
    let reports = find_everything(&mut sim, &services);
    let (mut complete, mut stale) = (0, 0);
    for (_, report) in &reports {
        let LookupPurpose::FindService(service) = &report.purpose else { unreachable!() };
        let found: BTreeSet<String> = report.providers.iter().map(|r| r.id.to_string()).collect();
        if found.iter().any(|id| id.starts_with('n') && gone.contains(&id[1..].parse::<u32>().unwrap())) {
            stale += 1;
        }
        if providers[service].is_subset(&found) {
            complete += 1;
        }
    }
    print_lookup_numbers("after churn", &reports);
    let rate = complete as f64 * 100.0 / reports.len() as f64;
    eprintln!(
        "after churn ({} left, {} joined): {complete}/{} lookups found every live provider ({rate:.1}%), \
         {stale} returned a vanished provider; simulated time {:?}, wall time {:?}",
        gone.len(),
        NODES / 5,
        reports.len(),
        sim.elapsed(),
        wall.elapsed()
    );
    assert!(rate >= 99.0, "success rate under churn {rate:.1}%");
    assert_eq!(stale, 0, "expired records of vanished providers are gone");
    // Nor does any node still know a vanished provider's record.
    for node in sim.nodes.iter().flatten() {
        for known in node.known_records() {
            let id = known.id.to_string();
            assert!(
                !(id.starts_with('n') && gone.contains(&id[1..].parse::<u32>().unwrap())),
                "a node still knows vanished {id}"
            );
        }
    }
}

#[test]
fn with_five_percent_loss_lookups_still_find_every_provider() {
    let mut sim = Sim::new(5);
    sim.loss_percent = 5;
    let services: Vec<String> = vec!["lossy".into()];
    let providers = [17u32, 101, 180];
    for address in 0..200u32 {
        let id = format!("l{address}");
        sim.add(&id, sim_config());
        let now = sim.now;
        let mine = if providers.contains(&address) { services.clone() } else { vec![] };
        let node = sim.node(address);
        node.bootstrap((0..address.min(3)).collect(), now);
        node.publish(record(&id, &mine), now).unwrap();
        sim.after(address);
        sim.run_for(Duration::from_millis(10));
    }
    sim.run_for(Duration::from_secs(5));
    let reports = find_everything(&mut sim, &services);
    let complete = reports.iter().filter(|(_, report)| report.providers.len() == providers.len()).count();
    print_lookup_numbers("5% loss, 200 nodes", &reports);
    let rate = complete as f64 * 100.0 / reports.len() as f64;
    eprintln!("5% loss, 200 nodes: {complete}/{} lookups found all 3 providers ({rate:.1}%)", reports.len());
    // A lookup asks k nodes that each hold every provider: losing a few answers loses nothing.
    assert!(rate >= 99.0, "success rate with loss {rate:.1}%");
    assert!(reports.iter().all(|(_, report)| !report.providers.is_empty()), "every lookup found a provider");
}

#[test]
fn contact_records_join_update_and_leave_in_a_small_network() {
    let config = Config { request_timeout: Duration::from_millis(300), ..Config::default() };
    let mut sim = Sim::new(7);
    for n in 0..12u32 {
        let id = format!("p{n}");
        sim.add(&id, config.clone());
        let now = sim.now;
        let seeds = if n == 0 { vec![] } else { vec![0] };
        let node = sim.node(n);
        node.bootstrap(seeds, now);
        node.publish(record(&id, &[]), now).unwrap();
        sim.after(n);
        sim.run_for(Duration::from_millis(50));
    }
    sim.run_for(Duration::from_secs(3));
    for n in 0..12u32 {
        let known: BTreeSet<String> = sim.node(n).known_records().iter().map(|r| r.id.to_string()).collect();
        assert_eq!(known.len(), 11, "p{n} knows every other node's record: {known:?}");
        assert!(!known.contains(&format!("p{n}")), "not its own");
    }
    // p3 starts serving: its contacts see the update.
    let now = sim.now;
    sim.node(3).publish(record("p3", &["echo".to_string()]), now).unwrap();
    sim.after(3);
    sim.peer_events.clear();
    sim.run_for(Duration::from_secs(1));
    let updated =
        sim.peer_events.iter().filter(|(_, kind, id)| *kind == PeerEventKind::Updated && id == "p3").count();
    assert_eq!(updated, 11, "{:?}", sim.peer_events);
    // A node finds the provider by lookup too.
    let now = sim.now;
    sim.node(7).find_service("echo", now);
    sim.after(7);
    sim.run_for(Duration::from_secs(1));
    let report =
        sim.reports.iter().rev().find(|(a, r)| *a == 7 && matches!(r.purpose, LookupPurpose::FindService(_)));
    assert_eq!(report.unwrap().1.providers.len(), 1);
    // p3 withdraws: everyone sees it leave.
    sim.peer_events.clear();
    let now = sim.now;
    sim.node(3).withdraw(now);
    sim.after(3);
    sim.run_for(Duration::from_secs(1));
    let left =
        sim.peer_events.iter().filter(|(_, kind, id)| *kind == PeerEventKind::Left && id == "p3").count();
    assert_eq!(left, 11, "{:?}", sim.peer_events);
    // p5 vanishes: its record leaves the nodes that talk to it.
    sim.nodes[5] = None;
    sim.peer_events.clear();
    // Two lookups in a row that ask it and time out: it is dropped (one would be forgiven).
    for _ in 0..2 {
        for n in [0u32, 1, 2] {
            let now = sim.now;
            sim.node(n).find_service("anything", now);
            sim.after(n);
        }
        sim.run_for(Duration::from_secs(2));
    }
    assert!(sim.peer_events.iter().any(|(_, kind, id)| *kind == PeerEventKind::Left && id == "p5"));
}

#[test]
fn garbage_and_oversized_datagrams_are_counted_and_dropped() {
    let now = Instant::now();
    let mut node = DhtNode::<u32>::new("victim", Config::default(), now);
    let mut rng = Rng(99);
    let mut garbage = 0;
    for n in 0..5000 {
        let length = rng.below(300) as usize;
        let mut bytes: Vec<u8> = (0..length).map(|_| rng.next() as u8).collect();
        // Half of them with a valid header, so the body parsers see hostile input too.
        if n % 2 == 0 && bytes.len() >= 3 {
            bytes[0] = crate::protocol::MAGIC;
            bytes[1] = crate::protocol::VERSION;
            bytes[2] = 1 + (rng.below(7) as u8);
        }
        let before = node.stats().malformed;
        node.handle_datagram(1000 + n, &bytes, now);
        garbage += node.stats().malformed - before;
    }
    assert!(garbage > 4900, "nearly all random datagrams are malformed: {garbage}");
    node.handle_datagram(1, &vec![0u8; MAX_DATAGRAM + 1], now);
    node.handle_datagram(1, &[], now);
    assert!(node.contact_count() <= 256 * node.config().k);
    // Whatever parsed by chance was answered; nothing else is sent.
    let mut sent = 0;
    while node.poll_transmit().is_some() {
        sent += 1;
    }
    assert!(sent as u64 <= node.stats().received * 2);
}

#[test]
fn a_peer_flooding_stores_is_rate_limited_and_the_store_stays_bounded() {
    let now = Instant::now();
    let limits = StoreLimits { max_records: 500, stores_per_window: 20, ..StoreLimits::default() };
    let config = Config { store: limits, ..Config::default() };
    let mut node = DhtNode::<u32>::new("victim", config, now);
    let store = |id: &str, txid: u64| {
        let sender = Key::for_node(id);
        let record = encode_record(&record(id, &[])).unwrap();
        Message::<u32> { txid, sender, body: Body::Store { key: sender, ttl_ms: 60_000, record } }.encode()
    };
    // One address, many forged identities.
    for n in 0..10_000u64 {
        node.handle_datagram(666, &store(&format!("forged{n}"), n + 1), now);
    }
    assert_eq!(node.stored_count(), 20, "one address gets its window's worth");
    let refused = node.stats().stores_refused;
    assert_eq!(refused, 10_000 - 20);
    // Many addresses: the overall bound holds.
    for n in 0..5_000u32 {
        node.handle_datagram(10_000 + n, &store(&format!("many{n}"), n as u64 + 1), now);
    }
    assert_eq!(node.stored_count(), 500);
    assert!(node.contact_count() <= 256 * node.config().k, "the table stays bounded");
    assert!(node.pending_requests() <= node.config().max_pending_requests);
    // A later window admits the first address again (once room is made by expiry).
    let later = now + Duration::from_secs(61);
    node.handle_timeout(later);
    assert_eq!(node.stored_count(), 0, "every value expired");
    node.handle_datagram(666, &store("late", 99_999), later);
    assert_eq!(node.stored_count(), 1);
}

#[test]
fn a_contact_that_publishes_after_its_record_was_fetched_is_learned_from_its_push() {
    let now = Instant::now();
    let mut a = DhtNode::<u32>::new("a", Config::default(), now);
    let mut b = DhtNode::<u32>::new("b", Config::default(), now);
    a.publish(record("a", &[]), now).unwrap();
    b.bootstrap(vec![1], now); // a is at address 1, b at 2
    let exchange = |a: &mut DhtNode<u32>, b: &mut DhtNode<u32>| {
        for _ in 0..8 {
            while let Some((_, bytes)) = b.poll_transmit() {
                a.handle_datagram(2, &bytes, now);
            }
            while let Some((_, bytes)) = a.poll_transmit() {
                b.handle_datagram(1, &bytes, now);
            }
        }
    };
    exchange(&mut a, &mut b);
    assert_eq!(a.contact_count(), 1);
    assert!(a.known_records().is_empty(), "b had no record when a fetched it");
    // b publishes: it pushes its record to its contacts, and a learns it then.
    b.publish(record("b", &[]), now).unwrap();
    exchange(&mut a, &mut b);
    assert_eq!(a.known_records().iter().map(|r| r.id.to_string()).collect::<Vec<_>>(), ["b"]);
}

#[test]
fn forged_and_late_responses_are_ignored() {
    let now = Instant::now();
    let mut node = DhtNode::<u32>::new("a", Config::default(), now);
    node.bootstrap(vec![2], now);
    let (to, ping) = node.poll_transmit().unwrap();
    assert_eq!(to, 2);
    let ping = Message::<u32>::decode(&ping).unwrap();
    let pong = |txid| Message::<u32> { txid, sender: Key::for_node("b"), body: Body::Pong }.encode();
    // From the wrong address, or with the wrong transaction id: ignored.
    node.handle_datagram(3, &pong(ping.txid), now);
    node.handle_datagram(2, &pong(ping.txid ^ 1), now);
    assert_eq!(node.stats().unsolicited, 2);
    assert_eq!(node.contact_count(), 0);
    node.handle_datagram(2, &pong(ping.txid), now);
    assert_eq!(node.contact_count(), 1);
    // The same answer again is late: ignored.
    node.handle_datagram(2, &pong(ping.txid), now);
    assert_eq!(node.stats().unsolicited, 3);
}

mod authenticated {
    use super::*;
    use crate::{
        auth::{AllowList, AuthError, Identity, LinkSecurity},
        protocol::{seal, sign_record, DecodeError},
    };

    const UNIX_MS: u64 = 1_700_000_000_000;

    fn identity(n: u8) -> Identity {
        Identity::from_secret_bytes(&[n + 1; 32])
    }

    fn id(n: u8) -> String {
        identity(n).node_id(Some(&format!("n{n}"))).to_string()
    }

    fn security(n: u8, allowed: &[u8]) -> LinkSecurity {
        let keys = allowed.iter().map(|m| identity(*m).public_key()).collect();
        LinkSecurity::new(identity(n), AllowList::Keys(keys), None)
    }

    fn config() -> Config {
        Config { request_timeout: Duration::from_millis(500), ..Config::default() }
    }

    /// A sealed message from node `n` (address `n`), signed by `signer`.
    fn sealed(signer: u8, n: u8, body: Body<u32>, unix_ms: u64) -> Vec<u8> {
        let message = Message::<u32> { txid: 77, sender: Key::for_node(&id(n)), body };
        seal(&security(signer, &[]), &id(n), message.encode(), unix_ms)
    }

    #[test]
    fn allowed_nodes_find_a_signed_provider_and_an_outsider_is_never_learned() {
        const MEMBERS: u8 = 6;
        const PROVIDER: u8 = 3;
        const OUTSIDER: u8 = MEMBERS;
        let members: Vec<u8> = (0..MEMBERS).collect();
        let mut sim = Sim::new(11);
        for n in 0..=OUTSIDER {
            let address = sim.add(&id(n), config());
            assert_eq!(address, n as u32);
            // The outsider allows everyone: only the members' allow lists keep it out.
            let allowed = if n == OUTSIDER { (0..=OUTSIDER).collect() } else { members.clone() };
            let now = sim.now;
            sim.node(address).authenticate(security(n, &allowed), now, UNIX_MS).unwrap();
        }
        for n in 0..=OUTSIDER {
            let now = sim.now;
            let node = sim.node(n as u32);
            if n > 0 {
                node.bootstrap(vec![0], now);
            }
            let services = if n == PROVIDER || n == OUTSIDER { vec!["echo".to_string()] } else { vec![] };
            node.publish(record(&id(n), &services), now).unwrap();
            sim.after(n as u32);
            sim.run_for(Duration::from_millis(50));
        }
        sim.run_for(Duration::from_secs(3));
        for n in 0..MEMBERS {
            let now = sim.now;
            sim.node(n as u32).find_service("echo", now);
            sim.after(n as u32);
        }
        sim.run_for(Duration::from_secs(3));
        let finds: Vec<_> = sim
            .reports
            .iter()
            .filter(|(_, report)| matches!(report.purpose, LookupPurpose::FindService(_)))
            .collect();
        assert_eq!(finds.len(), MEMBERS as usize);
        for (n, report) in finds {
            let found: Vec<String> = report.providers.iter().map(|r| r.id.to_string()).collect();
            assert_eq!(found, [id(PROVIDER)], "node {n} finds the member provider, never the outsider");
        }
        for n in 0..MEMBERS {
            let node = sim.node(n as u32);
            assert_eq!(
                node.contact_count(),
                MEMBERS as usize - 1,
                "node {n}: every other member is a contact"
            );
            assert_eq!(node.known_records().len(), MEMBERS as usize - 1, "node {n}: and its record is known");
            assert!(node.contact_address(&Key::for_node(&id(OUTSIDER))).is_none(), "not in node {n}'s table");
            assert!(node.known_records().iter().all(|r| r.id.as_str() != id(OUTSIDER)));
        }
        assert!(sim.peer_events.iter().all(|(n, _, peer)| *n == OUTSIDER as u32 || *peer != id(OUTSIDER)));
        assert!(sim.node(0).stats().unauthenticated > 0, "the outsider's datagrams were refused at its seed");
        assert!(sim.node(OUTSIDER as u32).known_records().is_empty());
    }

    #[test]
    fn forged_provider_records_and_replayed_requests_change_nothing() {
        let now = Instant::now();
        let mut seed = DhtNode::<u32>::new(&id(0), config(), now);
        seed.authenticate(security(0, &[1, 2]), now, UNIX_MS).unwrap();
        // Node 1 stores node 2's record (a provider of echo) that node 1 signed: refused whole.
        let mut two = record(&id(2), &["echo".to_string()]);
        two.metadata = vec![("forged".into(), "by n1".into())];
        let forged = sign_record(&security(1, &[]), encode_record(&two).unwrap()).unwrap();
        let store = Body::Store { key: Key::for_service("echo"), ttl_ms: 60_000, record: forged };
        let error = seed.handle_datagram_checked(1, &sealed(1, 1, store, UNIX_MS), now).unwrap_err();
        assert_eq!(error, DecodeError::Auth(AuthError::BadSignature));
        assert_eq!((seed.stored_count(), seed.contact_count()), (0, 0));
        assert!(seed.poll_transmit().is_none(), "no answer, no contact");
        // Node 1's own record: stored. Node 1 joins the table once it answers a PING at its
        // address (the request alone could be a replay from elsewhere).
        let own = sign_record(&security(1, &[]), encode_record(&record(&id(1), &["echo".into()])).unwrap())
            .unwrap();
        let store = Body::Store { key: Key::for_service("echo"), ttl_ms: 60_000, record: own };
        seed.handle_datagram_checked(1, &sealed(1, 1, store, UNIX_MS), now).unwrap();
        assert_eq!(seed.stored_count(), 1);
        let sent: Vec<(u32, Vec<u8>)> = std::iter::from_fn(|| seed.poll_transmit()).collect();
        assert_eq!(sent.len(), 2, "STORED, and a PING to check the address");
        let ping = sent.iter().find_map(|(to, bytes)| {
            let (_, message) = crate::protocol::open::<u32>(&security(1, &[0]), bytes, UNIX_MS).ok()?;
            (*to == 1 && message.body == Body::Ping).then_some(message.txid)
        });
        let pong = Message::<u32> {
            txid: ping.expect("a PING to node 1"),
            sender: Key::for_node(&id(1)),
            body: Body::Pong,
        };
        let pong = seal(&security(1, &[]), &id(1), pong.encode(), UNIX_MS);
        assert_eq!(seed.contact_count(), 0);
        seed.handle_datagram_checked(1, &pong, now).unwrap();
        assert_eq!(seed.contact_address(&Key::for_node(&id(1))), Some(1));
        while seed.poll_transmit().is_some() {}
        // Node 1's PING replayed from address 99 (within the time window): the seed only
        // checks address 99, and node 1 stays at address 1.
        let replayed = sealed(1, 1, Body::Ping, UNIX_MS);
        seed.handle_datagram_checked(99, &replayed, now).unwrap();
        let sent: Vec<u32> = std::iter::from_fn(|| seed.poll_transmit()).map(|(to, _)| to).collect();
        assert_eq!(sent, [99, 99], "a PONG and a PING to check the address");
        seed.handle_timeout(now + Duration::from_secs(1));
        assert_eq!(
            seed.contact_address(&Key::for_node(&id(1))),
            Some(1),
            "unchanged after the check timed out"
        );
        // The same PING 6 minutes later: too old, refused whole.
        let later = now + Duration::from_secs(360);
        seed.set_wall_clock(later, UNIX_MS + 360_000);
        let error = seed.handle_datagram_checked(1, &replayed, later).unwrap_err();
        assert_eq!(error, DecodeError::Auth(AuthError::Stale));
        // A node whose key is not allowed, and a plaintext node.
        let stranger = sign_record(&security(9, &[]), encode_record(&record(&id(9), &[])).unwrap()).unwrap();
        let body = Body::Store { key: Key::for_node(&id(9)), ttl_ms: 60_000, record: stranger };
        let error =
            seed.handle_datagram_checked(9, &sealed(9, 9, body, UNIX_MS + 360_000), later).unwrap_err();
        assert_eq!(error, DecodeError::Auth(AuthError::NotAllowed));
        let plain = Message::<u32> { txid: 1, sender: Key::for_node("plain"), body: Body::Ping }.encode();
        assert_eq!(seed.handle_datagram_checked(5, &plain, later), Err(DecodeError::Plaintext));
        assert_eq!(seed.stats().unauthenticated, 4);
        assert_eq!(seed.stored_count(), 1);
        assert!(DhtNode::<u32>::new("plain", config(), now)
            .authenticate(security(0, &[]), now, UNIX_MS)
            .is_err());
    }
}
