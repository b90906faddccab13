use super::*;
use crate::protocol::{encode, Message};
use comms_plugin_api::PeerEventKind;

fn member(id: &str, address: u32, now: Instant) -> GossipNode<u32> {
    let mut node = GossipNode::new(id, address, Config::default(), address as u64, now);
    node.set_record(NodeRecord::new(id), now).unwrap();
    node
}

/// Delivers everything both nodes send to each other (no loss) until both are quiet.
fn exchange(a: &mut GossipNode<u32>, b: &mut GossipNode<u32>, now: Instant) {
    for _ in 0..16 {
        let mut quiet = true;
        while let Some((to, datagram)) = a.poll_transmit() {
            quiet = false;
            if to == 2 {
                b.handle_datagram(1, &datagram, now).unwrap();
            }
        }
        while let Some((to, datagram)) = b.poll_transmit() {
            quiet = false;
            if to == 1 {
                a.handle_datagram(2, &datagram, now).unwrap();
            }
        }
        if quiet {
            return;
        }
    }
}

#[test]
fn a_probe_is_acked_and_an_unanswered_one_ends_in_suspicion_then_death() {
    let now = Instant::now();
    let (mut a, mut b) = (member("a", 1, now), member("b", 2, now));
    b.join(&[1], now);
    exchange(&mut a, &mut b, now);
    assert_eq!(a.poll_event().map(|e| e.kind), Some(PeerEventKind::Joined));
    // Probes answered: nobody suspected.
    let mut t = now;
    for _ in 0..5 {
        t += Duration::from_secs(1);
        a.handle_timeout(t);
        exchange(&mut a, &mut b, t);
        a.handle_timeout(t + Duration::from_millis(600));
    }
    assert_eq!(a.stats().suspicions, 0);
    assert!(a.stats().probes >= 4);
    // b stops answering: suspected at the end of the probe's period, dead after the timeout.
    while a.poll_transmit().is_some() {}
    let mut t2 = t;
    while a.membership().get("b").is_some_and(|m| m.status.is_live()) {
        t2 = a.next_timeout();
        a.handle_timeout(t2);
        while a.poll_transmit().is_some() {}
        assert!(t2 - t < Duration::from_secs(30), "b never declared dead");
    }
    assert_eq!(a.stats().suspicions, 1);
    assert_eq!(a.stats().deaths_declared, 1);
    assert!(t2 - t >= a.config().protocol_period * a.config().suspicion_multiplier);
    let left = std::iter::from_fn(|| a.poll_event()).last().unwrap();
    assert_eq!((left.kind, left.record.id.as_str()), (PeerEventKind::Left, "b"));
    assert!(a.peers().is_empty());
}

#[test]
fn a_left_node_answers_no_probe_and_its_leave_reaches_the_others() {
    let now = Instant::now();
    let (mut a, mut b) = (member("a", 1, now), member("b", 2, now));
    b.join(&[1], now);
    exchange(&mut a, &mut b, now);
    b.leave();
    exchange(&mut a, &mut b, now);
    assert_eq!(a.membership().get("b").map(|m| m.status), Some(Status::Left));
    let ping = encode(&Message::<u32> { body: Body::Ping { seq: 5, target: "b".into() }, updates: vec![] });
    b.handle_datagram(1, &ping, now).unwrap();
    assert!(b.poll_transmit().is_none(), "a node that left does not ack");
    // It comes back with a new record: joined again, with a higher incarnation.
    let mut record = NodeRecord::new("b");
    record.services = vec!["back".into()];
    b.set_record(record, now).unwrap();
    b.handle_timeout(now + Duration::from_secs(2));
    exchange(&mut a, &mut b, now);
    // b's Alive reaches a piggybacked on a probe or a sync; force one probe round.
    for step in 1..=4 {
        let t = now + Duration::from_secs(2 * step);
        a.handle_timeout(t);
        b.handle_timeout(t);
        exchange(&mut a, &mut b, t);
    }
    assert_eq!(a.membership().get("b").map(|m| m.status), Some(Status::Alive));
    assert_eq!(a.peers()[0].services, ["back"]);
}

#[test]
fn records_naming_another_node_or_too_large_are_refused() {
    let now = Instant::now();
    let mut node = GossipNode::new("a", 1u32, Config::default(), 1, now);
    let error = node.set_record(NodeRecord::new("b"), now).unwrap_err();
    assert!(error.to_string().contains("`b`"), "{error}");
    let mut big = NodeRecord::new("a");
    big.metadata = vec![("blob".into(), "x".repeat(2000))];
    let error = node.set_record(big, now).unwrap_err();
    assert!(error.to_string().contains("max_datagram"), "{error}");
    let error = Config { probe_timeout: Duration::from_secs(2), ..Config::default() }.validate().unwrap_err();
    assert_eq!(error.0, "probe_timeout", "{error:?}");
    let error = Config { max_datagram: 100, ..Config::default() }.validate().unwrap_err();
    assert_eq!(error.0, "max_datagram", "{error:?}");
    assert_eq!(Config::default().validate(), Ok(()));
}

mod authenticated {
    use super::*;
    use crate::{
        auth::{AllowList, Identity},
        protocol::{seal, sign_alive, RecordBytes},
    };

    const UNIX_MS: u64 = 1_700_000_000_000;

    fn identity(n: u8) -> Identity {
        Identity::from_secret_bytes(&[n; 32])
    }

    fn id(n: u8) -> String {
        identity(n).node_id(Some(&format!("n{n}"))).to_string()
    }

    fn security(n: u8, allowed: &[u8]) -> LinkSecurity {
        let keys = allowed.iter().map(|m| identity(*m).public_key()).collect();
        LinkSecurity::new(identity(n), AllowList::Keys(keys), None)
    }

    /// Node `n` at address `n`, allowing `allowed`, with a record.
    fn member(n: u8, allowed: &[u8], now: Instant) -> GossipNode<u32> {
        let mut node = GossipNode::new(&id(n), n as u32, Config::default(), n as u64, now);
        node.authenticate(security(n, allowed), now, UNIX_MS).unwrap();
        node.set_record(NodeRecord::new(id(n).as_str()), now).unwrap();
        node
    }

    /// Delivers what `nodes` send to each other until they are quiet; returns the refusals.
    fn run(nodes: &mut [&mut GossipNode<u32>], now: Instant) -> Vec<(u32, DecodeError)> {
        let mut refused = Vec::new();
        for _ in 0..16 {
            let mut flights = Vec::new();
            for node in nodes.iter_mut() {
                let from = node.membership().local_address();
                flights.extend(std::iter::from_fn(|| node.poll_transmit()).map(|(to, d)| (from, to, d)));
            }
            if flights.is_empty() {
                break;
            }
            for (from, to, datagram) in flights {
                assert!(datagram.len() <= Config::default().max_datagram, "sealed within max_datagram");
                if let Some(node) = nodes.iter_mut().find(|node| node.membership().local_address() == to) {
                    if let Err(error) = node.handle_datagram(from, &datagram, now) {
                        refused.push((to, error));
                    }
                }
            }
        }
        refused
    }

    /// A datagram from node `n` (signed by `signer`'s key) carrying `updates`.
    fn sealed(signer: u8, n: u8, body: &Body<u32>, updates: &[Update<u32>], unix_ms: u64) -> Vec<u8> {
        let encoded: Vec<Vec<u8>> = updates.iter().map(encode_update).collect();
        let slices: Vec<&[u8]> = encoded.iter().map(Vec::as_slice).collect();
        seal(&security(signer, &[]), &id(n), finish_datagram(start_datagram(body), &slices), unix_ms)
    }

    fn alive_of(n: u8, signer: u8) -> Update<u32> {
        let wire = RecordBytes::from_record(&NodeRecord::new(id(n).as_str()));
        let record = sign_alive(&security(signer, &[]), &id(n), 0, n as u32, &wire);
        Update::Alive { id: id(n), incarnation: 0, address: n as u32, record }
    }

    #[test]
    fn allowed_members_join_and_an_outsider_is_neither_learned_nor_answered() {
        let now = Instant::now();
        let (mut a, mut b) = (member(1, &[2], now), member(2, &[1], now));
        // The outsider allows everyone: only the others' allow lists keep it out.
        let mut outsider = member(9, &[1, 2], now);
        b.join(&[1], now);
        outsider.join(&[1], now);
        let refused = run(&mut [&mut a, &mut b, &mut outsider], now);
        assert_eq!(a.peers().iter().map(|r| r.id.to_string()).collect::<Vec<_>>(), [id(2)]);
        assert_eq!(b.peers().iter().map(|r| r.id.to_string()).collect::<Vec<_>>(), [id(1)]);
        assert!(outsider.peers().is_empty(), "no table was sent to the outsider");
        assert_eq!(refused, [(1, DecodeError::Auth(AuthError::NotAllowed))], "its join, at the seed");
        assert_eq!(a.stats().unauthenticated, 1);
        assert_eq!(a.stats().state_replies, 1, "only b's join was answered");
    }

    #[test]
    fn a_member_cannot_forge_another_members_record_or_join_in_its_name() {
        let now = Instant::now();
        let mut a = member(1, &[2, 3], now);
        // Member 2 relays member 3's record, forged (signed by 2): refused, counted.
        let forged = sealed(2, 2, &Body::Push, &[alive_of(3, 2)], UNIX_MS);
        a.handle_datagram(2, &forged, now).unwrap();
        assert!(a.membership().get(&id(3)).is_none());
        assert_eq!(a.membership().stats().unauthenticated, 1);
        // A join in 3's name, sent (and signed) by 2: refused whole.
        let join = sealed(2, 2, &Body::Join, &[alive_of(3, 3)], UNIX_MS);
        assert_eq!(a.handle_datagram(2, &join, now), Err(DecodeError::Auth(AuthError::WrongSender)));
        // 2 claiming to be 3 (its id, its own signature): the signature is not 3's.
        let claimed = sealed(2, 3, &Body::Join, &[alive_of(3, 3)], UNIX_MS);
        assert_eq!(a.handle_datagram(2, &claimed, now), Err(DecodeError::Auth(AuthError::BadSignature)));
        assert!(a.membership().get(&id(3)).is_none());
        // Member 3's own record, relayed by 2: accepted (records travel by gossip).
        let relayed = sealed(2, 2, &Body::Push, &[alive_of(3, 3)], UNIX_MS);
        a.handle_datagram(2, &relayed, now).unwrap();
        assert!(a.membership().get(&id(3)).is_some_and(|m| m.status.is_live()));
        assert_eq!(a.poll_event().map(|e| e.record.id.to_string()), Some(id(3)));
        // A forged Alive about `a` itself is ignored, not refuted.
        let before = a.membership().local_incarnation();
        let mut about_a = alive_of(1, 2);
        if let Update::Alive { incarnation, .. } = &mut about_a {
            *incarnation = 40;
        }
        a.handle_datagram(2, &sealed(2, 2, &Body::Push, &[about_a], UNIX_MS), now).unwrap();
        assert_eq!(a.membership().local_incarnation(), before);
    }

    #[test]
    fn replayed_and_plaintext_datagrams_are_refused_and_only_a_member_ends_a_join() {
        let now = Instant::now();
        let mut b = member(2, &[1], now);
        b.join(&[1], now);
        assert!(b.poll_transmit().is_some_and(|(to, _)| to == 1), "the join");
        // A table reply from a key b does not allow (or from nobody: plaintext) is refused and
        // the join goes on.
        let stranger = sealed(9, 9, &Body::State { respond: false }, &[alive_of(9, 9)], UNIX_MS);
        assert_eq!(b.handle_datagram(9, &stranger, now), Err(DecodeError::Auth(AuthError::NotAllowed)));
        let plaintext = finish_datagram(start_datagram::<u32>(&Body::State { respond: false }), &[]);
        assert_eq!(b.handle_datagram(1, &plaintext, now), Err(DecodeError::Plaintext));
        assert!(!b.has_table);
        let retry = now + b.config().protocol_period * 3;
        b.handle_timeout(retry);
        assert!(std::iter::from_fn(|| b.poll_transmit()).any(|(to, _)| to == 1), "the join is retried");
        // The seed's answer, replayed 6 minutes later: too old.
        let reply = sealed(1, 1, &Body::State { respond: false }, &[alive_of(1, 1)], UNIX_MS);
        let later = retry + Duration::from_secs(360);
        b.set_wall_clock(later, UNIX_MS + 360_000);
        assert_eq!(b.handle_datagram(1, &reply, later), Err(DecodeError::Auth(AuthError::Stale)));
        assert!(!b.has_table && b.peers().is_empty());
        // Fresh, it ends the join.
        let fresh = sealed(1, 1, &Body::State { respond: false }, &[alive_of(1, 1)], UNIX_MS + 360_000);
        b.handle_datagram(1, &fresh, later).unwrap();
        assert!(b.has_table);
        assert_eq!(b.peers()[0].id.to_string(), id(1));
        assert_eq!(b.stats().unauthenticated, 3);
        assert_eq!(b.stats().malformed, 3);
    }

    #[test]
    fn the_node_id_must_be_bound_to_the_identity() {
        let now = Instant::now();
        let mut node = GossipNode::new("a", 1u32, Config::default(), 1, now);
        let error = node.authenticate(security(1, &[]), now, UNIX_MS).unwrap_err();
        assert!(error.contains("`a`") && error.contains("not bound"), "{error}");
        let mut other = GossipNode::new(&id(2), 1u32, Config::default(), 1, now);
        assert!(other.authenticate(security(1, &[]), now, UNIX_MS).is_err());
    }

    /// 30 authenticated members (records relayed by gossip and tables, each checked against its
    /// owner's signature) converge, spread a record update and a leave, as plaintext ones do.
    #[test]
    fn a_group_of_authenticated_members_converges_and_spreads_updates_and_leaves() {
        const N: u8 = 30;
        let start = Instant::now();
        let everyone: Vec<u8> = (1..=N).collect();
        let config = Config {
            protocol_period: Duration::from_millis(200),
            probe_timeout: Duration::from_millis(100),
            ..Config::default()
        };
        let mut nodes: Vec<GossipNode<u32>> = (1..=N)
            .map(|n| {
                let mut node = GossipNode::new(&id(n), n as u32, config.clone(), n as u64, start);
                node.authenticate(security(n, &everyone), start, UNIX_MS).unwrap();
                node.set_record(NodeRecord::new(id(n).as_str()), start).unwrap();
                node.join(&[1], start);
                node
            })
            .collect();
        let mut now = start;
        let mut largest = 0;
        // Steps of 10 ms, datagrams delivered at the next step, until `done` or 60 s.
        let mut run = |nodes: &mut Vec<GossipNode<u32>>,
                       now: &mut Instant,
                       done: &dyn Fn(&[GossipNode<u32>]) -> bool| {
            let limit = *now + Duration::from_secs(60);
            while !done(nodes) {
                assert!(*now < limit, "not within 60 s");
                *now += Duration::from_millis(10);
                let mut flights = Vec::new();
                for (i, node) in nodes.iter_mut().enumerate() {
                    node.handle_timeout(*now);
                    flights.extend(
                        std::iter::from_fn(|| node.poll_transmit()).map(|(to, d)| (i as u32 + 1, to, d)),
                    );
                }
                for (from, to, datagram) in flights {
                    largest = largest.max(datagram.len());
                    nodes[to as usize - 1].handle_datagram(from, &datagram, *now).unwrap();
                }
            }
        };
        run(&mut nodes, &mut now, &|nodes| {
            nodes.iter().all(|node| node.membership().live_count() == N as usize - 1)
        });
        let converged = now - start;
        let mut record = NodeRecord::new(id(7).as_str());
        record.services = vec!["billing".into()];
        nodes[6].set_record(record, now).unwrap();
        let updated_at = now;
        let serves = |node: &GossipNode<u32>| node.peers().iter().any(|r| r.services == ["billing"]);
        run(&mut nodes, &mut now, &|nodes| nodes.iter().enumerate().all(|(i, node)| i == 6 || serves(node)));
        let update = now - updated_at;
        nodes[9].leave();
        let left_at = now;
        let gone =
            |node: &GossipNode<u32>| node.membership().get(&id(10)).is_some_and(|m| !m.status.is_live());
        run(&mut nodes, &mut now, &|nodes| nodes.iter().enumerate().all(|(i, node)| i == 9 || gone(node)));
        eprintln!(
            "[auth] {N} authenticated members converged in {converged:?}, a record update reached all in {:?}, \
             a leave in {:?} (200 ms periods); largest datagram {largest} bytes",
            update,
            now - left_at
        );
        assert!(largest <= config.max_datagram);
        for node in &nodes {
            assert_eq!((node.stats().unauthenticated, node.membership().stats().unauthenticated), (0, 0));
        }
    }
}
