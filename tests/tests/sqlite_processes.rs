//! The SQLite plugin across real OS processes sharing one database file: several producers and
//! consumers at once (nothing lost, nothing duplicated, no errors), a consumer killed with
//! SIGKILL in the middle of a batch (its leased messages come again after the lease), and a
//! producer killed with SIGKILL in the middle of writing (the file stays consistent and every
//! send that returned is delivered).
//!
//! The child processes are this test binary itself, re-run with `--exact child_process` and the
//! role in environment variables; they load `libcomms_sqlite.so` like any user.

use comms_host::PluginLibrary;
use comms_plugin_api::{
    host_side::LoadedTransport, Destination, Envelope, MessageId, NodeId, Settlement, SettlementOutcome,
};
use comms_tests::{
    artifacts,
    child_process::{self, finished_ok, read_marked, var, MARK},
    scratch_dir,
};
use std::{
    collections::BTreeMap,
    path::Path,
    process::Child,
    time::{Duration, Instant},
};

const ROLE: &str = "COMMS_SQLITE_CHILD_ROLE";

fn config(path: &Path, extra: &str) -> String {
    format!("database = {:?}\n{extra}", path)
}

/// A message whose id says who sent it and its number, and whose payload can be checked.
fn message(from: &str, to: &str, producer: u32, sequence: u32, size: usize) -> Envelope {
    let id = (u128::from(producer) << 32) | u128::from(sequence);
    Envelope::new(
        MessageId::from_u128(id),
        NodeId::new(from),
        Destination::Node(NodeId::new(to)),
        payload(id, size),
    )
    .with_headers(vec![("sequence".into(), sequence.to_string())])
}

fn payload(id: u128, size: usize) -> Vec<u8> {
    (0..size).map(|i| (id as usize).wrapping_mul(31).wrapping_add(i) as u8).collect()
}

fn intact(envelope: &Envelope) -> bool {
    let id = envelope.id.as_u128();
    envelope.payload.as_slice() == payload(id, envelope.payload.len()).as_slice()
        && envelope.header("sequence") == Some(&(id as u32).to_string())
}

async fn open(node: &str, config: &str) -> LoadedTransport {
    let library = PluginLibrary::load(&artifacts().sqlite_plugin).unwrap_or_else(|error| panic!("{error}"));
    library
        .new_transport(&NodeId::new(node), "sqlite", config)
        .await
        .unwrap_or_else(|error| panic!("{error}"))
}

/// Starts this test binary as a child in `role`, with `vars`.
fn spawn_child(role: &str, vars: &[(&str, String)]) -> Child {
    let mut vars = vars.to_vec();
    vars.push(("COMMS_SQLITE_PLUGIN", artifacts().sqlite_plugin.display().to_string()));
    child_process::spawn(ROLE, role, &vars)
}

/// The child side: does nothing in a normal test run.
#[test]
fn child_process() {
    let Ok(role) = std::env::var(ROLE) else { return };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async move {
        let library = PluginLibrary::load(var("COMMS_SQLITE_PLUGIN").as_ref()).unwrap();
        let node = NodeId::new(var("NODE"));
        let transport = library.new_transport(&node, "sqlite", &var("CONFIG")).await.unwrap();
        match role.as_str() {
            // Sends COUNT messages of SIZE bytes to TO, numbered as producer PRODUCER.
            "produce" => {
                let (to, producer): (String, u32) = (var("TO"), var("PRODUCER").parse().unwrap());
                let (count, size): (u32, usize) =
                    (var("COUNT").parse().unwrap(), var("SIZE").parse().unwrap());
                for sequence in 0..count {
                    let envelope = message(node.as_str(), &to, producer, sequence, size);
                    transport.send(&to, envelope).await.unwrap();
                    // Every send that returned is reported: the parent checks none is lost.
                    println!("{MARK}sent {sequence}");
                }
                transport.close().await.unwrap();
                println!("{MARK}done");
            }
            // Receives and accepts until the file DONE exists and the mailbox stays empty.
            "consume" => {
                let done = var("DONE");
                // Never outlive a parent that failed before creating DONE by much.
                let give_up = Instant::now() + Duration::from_secs(60);
                while Instant::now() < give_up {
                    match tokio::time::timeout(Duration::from_millis(300), transport.receive(64)).await {
                        Ok(batch) => {
                            let batch = batch.unwrap();
                            for inbound in &batch {
                                assert!(intact(&inbound.envelope), "message {} damaged", inbound.envelope.id);
                                println!("{MARK}got {}", inbound.envelope.id.as_u128());
                            }
                            let accept = batch
                                .iter()
                                .map(|inbound| Settlement {
                                    delivery_tag: inbound.delivery_tag,
                                    outcome: SettlementOutcome::ACCEPTED,
                                })
                                .collect();
                            transport.settle(accept).await.unwrap();
                        }
                        Err(_) if Path::new(&done).exists() => break,
                        Err(_) => {}
                    }
                }
                transport.close().await.unwrap();
                println!("{MARK}done");
            }
            // Claims one batch, reports it, and waits to be killed without settling.
            "claim-and-hang" => {
                let batch = transport.receive(var("COUNT").parse().unwrap()).await.unwrap();
                let ids: Vec<String> = batch.iter().map(|i| i.envelope.id.as_u128().to_string()).collect();
                println!("{MARK}claimed {}", ids.join(","));
                tokio::time::sleep(Duration::from_secs(60)).await;
            }
            other => panic!("unknown child role {other}"),
        }
    });
}

#[test]
fn several_processes_produce_and_consume_one_file_with_nothing_lost_or_duplicated() {
    const PRODUCERS: u32 = 3;
    const MESSAGES: u32 = 1500;
    let dir = scratch_dir("sqlite-processes");
    let config = config(&dir.join("comms.db"), "poll_max_ms = 20");
    let done = dir.join("producers-done");
    // Two consumer processes share one node id: competing consumers of one mailbox.
    let consumers: Vec<Child> = (0..2)
        .map(|_| {
            spawn_child(
                "consume",
                &[("NODE", "sink".into()), ("CONFIG", config.clone()), ("DONE", done.display().to_string())],
            )
        })
        .collect();
    // Read the consumers' output while they run, so that a full pipe never stalls them.
    let consumer_readers: Vec<_> = consumers
        .into_iter()
        .map(|mut consumer| {
            std::thread::spawn(move || {
                let lines = read_marked(&mut consumer, |line| line == "done");
                (consumer, lines)
            })
        })
        .collect();
    let producers: Vec<Child> = (0..PRODUCERS)
        .map(|p| {
            spawn_child(
                "produce",
                &[
                    ("NODE", format!("producer-{p}")),
                    ("CONFIG", config.clone()),
                    ("TO", "sink".into()),
                    ("PRODUCER", p.to_string()),
                    ("COUNT", MESSAGES.to_string()),
                    ("SIZE", "200".into()),
                ],
            )
        })
        .collect();
    for (p, mut producer) in producers.into_iter().enumerate() {
        let lines = read_marked(&mut producer, |line| line == "done");
        assert_eq!(lines.last().map(String::as_str), Some("done"), "producer {p} did not finish");
        assert_eq!(lines.len() as u32, MESSAGES + 1, "producer {p}");
        finished_ok(producer, &format!("producer {p}"));
    }
    std::fs::write(&done, b"").unwrap();

    let mut received: BTreeMap<u128, u32> = BTreeMap::new();
    let mut per_consumer = Vec::new();
    for (c, reader) in consumer_readers.into_iter().enumerate() {
        let (consumer, lines) = reader.join().expect("reader thread");
        assert_eq!(lines.last().map(String::as_str), Some("done"), "consumer {c} did not finish");
        let ids: Vec<u128> = lines.iter().filter_map(|l| l.strip_prefix("got ")?.parse().ok()).collect();
        per_consumer.push(ids.len());
        for id in ids {
            *received.entry(id).or_default() += 1;
        }
        finished_ok(consumer, &format!("consumer {c}"));
    }
    let expected = PRODUCERS * MESSAGES;
    let missing: Vec<(u32, u32)> = (0..PRODUCERS)
        .flat_map(|p| (0..MESSAGES).map(move |s| (p, s)))
        .filter(|(p, s)| !received.contains_key(&((u128::from(*p) << 32) | u128::from(*s))))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {expected} missing, first {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    let duplicated = received.values().filter(|n| **n > 1).count();
    assert_eq!(duplicated, 0, "no crash, so no message may come twice");
    assert!(per_consumer.iter().all(|n| *n > 0), "both consumers took part: {per_consumer:?}");
    let connection = rusqlite::Connection::open(dir.join("comms.db")).unwrap();
    let left: i64 = connection.query_row("SELECT COUNT(*) FROM comms_mailbox", [], |r| r.get(0)).unwrap();
    assert_eq!(left, 0, "every delivered row was removed");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_killed_mid_batch_loses_nothing_its_leased_messages_come_again_after_the_lease() {
    const MESSAGES: u32 = 300;
    const LEASE_MS: u64 = 1500;
    let dir = scratch_dir("sqlite-kill-consumer");
    let config = config(&dir.join("comms.db"), &format!("lease_ms = {LEASE_MS}\npoll_max_ms = 20"));
    let producer = open("producer", &config).await;
    for sequence in 0..MESSAGES {
        producer.send("worker", message("producer", "worker", 0, sequence, 100)).await.unwrap();
    }

    let mut victim = spawn_child(
        "claim-and-hang",
        &[("NODE", "worker".into()), ("CONFIG", config.clone()), ("COUNT", "50".into())],
    );
    let lines = read_marked(&mut victim, |line| line.starts_with("claimed "));
    let claimed: Vec<u128> = lines
        .last()
        .and_then(|line| line.strip_prefix("claimed "))
        .expect("the child claimed a batch")
        .split(',')
        .map(|id| id.parse().unwrap())
        .collect();
    assert_eq!(claimed.len(), 50);
    victim.kill().unwrap(); // SIGKILL: no close, no release of the leases.
    victim.wait().unwrap();
    let killed = Instant::now();

    let successor = open("worker", &config).await;
    let mut arrival: BTreeMap<u128, Duration> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while arrival.len() < MESSAGES as usize && Instant::now() < deadline {
        let Ok(batch) = tokio::time::timeout(Duration::from_secs(5), successor.receive(64)).await else {
            break;
        };
        let batch = batch.unwrap();
        for inbound in &batch {
            assert!(intact(&inbound.envelope));
            arrival.entry(inbound.envelope.id.as_u128()).or_insert(killed.elapsed());
        }
        let accept = batch
            .iter()
            .map(|i| Settlement { delivery_tag: i.delivery_tag, outcome: SettlementOutcome::ACCEPTED })
            .collect();
        successor.settle(accept).await.unwrap();
    }
    assert_eq!(
        arrival.len(),
        MESSAGES as usize,
        "every message arrives, the killed consumer's batch included"
    );
    let earliest_redelivery = claimed.iter().map(|id| arrival[id]).min().unwrap();
    // The lease started before the kill, so allow for the time between claim and kill.
    assert!(
        earliest_redelivery >= Duration::from_millis(LEASE_MS / 2),
        "a leased message came again {earliest_redelivery:?} after the kill, before its lease of {LEASE_MS} ms ran out"
    );
    producer.close().await.unwrap();
    successor.close().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_killed_mid_write_leaves_the_file_consistent_and_every_returned_send_delivered() {
    let dir = scratch_dir("sqlite-kill-producer");
    let path = dir.join("comms.db");
    let config = config(&path, "poll_max_ms = 20");
    let mut confirmed: Vec<u128> = Vec::new();
    // Three producers in turn, each killed at a different moment while writing 64 KiB messages.
    for (producer_number, kill_after) in [(0u32, 5usize), (1, 40), (2, 120)] {
        let mut producer = spawn_child(
            "produce",
            &[
                ("NODE", format!("producer-{producer_number}")),
                ("CONFIG", config.clone()),
                ("TO", "sink".into()),
                ("PRODUCER", producer_number.to_string()),
                ("COUNT", "100000".into()),
                ("SIZE", "65536".into()),
            ],
        );
        let lines = read_marked(&mut producer, |line| line == format!("sent {kill_after}"));
        producer.kill().unwrap();
        producer.wait().unwrap();
        assert_eq!(lines.len(), kill_after + 1, "producer {producer_number} reported its sends");
        confirmed
            .extend((0..=kill_after as u32).map(|s| (u128::from(producer_number) << 32) | u128::from(s)));
    }

    let connection = rusqlite::Connection::open(&path).unwrap();
    let check: String = connection.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
    assert_eq!(check, "ok", "the database is consistent after the kills");
    drop(connection);

    let consumer = open("sink", &config).await;
    let mut received = std::collections::BTreeSet::new();
    loop {
        let Ok(batch) = tokio::time::timeout(Duration::from_millis(500), consumer.receive(64)).await else {
            break;
        };
        let batch = batch.unwrap();
        for inbound in &batch {
            assert!(intact(&inbound.envelope), "message {} is damaged", inbound.envelope.id);
            assert!(
                received.insert(inbound.envelope.id.as_u128()),
                "message {} came twice",
                inbound.envelope.id
            );
        }
        let accept = batch
            .iter()
            .map(|i| Settlement { delivery_tag: i.delivery_tag, outcome: SettlementOutcome::ACCEPTED })
            .collect();
        consumer.settle(accept).await.unwrap();
    }
    let lost: Vec<&u128> = confirmed.iter().filter(|id| !received.contains(id)).collect();
    assert!(lost.is_empty(), "{} sends that returned were lost: {lost:?}", lost.len());
    consumer.close().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
