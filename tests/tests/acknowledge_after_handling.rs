//! At-least-once all the way to the application: a message from Redis, RabbitMQ or SQLite is
//! settled when the application is done with it, not when it reaches the node's inbox.
//!
//! Each case fills a node's inbox at the broker, then runs `comms recv` (the real command, as a
//! user would) against it twice:
//! - killed with SIGKILL while it is blocked writing to a stdout nobody reads (a slow reader,
//!   its "handler" running), or
//! - stopped by its own `--count`, with more messages already taken from the broker;
//!
//! and a second `comms recv` must then print every message the first did not: every message is
//! handled at least once, counted. Before, the node acknowledged whole batches as soon as they
//! were in its inbox, and the first run's unprinted messages were gone (782 to 1,014 of 5,000).

use comms_host::{Node, PluginLibrary};
use comms_tests::{artifacts, broker_available, scratch_dir};
use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

/// Messages waiting in the inbox: with their padding, far more than a pipe buffer (64 KiB).
const MESSAGES: usize = 1500;
/// Lines the test reads from the first `comms recv` before it stops reading and kills it.
const READ_BEFORE_KILL: usize = 40;
/// How long the second `comms recv` may take to print everything the first did not.
const DEADLINE: Duration = Duration::from_secs(120);

struct Backend {
    /// The `[transports.NAME]` table name, and the plugin's.
    name: &'static str,
    plugin: PathBuf,
    /// The table's keys (redelivery of a dead consumer's messages after about a second).
    config: String,
}

fn text(n: usize) -> String {
    format!("msg-{n:05}-{}", "x".repeat(280))
}

fn number(line: &str) -> Option<usize> {
    line.strip_prefix("msg-")?.get(..5)?.parse().ok()
}

fn write_config(dir: &Path, node: &str, backend: &Backend) -> PathBuf {
    let path = dir.join(format!("{node}.toml"));
    let plugin_dir = artifacts().plugin_dir.display().to_string();
    let text = format!(
        "[node]\nid = \"{node}\"\nplugin_dirs = [{plugin_dir:?}]\nheartbeat_interval_ms = 0\n\n\
         [transports.{}]\n{}\n",
        backend.name, backend.config
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// Creates the receiver's inbox at the broker and fills it with [`MESSAGES`] messages.
fn fill_inbox(backend: &Backend, receiver: &str) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let library = PluginLibrary::load(&backend.plugin).unwrap();
        let inbox = Node::builder(receiver)
            .transport_library(backend.name, library.clone(), &backend.config)
            .build()
            .await
            .unwrap();
        let address = inbox.transports()[0].local_address.clone();
        inbox.close().await.unwrap();
        let sender = Node::builder(format!("{receiver}-sender"))
            .transport_library(backend.name, library, &backend.config)
            .static_peer(receiver, [(backend.name, address.as_str())])
            .build()
            .await
            .unwrap();
        for n in 0..MESSAGES {
            sender.send(receiver, &text(n)).await.unwrap();
        }
        sender.close().await.unwrap();
    });
}

/// `comms recv` with its stdout read line by line on a thread of its own.
fn start_recv(config: &Path, extra: &[&str]) -> (Child, mpsc::Receiver<String>) {
    let mut child = Command::new(&artifacts().comms_bin)
        .args(["recv", "--config"])
        .arg(config)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (lines, received) = mpsc::sync_channel(4096);
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if lines.send(line).is_err() {
                return;
            }
        }
    });
    (child, received)
}

/// Reads numbered lines into `seen` until `done` says so or the deadline passes.
fn read_until(
    lines: &mpsc::Receiver<String>,
    seen: &mut BTreeSet<usize>,
    printed: &mut usize,
    mut done: impl FnMut(&BTreeSet<usize>, usize) -> bool,
) {
    let started = Instant::now();
    while !done(seen, *printed) && started.elapsed() < DEADLINE {
        match lines.recv_timeout(Duration::from_millis(500)) {
            Ok(line) => {
                if let Some(n) = number(&line) {
                    seen.insert(n);
                    *printed += 1;
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// How the first `comms recv` ends.
#[derive(Debug, Clone, Copy)]
enum FirstRun {
    /// SIGKILL while blocked on a full stdout.
    Killed,
    /// `--count 100`: it exits by itself with messages taken and not printed.
    Counted,
}

fn nothing_is_lost(backend: Backend, first: FirstRun) {
    let dir = scratch_dir(&format!("ack-{}-{first:?}", backend.name));
    let receiver =
        format!("ack-{}-{:?}-{}-{:x}", backend.name, first, std::process::id(), rand::random::<u32>())
            .to_lowercase();
    let config = write_config(&dir, &receiver, &backend);
    fill_inbox(&backend, &receiver);

    let mut seen = BTreeSet::new();
    let mut printed_first = 0;
    match first {
        FirstRun::Killed => {
            let mut child = Command::new(&artifacts().comms_bin)
                .args(["recv", "--config"])
                .arg(&config)
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let mut stdout = BufReader::new(child.stdout.take().unwrap());
            let mut count = |line: &str| {
                if let Some(n) = number(line) {
                    seen.insert(n);
                    printed_first += 1;
                }
            };
            // A slow reader: a few lines, then nothing, so the child soon blocks writing to a
            // full pipe in the middle of its work (it has taken far more from the broker).
            let mut line = String::new();
            let mut read = 0;
            while read < READ_BEFORE_KILL && stdout.read_line(&mut line).unwrap() > 0 {
                count(line.trim_end());
                line.clear();
                read += 1;
            }
            child.kill().unwrap();
            child.wait().unwrap();
            // What it printed before it died was handled (and maybe acknowledged): count it.
            for line in stdout.lines() {
                count(&line.unwrap());
            }
        }
        FirstRun::Counted => {
            let (mut child, lines) = start_recv(&config, &["--count", "100"]);
            read_until(&lines, &mut seen, &mut printed_first, |_, _| false);
            assert!(child.wait().unwrap().success(), "comms recv --count 100 exits by itself");
            assert_eq!(printed_first, 100, "--count 100 prints 100 messages");
        }
    }
    assert!(seen.len() < MESSAGES, "the first run must leave messages behind ({} printed)", seen.len());

    let (mut child, lines) = start_recv(&config, &[]);
    let mut printed_second = 0;
    read_until(&lines, &mut seen, &mut printed_second, |seen, _| seen.len() == MESSAGES);
    let _ = child.kill();
    let _ = child.wait();
    let missing: Vec<usize> = (0..MESSAGES).filter(|n| !seen.contains(n)).collect();
    eprintln!(
        "{} ({first:?}): first run printed {printed_first}, second {printed_second}, {} handled twice, {} missing",
        backend.name,
        (printed_first + printed_second).saturating_sub(seen.len()),
        missing.len()
    );
    assert!(
        missing.is_empty(),
        "{} messages lost ({} of {MESSAGES} printed in all), e.g. {:?}",
        missing.len(),
        seen.len(),
        &missing[..missing.len().min(10)]
    );
    let _ = std::fs::remove_dir_all(dir);
}

fn redis() -> Option<Backend> {
    if !broker_available("Redis", "127.0.0.1:6379") {
        return None;
    }
    let prefix = format!("comms-ack-{}-{:x}", std::process::id(), rand::random::<u32>());
    Some(Backend {
        name: "redis",
        plugin: artifacts().redis_plugin.clone(),
        config: format!("prefix = \"{prefix}\"\nblock_ms = 200\nclaim_idle_ms = 1000"),
    })
}

fn amqp() -> Option<Backend> {
    if !broker_available("RabbitMQ", "127.0.0.1:5672") {
        return None;
    }
    Some(Backend {
        name: "amqp",
        plugin: artifacts().amqp_plugin.clone(),
        config: "inbox_expires_ms = 600000".to_string(),
    })
}

fn sqlite(name: &str) -> Backend {
    let database = scratch_dir(&format!("ack-sqlite-{name}")).join("comms.db");
    Backend {
        name: "sqlite",
        plugin: artifacts().sqlite_plugin.clone(),
        config: format!("database = {:?}\nlease_ms = 1000", database.display().to_string()),
    }
}

#[test]
fn redis_consumer_killed_while_handling_loses_nothing() {
    if let Some(backend) = redis() {
        nothing_is_lost(backend, FirstRun::Killed);
    }
}

#[test]
fn redis_consumer_stopped_by_its_count_loses_nothing() {
    if let Some(backend) = redis() {
        nothing_is_lost(backend, FirstRun::Counted);
    }
}

#[test]
fn amqp_consumer_killed_while_handling_loses_nothing() {
    if let Some(backend) = amqp() {
        nothing_is_lost(backend, FirstRun::Killed);
    }
}

#[test]
fn amqp_consumer_stopped_by_its_count_loses_nothing() {
    if let Some(backend) = amqp() {
        nothing_is_lost(backend, FirstRun::Counted);
    }
}

#[test]
fn sqlite_consumer_killed_while_handling_loses_nothing() {
    nothing_is_lost(sqlite("killed"), FirstRun::Killed);
}

#[test]
fn sqlite_consumer_stopped_by_its_count_loses_nothing() {
    nothing_is_lost(sqlite("counted"), FirstRun::Counted);
}
