//! The reassembly state machine with simulated time.

use super::*;
use crate::part::{part, Layout};
use comms_plugin_api::Destination;

const SECOND: Duration = Duration::from_secs(1);

fn config(max_reassembly_bytes: u64, acknowledging: bool) -> Config {
    Config { max_message_size: 1 << 30, max_reassembly_bytes, timeout: 30 * SECOND, acknowledging }
}

/// Bytes that differ at every offset of any part, so a misplaced part cannot go unnoticed.
fn payload(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8 ^ seed as u8).collect()
}

fn message(from: &str, id: u128, payload: Vec<u8>) -> Envelope {
    Envelope::new(MessageId::from_u128(id), from, Destination::node("b"), payload).with_header("app", "kept")
}

/// The parts a sender makes of `envelope` with `part_size`, part ids from `first_id`.
fn parts(envelope: &Envelope, part_size: u64, first_id: u128) -> Vec<Envelope> {
    let layout = Layout::cut(envelope.payload.len() as u64, part_size);
    (0..layout.count)
        .map(|i| part(envelope, &layout, i, MessageId::from_u128(first_id + i as u128)).unwrap())
        .collect()
}

fn complete(handled: Handled) -> Complete {
    match handled {
        Handled::Complete(complete) => *complete,
        other => panic!("expected a completed message, got {other:?}"),
    }
}

fn settlement(delivery_tag: u64, outcome: SettlementOutcome) -> Settlement {
    Settlement { delivery_tag, outcome }
}

#[test]
fn parts_in_any_order_give_back_the_message_byte_for_byte() {
    let start = Instant::now();
    let mut machine = Reassembler::new(config(1 << 20, false));
    let original = message("a", 42, payload(10_000, 1));
    let mut parts = parts(&original, 1024, 1000);
    assert_eq!(parts.len(), 10);
    // Reverse order, with one swap in the middle: the last part arrives first.
    parts.reverse();
    parts.swap(3, 6);
    let last = parts.pop().unwrap();
    for part in parts {
        assert_eq!(machine.handle_part(start, part, 0), Handled::Held);
    }
    let held = machine.stats().bytes_held;
    assert!((10_000..12_000).contains(&held), "the length plus bookkeeping: {held}");
    let whole = complete(machine.handle_part(start, last, 0));
    assert_eq!(whole.envelope, original, "same id, addressing, headers (without the part header) and bytes");
    assert!(whole.inner_tags.is_empty(), "no tags without acknowledgements");
    assert_eq!(machine.stats().bytes_held, 0);
    assert_eq!(machine.stats().bytes_held_peak, held);
    assert_eq!((machine.stats().messages_reassembled, machine.stats().partial_messages), (1, 0));
    assert!(machine.take_settlements().is_empty());
    assert_eq!(machine.poll_timeout(), None);
}

#[test]
fn a_duplicate_part_is_settled_once_and_does_not_complete_twice() {
    let start = Instant::now();
    let mut machine = Reassembler::new(config(1 << 20, true));
    let parts = parts(&message("a", 1, payload(3000, 2)), 1024, 10);
    assert_eq!(parts.len(), 3);
    assert_eq!(machine.handle_part(start, parts[0].clone(), 100), Handled::Held);
    assert_eq!(machine.handle_part(start, parts[0].clone(), 101), Handled::Duplicate);
    assert_eq!(machine.handle_part(start, parts[1].clone(), 102), Handled::Held);
    let whole = complete(machine.handle_part(start, parts[2].clone(), 103));
    assert_eq!(whole.inner_tags, [100, 102, 103], "the held copies' tags go with the message");
    assert_eq!(machine.take_settlements(), [settlement(101, SettlementOutcome::ACCEPTED)]);
    assert_eq!(machine.stats().duplicate_parts, 1);
    // A part of the completed message arriving again starts over; it is not a second message.
    assert_eq!(machine.handle_part(start, parts[2].clone(), 104), Handled::Held);
    assert_eq!(machine.stats().messages_reassembled, 1);
}

#[test]
fn a_part_that_contradicts_the_others_is_discarded_and_the_message_still_completes() {
    let start = Instant::now();
    let mut machine = Reassembler::new(config(1 << 20, true));
    let original = message("a", 5, payload(4096, 3));
    // Same message id, another total length: a forgery or a bug, not this message.
    let forged = parts(&message("a", 5, payload(8192, 4)), 1024, 50);
    let parts = parts(&original, 1024, 10);
    assert_eq!(machine.handle_part(start, parts[0].clone(), 1), Handled::Held);
    let Handled::Malformed(reason) = machine.handle_part(start, forged[1].clone(), 2) else { panic!() };
    assert!(reason.contains("says 8 parts and 8192 bytes, earlier parts said 4 and 4096"), "{reason}");
    // A part whose length does not match its place.
    let mut short = parts[1].clone();
    short.payload = short.payload.slice(0..1000).unwrap();
    let Handled::Malformed(reason) = machine.handle_part(start, short, 3) else { panic!() };
    assert!(reason.contains("part 1 has 1000 bytes where its layout has 1024"), "{reason}");
    let mut garbled = parts[1].clone();
    garbled.headers.set(HEADER, "not a header");
    assert!(matches!(machine.handle_part(start, garbled, 4), Handled::Malformed(_)));
    for (tag, part) in (5..).zip(&parts[1..3]) {
        assert_eq!(machine.handle_part(start, part.clone(), tag), Handled::Held);
    }
    let whole = complete(machine.handle_part(start, parts[3].clone(), 7));
    assert_eq!(whole.envelope.payload.as_slice(), original.payload.as_slice());
    assert_eq!(whole.inner_tags, [1, 5, 6, 7]);
    let discarded = SettlementOutcome::REJECTED_DISCARD;
    assert_eq!(machine.take_settlements(), [2, 3, 4].map(|tag| settlement(tag, discarded)));
    assert_eq!(machine.stats().malformed_parts, 3);
}

#[test]
fn a_message_over_max_message_size_is_refused_before_anything_is_allocated() {
    let start = Instant::now();
    let mut machine = Reassembler::new(Config { max_message_size: 4095, ..config(1 << 30, false) });
    let parts = parts(&message("a", 1, payload(4096, 0)), 1024, 10);
    let Handled::Malformed(reason) = machine.handle_part(start, parts[0].clone(), 0) else { panic!() };
    assert!(reason.contains("4096 bytes exceeds max_message_size 4095"), "{reason}");
    assert_eq!(machine.stats().bytes_held_peak, 0);
}

#[test]
fn the_budget_is_never_exceeded_and_refused_parts_are_requeued_with_acknowledgements() {
    let start = Instant::now();
    let first = message("a", 1, payload(100_000, 1));
    let second = message("b", 2, payload(100_000, 2));
    let one = reservation(&Layout::cut(100_000, 1024), &first, true);
    // Room for one message of 100 kB, not two.
    let budget = one + one / 2;
    let mut machine = Reassembler::new(config(budget, true));
    let (first_parts, second_parts) = (parts(&first, 1024, 1000), parts(&second, 1024, 2000));
    assert_eq!(machine.handle_part(start, first_parts[0].clone(), 1), Handled::Held);
    let Handled::Refused(reason) = machine.handle_part(start, second_parts[0].clone(), 2) else { panic!() };
    assert!(reason.contains(&format!("of max_reassembly_bytes {budget} are held")), "{reason}");
    assert_eq!(machine.take_settlements(), [settlement(2, SettlementOutcome::REJECTED_REQUEUE)]);
    assert!(machine.stats().bytes_held <= budget);
    let mut last = None;
    for (tag, part) in (10..).zip(&first_parts[1..]) {
        last = Some(machine.handle_part(start, part.clone(), tag));
    }
    assert!(matches!(last, Some(Handled::Complete(_))));
    // Room again: the broker's redelivery of the refused part starts the second message.
    assert_eq!(machine.handle_part(start, second_parts[0].clone(), 3), Handled::Held);
    assert_eq!(machine.stats().bytes_held_peak, one, "never more than one message held");
    assert_eq!(machine.stats().refused_parts, 1);
}

#[test]
fn without_acknowledgements_the_rest_of_a_refused_message_is_dropped_without_allocating() {
    let start = Instant::now();
    let first = message("a", 1, payload(50_000, 1));
    let second = message("a", 2, payload(50_000, 2));
    let budget = reservation(&Layout::cut(50_000, 1024), &first, false);
    let mut machine = Reassembler::new(config(budget, false));
    let (first_parts, second_parts) = (parts(&first, 1024, 1000), parts(&second, 1024, 2000));
    assert_eq!(machine.handle_part(start, first_parts[0].clone(), 0), Handled::Held);
    assert!(matches!(machine.handle_part(start, second_parts[0].clone(), 0), Handled::Refused(_)));
    for part in &first_parts[1..] {
        machine.handle_part(start, part.clone(), 0);
    }
    assert_eq!(machine.stats().bytes_held, 0, "the first one completed: room again");
    // The second message lost its first part for good: holding the rest would only wait for
    // the timeout.
    for part in &second_parts[1..] {
        let Handled::Refused(reason) = machine.handle_part(start, part.clone(), 0) else { panic!() };
        assert!(reason.contains("an earlier part was refused"), "{reason}");
    }
    assert_eq!(machine.stats().bytes_held_peak, budget);
    assert_eq!(machine.stats().refused_parts, second_parts.len() as u64);
    // Forgotten after the timeout: a new message under that id may come.
    machine.handle_timeout(start + 31 * SECOND);
    assert_eq!(machine.handle_part(start + 31 * SECOND, second_parts[1].clone(), 0), Handled::Held);
}

#[test]
fn an_incomplete_message_expires_after_the_timeout_without_a_new_part() {
    let start = Instant::now();
    let mut machine = Reassembler::new(config(1 << 20, true));
    let parts = parts(&message("a", 1, payload(5000, 1)), 1024, 10);
    machine.handle_part(start, parts[0].clone(), 1);
    machine.handle_part(start + 20 * SECOND, parts[1].clone(), 2);
    assert_eq!(machine.poll_timeout(), Some(start + 50 * SECOND), "counted from the last part");
    assert_eq!(machine.handle_timeout(start + 49 * SECOND), 0);
    assert_eq!(machine.stats().partial_messages, 1);
    assert_eq!(machine.handle_timeout(start + 50 * SECOND), 1);
    assert_eq!(machine.stats().bytes_held, 0);
    assert_eq!(machine.stats().expired_messages, 1);
    let discarded = SettlementOutcome::REJECTED_DISCARD;
    assert_eq!(machine.take_settlements(), [settlement(1, discarded), settlement(2, discarded)]);
    assert_eq!(machine.poll_timeout(), None);
    // Its late parts start a new reassembly, which expires in turn.
    assert_eq!(machine.handle_part(start + 51 * SECOND, parts[2].clone(), 3), Handled::Held);
}

#[test]
fn senders_reusing_a_message_id_are_kept_apart_and_closing_requeues_what_is_held() {
    let start = Instant::now();
    let mut machine = Reassembler::new(config(1 << 20, true));
    let from_a = message("a", 9, payload(2048, 1));
    let from_b = message("b", 9, payload(2048, 2));
    let (a_parts, b_parts) = (parts(&from_a, 1024, 10), parts(&from_b, 1024, 10));
    machine.handle_part(start, a_parts[0].clone(), 1);
    machine.handle_part(start, b_parts[1].clone(), 2);
    let whole = complete(machine.handle_part(start, a_parts[1].clone(), 3));
    assert_eq!(whole.envelope, from_a);
    assert_eq!(machine.stats().partial_messages, 1, "b's message is still waiting");
    machine.abandon_all();
    assert_eq!(machine.take_settlements(), [settlement(2, SettlementOutcome::REJECTED_REQUEUE)]);
    assert_eq!((machine.stats().bytes_held, machine.stats().partial_messages), (0, 0));
}
