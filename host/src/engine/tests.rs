//! The engine driven with simulated time: no sockets, no sleeps.

use super::*;
use crate::control::{RecordMessage, HEARTBEAT, HELLO, RESPONSE};
use comms_plugin_api::Payload;
use std::sync::Arc;

const AT_MOST_ONCE: usize = 0;
const AT_LEAST_ONCE: usize = 1;

fn spec() -> EngineSpec {
    EngineSpec {
        id: NodeId::new("me"),
        heartbeat_interval: Some(Duration::from_secs(1)),
        peer_timeout: Duration::from_secs(3),
        inbox_capacity: 2,
        subscription_capacity: 2,
        relay: false,
        dedup_window: 0,
        requeue_after: Duration::from_millis(500),
        balancing: Balancing::LeastOutstanding,
    }
}

fn engine_with(spec: EngineSpec, start: Instant) -> Engine {
    let transports = vec![
        TransportFacts { name: "tcp".into(), acknowledges: false, durable: false },
        TransportFacts { name: "broker".into(), acknowledges: true, durable: true },
    ];
    let mut record = NodeRecord::new("me");
    record.addresses = vec![("tcp".into(), "me:1".into()), ("broker".into(), "inbox:me".into())];
    Engine::new(spec, transports, record, Arc::new(IdSource::new(7)), start)
}

fn engine(start: Instant) -> Engine {
    engine_with(spec(), start)
}

fn peer_record(id: &str, services: &[&str], topics: &[&str]) -> NodeRecord {
    let mut record = NodeRecord::new(id);
    record.addresses = vec![("tcp".into(), format!("{id}:1")), ("broker".into(), format!("inbox:{id}"))];
    record.services = services.iter().map(|s| s.to_string()).collect();
    record.topics = topics.iter().map(|s| s.to_string()).collect();
    record
}

fn joined(record: NodeRecord) -> Input {
    Input::Discovery(PeerEvent { kind: PeerEventKind::Joined, record })
}

fn from(peer: &str, to: Destination, n: u128) -> Envelope {
    Envelope::new(MessageId::from_u128(n), peer, to, b"x".to_vec())
}

fn control(peer: &str, kind: &str, payload: Vec<u8>) -> Envelope {
    Envelope::new(MessageId::from_u128(1000), peer, Destination::node("me"), payload)
        .with_header(KIND_HEADER, kind)
}

fn received(transport: usize, envelope: Envelope, tag: u64) -> Input {
    Input::Received { transport, envelope, tag }
}

fn delivered(actions: &[Action]) -> Vec<(Local, DeliveryId)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Deliver { to, delivery, .. } => Some((to.clone(), *delivery)),
            _ => None,
        })
        .collect()
}

fn settled(actions: &[Action]) -> Vec<(u64, SettlementOutcome)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Settle { tag, outcome, .. } => Some((*tag, *outcome)),
            _ => None,
        })
        .collect()
}

fn control_sent(actions: &[Action]) -> Vec<(String, String, RecordMessage)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::SendControl { route, envelope } => Some((
                route.peer.to_string(),
                envelope.header(KIND_HEADER).unwrap_or_default().to_string(),
                RecordMessage::decode(envelope.payload.as_slice()).unwrap_or_default(),
            )),
            _ => None,
        })
        .collect()
}

#[test]
fn a_message_is_settled_when_the_application_is_done_with_it_not_when_it_is_queued() {
    let now = Instant::now();
    let mut engine = engine(now);
    let actions = engine.handle(received(AT_LEAST_ONCE, from("a", Destination::node("me"), 1), 41), now);
    let deliveries = delivered(&actions);
    assert_eq!(deliveries.len(), 1);
    assert!(settled(&actions).is_empty(), "queued is not handled: nothing settled yet");
    let delivery = deliveries[0].1;
    engine.handle(Input::Taken { from: Local::Inbox, count: 1 }, now);
    let actions = engine.handle(Input::Settled { delivery, outcome: SettlementOutcome::ACCEPTED }, now);
    assert_eq!(settled(&actions), vec![(41, SettlementOutcome::ACCEPTED)]);
    // A nack (or a drop without ack) hands it back.
    let actions = engine.handle(received(AT_LEAST_ONCE, from("a", Destination::node("me"), 2), 42), now);
    let delivery = delivered(&actions)[0].1;
    let actions =
        engine.handle(Input::Settled { delivery, outcome: SettlementOutcome::REJECTED_REQUEUE }, now);
    assert_eq!(settled(&actions), vec![(42, SettlementOutcome::REJECTED_REQUEUE)]);
    // A transport without acknowledgements has nothing to settle.
    let actions = engine.handle(received(AT_MOST_ONCE, from("a", Destination::node("me"), 3), 0), now);
    assert_eq!(delivered(&actions), vec![(Local::Inbox, 0)]);
    assert!(engine
        .handle(Input::Settled { delivery: 0, outcome: SettlementOutcome::ACCEPTED }, now)
        .is_empty());
}

#[test]
fn handle_into_appends_each_input_s_actions_in_order_after_what_the_buffer_held() {
    let now = Instant::now();
    let mut engine = engine(now);
    let mut actions = vec![Action::Pause { transport: 7 }];
    for (n, tag) in [(1, 41), (2, 42)] {
        engine.handle_into(
            received(AT_LEAST_ONCE, from("a", Destination::node("me"), n), tag),
            now,
            &mut actions,
        );
    }
    assert!(matches!(actions[0], Action::Pause { transport: 7 }), "what the buffer held stays first");
    let ids: Vec<u128> = actions[1..]
        .iter()
        .map(|action| match action {
            Action::Deliver { envelope, .. } => envelope.id.as_u128(),
            _ => panic!("only deliveries expected"),
        })
        .collect();
    assert_eq!(ids, vec![1, 2]);
}

#[test]
fn a_publication_to_several_subscriptions_is_settled_once_all_are_done() {
    let now = Instant::now();
    let mut engine = engine(now);
    engine.handle(Input::Subscribed { id: 1, pattern: "orders.*".into() }, now);
    engine.handle(Input::Subscribed { id: 2, pattern: "orders.>".into() }, now);
    let actions =
        engine.handle(received(AT_LEAST_ONCE, from("a", Destination::topic("orders.eu"), 1), 7), now);
    let deliveries = delivered(&actions);
    assert_eq!(deliveries.len(), 2);
    let delivery = deliveries[0].1;
    let first = engine.handle(Input::Settled { delivery, outcome: SettlementOutcome::ACCEPTED }, now);
    assert!(settled(&first).is_empty(), "one subscription is still working on it");
    let second =
        engine.handle(Input::Settled { delivery, outcome: SettlementOutcome::REJECTED_REQUEUE }, now);
    assert_eq!(settled(&second), vec![(7, SettlementOutcome::REJECTED_REQUEUE)], "any requeue wins");
    let nobody =
        engine.handle(received(AT_LEAST_ONCE, from("a", Destination::topic("prices.eu"), 2), 8), now);
    assert_eq!(settled(&nobody), vec![(8, SettlementOutcome::ACCEPTED)], "no subscriber: done");
}

#[test]
fn a_subscriber_that_stops_reading_slows_only_itself() {
    let now = Instant::now();
    let mut engine = engine(now);
    engine.handle(joined(peer_record("a", &[], &[])), now);
    engine.handle(Input::Subscribed { id: 1, pattern: "ticks".into() }, now);
    engine.handle(Input::RequestStarted { id: MessageId::from_u128(99), replica: NodeId::new("a") }, now);
    // At most once: the subscription's queue takes 2, the rest is dropped and counted.
    let mut dropped = 0;
    for n in 0..10 {
        let actions =
            engine.handle(received(AT_MOST_ONCE, from("a", Destination::topic("ticks"), n), 0), now);
        dropped += actions
            .iter()
            .filter(|a| matches!(a, Action::Dropped { reason: DropReason::SubscriptionFull { .. }, .. }))
            .count();
        assert!(
            !actions.iter().any(|a| matches!(a, Action::Pause { .. })),
            "the transport is never paused for it"
        );
    }
    assert_eq!(dropped, 8);
    assert_eq!(engine.dropped_by(1), 8);
    // Meanwhile the control lane and the inbox flow.
    let heartbeat = control("a", HEARTBEAT, RecordMessage::of(&peer_record("a", &["echo"], &[])).encode());
    engine.handle(received(AT_MOST_ONCE, heartbeat, 0), now);
    assert!(engine.serves("echo"), "a heartbeat behind the stuck subscription got through");
    let response = from("a", Destination::node("me"), 5)
        .with_header(KIND_HEADER, RESPONSE)
        .with_correlation_id(Some(MessageId::from_u128(99)));
    let actions = engine.handle(received(AT_MOST_ONCE, response, 0), now);
    assert!(matches!(actions.as_slice(), [Action::CompleteRequest { .. }]), "{actions:?}");
    let actions = engine.handle(received(AT_MOST_ONCE, from("a", Destination::node("me"), 6), 0), now);
    assert_eq!(delivered(&actions), vec![(Local::Inbox, 0)]);

    // At least once: the overflow waits `requeue_after`, then goes back to the broker.
    for n in 0..3 {
        engine.handle(
            received(AT_LEAST_ONCE, from("a", Destination::topic("ticks"), 100 + n), 200 + n as u64),
            now,
        );
    }
    assert!(engine.next_deadline().is_some_and(|d| d <= now + Duration::from_millis(500)));
    assert!(settled(&engine.handle(Input::Tick, now + Duration::from_millis(499))).is_empty());
    let actions = engine.handle(Input::Tick, now + Duration::from_millis(500));
    assert_eq!(
        settled(&actions),
        vec![
            (200, SettlementOutcome::REJECTED_REQUEUE),
            (201, SettlementOutcome::REJECTED_REQUEUE),
            (202, SettlementOutcome::REJECTED_REQUEUE)
        ]
    );
    assert_eq!(engine.counters().requeued, 3);
}

#[test]
fn a_parked_message_takes_the_first_free_place_in_order() {
    let now = Instant::now();
    let mut engine = engine(now);
    for n in 0..3 {
        engine.handle(received(AT_LEAST_ONCE, from("a", Destination::node("me"), n), n as u64), now);
    }
    let actions =
        engine.handle(Input::Taken { from: Local::Inbox, count: 1 }, now + Duration::from_millis(10));
    assert_eq!(delivered(&actions).len(), 1, "the third message moved in");
    assert!(engine.next_deadline().is_none_or(|d| d > now + Duration::from_millis(500)), "nothing is parked");
}

#[test]
fn a_batch_taken_at_once_moves_in_as_many_parked_messages_in_order_and_no_more() {
    let now = Instant::now();
    let mut engine = engine(now);
    let mut actions = Vec::new();
    for n in 0..5 {
        actions.extend(
            engine.handle(received(AT_LEAST_ONCE, from("a", Destination::node("me"), n), n as u64), now),
        );
    }
    assert_eq!(delivered(&actions).len(), 2, "the inbox holds 2; 3 are parked");
    let actions = engine.handle(Input::Taken { from: Local::Inbox, count: 2 }, now);
    let moved: Vec<MessageId> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Deliver { envelope, .. } => Some(envelope.id),
            _ => None,
        })
        .collect();
    assert_eq!(
        moved,
        vec![MessageId::from_u128(2), MessageId::from_u128(3)],
        "two places, the first two parked"
    );
    let actions = engine.handle(Input::Taken { from: Local::Inbox, count: 1 }, now);
    assert_eq!(delivered(&actions).len(), 1, "the last one moves in with the next place");
    // The application took all 2 queued (say a count came twice): the inbox is empty, not
    // more than empty.
    engine.handle(Input::Taken { from: Local::Inbox, count: 5 }, now);
    let mut actions = Vec::new();
    for n in 5..8 {
        actions.extend(
            engine.handle(received(AT_LEAST_ONCE, from("a", Destination::node("me"), n), n as u64), now),
        );
    }
    assert_eq!(delivered(&actions).len(), 2, "still 2 places, no more");
}

#[test]
fn a_full_inbox_on_an_at_most_once_transport_pauses_that_transport_until_the_application_reads() {
    let now = Instant::now();
    let mut engine = engine(now);
    let mut actions = Vec::new();
    for n in 0..4 {
        actions.extend(engine.handle(received(AT_MOST_ONCE, from("a", Destination::node("me"), n), 0), now));
    }
    assert_eq!(delivered(&actions).len(), 2);
    assert_eq!(actions.iter().filter(|a| matches!(a, Action::Pause { transport: AT_MOST_ONCE })).count(), 1);
    assert!(!actions.iter().any(|a| matches!(a, Action::Dropped { .. })), "nothing lost");
    let actions = engine.handle(Input::Taken { from: Local::Inbox, count: 1 }, now);
    assert_eq!(delivered(&actions).len(), 1);
    assert!(!actions.iter().any(|a| matches!(a, Action::Resume { .. })), "one still waits");
    let actions = engine.handle(Input::Taken { from: Local::Inbox, count: 1 }, now);
    assert_eq!(delivered(&actions).len(), 1);
    assert!(actions.contains(&Action::Resume { transport: AT_MOST_ONCE }));
}

#[test]
fn a_service_at_its_limit_refuses_at_once_and_takes_requests_again_when_a_handler_finishes() {
    let now = Instant::now();
    let mut engine = engine(now);
    engine.handle(Input::Served { name: "slow".into(), limit: 1 }, now);
    let first = engine.handle(received(AT_LEAST_ONCE, from("a", Destination::service("slow"), 1), 1), now);
    assert_eq!(delivered(&first), vec![(Local::Service("slow".into()), 1)]);
    let second = engine.handle(received(AT_LEAST_ONCE, from("a", Destination::service("slow"), 2), 2), now);
    assert!(
        matches!(second.last(), Some(Action::Refuse { reason, .. }) if reason.contains("limit")),
        "{second:?}"
    );
    assert_eq!(settled(&second), vec![(2, SettlementOutcome::ACCEPTED)], "answered: settled");
    engine.handle(Input::Settled { delivery: 1, outcome: SettlementOutcome::ACCEPTED }, now);
    engine.handle(Input::Taken { from: Local::Service("slow".into()), count: 1 }, now);
    let third = engine.handle(received(AT_LEAST_ONCE, from("a", Destination::service("slow"), 3), 3), now);
    assert_eq!(delivered(&third).len(), 1);
    let unknown = engine.handle(received(AT_MOST_ONCE, from("a", Destination::service("nope"), 4), 0), now);
    assert!(
        matches!(unknown.last(), Some(Action::Refuse { reason, .. }) if reason.contains("does not serve"))
    );
}

#[test]
fn a_peer_found_by_discovery_is_greeted_and_asked_for_its_record_at_once() {
    let now = Instant::now();
    let mut engine = engine(now);
    let actions = engine.handle(joined(peer_record("a", &[], &[])), now);
    let sent = control_sent(&actions);
    assert_eq!(sent.len(), 1);
    assert_eq!((sent[0].0.as_str(), sent[0].1.as_str()), ("a", HELLO));
    assert!(sent[0].2.reply, "asks for the peer's record");
    assert!(!engine.serves("echo"), "static discovery knew the address only");
    // The peer answers with its record: its services are known before any heartbeat.
    let answer = control("a", HEARTBEAT, RecordMessage::of(&peer_record("a", &["echo"], &["t.>"])).encode());
    let actions = engine.handle(received(AT_MOST_ONCE, answer, 0), now);
    assert!(control_sent(&actions).is_empty(), "an answer is not answered");
    assert!(engine.serves("echo"));
    assert_eq!(engine.subscribers("t.x", None).len(), 1);
    // A hello from a stranger is answered with this node's record.
    let hello = RecordMessage { reply: true, ..RecordMessage::of(&peer_record("b", &[], &[])) };
    let actions = engine.handle(received(AT_MOST_ONCE, control("b", HELLO, hello.encode()), 0), now);
    let sent = control_sent(&actions);
    assert_eq!((sent[0].0.as_str(), sent[0].1.as_str()), ("b", HEARTBEAT));
    assert_eq!(sent[0].2.addresses, engine.record().addresses);
}

#[test]
fn heartbeats_go_out_every_interval_and_silent_peers_expire() {
    let start = Instant::now();
    let mut engine = engine(start);
    engine.handle(joined(peer_record("a", &[], &[])), start);
    assert!(control_sent(&engine.handle(Input::Tick, start + Duration::from_millis(999))).is_empty());
    let actions = engine.handle(Input::Tick, start + Duration::from_secs(1));
    assert_eq!(control_sent(&actions)[0].1, HEARTBEAT);
    assert_eq!(engine.next_deadline(), Some(start + Duration::from_secs(2)));
    let actions = engine.handle(Input::Tick, start + Duration::from_millis(3001));
    assert!(actions
        .iter()
        .any(|a| matches!(a, Action::PeerEvent(PeerEvent { kind: PeerEventKind::Left, .. }))));
    assert_eq!(engine.status(&NodeId::new("a")), Some(PeerStatus::Down));
}

#[test]
fn a_durable_peer_that_left_cleanly_stays_addressable_as_offline() {
    let now = Instant::now();
    let mut engine = engine(now);
    engine.handle(joined(peer_record("d", &[], &[])), now);
    let goodbye = RecordMessage { offline: true, ..RecordMessage::of(&peer_record("d", &[], &[])) };
    engine.handle(received(AT_MOST_ONCE, control("d", crate::control::GOODBYE, goodbye.encode()), 0), now);
    assert_eq!(engine.status(&NodeId::new("d")), Some(PeerStatus::Offline));
    let (route, _) = engine.prepare_send(&NodeId::new("d")).expect("still routable");
    assert_eq!(route.address, "d:1");
    // A plain goodbye (release 0.1: empty payload) marks it down.
    engine.handle(joined(peer_record("p", &[], &[])), now);
    engine.handle(received(AT_MOST_ONCE, control("p", crate::control::GOODBYE, Vec::new()), 0), now);
    assert_eq!(engine.status(&NodeId::new("p")), Some(PeerStatus::Down));
}

#[test]
fn repeats_are_filtered_only_when_asked() {
    let now = Instant::now();
    let mut engine = engine_with(EngineSpec { dedup_window: 100, inbox_capacity: 100, ..spec() }, now);
    let message = from("a", Destination::node("me"), 5);
    assert_eq!(delivered(&engine.handle(received(AT_LEAST_ONCE, message.clone(), 1), now)).len(), 1);
    let again = engine.handle(received(AT_LEAST_ONCE, message.clone(), 2), now);
    assert!(delivered(&again).is_empty());
    assert_eq!(settled(&again), vec![(2, SettlementOutcome::ACCEPTED)], "the repeat is acknowledged");
    assert_eq!(engine.counters().duplicates, 1);
    let mut plain = engine_with(EngineSpec { inbox_capacity: 100, ..spec() }, now);
    plain.handle(received(AT_LEAST_ONCE, message.clone(), 1), now);
    assert_eq!(delivered(&plain.handle(received(AT_LEAST_ONCE, message, 2), now)).len(), 1, "off by default");
}

#[test]
fn a_late_response_is_dropped_and_never_completes_a_later_attempt() {
    let now = Instant::now();
    let mut engine = engine(now);
    let attempt = MessageId::from_u128(50);
    engine.handle(Input::RequestStarted { id: attempt, replica: NodeId::new("a") }, now);
    engine.handle(Input::RequestEnded { id: attempt }, now);
    let late = from("a", Destination::node("me"), 51)
        .with_header(KIND_HEADER, RESPONSE)
        .with_correlation_id(Some(attempt));
    let actions = engine.handle(received(AT_LEAST_ONCE, late, 9), now);
    assert!(matches!(actions[0], Action::Dropped { reason: DropReason::LateResponse, .. }), "{actions:?}");
    assert_eq!(settled(&actions), vec![(9, SettlementOutcome::ACCEPTED)]);
}

#[test]
fn a_relay_forwards_and_others_drop_what_is_not_theirs() {
    let now = Instant::now();
    let mut relay = engine_with(EngineSpec { relay: true, ..spec() }, now);
    relay.handle(joined(peer_record("far", &[], &[])), now);
    let actions = relay.handle(received(AT_LEAST_ONCE, from("a", Destination::node("far"), 1), 3), now);
    let Some(Action::Forward { route, delivery, .. }) = actions.last() else { panic!("{actions:?}") };
    assert_eq!(route.peer.as_str(), "far");
    let actions =
        relay.handle(Input::Settled { delivery: *delivery, outcome: SettlementOutcome::ACCEPTED }, now);
    assert_eq!(settled(&actions), vec![(3, SettlementOutcome::ACCEPTED)]);
    let mut plain = engine(now);
    let actions = plain.handle(received(AT_MOST_ONCE, from("a", Destination::node("far"), 1), 0), now);
    assert!(matches!(actions.last(), Some(Action::Dropped { reason: DropReason::NotForThisNode(_), .. })));
}

#[test]
fn replicas_are_chosen_among_live_ones_with_this_node_included() {
    let now = Instant::now();
    let mut engine = engine(now);
    engine.handle(joined(peer_record("a", &["echo"], &[])), now);
    engine.handle(Input::Served { name: "echo".into(), limit: 8 }, now);
    let mut seen = HashSet::new();
    for n in 0..4 {
        let route = engine.choose_replica("echo", &HashSet::new()).unwrap();
        engine
            .handle(Input::RequestStarted { id: MessageId::from_u128(n), replica: route.peer.clone() }, now);
        seen.insert(route.peer.to_string());
    }
    assert_eq!(seen, ["a".to_string(), "me".to_string()].into_iter().collect());
    engine.handle(Input::Closing, now);
    assert_eq!(
        engine.choose_replica("echo", &HashSet::new()).unwrap().peer.as_str(),
        "a",
        "a closing node is not a replica"
    );
    assert!(engine.choose_replica("nothing", &HashSet::new()).is_none());
}

#[test]
fn serving_or_subscribing_raises_the_revision_and_tells_discovery_and_peers() {
    let now = Instant::now();
    let mut engine = engine(now);
    engine.handle(joined(peer_record("a", &[], &[])), now);
    let actions = engine.handle(Input::Served { name: "echo".into(), limit: 8 }, now);
    let Some(Action::Announce(record)) = actions.first() else { panic!("{actions:?}") };
    assert_eq!(record.services, vec!["echo".to_string()]);
    assert_eq!(control::revision(record), Some(1));
    assert_eq!(control_sent(&actions)[0].2.services, vec!["echo".to_string()]);
    let actions = engine.handle(Input::Subscribed { id: 4, pattern: "x.*".into() }, now);
    let Some(Action::Announce(record)) = actions.first() else { panic!("{actions:?}") };
    assert_eq!(record.topics, vec!["x.*".to_string()]);
    assert_eq!(control::revision(record), Some(2));
    let _ = Payload::default();
}

#[test]
fn an_inbox_nobody_reads_parks_a_bounded_number_and_hands_them_back_in_time() {
    let now = Instant::now();
    let mut engine = engine(now);
    let mut paused = false;
    let mut parked = 0;
    for n in 0..(PARK_LIMIT as u128 + 2) {
        let actions =
            engine.handle(received(AT_LEAST_ONCE, from("a", Destination::node("me"), n), n as u64), now);
        parked += usize::from(delivered(&actions).is_empty());
        paused |= actions.contains(&Action::Pause { transport: AT_LEAST_ONCE });
    }
    // The inbox holds 2; the broker keeps the rest once PARK_LIMIT wait here.
    assert_eq!(parked, PARK_LIMIT);
    assert!(paused, "the node stops taking from a broker whose messages wait for room");
    // A heartbeat on the same transport is still handled at once (the control lane).
    let heartbeat = control("a", HEARTBEAT, RecordMessage::of(&peer_record("a", &["echo"], &[])).encode());
    engine.handle(received(AT_LEAST_ONCE, heartbeat, 9999), now);
    assert!(engine.serves("echo"));
    let deadline = engine.next_deadline().expect("parked messages have a deadline");
    assert!(deadline <= now + spec().requeue_after);
    let actions = engine.handle(Input::Tick, now + spec().requeue_after);
    let requeued = settled(&actions)
        .iter()
        .filter(|(_, outcome)| *outcome == SettlementOutcome::REJECTED_REQUEUE)
        .count();
    assert_eq!(requeued, PARK_LIMIT, "every parked message goes back to the broker, none is lost");
    assert!(actions.contains(&Action::Resume { transport: AT_LEAST_ONCE }));
}

#[test]
fn a_requeued_message_is_not_taken_for_a_repeat_when_it_comes_back() {
    let now = Instant::now();
    let mut engine = engine_with(EngineSpec { dedup_window: 100, inbox_capacity: 100, ..spec() }, now);
    let message = from("a", Destination::node("me"), 5);
    let actions = engine.handle(received(AT_LEAST_ONCE, message.clone(), 1), now);
    let delivery = delivered(&actions)[0].1;
    engine.handle(Input::Settled { delivery, outcome: SettlementOutcome::REJECTED_REQUEUE }, now);
    let again = engine.handle(received(AT_LEAST_ONCE, message, 2), now);
    assert_eq!(delivered(&again).len(), 1, "the broker's redelivery reaches the application");
    assert_eq!(engine.counters().duplicates, 0);
}

/// A record sent as a control message (answering a hello, a heartbeat) goes out in a task of
/// its own, so it may reach the peer after an application message sent meanwhile: the first
/// application message still brings its own hello, in order, or the peer could not answer it
/// (seen as `comms shutdown` timing out: "could not send a response: unknown peer").
#[test]
fn a_record_sent_as_a_control_message_does_not_replace_the_hello_before_the_first_message() {
    let now = Instant::now();
    let mut engine = engine(now);
    let peer = peer_record("p", &[], &[]);
    // The peer says hello first: this node answers with its record, as a control message.
    let hello = control("p", HELLO, RecordMessage { reply: true, ..RecordMessage::of(&peer) }.encode());
    let actions = engine.handle(received(AT_MOST_ONCE, hello, 0), now);
    assert_eq!(control_sent(&actions).len(), 1, "the hello is answered");
    let (_, greeting) = engine.prepare_send(&NodeId::new("p")).unwrap();
    assert_eq!(greeting.expect("still a greeting in order").header(KIND_HEADER), Some(HELLO));
    assert!(engine.prepare_send(&NodeId::new("p")).unwrap().1.is_none(), "once");
}

#[test]
fn an_offline_peer_is_reached_through_its_durable_inbox_and_a_first_message_says_hello() {
    let now = Instant::now();
    let mut engine = engine(now);
    let mut offline = peer_record("d", &[], &[]);
    offline.mark_offline();
    engine.handle(joined(offline), now);
    assert_eq!(engine.status(&NodeId::new("d")), Some(PeerStatus::Offline));
    let (route, greeting) = engine.prepare_send(&NodeId::new("d")).unwrap();
    assert_eq!((route.transport, route.address.as_str()), (AT_LEAST_ONCE, "inbox:d"), "not the tcp address");
    // Discovery's report of a node that is away asks it nothing; the first message to it goes
    // with this node's record, which it reads (and answers) when it is back.
    let greeting = greeting.expect("the first message to a peer is preceded by this node's record");
    assert_eq!(greeting.header(KIND_HEADER), Some(HELLO));
    assert!(RecordMessage::decode(greeting.payload.as_slice()).unwrap().reply, "and asks for the peer's");
    assert!(engine.prepare_send(&NodeId::new("d")).unwrap().1.is_none(), "once");
}

fn heartbeat(record: &NodeRecord) -> Input {
    let id = record.id.as_str();
    received(AT_MOST_ONCE, control(id, HEARTBEAT, RecordMessage::of(record).encode()), 0)
}

fn refusals(actions: &[Action]) -> usize {
    actions.iter().filter(|a| matches!(a, Action::RecordRefused { .. })).count()
}

/// Issue 18: 100,000 forged heartbeat ids took a node from 20 to 112 MB, for good. Peers known
/// only from their heartbeats are now bounded, and removed once down for a while; peers from
/// discovery stay.
#[test]
fn forged_heartbeat_ids_cannot_grow_the_peer_table_past_its_bound_and_are_forgotten() {
    use membership::{FORGET_AFTER_TIMEOUTS, HEARD_PEER_LIMIT};
    let start = Instant::now();
    let mut engine = engine(start);
    engine.handle(joined(peer_record("static", &[], &[])), start);
    engine.prepare_send(&NodeId::new("static")).expect("a route to the static peer");
    let forged = 3 * HEARD_PEER_LIMIT;
    let mut refused = 0;
    for n in 0..forged {
        refused += refusals(&engine.handle(heartbeat(&peer_record(&format!("forged-{n}"), &[], &[])), start));
    }
    assert_eq!(engine.membership.size(), (1 + HEARD_PEER_LIMIT, HEARD_PEER_LIMIT), "bounded");
    assert_eq!(refused, forged - HEARD_PEER_LIMIT, "every one past the bound refused, for the log");
    assert_eq!(engine.counters().records_refused, refused as u64);
    assert_eq!(engine.greeted.len(), 1, "answering heartbeats greets nobody: only application sends do");
    engine.prepare_send(&NodeId::new("forged-0")).expect("a route to a heard peer");
    assert_eq!(engine.greeted.len(), 2);

    // Silent: down after the timeout, removed FORGET_AFTER_TIMEOUTS timeouts later.
    let timeout = spec().peer_timeout;
    let down = start + timeout + Duration::from_millis(1);
    engine.handle(Input::Tick, down);
    assert_eq!(engine.membership.size(), (1 + HEARD_PEER_LIMIT, HEARD_PEER_LIMIT), "down, still listed");
    let deadline = engine.next_deadline().expect("the removal is scheduled");
    assert!(deadline <= down + timeout * FORGET_AFTER_TIMEOUTS, "the timer wakes for it");
    engine.handle(Input::Tick, down + timeout * FORGET_AFTER_TIMEOUTS);
    assert_eq!(engine.membership.size(), (1, 0), "heard peers removed; the discovery peer stays");
    assert_eq!(engine.status(&NodeId::new("static")), Some(PeerStatus::Down));
    assert_eq!(engine.greeted.len(), 1, "forgotten peers are forgotten as greeted too");

    // A forgotten peer that speaks again is learnt again, and answered.
    let actions = engine.handle(heartbeat(&peer_record("forged-1", &[], &[])), down + timeout * 11);
    assert_eq!(control_sent(&actions).len(), 1, "a new peer gets this node's record");
    assert_eq!(engine.status(&NodeId::new("forged-1")), Some(PeerStatus::Up));
}

#[test]
fn when_heard_peers_are_at_their_bound_a_new_one_takes_the_place_of_the_one_down_longest() {
    use membership::HEARD_PEER_LIMIT;
    let start = Instant::now();
    let mut engine = engine(start);
    engine.handle(heartbeat(&peer_record("oldest", &[], &[])), start);
    let later = start + Duration::from_secs(1);
    for n in 1..HEARD_PEER_LIMIT {
        engine.handle(heartbeat(&peer_record(&format!("p{n}"), &[], &[])), later);
    }
    // "oldest" goes down first; the others stay up (heard again).
    let check = start + spec().peer_timeout + Duration::from_millis(500);
    for n in 1..HEARD_PEER_LIMIT {
        engine.handle(heartbeat(&peer_record(&format!("p{n}"), &[], &[])), check);
    }
    engine.handle(Input::Tick, check);
    assert_eq!(engine.status(&NodeId::new("oldest")), Some(PeerStatus::Down));
    let actions = engine.handle(heartbeat(&peer_record("newcomer", &[], &[])), check);
    assert_eq!(refusals(&actions), 0);
    assert_eq!(engine.status(&NodeId::new("newcomer")), Some(PeerStatus::Up));
    assert_eq!(engine.status(&NodeId::new("oldest")), None, "the down one made room");
    // All up: the next stranger is refused.
    let actions = engine.handle(heartbeat(&peer_record("one-too-many", &[], &[])), check);
    assert_eq!(refusals(&actions), 1);
    assert_eq!(engine.status(&NodeId::new("one-too-many")), None);
    // Discovery is not bounded by the heard peers.
    engine.handle(joined(peer_record("announced", &[], &[])), check);
    assert_eq!(engine.status(&NodeId::new("announced")), Some(PeerStatus::Up));
}

/// Issue 18: 300 ids with 1 MiB of metadata each took a node to 607 MB.
#[test]
fn an_oversized_record_is_refused_from_a_heartbeat_and_from_discovery() {
    use comms_plugin_api::node_limits::MAX_RECORD_BYTES;
    let now = Instant::now();
    let mut engine = engine(now);
    let mut fat = peer_record("fat", &[], &[]);
    fat.metadata.push(("blob".into(), "x".repeat(1 << 20)));
    let actions = engine.handle(heartbeat(&fat), now);
    assert_eq!(refusals(&actions), 1, "{actions:?}");
    assert!(control_sent(&actions).is_empty(), "not answered");
    // Just over the limit once decoded (the payload alone would pass the unread check).
    let mut over = peer_record("over", &[], &[]);
    over.metadata.push(("blob".into(), "x".repeat(MAX_RECORD_BYTES)));
    assert_eq!(refusals(&engine.handle(heartbeat(&over), now)), 1);
    assert_eq!(refusals(&engine.handle(joined(fat.clone()), now)), 1);
    assert_eq!(engine.membership.size(), (0, 0));
    assert_eq!(engine.counters().records_refused, 3);
    // A known peer whose record grows too large keeps its last good record.
    engine.handle(joined(peer_record("fat", &["svc"], &[])), now);
    engine.handle(heartbeat(&fat), now);
    assert!(engine.serves("svc"), "the last good record stays");
}

/// Issue 18: ids `""` and with a newline or NUL were accepted (forged log lines).
#[test]
fn invalid_ids_on_the_wire_are_refused_and_never_become_peers() {
    let now = Instant::now();
    let mut engine = engine(now);
    for bad in ["", "eve\nINFO comms: forged", "nul\0byte"] {
        let actions = engine.handle(heartbeat(&peer_record(bad, &[], &[])), now);
        assert!(
            matches!(actions.as_slice(), [Action::Dropped { reason: DropReason::InvalidSender(_), .. }]),
            "{bad:?}: {actions:?}"
        );
        let message = from(bad, Destination::node("me"), 1);
        let actions = engine.handle(received(AT_LEAST_ONCE, message, 7), now);
        assert!(delivered(&actions).is_empty(), "{bad:?}: nothing from it is delivered");
        assert_eq!(settled(&actions), vec![(7, SettlementOutcome::REJECTED_DISCARD)], "dead-lettered");
        assert_eq!(refusals(&engine.handle(joined(peer_record(bad, &[], &[])), now)), 1, "{bad:?}");
    }
    assert_eq!(engine.membership.size(), (0, 0));
    assert!(engine.greeted.is_empty());
}
