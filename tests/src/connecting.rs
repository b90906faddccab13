//! What the broker plugins' authentication and TLS tests check the same way: a message goes
//! through a transport pair opened with a config, and a config the server refuses fails the
//! open at once instead of being retried.

use comms_plugin_api::{
    host_side::{LoadedTransport, PluginLibrary},
    Destination, Envelope, ErrorCode, MessageId, NodeId, Payload, PluginError, Settlement, SettlementOutcome,
};
use std::time::{Duration, Instant};

/// Config lines that make a plugin retry its first connection: a refusal that was retried
/// would show in the time taken.
pub const RETRYING_START: &str = "connect_attempts = 6\n";

/// Five pauses between six attempts take at least 100 + 200 + 400 + 800 + 1600 ms.
const RETRIED: Duration = Duration::from_millis(3000);

/// Opens a transport of `plugin` for nodes `conn-sender` and `conn-receiver` with `config`,
/// sends one message from the first to the second, receives and accepts it, and returns both
/// transports still open (sender, receiver). Panics with the plugin's error if any step fails.
pub async fn one_message_goes_through(
    library: &PluginLibrary,
    plugin: &str,
    config: &str,
) -> (LoadedTransport, LoadedTransport) {
    let open = |node: &'static str| async move {
        library
            .new_transport(&NodeId::new(node), plugin, config)
            .await
            .unwrap_or_else(|error| panic!("{error}"))
    };
    let receiver = open("conn-receiver").await;
    let sender = open("conn-sender").await;
    let envelope = Envelope::new(
        MessageId::from_u128(rand::random::<u128>() | 1),
        NodeId::new("conn-sender"),
        Destination::Node(NodeId::new("conn-receiver")),
        Payload::from(b"through".to_vec()),
    );
    sender.send(&receiver.info().local_address, envelope).await.unwrap_or_else(|error| panic!("{error}"));
    let batch = tokio::time::timeout(Duration::from_secs(10), receiver.receive(16))
        .await
        .expect("the message arrives within 10 s")
        .unwrap_or_else(|error| panic!("{error}"));
    assert_eq!(batch.len(), 1);
    assert_eq!(batch[0].envelope.payload.as_slice(), b"through");
    let settlement = Settlement { delivery_tag: batch[0].delivery_tag, outcome: SettlementOutcome::ACCEPTED };
    receiver.settle(vec![settlement]).await.unwrap_or_else(|error| panic!("{error}"));
    (sender, receiver)
}

/// Opens a transport of `plugin` with `config` (which should hold [`RETRYING_START`]) and
/// returns the error, after checking that it came at once (not retried) and as `UNREACHABLE`.
pub async fn refused_at_once(library: &PluginLibrary, plugin: &str, config: &str) -> PluginError {
    let started = Instant::now();
    let error = library
        .new_transport(&NodeId::new("conn-refused"), plugin, config)
        .await
        .map(drop)
        .expect_err("the server must refuse this config");
    assert!(started.elapsed() < RETRIED, "a refusal is not retried ({:?}): {error}", started.elapsed());
    assert_eq!(error.code, ErrorCode::UNREACHABLE, "{error}");
    error
}
