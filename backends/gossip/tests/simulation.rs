//! Deterministic simulations of the sans-IO gossip core: no sockets, a simulated clock, seeded
//! randomness and a simulated network with configurable loss and latency.
//!
//! The numbers they print (convergence time, datagrams per node per period, time to detect
//! crashes, false positives under loss) go into the closing note:
//! `cargo test -p comms-gossip --test simulation -- --nocapture`.

use comms_gossip::{
    membership::Status,
    node::{Config, GossipNode},
    protocol::{encode, Body, Message, RecordBytes, Update},
};
use comms_plugin_api::{NodeRecord, PeerEventKind};
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::{
    cmp::Reverse,
    collections::BinaryHeap,
    time::{Duration, Instant},
};

const PERIOD: Duration = Duration::from_millis(1000);
/// Nodes other than the seeds start at random within this window.
const JOIN_WINDOW_MS: u64 = 2000;

fn record(i: u32, services: &[&str]) -> NodeRecord {
    let mut record = NodeRecord::new(format!("n{i}"));
    record.addresses = vec![("tcp".into(), format!("10.{}.{}.{}:7000", i >> 16, (i >> 8) & 255, i & 255))];
    record.services = services.iter().map(|s| s.to_string()).collect();
    record
}

fn config() -> Config {
    Config { protocol_period: PERIOD, probe_timeout: Duration::from_millis(300), ..Config::default() }
}

#[derive(Clone)]
struct Flight {
    at: Duration,
    seq: u64,
    from: u32,
    to: u32,
    bytes: Vec<u8>,
}

impl PartialEq for Flight {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Flight {}
impl PartialOrd for Flight {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Flight {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// A group of nodes on a simulated network.
#[derive(Clone)]
struct Sim {
    start: Instant,
    now: Duration,
    nodes: Vec<Option<GossipNode<u32>>>,
    /// The instant each node's timer is set for (lazy deletion of stale heap entries).
    scheduled: Vec<Option<Duration>>,
    timers: BinaryHeap<Reverse<(Duration, u32)>>,
    flights: BinaryHeap<Reverse<Flight>>,
    next_seq: u64,
    rng: StdRng,
    /// Probability that a datagram is lost.
    loss: f64,
    /// One-way latency, uniform in this range.
    latency: (Duration, Duration),
    delivered: u64,
    lost: u64,
    /// Left events seen per node, with the member they were about.
    left_events: Vec<Vec<String>>,
}

impl Sim {
    fn new(n: u32, seed: u64) -> Self {
        Self {
            start: Instant::now(),
            now: Duration::ZERO,
            nodes: (0..n).map(|_| None).collect(),
            scheduled: vec![None; n as usize],
            timers: BinaryHeap::new(),
            flights: BinaryHeap::new(),
            next_seq: 0,
            rng: StdRng::seed_from_u64(seed),
            loss: 0.0,
            latency: (Duration::from_millis(1), Duration::from_millis(5)),
            delivered: 0,
            lost: 0,
            left_events: vec![Vec::new(); n as usize],
        }
    }

    fn instant(&self) -> Instant {
        self.start + self.now
    }

    /// Starts node `i` now, with its record, joining through `seeds`.
    fn start_node(&mut self, i: u32, seeds: &[u32], config: Config) {
        let now = self.instant();
        let mut node = GossipNode::new(&format!("n{i}"), i, config, 1000 + i as u64, now);
        node.set_record(record(i, &[]), now).unwrap();
        node.join(seeds, now);
        self.nodes[i as usize] = Some(node);
        self.after(i);
    }

    /// Crashes node `i`: it sends and answers nothing from now on.
    fn crash(&mut self, i: u32) {
        self.nodes[i as usize] = None;
        self.scheduled[i as usize] = None;
    }

    /// Moves what node `i` wants to send into the network and reschedules its timer.
    fn after(&mut self, i: u32) {
        let Some(node) = self.nodes[i as usize].as_mut() else { return };
        while let Some((to, bytes)) = node.poll_transmit() {
            if self.rng.gen_bool(self.loss) {
                self.lost += 1;
                continue;
            }
            let latency = self.rng.gen_range(self.latency.0..=self.latency.1);
            self.next_seq += 1;
            self.flights.push(Reverse(Flight {
                at: self.now + latency,
                seq: self.next_seq,
                from: i,
                to,
                bytes,
            }));
        }
        while let Some(event) = node.poll_event() {
            if event.kind == PeerEventKind::Left {
                self.left_events[i as usize].push(event.record.id.to_string());
            }
        }
        let at = node.next_timeout().saturating_duration_since(self.start);
        if self.scheduled[i as usize] != Some(at) {
            self.scheduled[i as usize] = Some(at);
            self.timers.push(Reverse((at, i)));
        }
    }

    /// Runs the network and timers until `until` (simulated time since the start).
    fn run_until(&mut self, until: Duration) {
        loop {
            let next_flight = self.flights.peek().map(|Reverse(f)| f.at);
            let next_timer = self.timers.peek().map(|Reverse((at, _))| *at);
            let next = match (next_flight, next_timer) {
                (Some(f), Some(t)) => f.min(t),
                (Some(f), None) => f,
                (None, Some(t)) => t,
                (None, None) => break,
            };
            if next > until {
                break;
            }
            self.now = self.now.max(next);
            if next_flight == Some(next) {
                let Some(Reverse(flight)) = self.flights.pop() else { break };
                let now = self.instant();
                if let Some(node) = self.nodes.get_mut(flight.to as usize).and_then(Option::as_mut) {
                    self.delivered += 1;
                    node.handle_datagram(flight.from, &flight.bytes, now)
                        .expect("valid datagrams in the simulation");
                    self.after(flight.to);
                }
            } else {
                let Some(Reverse((at, i))) = self.timers.pop() else { break };
                if self.scheduled[i as usize] != Some(at) {
                    continue; // stale
                }
                self.scheduled[i as usize] = None;
                let now = self.instant();
                if let Some(node) = self.nodes[i as usize].as_mut() {
                    node.handle_timeout(now);
                    self.after(i);
                }
            }
        }
        self.now = self.now.max(until);
    }

    fn running(&self) -> impl Iterator<Item = (u32, &GossipNode<u32>)> + '_ {
        self.nodes.iter().enumerate().filter_map(|(i, node)| node.as_ref().map(|node| (i as u32, node)))
    }

    /// Whether every running node knows every other running node as live, and nothing else.
    fn converged(&self) -> bool {
        let running = self.running().count();
        self.running().all(|(_, node)| node.membership().live_count() == running - 1)
    }

    /// Runs period by period until `done`, at most `limit`; the simulated time it took.
    fn run_until_true(&mut self, limit: Duration, done: impl Fn(&Sim) -> bool) -> Option<Duration> {
        let started = self.now;
        let step = PERIOD / 4;
        while self.now - started < limit {
            if done(self) {
                return Some(self.now - started);
            }
            let next = self.now + step;
            self.run_until(next);
        }
        done(self).then(|| self.now - started)
    }

    fn datagrams_sent(&self) -> (u64, u64) {
        self.running().fold((0, 0), |(all, probes), (_, node)| {
            (all + node.stats().datagrams_sent, probes + node.stats().probe_datagrams_sent)
        })
    }
}

/// 1,000 nodes start within 2 s, each joining through seeds n0, n1, n2.
fn converge(n: u32, seed: u64, config: Config) -> (Sim, Duration) {
    let mut sim = Sim::new(n, seed);
    let seeds = [0, 1, 2];
    let mut starts: Vec<(Duration, u32)> = (0..n)
        .map(|i| {
            (
                if i < 3 {
                    Duration::ZERO
                } else {
                    Duration::from_millis(sim.rng.gen_range(0..JOIN_WINDOW_MS))
                },
                i,
            )
        })
        .collect();
    starts.sort();
    for (at, i) in starts {
        sim.run_until(at);
        sim.start_node(i, &seeds, config.clone());
    }
    // Diagnostics: GOSSIP_SIM_TRACE=1 prints how many (node, member) pairs are still missing every
    // 10 periods (then runs 300 periods; the convergence time printed is then meaningless).
    if std::env::var_os("GOSSIP_SIM_TRACE").is_some() {
        for _ in 0..30 {
            let running = sim.running().count();
            let missing: usize =
                sim.running().map(|(_, node)| running - 1 - node.membership().live_count()).sum();
            let lagging =
                sim.running().filter(|(_, node)| node.membership().live_count() < running - 1).count();
            let queued: usize = sim.running().map(|(_, node)| node.queued_updates()).sum();
            eprintln!("t={:?} missing={missing} lagging={lagging} queued={queued}", sim.now);
            let next = sim.now + PERIOD * 10;
            sim.run_until(next);
        }
    }
    let took = sim
        .run_until_true(Duration::from_secs(300), Sim::converged)
        .unwrap_or_else(|| panic!("{n} nodes did not converge within 300 s of simulated time"));
    (sim, took)
}

/// The 1,000-node group after convergence, built once per test binary and cloned by each
/// test (tests run in parallel on few cores: converging once saves two thirds of the work).
fn thousand_converged() -> (Sim, Duration) {
    static CONVERGED: std::sync::OnceLock<(Sim, Duration)> = std::sync::OnceLock::new();
    CONVERGED.get_or_init(|| converge(1000, 1, config())).clone()
}

#[test]
fn a_thousand_nodes_converge_and_spread_a_record_update_and_a_graceful_leave() {
    let wall = Instant::now();
    let n = 1000;
    let (mut sim, took) = thousand_converged();
    eprintln!(
        "[sim] {n} nodes, 3 seeds, starts spread over {JOIN_WINDOW_MS} ms: every node knows every other \
         {:.1} s of simulated time after the last start ({:.1} s after the first; {:.1} periods), \
         {} datagrams delivered",
        took.as_secs_f64(),
        sim.now.as_secs_f64(),
        took.as_secs_f64() / PERIOD.as_secs_f64(),
        sim.delivered
    );

    // Steady state (once the early syncs after joining are over): datagrams per node per period.
    let settled = sim.now + PERIOD * 10;
    sim.run_until(settled);
    let (all_before, probes_before) = sim.datagrams_sent();
    let periods = 20;
    let until = sim.now + PERIOD * periods;
    sim.run_until(until);
    let (all_after, probes_after) = sim.datagrams_sent();
    let per_node_period = |count: u64| count as f64 / n as f64 / periods as f64;
    let probe_rate = per_node_period(probes_after - probes_before);
    let total_rate = per_node_period(all_after - all_before);
    eprintln!(
        "[sim] steady state over {periods} periods: {probe_rate:.2} probe datagrams (ping, ping-req, ack) and \
         {total_rate:.2} datagrams in all (with table syncs) sent per node per period"
    );
    assert!(probe_rate < 2.5, "failure detection must cost O(1) datagrams per node per period: {probe_rate}");
    // Anti-entropy, amortized: a sync is one table each way, once per scaled sync interval.
    let table = sim.nodes[10].as_ref().unwrap().membership().snapshot_datagrams(&[0; 4], 1400);
    let bytes: usize = table.iter().map(Vec::len).sum();
    let interval = config().sync_interval.as_secs_f64() * (1.0 + (n as f64 / 32.0).log2().ceil());
    eprintln!(
        "[sim] a full table of {n} members takes {} datagrams ({bytes} bytes); one sync each way every \
         {interval:.0} s adds {:.2} datagrams per node per period on average",
        table.len(),
        2.0 * table.len() as f64 / (interval / PERIOD.as_secs_f64())
    );
    assert!(sim.converged(), "still converged");

    // A record update (a new service) spreads to everyone.
    let now = sim.instant();
    sim.nodes[500].as_mut().unwrap().set_record(record(500, &["billing"]), now).unwrap();
    sim.after(500);
    let spread = sim
        .run_until_true(Duration::from_secs(120), |sim| {
            sim.running().filter(|(i, _)| *i != 500).all(|(_, node)| {
                node.membership().get("n500").is_some_and(|m| m.record.services == ["billing"])
            })
        })
        .expect("the record update reached everyone");
    eprintln!(
        "[sim] a record update (new service) reached all {} others in {:.1} s",
        n - 1,
        spread.as_secs_f64()
    );

    // A graceful leave spreads to everyone, faster than a failure could be detected.
    sim.nodes[700].as_mut().unwrap().leave();
    sim.after(700);
    let spread = sim
        .run_until_true(Duration::from_secs(120), |sim| {
            sim.running()
                .filter(|(i, _)| *i != 700)
                .all(|(_, node)| node.membership().get("n700").is_some_and(|m| m.status == Status::Left))
        })
        .expect("the leave reached everyone");
    eprintln!("[sim] a graceful leave reached all {} others in {:.1} s", n - 1, spread.as_secs_f64());
    let wrongly_dead: usize = sim.left_events.iter().flatten().filter(|id| *id != "n700").count();
    assert_eq!(wrongly_dead, 0, "no loss, no crash: nobody else left");
    eprintln!("[sim] wall time {:.1} s", wall.elapsed().as_secs_f64());
}

#[test]
fn crashed_nodes_are_declared_dead_by_every_survivor() {
    let wall = Instant::now();
    let n = 1000;
    let (mut sim, _) = thousand_converged();
    let crashed: Vec<u32> = (0..10).map(|k| 100 + k * 83).collect();
    for &i in &crashed {
        sim.crash(i);
    }
    let ids: Vec<String> = crashed.iter().map(|i| format!("n{i}")).collect();
    let detected = sim
        .run_until_true(Duration::from_secs(300), |sim| {
            sim.running().all(|(_, node)| {
                ids.iter().all(|id| node.membership().get(id).is_none_or(|m| !m.status.is_live()))
            })
        })
        .expect("every survivor declared the crashed nodes dead");
    let suspicion = config().suspicion_multiplier as f64 * (n as f64).log10() * PERIOD.as_secs_f64();
    eprintln!(
        "[sim] {} of {n} nodes crashed (no leave): every survivor marked them dead after {:.1} s \
         (suspicion timeout {suspicion:.0} s)",
        crashed.len(),
        detected.as_secs_f64()
    );
    let wrongly_dead: usize = sim.left_events.iter().flatten().filter(|id| !ids.contains(id)).count();
    assert_eq!(wrongly_dead, 0, "only the crashed nodes were declared dead");
    assert!(sim.converged(), "the survivors agree");
    eprintln!("[sim] wall time {:.1} s", wall.elapsed().as_secs_f64());
}

#[test]
fn five_percent_loss_causes_no_false_deaths() {
    let wall = Instant::now();
    let n = 1000;
    let (mut sim, _) = thousand_converged();
    // GOSSIP_SIM_LOSS=0.2 explores heavier loss (the assertion below is for 5%).
    sim.loss = std::env::var("GOSSIP_SIM_LOSS").ok().and_then(|loss| loss.parse().ok()).unwrap_or(0.05);
    let periods = 60;
    let (lost, delivered) = (sim.lost, sim.delivered);
    let total = |sim: &Sim, stat: fn(&comms_gossip::node::Stats) -> u64| -> u64 {
        sim.running().map(|(_, node)| stat(node.stats())).sum()
    };
    let suspicions_before = total(&sim, |stats| stats.suspicions);
    let probes_before = total(&sim, |stats| stats.probes);
    let declared_before = total(&sim, |stats| stats.deaths_declared);
    let until = sim.now + PERIOD * periods;
    sim.run_until(until);
    let suspicions = total(&sim, |stats| stats.suspicions) - suspicions_before;
    let probes = total(&sim, |stats| stats.probes) - probes_before;
    // A declaration: one node's suspicion timer ran out; it then gossips the death.
    let declarations = total(&sim, |stats| stats.deaths_declared) - declared_before;
    let wrongly_dead: std::collections::BTreeSet<&String> = sim.left_events.iter().flatten().collect();
    let false_deaths = wrongly_dead.len();
    let loss = (sim.lost - lost) as f64 / ((sim.lost - lost) + (sim.delivered - delivered)) as f64;
    eprintln!(
        "[sim] {n} nodes, {:.1}% datagrams lost, {periods} periods: {probes} probes, {suspicions} suspicions \
         ({:.3}% of probes), {false_deaths} members wrongly declared dead ({declarations} declarations: \
         false-positive rate {:.5} per probe)",
        loss * 100.0,
        suspicions as f64 * 100.0 / probes as f64,
        declarations as f64 / probes as f64
    );
    if sim.loss <= 0.05 {
        assert_eq!(false_deaths, 0, "indirect probes and suspicion must absorb 5% loss");
        assert!(sim.running().all(|(_, node)| node.peers().len() == n as usize - 1));
    }
    eprintln!("[sim] wall time {:.1} s", wall.elapsed().as_secs_f64());
}

#[test]
fn hostile_datagrams_change_nothing_and_forged_updates_stay_within_bounds() {
    let config = Config { max_members: 50, ..config() };
    let mut sim = Sim::new(20, 4);
    for i in 0..20 {
        sim.start_node(i, &[0], config.clone());
    }
    sim.run_until_true(Duration::from_secs(60), Sim::converged).expect("20 nodes converge");
    let now = sim.instant();
    let victim = sim.nodes[5].as_mut().unwrap();
    let mut rng = StdRng::seed_from_u64(9);
    // Garbage and oversized datagrams: errors, no panic, nothing learned.
    for size in [0usize, 1, 3, 10, 100, 1399, 1401, 70_000] {
        let garbage: Vec<u8> = (0..size).map(|_| rng.gen()).collect();
        assert!(victim.handle_datagram(999, &garbage, now).is_err(), "{size} random bytes refused");
    }
    let oversized = encode(&Message::<u32> {
        body: Body::State { respond: false },
        updates: (0..100)
            .map(|i| Update::Alive {
                id: format!("big{i}"),
                incarnation: 0,
                address: 999,
                record: RecordBytes::from_record(&record(i, &["x"])),
            })
            .collect(),
    });
    assert!(oversized.len() > config.max_datagram);
    assert!(victim.handle_datagram(999, &oversized, now).is_err(), "over max_datagram");
    assert_eq!(victim.membership().live_count(), 19);
    // Forged members: no more than max_members are kept, whatever a stranger sends.
    for batch in 0..20 {
        let forged = encode(&Message::<u32> {
            body: Body::State { respond: false },
            updates: (0..10)
                .map(|i| Update::Alive {
                    id: format!("forged{batch}-{i}"),
                    incarnation: 0,
                    address: 1000 + i,
                    record: RecordBytes::from_record(&NodeRecord::new("forged")),
                })
                .collect(),
        });
        victim.handle_datagram(999, &forged, now).unwrap();
    }
    assert_eq!(victim.membership().len(), 50, "the table stays at max_members");
    assert!(victim.membership().stats().table_full > 0);
    // A forged suspicion and a forged death of the victim itself are refuted.
    let before = victim.membership().local_incarnation();
    let forged = encode(&Message::<u32> {
        body: Body::Ack { seq: 1 },
        updates: vec![Update::Dead { id: "n5".into(), incarnation: before + 10 }],
    });
    victim.handle_datagram(999, &forged, now).unwrap();
    assert!(victim.membership().local_incarnation() > before + 10);
    // State requests from one source: one answer per period.
    let request = encode(&Message::<u32> { body: Body::State { respond: true }, updates: vec![] });
    let join = encode(&Message::<u32> { body: Body::Join, updates: vec![] });
    let replies_before = victim.stats().state_replies;
    for _ in 0..50 {
        victim.handle_datagram(4242, &request, now).unwrap();
        victim.handle_datagram(4242, &join, now).unwrap();
    }
    assert_eq!(victim.stats().state_replies - replies_before, 1, "one table per source per period");
    for source in 5000..5100 {
        victim.handle_datagram(source, &request, now).unwrap();
    }
    assert!(victim.stats().state_replies - replies_before <= config.max_state_replies_per_period as u64);
    sim.after(5);
    // The group shakes off the forged members (probed, never answering: suspected, then dead)
    // and the victim's refutation spreads: nobody took n5 for dead.
    sim.run_until(sim.now + Duration::from_secs(60));
    assert!(sim
        .running()
        .filter(|(i, _)| *i != 5)
        .all(|(_, node)| node.membership().get("n5").is_some_and(|m| m.status.is_live())));
    let victim = sim.nodes[5].as_ref().unwrap();
    assert_eq!(victim.membership().live_count(), 19, "forged members were declared dead");
}
