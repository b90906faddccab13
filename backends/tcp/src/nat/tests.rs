//! The rendezvous and nodes behind NAT exchanging messages in memory, with simulated time.

use super::*;

const A: ConnId = 1;
const B: ConnId = 2;

fn addr(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

/// The body of an encoded message (without its length prefix).
fn body(frame: &[u8]) -> &[u8] {
    assert_eq!(usize::from(u16::from_be_bytes([frame[0], frame[1]])), frame.len() - 2);
    &frame[2..]
}

fn small() -> Config {
    Config {
        punch_timeout: Duration::from_millis(500),
        introduction_timeout: Duration::from_millis(300),
        relay_wait: Duration::from_millis(400),
        introduction_lifetime: Duration::from_secs(5),
        ..Config::default()
    }
}

/// Everything the server queued, by connection.
fn transmits(server: &mut Server) -> Vec<(ConnId, Message)> {
    std::iter::from_fn(|| server.poll_transmit())
        .map(|(conn, frame)| (conn, parse(body(&frame)).unwrap()))
        .collect()
}

fn events(client: &mut Client) -> Vec<Event> {
    std::iter::from_fn(|| client.poll_event()).collect()
}

/// A rendezvous with nodes `a` (conn 1, 203.0.113.1:4001) and `b` (conn 2, 198.51.100.2:5002)
/// registered.
struct World {
    server: Server,
    a: Client,
    b: Client,
    now: Instant,
}

impl World {
    fn new(config: Config) -> Self {
        let now = Instant::now();
        let mut world = Self {
            server: Server::new(config.clone()),
            a: Client::new(config.clone(), b"a").unwrap(),
            b: Client::new(config, b"b").unwrap(),
            now,
        };
        world.register(A);
        world.register(B);
        world
    }

    fn client(&mut self, conn: ConnId) -> &mut Client {
        if conn == A {
            &mut self.a
        } else {
            &mut self.b
        }
    }

    fn address(conn: ConnId) -> SocketAddr {
        if conn == A {
            addr("203.0.113.1:4001")
        } else {
            addr("198.51.100.2:5002")
        }
    }

    fn register(&mut self, conn: ConnId) {
        let now = self.now;
        let opening = self.client(conn).register_opening();
        assert_eq!(opening[..4], MAGIC);
        let disposition = self.server.handle_message(conn, Self::address(conn), body(&opening[4..]), now);
        assert_eq!(disposition, Disposition::Keep);
        self.client(conn).handle_connected(now);
        self.pump();
        assert_eq!(self.client(conn).reflexive(), Some(Self::address(conn)));
    }

    /// Carries messages both ways until none is left.
    fn pump(&mut self) {
        loop {
            let mut moved = false;
            for conn in [A, B] {
                let now = self.now;
                let frames: Vec<Vec<u8>> = std::iter::from_fn(|| self.client(conn).poll_transmit()).collect();
                for frame in frames {
                    moved = true;
                    assert_eq!(
                        self.server.handle_message(conn, Self::address(conn), body(&frame), now),
                        Disposition::Keep
                    );
                }
            }
            while let Some((conn, frame)) = self.server.poll_transmit() {
                moved = true;
                let now = self.now;
                assert!(self.client(conn).handle_message(body(&frame), now));
            }
            if !moved {
                return;
            }
        }
    }

    /// `a` dials `b`: the punch events of both.
    fn introduce(&mut self) -> (Event, Event) {
        self.a.dial(b"b", self.now).unwrap();
        self.pump();
        let (mut a, mut b) = (events(&mut self.a), events(&mut self.b));
        a.retain(|event| matches!(event, Event::Punch { .. }));
        b.retain(|event| matches!(event, Event::Punch { .. }));
        assert_eq!((a.len(), b.len()), (1, 1), "{a:?} {b:?}");
        (a.remove(0), b.remove(0))
    }
}

fn token_of(event: &Event) -> u64 {
    match event {
        Event::Punch { token, .. } => *token,
        other => panic!("not a punch: {other:?}"),
    }
}

#[test]
fn every_message_round_trips_and_anything_else_is_refused() {
    let messages = [
        Message::Register { name: b"node".to_vec() },
        Message::Registered { address: addr("192.0.2.1:7000") },
        Message::Registered { address: addr("[2001:db8::1]:7000") },
        Message::Connect { name: vec![b'x'; 255] },
        Message::Introduce {
            token: u64::MAX,
            role: Role::Target,
            address: addr("192.0.2.1:1"),
            name: b"b".to_vec(),
        },
        Message::UnknownPeer { name: b"z".to_vec() },
        Message::RelayRequest { token: 7 },
        Message::Punch { token: 8, role: Role::Dialler },
        Message::RelayDial { token: 9 },
        Message::RelayAccept { token: 10 },
        Message::RelayReady,
        Message::Refused,
    ];
    for message in &messages {
        let frame = encode(message);
        assert!(frame.len() - 2 <= MAX_BODY);
        assert_eq!(parse(body(&frame)).as_ref(), Some(message));
        let whole = body(&frame);
        for end in 0..whole.len() {
            assert_eq!(parse(&whole[..end]), None, "a truncated {message:?} is refused");
        }
        let mut longer = whole.to_vec();
        longer.push(0);
        assert_eq!(parse(&longer), None, "trailing bytes are refused");
    }
    assert_eq!(parse(&[0]), None);
    assert_eq!(parse(&[99, 1, 2]), None);
    assert_eq!(parse(&[KIND_REGISTER, 0]), None, "an empty name");
    assert_eq!(parse(&[KIND_PUNCH, 0, 0, 0, 0, 0, 0, 0, 1, 3]), None, "a role that does not exist");
    // Pseudo-random bytes never panic.
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..20_000 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let length = (seed % 40) as usize;
        let bytes: Vec<u8> = (0..length).map(|i| (seed >> (i % 8 * 8)) as u8 ^ i as u8).collect();
        let _ = parse(&bytes);
    }
    assert_eq!(split_address("a@1.2.3.4:5"), Some(("a", "1.2.3.4:5")));
    assert_eq!(split_address("1.2.3.4:5"), None);
    assert_eq!(split_address("@1.2.3.4:5"), None);
}

#[test]
fn registration_tells_the_node_its_reflexive_address_and_is_renewed() {
    let mut world = World::new(small());
    assert_eq!(world.server.registered(b"a"), Some(World::address(A)));
    assert_eq!(events(&mut world.a), [Event::Registered { reflexive: World::address(A) }]);
    // Renewed every keepalive, silently when the address did not change.
    let next = world.a.poll_timeout().unwrap();
    assert_eq!(next, world.now + small().keepalive);
    world.now = next;
    world.a.handle_timeout(world.now);
    world.pump();
    assert_eq!(world.a.stats().registrations_sent, 2);
    assert_eq!(world.server.stats().registrations, 3);
    assert_eq!(events(&mut world.a), []);
    // The connection closes: the name is gone, dials are refused until registered again.
    world.server.handle_closed(A);
    assert_eq!(world.server.registered(b"a"), None);
    world.a.handle_disconnected();
    assert_eq!(world.a.dial(b"b", world.now), Err(DialError::NotRegistered));
}

#[test]
fn a_registration_whose_answer_is_lost_is_sent_again_before_the_keepalive() {
    let config = small();
    let mut server = Server::new(config.clone());
    let mut node = Client::new(config.clone(), b"a").unwrap();
    let (from, mut now) = (World::address(A), Instant::now());
    let opening = node.register_opening();
    assert_eq!(server.handle_message(A, from, body(&opening[4..]), now), Disposition::Keep);
    node.handle_connected(now);
    // The answer is lost on its way (the node is registered at the rendezvous, and does not
    // know it): dials are refused meanwhile.
    assert_eq!(transmits(&mut server).len(), 1);
    assert_eq!(node.dial(b"b", now), Err(DialError::NotRegistered));
    let again = node.poll_timeout().unwrap();
    assert_eq!(again, now + config.introduction_timeout, "not a keepalive ({:?}) later", config.keepalive);
    now = again;
    node.handle_timeout(now);
    let frame = node.poll_transmit().expect("the registration is sent again");
    assert_eq!(server.handle_message(A, from, body(&frame), now), Disposition::Keep);
    for (conn, frame) in std::iter::from_fn(|| server.poll_transmit()) {
        assert_eq!(conn, A);
        assert!(node.handle_message(body(&frame), now));
    }
    assert_eq!(events(&mut node), [Event::Registered { reflexive: from }]);
    assert_eq!(node.stats().registrations_sent, 2);
    // Answered: renewed every keepalive from now on.
    assert_eq!(node.poll_timeout(), Some(now + config.keepalive));
    node.handle_timeout(now + config.keepalive);
    assert!(node.poll_transmit().is_some());
    assert_eq!(node.poll_timeout(), Some(now + 2 * config.keepalive));
}

#[test]
fn an_introduction_gives_both_sides_the_token_their_role_and_the_other_address() {
    let mut world = World::new(small());
    events(&mut world.a);
    events(&mut world.b);
    let (a, b) = world.introduce();
    let deadline = world.now + small().punch_timeout;
    let token = token_of(&a);
    assert_eq!(
        a,
        Event::Punch { name: "b".into(), token, role: Role::Dialler, address: World::address(B), deadline }
    );
    assert_eq!(
        b,
        Event::Punch { name: "a".into(), token, role: Role::Target, address: World::address(A), deadline }
    );
    // Tokens differ per introduction.
    let (again, _) = world.introduce();
    assert_ne!(token_of(&again), token);
    assert_eq!(world.server.stats().introductions, 2);
}

#[test]
fn a_punched_connection_needs_the_token_and_the_opposite_role() {
    let mut world = World::new(small());
    let (a, b) = world.introduce();
    let token = token_of(&a);
    let now = world.now;
    // The dialler takes only the target's greeting, with the token.
    assert_eq!(world.a.handle_greeting(token ^ 1, Role::Target, now), None);
    assert_eq!(world.a.handle_greeting(token, Role::Dialler, now), None);
    assert!(world.a.punching(token, now));
    assert_eq!(world.a.handle_greeting(token, Role::Target, now), Some(Role::Dialler));
    assert!(!world.a.punching(token, now), "done");
    assert_eq!(world.a.handle_greeting(token, Role::Target, now), None, "only once");
    assert_eq!(world.a.stats().bad_punches, 3);
    assert_eq!(world.a.stats().punched, 1);
    // The target, too, but after the deadline the punch is over.
    assert_eq!(token_of(&b), token);
    let late = now + small().punch_timeout + Duration::from_millis(1);
    assert!(!world.b.punching(token, late));
    assert_eq!(world.b.handle_greeting(token, Role::Dialler, late), None);
    assert_eq!(world.b.handle_greeting(token, Role::Dialler, now), Some(Role::Target));
}

#[test]
fn a_failed_punch_is_relayed_by_token_and_the_halves_are_spliced() {
    let mut world = World::new(small());
    let (a, _) = world.introduce();
    let token = token_of(&a);
    events(&mut world.b);
    world.now += small().punch_timeout;
    world.a.relaying(token);
    let now = world.now;
    // A stranger's token opens nothing.
    assert_eq!(
        world.server.handle_message(
            10,
            addr("192.0.2.9:1"),
            body(&encode(&Message::RelayDial { token: token ^ 5 })),
            now
        ),
        Disposition::Close
    );
    assert_eq!(
        world.server.handle_message(
            11,
            addr("192.0.2.9:1"),
            body(&encode(&Message::RelayAccept { token })),
            now
        ),
        Disposition::Close,
        "no dialler half yet"
    );
    // The dialler's half is held and the target asked to open its own.
    let dial = encode(&Message::RelayDial { token });
    assert_eq!(world.server.handle_message(3, World::address(A), body(&dial), now), Disposition::Hold);
    assert_eq!(transmits(&mut world.server), [(B, Message::RelayRequest { token })]);
    assert!(world.b.handle_message(body(&encode(&Message::RelayRequest { token })), now));
    assert_eq!(events(&mut world.b), [Event::RelayRequested { token }]);
    assert!(world.b.handle_message(body(&encode(&Message::RelayRequest { token: token ^ 1 })), now));
    assert_eq!(events(&mut world.b), [], "a request for an unknown token is ignored");
    let accept = encode(&Message::RelayAccept { token });
    assert_eq!(
        world.server.handle_message(4, World::address(B), body(&accept), now),
        Disposition::Splice { dial: 3, token }
    );
    assert_eq!(world.server.relay_count(), 1);
    assert_eq!(world.server.stats().relays, 1);
    // A second accept for the same token is refused; the end frees the relay.
    assert_eq!(world.server.handle_message(5, World::address(B), body(&accept), now), Disposition::Close);
    world.server.relay_ended(token);
    assert_eq!(world.server.relay_count(), 0);
    assert_eq!(world.server.stats().refused, 3);
    assert_eq!((world.a.stats().relayed, world.b.stats().relayed), (1, 1));
}

#[test]
fn a_relay_half_left_alone_is_closed_and_an_unanswered_dial_fails() {
    let mut world = World::new(small());
    let (a, _) = world.introduce();
    let token = token_of(&a);
    let now = world.now;
    assert_eq!(
        world.server.handle_message(3, World::address(A), body(&encode(&Message::RelayDial { token })), now),
        Disposition::Hold
    );
    transmits(&mut world.server);
    assert_eq!(world.server.poll_timeout(), Some(now + small().relay_wait));
    world.server.handle_timeout(now + small().relay_wait - Duration::from_millis(1));
    assert_eq!(world.server.poll_close(), None);
    world.server.handle_timeout(now + small().relay_wait);
    assert_eq!(world.server.poll_close(), Some(3));
    assert_eq!(world.server.relay_count(), 0);
    // A dial the rendezvous never answers (its message lost) fails after the introduction timeout.
    world.a.dial(b"c", now).unwrap();
    assert_eq!(
        world.a.poll_transmit().map(|frame| parse(body(&frame))),
        Some(Some(Message::Connect { name: b"c".to_vec() }))
    );
    world.a.handle_timeout(now + small().introduction_timeout);
    let failed =
        events(&mut world.a).into_iter().filter(|event| matches!(event, Event::DialFailed { .. })).count();
    assert_eq!(failed, 1);
    // An unknown name is answered at once.
    world.a.dial(b"nobody", now).unwrap();
    world.pump();
    assert!(events(&mut world.a).contains(&Event::DialFailed {
        name: "nobody".into(),
        reason: "no node is registered under that name at the rendezvous"
    }));
    // Punch tokens are forgotten after the relay window.
    let expiry = now + small().punch_timeout + small().relay_wait + small().punch_timeout;
    world.b.handle_timeout(expiry);
    assert!(world.b.handle_message(body(&encode(&Message::RelayRequest { token })), expiry));
    assert_eq!(events(&mut world.b).iter().filter(|e| matches!(e, Event::RelayRequested { .. })).count(), 0);
}

#[test]
fn limits_bound_registrations_introductions_relays_and_dials() {
    let config = Config {
        max_registrations: 2,
        max_introductions_per_node: 1,
        max_relays_per_node: 1,
        max_pending_dials: 1,
        ..small()
    };
    let mut world = World::new(config);
    let now = world.now;
    // A third name is refused; a name registered again from elsewhere moves there.
    let register = |name: &[u8]| encode(&Message::Register { name: name.to_vec() });
    assert_eq!(
        world.server.handle_message(7, addr("192.0.2.7:1"), body(&register(b"c")), now),
        Disposition::Close
    );
    assert_eq!(transmits(&mut world.server), [(7, Message::Refused)]);
    assert_eq!(
        world.server.handle_message(8, addr("192.0.2.8:1"), body(&register(b"b")), now),
        Disposition::Keep
    );
    assert_eq!(world.server.poll_close(), Some(B), "the old connection of `b` is closed");
    assert_eq!(world.server.registered(b"b"), Some(addr("192.0.2.8:1")));
    transmits(&mut world.server);
    // One live introduction per node.
    let connect = encode(&Message::Connect { name: b"b".to_vec() });
    assert_eq!(world.server.handle_message(A, World::address(A), body(&connect), now), Disposition::Keep);
    let token = match transmits(&mut world.server).first() {
        Some((A, Message::Introduce { token, .. })) => *token,
        other => panic!("{other:?}"),
    };
    world.server.handle_message(A, World::address(A), body(&connect), now);
    assert_eq!(transmits(&mut world.server), [(A, Message::Refused)]);
    // One relay per node.
    assert_eq!(
        world.server.handle_message(20, World::address(A), body(&encode(&Message::RelayDial { token })), now),
        Disposition::Hold
    );
    assert_eq!(
        world.server.handle_message(21, World::address(A), body(&encode(&Message::RelayDial { token })), now),
        Disposition::Close
    );
    // One dial waiting per node.
    world.a.dial(b"x", now).unwrap();
    assert_eq!(world.a.dial(b"y", now), Err(DialError::TooMany));
    assert_eq!(world.a.dial(b"", now), Err(DialError::BadName));
    assert_eq!(Client::new(Config::default(), &[b'n'; 256]).err(), Some(DialError::BadName));
}

#[test]
fn malformed_or_unexpected_messages_are_counted_and_close_the_connection() {
    let mut world = World::new(small());
    let now = world.now;
    let from = addr("192.0.2.50:1");
    for bad in [&[][..], &[0xFF], &[KIND_REGISTER, 3, b'a'], &[KIND_REGISTERED, 4, 1, 2, 3, 4, 0, 1]] {
        assert_eq!(world.server.handle_message(30, from, bad, now), Disposition::Close);
    }
    // CONNECT before registering, PUNCH at the rendezvous.
    assert_eq!(
        world.server.handle_message(31, from, body(&encode(&Message::Connect { name: b"a".to_vec() })), now),
        Disposition::Close
    );
    assert_eq!(
        world.server.handle_message(
            32,
            from,
            body(&encode(&Message::Punch { token: 1, role: Role::Dialler })),
            now
        ),
        Disposition::Close
    );
    assert_eq!(world.server.stats().malformed, 6);
    // A registered node sending something it must not loses its registration.
    assert_eq!(
        world.server.handle_message(A, World::address(A), body(&encode(&Message::RelayReady)), now),
        Disposition::Close
    );
    assert_eq!(world.server.registered(b"a"), None);
    // A node refuses what only a rendezvous's peer would send.
    assert!(!world.b.handle_message(&[KIND_REGISTER, 1, b'x'], now));
    assert!(!world.b.handle_message(&[0xEE, 0xEE], now));
    assert_eq!(world.b.stats().malformed, 2);
    // An introduction nobody asked for as dialler is ignored.
    let unasked = Message::Introduce { token: 1, role: Role::Dialler, address: from, name: b"q".to_vec() };
    assert!(world.b.handle_message(body(&encode(&unasked)), now));
    assert_eq!(events(&mut world.b).iter().filter(|e| matches!(e, Event::Punch { .. })).count(), 0);
}

#[test]
fn the_target_punches_towards_the_dialler_s_dial_port_once_registered() {
    let mut world = World::new(small());
    let now = world.now;
    let dial_port = addr("203.0.113.1:4999");
    let opening = opening(&world.a.register_dial_message());
    // Only a registered name registers a dial port.
    let stranger = encode(&Message::RegisterDial { name: b"zz".to_vec() });
    assert_eq!(world.server.handle_message(9, dial_port, body(&stranger), now), Disposition::Close);
    assert_eq!(transmits(&mut world.server), [(9, Message::Refused)]);
    assert_eq!(world.server.handle_message(3, dial_port, body(&opening[4..]), now), Disposition::Keep);
    assert_eq!(transmits(&mut world.server), [(3, Message::Registered { address: dial_port })]);
    let (a, b) = world.introduce();
    assert!(matches!(a, Event::Punch { address, .. } if address == World::address(B)), "to b's listen port");
    assert!(matches!(b, Event::Punch { address, .. } if address == dial_port), "to a's dial port");
    // Without it (its connection closed), the listen port's mapping is all there is.
    world.server.handle_closed(3);
    let (_, b) = world.introduce();
    assert!(matches!(b, Event::Punch { address, .. } if address == World::address(A)));
}
