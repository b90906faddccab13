//! `comms run`, `comms send`, `comms recv`: a node driven from the command line.

use super::{other, CliError};
use comms_host::{codec::CONTENT_TYPE_HEADER, Codec, Envelope, Node, ReceiveError};
use std::{io::Write, path::Path, process::ExitCode, time::Duration};

/// A received payload as one line of text: the message decoded as a string when it is one.
pub(crate) fn payload_text(node: &Node, envelope: &Envelope) -> String {
    let codec = envelope.header(CONTENT_TYPE_HEADER).map_or(Ok(node.codec()), Codec::from_content_type);
    match codec.and_then(|codec| codec.decode::<String>(envelope.payload.as_slice())) {
        Ok(text) => text.replace('\n', "\\n"),
        Err(_) => format!("<{} bytes, not text>", envelope.payload.len()),
    }
}

pub(super) fn print_addresses(node: &Node) {
    for transport in node.transports() {
        let encrypted = transport.capabilities.contains(comms_plugin_api::Capabilities::ENCRYPTED);
        eprintln!(
            "node `{}`: transport `{}` (plugin {}) at {}{}",
            node.id(),
            transport.name,
            transport.plugin,
            transport.local_address,
            if encrypted { " (links encrypted)" } else { "" }
        );
    }
}

/// Completes on Ctrl-C or SIGTERM.
pub(super) async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut terminate) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

pub(super) async fn run(config: &Path, echo: bool) -> Result<ExitCode, CliError> {
    let node = Node::from_config(config).await?;
    print_addresses(&node);
    let stop = stop_signal();
    tokio::pin!(stop);
    loop {
        let received = tokio::select! {
            received = node.receive_raw() => received,
            _ = &mut stop => break,
        };
        match received {
            Ok(mut received) => {
                let envelope = &received.message;
                println!("{}: {}", envelope.from, payload_text(&node, envelope));
                if echo {
                    let Envelope { id, from, headers, payload, .. } = envelope.clone();
                    if let Err(error) = node.send_raw(from, headers, payload, Some(id)).await {
                        eprintln!("warning: echo failed: {error}");
                    }
                }
                // Handled (printed, echoed): only now may a broker forget it.
                received.ack();
            }
            Err(ReceiveError::Closed) => break,
            Err(error) => eprintln!("warning: {error}"),
        }
    }
    node.close().await.map_err(other)?;
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn send(config: &Path, to: &str, text: &str, wait_ms: u64) -> Result<ExitCode, CliError> {
    let node = Node::from_config(config).await?;
    // A node that has just started may not know the destination yet (a broker's discovery
    // announces it soon after): wait for it, then send (a failure then names what went wrong).
    let _ = node.wait_for_peer(to, Duration::from_millis(wait_ms)).await;
    let sent = node.send(to, text).await;
    // Close even after a failed send, so the transport is shut down cleanly.
    let closed = node.close().await;
    let id = sent.map_err(other)?;
    closed.map_err(other)?;
    println!("sent {id} to {to}");
    Ok(ExitCode::SUCCESS)
}

/// Prints each message, then acknowledges it: a `recv` killed (or stopped with Ctrl-C, or done
/// with its `--count`) leaves every message it has not printed with a broker, which delivers it
/// again to the next consumer.
pub(super) async fn recv(config: &Path, count: Option<u64>) -> Result<ExitCode, CliError> {
    let node = Node::from_config(config).await?;
    print_addresses(&node);
    let stop = stop_signal();
    tokio::pin!(stop);
    let mut taken = 0u64;
    let mut stdout = std::io::stdout();
    while count.is_none_or(|count| taken < count) {
        let received = tokio::select! {
            received = node.receive_raw() => received,
            _ = &mut stop => break,
        };
        match received {
            Ok(mut received) => {
                taken += 1;
                writeln!(stdout, "{}", payload_text(&node, &received.message)).map_err(other)?;
                stdout.flush().map_err(other)?;
                received.ack();
            }
            Err(ReceiveError::Closed) => break,
            Err(error) => eprintln!("warning: {error}"),
        }
    }
    node.close().await.map_err(other)?;
    Ok(ExitCode::SUCCESS)
}
