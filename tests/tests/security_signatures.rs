//! End-to-end envelope signatures over a real broker: two nodes with
//! `signatures = "require"` talk through Redis, while messages forged by someone with access to
//! the broker (written straight into a node's inbox stream, in the format of docs/redis.md) are
//! refused and never delivered: unsigned, badly signed, signed by a key not on the allow-list,
//! stale, and a replay of a captured genuine message. Also: what a `comms` process logs with
//! `RUST_LOG=debug` never contains a secret key.

use comms_host::{
    security::{sign_envelope, SIGNATURE_HEADER, SIGNED_AT_HEADER},
    Codec, Envelope, MessageId, Node, NodeId, PluginLibrary, Received, Security, SignatureMode,
};
use comms_plugin_api::{
    security::{identity::hex_encode, Identity},
    Destination, Payload,
};
use comms_tests::{artifacts, broker_available, scratch_dir, write_config};
use redis::{
    aio::MultiplexedConnection,
    streams::{StreamRangeReply, StreamReadReply},
};
use serde::{Deserialize, Serialize};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const REDIS: &str = "127.0.0.1:6379";
const WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Add {
    a: i64,
    b: i64,
}

fn prefix(test: &str) -> String {
    format!("comms-test-{}-{:06x}-{test}", std::process::id(), rand::random::<u32>() & 0xff_ffff)
}

async fn connection() -> MultiplexedConnection {
    let client = redis::Client::open(format!("redis://{REDIS}")).unwrap();
    client.get_multiplexed_async_connection().await.unwrap()
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

fn allow(identities: &[&Identity]) -> Vec<String> {
    identities.iter().map(|identity| identity.public_key().to_hex()).collect()
}

async fn signed_node(
    library: &PluginLibrary,
    label: &str,
    identity: &Identity,
    allow: Vec<String>,
    prefix: &str,
) -> Node {
    let transport = format!("prefix = \"{prefix}\"\nblock_ms = 200\n");
    let discovery =
        format!("prefix = \"{prefix}\"\nttl_ms = 1500\nheartbeat_ms = 200\nscan_interval_ms = 200\n");
    Node::builder(label)
        .identity(identity.clone())
        .security(Security { signatures: SignatureMode::Require, allow, ..Security::default() })
        .liveness(Some(Duration::from_millis(200)), Duration::from_secs(3))
        .transport_library("redis", library.clone(), &transport)
        .discovery_library(library.clone(), &discovery)
        .build()
        .await
        .unwrap_or_else(|error| panic!("node {label}: {error}"))
}

async fn until(what: &str, condition: impl Fn() -> bool) {
    let started = tokio::time::Instant::now();
    while !condition() {
        assert!(started.elapsed() < WAIT, "{what} did not happen within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn receive_text(node: &Node) -> Received<String> {
    let mut received =
        tokio::time::timeout(WAIT, node.receive::<String>()).await.expect("a message in time").unwrap();
    received.ack();
    received
}

/// A text message from `from` to `to` as a comms node would build it (unsigned).
fn text_envelope(from: &NodeId, to: &NodeId, text: &str) -> Envelope {
    Envelope::new(
        MessageId::from_u128(rand::random()),
        from.clone(),
        Destination::Node(to.clone()),
        Payload::from(Codec::Binary.encode(&text.to_string()).unwrap()),
    )
    .with_headers(vec![("content-type".into(), Codec::Binary.content_type().into())])
}

/// The stream entry fields of docs/redis.md for a message to the inbox's own node.
fn entry_fields(envelope: &Envelope) -> Vec<(String, Vec<u8>)> {
    let headers: Vec<[&str; 2]> = envelope.headers.iter().map(|(n, v)| [n, v]).collect();
    vec![
        ("v".into(), b"1".to_vec()),
        ("id".into(), envelope.id.to_string().into_bytes()),
        ("from".into(), envelope.from.as_str().as_bytes().to_vec()),
        ("headers".into(), serde_json::to_vec(&headers).unwrap()),
        ("payload".into(), envelope.payload.as_slice().to_vec()),
    ]
}

/// What an attacker with broker access does: `XADD` straight into an inbox.
async fn inject(connection: &mut MultiplexedConnection, inbox: &str, fields: &[(String, Vec<u8>)]) {
    let mut command = redis::cmd("XADD");
    command.arg(inbox).arg("*");
    for (name, value) in fields {
        command.arg(name).arg(value.as_slice());
    }
    let _: String = command.query_async(connection).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_nodes_exchange_messages_and_requests_over_redis() {
    if !broker_available("Redis", REDIS) {
        return;
    }
    let prefix = prefix("signed");
    let library = PluginLibrary::load(&artifacts().redis_plugin).unwrap_or_else(|error| panic!("{error}"));
    let (alice_key, bob_key) = (Identity::generate(), Identity::generate());
    let keys = allow(&[&alice_key, &bob_key]);
    let alice = signed_node(&library, "alice", &alice_key, keys.clone(), &prefix).await;
    let bob = signed_node(&library, "bob", &bob_key, keys, &prefix).await;
    assert_eq!(bob.id(), &bob_key.node_id(Some("bob")));

    bob.serve("math.add", |request: Received<Add>| async move {
        Ok::<_, String>(request.message.a + request.message.b)
    })
    .await
    .unwrap();
    let serves = || alice.peers().iter().any(|peer| peer.record.services.iter().any(|s| s == "math.add"));
    until("alice learning of math.add", serves).await;
    // A heartbeat bob sent before serving may still be on its way and briefly hide the service.
    // Bob's messages reach alice in the order he sent them (one stream, one reader), so once a
    // message bob sends now has arrived, every heartbeat sent before it has been applied.
    bob.send(alice.id().clone(), &"served".to_string()).await.unwrap();
    assert_eq!(receive_text(&alice).await.message, "served");
    assert!(serves(), "alice knows of math.add from bob's latest record");
    for a in 0..10 {
        let sum: i64 =
            tokio::time::timeout(WAIT, alice.request("math.add", &Add { a, b: 1 })).await.unwrap().unwrap();
        assert_eq!(sum, a + 1);
    }
    for n in 0..20 {
        alice.send(bob.id().clone(), &format!("hello {n}")).await.unwrap();
    }
    for n in 0..20 {
        let received = receive_text(&bob).await;
        assert_eq!(received.message, format!("hello {n}"));
        assert_eq!(&received.from, alice.id());
        let names: Vec<&str> = received.headers.iter().map(|(n, _)| n).collect();
        assert!(names.contains(&SIGNATURE_HEADER) && names.contains(&SIGNED_AT_HEADER), "{names:?}");
    }
    // Native topics (Redis pub/sub) carry signed publications too.
    // Returns once Redis confirmed the PSUBSCRIBE: a publication from then on reaches bob.
    let mut topic = bob.subscribe::<String>("news.*").await.unwrap();
    alice.publish("news.today", &"extra".to_string()).await.unwrap();
    let published = tokio::time::timeout(WAIT, topic.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(published.message, "extra");
    assert_eq!((alice.rejected_count(), bob.rejected_count()), (0, 0), "nothing genuine was refused");
    alice.close().await.unwrap();
    bob.close().await.unwrap();
    comms_tests::delete_redis_keys(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_forged_with_broker_access_are_refused_and_never_delivered() {
    if !broker_available("Redis", REDIS) {
        return;
    }
    let prefix = prefix("forged");
    let library = PluginLibrary::load(&artifacts().redis_plugin).unwrap_or_else(|error| panic!("{error}"));
    let (alice_key, bob_key, mallory_key) =
        (Identity::generate(), Identity::generate(), Identity::generate());
    let keys = allow(&[&alice_key, &bob_key]);
    let alice = signed_node(&library, "alice", &alice_key, keys.clone(), &prefix).await;
    let bob = signed_node(&library, "bob", &bob_key, keys, &prefix).await;
    until("alice knowing bob", || alice.peers().iter().any(|peer| &peer.record.id == bob.id())).await;
    alice.send(bob.id().clone(), &"genuine 0".to_string()).await.unwrap();
    assert_eq!(receive_text(&bob).await.message, "genuine 0");

    // Capture a genuine message on its way through Redis: a blocking XREAD is served the entry
    // the moment it is added (heartbeats pass by too; skip them).
    let inbox = format!("{prefix}:inbox:{}", bob.id());
    // The tap reads what comes after the inbox's last entry now, however late its XREAD starts.
    let newest: StreamRangeReply = redis::cmd("XREVRANGE")
        .arg(&inbox)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query_async(&mut connection().await)
        .await
        .unwrap();
    let after = newest.ids.first().map_or_else(|| "0".to_string(), |entry| entry.id.clone());
    let tap_inbox = inbox.clone();
    // The receiver deletes an entry once it has it (`XACK`, `XDEL`), so the tap must be reading
    // before the message is sent: its connection is named, and the send waits until Redis lists
    // that connection in `XREAD`.
    let tap_name = format!("comms-signatures-tap-{}", std::process::id());
    let mut tap = connection().await;
    redis::cmd("CLIENT").arg("SETNAME").arg(&tap_name).query_async::<()>(&mut tap).await.unwrap();
    let tap = tokio::spawn(async move {
        let mut last = after;
        loop {
            let reply: Option<StreamReadReply> = redis::cmd("XREAD")
                .arg("BLOCK")
                .arg(10_000)
                .arg("STREAMS")
                .arg(&tap_inbox)
                .arg(&last)
                .query_async(&mut tap)
                .await
                .unwrap();
            let reply = reply.expect("an entry within 10 s");
            for entry in reply.keys.into_iter().flat_map(|key| key.ids) {
                last = entry.id.clone();
                let fields: Vec<(String, Vec<u8>)> = entry
                    .map
                    .iter()
                    .map(|(name, value)| (name.clone(), redis::from_redis_value::<Vec<u8>>(value).unwrap()))
                    .collect();
                let headers = fields.iter().find(|(n, _)| n == "headers").map(|(_, v)| v.clone());
                let is_framework =
                    headers.is_some_and(|h| String::from_utf8_lossy(&h).contains("comms-kind"));
                if !is_framework {
                    return fields;
                }
            }
        }
    });
    let mut watcher = connection().await;
    let started = tokio::time::Instant::now();
    loop {
        let clients: String = redis::cmd("CLIENT").arg("LIST").query_async(&mut watcher).await.unwrap();
        let reading =
            |client: &str| client.contains(&format!(" name={tap_name} ")) && client.contains(" cmd=xread");
        if clients.lines().any(reading) {
            break;
        }
        assert!(started.elapsed() < WAIT, "the tap was not reading within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    alice.send(bob.id().clone(), &"genuine 1".to_string()).await.unwrap();
    assert_eq!(receive_text(&bob).await.message, "genuine 1");
    let captured = tokio::time::timeout(WAIT, tap).await.unwrap().unwrap();
    let text =
        |fields: &[(String, Vec<u8>)]| fields.iter().any(|(_, v)| v.windows(9).any(|w| w == b"genuine 1"));
    assert!(text(&captured), "the tap caught the genuine message");

    let mut redis = connection().await;
    let (alice_id, bob_id) = (alice.id().clone(), bob.id().clone());
    // 1. Unsigned, claiming to be alice.
    let unsigned = text_envelope(&alice_id, &bob_id, "forged: unsigned");
    inject(&mut redis, &inbox, &entry_fields(&unsigned)).await;
    // 2. Claiming to be alice, signed by mallory's key.
    let mut wrong_key = text_envelope(&alice_id, &bob_id, "forged: signed by mallory as alice");
    sign_envelope(&mallory_key, &mut wrong_key, now_ms()).unwrap();
    inject(&mut redis, &inbox, &entry_fields(&wrong_key)).await;
    // 3. Signed by alice, then altered.
    let mut tampered = text_envelope(&alice_id, &bob_id, "genuine 9");
    sign_envelope(&alice_key, &mut tampered, now_ms()).unwrap();
    tampered.payload = Payload::from(Codec::Binary.encode(&"forged: tampered".to_string()).unwrap());
    inject(&mut redis, &inbox, &entry_fields(&tampered)).await;
    // 4. Mallory as herself, validly signed, but not on the allow-list.
    let mallory_id = mallory_key.node_id(Some("mallory"));
    let mut unlisted = text_envelope(&mallory_id, &bob_id, "forged: unlisted key");
    sign_envelope(&mallory_key, &mut unlisted, now_ms()).unwrap();
    inject(&mut redis, &inbox, &entry_fields(&unlisted)).await;
    // 5. A replay of the captured genuine message.
    inject(&mut redis, &inbox, &captured).await;
    // 6. Validly signed by alice, but long ago.
    let mut stale = text_envelope(&alice_id, &bob_id, "forged: stale");
    sign_envelope(&alice_key, &mut stale, now_ms() - 3_600_000).unwrap();
    inject(&mut redis, &inbox, &entry_fields(&stale)).await;
    // 7. A signature that is not even hex.
    let mut garbage = text_envelope(&alice_id, &bob_id, "forged: garbage signature");
    garbage.headers.push(SIGNED_AT_HEADER, now_ms().to_string());
    garbage.headers.push(SIGNATURE_HEADER, "zz".repeat(64));
    inject(&mut redis, &inbox, &entry_fields(&garbage)).await;

    // Genuine messages still arrive, and they are the only thing that does.
    alice.send(bob.id().clone(), &"genuine 2".to_string()).await.unwrap();
    let next = receive_text(&bob).await;
    assert_eq!(next.message, "genuine 2", "a forged message was delivered: {next:?}");
    until("bob refusing all seven forgeries", || bob.rejected_count() >= 7).await;
    let more = tokio::time::timeout(Duration::from_millis(500), bob.receive::<String>()).await;
    assert!(more.is_err(), "delivered although forged: {more:?}");
    assert_eq!(bob.rejected_count(), 7, "genuine heartbeats must not be refused");
    assert_eq!(alice.rejected_count(), 0);

    // Refused entries were settled for good: acknowledged and deleted, not left to come back.
    let started = tokio::time::Instant::now();
    loop {
        let length: u64 = redis::cmd("XLEN").arg(&inbox).query_async(&mut redis).await.unwrap();
        if length == 0 {
            break;
        }
        assert!(started.elapsed() < WAIT, "{length} entries left in bob's inbox");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    alice.close().await.unwrap();
    bob.close().await.unwrap();
    comms_tests::delete_redis_keys(&prefix).await;
}

#[test]
fn comms_processes_never_log_secret_keys() {
    if !broker_available("Redis", REDIS) {
        return;
    }
    let dir = scratch_dir("secret-logs");
    let prefix = prefix("logs");
    let (alice_key, bob_key) = (Identity::generate(), Identity::generate());
    alice_key.save_new(&dir.join("alice.key")).unwrap();
    bob_key.save_new(&dir.join("bob.key")).unwrap();
    let secrets = [hex_encode(&alice_key.secret_bytes()), hex_encode(&bob_key.secret_bytes())];
    let config = |label: &str| {
        format!(
            "[node]\nid = \"{label}\"\nkey_file = \"{label}.key\"\nheartbeat_interval_ms = 200\npeer_timeout_ms = 3000\n\n\
             [security]\nsignatures = \"require\"\nallow = [\"{}\", \"{}\"]\n\n\
             [transports.redis]\npath = \"{plugin}\"\nprefix = \"{prefix}\"\nblock_ms = 200\n\n\
             [discovery]\npath = \"{plugin}\"\nprefix = \"{prefix}\"\nttl_ms = 1500\nheartbeat_ms = 200\n",
            alice_key.public_key(),
            bob_key.public_key(),
            plugin = artifacts().redis_plugin.display(),
        )
    };
    let alice_config = write_config(&dir, "alice.toml", &config("alice"));
    let bob_config = write_config(&dir, "bob.toml", &config("bob"));
    let bob_id = bob_key.node_id(Some("bob"));

    let bob_log = dir.join("bob.log");
    let bob = std::process::Command::new(&artifacts().comms_bin)
        .args(["recv", "--count", "1", "--config"])
        .arg(&bob_config)
        .env("RUST_LOG", "debug")
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&bob_log).unwrap())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while !std::fs::read_to_string(&bob_log).unwrap().contains("transport `redis`") {
        assert!(
            started.elapsed() < WAIT,
            "bob did not start: {}",
            std::fs::read_to_string(&bob_log).unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // A forgery first, so the refusal path logs too.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let forged = text_envelope(&alice_key.node_id(Some("alice")), &bob_id, "forged");
        inject(&mut connection().await, &format!("{prefix}:inbox:{bob_id}"), &entry_fields(&forged)).await;
    });
    let sent = std::process::Command::new(&artifacts().comms_bin)
        .args(["send", "--to", bob_id.as_str(), "--config"])
        .arg(&alice_config)
        .arg("hello bob")
        .env("RUST_LOG", "debug")
        .output()
        .unwrap();
    assert!(sent.status.success(), "{sent:?}");
    let bob_output = bob.wait_with_output().unwrap();
    assert!(bob_output.status.success());
    let bob_stdout = String::from_utf8_lossy(&bob_output.stdout).into_owned();
    assert!(bob_stdout.contains("hello bob"), "{bob_stdout}");
    let bob_stderr = std::fs::read_to_string(&bob_log).unwrap();
    assert!(
        bob_stderr.contains("incoming envelope refused") && bob_stderr.contains("unsigned"),
        "{bob_stderr}"
    );
    assert!(bob_stderr.contains("DEBUG"), "debug logging was on");
    let everything = [
        bob_stdout,
        bob_stderr,
        String::from_utf8_lossy(&sent.stdout).into_owned(),
        String::from_utf8_lossy(&sent.stderr).into_owned(),
    ]
    .join("\n");
    for secret in &secrets {
        assert!(!everything.contains(secret.as_str()), "a secret key was logged");
        assert!(!everything.contains(&secret[..16]), "part of a secret key was logged");
    }
    runtime.block_on(comms_tests::delete_redis_keys(&prefix));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A relay forwards signed envelopes unchanged, so they verify at the far end; the relay and the
/// receiver both check them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_forwards_signed_envelopes_unchanged() {
    let memory = PluginLibrary::load(&artifacts().memory_plugin).unwrap();
    let tcp = PluginLibrary::load(&artifacts().tcp_plugin).unwrap();
    let keys = [Identity::generate(), Identity::generate(), Identity::generate()];
    let [bridge_key, left_key, right_key] = &keys;
    let allowed = allow(&[bridge_key, left_key, right_key]);
    let security =
        || Security { signatures: SignatureMode::Require, allow: allowed.clone(), ..Security::default() };
    let (left_id, right_id) = (left_key.node_id(Some("left")), right_key.node_id(Some("right")));
    let address = |name: &str| format!("memory://signed-relay-{}-{name}", std::process::id());
    let bridge = Node::builder("bridge")
        .identity(bridge_key.clone())
        .security(security())
        .relay(true)
        .transport_library("memory", memory.clone(), &format!("address = \"{}\"", address("bridge")))
        .transport_library("tcp", tcp.clone(), "")
        .static_peer(left_id.as_str(), [("memory", address("left").as_str())])
        .build()
        .await
        .unwrap();
    let bridge_tcp = bridge.transports()[1].local_address.clone();
    let left = Node::builder("left")
        .identity(left_key.clone())
        .security(security())
        .transport_library("memory", memory, &format!("address = \"{}\"", address("left")))
        .static_peer(right_id.as_str(), [("memory", address("bridge").as_str())])
        .build()
        .await
        .unwrap();
    let right = Node::builder("right")
        .identity(right_key.clone())
        .security(security())
        .transport_library("tcp", tcp, "")
        .static_peer(left_id.as_str(), [("tcp", bridge_tcp.as_str())])
        .build()
        .await
        .unwrap();
    until("the bridge hearing of right", || bridge.peers().iter().any(|p| p.record.id == right_id)).await;
    for i in 0..20u32 {
        left.send(right_id.clone(), &format!("across {i}")).await.unwrap();
    }
    for i in 0..20u32 {
        let received = receive_text(&right).await;
        assert_eq!((&received.from, received.message), (&left_id, format!("across {i}")));
        right.send(left_id.clone(), &format!("back {i}")).await.unwrap();
    }
    for i in 0..20u32 {
        let reply = receive_text(&left).await;
        assert_eq!((&reply.from, reply.message), (&right_id, format!("back {i}")));
    }
    for node in [&left, &right, &bridge] {
        assert_eq!(node.rejected_count(), 0, "{} refused a relayed envelope", node.id());
    }
    for node in [left, right, bridge] {
        node.close().await.unwrap();
    }
}

/// The same over a shared SQLite file, nodes from config files: rows inserted into a mailbox by
/// someone who can write the file are refused unless signed by an allowed sender.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_forged_into_a_sqlite_mailbox_are_refused() {
    let dir = scratch_dir("signed-sqlite");
    let database = dir.join("comms.db");
    let (alice_key, bob_key, mallory_key) =
        (Identity::generate(), Identity::generate(), Identity::generate());
    alice_key.save_new(&dir.join("alice.key")).unwrap();
    bob_key.save_new(&dir.join("bob.key")).unwrap();
    let config = |label: &str| {
        let text = format!(
            "[node]\nid = \"{label}\"\nkey_file = \"{label}.key\"\nplugin_dirs = [{:?}]\n\
             heartbeat_interval_ms = 200\npeer_timeout_ms = 2000\n\n\
             [security]\nsignatures = \"require\"\nallow = [\"alice-{}\", \"{}\"]\n\n\
             [transports.sqlite]\ndatabase = {database:?}\npoll_max_ms = 50\n\n\
             [discovery]\nplugin = \"sqlite\"\ndatabase = {database:?}\nheartbeat_ms = 100\npeer_timeout_ms = 1000\n",
            artifacts().plugin_dir,
            alice_key.public_key(),
            bob_key.public_key(),
        );
        write_config(&dir, &format!("{label}.toml"), &text)
    };
    let alice = Node::from_config(config("alice")).await.unwrap_or_else(|error| panic!("{error}"));
    let bob = Node::from_config(config("bob")).await.unwrap_or_else(|error| panic!("{error}"));
    until("alice knowing bob", || alice.peers().iter().any(|peer| &peer.record.id == bob.id())).await;

    let (alice_id, bob_id) = (alice.id().clone(), bob.id().clone());
    let unsigned = text_envelope(&alice_id, &bob_id, "forged: unsigned row");
    let mut wrong_key = text_envelope(&alice_id, &bob_id, "forged: signed by mallory");
    sign_envelope(&mallory_key, &mut wrong_key, now_ms()).unwrap();
    // Written by another process, as an intruder would (a second copy of SQLite in this process
    // would break the plugin's file locks).
    let mut statements = String::from("import sqlite3, sys\ndb = sqlite3.connect(sys.argv[1], timeout=5)\n");
    for envelope in [&unsigned, &wrong_key] {
        let mut bytes = Vec::new();
        comms_plugin_api::wire::encode_envelope(envelope, &mut bytes).unwrap();
        statements += &format!(
            "db.execute('INSERT INTO comms_mailbox (recipient, envelope, enqueued_at) VALUES (?, ?, ?)', \
             ('{bob_id}', bytes.fromhex('{}'), {}))\n",
            hex_encode(&bytes),
            now_ms()
        );
    }
    statements += "db.commit()\n";
    let inserted =
        std::process::Command::new("python3").arg("-c").arg(&statements).arg(&database).output().unwrap();
    assert!(inserted.status.success(), "{inserted:?}");
    alice.send(bob_id.clone(), &"genuine".to_string()).await.unwrap();
    let received = receive_text(&bob).await;
    assert_eq!((&received.from, received.message.as_str()), (&alice_id, "genuine"));
    until("bob refusing both rows", || bob.rejected_count() >= 2).await;
    let more = tokio::time::timeout(Duration::from_millis(500), bob.receive::<String>()).await;
    assert!(more.is_err(), "delivered although forged: {more:?}");
    assert_eq!(bob.rejected_count(), 2);
    alice.close().await.unwrap();
    bob.close().await.unwrap();
    // Settled for good: the transport moved both rows to the dead letters. (Looked at once the
    // nodes are closed: this process's SQLite and the plugin's are two copies of the library.)
    let file = rusqlite::Connection::open(&database).unwrap();
    let discarded: i64 = file
        .query_row(
            "SELECT COUNT(*) FROM comms_dead_letter WHERE reason LIKE '%REJECTED_DISCARD%'",
            [],
            |row| row.get(0),
        )
        .unwrap();
    assert_eq!(discarded, 2, "both forged rows are dead letters");
    // Bob's mailbox may still hold alice's control messages (a heartbeat, her goodbye) sent while
    // the two were closing; neither forged row may be among them.
    let waiting: Vec<Vec<u8>> = {
        let mut rows = file.prepare("SELECT envelope FROM comms_mailbox WHERE recipient = ?1").unwrap();
        rows.query_map([bob_id.as_str()], |row| row.get(0)).unwrap().map(Result::unwrap).collect()
    };
    for bytes in &waiting {
        let envelope = comms_plugin_api::wire::decode_envelope(bytes).unwrap();
        assert!(
            envelope.id != unsigned.id && envelope.id != wrong_key.id,
            "a forged row is still in bob's mailbox: {envelope:?}"
        );
    }
    drop(file);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A node's own envelopes come back to it (a request to a service it serves itself): they are
/// checked like any other, but its key need not be on its own allow-list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_calls_its_own_service_without_allowing_itself() {
    let memory = PluginLibrary::load(&artifacts().memory_plugin).unwrap();
    let identity = Identity::generate();
    let someone_else = Identity::generate();
    let node = Node::builder("solo")
        .identity(identity)
        .security(Security {
            signatures: SignatureMode::Require,
            allow: allow(&[&someone_else]),
            ..Security::default()
        })
        .transport_library(
            "memory",
            memory,
            &format!("address = \"memory://signed-solo-{}\"", std::process::id()),
        )
        .build()
        .await
        .unwrap();
    node.serve("shout", |request: Received<String>| async move {
        Ok::<_, String>(request.message.to_uppercase())
    })
    .await
    .unwrap();
    let answer: String = tokio::time::timeout(WAIT, node.request("shout", "hey")).await.unwrap().unwrap();
    assert_eq!(answer, "HEY");
    node.send(node.id().clone(), &"note to self".to_string()).await.unwrap();
    let received = receive_text(&node).await;
    assert_eq!(received.message, "note to self");
    assert!(
        received.headers.iter().any(|(name, _)| name == SIGNATURE_HEADER),
        "it went through the transport, signed"
    );
    assert_eq!(node.rejected_count(), 0);
    node.close().await.unwrap();
}
