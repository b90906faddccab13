//! `comms run`, `comms send`, `comms recv`: a node driven from the command line.

use super::{other, CliError};
use comms_host::{codec::CONTENT_TYPE_HEADER, Codec, Envelope, Node, ReceiveError};
use std::{io::Write, path::Path, process::ExitCode, time::Duration};

/// A received payload as one line of text, for `comms run` and `comms recv`:
///
/// - JSON (`content-type: application/json`, or no content type on a node whose codec is JSON):
///   a JSON string is printed as its text, anything else (object, array, number, ...) as compact
///   JSON on one line, so that `comms recv | jq` reads what a JSON sender sent;
/// - postcard (the binary codec): the message decoded as a string when it is one;
/// - any `text/...` content type: the payload as UTF-8;
/// - anything else: `<N bytes, not text>`.
///
/// Newlines inside a text are printed as `\n`, so that every message is one line.
pub(crate) fn payload_text(default: Codec, envelope: &Envelope) -> String {
    let payload = envelope.payload.as_slice();
    let content_type = envelope.header(CONTENT_TYPE_HEADER);
    let text = match content_type.map_or(Ok(default), Codec::from_content_type) {
        Ok(Codec::Json) => match serde_json::from_slice::<serde_json::Value>(payload) {
            Ok(serde_json::Value::String(text)) => Some(text),
            // Valid JSON, hence UTF-8: printed as sent (key order, number forms), on one line.
            Ok(_) => return compact_json(payload),
            Err(_) => None,
        },
        Ok(codec) => codec.decode::<String>(payload).ok(),
        Err(_) if content_type.is_some_and(|t| t.starts_with("text/")) => {
            std::str::from_utf8(payload).ok().map(str::to_owned)
        }
        Err(_) => None,
    };
    match text {
        Some(text) => text.replace('\n', "\\n"),
        None => format!("<{} bytes, not text>", payload.len()),
    }
}

/// `json` (valid JSON) without the whitespace between its tokens: one line, nothing reordered.
fn compact_json(json: &[u8]) -> String {
    let mut out = Vec::with_capacity(json.len());
    let (mut in_string, mut escaped) = (false, false);
    for &byte in json {
        if in_string {
            // Inside a string a newline is always escaped (`\n`), so one line is kept.
            (escaped, in_string) = match (escaped, byte) {
                (true, _) => (false, true),
                (false, b'\\') => (true, true),
                (false, b'"') => (false, false),
                _ => (false, true),
            };
        } else if byte == b'"' {
            in_string = true;
        } else if byte.is_ascii_whitespace() {
            continue;
        }
        out.push(byte);
    }
    String::from_utf8_lossy(&out).into_owned()
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

/// Aborts a background task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
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

/// Reads the config file again and applies it on every `SIGHUP` (see `comms_host::reload`),
/// saying on stderr what changed or why nothing did; never ends by itself.
async fn reload_on_hangup(node: Node) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut hangups) = signal(SignalKind::hangup()) {
            while hangups.recv().await.is_some() {
                match node.reload_file(None).await {
                    Ok(report) => eprintln!("SIGHUP: config file reloaded: {report}"),
                    Err(error) => eprintln!("SIGHUP: {error}"),
                }
            }
        }
    }
    drop(node);
    std::future::pending::<()>().await
}

pub(super) async fn run(config: &Path, echo: bool) -> Result<ExitCode, CliError> {
    let node = Node::from_config(config).await?;
    print_addresses(&node);
    let stop = stop_signal();
    tokio::pin!(stop);
    let reloads = tokio::spawn(reload_on_hangup(node.clone()));
    // The node's own handle must not outlive the loop (a node stops when its last handle goes).
    let _stop_reloads = AbortOnDrop(reloads);
    loop {
        let received = tokio::select! {
            received = node.receive_raw() => received,
            _ = &mut stop => break,
        };
        match received {
            Ok(mut received) => {
                let envelope = &received.message;
                println!("{}: {}", envelope.from, payload_text(node.codec(), envelope));
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
                writeln!(stdout, "{}", payload_text(node.codec(), &received.message)).map_err(other)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use comms_host::MessageId;
    use comms_plugin_api::Destination;

    fn envelope(content_type: Option<&str>, payload: &[u8]) -> Envelope {
        let envelope = Envelope::new(MessageId::from_u128(1), "a", Destination::node("b"), payload.to_vec());
        match content_type {
            Some(content_type) => envelope.with_header(CONTENT_TYPE_HEADER, content_type),
            None => envelope,
        }
    }

    #[test]
    fn json_payloads_print_as_json_and_json_strings_as_their_text() {
        let json = Some("application/json");
        let object = envelope(
            json,
            br#"{"order": 42, "items": ["tea", "milk"],
            "note": "two\nlines"}"#,
        );
        assert_eq!(
            payload_text(Codec::Binary, &object),
            r#"{"order":42,"items":["tea","milk"],"note":"two\nlines"}"#
        );
        assert_eq!(payload_text(Codec::Binary, &envelope(json, b" [1, 2.50, null]\n")), "[1,2.50,null]");
        let spaced = envelope(json, br#"{"a b": "c \" d"}"#);
        assert_eq!(payload_text(Codec::Binary, &spaced), r#"{"a b":"c \" d"}"#, "strings untouched");
        assert_eq!(payload_text(Codec::Binary, &envelope(json, br#""hello\nthere""#)), "hello\\nthere");
        assert_eq!(payload_text(Codec::Json, &envelope(None, b"17")), "17", "the node's codec by default");
        assert_eq!(payload_text(Codec::Binary, &envelope(json, b"{not json")), "<9 bytes, not text>");
    }

    #[test]
    fn postcard_strings_and_plain_text_print_as_text() {
        let postcard = Codec::Binary.encode("tea for two").unwrap();
        assert_eq!(
            payload_text(Codec::Binary, &envelope(Some("application/x-postcard"), &postcard)),
            "tea for two"
        );
        assert_eq!(payload_text(Codec::Binary, &envelope(None, &postcard)), "tea for two");
        let text = envelope(Some("text/plain; charset=utf-8"), b"no replica");
        assert_eq!(payload_text(Codec::Binary, &text), "no replica");
        assert_eq!(
            payload_text(Codec::Binary, &envelope(Some("image/png"), &[0x89, 0x50])),
            "<2 bytes, not text>"
        );
    }
}
