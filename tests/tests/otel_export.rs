//! Spans exported over OTLP (`comms_host::telemetry`, cargo feature `otel`) to a collector,
//! here a small OTLP/HTTP receiver that decodes what it is sent.
//!
//! An application span `app.work` asks `front` for `orders`; `front`'s handler asks `server`, a
//! separate `comms run`-style process (`comms echo-service`) that exports through the standard
//! `OTEL_*` variables. Every span lands in one trace, each the child of the one before it, across
//! the process boundary: `app.work` → `comms.request orders` (client) → `comms.handle` (server)
//! → `comms.request echo` → `comms.handle` in the other process.

use comms_host::{telemetry::OtlpTracing, Node, PluginLibrary, Received, RequestOptions};
use comms_tests::{artifacts, free_address, scratch_dir, write_config, KillOnDrop};
use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    common::v1::any_value::Value,
    trace::v1::{span::SpanKind, Span},
};
use prost::Message;
use std::{
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    sync::Notify,
};
use tracing::Instrument;
use tracing_subscriber::prelude::*;

/// One exported span with the `service.name` of the process that sent it.
#[derive(Debug, Clone)]
struct Exported {
    process: String,
    span: Span,
}

impl Exported {
    fn attribute(&self, key: &str) -> Option<String> {
        let value =
            self.span.attributes.iter().find(|pair| pair.key == key)?.value.as_ref()?.value.as_ref()?;
        match value {
            Value::StringValue(text) => Some(text.clone()),
            other => Some(format!("{other:?}")),
        }
    }
}

/// What the collector was sent: the spans, and each request's line and content type.
#[derive(Default)]
struct Collected {
    spans: Mutex<Vec<Exported>>,
    requests: Mutex<Vec<(String, String)>>,
    arrived: Notify,
}

impl Collected {
    /// Waits (at most 30 s) until a span satisfies `found`.
    async fn wait_for(&self, what: &str, found: impl Fn(&Exported) -> bool) -> Exported {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let arrived = self.arrived.notified();
            if let Some(span) = self.spans.lock().unwrap().iter().find(|span| found(span)) {
                return span.clone();
            }
            let waited = tokio::time::timeout_at(deadline, arrived).await;
            assert!(waited.is_ok(), "no {what} was exported in 30 s: {:#?}", self.spans.lock().unwrap());
        }
    }
}

/// An OTLP/HTTP receiver: takes each POST, decodes its `ExportTraceServiceRequest`, answers 200.
async fn start_collector() -> (String, Arc<Collected>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let collected = Arc::new(Collected::default());
    let shared = Arc::clone(&collected);
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            let collected = Arc::clone(&shared);
            tokio::spawn(async move {
                let mut received = Vec::new();
                let mut buffer = [0u8; 8192];
                let (head, body_start) = loop {
                    let read = stream.read(&mut buffer).await.unwrap();
                    assert!(read > 0, "the exporter closed before its request was complete");
                    received.extend_from_slice(&buffer[..read]);
                    if let Some(end) = received.windows(4).position(|window| window == b"\r\n\r\n") {
                        break (String::from_utf8(received[..end].to_vec()).unwrap(), end + 4);
                    }
                };
                let header = |name: &str| {
                    head.lines().find_map(|line| {
                        let (key, value) = line.split_once(':')?;
                        key.trim().eq_ignore_ascii_case(name).then(|| value.trim().to_string())
                    })
                };
                let length: usize = header("content-length").expect("a Content-Length").parse().unwrap();
                while received.len() < body_start + length {
                    let read = stream.read(&mut buffer).await.unwrap();
                    assert!(read > 0, "the body was cut short");
                    received.extend_from_slice(&buffer[..read]);
                }
                let export = ExportTraceServiceRequest::decode(&received[body_start..body_start + length])
                    .expect("an OTLP protobuf export request");
                let request_line = head.lines().next().unwrap_or_default().to_string();
                collected
                    .requests
                    .lock()
                    .unwrap()
                    .push((request_line, header("content-type").unwrap_or_default()));
                for resource_spans in export.resource_spans {
                    let process = resource_spans
                        .resource
                        .iter()
                        .flat_map(|resource| &resource.attributes)
                        .find(|pair| pair.key == "service.name")
                        .and_then(|pair| match pair.value.as_ref()?.value.as_ref()? {
                            Value::StringValue(name) => Some(name.clone()),
                            _ => None,
                        })
                        .unwrap_or_default();
                    let spans = resource_spans.scope_spans.into_iter().flat_map(|scope| scope.spans);
                    collected
                        .spans
                        .lock()
                        .unwrap()
                        .extend(spans.map(|span| Exported { process: process.clone(), span }));
                }
                collected.arrived.notify_waiters();
                let answer =
                    "HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\n\r\n";
                stream.write_all(answer.as_bytes()).await.unwrap();
            });
        }
    });
    (format!("http://{address}"), collected)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_traced_across_two_processes_is_exported_as_one_linked_trace() {
    let (collector, collected) = start_collector().await;

    // The other process: `comms echo-service`, exporting through the standard variables.
    let dir = scratch_dir("otel-export");
    let server_address = free_address();
    let server_config = write_config(
        &dir,
        "server.toml",
        &format!(
            "[node]\nid = \"server\"\nplugin_dirs = [{:?}]\nheartbeat_interval_ms = 100\n\n\
             [transports.tcp]\nlisten = {server_address:?}\n",
            artifacts().plugin_dir
        ),
    );
    let mut command = std::process::Command::new(&artifacts().comms_bin);
    command
        .args(["echo-service", "--service", "echo", "--config"])
        .arg(&server_config)
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &collector)
        .env("OTEL_SERVICE_NAME", "otel-test-server")
        .env("OTEL_BSP_SCHEDULE_DELAY", "100");
    let _server = KillOnDrop(comms_tests::start_and_wait_for(command, "serving `echo`"));

    // This process: the application installs the exporter's layer in its own subscriber.
    let export = OtlpTracing::to_endpoint(&format!("{collector}/v1/traces"), "otel-test-app").unwrap();
    tracing_subscriber::registry()
        .with(export.layer().with_filter(tracing_subscriber::filter::LevelFilter::INFO))
        .init();

    let tcp = PluginLibrary::load(&artifacts().tcp_plugin).unwrap();
    let liveness = (Some(Duration::from_millis(100)), Duration::from_secs(2));
    let front = Node::builder("front")
        .liveness(liveness.0, liveness.1)
        .transport_library("tcp", tcp.clone(), "listen = \"127.0.0.1:0\"")
        .static_peer("server", [("tcp", server_address.as_str())])
        .build()
        .await
        .unwrap();
    let caller = front.clone();
    front
        .serve("orders", move |request: Received<String>| {
            let caller = caller.clone();
            async move {
                let options = RequestOptions::default();
                caller
                    .request_node::<_, String>("server", "echo", &request.message, &options)
                    .await
                    .map_err(|e| e.to_string())
            }
        })
        .await
        .unwrap();
    let client = Node::builder("client")
        .liveness(liveness.0, liveness.1)
        .transport_library("tcp", tcp, "listen = \"127.0.0.1:0\"")
        .static_peer("front", [("tcp", front.transports()[0].local_address.as_str())])
        .build()
        .await
        .unwrap();

    let work = tracing::info_span!("app.work");
    let answer: String = client.request("orders", "two apples").instrument(work).await.unwrap();
    assert_eq!(answer, "two apples");

    // The other process exports on its own schedule (100 ms here); this one when flushed.
    let remote_handle = collected
        .wait_for("comms.handle from the echo-service process", |span| {
            span.process == "otel-test-server" && span.span.name == "comms.handle"
        })
        .await;
    export.flush().unwrap();
    let app = collected.wait_for("app.work", |span| span.span.name == "app.work").await;
    let trace = app.span.trace_id.clone();
    assert_eq!(trace.len(), 16);
    let in_trace = |name: &str, service: Option<&str>| {
        let spans = collected.spans.lock().unwrap();
        let matching: Vec<Exported> = spans
            .iter()
            .filter(|span| {
                span.process == "otel-test-app" && span.span.name == name && span.span.trace_id == trace
            })
            .filter(|span| service.is_none() || span.attribute("service").as_deref() == service)
            .cloned()
            .collect();
        assert_eq!(matching.len(), 1, "one {name} {service:?} in the trace: {spans:#?}");
        matching[0].clone()
    };
    let orders_request = in_trace("comms.request", Some("orders"));
    let orders_handle = in_trace("comms.handle", None);
    let echo_request = in_trace("comms.request", Some("echo"));

    // Each the child of the one before it, the last one in the other process.
    assert_eq!(orders_request.span.parent_span_id, app.span.span_id, "a request made in an application span");
    assert_eq!(orders_handle.span.parent_span_id, orders_request.span.span_id, "the handler, across TCP");
    assert_eq!(echo_request.span.parent_span_id, orders_handle.span.span_id, "a request made by a handler");
    assert_eq!(remote_handle.span.trace_id, trace, "the other process continues the trace");
    assert_eq!(remote_handle.span.parent_span_id, echo_request.span.span_id, "across the process boundary");
    assert_eq!(orders_handle.attribute("from").as_deref(), Some("client"));
    assert_eq!(remote_handle.attribute("from").as_deref(), Some("front"));
    assert_eq!(
        orders_request.attribute("trace_id"),
        Some(hex(&trace)),
        "the logged trace id is the exported one"
    );

    for span in [&orders_request, &echo_request] {
        assert_eq!(span.span.kind, SpanKind::Client as i32, "{span:?}");
    }
    for span in [&orders_handle, &remote_handle] {
        assert_eq!(span.span.kind, SpanKind::Server as i32, "{span:?}");
    }
    assert!(orders_request.span.end_time_unix_nano >= orders_handle.span.end_time_unix_nano);
    for span in [&app, &orders_request, &orders_handle, &echo_request] {
        assert_eq!(span.process, "otel-test-app");
    }
    let requests = collected.requests.lock().unwrap().clone();
    assert!(
        requests.iter().all(|(line, content_type)| line == "POST /v1/traces HTTP/1.1"
            && content_type == "application/x-protobuf"),
        "{requests:?}"
    );

    client.close().await.unwrap();
    front.close().await.unwrap();
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}
