use super::*;

/// A deterministic PRNG (xorshift64*), so every simulated run is reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Clone, Copy)]
struct Faults {
    loss_percent: u64,
    duplicate_percent: u64,
    max_delay_ms: u64,
    /// Added to every datagram's random delay (a longer path, reordering unchanged).
    base_delay_ms: u64,
}

const CLEAN: Faults = Faults { loss_percent: 0, duplicate_percent: 0, max_delay_ms: 1, base_delay_ms: 0 };

/// Two endpoints (addresses 1 and 2) joined by a simulated network with a simulated clock.
struct Network {
    now: Instant,
    endpoints: [Endpoint<u8>; 2],
    in_transit: Vec<(Instant, u8, u8, Vec<u8>)>,
    rng: Rng,
    faults: Faults,
    received: [Vec<Vec<u8>>; 2],
}

impl Network {
    fn new(config: Config, faults: Faults, seed: u64) -> Self {
        Self {
            now: Instant::now(),
            endpoints: [Endpoint::new(config.clone(), 11), Endpoint::new(config, 22)],
            in_transit: Vec::new(),
            rng: Rng(seed | 1),
            faults,
            received: [Vec::new(), Vec::new()],
        }
    }

    /// Advances 1 ms: transmits (with loss, duplication and random delay, hence reordering),
    /// delivers what is due, fires timers.
    fn step(&mut self) {
        for side in 0..2u8 {
            while let Some((to, datagram)) = self.endpoints[side as usize].poll_transmit(self.now) {
                assert!(datagram.len() <= self.endpoints[0].config().max_datagram);
                if self.rng.chance(self.faults.loss_percent) {
                    continue;
                }
                let copies = if self.rng.chance(self.faults.duplicate_percent) { 2 } else { 1 };
                for _ in 0..copies {
                    let delay = Duration::from_millis(
                        1 + self.faults.base_delay_ms + self.rng.below(self.faults.max_delay_ms),
                    );
                    self.in_transit.push((self.now + delay, to, side + 1, datagram.clone()));
                }
            }
        }
        self.now += Duration::from_millis(1);
        let now = self.now;
        let (due, later): (Vec<_>, Vec<_>) = self.in_transit.drain(..).partition(|(at, ..)| *at <= now);
        self.in_transit = later;
        for (_, to, from, datagram) in due {
            self.endpoints[(to - 1) as usize].handle_datagram(now, from, &datagram);
        }
        for (side, endpoint) in self.endpoints.iter_mut().enumerate() {
            if endpoint.poll_timeout().is_some_and(|at| at <= now) {
                endpoint.handle_timeout(now);
            }
            while let Some((_, message)) = endpoint.poll_message() {
                self.received[side].push(message);
            }
        }
    }

    fn run_until(&mut self, limit_ms: u64, done: impl Fn(&Self) -> bool) {
        for _ in 0..limit_ms {
            if done(self) {
                return;
            }
            self.step();
        }
        assert!(done(self), "not done after {limit_ms} simulated ms");
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

#[test]
fn a_one_mebibyte_message_survives_five_percent_loss_reordering_and_duplication() {
    let faults = Faults { loss_percent: 5, duplicate_percent: 3, max_delay_ms: 8, base_delay_ms: 0 };
    let mut net = Network::new(Config::default(), faults, 7);
    let message = pattern(1 << 20, 3);
    net.endpoints[0].send(net.now, 2, &message).unwrap();
    net.run_until(120_000, |net| !net.received[1].is_empty());
    net.run_until(10_000, |net| !net.endpoints[0].has_pending_sends());
    assert_eq!(net.received[1].len(), 1, "exactly once");
    assert!(net.received[1][0] == message, "intact");
    let stats = net.endpoints[0].stats();
    assert!(stats.retransmissions > 0, "loss was repaired by retransmission: {stats:?}");
    assert_eq!(stats.gave_up, 0, "a lossy but live peer is never given up: {stats:?}");
    assert_eq!(net.endpoints[1].buffered_bytes(), 0, "nothing left in reassembly");
}

#[test]
fn reliable_mode_delivers_every_message_once_and_in_order_despite_faults() {
    for seed in 1..=5 {
        let faults = Faults { loss_percent: 10, duplicate_percent: 10, max_delay_ms: 20, base_delay_ms: 0 };
        let mut net = Network::new(Config { max_datagram: 200, ..Config::default() }, faults, seed);
        let messages: Vec<Vec<u8>> = (0..200).map(|i| pattern(i * 7 % 900, i as u8)).collect();
        for message in &messages {
            net.endpoints[0].send(net.now, 2, message).unwrap();
        }
        net.run_until(120_000, |net| net.received[1].len() == messages.len());
        assert!(net.received[1] == messages, "seed {seed}: all, once, in order");
        assert!(net.endpoints[1].stats().duplicates > 0, "seed {seed}: duplicates were suppressed");
    }
}

#[test]
fn both_directions_at_once() {
    let faults = Faults { loss_percent: 5, duplicate_percent: 0, max_delay_ms: 5, base_delay_ms: 0 };
    let mut net = Network::new(Config::default(), faults, 99);
    let a = pattern(100_000, 1);
    let b = pattern(70_000, 2);
    net.endpoints[0].send(net.now, 2, &a).unwrap();
    net.endpoints[1].send(net.now, 1, &b).unwrap();
    net.run_until(60_000, |net| net.received[0].len() == 1 && net.received[1].len() == 1);
    assert!(net.received[1][0] == a && net.received[0][0] == b);
}

#[test]
fn best_effort_mode_fragments_and_reassembles_without_acks() {
    let config = Config { reliable: false, max_datagram: 300, ..Config::default() };
    let mut net = Network::new(config, CLEAN, 5);
    let messages: Vec<Vec<u8>> = (0..20).map(|i| pattern(i * 500, i as u8)).collect();
    for message in &messages {
        net.endpoints[0].send(net.now, 2, message).unwrap();
    }
    net.run_until(1_000, |net| net.received[1].len() == messages.len());
    assert!(net.received[1] == messages);
    assert_eq!(net.endpoints[0].stats().retransmissions, 0);
    assert!(!net.endpoints[0].has_pending_sends(), "nothing waits for an ack");
}

#[test]
fn best_effort_loss_loses_whole_messages_never_corrupts_them() {
    let config = Config { reliable: false, max_datagram: 300, ..Config::default() };
    let faults = Faults { loss_percent: 20, duplicate_percent: 10, max_delay_ms: 10, base_delay_ms: 0 };
    let mut net = Network::new(config, faults, 3);
    let messages: Vec<Vec<u8>> = (0..100).map(|i| pattern(1000 + i, i as u8)).collect();
    for message in &messages {
        net.endpoints[0].send(net.now, 2, message).unwrap();
    }
    for _ in 0..100 {
        net.step();
    }
    assert!(net.in_transit.is_empty());
    for got in &net.received[1] {
        assert!(messages.contains(got), "every delivered message is one that was sent, intact");
    }
    assert!(!net.received[1].is_empty() && net.received[1].len() < messages.len(), "20 % loss lost some");
    assert!(net.endpoints[1].buffered_bytes() <= 8 * 1100, "at most max_partial_messages partials are kept");
}

#[test]
fn the_rto_follows_the_measured_round_trip_within_bounds() {
    let config = Config::default();
    let mut rtt = Rtt::new(&config);
    assert_eq!(rtt.rto, config.initial_rto);
    for _ in 0..20 {
        rtt.sample(Duration::from_millis(100), &config);
    }
    assert!(rtt.rto >= Duration::from_millis(100) && rtt.rto < Duration::from_millis(150), "{:?}", rtt.rto);
    for _ in 0..50 {
        rtt.sample(Duration::from_micros(10), &config);
    }
    assert_eq!(rtt.rto, config.min_rto, "clamped below");
    let mut now = Instant::now();
    for _ in 0..10 {
        now += config.max_rto;
        rtt.back_off(now, &config);
    }
    assert_eq!(rtt.rto, config.max_rto, "clamped above");
}

#[test]
fn a_silent_peer_is_abandoned_after_max_transmissions_and_can_come_back() {
    let config = Config { max_transmissions: 4, ..Config::default() };
    let mut net = Network::new(config, Faults { loss_percent: 100, ..CLEAN }, 1);
    net.endpoints[0].send(net.now, 2, b"into the void").unwrap();
    net.run_until(60_000, |net| !net.endpoints[0].has_pending_sends());
    let stats = net.endpoints[0].stats();
    assert_eq!(stats.retransmissions, 3);
    assert_eq!((stats.abandoned_messages, stats.gave_up), (1, 1));
    let Some(Event::GaveUp { peer: 2, dropped_messages: 1, .. }) = net.endpoints[0].poll_event() else {
        panic!("the give-up is reported")
    };
    assert_eq!(net.endpoints[0].poll_event(), None, "once");
    // The peer comes back: the first send learns it was given up, then messages flow and the
    // receiver skips what was abandoned.
    net.faults = CLEAN;
    let error = net.endpoints[0].send(net.now, 2, b"lost news").unwrap_err();
    assert!(matches!(error, SendError::Unreachable { dropped_messages: 1, .. }), "{error}");
    net.endpoints[0].send(net.now, 2, b"hello again").unwrap();
    net.run_until(1_000, |net| !net.received[1].is_empty());
    assert_eq!(net.received[1], vec![b"hello again".to_vec()]);
}

#[test]
fn a_restarted_sender_is_recognised_by_its_new_epoch() {
    let mut net = Network::new(Config::default(), CLEAN, 1);
    for _ in 0..3 {
        net.endpoints[0].send(net.now, 2, b"before").unwrap();
    }
    net.run_until(1_000, |net| net.received[1].len() == 3);
    net.endpoints[0] = Endpoint::new(Config::default(), 33);
    net.endpoints[0].send(net.now, 2, b"after restart").unwrap();
    net.run_until(1_000, |net| net.received[1].len() == 4);
    assert_eq!(net.received[1][3], b"after restart".to_vec());
}

#[test]
fn send_enforces_the_message_size_and_the_queue_bound() {
    let config = Config { max_message_size: 10_000, max_queued_bytes: 25_000, ..Config::default() };
    let mut endpoint = Endpoint::new(config, 1);
    let now = Instant::now();
    assert_eq!(endpoint.send(now, 9u8, &[0; 10_001]), Err(SendError::TooLarge { size: 10_001, max: 10_000 }));
    endpoint.send(now, 9, &[0; 10_000]).unwrap();
    endpoint.send(now, 9, &[0; 10_000]).unwrap();
    assert_eq!(endpoint.send(now, 9, &[0; 10_000]), Err(SendError::QueueFull));
    endpoint.send(now, 8, &[0; 10_000]).expect("another peer has its own queue");
}

#[test]
fn a_flood_of_bogus_fragments_from_strangers_stays_within_the_bounds() {
    for reliable in [true, false] {
        let config = Config {
            reliable,
            max_peers: 16,
            max_partial_messages: 4,
            max_peer_reassembly_bytes: 64 << 10,
            max_total_reassembly_bytes: 256 << 10,
            ..Config::default()
        };
        let mut endpoint: Endpoint<u32> = Endpoint::new(config.clone(), 1);
        let mut rng = Rng(42);
        let now = Instant::now();
        for i in 0..50_000u32 {
            let stranger = rng.below(1_000) as u32;
            let mut datagram = vec![MAGIC, if reliable { KIND_RELIABLE } else { KIND_BEST_EFFORT }];
            datagram.extend_from_slice(&(rng.below(3) as u32).to_be_bytes()); // epoch
            datagram.extend_from_slice(&rng.below(200).to_be_bytes()); // seq
            datagram.extend_from_slice(&0u64.to_be_bytes()); // base
            datagram.extend_from_slice(&i.to_be_bytes()); // message number
            datagram.extend_from_slice(&1u16.to_be_bytes()); // fragment 1 of ...
            datagram.extend_from_slice(&1000u16.to_be_bytes()); // ... 1000
            datagram.extend_from_slice(&(4u32 << 20).to_be_bytes()); // of a 4 MiB message
            datagram.extend_from_slice(&[0xee; 1_000]);
            endpoint.handle_datagram(now, stranger, &datagram);
            assert!(endpoint.peer_count() <= config.max_peers);
            assert!(endpoint.buffered_bytes() <= config.max_total_reassembly_bytes);
        }
        assert!(endpoint.poll_message().is_none(), "nothing bogus completes");
        let stats = endpoint.stats();
        assert!(stats.evicted_partials + stats.over_budget + stats.out_of_window > 0, "{stats:?}");
    }
}

#[test]
fn malformed_datagrams_are_counted_and_never_panic() {
    let mut endpoint: Endpoint<u8> = Endpoint::new(Config::default(), 1);
    let now = Instant::now();
    let mut sender: Endpoint<u8> = Endpoint::new(Config::default(), 2);
    sender.send(now, 1, b"a real message").unwrap();
    let (_, real) = sender.poll_transmit(now).unwrap();
    for cut in 0..DATA_HEADER {
        endpoint.handle_datagram(now, 5, &real[..cut]);
    }
    assert_eq!(endpoint.stats().malformed, DATA_HEADER as u64, "every truncated header is counted");
    let mut rng = Rng(1234);
    for _ in 0..20_000 {
        let len = rng.below(120) as usize;
        let mut datagram: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        if rng.chance(50) && !datagram.is_empty() {
            datagram[0] = MAGIC;
        }
        if rng.chance(50) && datagram.len() > 1 {
            datagram[1] = 1 + rng.below(3) as u8;
        }
        endpoint.handle_datagram(now, rng.below(4) as u8, &datagram);
        while endpoint.poll_transmit(now).is_some() {}
        while endpoint.poll_message().is_some() {}
    }
    assert!(endpoint.stats().malformed > DATA_HEADER as u64);
    assert!(endpoint.peer_count() <= Config::default().max_peers);
    // From an address the garbage did not come from: one it came from may have had a random but
    // valid datagram adopt an epoch, and a new one then needs a proof (see "Epoch changes").
    endpoint.handle_datagram(now, 5, &real);
    assert_eq!(endpoint.poll_message(), Some((5, b"a real message".to_vec())), "still works");
}

#[test]
fn selective_acks_spare_what_arrived_and_only_the_gap_is_retransmitted() {
    let now = Instant::now();
    let mut a: Endpoint<u8> = Endpoint::new(Config::default(), 1);
    let mut b: Endpoint<u8> = Endpoint::new(Config::default(), 2);
    for message in [b"one", b"two", b"six"] {
        a.send(now, 2, message).unwrap();
    }
    let sent: Vec<Vec<u8>> = std::iter::from_fn(|| a.poll_transmit(now)).map(|(_, d)| d).collect();
    assert_eq!(sent.len(), 3);
    b.handle_datagram(now, 1, &sent[1]);
    b.handle_datagram(now, 1, &sent[2]);
    assert_eq!(b.poll_message(), None, "ordered: nothing before the first message");
    let (to, ack) = b.poll_transmit(now).expect("an ack");
    assert_eq!(to, 1);
    assert_eq!(b.poll_transmit(now), None, "one ack answers both datagrams");
    a.handle_datagram(now, 2, &ack);
    let later = now + Duration::from_secs(1);
    a.handle_timeout(later);
    let resent: Vec<Vec<u8>> = std::iter::from_fn(|| a.poll_transmit(later)).map(|(_, d)| d).collect();
    assert_eq!(resent.len(), 1, "only the missing datagram");
    b.handle_datagram(later, 1, &resent[0]);
    let got: Vec<Vec<u8>> = std::iter::from_fn(|| b.poll_message()).map(|(_, m)| m).collect();
    assert_eq!(got, vec![b"one".to_vec(), b"two".to_vec(), b"six".to_vec()]);
    let (_, ack) = b.poll_transmit(later).expect("an ack");
    a.handle_datagram(later, 2, &ack);
    assert!(!a.has_pending_sends());
}

#[test]
fn a_peer_silent_for_peer_timeout_is_given_up_reported_once_then_sends_start_afresh() {
    let config = Config { peer_timeout: Duration::from_secs(1), max_datagram: 200, ..Config::default() };
    let mut net = Network::new(config, Faults { loss_percent: 100, ..CLEAN }, 1);
    let started = net.now;
    for n in 0..3 {
        net.endpoints[0].send(net.now, 2, &pattern(1_000, n)).unwrap();
    }
    net.run_until(60_000, |net| !net.endpoints[0].has_pending_sends());
    let waited = net.now - started;
    assert!(
        waited >= Duration::from_secs(1) && waited < Duration::from_millis(1_100),
        "gave up after {waited:?}"
    );
    let event = net.endpoints[0].poll_event().expect("the give-up is reported");
    let Event::GaveUp { peer: 2, dropped_messages: 3, undelivered: 3, silent_for } = event else {
        panic!("{event:?}")
    };
    assert!(silent_for >= Duration::from_secs(1), "{silent_for:?}");
    assert_eq!(net.endpoints[0].poll_event(), None, "one report per give-up");
    assert_eq!(net.endpoints[0].stats().abandoned_messages, 3, "counted in messages, not datagrams");
    assert_eq!(net.endpoints[0].poll_timeout(), None, "nothing left to wait for");

    // The next send fails once and is not queued; the one after starts afresh.
    let error = net.endpoints[0].send(net.now, 2, b"not queued").unwrap_err();
    assert_eq!(error, SendError::Unreachable { dropped_messages: 3, silent_for });
    assert!(error.to_string().contains("3 queued message(s)"), "{error}");
    assert!(!net.endpoints[0].has_pending_sends());
    net.faults = CLEAN;
    net.endpoints[0].send(net.now, 2, b"afresh").unwrap();
    net.run_until(1_000, |net| !net.received[1].is_empty());
    assert_eq!(net.received[1], vec![b"afresh".to_vec()]);
    net.run_until(1_000, |net| !net.endpoints[0].has_pending_sends());
    assert_eq!(net.endpoints[0].poll_event(), None, "a live peer is not given up again");
}

#[test]
fn giving_up_reports_as_undelivered_only_the_messages_sent_counted() {
    // A window of 4 datagrams and messages of 5 fragments each: at the give-up, the first
    // message is partly in flight and partly queued, the others are queued only.
    let config =
        Config { peer_timeout: Duration::from_secs(1), max_datagram: 200, window: 4, ..Config::default() };
    let mut net = Network::new(config, Faults { loss_percent: 100, ..CLEAN }, 1);
    for (n, counted) in [true, false, true, false, true].into_iter().enumerate() {
        net.endpoints[0].send_counted(net.now, 2, &pattern(800, n as u8), counted).unwrap();
    }
    net.run_until(60_000, |net| !net.endpoints[0].has_pending_sends());
    let event = net.endpoints[0].poll_event().expect("the give-up is reported");
    assert!(matches!(event, Event::GaveUp { peer: 2, dropped_messages: 5, undelivered: 3, .. }), "{event:?}");
    let stats = net.endpoints[0].stats();
    assert_eq!((stats.abandoned_messages, stats.undelivered), (5, 3));
}

#[test]
fn give_up_all_abandons_every_pending_peer_and_counts_like_a_give_up() {
    let now = Instant::now();
    let mut a = Endpoint::new(Config::default(), 11);
    a.send_counted(now, 2, b"in flight, counted", true).unwrap();
    while a.poll_transmit(now).is_some() {}
    a.send_counted(now, 2, b"queued, not counted", false).unwrap();
    a.send_counted(now, 3, b"queued, counted", true).unwrap();
    a.give_up_all(now + Duration::from_millis(5));
    assert!(!a.has_pending_sends());
    let stats = a.stats();
    assert_eq!((stats.gave_up, stats.abandoned_messages, stats.undelivered), (2, 3, 2));
    let mut events: Vec<_> = std::iter::from_fn(|| a.poll_event()).collect();
    events.sort_by_key(|Event::GaveUp { peer, .. }| *peer);
    let counts: Vec<_> = events
        .iter()
        .map(|Event::GaveUp { peer, dropped_messages, undelivered, .. }| {
            (*peer, *dropped_messages, *undelivered)
        })
        .collect();
    assert_eq!(counts, [(2, 2, 1), (3, 1, 1)]);
    a.give_up_all(now + Duration::from_millis(6));
    assert_eq!((a.stats().gave_up, a.poll_event()), (2, None), "idle peers are left alone");
}

#[test]
fn acknowledgements_that_keep_coming_keep_a_slow_peer_alive() {
    // 10 % loss each way and a peer timeout far below the time the transfer takes: every ack
    // restarts the clock, so the peer is never given up.
    let peer_timeout = Duration::from_millis(500);
    let config = Config { peer_timeout, max_rto: peer_timeout / 4, ..Config::default() };
    let faults = Faults { loss_percent: 10, duplicate_percent: 0, max_delay_ms: 30, base_delay_ms: 0 };
    let mut net = Network::new(config, faults, 17);
    let messages: Vec<Vec<u8>> = (9..13).map(|n| pattern(1 << 20, n)).collect();
    for message in &messages {
        net.endpoints[0].send(net.now, 2, message).unwrap();
    }
    let started = net.now;
    net.run_until(120_000, |net| net.received[1].len() == messages.len());
    let took = net.now - started;
    assert!(took > peer_timeout * 4, "the transfer ({took:?}) outlasts the peer timeout several times");
    assert!(net.received[1] == messages);
    assert_eq!(net.endpoints[0].stats().gave_up, 0);
}

/// Sends `count` distinct 1 MiB messages from endpoint 1 to 2 and returns the simulated time
/// until all arrived, with the network for its counters.
fn transfer(faults: Faults, seed: u64, count: u8) -> (Duration, Network) {
    let mut net = Network::new(Config::default(), faults, seed);
    let messages: Vec<Vec<u8>> = (0..count).map(|i| pattern(1 << 20, i)).collect();
    for message in &messages {
        net.endpoints[0].send(net.now, 2, message).unwrap();
    }
    let started = net.now;
    net.run_until(600_000, |net| net.received[1].len() == messages.len());
    assert!(net.received[1] == messages, "seed {seed}: all, once, in order");
    (net.now - started, net)
}

#[test]
fn five_percent_loss_is_repaired_by_fast_retransmission_within_a_bounded_time() {
    // 4 MiB (3,080 datagrams) through 5 % loss and 2 to 6 ms round trips with reordering. The
    // old algorithm (resend only after the RTO, doubled on every expiry, sends beyond the
    // receiver's window) took 30 s for seed 1; loss recovery on selective acks about 0.4 s.
    for seed in [1, 3, 5] {
        let faults = Faults { loss_percent: 5, duplicate_percent: 0, max_delay_ms: 3, base_delay_ms: 0 };
        let (took, net) = transfer(faults, seed, 4);
        let stats = net.endpoints[0].stats();
        assert!(took < Duration::from_millis(700), "seed {seed}: 4 MiB took {took:?}: {stats:?}");
        let timer_driven = stats.retransmissions - stats.fast_retransmissions;
        assert!(
            stats.fast_retransmissions > 10 * timer_driven,
            "seed {seed}: holes are repaired on acknowledgements, not timeouts: {stats:?}"
        );
        assert_eq!(stats.gave_up, 0);
    }
}

#[test]
fn the_sender_never_overruns_the_receivers_window() {
    // Datagrams beyond the oldest unacknowledged one plus the window would be dropped by the
    // receiver and cost a timeout each.
    for seed in [1, 3] {
        let faults = Faults { loss_percent: 5, duplicate_percent: 0, max_delay_ms: 8, base_delay_ms: 0 };
        let (_, net) = transfer(faults, seed, 2);
        assert_eq!(net.endpoints[1].stats().out_of_window, 0, "seed {seed}");
    }
}

#[test]
fn no_loss_means_no_retransmission_even_with_reordering() {
    // Reordering by up to 2, 19 and 1 ms each way (round trips of 2 to 6, 2 to 40 and 22 to
    // 26 ms): acknowledgements show holes all the time, but none outlasts the loss delay.
    for (base_delay_ms, max_delay_ms) in [(0, 3), (0, 20), (10, 2)] {
        for seed in [1, 3, 5] {
            let faults = Faults { loss_percent: 0, duplicate_percent: 0, max_delay_ms, base_delay_ms };
            let (_, net) = transfer(faults, seed, 4);
            let stats = net.endpoints[0].stats();
            assert_eq!(
                stats.retransmissions, 0,
                "delay {base_delay_ms}+{max_delay_ms} seed {seed}: {stats:?}"
            );
            assert_eq!(net.endpoints[1].stats().duplicates, 0);
        }
    }
}

#[test]
fn heavy_reordering_without_loss_causes_no_retransmission_storm() {
    // Every datagram delayed 1 to 8 ms at random: a third of them overtaken. A few spurious
    // retransmissions may happen before the reordering allowance adapts, never a storm.
    for seed in [1, 3, 5, 7, 9] {
        let faults = Faults { loss_percent: 0, duplicate_percent: 0, max_delay_ms: 8, base_delay_ms: 0 };
        let (_, net) = transfer(faults, seed, 4);
        let stats = net.endpoints[0].stats();
        assert!(stats.retransmissions <= 30, "seed {seed}: of 3,080 datagrams: {stats:?}");
    }
}

#[test]
fn the_rto_doubles_once_per_timeout_round_and_collapses_on_a_fresh_sample() {
    let config = Config::default();
    let mut rtt = Rtt::new(&config);
    rtt.sample(Duration::from_millis(40), &config);
    let base = rtt.rto;
    let now = Instant::now();
    for ms in 0..10 {
        // A burst of datagrams expiring a millisecond apart: one round.
        rtt.back_off(now + Duration::from_millis(ms), &config);
    }
    assert_eq!(rtt.rto, base * 2, "one doubling per round");
    rtt.back_off(now + base * 2, &config);
    assert_eq!(rtt.rto, base * 4, "the next round doubles again");
    rtt.sample(Duration::from_millis(40), &config);
    assert!(rtt.rto <= base, "a fresh sample ends the backoff: {:?}", rtt.rto);
    rtt.back_off(now + base * 8, &config);
    rtt.collapse();
    assert_eq!(rtt.rto, rtt.base);
}

#[test]
fn an_outage_backs_the_rto_off_and_the_first_progress_afterwards_collapses_it() {
    let mut net = Network::new(Config::default(), CLEAN, 1);
    net.endpoints[0].send(net.now, 2, &pattern(200_000, 1)).unwrap();
    net.run_until(1_000, |net| !net.received[1].is_empty());
    let base = net.endpoints[0].peers[&2].rtt.base;
    net.faults.loss_percent = 100;
    net.endpoints[0].send(net.now, 2, &pattern(200_000, 2)).unwrap();
    for _ in 0..500 {
        net.step();
    }
    let rto = net.endpoints[0].peers[&2].rtt.rto;
    // 500 ms of outage with a 30 ms base: about 4 rounds (30 + 60 + 120 + 240), not one
    // doubling per expiring datagram (which reaches max_rto at once).
    assert!(rto >= base * 8 && rto < Config::default().max_rto, "{rto:?} from {base:?}");
    net.faults = CLEAN;
    net.run_until(3_000, |net| net.received[1].len() == 2);
    net.run_until(1_000, |net| !net.endpoints[0].has_pending_sends());
    assert_eq!(net.endpoints[0].peers[&2].rtt.rto, net.endpoints[0].peers[&2].rtt.base, "collapsed");
}

#[test]
fn a_hole_is_resent_once_per_loss_delay_not_once_per_acknowledgement() {
    let t0 = Instant::now();
    let ms = Duration::from_millis;
    let mut a: Endpoint<u8> = Endpoint::new(Config::default(), 1);
    let mut b: Endpoint<u8> = Endpoint::new(Config::default(), 2);
    for n in 0..20u8 {
        a.send(t0, 2, &[n; 100]).unwrap();
    }
    let sent: Vec<Vec<u8>> = std::iter::from_fn(|| a.poll_transmit(t0)).map(|(_, d)| d).collect();
    assert_eq!(sent.len(), 20);
    // The first datagram is lost; every other one is acked on its own.
    let mut acks = Vec::new();
    for datagram in &sent[1..] {
        b.handle_datagram(t0 + ms(5), 1, datagram);
        acks.extend(std::iter::from_fn(|| b.poll_transmit(t0 + ms(5))).map(|(_, d)| d));
    }
    assert_eq!(acks.len(), 19);
    for ack in &acks {
        a.handle_datagram(t0 + ms(10), 2, ack);
    }
    assert_eq!(a.poll_transmit(t0 + ms(10)), None, "not before the loss delay");
    // 19 samples of a 10 ms round trip: loss delay 10 ms + 10 / 4 ms, well before the RTO
    // (at least 30 ms).
    let due = a.poll_timeout().expect("a timer");
    assert_eq!(due, t0 + ms(10) + ms(10) / 4);
    a.handle_timeout(due);
    let resent: Vec<_> = std::iter::from_fn(|| a.poll_transmit(due)).collect();
    assert_eq!(resent.len(), 1, "only the hole");
    assert_eq!(a.stats().fast_retransmissions, 1, "a fast retransmission, not a timeout");
    // The copy is lost too; the peer keeps acknowledging other datagrams (duplicates).
    for (i, datagram) in sent[1..].iter().enumerate() {
        let at = due + ms(1 + i as u64);
        b.handle_datagram(at, 1, datagram);
        for (_, ack) in std::iter::from_fn(|| b.poll_transmit(at)).collect::<Vec<_>>() {
            a.handle_datagram(at, 2, &ack);
        }
        assert_eq!(a.poll_transmit(at), None, "no resend per acknowledgement");
    }
    assert_eq!(a.stats().retransmissions, 1);
    assert_eq!(a.poll_timeout(), Some(due + ms(25)), "the next resend waits twice the loss delay");
    assert_eq!(b.poll_message(), None);
}

// ---- Epoch changes (see "Epoch changes" in the module docs) ----

/// A reliable data datagram as a forger writes it: a whole one-fragment message `bytes` in
/// `epoch`, with the given sequence number and base.
fn forged_data(epoch: u32, seq: u64, base: u64, bytes: &[u8]) -> Vec<u8> {
    let mut datagram = vec![MAGIC, KIND_RELIABLE];
    datagram.extend_from_slice(&epoch.to_be_bytes());
    datagram.extend_from_slice(&seq.to_be_bytes());
    datagram.extend_from_slice(&base.to_be_bytes());
    datagram.extend_from_slice(&0u32.to_be_bytes()); // message number
    datagram.extend_from_slice(&0u16.to_be_bytes()); // fragment 0 ...
    datagram.extend_from_slice(&1u16.to_be_bytes()); // ... of 1
    datagram.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    datagram.extend_from_slice(bytes);
    datagram
}

fn kind(datagram: &[u8]) -> u8 {
    datagram[1]
}

#[test]
fn forged_fresh_epochs_from_the_senders_address_cause_no_loss_and_no_duplicates() {
    // Small datagrams: every message is several fragments, so a reset of the receive state
    // would cut messages in half; loss and reordering keep datagrams buffered out of order and
    // acks in flight, which a reset would lose or repeat.
    let config = Config { max_datagram: 200, ..Config::default() };
    let faults = Faults { loss_percent: 5, duplicate_percent: 2, max_delay_ms: 8, base_delay_ms: 0 };
    let mut net = Network::new(config, faults, 99);
    let messages: Vec<Vec<u8>> = (0..300u32)
        .map(|n| {
            let mut message = n.to_be_bytes().to_vec();
            message.extend(pattern(300 + (n as usize % 7) * 50, n as u8));
            message
        })
        .collect();
    for message in &messages {
        net.endpoints[0].send(net.now, 2, message).unwrap();
    }
    // Once the stream runs (endpoint 2 adopted endpoint 1's epoch), every simulated ms the
    // forger sends endpoint 2 a datagram that claims to come from endpoint 1 (address 1) in an
    // epoch of its own, with a whole message at the start of it.
    net.run_until(1_000, |net| !net.received[1].is_empty());
    let mut forger = Rng(5);
    let mut forged = 0;
    for _ in 0..120_000 {
        if net.received[1].len() == messages.len() && !net.endpoints[0].has_pending_sends() {
            break;
        }
        {
            let epoch = forger.next() as u32;
            let (seq, base) = (forger.below(4), forger.below(4));
            net.endpoints[1].handle_datagram(net.now, 1, &forged_data(epoch, seq, base, b"forged"));
            forged += 1;
        }
        net.step();
    }
    // Let whatever is still in transit land: nothing more may arrive.
    for _ in 0..2_000 {
        net.step();
    }
    assert!(forged > 200, "the forger was busy: {forged}");
    let received = &net.received[1];
    let (forgeries, real): (Vec<&Vec<u8>>, Vec<&Vec<u8>>) =
        received.iter().partition(|m| m.as_slice() == b"forged");
    let numbers: Vec<u32> =
        real.iter().map(|m| u32::from_be_bytes(m[..4].try_into().expect("4 bytes"))).collect();
    assert_eq!(numbers, (0..messages.len() as u32).collect::<Vec<_>>(), "all, once, in order");
    assert_eq!(forgeries.len(), 0, "nothing forged delivered");
    assert!(*received == messages, "intact");
    let stats = net.endpoints[1].stats();
    assert!(stats.unproven_epoch >= forged, "every forged datagram was held back: {stats:?}");
    assert!(stats.challenges > 0, "{stats:?}");
    assert_eq!(stats.epoch_changes, 0, "the forger never proved an epoch: {stats:?}");
    let sender = net.endpoints[0].stats();
    assert!(sender.proofs > 0, "the real sender answered the challenges with its own epoch");
    assert_eq!(sender.gave_up, 0, "{sender:?}");
}

#[test]
fn a_new_epoch_is_adopted_only_after_its_sender_proves_it_receives_at_the_address() {
    let config = Config::default();
    let now = Instant::now();
    let mut a: Endpoint<u8> = Endpoint::new(config.clone(), 1);
    let mut b: Endpoint<u8> = Endpoint::new(config.clone(), 2);
    a.send(now, 2, b"before").unwrap();
    let (_, first) = a.poll_transmit(now).unwrap();
    b.handle_datagram(now, 1, &first);
    assert_eq!(b.poll_message(), Some((1, b"before".to_vec())), "the first epoch needs no proof");
    let (_, ack) = b.poll_transmit(now).unwrap();
    a.handle_datagram(now, 2, &ack);

    // a restarts at the same address: a new epoch.
    let mut restarted: Endpoint<u8> = Endpoint::new(config.clone(), 3);
    restarted.send(now, 2, b"after").unwrap();
    let (_, after) = restarted.poll_transmit(now).unwrap();
    b.handle_datagram(now, 1, &after);
    assert_eq!(b.poll_message(), None, "not delivered before the proof");
    let (to, challenge) = b.poll_transmit(now).expect("a challenge");
    assert_eq!((to, kind(&challenge)), (1, KIND_CHALLENGE), "a challenge, not an ack");
    assert_eq!(b.poll_transmit(now), None);
    b.handle_datagram(now, 1, &after);
    assert_eq!(b.poll_transmit(now), None, "one challenge per min_rto");
    assert_eq!(b.stats().unproven_epoch, 2);

    // A proof with a guessed cookie switches nothing.
    let mut guessed = vec![MAGIC, KIND_PROOF];
    guessed.extend_from_slice(&3u32.to_be_bytes());
    guessed.extend_from_slice(&0x1234_5678_9abc_def0u64.to_be_bytes());
    b.handle_datagram(now, 1, &guessed);
    assert_eq!(b.stats().bad_proofs, 1);
    b.handle_datagram(now, 1, &after);
    assert_eq!(b.poll_message(), None, "still unproven");

    // Had the old process (epoch 1) got the challenge, its proof would change nothing.
    a.handle_datagram(now, 2, &challenge);
    let (_, old_proof) = a.poll_transmit(now).expect("a proof of epoch 1");
    b.handle_datagram(now, 1, &old_proof);
    assert_eq!(b.stats().epoch_changes, 0);
    b.handle_datagram(now, 1, &after);
    assert_eq!(b.poll_message(), None, "still unproven");

    // The restarted one does, before anything else it sends.
    restarted.handle_datagram(now, 2, &challenge);
    let (to, proof) = restarted.poll_transmit(now).expect("a proof");
    assert_eq!((to, kind(&proof)), (2, KIND_PROOF));
    b.handle_datagram(now, 1, &proof);
    assert_eq!(b.stats().epoch_changes, 1);
    assert_eq!(b.poll_transmit(now), None, "the proof itself is not answered");

    // The datagram b dropped comes again at the retransmission timeout and is delivered once.
    let later = now + config.initial_rto;
    restarted.handle_timeout(later);
    let (_, again) = restarted.poll_transmit(later).expect("the retransmission");
    b.handle_datagram(later, 1, &again);
    assert_eq!(b.poll_message(), Some((1, b"after".to_vec())));
    b.handle_datagram(later, 1, &again);
    assert_eq!(b.poll_message(), None, "once");
    // Old-epoch datagrams (a stale copy of the first one) now need a proof in turn.
    b.handle_datagram(later, 1, &first);
    assert_eq!(b.poll_message(), None);
}

#[test]
fn without_proof_a_new_epoch_is_adopted_once_the_old_one_was_silent_for_peer_timeout() {
    // A version 1 sender cannot answer a challenge: after a restart it gets through once its
    // old epoch has been quiet for peer_timeout.
    let config = Config { peer_timeout: Duration::from_secs(2), ..Config::default() };
    let start = Instant::now();
    let mut a: Endpoint<u8> = Endpoint::new(config.clone(), 1);
    let mut b: Endpoint<u8> = Endpoint::new(config.clone(), 2);
    a.send(start, 2, b"old").unwrap();
    let (_, old) = a.poll_transmit(start).unwrap();
    b.handle_datagram(start, 1, &old);
    assert_eq!(b.poll_message(), Some((1, b"old".to_vec())));
    let heard = start + Duration::from_millis(500);
    b.handle_datagram(heard, 1, &old); // a retransmission: the old epoch is alive at `heard`
    while b.poll_transmit(heard).is_some() {}

    let mut v1 = Endpoint::new(config.clone(), 7);
    v1.send(start, 2, b"new").unwrap();
    let (_, new) = v1.poll_transmit(start).unwrap();
    let almost = heard + config.peer_timeout - Duration::from_millis(1);
    b.handle_datagram(almost, 1, &new);
    assert_eq!(b.poll_message(), None, "the old epoch was heard less than peer_timeout ago");
    assert_eq!(kind(&b.poll_transmit(almost).expect("a challenge").1), KIND_CHALLENGE);
    let silent = heard + config.peer_timeout;
    b.handle_datagram(silent, 1, &new);
    assert_eq!(b.poll_message(), Some((1, b"new".to_vec())), "adopted after peer_timeout of silence");
    assert_eq!(kind(&b.poll_transmit(silent).expect("an ack").1), KIND_ACK);
    assert_eq!(b.stats().epoch_changes, 1);
}

#[test]
fn a_peer_that_acknowledged_everything_is_not_given_up_while_idle() {
    let mut net = Network::new(Config::default(), CLEAN, 5);
    net.endpoints[0].send(net.now, 2, b"one").unwrap();
    net.run_until(1_000, |net| net.received[1].len() == 1 && !net.endpoints[0].has_pending_sends());
    // Idle for longer than peer_timeout: nothing waits for the peer, so nothing is given up.
    for _ in 0..15_000 {
        net.step();
    }
    assert_eq!(net.endpoints[0].stats().gave_up, 0);
    assert_eq!(net.endpoints[0].poll_event(), None);
    net.endpoints[0].send(net.now, 2, b"two").unwrap();
    net.run_until(1_000, |net| net.received[1].len() == 2);
}
