//! The Node works from a current-thread and from a multi-thread tokio runtime, with the plugin's
//! own runtime doing the I/O either way.

use comms_host::{Codec, Node, PluginLibrary};
use comms_tests::artifacts;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Reading {
    sensor: String,
    value: f64,
    sequence: u32,
}

async fn exchange(codec: Codec) {
    let tcp = PluginLibrary::load(&artifacts().tcp_plugin).unwrap();
    let receiver = Node::builder("receiver").transport_library("tcp", tcp.clone(), "").build().await.unwrap();
    let address = receiver.transports()[0].local_address.clone();
    let sender = Node::builder("sender")
        .codec(codec)
        .transport_library("tcp", tcp, "")
        .static_peer("receiver", [("tcp", address.as_str())])
        .build()
        .await
        .unwrap();
    for sequence in 0..500 {
        let reading = Reading { sensor: "t1".into(), value: f64::from(sequence) / 2.0, sequence };
        sender.send("receiver", &reading).await.unwrap();
    }
    for sequence in 0..500 {
        let received = receiver.receive::<Reading>().await.unwrap();
        assert_eq!(received.from.as_str(), "sender");
        assert_eq!(
            received.message,
            Reading { sensor: "t1".into(), value: f64::from(sequence) / 2.0, sequence }
        );
    }
    sender.close().await.unwrap();
    receiver.close().await.unwrap();
}

#[test]
fn works_on_a_current_thread_runtime() {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(exchange(Codec::Binary));
}

#[test]
fn works_on_a_multi_thread_runtime() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(exchange(Codec::Binary));
}

#[tokio::test(flavor = "current_thread")]
async fn json_codec_is_selectable_per_node_and_decoded_by_content_type() {
    exchange(Codec::Json).await;
}

#[tokio::test]
async fn oversized_message_is_refused_and_the_node_keeps_sending() {
    let tcp = PluginLibrary::load(&artifacts().tcp_plugin).unwrap();
    let node =
        Node::builder("small").transport_library("tcp", tcp, "max_frame_size = 1024").build().await.unwrap();
    let error = node.send("small", &vec![7u8; 4096]).await.unwrap_err();
    assert!(error.to_string().contains("exceeds max_message_size 512"), "{error}");
    node.send("small", &vec![7u8; 100]).await.unwrap();
    assert_eq!(node.receive::<Vec<u8>>().await.unwrap().message, vec![7u8; 100]);
    node.close().await.unwrap();
}

#[tokio::test]
async fn close_flushes_queued_messages_before_returning() {
    let tcp = PluginLibrary::load(&artifacts().tcp_plugin).unwrap();
    let receiver = Node::builder("r").transport_library("tcp", tcp.clone(), "").build().await.unwrap();
    let address = receiver.transports()[0].local_address.clone();
    let sender = Node::builder("s")
        .transport_library("tcp", tcp, "")
        .static_peer("r", [("tcp", address.as_str())])
        .build()
        .await
        .unwrap();
    for i in 0..2_000u32 {
        sender.send("r", &i).await.unwrap();
    }
    sender.close().await.unwrap();
    assert!(sender.send("r", &0u32).await.is_err(), "a closed node refuses to send");
    for i in 0..2_000u32 {
        assert_eq!(receiver.receive::<u32>().await.unwrap().message, i);
    }
    receiver.close().await.unwrap();
}
