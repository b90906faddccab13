//! `comms peers`, `publish`, `subscribe`, `request`, `echo-service`: the messaging patterns from
//! the command line, with text messages.

use super::{
    node_commands::{print_addresses, stop_signal},
    other, CliError,
};
use comms_host::{Capabilities, Node, PeerStatus, RequestOptions};
use std::{io::Write, path::Path, process::ExitCode, time::Duration};

pub(super) async fn peers(config: &Path, wait_ms: u64) -> Result<ExitCode, CliError> {
    let node = Node::from_config(config).await?;
    tokio::time::sleep(Duration::from_millis(wait_ms)).await;
    let peers = node.peers();
    println!(
        "{:<20} {:<7} {:>10}  {:<24} {:<24} addresses",
        "node", "status", "last seen", "services", "topics"
    );
    for peer in &peers {
        let status = match peer.status {
            PeerStatus::Up => "up",
            PeerStatus::Down => "down",
            PeerStatus::Offline => "offline",
        };
        let addresses: Vec<String> = peer.record.addresses.iter().map(|(t, a)| format!("{t}={a}")).collect();
        println!(
            "{:<20} {:<7} {:>8}ms  {:<24} {:<24} {}",
            peer.record.id,
            status,
            peer.last_seen.as_millis(),
            peer.record.services.join(","),
            peer.record.topics.join(","),
            addresses.join(" ")
        );
    }
    if peers.is_empty() {
        println!("(no peers known)");
    }
    node.close().await.map_err(other)?;
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn publish(
    config: &Path,
    topic: &str,
    text: &str,
    wait_ms: u64,
) -> Result<ExitCode, CliError> {
    let node = Node::from_config(config).await?;
    let broker = node
        .transports()
        .into_iter()
        .find(|transport| transport.capabilities.contains(Capabilities::NATIVE_TOPICS));
    if broker.is_none() {
        // Subscribers are known from their records; one that has just been met may still be on
        // its way. Publishing to nobody is not an error, so a timeout is not one either.
        let _ = node.wait_for_subscriber(topic, Duration::from_millis(wait_ms)).await;
    }
    let published = node.publish(topic, text).await;
    let closed = node.close().await;
    let count = published.map_err(other)?;
    closed.map_err(other)?;
    match broker {
        Some(broker) => println!(
            "published on {topic} through `{}`, which delivers it to its subscribers (the broker does not \
             say how many); {count} more subscriber node(s) reached directly",
            broker.name
        ),
        None => println!("published on {topic} to {count} subscriber node(s)"),
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn subscribe(
    config: &Path,
    pattern: &str,
    count: Option<u64>,
) -> Result<ExitCode, CliError> {
    let node = Node::from_config(config).await?;
    let mut subscription = node.subscribe::<String>(pattern).await.map_err(other)?;
    print_addresses(&node);
    eprintln!("subscribed to {pattern}");
    let stop = stop_signal();
    tokio::pin!(stop);
    let mut received = 0u64;
    let mut stdout = std::io::stdout();
    while count.is_none_or(|count| received < count) {
        let message = tokio::select! {
            message = subscription.next() => message,
            _ = &mut stop => break,
        };
        match message {
            Some(Ok(message)) => {
                received += 1;
                writeln!(stdout, "{}", message.message.replace('\n', "\\n")).map_err(other)?;
                stdout.flush().map_err(other)?;
            }
            Some(Err(error)) => eprintln!("warning: {error}"),
            None => break,
        }
    }
    drop(subscription);
    node.close().await.map_err(other)?;
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn request(
    config: &Path,
    service: &str,
    text: &str,
    timeout_ms: u64,
    attempts: u32,
    wait_ms: u64,
) -> Result<ExitCode, CliError> {
    let node = Node::from_config(config).await?;
    let _ = node.wait_for_service(service, Duration::from_millis(wait_ms)).await;
    let options =
        RequestOptions { timeout: Duration::from_millis(timeout_ms), attempts, ..RequestOptions::default() };
    let answer = node.request_with::<str, String>(service, text, &options).await;
    let closed = node.close().await;
    let answer = answer.map_err(other)?;
    closed.map_err(other)?;
    println!("{answer}");
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn echo_service(config: &Path, service: &str) -> Result<ExitCode, CliError> {
    let node = Node::from_config(config).await?;
    node.serve(
        service,
        |request: comms_host::Received<String>| async move { Ok::<_, String>(request.message) },
    )
    .await
    .map_err(other)?;
    print_addresses(&node);
    eprintln!("serving `{service}` on node `{}`", node.id());
    stop_signal().await;
    node.close().await.map_err(other)?;
    Ok(ExitCode::SUCCESS)
}
