//! Deterministic tests of the secure layer: two layers (addresses 0 and 1) exchanging datagrams
//! through a simulated network that can drop, duplicate, tamper with and replay them.

use super::*;
use comms_plugin_api::security::{AllowList, Identity, LinkSecurity, NetworkKey};

fn noise(allow: AllowList, network_key: Option<NetworkKey>) -> (PublicKey, Arc<NoiseIdentity>) {
    let identity = Identity::generate();
    let key = identity.public_key();
    (key, NoiseIdentity::new(&LinkSecurity::new(identity, allow, network_key)).unwrap())
}

fn layer(noise: &Arc<NoiseIdentity>) -> SecureLayer<u8> {
    SecureLayer::new(Arc::clone(noise), SecureConfig::default())
}

fn pair() -> (SecureLayer<u8>, SecureLayer<u8>, PublicKey, PublicKey) {
    let (key_a, a) = noise(AllowList::AnyKey, None);
    let (key_b, b) = noise(AllowList::AnyKey, None);
    (layer(&a), layer(&b), key_a, key_b)
}

/// What crossed the network, per kind byte.
#[derive(Debug, Default)]
struct Wire {
    /// Every datagram written, in order: (from, to, bytes).
    log: Vec<(u8, u8, Vec<u8>)>,
}

/// Moves datagrams between `layers[0]` (address 0) and `layers[1]` (address 1) until none are
/// left. `network` may drop (false) or alter a datagram. Returns the plaintexts each received.
fn run(
    layers: [&mut SecureLayer<u8>; 2],
    now: Instant,
    wire: &mut Wire,
    mut network: impl FnMut(u8, &mut Vec<u8>) -> bool,
) -> [Vec<Vec<u8>>; 2] {
    let mut received = [Vec::new(), Vec::new()];
    let [a, b] = layers;
    for _ in 0..10_000 {
        let mut moved = false;
        for from in 0..2u8 {
            let (sender, receiver) = if from == 0 { (&mut *a, &mut *b) } else { (&mut *b, &mut *a) };
            while let Some((to, mut datagram)) = sender.poll_transmit() {
                assert_eq!(to, 1 - from, "datagrams go to the other side");
                moved = true;
                wire.log.push((from, to, datagram.clone()));
                if network(from, &mut datagram) {
                    if let Some(plaintext) = receiver.handle_datagram(now, from, &datagram) {
                        received[to as usize].push(plaintext);
                    }
                }
            }
        }
        if !moved {
            return received;
        }
    }
    panic!("the layers never went quiet");
}

fn kind(datagram: &[u8]) -> u8 {
    datagram[1]
}

fn reliable_datagram(n: u8) -> Vec<u8> {
    // Any bytes: the layer does not look into what it seals.
    vec![0xCD, n, n, n]
}

#[test]
fn a_handshake_authenticates_both_keys_and_data_flows_both_ways() {
    let (mut a, mut b, key_a, key_b) = pair();
    let now = Instant::now();
    a.send(now, 1, &reliable_datagram(1));
    a.send(now, 1, &reliable_datagram(2));
    let mut wire = Wire::default();
    let got = run([&mut a, &mut b], now, &mut wire, |_, _| true);
    assert_eq!(got[1], [reliable_datagram(1), reliable_datagram(2)], "held datagrams go out in order");
    let kinds: Vec<u8> = wire.log.iter().map(|(_, _, d)| kind(d)).collect();
    assert_eq!(kinds, [KIND_MESSAGE_1, KIND_MESSAGE_2, KIND_MESSAGE_3, KIND_DATA, KIND_DATA, KIND_DATA]);
    assert_eq!(a.peer_key(&1), Some(key_b));
    assert_eq!(b.peer_key(&0), Some(key_a));
    b.send(now, 0, &reliable_datagram(3));
    let got = run([&mut a, &mut b], now, &mut wire, |_, _| true);
    assert_eq!(got[0], [reliable_datagram(3)]);
    // No plaintext on the wire after the handshake.
    for (_, _, datagram) in wire.log.iter().filter(|(_, _, d)| kind(d) == KIND_DATA) {
        assert!(!datagram.windows(4).any(|w| w == reliable_datagram(1) || w == reliable_datagram(3)));
    }
    assert_eq!((a.stats().handshakes, b.stats().handshakes), (1, 1));
    assert!(a.poll_timeout().is_none(), "confirmed: nothing left to repeat");
    assert!(matches!(a.poll_event(), Some(SecureEvent::Established { peer: 1, initiator: true, .. })));
    assert!(matches!(b.poll_event(), Some(SecureEvent::Established { peer: 0, initiator: false, .. })));
}

#[test]
fn replayed_and_tampered_datagrams_are_dropped_and_counted() {
    let (mut a, mut b, _, _) = pair();
    let now = Instant::now();
    let mut wire = Wire::default();
    a.send(now, 1, &reliable_datagram(1));
    run([&mut a, &mut b], now, &mut wire, |_, _| true);
    let data: Vec<Vec<u8>> = wire
        .log
        .iter()
        .filter(|(from, _, d)| *from == 0 && kind(d) == KIND_DATA)
        .map(|(_, _, d)| d.clone())
        .collect();
    assert_eq!(data.len(), 1);
    // Replayed: not opened again.
    assert_eq!(b.handle_datagram(now, 0, &data[0]), None);
    assert_eq!(b.stats().replayed, 1);
    // Tampered, anywhere in the ciphertext or tag, or with another nonce: dropped.
    a.send(now, 1, &reliable_datagram(2));
    let (_, fresh) = a.poll_transmit().unwrap();
    for position in [DATA_HEADER, fresh.len() - 1, 13] {
        let mut tampered = fresh.clone();
        tampered[position] ^= 0x40;
        assert_eq!(b.handle_datagram(now, 0, &tampered), None, "flipped byte {position}");
    }
    assert_eq!(b.stats().tampered, 3);
    // The untouched datagram still opens: failed attempts did not burn its nonce.
    assert_eq!(b.handle_datagram(now, 0, &fresh), Some(reliable_datagram(2)));
    // Reordered within the window: fine; then replays of both are refused.
    a.send(now, 1, &reliable_datagram(3));
    a.send(now, 1, &reliable_datagram(4));
    let (_, third) = a.poll_transmit().unwrap();
    let (_, fourth) = a.poll_transmit().unwrap();
    assert_eq!(b.handle_datagram(now, 0, &fourth), Some(reliable_datagram(4)));
    assert_eq!(b.handle_datagram(now, 0, &third), Some(reliable_datagram(3)));
    assert_eq!(b.handle_datagram(now, 0, &third), None);
    assert_eq!(b.handle_datagram(now, 0, &fourth), None);
    assert_eq!(b.stats().replayed, 3);
    // From another address the same datagram finds no session.
    assert_eq!(b.handle_datagram(now, 7, &fourth), None);
    assert_eq!(b.stats().unknown_session, 1);
}

#[test]
fn lost_handshake_messages_are_repeated_with_fresh_state() {
    for lost_kind in [KIND_MESSAGE_1, KIND_MESSAGE_2] {
        let (mut a, mut b, _, _) = pair();
        let mut now = Instant::now();
        let mut wire = Wire::default();
        a.send(now, 1, &reliable_datagram(1));
        let mut dropped = false;
        let got = run([&mut a, &mut b], now, &mut wire, |_, datagram| {
            let drop = kind(datagram) == lost_kind && !dropped;
            dropped |= drop;
            !drop
        });
        assert!(got[1].is_empty() && a.has_held(), "kind {lost_kind} lost: still waiting");
        let at = a.poll_timeout().expect("a retry is scheduled");
        assert_eq!(at, now + SecureConfig::default().initial_timeout);
        now = at;
        a.handle_timeout(now);
        let first_index = wire.log[0].2[2..6].to_vec();
        let got = run([&mut a, &mut b], now, &mut wire, |_, _| true);
        assert_eq!(got[1], [reliable_datagram(1)], "kind {lost_kind} lost: delivered after a retry");
        let retry = wire.log.iter().filter(|(_, _, d)| kind(d) == KIND_MESSAGE_1).nth(1).unwrap();
        assert_ne!(retry.2[2..6], first_index[..], "a fresh index");
        assert_ne!(retry.2, wire.log[0].2, "a fresh ephemeral key");
    }
}

#[test]
fn a_duplicate_message_1_gets_the_same_answer_without_a_new_handshake() {
    let (mut a, mut b, _, _) = pair();
    let now = Instant::now();
    a.send(now, 1, &reliable_datagram(1));
    let (_, message_1) = a.poll_transmit().unwrap();
    assert_eq!(b.handle_datagram(now, 0, &message_1), None);
    assert_eq!(b.handle_datagram(now, 0, &message_1), None);
    let (_, first) = b.poll_transmit().unwrap();
    let (_, second) = b.poll_transmit().unwrap();
    assert_eq!(first, second);
    assert_eq!(b.responses.len(), 1);
    // The initiator takes the first answer; the second is stale.
    assert_eq!(a.handle_datagram(now, 1, &first), None);
    assert_eq!(a.handle_datagram(now, 1, &second), None);
    assert_eq!(a.stats().stale_handshake, 1);
    let mut wire = Wire::default();
    let got = run([&mut a, &mut b], now, &mut wire, |_, _| true);
    assert_eq!(got[1], [reliable_datagram(1)]);
}

#[test]
fn a_lost_message_3_is_repeated_until_the_responder_confirms() {
    let (mut a, mut b, _, _) = pair();
    let mut now = Instant::now();
    let mut wire = Wire::default();
    a.send(now, 1, &reliable_datagram(1));
    // Message 3 and the data sealed right after it are lost.
    let got = run([&mut a, &mut b], now, &mut wire, |from, datagram| {
        !(from == 0 && matches!(kind(datagram), KIND_MESSAGE_3 | KIND_DATA))
    });
    assert!(got[1].is_empty());
    assert_eq!(b.peer_key(&0), None, "the responder has no session yet");
    // Data that reaches the responder before message 3 is dropped, without an "unknown session"
    // reply (the handshake is pending).
    a.send(now, 1, &reliable_datagram(2));
    let (_, early) = a.poll_transmit().unwrap();
    assert_eq!(b.handle_datagram(now, 0, &early), None);
    assert!(b.poll_transmit().is_none());
    now = a.poll_timeout().unwrap();
    a.handle_timeout(now);
    let got = run([&mut a, &mut b], now, &mut wire, |_, _| true);
    assert!(got[1].is_empty(), "message 3 repeated, the session is up, the lost data stays lost");
    assert!(b.peer_key(&0).is_some());
    assert!(a.poll_timeout().is_none(), "confirmed by the responder");
    a.send(now, 1, &reliable_datagram(3));
    let got = run([&mut a, &mut b], now, &mut wire, |_, _| true);
    assert_eq!(got[1], [reliable_datagram(3)]);
    // A late copy of message 3 is answered with another confirmation, nothing else.
    let message_3 = wire.log.iter().find(|(_, _, d)| kind(d) == KIND_MESSAGE_3).unwrap().2.clone();
    assert_eq!(b.handle_datagram(now, 0, &message_3), None);
    let (_, confirmation) = b.poll_transmit().unwrap();
    assert_eq!(kind(&confirmation), KIND_DATA);
    assert_eq!(a.handle_datagram(now, 1, &confirmation), None);
    assert_eq!(b.stats().handshakes, 1);
}

#[test]
fn a_handshake_without_answers_gives_up_and_drops_what_it_held() {
    let (mut a, _, _, _) = pair();
    let mut now = Instant::now();
    a.send(now, 1, &reliable_datagram(1));
    let mut attempts = 0;
    while let Some(at) = a.poll_timeout() {
        while a.poll_transmit().is_some() {
            attempts += 1;
        }
        now = at;
        a.handle_timeout(now);
    }
    assert_eq!(attempts, SecureConfig::default().handshake_tries);
    assert!(!a.has_held());
    let events: Vec<_> = std::iter::from_fn(|| a.poll_event()).collect();
    assert_eq!(events, [SecureEvent::HandshakeTimeout { peer: 1, tries: 8, dropped: 1 }]);
    assert_eq!(a.stats().dropped_datagrams, 1);
    assert!(a.peers.is_empty(), "nothing left of the peer");
}

#[test]
fn keys_off_the_allow_list_are_refused_and_reported_with_their_key() {
    let (key_stranger, stranger) = noise(AllowList::AnyKey, None);
    let (_, picky) = noise(AllowList::Keys(Default::default()), None);
    let now = Instant::now();
    // The stranger dials the picky node: refused on message 3.
    let (mut s, mut p) = (layer(&stranger), layer(&picky));
    s.send(now, 1, &reliable_datagram(1));
    let got = run([&mut s, &mut p], now, &mut Wire::default(), |_, _| true);
    assert!(got[1].is_empty() && p.peer_key(&0).is_none());
    assert_eq!(p.stats().refused, 1);
    let event = p.poll_event().unwrap();
    let SecureEvent::Refused { peer: 0, key: Some(key), reason } = event else { panic!("{event:?}") };
    assert_eq!(key, key_stranger);
    assert!(reason.contains("not allowed") && reason.contains(&key_stranger.to_hex()), "{reason}");
    // The stranger's data got "unknown session", so it dropped its session.
    assert_eq!(s.peer_key(&1), None);
    // The picky node dials the stranger: refused on message 2, nothing sent, held data dropped.
    let (mut p, mut s) = (layer(&picky), layer(&stranger));
    p.send(now, 1, &reliable_datagram(2));
    let mut wire = Wire::default();
    let got = run([&mut p, &mut s], now, &mut wire, |_, _| true);
    assert!(got[1].is_empty());
    assert_eq!(wire.log.len(), 2, "message 1 and 2, no message 3");
    assert!(!p.has_held() && p.stats().refused == 1);
    assert!(matches!(p.poll_event(), Some(SecureEvent::Refused { key: Some(k), .. }) if k == key_stranger));
    // Refusals of the same peer are reported once per interval.
    p.send(now, 1, &reliable_datagram(3));
    run([&mut p, &mut s], now, &mut wire, |_, _| true);
    assert_eq!(p.stats().refused, 2);
    assert_eq!(p.poll_event(), None);
}

#[test]
fn different_network_keys_never_get_a_session() {
    let (_, a) = noise(AllowList::AnyKey, Some(NetworkKey::generate()));
    let (_, b) = noise(AllowList::AnyKey, Some(NetworkKey::generate()));
    let (mut a, mut b) = (layer(&a), layer(&b));
    let now = Instant::now();
    a.send(now, 1, &reliable_datagram(1));
    let got = run([&mut a, &mut b], now, &mut Wire::default(), |_, _| true);
    assert!(got[1].is_empty());
    assert!(a.peer_key(&1).is_none() && b.peer_key(&0).is_none());
    assert!(b.stats().refused >= 1, "{:?}", b.stats());
}

#[test]
fn plaintext_and_garbage_are_dropped_and_the_plaintext_peer_reported_once() {
    let (mut a, _, _, _) = pair();
    let now = Instant::now();
    for datagram in [&[0xCD, 1, 0, 0, 0, 0][..], b"GET / HTTP/1.1"] {
        assert_eq!(a.handle_datagram(now, 3, datagram), None);
    }
    for garbage in [
        &[][..],
        &[MAGIC],
        &[MAGIC, 9, 1, 2],
        &[MAGIC, KIND_DATA, 0, 0, 0, 1, 0, 0],
        &[MAGIC, KIND_MESSAGE_2],
    ] {
        assert_eq!(a.handle_datagram(now, 3, garbage), None);
    }
    assert_eq!(a.stats().plaintext, 2);
    assert_eq!(a.stats().malformed, 5);
    assert_eq!(a.poll_event(), Some(SecureEvent::Plaintext { peer: 3 }));
    assert_eq!(a.poll_event(), None, "reported once");
    // A message 1 of the wrong length is refused without an answer.
    assert_eq!(a.handle_datagram(now, 3, &[MAGIC, KIND_MESSAGE_1, 0, 0, 0, 1, 5, 5]), None);
    assert!(a.poll_transmit().is_none() && a.responses.is_empty());
}

#[test]
fn a_flood_of_message_1_from_strangers_stays_bounded() {
    let (_, b) = noise(AllowList::AnyKey, None);
    let mut b = layer(&b);
    let now = Instant::now();
    let config = SecureConfig::default();
    for stranger in 0..200u8 {
        let (_, s) = noise(AllowList::AnyKey, None);
        let mut s = layer(&s);
        for _ in 0..3 {
            s.send(now, 0, &[1]);
            let (_, message_1) = s.poll_transmit().unwrap();
            b.handle_datagram(now, stranger, &message_1);
            // Restart so that the next message 1 is a new handshake, not a duplicate.
            s.peers.clear();
        }
        assert!(b.responses.len() <= config.max_responses);
    }
    assert_eq!(b.responses.len(), config.max_responses);
    assert_eq!(b.stats().evicted_responses, 600 - config.max_responses as u64);
    // From one address, at most the per-address bound.
    let (_, s) = noise(AllowList::AnyKey, None);
    let mut s = layer(&s);
    for i in 1..=10 {
        s.send(now, 0, &[1]);
        let (_, message_1) = s.poll_transmit().unwrap();
        b.handle_datagram(now + Duration::from_millis(i), 250, &message_1);
        s.peers.clear();
    }
    let from_one = b.responses.values().filter(|r| r.address == 250).count();
    assert_eq!(from_one, config.max_responses_per_address);
    // Answered handshakes that never finish expire.
    b.handle_timeout(now + config.response_lifetime + Duration::from_millis(10));
    assert!(b.responses.is_empty() && b.poll_timeout().is_none());
}

#[test]
fn a_restarted_peer_is_noticed_and_a_new_session_made() {
    let (_, a_noise) = noise(AllowList::AnyKey, None);
    let (_, b_noise) = noise(AllowList::AnyKey, None);
    let (mut a, mut b) = (layer(&a_noise), layer(&b_noise));
    let now = Instant::now();
    a.send(now, 1, &reliable_datagram(1));
    run([&mut a, &mut b], now, &mut Wire::default(), |_, _| true);
    // b restarts: all its sessions are gone.
    let mut b = layer(&b_noise);
    a.send(now, 1, &reliable_datagram(2));
    let got = run([&mut a, &mut b], now, &mut Wire::default(), |_, _| true);
    assert!(got[1].is_empty(), "sealed for the old session");
    assert_eq!(b.stats().unknown_session, 1);
    assert_eq!(a.peer_key(&1), None, "told so, a dropped the session");
    // The next send (reliable mode retransmits) makes a new session.
    a.send(now, 1, &reliable_datagram(2));
    let got = run([&mut a, &mut b], now, &mut Wire::default(), |_, _| true);
    assert_eq!(got[1], [reliable_datagram(2)]);
}

#[test]
fn crossing_handshakes_both_complete_and_either_session_works() {
    let (mut a, mut b, _, _) = pair();
    let now = Instant::now();
    a.send(now, 1, &reliable_datagram(1));
    b.send(now, 0, &reliable_datagram(2));
    let got = run([&mut a, &mut b], now, &mut Wire::default(), |_, _| true);
    assert_eq!(got[1], [reliable_datagram(1)]);
    assert_eq!(got[0], [reliable_datagram(2)]);
    assert_eq!((a.stats().handshakes, b.stats().handshakes), (2, 2));
    for n in 3..10 {
        a.send(now, 1, &reliable_datagram(n));
        b.send(now, 0, &reliable_datagram(n + 100));
    }
    let got = run([&mut a, &mut b], now, &mut Wire::default(), |_, _| true);
    assert_eq!(got[1].len(), 7);
    assert_eq!(got[0].len(), 7);
    assert!(a.poll_timeout().is_none() && b.poll_timeout().is_none(), "all sessions confirmed");
}

#[test]
fn node_ids_not_bound_to_the_session_key_are_counted_and_reported() {
    let (mut a, _, _, _) = pair();
    let now = Instant::now();
    let key = Identity::generate().public_key();
    let claimed = Identity::generate().node_id(Some("bob"));
    a.refuse_node_id(now, 4, &claimed, key);
    assert_eq!(a.stats().unbound_node_id, 1);
    let Some(SecureEvent::Refused { peer: 4, key: Some(k), reason }) = a.poll_event() else { panic!() };
    assert_eq!(k, key);
    assert!(reason.contains(claimed.as_str()), "{reason}");
}

#[test]
fn debug_output_shows_no_secrets() {
    let (a, _, _, _) = pair();
    let shown = format!("{a:?}");
    assert!(shown.contains("SecureLayer") && !shown.contains("secret"), "{shown}");
}
