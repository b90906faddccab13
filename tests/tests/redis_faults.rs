//! Faults of the Redis transport, for real: Redis unreachable at start, and a Redis of the
//! test's own (persistence on: `appendonly yes`, `appendfsync always`) killed and restarted in
//! the middle of a stream. No message whose `send` returned may be lost, and the receiver must
//! resume on its own.

use comms_plugin_api::{
    host_side::{LoadedTransport, PluginLibrary},
    Destination, ErrorCode, NodeId, Settlement, SettlementOutcome,
};
use comms_tests::{artifacts, free_address, scratch_dir};
use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

#[path = "support/restart_mid_stream.rs"]
mod restart_mid_stream;
use restart_mid_stream::{envelope, OwnServer, Restart};

/// A `redis-server` child process with persistence on, on a port of its own.
struct OwnRedis {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
}

impl OwnRedis {
    /// Starts one, or returns `None` (and says why) when `redis-server` is not installed; in CI
    /// that is a failure.
    fn start(dir: &Path) -> Option<Self> {
        let port = free_address().rsplit_once(':').unwrap().1.parse().unwrap();
        let mut redis = Self { child: None, port, dir: dir.to_path_buf() };
        match redis.spawn() {
            Ok(()) => Some(redis),
            Err(error) if std::env::var("CI").as_deref() != Ok("true") => {
                eprintln!("SKIPPED: cannot start redis-server ({error})");
                None
            }
            Err(error) => panic!("cannot start redis-server, and in CI a broker test must not skip: {error}"),
        }
    }

    fn spawn(&mut self) -> std::io::Result<()> {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", "yes", "--appendfsync", "always", "--daemonize", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        self.child = Some(child);
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(started.elapsed() < Duration::from_secs(10), "redis-server did not listen within 10 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Kills it as a crash would (SIGKILL: only what is on disk survives).
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A transport of the Redis plugin for node `node`.
async fn open(library: &PluginLibrary, node: &str, config: &str) -> LoadedTransport {
    restart_mid_stream::open(library, "redis", node, config).await
}

impl OwnServer for OwnRedis {
    fn kill(&mut self) {
        OwnRedis::kill(self);
    }

    fn spawn(&mut self) -> std::io::Result<()> {
        OwnRedis::spawn(self)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_mid_stream_loses_no_acknowledged_message() {
    let dir = scratch_dir("redis-restart");
    let Some(redis) = OwnRedis::start(&dir) else { return };
    let library = PluginLibrary::load(&artifacts().redis_plugin).unwrap_or_else(|error| panic!("{error}"));
    let config = format!("url = \"{}\"\nclaim_idle_ms = 1000\nblock_ms = 200\n", redis.url());
    let case = Restart {
        plugin: "redis",
        server_name: "Redis",
        library: &library,
        config: &config,
        send_limit: Duration::from_secs(20),
        // The receiving connection's XREADGROUP fails while Redis is down; the next one reconnects.
        receive_may_fail: true,
    };
    restart_mid_stream::nothing_acknowledged_is_lost(case, redis).await;
}

#[tokio::test]
async fn unreachable_redis_at_start_is_retried_then_named_without_the_password() {
    // Nothing listens on this port.
    let address = free_address();
    let config = format!(
        "url = \"redis://admin:t0p-s3cret@{address}/0\"\nconnect_attempts = 3\nconnect_backoff_ms = 100\n"
    );
    let library = PluginLibrary::load(&artifacts().redis_plugin).unwrap_or_else(|error| panic!("{error}"));
    let started = Instant::now();
    let error = library.new_transport(&NodeId::new("lonely"), "redis", &config).await.unwrap_err();
    assert!(started.elapsed() >= Duration::from_millis(300), "no backoff between the attempts");
    assert_eq!(error.code, ErrorCode::UNREACHABLE, "{error}");
    assert!(error.message.contains(&format!("redis://admin:***@{address}/0")), "names the URL: {error}");
    assert!(error.message.contains("after 3 attempts"), "{error}");
    assert!(!error.to_string().contains("t0p-s3cret"), "leaks the password: {error}");
    let error = library.new_discovery(&NodeId::new("lonely"), "redis", &config).await.unwrap_err();
    assert!(!error.to_string().contains("t0p-s3cret"), "leaks the password: {error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_subscriptions_come_back_after_a_redis_restart() {
    let dir = scratch_dir("redis-restart-topics");
    let Some(mut redis) = OwnRedis::start(&dir) else { return };
    let library = PluginLibrary::load(&artifacts().redis_plugin).unwrap_or_else(|error| panic!("{error}"));
    let config = format!("url = \"{}\"\nblock_ms = 200\n", redis.url());
    let subscriber = open(&library, "topic-subscriber", &config).await;
    let publisher = open(&library, "topic-publisher", &config).await;
    subscriber.subscribe("alerts.>").await.unwrap();
    let alert = |n: u32| {
        let mut value = envelope("topic-subscriber", n);
        value.to = Destination::Topic("alerts.disk.full".into());
        value.from = NodeId::new("topic-publisher");
        value
    };
    publisher.send("", alert(1)).await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(5), subscriber.receive(10)).await.unwrap().unwrap();
    assert_eq!(first[0].envelope, alert(1));

    redis.kill();
    redis.spawn().unwrap();
    // Pub/sub keeps nothing: publish until the subscriber, re-subscribed on its own, gets one.
    let started = Instant::now();
    let mut n = 2;
    let again = loop {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the subscription never came back after the restart"
        );
        let _ = tokio::time::timeout(Duration::from_secs(2), publisher.send("", alert(n))).await;
        if let Ok(Ok(batch)) = tokio::time::timeout(Duration::from_millis(200), subscriber.receive(10)).await
        {
            break batch;
        }
        n += 1;
    };
    assert_eq!(again[0].envelope.to, Destination::Topic("alerts.disk.full".into()));
    publisher.close().await.unwrap();
    subscriber.close().await.unwrap();
}

/// A consumer that took 200 entries and died (a redis-rs client that reads them and never
/// acknowledges, as a crashed node would leave them) on the Redis of this machine: a new
/// instance of the node gets all of them in one claim pass, once they are idle for
/// `claim_idle_ms`, however many `read_batch`es that takes, and the dead consumer is removed from
/// the group once it holds nothing and has been idle for `consumer_idle_ms`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_consumers_messages_come_back_in_one_pass_and_the_consumer_is_removed() {
    if !comms_tests::broker_available("Redis", "127.0.0.1:6379") {
        return;
    }
    const ENTRIES: usize = 200;
    let prefix = format!("t-claim-{}-{:08x}", std::process::id(), rand::random::<u32>());
    let inbox = format!("{prefix}:inbox:receiver");
    let client = redis::Client::open("redis://127.0.0.1:6379").unwrap();
    let mut raw = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&inbox)
        .arg("comms")
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut raw)
        .await
        .unwrap();
    let mut pipe = redis::pipe();
    for n in 0..ENTRIES {
        pipe.cmd("XADD").arg(&inbox).arg("*").arg("id").arg(format!("{:x}", n + 1)).arg("from").arg("sender");
        pipe.arg("payload").arg((n as u32).to_be_bytes().to_vec()).ignore();
    }
    let _: () = pipe.query_async(&mut raw).await.unwrap();
    // The instance that crashes: it takes everything and never acknowledges.
    let taken: redis::streams::StreamReadReply = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("comms")
        .arg("receiver-crashed")
        .arg("COUNT")
        .arg(ENTRIES * 2)
        .arg("STREAMS")
        .arg(&inbox)
        .arg(">")
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(taken.keys[0].ids.len(), ENTRIES);

    // 10 read batches of 20: the old reader claimed one batch per claim_idle_ms / 2.
    let config = format!(
        "prefix = \"{prefix}\"\nclaim_idle_ms = 1000\nconsumer_idle_ms = 1500\nread_batch = 20\nblock_ms = 100\n"
    );
    let library = PluginLibrary::load(&artifacts().redis_plugin).unwrap_or_else(|error| panic!("{error}"));
    let receiver = open(&library, "receiver", &config).await;
    let mut arrivals = Vec::new();
    let mut seen = HashSet::new();
    let started = Instant::now();
    while seen.len() < ENTRIES {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{} of {ENTRIES} entries of the crashed consumer came back within 20 s",
            seen.len()
        );
        let Ok(batch) = tokio::time::timeout(Duration::from_millis(200), receiver.receive(256)).await else {
            continue;
        };
        let mut settlements = Vec::new();
        for inbound in batch.unwrap() {
            let n = u32::from_be_bytes(inbound.envelope.payload.as_slice().try_into().unwrap());
            assert!(seen.insert(n), "entry {n} delivered twice");
            arrivals.push(Instant::now());
            settlements.push(Settlement {
                delivery_tag: inbound.delivery_tag,
                outcome: SettlementOutcome::ACCEPTED,
            });
        }
        receiver.settle(settlements).await.unwrap();
    }
    let spread = *arrivals.last().unwrap() - arrivals[0];
    assert!(
        spread < Duration::from_millis(1000),
        "the {ENTRIES} entries came back over {spread:?}, not in one claim pass"
    );

    // The crashed consumer holds nothing now; it goes once idle for consumer_idle_ms.
    let started = Instant::now();
    let consumers = loop {
        let info: redis::streams::StreamInfoConsumersReply = redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg(&inbox)
            .arg("comms")
            .query_async(&mut raw)
            .await
            .unwrap();
        let names: Vec<String> = info.consumers.into_iter().map(|consumer| consumer.name).collect();
        if !names.iter().any(|name| name == "receiver-crashed") {
            break names;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the crashed consumer is still in the group: {names:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(consumers.len(), 1, "the live consumer stays: {consumers:?}");
    assert!(consumers[0].starts_with("receiver-"), "{consumers:?}");
    receiver.close().await.unwrap();
    let _: i64 = redis::cmd("DEL").arg(&inbox).query_async(&mut raw).await.unwrap();
}
