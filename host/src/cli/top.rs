//! `comms top`: a live table of the cluster as one node sees it. Every interval it asks itself
//! and every peer that is up for its status (`comms_host::admin`), and prints one row per node:
//! messages per second in and out since the last frame, queues, errors and peers.
//!
//! On a terminal each frame replaces the last; otherwise (a pipe, a test) frames follow each
//! other, separated by a blank line. `--count N` stops after N frames.

use super::{other, CliError};
use comms_host::{admin::NodeStatus, Node};
use std::{
    collections::HashMap,
    io::{IsTerminal, Write},
    path::Path,
    process::ExitCode,
    time::{Duration, Instant},
};

/// One node's line of a frame.
#[derive(Debug, Clone, PartialEq)]
struct Row {
    node: String,
    uptime_s: f64,
    /// Messages per second since the previous frame (`None` in the first one).
    in_per_s: Option<f64>,
    out_per_s: Option<f64>,
    inbox: u64,
    waiting: u64,
    serving: u64,
    errors: u64,
    peers_up: usize,
    peers: usize,
}

/// What a node's transports had moved, for the next frame's rates.
#[derive(Debug, Clone, Copy)]
struct Totals {
    received: u64,
    sent: u64,
    at: Instant,
}

fn totals(status: &NodeStatus, at: Instant) -> Totals {
    let received = status.transports.iter().map(|t| t.messages_received).sum();
    let sent = status.transports.iter().map(|t| t.messages_sent).sum();
    Totals { received, sent, at }
}

/// A node's row, with rates against `before` (its totals in the previous frame).
fn row(status: &NodeStatus, now: Totals, before: Option<Totals>) -> Row {
    let rate = |now: u64, then: u64, seconds: f64| now.saturating_sub(then) as f64 / seconds;
    let seconds =
        before.map(|then| now.at.saturating_duration_since(then.at).as_secs_f64()).filter(|s| *s > 0.0);
    let (in_per_s, out_per_s) = match (before, seconds) {
        (Some(then), Some(seconds)) => {
            (Some(rate(now.received, then.received, seconds)), Some(rate(now.sent, then.sent, seconds)))
        }
        _ => (None, None),
    };
    Row {
        node: status.id.clone(),
        uptime_s: status.uptime_ms as f64 / 1000.0,
        in_per_s,
        out_per_s,
        inbox: status.inbox_depth,
        waiting: status.requests_waiting,
        serving: status.requests_being_served,
        errors: status.transports.iter().map(|t| t.send_errors + t.errors + t.plugin_panics).sum(),
        peers_up: status.peers.iter().filter(|peer| peer.status == "up").count(),
        peers: status.peers.len(),
    }
}

fn render(rows: &[Row], unreachable: &[String]) -> String {
    let rate = |value: Option<f64>| value.map_or_else(|| "-".to_string(), |v| format!("{v:.0}"));
    let mut text = format!(
        "{:<32} {:>8} {:>9} {:>9} {:>6} {:>7} {:>7} {:>6} {:>7}\n",
        "node", "up s", "in msg/s", "out msg/s", "inbox", "waiting", "serving", "errors", "peers"
    );
    for row in rows {
        text += &format!(
            "{:<32} {:>8.0} {:>9} {:>9} {:>6} {:>7} {:>7} {:>6} {:>7}\n",
            row.node,
            row.uptime_s,
            rate(row.in_per_s),
            rate(row.out_per_s),
            row.inbox,
            row.waiting,
            row.serving,
            row.errors,
            format!("{}/{}", row.peers_up, row.peers)
        );
    }
    for node in unreachable {
        text += &format!("{node:<32} (no answer)\n");
    }
    text
}

pub(super) async fn run(config: &Path, interval_ms: u64, count: Option<u64>) -> Result<ExitCode, CliError> {
    let node = Node::from_config(config).await?;
    let result = frames(&node, Duration::from_millis(interval_ms.max(100)), count).await;
    let closed = node.close().await;
    result?;
    closed.map_err(other)?;
    Ok(ExitCode::SUCCESS)
}

async fn frames(node: &Node, interval: Duration, count: Option<u64>) -> Result<(), CliError> {
    let terminal = std::io::stdout().is_terminal();
    let mut previous: HashMap<String, Totals> = HashMap::new();
    let stop = super::node_commands::stop_signal();
    tokio::pin!(stop);
    let mut frame = 0u64;
    // The first frame waits one interval, so that peers are known and rates can be given.
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    while count.is_none_or(|count| frame < count) {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut stop => break,
        }
        let mut targets = vec![node.id().clone()];
        targets.extend(
            node.peers().into_iter().filter(|peer| peer.status.name() == "up").map(|peer| peer.record.id),
        );
        let answers = futures::future::join_all(targets.iter().map(|target| async move {
            if target == node.id() {
                return Ok(node.status());
            }
            node.remote_status(target.clone(), interval).await
        }))
        .await;
        let now = Instant::now();
        let (mut rows, mut unreachable) = (Vec::new(), Vec::new());
        for (target, answer) in targets.iter().zip(answers) {
            match answer {
                Ok(status) => {
                    let totals = totals(&status, now);
                    rows.push(row(&status, totals, previous.get(&status.id).copied()));
                    previous.insert(status.id.clone(), totals);
                }
                Err(_) => unreachable.push(target.to_string()),
            }
        }
        rows.sort_by(|a, b| a.node.cmp(&b.node));
        let text = render(&rows, &unreachable);
        let mut stdout = std::io::stdout();
        if terminal {
            // Clear the screen and go home: the frame replaces the last one.
            write!(stdout, "\x1b[2J\x1b[H{text}").map_err(other)?;
        } else {
            write!(stdout, "{}{text}", if frame > 0 { "\n" } else { "" }).map_err(other)?;
        }
        stdout.flush().map_err(other)?;
        frame += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use comms_host::admin::{PeerSummary, TransportStatus};

    fn status(received: u64, sent: u64) -> NodeStatus {
        let transport = TransportStatus {
            name: "tcp".into(),
            plugin: "tcp".into(),
            plugin_version: "0.1.0".into(),
            local_address: "127.0.0.1:1".into(),
            messages_sent: sent,
            bytes_sent: 0,
            messages_received: received,
            bytes_received: 0,
            send_errors: 1,
            errors: 2,
            reconnects: 0,
            send_queue_depth: 0,
            receive_queue_depth: 0,
            counters: Vec::new(),
            longest_blocking_poll: None,
            settled_accepted: 0,
            settled_requeued: 0,
            settled_rejected: 0,
            plugin_panics: 3,
        };
        let peer =
            |id: &str, status: &str| PeerSummary { id: id.into(), status: status.into(), last_seen_ms: 0 };
        NodeStatus {
            id: "a".into(),
            uptime_ms: 12_000,
            transports: vec![transport.clone(), transport],
            peers: vec![peer("b", "up"), peer("c", "down")],
            services: Vec::new(),
            topics: Vec::new(),
            inbox_depth: 4,
            requests_waiting: 5,
            requests_being_served: 6,
            rejected_envelopes: 0,
            duplicates_dropped: 0,
        }
    }

    #[test]
    fn rates_come_from_the_previous_frame_over_every_transport() {
        let start = Instant::now();
        let first = row(&status(100, 10), totals(&status(100, 10), start), None);
        assert_eq!((first.in_per_s, first.out_per_s), (None, None), "no rate without a previous frame");
        let then = totals(&status(100, 10), start);
        let later = start + Duration::from_millis(500);
        let second = row(&status(150, 60), totals(&status(150, 60), later), Some(then));
        // Two transports, each 150 - 100 received: 100 messages in 0.5 s.
        assert_eq!(second.in_per_s, Some(200.0));
        assert_eq!(second.out_per_s, Some(200.0));
        assert_eq!(second.errors, 12, "send errors, errors and panics of both transports");
        assert_eq!((second.peers_up, second.peers), (1, 2));
        assert_eq!((second.inbox, second.waiting, second.serving), (4, 5, 6));
        let text = render(&[second], &["gone".to_string()]);
        assert!(
            text.lines().nth(1).is_some_and(|line| line.starts_with("a ") && line.contains(" 200 ")),
            "{text}"
        );
        assert!(text.contains("gone") && text.contains("(no answer)"), "{text}");
    }

    #[test]
    fn a_counter_that_went_back_gives_zero_not_a_huge_rate() {
        let start = Instant::now();
        let then = totals(&status(500, 500), start);
        let later = start + Duration::from_secs(1);
        let restarted = row(&status(10, 10), totals(&status(10, 10), later), Some(then));
        assert_eq!(restarted.in_per_s, Some(0.0));
    }
}
