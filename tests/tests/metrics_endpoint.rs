//! `[metrics] listen`: a node started from its config file serves Prometheus metrics over HTTP,
//! with the TCP plugin loaded as users load it. The numbers must follow what the nodes did.

use comms_host::{Node, Received, RequestError, RequestOptions};
use comms_tests::{artifacts, scratch_dir, write_config};
use std::{net::SocketAddr, time::Duration};

/// Sends `request` to the endpoint and returns the status line and the body.
async fn http(address: SocketAddr, request: &str) -> (String, String) {
    let response = comms_tests::http(address, request).await;
    assert!(response.head.contains("Content-Length: "), "a Content-Length:\n{}", response.head);
    (response.status, response.body)
}

async fn scrape(address: SocketAddr) -> String {
    let (status, body) = http(address, "GET /metrics HTTP/1.1\r\nHost: comms\r\n\r\n").await;
    assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
    assert!(body.ends_with("# EOF\n"), "OpenMetrics text ends with # EOF:\n{body}");
    body
}

/// The value of the series `series` (name and labels exactly as encoded).
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no `{series}` in:\n{text}"))
        .parse()
        .unwrap_or_else(|error| panic!("`{series}` is not a number ({error}):\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_serves_metrics_that_follow_its_traffic_requests_and_peers() {
    let dir = scratch_dir("metrics");
    let config = write_config(
        &dir,
        "server.toml",
        &format!(
            "[node]\nid = \"server\"\nplugin_dirs = [{:?}]\nheartbeat_interval_ms = 100\n\n\
             [transports.tcp]\nlisten = \"127.0.0.1:0\"\n\n[metrics]\nlisten = \"127.0.0.1:0\"\n",
            artifacts().plugin_dir
        ),
    );
    let server = Node::from_config(&config).await.unwrap_or_else(|error| panic!("{error}"));
    let endpoint = server.metrics_address().expect("[metrics] listen starts the endpoint");
    assert_ne!(endpoint.port(), 0, "the port the system chose is reported");
    let tcp = comms_host::PluginLibrary::load(&artifacts().tcp_plugin).unwrap();
    let client = Node::builder("client")
        .liveness(Some(Duration::from_millis(100)), Duration::from_secs(2))
        .transport_library("tcp", tcp, "listen = \"127.0.0.1:0\"")
        .static_peer("server", [("tcp", server.transports()[0].local_address.as_str())])
        .build()
        .await
        .unwrap();
    assert_eq!(client.metrics_address(), None, "off unless configured");

    let before = scrape(endpoint).await;
    let received_before =
        value(&before, r#"comms_transport_messages_received_total{transport="tcp",plugin="tcp"}"#);

    const MESSAGES: usize = 40;
    for n in 0..MESSAGES {
        client.send("server", &n).await.unwrap();
    }
    for _ in 0..MESSAGES {
        server.receive::<usize>().await.unwrap().ack();
    }
    server
        .serve("echo", |request: Received<String>| async move { Ok::<_, String>(request.message) })
        .await
        .unwrap();
    client.wait_for_service("echo", Duration::from_secs(10)).await.unwrap();
    for _ in 0..3 {
        let answer: String = client.request("echo", &"hi".to_string()).await.unwrap();
        assert_eq!(answer, "hi");
    }
    let quick =
        RequestOptions { timeout: Duration::from_millis(200), attempts: 1, ..RequestOptions::default() };
    let missing = client.request_with::<_, String>("nobody.serves.this", &1, &quick).await;
    assert!(matches!(missing, Err(RequestError::NoReplica { .. })), "{missing:?}");

    let after = scrape(endpoint).await;
    let received = value(&after, r#"comms_transport_messages_received_total{transport="tcp",plugin="tcp"}"#);
    assert!(
        received - received_before >= (MESSAGES + 3) as f64,
        "the 40 messages and 3 requests are counted: {received_before} then {received}"
    );
    let bytes = value(&after, r#"comms_transport_bytes_received_total{transport="tcp",plugin="tcp"}"#);
    assert!(bytes > 0.0, "{after}");
    assert_eq!(value(&after, r#"comms_peers{status="up"}"#), 1.0, "the client is up:\n{after}");
    assert_eq!(value(&after, "comms_inbox_depth"), 0.0, "every message was taken:\n{after}");
    assert_eq!(value(&after, "comms_requests_being_served"), 0.0, "{after}");

    // The caller's side: one series per service and outcome.
    let calls = client.metrics_text();
    assert_eq!(
        value(&calls, r#"comms_request_duration_seconds_count{service="echo",outcome="ok"}"#),
        3.0,
        "{calls}"
    );
    let missed = r#"comms_request_duration_seconds_count{service="nobody.serves.this",outcome="error"}"#;
    assert_eq!(value(&calls, missed), 1.0, "{calls}");
    let sent = value(&calls, r#"comms_transport_messages_sent_total{transport="tcp",plugin="tcp"}"#);
    assert!(sent >= (MESSAGES + 3) as f64, "{calls}");

    // Anything but `GET /metrics` gets a clear status, and the endpoint keeps serving.
    let (status, _) = http(endpoint, "GET /other HTTP/1.1\r\n\r\n").await;
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    let (status, _) = http(endpoint, "POST /metrics HTTP/1.1\r\n\r\n").await;
    assert_eq!(status, "HTTP/1.1 405 Method Not Allowed");
    let (status, body) = http(endpoint, "hello\r\n\r\n").await;
    assert_eq!(status, "HTTP/1.1 400 Bad Request", "{body}");
    let oversized = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(10_000));
    let (status, body) = http(endpoint, &oversized).await;
    assert_eq!(status, "HTTP/1.1 400 Bad Request", "{body}");
    scrape(endpoint).await;

    client.close().await.unwrap();
    server.close().await.unwrap();
    // The endpoint stops with its node.
    let started = tokio::time::Instant::now();
    while tokio::net::TcpStream::connect(endpoint).await.is_ok() {
        assert!(started.elapsed() < Duration::from_secs(5), "the endpoint outlived its node");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_metrics_port_in_use_fails_the_build_naming_the_key() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap();
    let tcp = comms_host::PluginLibrary::load(&artifacts().tcp_plugin).unwrap();
    let error = Node::builder("busy")
        .transport_library("tcp", tcp, "listen = \"127.0.0.1:0\"")
        .metrics_listen(address)
        .build()
        .await
        .expect_err("the port is taken");
    let text = error.to_string();
    assert!(text.contains("metrics.listen") && text.contains(&address.to_string()), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settlements_are_counted_by_outcome_on_an_acknowledging_transport() {
    let dir = scratch_dir("metrics-settled");
    let database = dir.join("comms.db");
    // SQLite acknowledges: each message the node takes is settled back to the transport.
    let table = format!("database = {database:?}\npoll_max_ms = 20\nlease_ms = 60000");
    let sqlite = comms_host::PluginLibrary::load(&artifacts().sqlite_plugin).unwrap();
    let node = |id: &'static str, peer: &'static str| {
        Node::builder(id)
            .liveness(None, Duration::from_secs(5))
            .transport_library("sqlite", sqlite.clone(), &table)
            .static_peer(peer, [("sqlite", peer)])
            .build()
    };
    let receiver = node("receiver", "sender").await.unwrap();
    let sender = node("sender", "receiver").await.unwrap();
    for n in 0..5u32 {
        sender.send("receiver", &n).await.unwrap();
    }
    // 0, 2, 3 accepted; 1 given back once, then accepted; 4 refused for good.
    let (mut requeued_once, mut rejected) = (false, false);
    let mut accepted = 0;
    // Until all five are done: the requeued 1 may come back before 4 (or after it).
    while accepted < 4 || !rejected {
        let mut message = receiver.receive::<u32>().await.unwrap();
        match message.message {
            1 if !requeued_once => {
                requeued_once = true;
                message.nack();
            }
            4 => {
                rejected = true;
                message.reject();
            }
            _ => {
                accepted += 1;
                message.ack();
            }
        }
    }
    let settled = |outcome: &str| {
        let series = format!(
            r#"comms_transport_settled_total{{transport="sqlite",plugin="sqlite",outcome="{outcome}"}}"#
        );
        value(&receiver.metrics_text(), &series)
    };
    // Every delivery the transport made is settled once, framework messages (the sender's
    // hello) included: accepted + requeued + rejected = received, once the last settlement is in.
    let received = || {
        value(
            &receiver.metrics_text(),
            r#"comms_transport_messages_received_total{transport="sqlite",plugin="sqlite"}"#,
        )
    };
    let all_settled = || settled("accepted") + settled("requeued") + settled("rejected");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while all_settled() < received() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(all_settled(), received(), "{}", receiver.metrics_text());
    assert_eq!(settled("requeued"), 1.0);
    assert_eq!(settled("rejected"), 1.0);
    assert!(settled("accepted") >= 4.0, "the four messages handled");
    let status = receiver.status();
    let transport = &status.transports[0];
    assert_eq!(
        (transport.settled_accepted as f64, transport.settled_requeued, transport.settled_rejected),
        (settled("accepted"), 1, 1),
        "the status reports the same counts"
    );
    sender.close().await.unwrap();
    receiver.close().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
