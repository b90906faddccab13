//! The PostgreSQL plugin when the server drops its connections: every connection of the plugin is
//! killed with `pg_terminate_backend` three times while messages flow, and no message whose
//! `send` returned `Ok` is lost (the plugin reconnects, and a claim lost with its connection is
//! delivered again when its lease ends). What the plugin logs meanwhile names the server but
//! never the password of its url.

#[path = "support/postgres.rs"]
mod support;

use support::{psql, Schema};

use comms_plugin_api::{
    host_side::PluginLibrary, Destination, Envelope, MessageId, NodeId, Settlement, SettlementOutcome,
};
use comms_tests::{artifacts, broker_available, capture_logs, POSTGRES};
use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex},
    time::Duration,
};

const MESSAGES: u32 = 300;

const PASSWORD: &str = "s3cret-pw";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_killed_mid_stream_lose_no_acknowledged_message() {
    if !broker_available("PostgreSQL", POSTGRES) {
        return;
    }
    let logs = capture_logs("comms_postgres=debug");
    let library =
        PluginLibrary::load(artifacts().postgres_plugin()).unwrap_or_else(|error| panic!("{error}"));
    let schema = Schema::new("faults");
    // The schema's name is also the connections' application_name: the test kills exactly
    // those. A short lease: a claim whose answer was lost with its connection comes again soon.
    // The password is ignored by the server (trust authentication) and must appear in no log.
    let config = format!(
        "url = \"postgres://postgres:{PASSWORD}@{POSTGRES}/test?application_name={0}\"\nschema = \"{0}\"\n\
         lease_ms = 1000\npoll_ms = 500\nconnect_attempts = 20\n",
        schema.0
    );
    let alice = library.new_transport(&NodeId::new("alice"), "postgres", &config).await.unwrap();
    let bob = Arc::new(library.new_transport(&NodeId::new("bob"), "postgres", &config).await.unwrap());

    let received = Arc::new(Mutex::new(BTreeSet::new()));
    let (progress, mut watch_progress) = tokio::sync::watch::channel(0usize);
    let receiving = tokio::spawn({
        let (bob, received) = (Arc::clone(&bob), Arc::clone(&received));
        async move {
            loop {
                let batch = match bob.receive(32).await {
                    Ok(batch) if batch.is_empty() => return,
                    Ok(batch) => batch,
                    // A receive may fail while the server is unreachable; the next one retries.
                    Err(error) => {
                        eprintln!("receive failed: {error}");
                        continue;
                    }
                };
                let mut settlements = Vec::new();
                for inbound in batch {
                    let n = u32::from_be_bytes(inbound.envelope.payload.as_slice().try_into().unwrap());
                    received.lock().unwrap().insert(n);
                    settlements.push(Settlement {
                        delivery_tag: inbound.delivery_tag,
                        outcome: SettlementOutcome::ACCEPTED,
                    });
                }
                // A settlement lost with a connection only means the message comes again.
                let _ = bob.settle(settlements).await;
                progress.send_replace(received.lock().unwrap().len());
            }
        }
    });

    // The kills come while messages flow, after 50, 130 and 210 sends: both transports use
    // their connections again after each one.
    let (sent, mut watch_sent) = tokio::sync::watch::channel(0usize);
    let sending = async {
        let mut acknowledged = BTreeSet::new();
        for n in 0..MESSAGES {
            let envelope = Envelope::new(
                MessageId::from_u128(u128::from(n) + 1),
                NodeId::new("alice"),
                Destination::Node(NodeId::new("bob")),
                n.to_be_bytes().to_vec(),
            );
            match alice.send("bob", envelope).await {
                Ok(()) => {
                    acknowledged.insert(n);
                    sent.send_replace(acknowledged.len());
                }
                Err(error) => eprintln!("send {n} failed: {error}"),
            }
        }
        acknowledged
    };
    let killing = async {
        let mut kills = 0;
        for after in [50, 130, 210] {
            watch_sent.wait_for(|sent| *sent >= after).await.unwrap();
            let killed = psql(&format!(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = '{}'",
                schema.0
            ));
            kills += killed.parse::<u32>().unwrap();
        }
        kills
    };
    let (acknowledged, kills) =
        tokio::time::timeout(Duration::from_secs(60), async { tokio::join!(sending, killing) })
            .await
            .expect("sending and the three kills finish within 60 s");
    assert!(kills >= 6, "each kill must hit the connections of both transports, killed {kills}");
    assert_eq!(acknowledged.len() as u32, MESSAGES, "sends reconnect instead of failing");

    // Every acknowledged message arrives (duplicates are allowed, losses are not).
    tokio::time::timeout(Duration::from_secs(30), async {
        while !acknowledged.is_subset(&received.lock().unwrap()) {
            watch_progress.changed().await.unwrap();
        }
    })
    .await
    .unwrap_or_else(|_| {
        let missing: Vec<_> = acknowledged.difference(&received.lock().unwrap()).copied().collect();
        panic!("acknowledged messages never arrived: {missing:?}")
    });
    let stats = bob.stats();
    assert!(stats.transport.reconnects >= 3, "the receiver reconnected after each kill: {stats:?}");
    assert!(alice.stats().transport.reconnects >= 3, "so did the sender");

    alice.close().await.unwrap();
    bob.close().await.unwrap();
    receiving.await.unwrap();
    let text = logs.text();
    assert!(text.contains("reconnected to PostgreSQL"), "the reconnects are logged:\n{text}");
    assert!(text.contains("postgres@127.0.0.1:5432/test"), "naming the server:\n{text}");
    assert!(!text.contains(PASSWORD), "the password leaked into the logs:\n{text}");
}
