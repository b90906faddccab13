//! `comms status NODE` (a node's state), `comms shutdown NODE` and `comms reload NODE`, asked
//! over comms (see `comms_host::admin`).

use super::{other, CliError};
use comms_host::{
    admin::{NodeStatus, RELOAD_SERVICE, SHUTDOWN_SERVICE, STATUS_SERVICE},
    Node, RequestOptions,
};
use serde::de::DeserializeOwned;
use std::{path::Path, process::ExitCode, time::Duration};

pub(super) async fn run(config: &Path, target: &str, wait_ms: u64, json: bool) -> Result<ExitCode, CliError> {
    let status: NodeStatus = ask(config, target, STATUS_SERVICE, wait_ms).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status).map_err(other)?);
    } else {
        print_status(&status);
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn shutdown(config: &Path, target: &str, wait_ms: u64) -> Result<ExitCode, CliError> {
    let answer: String = ask(config, target, SHUTDOWN_SERVICE, wait_ms).await?;
    println!("{answer}");
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn reload(config: &Path, target: &str, wait_ms: u64) -> Result<ExitCode, CliError> {
    let answer: String = ask(config, target, RELOAD_SERVICE, wait_ms).await?;
    println!("{answer}");
    Ok(ExitCode::SUCCESS)
}

/// Opens the node of `config`, waits for `target` to be known, asks its built-in `service` (one
/// attempt, both waits bounded by `wait_ms`) and closes the node again.
async fn ask<T: DeserializeOwned>(
    config: &Path,
    target: &str,
    service: &str,
    wait_ms: u64,
) -> Result<T, CliError> {
    let node = Node::from_config(config).await?;
    let wait = Duration::from_millis(wait_ms);
    let answer = match node.wait_for_peer(target, wait).await {
        Err(error) => Err(other(error)),
        Ok(()) => {
            let options = RequestOptions { timeout: wait, attempts: 1, ..RequestOptions::default() };
            node.request_node(target, service, &(), &options).await.map_err(other)
        }
    };
    // Closed even after a failure, so the transports are shut down cleanly.
    let closed = node.close().await;
    let answer = answer?;
    closed.map_err(other)?;
    Ok(answer)
}

fn print_status(status: &NodeStatus) {
    println!("node {} (up {:.1} s)", status.id, status.uptime_ms as f64 / 1000.0);
    println!(
        "queues: inbox {}, requests waiting {}, being served {}; refused {}, duplicates {}",
        status.inbox_depth,
        status.requests_waiting,
        status.requests_being_served,
        status.rejected_envelopes,
        status.duplicates_dropped
    );
    println!(
        "services: {}",
        if status.services.is_empty() { "-".into() } else { status.services.join(", ") }
    );
    println!("topics: {}", if status.topics.is_empty() { "-".into() } else { status.topics.join(", ") });
    println!(
        "\n{:<12} {:<10} {:>10} {:>10} {:>10} {:>10} {:>7} {:>6} {:>6}  address",
        "transport", "plugin", "sent", "sent B", "received", "recv B", "errors", "sendq", "recvq"
    );
    for t in &status.transports {
        println!(
            "{:<12} {:<10} {:>10} {:>10} {:>10} {:>10} {:>7} {:>6} {:>6}  {}",
            t.name,
            t.plugin,
            t.messages_sent,
            t.bytes_sent,
            t.messages_received,
            t.bytes_received,
            t.send_errors + t.errors,
            t.send_queue_depth,
            t.receive_queue_depth,
            t.local_address
        );
    }
    println!("\n{:<24} {:<8} {:>10}", "peer", "status", "last seen");
    for peer in &status.peers {
        println!("{:<24} {:<8} {:>8}ms", peer.id, peer.status, peer.last_seen_ms);
    }
    if status.peers.is_empty() {
        println!("(no peers known)");
    }
}
