//! Encrypted, authenticated UDP links (`security.links = "noise"`) with the udp plugin as users
//! load it (`libcomms_udp.so`): allowed peers talk both ways (1 MiB included); a plaintext peer,
//! an unknown key and a peer claiming another node's id get nothing through; datagrams replayed
//! or tampered with by a relay in the middle are dropped; datagrams forged with a peer's address
//! and a fresh epoch neither lose nor repeat messages, with plain links or encrypted ones; the
//! conformance suite passes with security on.

use comms_host::{
    conformance::{run_suite, SuiteConfig},
    Node, PluginLibrary, Security,
};
use comms_plugin_api::{
    host_side::LoadedTransport,
    security::{Identity, LinkMode, PublicKey},
    Destination, Envelope, Inbound, MessageId, NodeId, Payload,
};
use comms_tests::{artifacts, scratch_dir};
use std::{
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};
use tokio::net::UdpSocket;

fn library() -> PluginLibrary {
    PluginLibrary::load(&artifacts().udp_plugin).unwrap_or_else(|error| panic!("{error}"))
}

/// A fresh owner-only key file.
fn key_file(dir: &Path, name: &str) -> (PathBuf, PublicKey) {
    let path = dir.join(format!("{name}.key"));
    let identity = Identity::generate();
    identity.save_new(&path).unwrap();
    (path, identity.public_key())
}

/// A loopback address with a UDP port that is free right now.
fn free_udp_address() -> String {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind an ephemeral UDP port");
    socket.local_addr().expect("local address").to_string()
}

/// The plugin's config table with a `[comms_security]` table, as the host passes it.
fn secure_config(own: &str, mode: &str, key: &Path, allow: &[String]) -> String {
    let allow: Vec<String> = allow.iter().map(|entry| format!("\"{entry}\"")).collect();
    format!(
        "listen = \"{own}\"\nmode = \"{mode}\"\n\n[comms_security]\nlinks = \"noise\"\nkey_file = \"{}\"\nallow = [{}]\n",
        key.display(),
        allow.join(", ")
    )
}

/// A node `label` with encrypted links (key file `key`), allowing `allow`, knowing `peers`.
async fn secure_node(label: &str, key: &Path, allow: &[String], own: &str, peers: &[(NodeId, &str)]) -> Node {
    let security = Security { links: LinkMode::Noise, allow: allow.to_vec(), ..Security::default() };
    let mut builder = Node::builder(label).key_file(key).security(security).transport_library(
        "udp",
        library(),
        &format!("listen = \"{own}\"\nmode = \"reliable\""),
    );
    for (id, address) in peers {
        builder = builder.static_peer(id.as_str(), [("udp", *address)]);
    }
    builder.build().await.unwrap_or_else(|error| panic!("{error}"))
}

async fn nothing_arrives(node: &Node, within: Duration) {
    if let Ok(got) = tokio::time::timeout(within, node.receive_envelope()).await {
        panic!("nothing should arrive, got {got:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_peers_exchange_messages_both_ways_including_a_mebibyte() {
    let dir = scratch_dir("udp-secure-allowed");
    let ((a_key, a_public), (b_key, b_public)) = (key_file(&dir, "a"), key_file(&dir, "b"));
    let (a_id, b_id) = (a_public.node_id(Some("a")), b_public.node_id(Some("b")));
    let (address_a, address_b) = (free_udp_address(), free_udp_address());
    let a = secure_node("a", &a_key, &[b_public.to_hex()], &address_a, &[(b_id.clone(), &address_b)]).await;
    let b = secure_node("b", &b_key, &[a_id.to_string()], &address_b, &[(a_id.clone(), &address_a)]).await;
    assert_eq!(a.id(), &a_id);
    let summary = &a.transports()[0];
    assert_eq!(summary.capabilities.names(), ["ordered", "reliable", "encrypted"], "{summary:?}");
    let big: Vec<u8> = (0..1usize << 20).map(|i| (i as u8).wrapping_mul(31) ^ 0x5a).collect();
    a.send_raw(b_id.as_str(), vec![], b"hello b".to_vec(), None).await.unwrap();
    a.send_raw(b_id.as_str(), vec![], big.clone(), None).await.unwrap();
    b.send_raw(a_id.as_str(), vec![], b"hello a".to_vec(), None).await.unwrap();
    b.send_raw(a_id.as_str(), vec![], big.clone(), None).await.unwrap();
    let receive = |node: &Node| {
        let node = node.clone();
        async move {
            tokio::time::timeout(Duration::from_secs(30), node.receive_envelope()).await.unwrap().unwrap()
        }
    };
    let at_b = receive(&b).await;
    assert_eq!((at_b.from.as_str(), at_b.payload.as_slice()), (a_id.as_str(), &b"hello b"[..]));
    assert!(receive(&b).await.payload.as_slice() == big.as_slice(), "1 MiB to b intact");
    assert_eq!(receive(&a).await.payload.as_slice(), b"hello a");
    assert!(receive(&a).await.payload.as_slice() == big.as_slice(), "1 MiB to a intact");
    a.close().await.unwrap();
    b.close().await.unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plaintext_peer_and_a_secure_node_exchange_nothing() {
    let dir = scratch_dir("udp-secure-plaintext");
    let (key, public) = key_file(&dir, "secure");
    let secure_id = public.node_id(Some("secure"));
    let (secure_address, plain_address) = (free_udp_address(), free_udp_address());
    let secure = secure_node(
        "secure",
        &key,
        &["*".into()],
        &secure_address,
        &[(NodeId::new("plain"), &plain_address)],
    )
    .await;
    let plain = Node::builder("plain")
        .transport_library("udp", library(), &format!("listen = \"{plain_address}\""))
        .static_peer(secure_id.as_str(), [("udp", secure_address.as_str())])
        .build()
        .await
        .unwrap();
    plain.send_raw(secure_id.as_str(), vec![], b"in the clear".to_vec(), None).await.unwrap();
    secure.send_raw("plain", vec![], b"sealed".to_vec(), None).await.unwrap();
    nothing_arrives(&secure, Duration::from_millis(1500)).await;
    nothing_arrives(&plain, Duration::from_millis(200)).await;
    // Neither message can get through, and each sender says so when it closes.
    close_reporting_undelivered(secure, 1).await;
    close_reporting_undelivered(plain, 1).await;
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_an_unknown_key_is_refused_both_ways() {
    let dir = scratch_dir("udp-secure-unknown");
    let ((a_key, _), (b_key, b_public), (c_key, c_public)) =
        (key_file(&dir, "a"), key_file(&dir, "b"), key_file(&dir, "c"));
    let (address_a, address_c) = (free_udp_address(), free_udp_address());
    let c_id = c_public.node_id(Some("c"));
    // a allows only b; c (the stranger) allows anyone.
    let a = secure_node("a", &a_key, &[b_public.to_hex()], &address_a, &[(c_id.clone(), &address_c)]).await;
    let a_id = a.id().clone();
    let c = secure_node("c", &c_key, &["*".into()], &address_c, &[(a_id.clone(), &address_a)]).await;
    c.send_raw(a_id.as_str(), vec![], b"let me in".to_vec(), None).await.unwrap();
    a.send_raw(c_id.as_str(), vec![], b"not for you".to_vec(), None).await.unwrap();
    nothing_arrives(&a, Duration::from_millis(1500)).await;
    nothing_arrives(&c, Duration::from_millis(200)).await;
    // The same a talks to an allowed peer at once: the refusal was about the key.
    let address_b = free_udp_address();
    let b = secure_node("b", &b_key, &[a_id.to_string()], &address_b, &[(a_id.clone(), &address_a)]).await;
    b.send_raw(a_id.as_str(), vec![], b"allowed".to_vec(), None).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), a.receive_envelope()).await.unwrap().unwrap();
    assert_eq!(got.payload.as_slice(), b"allowed");
    b.close().await.unwrap();
    // The refused messages are reported by their senders, not lost in silence.
    close_reporting_undelivered(a, 1).await;
    close_reporting_undelivered(c, 1).await;
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Closes `node` and checks that it reports exactly `count` messages it could not deliver.
async fn close_reporting_undelivered(node: Node, count: u64) {
    let id = node.id().clone();
    match node.close().await {
        Err(error) => assert_eq!(error.undelivered, count, "{id}: {error}"),
        Ok(()) => panic!("{id} closed without reporting its {count} undelivered message(s)"),
    }
}

fn envelope(from: &NodeId, to: &NodeId, payload: &[u8]) -> Envelope {
    Envelope::new(
        MessageId::from_u128(rand::random()),
        from.clone(),
        Destination::Node(to.clone()),
        Payload::from(payload.to_vec()),
    )
}

/// A transport of the real plugin for `id`, as the host would create it.
async fn raw_transport(id: &NodeId, config: &str) -> LoadedTransport {
    library().new_transport(id, "udp", config).await.unwrap_or_else(|error| panic!("{error}"))
}

async fn receive_one(transport: &LoadedTransport, within: Duration) -> Option<Inbound> {
    match tokio::time::timeout(within, transport.receive(1)).await {
        Ok(batch) => batch.unwrap().into_iter().next(),
        Err(_) => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_claiming_another_nodes_id_is_dropped() {
    let dir = scratch_dir("udp-secure-claims");
    let ((a_key, a_public), (m_key, m_public), (_, bob_public)) =
        (key_file(&dir, "a"), key_file(&dir, "mallory"), key_file(&dir, "bob"));
    let (a_id, m_id, bob_id) =
        (a_public.node_id(Some("a")), m_public.node_id(Some("mallory")), bob_public.node_id(Some("bob")));
    let (address_a, address_m) = (free_udp_address(), free_udp_address());
    // a allows mallory and bob; mallory holds only her own key.
    let allow = [m_public.to_hex(), bob_public.to_hex()];
    let a = raw_transport(&a_id, &secure_config(&address_a, "reliable", &a_key, &allow)).await;
    let m = raw_transport(&m_id, &secure_config(&address_m, "reliable", &m_key, &["*".into()])).await;
    assert!(a.info().capabilities.names().contains(&"encrypted"));
    for (claimed, label) in [(&bob_id, "bob's id"), (&NodeId::new("bob"), "an unbound id")] {
        m.send(&address_a, envelope(claimed, &a_id, label.as_bytes())).await.unwrap();
    }
    // Her own id gets through on the same session, after the forged ones (reliable: in order).
    m.send(&address_a, envelope(&m_id, &a_id, b"mallory herself")).await.unwrap();
    let got = receive_one(&a, Duration::from_secs(10)).await.expect("mallory's own message");
    assert_eq!(got.envelope.from, m_id);
    assert_eq!(got.envelope.payload.as_slice(), b"mallory herself", "the forged ones were dropped");
    assert!(receive_one(&a, Duration::from_millis(300)).await.is_none());
    a.close().await.unwrap();
    m.close().await.unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A UDP relay between a client (the first address that sends to it) and `server`, that records
/// what the client sent and may alter it.
struct Relay {
    socket: Arc<UdpSocket>,
    server: String,
    captured: Arc<Mutex<Vec<Vec<u8>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// `alter` sees every client datagram with its index and may change it.
    async fn start(server: &str, alter: impl Fn(usize, &mut Vec<u8>) + Send + 'static) -> Self {
        let socket = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let server_address: std::net::SocketAddr = server.parse().unwrap();
        let captured = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn({
            let (socket, captured) = (socket.clone(), captured.clone());
            async move {
                let mut buffer = vec![0u8; 65_536];
                let mut count = 0;
                let mut client: Option<std::net::SocketAddr> = None;
                while let Ok((n, from)) = socket.recv_from(&mut buffer).await {
                    if from == server_address {
                        if let Some(to) = client {
                            let _ = socket.send_to(&buffer[..n], to).await;
                        }
                        continue;
                    }
                    client.get_or_insert(from);
                    let mut datagram = buffer[..n].to_vec();
                    captured.lock().unwrap().push(datagram.clone());
                    alter(count, &mut datagram);
                    count += 1;
                    let _ = socket.send_to(&datagram, server_address).await;
                }
            }
        });
        Self { socket, server: server.to_string(), captured, task }
    }

    fn address(&self) -> String {
        self.socket.local_addr().unwrap().to_string()
    }

    /// Sends everything the client sent so far to the server again, as the relay (the address
    /// the server knows the client by).
    async fn replay(&self) -> usize {
        let captured = self.captured.lock().unwrap().clone();
        for datagram in &captured {
            self.socket.send_to(datagram, &self.server).await.unwrap();
        }
        captured.len()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_datagrams_are_not_delivered_twice_even_in_best_effort_mode() {
    let dir = scratch_dir("udp-secure-replay");
    let ((a_key, a_public), (b_key, b_public)) = (key_file(&dir, "a"), key_file(&dir, "b"));
    let (a_id, b_id) = (a_public.node_id(Some("a")), b_public.node_id(Some("b")));
    for mode in ["best-effort", "reliable"] {
        let (address_a, address_b) = (free_udp_address(), free_udp_address());
        let b = raw_transport(&b_id, &secure_config(&address_b, mode, &b_key, &["*".into()])).await;
        let relay = Relay::start(&address_b, |_, _| {}).await;
        let a = raw_transport(&a_id, &secure_config(&address_a, mode, &a_key, &["*".into()])).await;
        for n in 0..3u8 {
            a.send(&relay.address(), envelope(&a_id, &b_id, &vec![n; 3000])).await.unwrap();
            let got = receive_one(&b, Duration::from_secs(10)).await.expect("delivered through the relay");
            assert_eq!(got.envelope.payload.as_slice(), vec![n; 3000].as_slice(), "{mode}");
        }
        let replayed = relay.replay().await;
        assert!(replayed >= 9, "{mode}: handshake and data datagrams captured: {replayed}");
        assert!(
            receive_one(&b, Duration::from_millis(800)).await.is_none(),
            "{mode}: a replayed datagram was delivered again"
        );
        // The link still works after the replay.
        a.send(&relay.address(), envelope(&a_id, &b_id, b"after")).await.unwrap();
        let got = receive_one(&b, Duration::from_secs(10)).await.expect("still working");
        assert_eq!(got.envelope.payload.as_slice(), b"after");
        a.close().await.unwrap();
        b.close().await.unwrap();
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_datagram_is_dropped_and_the_message_arrives_after_retransmission() {
    let dir = scratch_dir("udp-secure-tamper");
    let ((a_key, a_public), (b_key, b_public)) = (key_file(&dir, "a"), key_file(&dir, "b"));
    let (a_id, b_id) = (a_public.node_id(Some("a")), b_public.node_id(Some("b")));
    let (address_a, address_b) = (free_udp_address(), free_udp_address());
    let b = raw_transport(&b_id, &secure_config(&address_b, "reliable", &b_key, &["*".into()])).await;
    let flipped = Arc::new(AtomicUsize::new(0));
    let relay = Relay::start(&address_b, {
        let flipped = flipped.clone();
        move |_, datagram: &mut Vec<u8>| {
            // The first two data datagrams (kind 4) that carry more than an ack: one byte of
            // ciphertext flipped.
            if datagram.len() > 500 && datagram[..2] == [0xCE, 4] && flipped.load(Ordering::SeqCst) < 2 {
                let middle = datagram.len() / 2;
                datagram[middle] ^= 0x01;
                flipped.fetch_add(1, Ordering::SeqCst);
            }
        }
    })
    .await;
    let a = raw_transport(&a_id, &secure_config(&address_a, "reliable", &a_key, &["*".into()])).await;
    let payload: Vec<u8> = (0..20_000u32).map(|i| (i % 253) as u8).collect();
    a.send(&relay.address(), envelope(&a_id, &b_id, &payload)).await.unwrap();
    let got = receive_one(&b, Duration::from_secs(10)).await.expect("the message arrives");
    assert_eq!(flipped.load(Ordering::SeqCst), 2, "the relay tampered with two datagrams");
    assert!(got.envelope.payload.as_slice() == payload.as_slice(), "intact");
    assert!(receive_one(&b, Duration::from_millis(500)).await.is_none(), "exactly once");
    a.close().await.unwrap();
    b.close().await.unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A reliable data datagram (`backends/udp/src/reliability.rs`, "Datagram format") carrying the
/// whole encoded `envelope` as a one-fragment message in `epoch`, starting that epoch's stream.
fn forged_fresh_epoch_datagram(epoch: u32, envelope: &Envelope) -> Vec<u8> {
    let mut message = Vec::new();
    comms_plugin_api::wire::encode_envelope(envelope, &mut message).unwrap();
    let mut datagram = vec![0xCD, 1]; // magic, reliable data
    datagram.extend_from_slice(&epoch.to_be_bytes());
    datagram.extend_from_slice(&0u64.to_be_bytes()); // sequence number
    datagram.extend_from_slice(&0u64.to_be_bytes()); // base
    datagram.extend_from_slice(&0u32.to_be_bytes()); // message number
    datagram.extend_from_slice(&0u16.to_be_bytes()); // fragment 0 ...
    datagram.extend_from_slice(&1u16.to_be_bytes()); // ... of 1
    datagram.extend_from_slice(&(message.len() as u32).to_be_bytes());
    datagram.extend_from_slice(&message);
    datagram
}

/// issue 18, point 6: in reliable mode, datagrams forged with the sender's address and a fresh
/// epoch, injected into a stream, made messages vanish or arrive twice. The relay stands for the
/// sender's address (b knows `a` by it), so what the test sends from the relay's socket is what
/// an off-path forger spoofing a's address would send: it reads nothing of the traffic. Plain
/// links: the epoch change needs a proof the forger cannot give; Noise links: nothing unsealed
/// gets in at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_fresh_epoch_datagrams_cause_no_loss_and_no_duplicates() {
    const MESSAGES: u32 = 3_000;
    let dir = scratch_dir("udp-forged-epochs");
    let ((a_key, a_public), (b_key, b_public)) = (key_file(&dir, "a"), key_file(&dir, "b"));
    let (a_id, b_id) = (a_public.node_id(Some("a")), b_public.node_id(Some("b")));
    for links in ["plain", "noise"] {
        let (address_a, address_b) = (free_udp_address(), free_udp_address());
        let config = |own: &str, key: &Path| match links {
            "plain" => format!("listen = \"{own}\"\nmode = \"reliable\"\n"),
            _ => secure_config(own, "reliable", key, &["*".into()]),
        };
        let b = Arc::new(raw_transport(&b_id, &config(&address_b, &b_key)).await);
        let relay = Relay::start(&address_b, |_, _| {}).await;
        let a = raw_transport(&a_id, &config(&address_a, &a_key)).await;
        let payload = |n: u32| {
            let mut payload = n.to_be_bytes().to_vec();
            payload.resize(3_000, n as u8); // three datagrams: a reset would cut messages apart
            payload
        };
        // The receiver runs alongside, so that b's inbound queue never holds up its socket, and
        // tells how many arrived.
        let (count, mut arrived) = tokio::sync::watch::channel(0usize);
        let receiver = tokio::spawn({
            let b = b.clone();
            async move {
                let mut got = Vec::new();
                while got.len() < MESSAGES as usize {
                    match tokio::time::timeout(Duration::from_secs(20), b.receive(256)).await {
                        Ok(batch) => got.extend(batch.unwrap().into_iter().map(|inbound| inbound.envelope)),
                        Err(_) => break,
                    }
                    count.send_replace(got.len());
                }
                got
            }
        });
        let forged_envelope = envelope(&a_id, &b_id, b"forged");
        let mut forged = 0u32;
        for n in 0..MESSAGES {
            a.send(&relay.address(), envelope(&a_id, &b_id, &payload(n))).await.unwrap();
            if n == 0 {
                // The stream is under way: b adopted a's epoch. (A forger who speaks first from
                // an address b has no state for is that address's first epoch: plain links
                // cannot tell it from a new peer.)
                tokio::time::timeout(Duration::from_secs(10), arrived.wait_for(|n| *n >= 1))
                    .await
                    .expect("the first message arrives")
                    .unwrap();
                continue;
            }
            // Two forged datagrams per message, each in a fresh epoch.
            for _ in 0..2 {
                let datagram = forged_fresh_epoch_datagram(rand::random(), &forged_envelope);
                relay.socket.send_to(&datagram, &address_b).await.unwrap();
                forged += 1;
            }
        }
        let got = receiver.await.unwrap();
        let numbers: Vec<u32> = got
            .iter()
            .filter(|envelope| envelope.payload.as_slice() != b"forged")
            .map(|envelope| u32::from_be_bytes(envelope.payload.as_slice()[..4].try_into().unwrap()))
            .collect();
        let lost = (0..MESSAGES).filter(|n| !numbers.contains(n)).count();
        let mut seen = std::collections::HashSet::new();
        let twice = numbers.iter().filter(|n| !seen.insert(**n)).count();
        assert_eq!((lost, twice), (0, 0), "{links}: messages lost and delivered twice");
        assert_eq!(numbers, (0..MESSAGES).collect::<Vec<_>>(), "{links}: in order");
        assert!(
            got.iter().all(|envelope| envelope.payload.as_slice() != b"forged"),
            "{links}: a forgery delivered"
        );
        assert!(receive_one(&b, Duration::from_millis(500)).await.is_none(), "{links}: nothing after");
        let counters = b.stats().transport.counters;
        let counter = |wanted: &str| counters.iter().find(|(name, _)| name == wanted).map_or(0, |c| c.1);
        let (unproven, plaintext) = (counter("udp.unproven_epoch"), counter("udp.plaintext_dropped"));
        if links == "plain" {
            // The forgeries reached the state machine and were held back.
            assert!(unproven > 0 && unproven <= u64::from(forged), "{links}: {forged} forged, {counters:?}");
        } else {
            // The secure layer dropped them before the state machine saw them.
            assert!(unproven == 0 && plaintext > 0, "{links}: {forged} forged, {counters:?}");
        }
        a.close().await.unwrap();
        b.close().await.unwrap();
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---- The conformance suite with security on ----

/// The real `libcomms_udp.so` under the suite with encrypted links: every instance uses the same
/// key file, and the suite's node ids are bound to that key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reliable_mode_with_encrypted_links_passes_the_conformance_suite() {
    let dir = scratch_dir("udp-secure-suite");
    let (key, _) = key_file(&dir, "suite");
    let config = SuiteConfig::new("mode = \"reliable\"\n").with_noise_links(&key).unwrap();
    let report = run_suite(&library(), &config).await;
    assert!(report.passed(), "{report}");
    let info = report.info.clone().expect("the transport was created");
    assert_eq!(info.capabilities.names(), ["ordered", "reliable", "encrypted"], "{report}");
    assert_eq!(
        report.skipped_names(),
        [
            "batches_and_sends_at_once",
            "redelivery_after_reject",
            "durable_resume",
            "topic_isolation",
            "topic_fan_out"
        ],
        "{report}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
