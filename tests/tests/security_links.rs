//! Encrypted, authenticated links over the TCP plugin (and the third-party UDS plugin), as users
//! load them (`.so` files) with a `[comms_security]` table in the transport's config: allowed
//! peers talk both ways, the wire carries no plaintext, and a node with security on refuses a
//! plaintext peer, an unknown key, a peer claiming another node's id, a replayed handshake, a
//! tampered record and a peer without the network key. Nothing from a refused connection reaches
//! the application; refusals are logged, and no secret appears in logs, errors or output.

use comms_host::{
    conformance::{run_suite, SuiteConfig, SuiteReport},
    PluginLibrary,
};
use comms_plugin_api::{
    host_side::LoadedTransport,
    security::{identity::hex_encode, noise::NoiseHandshake, AllowList, Identity, LinkSecurity, NetworkKey},
    stream_transport::{encrypted::EncryptedStream, protocol},
    Capabilities, Destination, Envelope, MessageId, NodeId, PluginError,
};
use comms_tests::{artifacts, free_address, scratch_dir, write_config};
use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// Stream settings that keep refusals quick: few, short reconnection attempts.
const BASE: &str = "listen = \"127.0.0.1:0\"\nreconnect_attempts = 3\nreconnect_initial_backoff_ms = 10\n\
                    reconnect_max_backoff_ms = 50\nconnect_timeout_ms = 1000\nhandshake_timeout_ms = 2000\n";

/// How long a test waits to be sure that something is *not* delivered.
const QUIET: Duration = Duration::from_millis(800);

struct Peer {
    identity: Identity,
    key_file: PathBuf,
    id: NodeId,
}

impl Peer {
    fn new(dir: &Path, label: &str) -> Self {
        let identity = Identity::generate();
        let key_file = dir.join(format!("{label}.key"));
        identity.save_new(&key_file).unwrap();
        let id = identity.node_id(Some(label));
        Self { identity, key_file, id }
    }

    fn key(&self) -> String {
        self.identity.public_key().to_hex()
    }

    fn secret_hex(&self) -> String {
        hex_encode(&self.identity.secret_bytes())
    }

    /// A transport config with encrypted links allowing `allow`.
    fn config(&self, allow: &[&str], network_key_file: Option<&Path>) -> String {
        self.config_with(BASE, allow, network_key_file)
    }

    fn config_with(&self, base: &str, allow: &[&str], network_key_file: Option<&Path>) -> String {
        let allow: Vec<String> = allow.iter().map(|entry| format!("{entry:?}")).collect();
        let mut text = format!(
            "{base}\n[comms_security]\nlinks = \"noise\"\nkey_file = {:?}\nallow = [{}]\n",
            self.key_file,
            allow.join(", ")
        );
        if let Some(path) = network_key_file {
            text.push_str(&format!("network_key_file = {path:?}\n"));
        }
        text
    }

    fn link_security(&self, allow: AllowList) -> LinkSecurity {
        LinkSecurity::new(Identity::from_secret_bytes(&self.identity.secret_bytes()), allow, None)
    }
}

fn tcp() -> PluginLibrary {
    PluginLibrary::load(&artifacts().tcp_plugin).unwrap_or_else(|error| panic!("{error}"))
}

async fn open(library: &PluginLibrary, node: &NodeId, config: &str) -> LoadedTransport {
    library.new_transport(node, "tcp", config).await.unwrap_or_else(|error| panic!("{node}: {error}"))
}

fn envelope(from: &NodeId, to: &NodeId, text: &str) -> Envelope {
    Envelope::new(
        MessageId { high: rand::random(), low: rand::random() },
        from.clone(),
        Destination::Node(to.clone()),
        serde_json::to_vec(text).unwrap(),
    )
    .with_headers(vec![("content-type".into(), "application/json".into())])
}

/// What arrives within `limit`, stopping early once `wanted` messages are in.
async fn received(transport: &LoadedTransport, wanted: usize, limit: Duration) -> Vec<String> {
    let deadline = Instant::now() + limit;
    let mut texts = Vec::new();
    while texts.len() < wanted {
        let Some(left) = deadline.checked_duration_since(Instant::now()) else { break };
        match tokio::time::timeout(left, transport.receive(1000)).await {
            Ok(Ok(batch)) => texts.extend(batch.iter().map(|inbound| {
                serde_json::from_slice::<String>(inbound.envelope.payload.as_slice()).unwrap()
            })),
            Ok(Err(error)) => panic!("receive failed: {error}"),
            Err(_) => break,
        }
    }
    texts
}

/// Sends `text` until a send fails (the writer gave up on the peer) or 10 s pass; returns the
/// error.
async fn send_until_refused(transport: &LoadedTransport, address: &str, envelope: Envelope) -> PluginError {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Err(error) = transport.send(address, envelope.clone()).await {
            return error;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("sends to {address} kept succeeding for 10 s");
}

/// A TCP proxy in front of `target` that records what passes each way, per connection, and
/// flips one bit of the byte at offset `flip_at` of the first connection's client-to-server
/// stream.
struct Proxy {
    address: String,
    upstream: Arc<Mutex<Vec<Vec<u8>>>>,
    downstream: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl Proxy {
    async fn start(target: String, flip_at: Option<usize>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let upstream = Arc::new(Mutex::new(Vec::new()));
        let downstream = Arc::new(Mutex::new(Vec::new()));
        let (up, down) = (Arc::clone(&upstream), Arc::clone(&downstream));
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else { return };
                let Ok(server) = TcpStream::connect(&target).await else { return };
                let index = {
                    up.lock().unwrap().push(Vec::new());
                    down.lock().unwrap().push(Vec::new());
                    up.lock().unwrap().len() - 1
                };
                let flip = if index == 0 { flip_at } else { None };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(pump(client_read, server_write, Arc::clone(&up), index, flip));
                tokio::spawn(pump(server_read, client_write, Arc::clone(&down), index, None));
            }
        });
        Self { address, upstream, downstream }
    }

    fn upstream(&self, connection: usize) -> Vec<u8> {
        self.upstream.lock().unwrap().get(connection).cloned().unwrap_or_default()
    }

    fn downstream(&self, connection: usize) -> Vec<u8> {
        self.downstream.lock().unwrap().get(connection).cloned().unwrap_or_default()
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    record: Arc<Mutex<Vec<Vec<u8>>>>,
    index: usize,
    flip_at: Option<usize>,
) {
    let mut buffer = vec![0u8; 64 * 1024];
    let mut offset = 0usize;
    loop {
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(flip) = flip_at {
            if (offset..offset + n).contains(&flip) {
                buffer[flip - offset] ^= 0x01;
            }
        }
        record.lock().unwrap()[index].extend_from_slice(&buffer[..n]);
        offset += n;
        if to.write_all(&buffer[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|window| window == needle)
}

/// Whether the node at `address` closes `stream` within 5 s.
async fn closed_by_peer(stream: &mut (impl AsyncReadExt + Unpin)) -> bool {
    let mut sink = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut sink)).await.is_ok()
}

/// A hand-written dialer: a genuine Noise handshake with `security`, then a hello claiming
/// `claimed`, then one envelope. Returns the encrypted stream (the listener may close it).
async fn dial_by_hand(
    address: &str,
    security: &LinkSecurity,
    claimed: &NodeId,
    envelope: &Envelope,
) -> EncryptedStream<TcpStream> {
    use comms_plugin_api::framing::read_frame;
    let noise = comms_plugin_api::security::NoiseIdentity::new(security).unwrap();
    let mut handshake = NoiseHandshake::initiator(&noise).unwrap();
    let mut stream = TcpStream::connect(address).await.unwrap();
    let mut message = Vec::new();
    handshake.write_message(&mut message).unwrap();
    stream.write_all(&protocol::noise_frame(&message)).await.unwrap();
    let answer = read_frame(&mut stream, protocol::MAX_NOISE_SIZE).await.unwrap().unwrap();
    assert_eq!(answer[0], protocol::KIND_NOISE);
    handshake.read_message(&answer[1..]).unwrap();
    handshake.write_message(&mut message).unwrap();
    stream.write_all(&protocol::noise_frame(&message)).await.unwrap();
    let (_, transport) = handshake.into_transport().unwrap();
    let mut stream = EncryptedStream::new(stream, transport);
    let mut bytes = protocol::hello_frame(claimed);
    bytes.extend(protocol::envelope_frame(envelope, 1 << 20).unwrap());
    stream.write_all(&bytes).await.unwrap();
    stream.flush().await.unwrap();
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_peers_exchange_messages_both_ways_and_declare_encrypted_links() {
    let dir = scratch_dir("links-allowed");
    let (alice, bob) = (Peer::new(&dir, "alice"), Peer::new(&dir, "bob"));
    let tcp = tcp();
    // Bob lists Alice by her key-bound node id, Alice lists Bob by his key.
    let a = open(&tcp, &alice.id, &alice.config(&[&bob.key()], None)).await;
    let b = open(&tcp, &bob.id, &bob.config(&[alice.id.as_str()], None)).await;
    assert!(a.info().capabilities.contains(Capabilities::ENCRYPTED));
    assert!(b.info().capabilities.contains(Capabilities::ENCRYPTED));
    let plain = open(&tcp, &NodeId::new("plain"), BASE).await;
    assert!(
        !plain.info().capabilities.contains(Capabilities::ENCRYPTED),
        "plain links are not declared encrypted"
    );
    let (a_address, b_address) = (a.info().local_address.clone(), b.info().local_address.clone());

    let texts: Vec<String> = (0..200).map(|i| format!("alice to bob {i}")).collect();
    for text in &texts {
        a.send(&b_address, envelope(&alice.id, &bob.id, text)).await.unwrap();
    }
    // One large message: several encrypted records.
    let large = "x".repeat(1 << 20);
    a.send(&b_address, envelope(&alice.id, &bob.id, &large)).await.unwrap();
    let mut got = received(&b, 201, Duration::from_secs(10)).await;
    assert_eq!(got.pop().as_deref(), Some(large.as_str()), "the 1 MiB message arrives intact, last");
    assert_eq!(got, texts, "all in order");

    for i in 0..50 {
        b.send(&a_address, envelope(&bob.id, &alice.id, &format!("bob to alice {i}"))).await.unwrap();
    }
    let got = received(&a, 50, Duration::from_secs(10)).await;
    assert_eq!(got, (0..50).map(|i| format!("bob to alice {i}")).collect::<Vec<_>>());
    for transport in [a, b, plain] {
        transport.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_third_party_uds_plugin_gets_encrypted_links_too() {
    let dir = scratch_dir("links-uds");
    let (alice, bob) = (Peer::new(&dir, "alice"), Peer::new(&dir, "bob"));
    let uds = PluginLibrary::load(&artifacts().uds_plugin).unwrap();
    let base = |name: &str| format!("listen = {:?}\n", dir.join(name));
    let a =
        uds.new_transport(&alice.id, "uds", &alice.config_with(&base("a.sock"), &["*"], None)).await.unwrap();
    let b = uds
        .new_transport(&bob.id, "uds", &bob.config_with(&base("b.sock"), &[&alice.key()], None))
        .await
        .unwrap();
    assert!(b.info().capabilities.contains(Capabilities::ENCRYPTED));
    a.send(&b.info().local_address, envelope(&alice.id, &bob.id, "over a unix socket")).await.unwrap();
    assert_eq!(received(&b, 1, Duration::from_secs(5)).await, ["over a unix socket"]);
    // Over the same socket, a peer whose key Bob does not list gets nowhere.
    let carol = Peer::new(&dir, "carol");
    let c =
        uds.new_transport(&carol.id, "uds", &carol.config_with(&base("c.sock"), &["*"], None)).await.unwrap();
    c.send(&b.info().local_address, envelope(&carol.id, &bob.id, "from carol")).await.unwrap();
    assert!(received(&b, 1, QUIET).await.is_empty());
    for transport in [a, b, c] {
        let _ = transport.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wire_carries_no_plaintext_payload_node_id_or_identity_key() {
    let dir = scratch_dir("links-wire");
    let (alice, bob) = (Peer::new(&dir, "alice"), Peer::new(&dir, "bob"));
    let tcp = tcp();
    let a = open(&tcp, &alice.id, &alice.config(&["*"], None)).await;
    let b = open(&tcp, &bob.id, &bob.config(&["*"], None)).await;
    let proxy = Proxy::start(b.info().local_address.clone(), None).await;
    let marker = "confidential-marker-7f3a";
    for _ in 0..3 {
        a.send(&proxy.address, envelope(&alice.id, &bob.id, marker)).await.unwrap();
    }
    assert_eq!(received(&b, 3, Duration::from_secs(5)).await, [marker; 3]);
    let (up, down) = (proxy.upstream(0), proxy.downstream(0));
    assert!(up.len() > 300, "the proxy saw the traffic: {} bytes", up.len());
    for needle in [marker.as_bytes(), alice.id.as_str().as_bytes(), &alice.identity.public_key().0, b"COMMS"]
    {
        assert!(!contains(&up, needle), "{:?} travels in the clear", String::from_utf8_lossy(needle));
    }
    for needle in [bob.id.as_str().as_bytes(), &bob.identity.public_key().0[..], b"COMMS"] {
        assert!(!contains(&down, needle), "{:?} travels in the clear", String::from_utf8_lossy(needle));
    }
    // The same exchange on plain links shows the marker: the check above can fail.
    let (pa, pb) = (open(&tcp, &NodeId::new("pa"), BASE).await, open(&tcp, &NodeId::new("pb"), BASE).await);
    let plain_proxy = Proxy::start(pb.info().local_address.clone(), None).await;
    pa.send(&plain_proxy.address, envelope(&NodeId::new("pa"), &NodeId::new("pb"), marker)).await.unwrap();
    assert_eq!(received(&pb, 1, Duration::from_secs(5)).await, [marker]);
    assert!(contains(&plain_proxy.upstream(0), marker.as_bytes()));
    for transport in [a, b, pa, pb] {
        let _ = transport.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_and_encrypted_nodes_refuse_each_other() {
    let dir = scratch_dir("links-mixed");
    let (alice, bob) = (Peer::new(&dir, "alice"), Peer::new(&dir, "bob"));
    let tcp = tcp();
    let secure_bob = open(&tcp, &bob.id, &bob.config(&["*"], None)).await;
    let plain_alice = open(&tcp, &NodeId::new("plain-alice"), BASE).await;
    // A plaintext dialer: the secure listener closes on its hello, so its writer gives up.
    let error = send_until_refused(
        &plain_alice,
        &secure_bob.info().local_address,
        envelope(&alice.id, &bob.id, "clear"),
    )
    .await;
    assert!(error.message.contains("unreachable") || error.message.contains("closed"), "{error}");
    assert!(received(&secure_bob, 1, QUIET).await.is_empty(), "nothing from a plaintext peer is delivered");

    // A raw plaintext hello is closed at once.
    let mut raw = TcpStream::connect(&secure_bob.info().local_address).await.unwrap();
    raw.write_all(&protocol::hello_frame(&NodeId::new("plain-alice"))).await.unwrap();
    raw.write_all(&protocol::envelope_frame(&envelope(&alice.id, &bob.id, "raw"), 1 << 20).unwrap())
        .await
        .unwrap();
    assert!(closed_by_peer(&mut raw).await, "the secure listener keeps a plaintext peer open");
    assert!(received(&secure_bob, 1, QUIET).await.is_empty());

    // The other way round: an encrypted dialer and a plain listener never talk either.
    let secure_alice = open(&tcp, &alice.id, &alice.config(&["*"], None)).await;
    let plain_bob = open(&tcp, &NodeId::new("plain-bob"), BASE).await;
    let error = send_until_refused(
        &secure_alice,
        &plain_bob.info().local_address,
        envelope(&alice.id, &bob.id, "secret"),
    )
    .await;
    assert!(error.message.contains("noise"), "the error says why: {error}");
    assert!(received(&plain_bob, 1, QUIET).await.is_empty(), "nothing delivered in the clear");
    for transport in [secure_bob, plain_alice, secure_alice, plain_bob] {
        let _ = transport.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_keys_are_refused_on_both_sides_of_the_handshake() {
    let dir = scratch_dir("links-unknown");
    let (alice, bob, mallory) =
        (Peer::new(&dir, "alice"), Peer::new(&dir, "bob"), Peer::new(&dir, "mallory"));
    let tcp = tcp();
    let b = open(&tcp, &bob.id, &bob.config(&[&alice.key()], None)).await;
    let m = open(&tcp, &mallory.id, &mallory.config(&["*"], None)).await;
    // Mallory dials Bob, who does not list her key.
    send_until_refused(&m, &b.info().local_address, envelope(&mallory.id, &bob.id, "let me in")).await;
    assert!(received(&b, 1, QUIET).await.is_empty(), "nothing from an unknown key is delivered");

    // Alice dials Mallory, whom she does not list: refused at once, and the error names the key.
    let a = open(&tcp, &alice.id, &alice.config(&[&bob.key()], None)).await;
    let error =
        send_until_refused(&a, &m.info().local_address, envelope(&alice.id, &mallory.id, "hello?")).await;
    assert!(error.message.contains("not allowed") && error.message.contains(&mallory.key()), "{error}");
    assert!(received(&m, 1, QUIET).await.is_empty());

    // And Alice, who is listed, gets through.
    a.send(&b.info().local_address, envelope(&alice.id, &bob.id, "hi bob")).await.unwrap();
    assert_eq!(received(&b, 1, Duration::from_secs(5)).await, ["hi bob"]);
    for transport in [a, b, m] {
        let _ = transport.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_claiming_another_nodes_id_is_refused() {
    let dir = scratch_dir("links-impostor");
    let (alice, bob, mallory) =
        (Peer::new(&dir, "alice"), Peer::new(&dir, "bob"), Peer::new(&dir, "mallory"));
    let tcp = tcp();
    // Bob lets both Alice and Mallory in, each as herself.
    let b = open(&tcp, &bob.id, &bob.config(&[&alice.key(), &mallory.key()], None)).await;
    let address = b.info().local_address.clone();
    let security = mallory.link_security(AllowList::AnyKey);

    // Mallory, authenticated with her own key, says she is Alice.
    let mut stream =
        dial_by_hand(&address, &security, &alice.id, &envelope(&alice.id, &bob.id, "from alice, honest"))
            .await;
    assert!(closed_by_peer(&mut stream).await, "the impostor's connection stays open");
    assert!(received(&b, 1, QUIET).await.is_empty(), "the impostor's message is not delivered");
    // A bare name is no better: it is bound to no key.
    let mut stream =
        dial_by_hand(&address, &security, &NodeId::new("alice"), &envelope(&alice.id, &bob.id, "bare")).await;
    assert!(closed_by_peer(&mut stream).await);
    assert!(received(&b, 1, QUIET).await.is_empty());

    // The same hand-written dialer claiming her own id is served: the refusal above is the id's.
    let _stream =
        dial_by_hand(&address, &security, &mallory.id, &envelope(&mallory.id, &bob.id, "mallory, honest"))
            .await;
    assert_eq!(received(&b, 1, Duration::from_secs(5)).await, ["mallory, honest"]);
    b.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_handshake_and_session_are_refused() {
    let dir = scratch_dir("links-replay");
    let (alice, bob) = (Peer::new(&dir, "alice"), Peer::new(&dir, "bob"));
    let tcp = tcp();
    let a = open(&tcp, &alice.id, &alice.config(&["*"], None)).await;
    let b = open(&tcp, &bob.id, &bob.config(&[&alice.key()], None)).await;
    let proxy = Proxy::start(b.info().local_address.clone(), None).await;
    a.send(&proxy.address, envelope(&alice.id, &bob.id, "original")).await.unwrap();
    assert_eq!(received(&b, 1, Duration::from_secs(5)).await, ["original"]);
    a.close().await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let recorded = proxy.upstream(0);
    assert!(
        recorded.len() > 300,
        "handshake, hello and the envelope were recorded: {} bytes",
        recorded.len()
    );

    // Everything Alice sent, replayed on a new connection: refused, nothing delivered again.
    for attempt in 0..2 {
        let mut replay = TcpStream::connect(&b.info().local_address).await.unwrap();
        let _ = replay.write_all(&recorded).await;
        assert!(closed_by_peer(&mut replay).await, "attempt {attempt}: replay kept open");
    }
    assert!(received(&b, 1, QUIET).await.is_empty(), "a replayed session delivers nothing");
    b.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_record_closes_the_link_and_is_not_delivered() {
    let dir = scratch_dir("links-tamper");
    let (alice, bob) = (Peer::new(&dir, "alice"), Peer::new(&dir, "bob"));
    let tcp = tcp();
    let a = open(&tcp, &alice.id, &alice.config(&["*"], None)).await;
    let b = open(&tcp, &bob.id, &bob.config(&[&alice.key()], None)).await;
    // Client to server: NOISE frames of 4+1+32 and 4+1+160 bytes, then the hello record
    // (2 + hello frame + 16), then the first envelope record: flip a byte inside its ciphertext.
    let hello_record = 2 + protocol::hello_frame(&alice.id).len() + 16;
    let envelope_record = 37 + 165 + hello_record;
    let proxy = Proxy::start(b.info().local_address.clone(), Some(envelope_record + 2 + 20)).await;
    a.send(&proxy.address, envelope(&alice.id, &bob.id, "tampered in transit")).await.unwrap();
    assert!(received(&b, 1, QUIET).await.is_empty(), "a tampered record must not be delivered");
    // Bob closed that connection; Alice's next message goes over a new one, untouched.
    a.send(&proxy.address, envelope(&alice.id, &bob.id, "after")).await.unwrap();
    assert_eq!(received(&b, 1, Duration::from_secs(5)).await, ["after"]);
    // The flipped byte was inside the first envelope record's ciphertext.
    let up = proxy.upstream(0);
    let frame_end = |at: usize| at + 4 + u32::from_be_bytes(up[at..at + 4].try_into().unwrap()) as usize;
    let record_end = |at: usize| at + 2 + usize::from(u16::from_be_bytes([up[at], up[at + 1]]));
    assert_eq!(record_end(frame_end(frame_end(0))), envelope_record, "handshake and hello as computed");
    assert!(record_end(envelope_record) > envelope_record + 22, "the flip is inside the envelope record");
    assert_eq!(proxy.upstream.lock().unwrap().len(), 2, "the tampered connection was closed and replaced");
    for transport in [a, b] {
        let _ = transport.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_network_key_holders_get_in_and_others_do_not() {
    let dir = scratch_dir("links-network-key");
    let (alice, bob, carol, dave) =
        (Peer::new(&dir, "alice"), Peer::new(&dir, "bob"), Peer::new(&dir, "carol"), Peer::new(&dir, "dave"));
    let network_key = dir.join("network.key");
    NetworkKey::generate().save_new(&network_key).unwrap();
    let other_network = dir.join("other-network.key");
    NetworkKey::generate().save_new(&other_network).unwrap();
    let tcp = tcp();
    // No allow-list: the network key decides (any holder may connect).
    let b = open(&tcp, &bob.id, &bob.config(&[], Some(&network_key))).await;
    let a = open(&tcp, &alice.id, &alice.config(&[], Some(&network_key))).await;
    let c = open(&tcp, &carol.id, &carol.config(&[], Some(&other_network))).await;
    let d = open(&tcp, &dave.id, &dave.config(&["*"], None)).await;
    let address = b.info().local_address.clone();

    a.send(&address, envelope(&alice.id, &bob.id, "holder")).await.unwrap();
    assert_eq!(received(&b, 1, Duration::from_secs(5)).await, ["holder"]);
    for (transport, peer) in [(&c, &carol), (&d, &dave)] {
        send_until_refused(transport, &address, envelope(&peer.id, &bob.id, "not a holder")).await;
    }
    assert!(received(&b, 1, QUIET).await.is_empty(), "nothing from peers without the network key");
    for transport in [a, b, c, d] {
        let _ = transport.close().await;
    }
}

/// The conformance suite over encrypted links, against the plugin files as users load them.
async fn suite_with_noise_links(plugin: &Path, config_toml: &str) -> SuiteReport {
    let dir = scratch_dir("links-conformance");
    let node = Peer::new(&dir, "suite");
    let config = SuiteConfig::new(config_toml).with_noise_links(&node.key_file).unwrap();
    // Every instance shares the key; the allow-list names it, so each link is authenticated.
    assert!(config.config_toml.contains(&node.key()), "{}", config.config_toml);
    let library = PluginLibrary::load(plugin).unwrap_or_else(|error| panic!("{error}"));
    let report = run_suite(&library, &config).await;
    std::fs::remove_dir_all(&dir).unwrap();
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_conformance_suite_passes_with_encrypted_links_over_tcp_and_uds() {
    for (plugin, config) in
        [(&artifacts().tcp_plugin, "listen = \"127.0.0.1:0\"\n"), (&artifacts().uds_plugin, "")]
    {
        let report = suite_with_noise_links(plugin, config).await;
        assert!(report.passed(), "{report}");
        let info = report.info.as_ref().expect("the transport was created");
        assert!(info.capabilities.contains(Capabilities::ENCRYPTED), "{report}");
        assert_eq!(
            report.skipped_names(),
            [
                "batches_and_sends_at_once",
                "redelivery_after_reject",
                "durable_resume",
                "reliable_delivery",
                "topic_isolation",
                "topic_fan_out"
            ],
            "{report}"
        );
    }
}

/// A plugin that ignores the link security it is given (the memory bus encrypts nothing) fails
/// the suite at `create_transport`, instead of passing without encrypting anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_suite_with_encrypted_links_fails_a_plugin_that_does_not_encrypt() {
    let report = suite_with_noise_links(&artifacts().memory_plugin, "").await;
    assert!(!report.passed(), "{report}");
    let create = report.cases.iter().find(|case| case.name == "create_transport").expect("reported");
    assert!(create.to_string().contains("does not declare the capability `encrypted`"), "{create}");
}

/// `comms check --key-file` runs the suite over encrypted links, and says so.
#[test]
fn comms_check_with_a_key_file_runs_over_encrypted_links() {
    let dir = scratch_dir("links-check");
    let node = Peer::new(&dir, "check");
    let run = |plugin: &Path| {
        let output = Command::new(&artifacts().comms_bin)
            .arg("check")
            .arg(plugin)
            .arg("--key-file")
            .arg(&node.key_file)
            .output()
            .expect("run comms check");
        let text = |bytes: Vec<u8>| String::from_utf8(bytes).expect("UTF-8 output");
        (output.status.success(), text(output.stdout), text(output.stderr))
    };
    let (success, stdout, stderr) = run(&artifacts().tcp_plugin);
    assert!(success, "{stdout}\n{stderr}");
    assert!(
        stdout.lines().next().is_some_and(|line| line.ends_with("over encrypted links (noise)")),
        "{stdout}"
    );
    assert_eq!(stdout.lines().last(), Some("13 passed, 0 failed, 6 skipped"), "{stdout}");
    assert!(!stdout.contains(&node.secret_hex()) && !stderr.contains(&node.secret_hex()));

    let (success, stdout, _) = run(&artifacts().memory_plugin);
    assert!(!success, "{stdout}");
    assert!(stdout.contains("FAIL create_transport: "), "{stdout}");

    let missing = dir.join("missing.key");
    let output = Command::new(&artifacts().comms_bin)
        .arg("check")
        .arg(&artifacts().tcp_plugin)
        .arg("--key-file")
        .arg(&missing)
        .output()
        .expect("run comms check");
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains(&missing.display().to_string()), "names the key file: {stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A `comms recv` process with encrypted links, its stdout and stderr collected.
struct Receiver {
    child: std::process::Child,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

impl Receiver {
    fn start(config: &Path) -> Self {
        let mut child = Command::new(&artifacts().comms_bin)
            .args(["recv", "--config"])
            .arg(config)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let collect = |pipe: Box<dyn std::io::Read + Send>,
                       ready: Option<std::sync::mpsc::SyncSender<()>>| {
            let text = Arc::new(Mutex::new(String::new()));
            let sink = Arc::clone(&text);
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    if line.contains("transport `tcp`") {
                        if let Some(ready) = &ready {
                            let _ = ready.send(());
                        }
                    }
                    let mut sink = sink.lock().unwrap();
                    sink.push_str(&line);
                    sink.push('\n');
                }
            });
            text
        };
        let (ready, started) = std::sync::mpsc::sync_channel(1);
        let stdout = collect(Box::new(child.stdout.take().unwrap()), None);
        let stderr = collect(Box::new(child.stderr.take().unwrap()), Some(ready));
        let started = started.recv_timeout(Duration::from_secs(30));
        let receiver = Self { child, stdout, stderr };
        assert!(started.is_ok(), "comms recv did not start: {}", receiver.stderr.lock().unwrap());
        receiver
    }

    /// Waits until `stdout` has `lines` lines, then stops the process; returns stdout and stderr.
    fn finish(mut self, lines: usize) -> (String, String) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.stdout.lock().unwrap().lines().count() < lines && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = Command::new("kill").arg(self.child.id().to_string()).status();
        let _ = self.child.wait();
        std::thread::sleep(Duration::from_millis(100));
        let stdout = self.stdout.lock().unwrap().clone();
        let stderr = self.stderr.lock().unwrap().clone();
        (stdout, stderr)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_logged_with_their_reason_and_no_secret_appears_anywhere() {
    let dir = scratch_dir("links-logs");
    let (alice, bob, mallory) =
        (Peer::new(&dir, "alice"), Peer::new(&dir, "bob"), Peer::new(&dir, "mallory"));
    let network_key = NetworkKey::generate();
    let network_key_file = dir.join("network.key");
    network_key.save_new(&network_key_file).unwrap();
    let stranger = Peer::new(&dir, "stranger");
    let address = free_address();
    let config = write_config(
        &dir,
        "bob.toml",
        &format!(
            "[node]\nid = {:?}\nplugin_dirs = [{:?}]\n\n[transports.tcp]\nlisten = {address:?}\n\n\
             [transports.tcp.comms_security]\nlinks = \"noise\"\nkey_file = {:?}\nallow = [{:?}, {:?}]\n\
             network_key_file = {:?}\n",
            bob.id.as_str(),
            artifacts().plugin_dir,
            bob.key_file,
            alice.key(),
            mallory.key(),
            network_key_file,
        ),
    );
    let receiver = Receiver::start(&config);
    let tcp = tcp();

    // 1. A plaintext peer.
    let mut raw = TcpStream::connect(&address).await.unwrap();
    raw.write_all(&protocol::hello_frame(&NodeId::new("plain"))).await.unwrap();
    assert!(closed_by_peer(&mut raw).await);
    // 2. A key Bob does not list (holding the network key).
    let s = open(&tcp, &stranger.id, &stranger.config(&["*"], Some(&network_key_file))).await;
    send_until_refused(&s, &address, envelope(&stranger.id, &bob.id, "stranger")).await;
    // 3. Mallory, listed, claiming Alice's id.
    let security = LinkSecurity::new(
        Identity::from_secret_bytes(&mallory.identity.secret_bytes()),
        AllowList::AnyKey,
        Some(NetworkKey(network_key.0)),
    );
    let mut stream =
        dial_by_hand(&address, &security, &alice.id, &envelope(&alice.id, &bob.id, "impostor")).await;
    assert!(closed_by_peer(&mut stream).await);
    // 4. Alice, with the key of another network.
    let other_network = dir.join("other-network.key");
    NetworkKey::generate().save_new(&other_network).unwrap();
    let a = open(&tcp, &alice.id, &alice.config(&["*"], Some(&other_network))).await;
    send_until_refused(&a, &address, envelope(&alice.id, &bob.id, "wrong network key")).await;
    // 5. Alice as she should be.
    let a2 = open(&tcp, &alice.id, &alice.config(&["*"], Some(&network_key_file))).await;
    a2.send(&address, envelope(&alice.id, &bob.id, "legit")).await.unwrap();

    let (stdout, stderr) = receiver.finish(1);
    assert_eq!(
        stdout, "legit\n",
        "only the allowed peer's message reaches the application; stderr:\n{stderr}"
    );
    for reason in [
        "plaintext peer refused: this node requires noise links",
        &format!("peer key {} is not allowed", stranger.key()),
        &format!("peer claims node id `{}` but authenticated as key {}", alice.id, mallory.key()),
        "failed to decrypt",
    ] {
        assert!(stderr.contains(reason), "stderr lacks {reason:?}:\n{stderr}");
    }
    for secret in [
        bob.secret_hex(),
        alice.secret_hex(),
        mallory.secret_hex(),
        stranger.secret_hex(),
        hex_encode(&network_key.0),
    ] {
        assert!(!stderr.contains(&secret) && !stdout.contains(&secret), "a secret was printed:\n{stderr}");
    }
    for transport in [s, a, a2] {
        let _ = transport.close().await;
    }
}
