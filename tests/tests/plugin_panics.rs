//! A plugin that panics reaches the host as an error value; the process lives on.

use comms_host::{BuildError, Node, PluginLibrary, ReceiveError, SendError};
use comms_plugin_api::ErrorCode;
use comms_tests::artifacts;
use std::time::Duration;

fn panicking() -> PluginLibrary {
    PluginLibrary::load(&artifacts().panicking_plugin).expect("the fixture loads")
}

async fn node_panicking_in(place: &str) -> Result<Node, BuildError> {
    Node::builder(format!("panics-in-{place}").as_str())
        .transport_library("loop", panicking(), &format!("panic_in = \"{place}\""))
        .build()
        .await
}

#[tokio::test]
async fn panic_in_the_constructor_is_a_start_error() {
    for place in ["constructor", "info"] {
        let error = node_panicking_in(place).await.unwrap_err();
        let BuildError::Start { error: plugin_error, .. } = &error else {
            panic!("expected a start error: {error}")
        };
        assert_eq!(plugin_error.code, ErrorCode::PANICKED, "{error}");
        assert!(error.to_string().contains(&format!("deliberate panic in {place}")), "{error}");
    }
}

#[tokio::test]
async fn panic_in_send_is_a_send_error() {
    let node = node_panicking_in("send").await.unwrap();
    for _ in 0..3 {
        let error = node.send(node.id().clone(), "boom").await.unwrap_err();
        let SendError::Transport { error: plugin_error, .. } = &error else {
            panic!("expected a transport error: {error}")
        };
        assert_eq!(plugin_error.code, ErrorCode::PANICKED);
        assert!(error.to_string().contains("deliberate panic in send"), "{error}");
    }
    // Counted, for the status and the metrics.
    assert_eq!(node.status().transports[0].plugin_panics, 3);
    let series = r#"comms_transport_plugin_panics_total{transport="loop",plugin="#;
    let line = node.metrics_text().lines().find(|line| line.starts_with(series)).map(str::to_string);
    assert!(line.as_deref().is_some_and(|line| line.ends_with(" 3")), "{line:?}");
    node.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panic_in_receive_is_a_receive_error_and_the_node_keeps_going() {
    let node = node_panicking_in("receive").await.unwrap();
    for _ in 0..2 {
        let received = tokio::time::timeout(Duration::from_secs(10), node.receive::<String>()).await;
        let error = received.expect("the failure is reported, not swallowed").unwrap_err();
        let ReceiveError::Transport { error: plugin_error, transport } = &error else {
            panic!("expected a transport error: {error}")
        };
        assert_eq!(transport, "loop");
        assert_eq!(plugin_error.code, ErrorCode::PANICKED);
    }
    // Sending through the same plugin still works: only receive panics.
    node.send(node.id().clone(), "still alive").await.unwrap();
    node.close().await.unwrap();
}

#[tokio::test]
async fn a_well_behaved_instance_of_the_same_plugin_works_after_the_panics() {
    let _ = node_panicking_in("constructor").await.unwrap_err();
    let node = node_panicking_in("nothing").await.unwrap();
    node.send(node.id().clone(), "fine").await.unwrap();
    assert_eq!(node.receive::<String>().await.unwrap().message, "fine");
    node.close().await.unwrap();
}
