//! TLS to the brokers: `rediss://` and `amqps://` URLs with a private CA (`ca_file`), against
//! the real Redis (127.0.0.1:6379) and RabbitMQ (127.0.0.1:5672) of this machine, reached
//! through a TLS-terminating proxy that this test runs: it holds a certificate for `localhost`
//! signed by a CA made here (rcgen), and forwards the decrypted bytes to the broker.
//!
//! Nodes with the CA exchange messages through it (and the proxy counts the TLS sessions it
//! carried); a node without the CA, with another CA, or naming the broker by a host name the
//! certificate does not hold, is refused at once with an error that says TLS verification
//! failed and never shows the password; `info()` says `ENCRYPTED` for TLS and not for plain.

use comms_host::{
    conformance::{cases, run_suite, SuiteConfig},
    Node, PluginLibrary, Received,
};
use comms_plugin_api::{Capabilities, ErrorCode, NodeId, PluginError};
use comms_tests::{artifacts, broker_available, scratch_dir};
use serde::{Deserialize, Serialize};
use std::{
    path::Path,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};
use tls_ca::TestCa;
use tokio::net::{TcpListener, TcpStream};

#[path = "support/tls_ca.rs"]
mod tls_ca;

const REDIS: &str = "127.0.0.1:6379";
const RABBITMQ: &str = "127.0.0.1:5672";
const WAIT: Duration = Duration::from_secs(10);
/// A password that must never show in an error.
const PASSWORD: &str = "pw-n3ver-shown";

// ---------------------------------------------------------------------------------------------
// A private CA and a TLS-terminating proxy in front of a broker.

/// Accepts TLS on 127.0.0.1 (any port), forwards the plaintext to the broker at `upstream`.
struct TlsProxy {
    port: u16,
    /// TLS handshakes completed (each is a connection that then carried broker traffic).
    sessions: Arc<AtomicUsize>,
    /// TLS handshakes that failed (the client refused the certificate, or spoke no TLS).
    failed_handshakes: Arc<AtomicUsize>,
    /// Plaintext bytes forwarded to and from the broker, after decryption.
    bytes: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl TlsProxy {
    async fn start(ca: &TestCa, upstream: &'static str) -> Self {
        Self::start_with(ca, upstream, false).await
    }

    /// With `client_certificates`, only clients presenting a certificate signed by `ca` get
    /// through (mutual TLS).
    async fn start_with(ca: &TestCa, upstream: &'static str, client_certificates: bool) -> Self {
        let (chain, key) = ca.localhost();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = if client_certificates {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(ca.issuer.der().clone()).unwrap();
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .unwrap();
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let config = builder.with_single_cert(chain, key).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let sessions = Arc::new(AtomicUsize::new(0));
        let failed_handshakes = Arc::new(AtomicUsize::new(0));
        let bytes = Arc::new(AtomicU64::new(0));
        let (counted, failed, forwarded) = (sessions.clone(), failed_handshakes.clone(), bytes.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else { continue };
                let (acceptor, counted, failed, forwarded) =
                    (acceptor.clone(), counted.clone(), failed.clone(), forwarded.clone());
                tokio::spawn(async move {
                    let tls = match acceptor.accept(client).await {
                        Ok(tls) => tls,
                        Err(_) => {
                            failed.fetch_add(1, Ordering::SeqCst);
                            return;
                        }
                    };
                    counted.fetch_add(1, Ordering::SeqCst);
                    let Ok(broker) = TcpStream::connect(upstream).await else { return };
                    let (from_client, to_client) = tokio::io::split(tls);
                    let (from_broker, to_broker) = broker.into_split();
                    tokio::join!(
                        pump(from_client, to_broker, &forwarded),
                        pump(from_broker, to_client, &forwarded)
                    );
                });
            }
        });
        Self { port, sessions, failed_handshakes, bytes, task }
    }

    fn sessions(&self) -> usize {
        self.sessions.load(Ordering::SeqCst)
    }

    fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::SeqCst)
    }

    fn failed_handshakes(&self) -> usize {
        self.failed_handshakes.load(Ordering::SeqCst)
    }
}

/// Copies `from` to `to` until either ends, counting the bytes as they pass.
async fn pump(
    mut from: impl tokio::io::AsyncRead + Unpin,
    mut to: impl tokio::io::AsyncWrite + Unpin,
    forwarded: &AtomicU64,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if to.write_all(&buffer[..n]).await.is_err() {
            break;
        }
        forwarded.fetch_add(n as u64, Ordering::SeqCst);
    }
    let _ = to.shutdown().await;
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// TOML string literal of a path.
fn toml_path(path: &Path) -> String {
    format!("{:?}", path.display().to_string())
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Note {
    n: u32,
    text: String,
}

async fn until(what: &str, condition: impl Fn() -> bool) {
    let started = Instant::now();
    while !condition() {
        assert!(started.elapsed() < WAIT, "{what} did not happen within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Request / response, 30 point-to-point messages in order, and a topic message, from
/// `client` to `server` (which are connected only through the TLS proxy).
async fn exchange(server: &Node, client: &Node, server_id: &str, topic: &str) {
    server
        .serve("tls.echo", |request: Received<Note>| async move { Ok::<_, String>(request.message.text) })
        .await
        .unwrap();
    until("the client learning of the server's service", || {
        client.peers().iter().any(|peer| peer.record.services.iter().any(|s| s == "tls.echo"))
    })
    .await;
    for n in 0..5 {
        let note = Note { n, text: format!("over TLS {n}") };
        let answer: String =
            tokio::time::timeout(WAIT, client.request("tls.echo", &note)).await.unwrap().unwrap();
        assert_eq!(answer, note.text);
    }
    for n in 0..30 {
        client.send(server_id, &Note { n, text: "direct".into() }).await.unwrap();
    }
    for n in 0..30 {
        let mut received = tokio::time::timeout(WAIT, server.receive::<Note>()).await.unwrap().unwrap();
        received.ack();
        assert_eq!(received.message, Note { n, text: "direct".into() }, "every message, in order");
    }
    let mut subscription = server.subscribe::<Note>(&format!("{topic}.*")).await.unwrap();
    // A subscription reaches the broker asynchronously on some transports: publish until one arrives.
    let published = Note { n: 99, text: "published".into() };
    let received = tokio::time::timeout(WAIT, async {
        loop {
            client.publish(&format!("{topic}.news"), &published).await.unwrap();
            if let Ok(Some(Ok(mut received))) =
                tokio::time::timeout(Duration::from_millis(200), subscription.next()).await
            {
                received.ack();
                return received.message;
            }
        }
    })
    .await
    .expect("a topic message through the proxy");
    assert_eq!(received, published);
}

/// Asserts `error` is the refusal of a certificate: says TLS verification failed, names the
/// URL with its password redacted, never the password, and is not retryable.
fn assert_tls_refusal(error: &PluginError, redacted_url: &str) {
    assert_eq!(error.code, ErrorCode::UNREACHABLE, "{error}");
    assert!(!error.retryable, "a certificate failure is not worth retrying: {error}");
    assert!(error.message.contains("TLS verification failed"), "{error}");
    assert!(error.message.contains(redacted_url), "the URL, redacted: {error}");
    assert!(!error.message.contains(PASSWORD), "the password leaked: {error}");
}

/// Runs `open` (which must fail), checks that it failed fast (no retries with the long
/// backoff the configs set) and that the proxy saw exactly one refused TLS handshake.
async fn refused<T>(
    proxy: &TlsProxy,
    open: impl std::future::Future<Output = Result<T, PluginError>>,
) -> PluginError {
    let before = proxy.failed_handshakes();
    let started = Instant::now();
    let Err(error) = open.await else { panic!("the connection was accepted") };
    assert!(started.elapsed() < Duration::from_secs(5), "retried for {:?}: {error}", started.elapsed());
    until("the proxy seeing the refused handshake", || proxy.failed_handshakes() > before).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(proxy.failed_handshakes(), before + 1, "one attempt only: {error}");
    error
}

// ---------------------------------------------------------------------------------------------
// Redis.

fn redis_library() -> PluginLibrary {
    PluginLibrary::load(&artifacts().redis_plugin).unwrap_or_else(|error| panic!("{error}"))
}

fn redis_prefix(test: &str) -> String {
    format!("comms-test-{}-{:06x}-{test}", std::process::id(), rand::random::<u32>() & 0xff_ffff)
}

/// The `url` and `ca_file` lines of a TLS connection to `proxy`.
fn rediss(proxy: &TlsProxy, ca_file: &Path) -> String {
    format!("url = \"rediss://localhost:{}\"\nca_file = {}\n", proxy.port, toml_path(ca_file))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_nodes_exchange_messages_over_rediss_with_a_private_ca() {
    if !broker_available("Redis", REDIS) {
        return;
    }
    let dir = scratch_dir("redis-tls-nodes");
    let ca = TestCa::new("comms test CA");
    let ca_file = ca.write_pem(&dir, "ca.pem");
    let proxy = TlsProxy::start(&ca, REDIS).await;
    let prefix = redis_prefix("tls");
    let library = redis_library();
    let tls = rediss(&proxy, &ca_file);
    let node = |id: &'static str| {
        let library = library.clone();
        let transport = format!("{tls}prefix = \"{prefix}\"\nblock_ms = 200\n");
        let discovery = format!("{tls}prefix = \"{prefix}\"\nttl_ms = 1500\nheartbeat_ms = 200\n");
        async move {
            Node::builder(id)
                .liveness(Some(Duration::from_millis(200)), Duration::from_secs(3))
                .transport_library("redis", library.clone(), &transport)
                .discovery_library(library, &discovery)
                .build()
                .await
                .unwrap_or_else(|error| panic!("node {id}: {error}"))
        }
    };
    let server = node("server").await;
    let client = node("client").await;
    for node in [&server, &client] {
        let summary = &node.transports()[0];
        assert!(summary.capabilities.contains(Capabilities::ENCRYPTED), "{summary:?}");
    }
    exchange(&server, &client, "server", &format!("{prefix}-topic")).await;

    // Each node holds several connections (commands, blocking reads, pub/sub, discovery): all
    // went through the proxy's TLS, and the broker traffic with them.
    assert!(proxy.sessions() >= 4, "TLS sessions through the proxy: {}", proxy.sessions());
    // At least the 30 messages of about 100 bytes each (plus requests, headers and protocol).
    assert!(proxy.bytes() > 30 * 100, "bytes through the proxy: {}", proxy.bytes());
    assert_eq!(proxy.failed_handshakes(), 0);
    server.close().await.unwrap();
    client.close().await.unwrap();
    comms_tests::delete_redis_keys(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_without_the_ca_with_another_ca_or_another_host_name_is_refused_at_once() {
    if !broker_available("Redis", REDIS) {
        return;
    }
    let dir = scratch_dir("redis-tls-refused");
    let ca = TestCa::new("comms test CA");
    let ca_file = ca.write_pem(&dir, "ca.pem");
    let other_ca_file = TestCa::new("another CA").write_pem(&dir, "other-ca.pem");
    let proxy = TlsProxy::start(&ca, REDIS).await;
    let library = redis_library();
    let port = proxy.port;
    // Long delays: a retried certificate failure would take more than 15 s.
    let slow = "connect_attempts = 5\nconnect_backoff_ms = 1000\n";
    let cases = [
        // The system's roots do not hold the test CA.
        (format!("rediss://user:{PASSWORD}@localhost:{port}"), None, "UnknownIssuer"),
        (format!("rediss://user:{PASSWORD}@localhost:{port}"), Some(&other_ca_file), "UnknownIssuer"),
        // The right CA, but the certificate names `localhost`, not 127.0.0.1.
        (format!("rediss://user:{PASSWORD}@127.0.0.1:{port}"), Some(&ca_file), "not valid for name"),
    ];
    for (url, ca, cause) in cases {
        let ca_line = ca.map(|path| format!("ca_file = {}\n", toml_path(path))).unwrap_or_default();
        let config = format!("url = \"{url}\"\n{ca_line}{slow}");
        let error = refused(&proxy, library.new_transport(&NodeId::new("refused"), "redis", &config)).await;
        let redacted = url.replace(PASSWORD, "***");
        assert_tls_refusal(&error, &redacted);
        assert!(error.message.contains(cause), "{error}");
        let error = refused(&proxy, library.new_discovery(&NodeId::new("refused"), "redis", &config)).await;
        assert_tls_refusal(&error, &redacted);
    }
    assert_eq!(proxy.sessions(), 0, "no connection got through");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_declares_encrypted_for_rediss_only_and_names_an_unreadable_ca_file() {
    if !broker_available("Redis", REDIS) {
        return;
    }
    let dir = scratch_dir("redis-tls-info");
    let ca = TestCa::new("comms test CA");
    let ca_file = ca.write_pem(&dir, "ca.pem");
    let proxy = TlsProxy::start(&ca, REDIS).await;
    let library = redis_library();
    let prefix = redis_prefix("tls-info");
    let tls = library
        .new_transport(
            &NodeId::new("tls"),
            "redis",
            &format!("{}prefix = \"{prefix}\"", rediss(&proxy, &ca_file)),
        )
        .await
        .unwrap_or_else(|error| panic!("{error}"));
    assert!(tls.info().capabilities.contains(Capabilities::ENCRYPTED), "{:?}", tls.info());
    let plain = library
        .new_transport(
            &NodeId::new("plain"),
            "redis",
            &format!("url = \"redis://{REDIS}\"\nprefix = \"{prefix}\""),
        )
        .await
        .unwrap_or_else(|error| panic!("{error}"));
    assert!(!plain.info().capabilities.contains(Capabilities::ENCRYPTED), "{:?}", plain.info());
    assert!(proxy.sessions() >= 1);
    tls.close().await.unwrap();
    plain.close().await.unwrap();
    comms_tests::delete_redis_keys(&prefix).await;

    let missing = dir.join("no-such-ca.pem");
    let config = format!("url = \"rediss://localhost:{}\"\nca_file = {}", proxy.port, toml_path(&missing));
    let error = library.new_transport(&NodeId::new("x"), "redis", &config).await.unwrap_err();
    assert_eq!(error.code, ErrorCode::INVALID_CONFIG, "{error}");
    assert!(error.message.contains("key `ca_file`") && error.message.contains("no-such-ca.pem"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_with_client_certificates_needs_them() {
    if !broker_available("Redis", REDIS) {
        return;
    }
    let dir = scratch_dir("redis-tls-client-cert");
    let ca = TestCa::new("comms test CA");
    let ca_file = ca.write_pem(&dir, "ca.pem");
    let (cert, key) = ca.write_client_files(&dir);
    let proxy = TlsProxy::start_with(&ca, REDIS, true).await;
    let library = redis_library();
    let prefix = redis_prefix("tls-client-cert");
    let base = format!("{}prefix = \"{prefix}\"\n", rediss(&proxy, &ca_file));
    let with_cert =
        format!("{base}client_cert_file = {}\nclient_key_file = {}\n", toml_path(&cert), toml_path(&key));
    let transport = library
        .new_transport(&NodeId::new("mtls"), "redis", &with_cert)
        .await
        .unwrap_or_else(|error| panic!("{error}"));
    assert!(transport.info().capabilities.contains(Capabilities::ENCRYPTED));
    assert!(proxy.sessions() >= 1);
    transport.close().await.unwrap();
    comms_tests::delete_redis_keys(&prefix).await;

    let started = Instant::now();
    let error = library
        .new_transport(&NodeId::new("mtls"), "redis", &format!("{base}connect_backoff_ms = 1000"))
        .await;
    let error = error.expect_err("refused without a client certificate");
    assert!(started.elapsed() < Duration::from_secs(5), "retried: {error}");
    assert!(error.message.contains("TLS verification failed"), "{error}");
    assert!(error.message.contains("refused this client's certificate"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_conformance_suite_passes_over_rediss() {
    if !broker_available("Redis", REDIS) {
        return;
    }
    let dir = scratch_dir("redis-tls-conformance");
    let ca = TestCa::new("comms test CA");
    let ca_file = ca.write_pem(&dir, "ca.pem");
    let proxy = TlsProxy::start(&ca, REDIS).await;
    let prefix = redis_prefix("tls-conformance");
    let config =
        format!("{}prefix = \"{prefix}\"\nclaim_idle_ms = 2000\nblock_ms = 200\n", rediss(&proxy, &ca_file));
    let report = run_suite(&redis_library(), &SuiteConfig::new(config)).await;
    print!("{report}");
    comms_tests::delete_redis_keys(&prefix).await;
    assert!(report.passed(), "{report}");
    assert_eq!(report.cases.len(), cases().len(), "{report}");
    assert!(proxy.sessions() > 0);
}

// ---------------------------------------------------------------------------------------------
// RabbitMQ.

fn amqp_library() -> PluginLibrary {
    PluginLibrary::load(&artifacts().amqp_plugin).unwrap_or_else(|error| panic!("{error}"))
}

fn amqps(proxy: &TlsProxy, ca_file: &Path) -> String {
    format!("url = \"amqps://guest:guest@localhost:{}/%2f\"\nca_file = {}\n", proxy.port, toml_path(ca_file))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_nodes_exchange_messages_over_amqps_with_a_private_ca() {
    if !broker_available("RabbitMQ", RABBITMQ) {
        return;
    }
    let dir = scratch_dir("amqp-tls-nodes");
    let ca = TestCa::new("comms test CA");
    let ca_file = ca.write_pem(&dir, "ca.pem");
    let proxy = TlsProxy::start(&ca, RABBITMQ).await;
    let library = amqp_library();
    let tls = amqps(&proxy, &ca_file);
    let run = format!("amqp-tls-{}-{:06x}", std::process::id(), rand::random::<u32>() & 0xff_ffff);
    let (server_id, client_id) = (format!("{run}-server"), format!("{run}-client"));
    let node = |id: String| {
        let library = library.clone();
        let transport = format!("{tls}inbox_expires_ms = 60000\n");
        let discovery = format!("{tls}heartbeat_interval_ms = 200\n");
        async move {
            Node::builder(id.as_str())
                .liveness(Some(Duration::from_millis(200)), Duration::from_secs(3))
                .transport_library("amqp", library.clone(), &transport)
                .discovery_library(library, &discovery)
                .build()
                .await
                .unwrap_or_else(|error| panic!("node {id}: {error}"))
        }
    };
    let server = node(server_id.clone()).await;
    let client = node(client_id).await;
    for node in [&server, &client] {
        let summary = &node.transports()[0];
        assert!(summary.capabilities.contains(Capabilities::ENCRYPTED), "{summary:?}");
    }
    exchange(&server, &client, &server_id, &run).await;
    // A transport and a discovery connection per node.
    assert!(proxy.sessions() >= 4, "TLS sessions through the proxy: {}", proxy.sessions());
    // At least the 30 messages of about 100 bytes each (plus requests, headers and protocol).
    assert!(proxy.bytes() > 30 * 100, "bytes through the proxy: {}", proxy.bytes());
    assert_eq!(proxy.failed_handshakes(), 0);
    server.close().await.unwrap();
    client.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_without_the_ca_with_another_ca_or_another_host_name_is_refused_at_once() {
    if !broker_available("RabbitMQ", RABBITMQ) {
        return;
    }
    let dir = scratch_dir("amqp-tls-refused");
    let ca = TestCa::new("comms test CA");
    let ca_file = ca.write_pem(&dir, "ca.pem");
    let other_ca_file = TestCa::new("another CA").write_pem(&dir, "other-ca.pem");
    let proxy = TlsProxy::start(&ca, RABBITMQ).await;
    let library = amqp_library();
    let port = proxy.port;
    // Long delays: a retried certificate failure would take more than 15 s.
    let slow = "connect_attempts = 5\nreconnect_initial_delay_ms = 1000\n";
    let cases = [
        // The bundled roots do not hold the test CA.
        (format!("amqps://guest:{PASSWORD}@localhost:{port}/%2f"), None, "UnknownIssuer"),
        (format!("amqps://guest:{PASSWORD}@localhost:{port}/%2f"), Some(&other_ca_file), "UnknownIssuer"),
        // The right CA, but the certificate names `localhost`, not 127.0.0.1.
        (format!("amqps://guest:{PASSWORD}@127.0.0.1:{port}/%2f"), Some(&ca_file), "not valid for name"),
    ];
    for (url, ca, cause) in cases {
        let ca_line = ca.map(|path| format!("ca_file = {}\n", toml_path(path))).unwrap_or_default();
        let config = format!("url = \"{url}\"\n{ca_line}{slow}");
        let error = refused(&proxy, library.new_transport(&NodeId::new("refused"), "amqp", &config)).await;
        let redacted = url.replace(PASSWORD, "***");
        assert_tls_refusal(&error, &redacted);
        assert!(error.message.contains(cause), "{error}");
        let error = refused(&proxy, library.new_discovery(&NodeId::new("refused"), "amqp", &config)).await;
        assert_tls_refusal(&error, &redacted);
    }
    assert_eq!(proxy.sessions(), 0, "no connection got through");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_declares_encrypted_for_amqps_only_presents_client_certificates_and_names_an_unreadable_ca_file()
{
    if !broker_available("RabbitMQ", RABBITMQ) {
        return;
    }
    let dir = scratch_dir("amqp-tls-info");
    let ca = TestCa::new("comms test CA");
    let ca_file = ca.write_pem(&dir, "ca.pem");
    let proxy = TlsProxy::start(&ca, RABBITMQ).await;
    let library = amqp_library();
    let id = format!("amqp-tls-info-{}", std::process::id());
    let config = format!("{}inbox_expires_ms = 60000", amqps(&proxy, &ca_file));
    let tls =
        library.new_transport(&NodeId::new(&id), "amqp", &config).await.unwrap_or_else(|e| panic!("{e}"));
    assert!(tls.info().capabilities.contains(Capabilities::ENCRYPTED), "{:?}", tls.info());
    let plain = format!("url = \"amqp://guest:guest@{RABBITMQ}/%2f\"\ninbox_expires_ms = 60000");
    let plain =
        library.new_transport(&NodeId::new(&id), "amqp", &plain).await.unwrap_or_else(|e| panic!("{e}"));
    assert!(!plain.info().capabilities.contains(Capabilities::ENCRYPTED), "{:?}", plain.info());
    assert!(proxy.sessions() >= 1);
    tls.close().await.unwrap();
    plain.close().await.unwrap();

    // Mutual TLS: a client certificate gets through a proxy that requires one.
    let (cert, key) = ca.write_client_files(&dir);
    let mutual = TlsProxy::start_with(&ca, RABBITMQ, true).await;
    let config = format!(
        "{}inbox_expires_ms = 60000\nclient_cert_file = {}\nclient_key_file = {}",
        amqps(&mutual, &ca_file),
        toml_path(&cert),
        toml_path(&key)
    );
    let tls =
        library.new_transport(&NodeId::new(&id), "amqp", &config).await.unwrap_or_else(|e| panic!("{e}"));
    assert!(mutual.sessions() >= 1);
    tls.close().await.unwrap();

    let missing = dir.join("no-such-ca.pem");
    let config = format!("url = \"amqps://localhost:{}/%2f\"\nca_file = {}", proxy.port, toml_path(&missing));
    let error = library.new_transport(&NodeId::new("x"), "amqp", &config).await.unwrap_err();
    assert_eq!(error.code, ErrorCode::INVALID_CONFIG, "{error}");
    assert!(error.message.contains("key `ca_file`") && error.message.contains("no-such-ca.pem"), "{error}");
}
