//! Contract 1.1's host-driven I/O with the loaded TCP plugin: polled from a host tokio runtime,
//! the plugin hands its connected sockets to the host's reactor (and its tasks to the host's
//! executor); polled from anywhere else, it keeps them; messages flow, in order, either way. The
//! third-party Unix-socket plugin, built on its own, does the same, and so do the Redis plugin
//! with its connections to Redis and the PostgreSQL plugin (built on its own too) with its
//! connections to PostgreSQL.
//!
//! The count of host-driven sockets belongs to a plugin library, which this process loads once:
//! each library is checked by one test, in steps.

use comms_plugin_api::{
    host_side::{LoadedTransport, PluginLibrary},
    Destination, Envelope, MessageId, NodeId, Settlement, SettlementOutcome,
};
use comms_tests::{artifacts, broker_available, POSTGRES};

#[path = "support/postgres.rs"]
mod postgres_support;

const REDIS: &str = "127.0.0.1:6379";

const MESSAGES: u32 = 300;

/// The plugin library's count of sockets the host drives, as a transport reports it.
fn host_driven_sockets(transport: &LoadedTransport) -> u64 {
    let stats = transport.stats();
    stats
        .transport
        .counters
        .iter()
        .find(|(name, _)| name == "io.host_driven_sockets")
        .map(|(_, value)| *value)
        .expect("the transport reports io.host_driven_sockets")
}

/// Opens two transports of `library` (the receiver with `receiver_config`, the sender with
/// `sender_config`), sends [`MESSAGES`] from one to the other, settles them as they arrive (as the
/// host does; transports without acknowledgements ignore it) and checks they all arrive in order.
/// Returns the count of host-driven sockets seen while both were open, after closing them.
async fn exchange_with(library: &PluginLibrary, receiver_config: &str, sender_config: &str) -> u64 {
    let receiver = library.new_transport(&NodeId::new("receiver"), "t", receiver_config).await.unwrap();
    let sender = library.new_transport(&NodeId::new("sender"), "t", sender_config).await.unwrap();
    let address = receiver.info().local_address.clone();
    for i in 0..MESSAGES {
        let envelope = Envelope::new(
            MessageId::from_u128(u128::from(i) + 1),
            "sender",
            Destination::node("receiver"),
            i.to_be_bytes().to_vec(),
        );
        sender.send(&address, envelope).await.unwrap();
    }
    let mut next = 0;
    while next < MESSAGES {
        let mut settlements = Vec::new();
        for inbound in receiver.receive(64).await.unwrap() {
            assert_eq!(inbound.envelope.payload.as_ref(), next.to_be_bytes(), "in order");
            next += 1;
            settlements.push(Settlement {
                delivery_tag: inbound.delivery_tag,
                outcome: SettlementOutcome::ACCEPTED,
            });
        }
        receiver.settle(settlements).await.unwrap();
    }
    let during = host_driven_sockets(&receiver);
    sender.close().await.unwrap();
    receiver.close().await.unwrap();
    during
}

/// [`exchange_with`] between two listening transports of a stream plugin (TCP or Unix sockets).
async fn exchange(library: &PluginLibrary) -> u64 {
    exchange_with(library, &listen(library, "r"), &listen(library, "s")).await
}

/// A `listen` key for a transport of `library`: any free port, or a fresh socket path.
fn listen(library: &PluginLibrary, name: &str) -> String {
    match library.description().name.as_str() {
        "uds" => {
            let path = comms_tests::scratch_dir("host-driven-uds").join(format!("{name}.sock"));
            format!("listen = {:?}", path.display().to_string())
        }
        _ => "listen = \"127.0.0.1:0\"".to_string(),
    }
}

#[test]
fn sockets_go_to_the_host_reactor_only_from_a_host_runtime_and_messages_flow_either_way() {
    let library = PluginLibrary::load(&artifacts().tcp_plugin).unwrap();

    // Polled by an executor that is not a tokio runtime: the host declines, the plugin's own
    // runtime drives everything.
    let during = futures::executor::block_on(exchange(&library));
    assert_eq!(during, 0, "no host runtime: the plugin keeps its sockets");

    // Polled from a host runtime: the sender's outgoing and the receiver's incoming socket are
    // the host's while they are open, and closed (the count back to 0) once the transports are.
    for runtime in [
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap(),
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap(),
    ] {
        let during = runtime.block_on(exchange(&library));
        assert_eq!(during, 2, "the host drives both ends of the connection");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let check = runtime
            .block_on(library.new_transport(&NodeId::new("check"), "tcp", "listen = \"127.0.0.1:0\""))
            .unwrap();
        while host_driven_sockets(&check) != 0 {
            assert!(std::time::Instant::now() < deadline, "host-driven sockets were not closed");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        runtime.block_on(check.close()).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_third_party_unix_socket_plugin_hands_its_sockets_to_the_host_too() {
    let library = PluginLibrary::load(&artifacts().uds_plugin).unwrap();
    assert_eq!(exchange(&library).await, 2, "both ends of the Unix-socket connection");
}

/// [`exchange_with`] between two Redis transports under `prefix`.
async fn redis_exchange(library: &PluginLibrary, prefix: &str) -> u64 {
    let config = format!("url = \"redis://{REDIS}\"\nprefix = \"{prefix}\"\nblock_ms = 200\n");
    exchange_with(library, &config, &config).await
}

#[test]
fn the_redis_plugin_hands_its_connections_to_the_host_from_a_host_runtime() {
    if !broker_available("Redis", REDIS) {
        return;
    }
    let library = PluginLibrary::load(&artifacts().redis_plugin).unwrap();
    let prefix =
        format!("comms-test-{}-{:06x}-host-driven", std::process::id(), rand::random::<u32>() & 0xff_ffff);

    // No host runtime: the plugin keeps its connections, and messages flow all the same.
    let during = futures::executor::block_on(redis_exchange(&library, &prefix));
    assert_eq!(during, 0, "no host runtime: the plugin keeps its sockets");

    // From a host runtime: each transport's command connection and its connection for blocking
    // reads are the host's while open; closed (the count back to 0) once the transports are.
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let during = runtime.block_on(redis_exchange(&library, &prefix));
    assert_eq!(during, 4, "the host drives both connections of both transports");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let config = format!("url = \"redis://{REDIS}\"\nprefix = \"{prefix}\"\n");
    let check = runtime.block_on(library.new_transport(&NodeId::new("check"), "redis", &config)).unwrap();
    while host_driven_sockets(&check) != 2 {
        assert!(std::time::Instant::now() < deadline, "host-driven sockets were not closed");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    runtime.block_on(check.close()).unwrap();
    runtime.block_on(comms_tests::delete_redis_keys(&prefix));
}

#[test]
fn the_postgres_plugin_hands_its_connections_to_the_host_from_a_host_runtime() {
    if !broker_available("PostgreSQL", POSTGRES) {
        return;
    }
    let library = PluginLibrary::load(artifacts().postgres_plugin()).unwrap();
    let schema = postgres_support::Schema::new("host_driven");
    let config = schema.config("poll_ms = 200\n");

    // No host runtime: the plugin keeps its connections, and messages flow all the same.
    let during = futures::executor::block_on(exchange_with(&library, &config, &config));
    assert_eq!(during, 0, "no host runtime: the plugin keeps its sockets");

    // From a host runtime: the receiver's connection (claims, settlements, LISTEN) and the
    // sender's two (the same, and the one its writer commits on) are the host's while open;
    // closed (the count back to the one of a fresh transport) once the transports are.
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let during = runtime.block_on(exchange_with(&library, &config, &config));
    assert_eq!(during, 3, "the host drives the receiver's connection and both of the sender's");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let check = runtime.block_on(library.new_transport(&NodeId::new("check"), "postgres", &config)).unwrap();
    while host_driven_sockets(&check) != 1 {
        assert!(std::time::Instant::now() < deadline, "host-driven sockets were not closed");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    runtime.block_on(check.close()).unwrap();
}
