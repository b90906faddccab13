//! W3C Trace Context across nodes and transports (`comms_host::trace_context`): a client asks
//! `front` over TCP, whose handler asks `back` over the in-memory transport. One trace id runs
//! through all three, each hop with a span id of its own; a request made inside an application's
//! own trace continues it; the handlers' log lines carry the trace id (the `comms.handle` span);
//! a plain send made inside a trace carries it too, and the receiving side's `comms.receive`
//! span and `Received::trace_context` name it.

use comms_host::{
    trace_context::{self, TraceContext, TRACEPARENT_HEADER},
    Node, PluginLibrary, Received,
};
use comms_tests::{artifacts, capture_logs};
use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

/// What a handler saw: the request's `traceparent` and the current context while it ran.
#[derive(Debug, Clone, Copy)]
struct Seen {
    header: TraceContext,
    current: TraceContext,
}

fn seen<T>(request: &Received<T>) -> Seen {
    let header = request.headers.get(TRACEPARENT_HEADER).expect("a request carries a traceparent");
    Seen {
        header: TraceContext::parse(header).unwrap_or_else(|| panic!("a valid traceparent: {header}")),
        current: trace_context::current().expect("a handler runs in the request's context"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_runs_through_a_request_its_handler_and_the_request_the_handler_makes() {
    let logs = capture_logs("info,comms_host::node=debug");
    let tcp = PluginLibrary::load(&artifacts().tcp_plugin).unwrap();
    let memory = PluginLibrary::load(&artifacts().memory_plugin).unwrap();
    let liveness = (Some(Duration::from_millis(100)), Duration::from_secs(2));
    let back = Node::builder("back")
        .liveness(liveness.0, liveness.1)
        .transport_library("memory", memory.clone(), "address = \"memory://trace-back\"")
        .build()
        .await
        .unwrap();
    let front = Node::builder("front")
        .liveness(liveness.0, liveness.1)
        .transport_library("tcp", tcp.clone(), "listen = \"127.0.0.1:0\"")
        .transport_library("memory", memory, "address = \"memory://trace-front\"")
        .static_peer("back", [("memory", "memory://trace-back")])
        .build()
        .await
        .unwrap();
    let client = Node::builder("client")
        .liveness(liveness.0, liveness.1)
        .transport_library("tcp", tcp, "listen = \"127.0.0.1:0\"")
        .static_peer("front", [("tcp", front.transports()[0].local_address.as_str())])
        .build()
        .await
        .unwrap();

    let at_back: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let record = Arc::clone(&at_back);
    back.serve("inventory", move |request: Received<String>| {
        let record = Arc::clone(&record);
        async move {
            record.lock().unwrap().push(seen(&request));
            tracing::info!("inventory handled");
            Ok::<_, String>(format!("{} in stock", request.message))
        }
    })
    .await
    .unwrap();
    let at_front: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let (record, caller) = (Arc::clone(&at_front), front.clone());
    front
        .serve("orders", move |request: Received<String>| {
            let (record, caller) = (Arc::clone(&record), caller.clone());
            async move {
                record.lock().unwrap().push(seen(&request));
                caller.request::<_, String>("inventory", &request.message).await.map_err(|e| e.to_string())
            }
        })
        .await
        .unwrap();

    // No trace around the first request: it starts one.
    let answer: String = client.request("orders", &"books".to_string()).await.unwrap();
    assert_eq!(answer, "books in stock");
    let (front_seen, back_seen) = (at_front.lock().unwrap()[0], at_back.lock().unwrap()[0]);
    let trace = front_seen.header.trace_id;
    assert_eq!(front_seen.current.trace_id, trace, "the handler continues the caller's trace");
    assert_eq!(back_seen.header.trace_id, trace, "the handler's own request carries the same trace");
    assert_eq!(back_seen.current.trace_id, trace);
    let spans = [front_seen.header.span_id, front_seen.current.span_id, back_seen.header.span_id];
    assert!(
        spans[0] != spans[1] && spans[1] != spans[2] && spans[0] != spans[2],
        "every hop has a span id of its own: {front_seen:?} {back_seen:?}"
    );

    // Inside an application's own trace (say, from an incoming HTTP request): continued.
    let outer = TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
    let _: String = outer.scope(client.request("orders", &"pens".to_string())).await.unwrap();
    let (front_seen, back_seen) = (at_front.lock().unwrap()[1], at_back.lock().unwrap()[1]);
    assert_eq!(front_seen.header.trace_id, outer.trace_id);
    assert_eq!(back_seen.header.trace_id, outer.trace_id);
    assert_ne!(front_seen.header.span_id, outer.span_id, "the request is a child span of the caller's");
    assert_ne!(trace, outer.trace_id);

    // The handler's log line is inside the `comms.handle` span, which names the trace.
    let text = logs.text();
    for trace_id in [TraceContext { trace_id: trace, ..outer }.trace_id_hex(), outer.trace_id_hex()] {
        let line = text
            .lines()
            .find(|line| line.contains("inventory handled") && line.contains(&trace_id))
            .unwrap_or_else(|| panic!("no handler log line with trace_id {trace_id} in:\n{text}"));
        assert!(line.contains("comms.handle{from=front"), "{line}");
    }

    // A plain send inside a trace carries it: spans on both sides, and the receiver can go on.
    let id = outer.scope(client.send("front", &"a note".to_string())).await.unwrap();
    let note = front.receive::<String>().await.unwrap();
    assert_eq!(note.message, "a note");
    let carried = note.trace_context().expect("the send carried the trace");
    assert_eq!(carried.trace_id, outer.trace_id);
    assert_ne!(carried.span_id, outer.span_id, "the send is a child span");
    let text = logs.text();
    let trace_id = outer.trace_id_hex();
    assert!(
        text.lines().any(|l| l.contains("comms.receive{from=client")
            && l.contains(&trace_id)
            && l.contains(&id.to_string())),
        "no comms.receive line for {id} with trace_id {trace_id} in:\n{text}"
    );
    client.send("front", &"untraced".to_string()).await.unwrap();
    let untraced = front.receive::<String>().await.unwrap();
    assert!(untraced.trace_context().is_none(), "a send outside any trace carries none");

    client.close().await.unwrap();
    front.close().await.unwrap();
    back.close().await.unwrap();
}
