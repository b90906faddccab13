//! Connecting to the broker: retries with backoff, errors that name the URL without its
//! password, and whether a connection is still usable.

use comms_plugin_api::{backoff::Backoff, redact::redact_url, ErrorCode, PluginError};
use lapin::{types::LongString, Channel, Connection, ConnectionProperties};
use std::time::Duration;

/// How long one connection attempt (TCP, TLS, AMQP handshake) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long closing a connection may take before it is dropped instead.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// `message` with every occurrence of `url`'s password (and the URL itself) replaced, for
/// errors from the client library that might quote them.
pub fn scrub(url: &str, message: &str) -> String {
    let mut message = message.replace(url, &redact_url(url));
    if let Some(password) = password(url) {
        if !password.is_empty() {
            message = message.replace(password, "***");
        }
    }
    message
}

fn password(url: &str) -> Option<&str> {
    let rest = &url[url.find("://")? + 3..];
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    let userinfo = &authority[..authority.rfind('@')?];
    Some(userinfo.split_once(':').map_or(userinfo, |(_, password)| password))
}

/// An error from the client library about `what`, scrubbed of credentials. Connection-level
/// failures are retryable.
pub fn amqp_error(url: &str, what: &str, error: &lapin::Error) -> PluginError {
    let message =
        format!("{what} on the AMQP broker {} failed: {}", redact_url(url), scrub(url, &error.to_string()));
    if error.is_io_error() || error.can_be_recovered() {
        PluginError::retryable(ErrorCode::UNREACHABLE, message)
    } else {
        PluginError::new(ErrorCode::OTHER, message)
    }
}

/// One connection attempt, bounded by [`CONNECT_TIMEOUT`]. `name` shows in the broker's
/// management UI.
pub async fn connect_once(url: &str, name: &str) -> Result<Connection, String> {
    let properties = ConnectionProperties::default().with_connection_name(LongString::from(name));
    match tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(url, properties)).await {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(error)) => Err(scrub(url, &error.to_string())),
        Err(_) => Err(format!("no answer within {} s", CONNECT_TIMEOUT.as_secs())),
    }
}

/// Connects, trying again with `backoff`; the error names the URL (password redacted), the
/// number of attempts and the last cause.
pub async fn connect(url: &str, name: &str, backoff: &Backoff) -> Result<Connection, PluginError> {
    backoff
        .retry(|attempt| async move {
            connect_once(url, name).await.inspect_err(|cause| {
                tracing::warn!(url = %redact_url(url), attempt, %cause, "connecting to the AMQP broker failed");
            })
        })
        .await
        .map_err(|(cause, attempts)| {
            PluginError::retryable(
                ErrorCode::UNREACHABLE,
                format!(
                    "cannot connect to the AMQP broker at {} ({attempts} attempts): {cause}",
                    redact_url(url)
                ),
            )
        })
}

/// Whether the connection and every channel in `channels` still work.
pub fn healthy(connection: &Connection, channels: &[&Channel]) -> bool {
    connection.status().connected() && channels.iter().all(|channel| channel.status().connected())
}

/// Closes `connection` politely, within [`CLOSE_TIMEOUT`]; a connection already gone is fine.
pub async fn close(connection: &Connection) {
    if connection.status().connected() {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, connection.close(200, "closing".into())).await;
    }
}

/// Completes once `shutdown` is set (or its sender is gone).
pub async fn closing(shutdown: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|closed| *closed).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrub_removes_the_password_wherever_it_appears() {
        let url = "amqp://user:s3cret@host:5672/%2f";
        assert_eq!(
            scrub(url, &format!("failed to reach {url}")),
            "failed to reach amqp://user:***@host:5672/%2f"
        );
        assert_eq!(scrub(url, "auth s3cret refused"), "auth *** refused");
        assert_eq!(scrub("amqp://host", "plain"), "plain");
    }

    #[tokio::test]
    async fn an_unreachable_broker_is_reported_with_the_redacted_url_after_the_attempts() {
        // Port 1 on loopback: nothing listens, the connection is refused at once.
        let url = "amqp://user:s3cret@127.0.0.1:1/%2f";
        let backoff =
            Backoff { initial: Duration::from_millis(1), max: Duration::from_millis(2), attempts: 3 };
        let error = connect(url, "test", &backoff).await.unwrap_err();
        assert_eq!(error.code, ErrorCode::UNREACHABLE);
        assert!(error.retryable);
        assert!(error.message.contains("amqp://user:***@127.0.0.1:1/%2f"), "{error}");
        assert!(error.message.contains("3 attempts"), "{error}");
        assert!(!error.message.contains("s3cret"), "{error}");
    }
}
