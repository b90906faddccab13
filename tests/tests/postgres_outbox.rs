//! The transactional outbox of the PostgreSQL plugin: an application writes its own rows and a
//! comms message in one transaction of its own (here with psql, as any client would) through
//! `<schema>.comms_send` / `<schema>.comms_publish`. A rolled-back transaction sends nothing; a
//! committed one delivers, and wakes the receiver by notification (its safety poll is a minute).

#[path = "support/postgres.rs"]
mod support;

use support::{psql, Schema};

use comms_plugin_api::{
    host_side::{LoadedTransport, PluginLibrary},
    Destination, NodeId, Settlement, SettlementOutcome,
};
use comms_tests::{artifacts, broker_available, POSTGRES};
use std::{process::Command, time::Duration};

/// Receives one message (within 5 s: a notification, not the one-minute poll) and accepts it.
async fn receive_one(bob: &LoadedTransport) -> comms_plugin_api::Envelope {
    let batch = tokio::time::timeout(Duration::from_secs(5), bob.receive(10))
        .await
        .expect("the commit woke the receiver")
        .unwrap();
    assert_eq!(batch.len(), 1, "exactly one message: {batch:?}");
    let inbound = batch.into_iter().next().unwrap();
    bob.settle(vec![Settlement { delivery_tag: inbound.delivery_tag, outcome: SettlementOutcome::ACCEPTED }])
        .await
        .unwrap();
    inbound.envelope
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_transaction_sends_nothing_and_a_committed_one_delivers() {
    if !broker_available("PostgreSQL", POSTGRES) {
        return;
    }
    let library =
        PluginLibrary::load(artifacts().postgres_plugin()).unwrap_or_else(|error| panic!("{error}"));
    let schema = Schema::new("outbox");
    let s = &schema.0;
    let config =
        format!("url = \"postgres://postgres@{POSTGRES}/test\"\nschema = \"{s}\"\npoll_ms = 60000\n");
    let bob = library.new_transport(&NodeId::new("bob"), "postgres", &config).await.unwrap();
    psql(&format!("CREATE TABLE \"{s}\".orders (id integer PRIMARY KEY)"));

    // The application's own row and its message, in one transaction that is rolled back.
    psql(&format!(
        "BEGIN;
         INSERT INTO \"{s}\".orders VALUES (1);
         SELECT \"{s}\".comms_send('bob', convert_to('order 1', 'UTF8'), ARRAY['content-type', 'text/plain'], 'shop');
         ROLLBACK;"
    ));
    // ... and one that commits.
    let id = psql(&format!(
        "BEGIN;
         INSERT INTO \"{s}\".orders VALUES (2);
         SELECT \"{s}\".comms_send('bob', convert_to('order 2', 'UTF8'), ARRAY['content-type', 'text/plain'], 'shop');
         COMMIT;"
    ));
    let envelope = receive_one(&bob).await;
    assert_eq!(envelope.payload.as_slice(), b"order 2", "only the committed transaction's message");
    assert_eq!(envelope.id.to_string(), id.replace('-', ""), "comms_send returns the message id");
    assert_eq!(envelope.from.as_str(), "shop");
    assert_eq!(envelope.to, Destination::Node(NodeId::new("bob")));
    assert_eq!(envelope.header("content-type"), Some("text/plain"));
    assert_eq!(psql(&format!("SELECT string_agg(id::text, ',') FROM \"{s}\".orders")), "2");
    assert_eq!(psql(&format!("SELECT count(*) FROM \"{s}\".comms_mailbox")), "0", "nothing else waits");

    // Publications: one row per subscribed node, in the same way.
    bob.subscribe("orders.*").await.unwrap();
    psql(&format!("BEGIN; SELECT \"{s}\".comms_publish('orders.created', '\\x2a'::bytea); ROLLBACK;"));
    let written = psql(&format!("SELECT \"{s}\".comms_publish('orders.created', '\\x2a'::bytea)"));
    assert_eq!(written, "1", "one subscriber");
    assert_eq!(psql(&format!("SELECT \"{s}\".comms_publish('orders.eu.created', '\\x2a'::bytea)")), "0");
    let envelope = receive_one(&bob).await;
    assert_eq!(envelope.to, Destination::Topic("orders.created".into()));
    assert_eq!(envelope.payload.as_slice(), b"*");

    // Bad input is refused by the function, inside the caller's transaction.
    let output = Command::new("psql")
        .args(["-h", "127.0.0.1", "-U", "postgres", "-d", "test", "-X", "-q", "-c"])
        .arg(format!("SELECT \"{s}\".comms_send('bob', '\\x00'::bytea, ARRAY['odd'])"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&output.stderr).contains("name, value"), "{output:?}");
    bob.close().await.unwrap();
}

/// Topic copies written while a node is away (by `comms_publish` from SQL and by a publishing
/// transport) wait for its application to subscribe again; direct messages do not wait; ending a
/// subscription hands over what waited for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_copies_written_while_a_node_is_away_wait_for_its_subscription() {
    if !broker_available("PostgreSQL", POSTGRES) {
        return;
    }
    let library =
        PluginLibrary::load(artifacts().postgres_plugin()).unwrap_or_else(|error| panic!("{error}"));
    let schema = Schema::new("held");
    let s = &schema.0;
    let config =
        format!("url = \"postgres://postgres@{POSTGRES}/test\"\nschema = \"{s}\"\npoll_ms = 60000\n");
    let away = library.new_transport(&NodeId::new("away"), "postgres", &config).await.unwrap();
    away.subscribe("orders.*").await.unwrap();
    away.subscribe("audit.>").await.unwrap();
    away.close().await.unwrap();

    let publisher = library.new_transport(&NodeId::new("publisher"), "postgres", &config).await.unwrap();
    let mut message = comms_plugin_api::Envelope::new(
        comms_plugin_api::MessageId::from_u128(1),
        NodeId::new("publisher"),
        Destination::Topic("orders.eu".into()),
        b"from a transport".to_vec(),
    );
    publisher.send("", message.clone()).await.unwrap();
    assert_eq!(psql(&format!("SELECT \"{s}\".comms_publish('audit.log', '\\x01'::bytea)")), "1");
    assert_eq!(psql(&format!("SELECT \"{s}\".comms_publish('orders.us', '\\x02'::bytea)")), "1");
    message.id = comms_plugin_api::MessageId::from_u128(2);
    message.to = Destination::Node(NodeId::new("away"));
    publisher.send("away", message).await.unwrap();

    let away = library.new_transport(&NodeId::new("away"), "postgres", &config).await.unwrap();
    let direct = receive_one(&away).await;
    assert_eq!(direct.to, Destination::Node(NodeId::new("away")), "only the direct message comes at once");
    assert!(tokio::time::timeout(Duration::from_millis(500), away.receive(10)).await.is_err());

    // Subscribing again releases that pattern's copies, in order, and only those.
    away.subscribe("orders.*").await.unwrap();
    let mut released = Vec::new();
    while released.len() < 2 {
        let batch = tokio::time::timeout(Duration::from_secs(5), away.receive(10))
            .await
            .expect("the subscription woke the receiver")
            .unwrap();
        for inbound in batch {
            let accepted =
                Settlement { delivery_tag: inbound.delivery_tag, outcome: SettlementOutcome::ACCEPTED };
            away.settle(vec![accepted]).await.unwrap();
            released.push(inbound.envelope.to);
        }
    }
    assert_eq!(released, [Destination::Topic("orders.eu".into()), Destination::Topic("orders.us".into())]);
    assert!(tokio::time::timeout(Duration::from_millis(500), away.receive(10)).await.is_err());

    // Ending a subscription hands over the copies that waited for it, so none waits for ever.
    away.unsubscribe("audit.>").await.unwrap();
    assert_eq!(receive_one(&away).await.to, Destination::Topic("audit.log".into()));
    assert_eq!(psql(&format!("SELECT count(*) FROM \"{s}\".comms_mailbox")), "0");
    publisher.close().await.unwrap();
    away.close().await.unwrap();
}
