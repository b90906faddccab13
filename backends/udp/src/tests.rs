use super::*;
use comms_plugin_api::security::{AllowList, Identity};
use comms_plugin_api::{host_side::PluginLibrary, Destination, MessageId, Payload, UNDELIVERED_COUNTER};

fn envelope(n: u128, payload: Vec<u8>) -> Envelope {
    Envelope::new(
        MessageId::from_u128(n),
        NodeId::new("a"),
        Destination::Node(NodeId::new("b")),
        Payload::from(payload),
    )
}

async fn transport(config: &str) -> UdpTransport {
    let settings: UdpSettings = comms_plugin_api::config::parse_config(config).unwrap();
    UdpTransport::bind(NodeId::new("n"), settings).await.unwrap()
}

#[tokio::test]
async fn messages_cross_loopback_in_order_in_reliable_mode() {
    let a = transport("").await;
    let b = transport("max_datagram = 500").await;
    assert_eq!(a.info().capabilities, Capabilities::RELIABLE | Capabilities::ORDERED);
    let to = b.info().local_address;
    for n in 0..50u128 {
        a.send(&to, envelope(n, vec![n as u8; 3000 * n as usize])).await.unwrap();
    }
    let mut got = Vec::new();
    while got.len() < 50 {
        got.extend(b.receive(16).await.unwrap());
    }
    for (n, inbound) in got.iter().enumerate() {
        assert_eq!(inbound.envelope, envelope(n as u128, vec![n as u8; 3000 * n]));
    }
    a.close().await.unwrap();
    b.close().await.unwrap();
    assert!(b.receive(1).await.unwrap().is_empty(), "closed");
    assert_eq!(a.send(&to, envelope(1, vec![])).await.unwrap_err().code, ErrorCode::CLOSED);
}

#[tokio::test]
async fn best_effort_mode_declares_no_capabilities_and_delivers() {
    let a = transport("mode = \"best-effort\"").await;
    let b = transport("mode = \"best-effort\"").await;
    assert_eq!(a.info().capabilities, Capabilities::NONE);
    a.send(&b.info().local_address, envelope(7, vec![1; 10_000])).await.unwrap();
    let got = b.receive(1).await.unwrap();
    assert_eq!(got[0].envelope, envelope(7, vec![1; 10_000]));
}

#[tokio::test]
async fn config_errors_name_the_key() {
    let error = comms_plugin_api::config::parse_config::<UdpSettings>("mod = \"reliable\"").unwrap_err();
    assert!(error.message.contains("mod"), "{error}");
    let settings = UdpSettings { max_datagram: Some(20), ..Default::default() };
    assert!(settings.reliability_config().unwrap_err().message.contains("max_datagram"));
    let settings = UdpSettings { listen: Some("not an address".into()), ..Default::default() };
    let error = UdpTransport::bind(NodeId::new("n"), settings).await.unwrap_err();
    assert!(error.message.contains("listen"), "{error}");
}

#[tokio::test]
async fn too_large_and_bad_addresses_are_refused() {
    let a = transport("max_message_size = 1000").await;
    let error = a.send("127.0.0.1:9", envelope(1, vec![0; 1001])).await.unwrap_err();
    assert_eq!(error.code, ErrorCode::TOO_LARGE);
    let error = a.send("no port here", envelope(1, vec![0; 10])).await.unwrap_err();
    assert_eq!(error.code, ErrorCode::INVALID_ADDRESS);
}

#[test]
fn the_plugin_describes_itself() {
    let library = PluginLibrary::linked::<UdpPlugin>();
    assert_eq!(library.description().name, "udp");
}

#[tokio::test]
async fn an_unspecified_listen_address_advertises_a_routable_ip() {
    let any = transport("listen = \"0.0.0.0:0\"").await;
    let address: SocketAddr = any.info().local_address.parse().unwrap();
    assert!(!address.ip().is_unspecified(), "{address}");
    let explicit = transport("listen = \"0.0.0.0:0\"\nadvertise = \"10.1.2.3:4\"").await;
    assert_eq!(explicit.info().local_address, "10.1.2.3:4");
    let target = transport("").await;
    any.send(&target.info().local_address, envelope(1, vec![1])).await.unwrap();
    assert_eq!(target.receive(1).await.unwrap()[0].envelope, envelope(1, vec![1]));
}

#[tokio::test]
async fn a_peer_that_stops_acknowledging_is_reported_by_the_next_send_once() {
    // A socket that never reads: datagrams arrive, nothing is acknowledged, no ICMP comes back.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let to = silent.local_addr().unwrap().to_string();
    let a = transport("peer_timeout_ms = 300").await;
    let started = Instant::now();
    a.send(&to, envelope(1, vec![1; 5_000])).await.unwrap();
    a.send(&to, envelope(2, vec![2; 10])).await.unwrap();
    while a.stats().gave_up == 0 {
        assert!(started.elapsed() < Duration::from_secs(5), "never gave up: {:?}", a.stats());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(started.elapsed() >= Duration::from_millis(300), "gave up after {:?}", started.elapsed());
    assert_eq!(a.stats().abandoned_messages, 2);
    let error = a.send(&to, envelope(3, vec![3])).await.unwrap_err();
    assert_eq!(error.code, ErrorCode::UNREACHABLE, "{error}");
    assert!(error.retryable, "{error}");
    assert!(error.message.contains(&to) && error.message.contains("2 queued message(s)"), "{error}");
    a.send(&to, envelope(4, vec![4])).await.expect("reported once, then afresh");
    // A peer that answers is never given up, however long the exchange.
    let b = transport("").await;
    for n in 0..20u128 {
        a.send(&b.info().local_address, envelope(n, vec![n as u8; 50_000])).await.unwrap();
    }
    let mut got = 0;
    while got < 20 {
        got += b.receive(20).await.unwrap().len();
    }
    assert_eq!(a.stats().gave_up, 1, "only the silent peer");
}

fn counter(stats: &TransportStats, name: &str) -> Option<u64> {
    stats.counters.iter().find(|(counter, _)| counter == name).map(|(_, value)| *value)
}

#[tokio::test]
async fn messages_to_a_node_that_is_given_up_on_count_as_undelivered() {
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let to = silent.local_addr().unwrap().to_string();
    let a = transport("peer_timeout_ms = 300").await;
    for n in 0..3 {
        a.send(&to, envelope(n, vec![n as u8; 3_000])).await.unwrap();
    }
    // Their loss is reported otherwise or needs no report (see `counts_as_undelivered`).
    let request =
        Envelope::new(MessageId::from_u128(10), NodeId::new("a"), Destination::service("echo"), vec![1]);
    let publication =
        Envelope::new(MessageId::from_u128(11), NodeId::new("a"), Destination::topic("news"), vec![1]);
    let heartbeat = envelope(12, vec![1]).with_header(comms_plugin_api::framework::KIND_HEADER, "heartbeat");
    for envelope in [request, publication, heartbeat] {
        a.send(&to, envelope).await.unwrap();
    }
    let started = Instant::now();
    // The driver counts them just after the endpoint gave up, outside its lock: wait for both.
    while a.stats().gave_up == 0 || counter(&Transport::stats(&a), UNDELIVERED_COUNTER) == Some(0) {
        assert!(started.elapsed() < Duration::from_secs(5), "not counted: {:?}", Transport::stats(&a));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let stats = Transport::stats(&a);
    assert_eq!(counter(&stats, UNDELIVERED_COUNTER), Some(3), "{stats:?}");
    assert_eq!(counter(&stats, "udp.abandoned_messages"), Some(6), "{stats:?}");
    assert_eq!(a.stats().undelivered, 3);
    a.close().await.unwrap();
}

#[tokio::test]
async fn close_counts_what_it_could_not_deliver_as_undelivered() {
    // The default peer timeout (10 s) outlasts the close's wait for acknowledgements (2 s): the
    // peer is not given up before close, close gives up on what is still pending.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let to = silent.local_addr().unwrap().to_string();
    let a = transport("").await;
    for n in 0..2 {
        a.send(&to, envelope(n, vec![n as u8; 100])).await.unwrap();
    }
    let publication =
        Envelope::new(MessageId::from_u128(9), NodeId::new("a"), Destination::topic("news"), vec![1]);
    a.send(&to, publication).await.unwrap();
    a.close().await.unwrap();
    assert_eq!(counter(&Transport::stats(&a), UNDELIVERED_COUNTER), Some(2));
    assert_eq!(a.stats().abandoned_messages, 3);
}

#[test]
fn peer_timeout_ms_is_checked_and_caps_the_retransmission_timeout() {
    let settings = UdpSettings { peer_timeout_ms: Some(50), ..Default::default() };
    let error = settings.reliability_config().unwrap_err();
    assert!(error.message.contains("peer_timeout_ms"), "{error}");
    let config =
        UdpSettings { peer_timeout_ms: Some(400), ..Default::default() }.reliability_config().unwrap();
    assert_eq!(config.peer_timeout, Duration::from_millis(400));
    assert_eq!(config.max_rto, Duration::from_millis(100), "several retransmissions fit in the timeout");
    assert!(config.initial_rto <= config.max_rto);
    let defaults = UdpSettings::default().reliability_config().unwrap();
    assert_eq!(defaults.peer_timeout, Duration::from_millis(DEFAULT_PEER_TIMEOUT_MS));
}

#[tokio::test]
async fn a_batch_is_sent_in_order_and_failures_keep_their_index() {
    let a = transport("max_message_size = 20000").await;
    let b = transport("").await;
    let to = b.info().local_address;
    let mut batch: Vec<Outbound> = (0..40u128)
        .map(|n| Outbound { address: to.as_str().into(), envelope: envelope(n, vec![n as u8; 500]) })
        .collect();
    batch[10].envelope = envelope(10, vec![0; 30_000]);
    batch[20].address = "not an address".into();
    let failed: Vec<(usize, ErrorCode)> =
        Transport::send_batch(&a, batch).await.iter().map(|f| (f.index, f.error.code)).collect();
    assert_eq!(failed, [(10, ErrorCode::TOO_LARGE), (20, ErrorCode::INVALID_ADDRESS)]);
    let mut got = Vec::new();
    while got.len() < 38 {
        got.extend(b.receive(64).await.unwrap().into_iter().map(|inbound| inbound.envelope.id.as_u128()));
    }
    assert_eq!(got, (0..40).filter(|n| *n != 10 && *n != 20).collect::<Vec<_>>());
    let stats = Transport::stats(&b);
    assert_eq!((stats.receive_queue_depth, stats.errors), (0, 0));
    assert!(stats.counters.iter().any(|(name, value)| name == "udp.delivered" && *value == 38));
    a.close().await.unwrap();
    b.close().await.unwrap();
}

async fn nat_node(id: &str, config: &str) -> UdpTransport {
    let settings: UdpSettings =
        comms_plugin_api::config::parse_config(&format!("listen = \"127.0.0.1:0\"\n{config}")).unwrap();
    UdpTransport::bind(NodeId::new(id), settings).await.unwrap()
}

async fn receive_one(transport: &UdpTransport) -> Envelope {
    let got = tokio::time::timeout(Duration::from_secs(5), transport.receive(1)).await.unwrap().unwrap();
    got.into_iter().next().unwrap().envelope
}

#[tokio::test]
async fn nat_traversal_on_loopback_registers_punches_and_reaches_registered_nodes() {
    let server = nat_node("r", "rendezvous_server = true").await;
    let rendezvous = server.info().local_address;
    let a = nat_node("a", &format!("rendezvous = \"{rendezvous}\"")).await;
    let b = nat_node("b", &format!("rendezvous = \"{rendezvous}\"\nrendezvous_name = \"bee\"")).await;
    assert_eq!(a.info().local_address, format!("a@{rendezvous}"), "advertised through the rendezvous");
    assert_eq!(b.info().local_address, format!("bee@{rendezvous}"));
    // Sent before anything is registered or punched: held, then delivered.
    for n in 0..5u128 {
        a.send(&b.info().local_address, envelope(n, vec![n as u8; 3000])).await.unwrap();
    }
    for n in 0..5u128 {
        assert_eq!(receive_one(&b).await, envelope(n, vec![n as u8; 3000]));
    }
    b.send(&a.info().local_address, envelope(9, b"back".to_vec())).await.unwrap();
    assert_eq!(receive_one(&a).await, envelope(9, b"back".to_vec()));
    for side in [&a, &b] {
        let side: &UdpTransport = side;
        let stats = side.nat_stats().unwrap();
        assert_eq!((stats.direct_paths, stats.relayed_out), (1, 0), "{stats:?}");
        assert_eq!(counter(&Transport::stats(side), "udp.nat.direct_paths"), Some(1));
    }
    // The rendezvous reaches a registered node by its name too.
    server.send(&format!("a@{rendezvous}"), envelope(10, b"from r".to_vec())).await.unwrap();
    assert_eq!(receive_one(&a).await, envelope(10, b"from r".to_vec()));
    let error = server.send(&format!("nobody@{rendezvous}"), envelope(11, vec![])).await.unwrap_err();
    assert_eq!(error.code, ErrorCode::UNREACHABLE);
    // Another rendezvous than the node's own: refused.
    let error = a.send("x@127.0.0.1:9", envelope(12, vec![])).await.unwrap_err();
    assert!(error.message.contains("rendezvous"), "{error}");
    assert_eq!(server.nat_stats().unwrap().relayed, 0);
    for node in [a, b, server] {
        node.close().await.unwrap();
    }
}

#[tokio::test]
async fn nat_keys_are_checked() {
    let bind = |config: &str| {
        let settings: Result<UdpSettings, _> = comms_plugin_api::config::parse_config(config);
        async move { UdpTransport::bind(NodeId::new("n"), settings?).await }
    };
    for (config, key) in [
        ("rendezvous = \"127.0.0.1:1\"\nrendezvous_server = true", "rendezvous_server"),
        ("keepalive_ms = 1000", "keepalive_ms"),
        ("punch_timeout_ms = 1000", "punch_timeout_ms"),
        ("rendezvous_name = \"x\"", "rendezvous_name"),
        ("relay_rate = 10", "relay_rate"),
        ("rendezvous = \"127.0.0.1:1\"\nkeepalive_ms = 1", "keepalive_ms"),
        ("rendezvous = \"127.0.0.1:1\"\npunch_timeout_ms = 0", "punch_timeout_ms"),
        ("rendezvous_server = true\nrelay_rate = 0", "relay_rate"),
        ("rendezvous = \"127.0.0.1:1\"\nrendezvous_name = \"\"", "rendezvous_name"),
        ("rendezvous = \"not an address\"", "rendezvous"),
    ] {
        let error = bind(&format!("listen = \"127.0.0.1:0\"\n{config}")).await.unwrap_err();
        assert!(error.message.contains(key), "{config}: {error}");
    }
    // Without the keys: no NAT traversal, no counters.
    let plain = bind("listen = \"127.0.0.1:0\"").await.unwrap();
    assert!(plain.nat_stats().is_none());
    assert_eq!(counter(&Transport::stats(&plain), "udp.nat.direct_paths"), None);
}

/// A node with encrypted links whose id is bound to its key (`label` for logs).
async fn secure_nat_node(label: &str, identity: Identity, config: &str) -> (UdpTransport, NodeId) {
    let node_id = identity.node_id(Some(label));
    let security = LinkSecurity::new(identity, AllowList::AnyKey, None);
    let settings: UdpSettings =
        comms_plugin_api::config::parse_config(&format!("listen = \"127.0.0.1:0\"\n{config}")).unwrap();
    let transport =
        UdpTransport::bind_with_security(node_id.clone(), settings, Some(security)).await.unwrap();
    (transport, node_id)
}

fn envelope_from(from: &NodeId, n: u128, payload: Vec<u8>) -> Envelope {
    let mut envelope = envelope(n, payload);
    envelope.from = from.clone();
    envelope
}

#[tokio::test]
async fn nat_traversal_with_encrypted_links_seals_end_to_end() {
    let (server, server_id) = secure_nat_node("r", Identity::generate(), "rendezvous_server = true").await;
    let rendezvous = server.info().local_address;
    let (a, a_id) = secure_nat_node(
        "a",
        Identity::generate(),
        &format!("rendezvous = \"{rendezvous}\"\nrendezvous_name = \"a\""),
    )
    .await;
    let (b, b_id) = secure_nat_node(
        "b",
        Identity::generate(),
        &format!("rendezvous = \"{rendezvous}\"\nrendezvous_name = \"b\""),
    )
    .await;
    assert!(a.info().capabilities.contains(Capabilities::ENCRYPTED));
    // Larger than one datagram: fragments, each sealed, through the NAT path.
    for n in 0..5u128 {
        a.send(&b.info().local_address, envelope_from(&a_id, n, vec![n as u8; 3000])).await.unwrap();
    }
    for n in 0..5u128 {
        assert_eq!(receive_one(&b).await, envelope_from(&a_id, n, vec![n as u8; 3000]));
    }
    b.send(&a.info().local_address, envelope_from(&b_id, 9, b"back".to_vec())).await.unwrap();
    assert_eq!(receive_one(&a).await, envelope_from(&b_id, 9, b"back".to_vec()));
    // The rendezvous reaches a registered node by its name, over a session of its own.
    server.send(&format!("a@{rendezvous}"), envelope_from(&server_id, 10, b"from r".to_vec())).await.unwrap();
    assert_eq!(receive_one(&a).await, envelope_from(&server_id, 10, b"from r".to_vec()));
    for side in [&a, &b] {
        let side: &UdpTransport = side;
        let nat = side.nat_stats().unwrap();
        assert_eq!((nat.direct_paths, nat.relayed_out), (1, 0), "{nat:?}");
        let secure = side.secure_stats().unwrap();
        assert!(secure.handshakes >= 1, "{secure:?}");
        assert_eq!((secure.tampered, secure.plaintext, secure.unbound_node_id), (0, 0, 0), "{secure:?}");
    }
    // An envelope claiming another node's id over a's session is dropped, as on any link.
    a.send(&b.info().local_address, envelope_from(&server_id, 11, b"forged".to_vec())).await.unwrap();
    a.send(&b.info().local_address, envelope_from(&a_id, 12, b"after".to_vec())).await.unwrap();
    assert_eq!(receive_one(&b).await, envelope_from(&a_id, 12, b"after".to_vec()));
    assert_eq!(b.secure_stats().unwrap().unbound_node_id, 1);
    for node in [a, b, server] {
        node.close().await.unwrap();
    }
}

#[tokio::test]
async fn a_plaintext_node_behind_nat_is_refused_by_an_encrypted_one() {
    let (server, _) = secure_nat_node("r", Identity::generate(), "rendezvous_server = true").await;
    let rendezvous = server.info().local_address;
    let (secure, _) = secure_nat_node(
        "s",
        Identity::generate(),
        &format!("rendezvous = \"{rendezvous}\"\nrendezvous_name = \"s\""),
    )
    .await;
    let plain = nat_node("p", &format!("rendezvous = \"{rendezvous}\"\nrendezvous_name = \"p\"")).await;
    plain.send(&secure.info().local_address, envelope(1, b"plain".to_vec())).await.unwrap();
    // The rendezvous still introduces them (its signalling is not sealed); the datagrams that
    // arrive are plaintext, and dropped.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while secure.secure_stats().unwrap().plaintext == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no plaintext datagram was dropped");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(tokio::time::timeout(Duration::from_millis(300), secure.receive(1)).await.is_err());
    for node in [secure, plain, server] {
        node.close().await.unwrap();
    }
}
