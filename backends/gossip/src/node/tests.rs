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
