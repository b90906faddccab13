//! Connecting to the broker: TLS settings, retries with backoff, errors that name the URL
//! without its password, and whether a connection is still usable.

use crate::tls;
use comms_plugin_api::{backoff::Backoff, redact::redact_url, tls::TlsFiles, ErrorCode, PluginError};
use lapin::{tcp::OwnedTLSConfig, types::LongString, Channel, Connection, ConnectionProperties};
use std::time::Duration;

/// The broker to connect to: its URL and, for `amqps://`, the certificates of the config.
#[derive(Clone)]
pub struct Broker {
    url: String,
    redacted: String,
    /// Holds the client's private key, if any: never printed.
    tls: OwnedTLSConfig,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted)
    }
}

impl Broker {
    /// The URL (checked by the config's `validate`) and its certificate files, read now: an
    /// unreadable file is an error naming its key and path.
    pub fn new(url: &str, files: &TlsFiles) -> Result<Self, PluginError> {
        Ok(Self { url: url.to_string(), redacted: redact_url(url), tls: tls::load(files)? })
    }

    /// Whether the connection is TLS (`amqps://`): encrypted, and the broker authenticated by
    /// its certificate.
    pub fn is_tls(&self) -> bool {
        self.url.starts_with("amqps://")
    }

    /// The URL with its password replaced by `***`.
    pub fn redacted(&self) -> &str {
        &self.redacted
    }
}

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
/// management UI. A failure is a retryable [`ErrorCode::UNREACHABLE`] error, except a TLS
/// handshake that failed over a certificate: not retryable (see [`is_fatal`]), and saying so.
pub async fn connect_once(broker: &Broker, name: &str) -> Result<Connection, PluginError> {
    let properties = ConnectionProperties::default().with_connection_name(LongString::from(name));
    let runtime = lapin::runtime::default_runtime().map_err(|error| {
        PluginError::new(ErrorCode::OTHER, format!("no runtime for the AMQP client: {error}"))
    })?;
    let attempt = Connection::connect_with_config(&broker.url, properties, broker.tls.clone(), runtime);
    let cause = match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
        Ok(Ok(connection)) => return Ok(connection),
        Ok(Err(error)) => {
            if let Some(cause) = tls::verification_failure(&error) {
                return Err(PluginError::new(
                    ErrorCode::UNREACHABLE,
                    format!(
                        "TLS verification failed connecting to the AMQP broker at {}: {}; not retried. Check \
                         that the host name in `url` is one the certificate names, and set `ca_file` to the \
                         CA that signed it if it is a private one",
                        broker.redacted,
                        scrub(&broker.url, &cause)
                    ),
                ));
            }
            scrub(&broker.url, &error.to_string())
        }
        Err(_) => format!("no answer within {} s", CONNECT_TIMEOUT.as_secs()),
    };
    Err(PluginError::retryable(
        ErrorCode::UNREACHABLE,
        format!("cannot connect to the AMQP broker at {}: {cause}", broker.redacted),
    ))
}

/// Whether `error` is one that trying again does not fix: a connection refused over TLS
/// certificates (`UNREACHABLE` but not retryable).
pub fn is_fatal(error: &PluginError) -> bool {
    error.code == ErrorCode::UNREACHABLE && !error.retryable
}

/// Runs `attempt` with `backoff` like [`Backoff::retry`], but stops at once at a [fatal]
/// error.
///
/// [fatal]: is_fatal
pub async fn retry<T, F, Fut>(backoff: &Backoff, mut attempt: F) -> Result<T, (PluginError, u32)>
where
    F: FnMut(u32) -> Fut,
    Fut: std::future::Future<Output = Result<T, PluginError>>,
{
    let mut number = 1;
    loop {
        match attempt(number).await {
            Ok(value) => return Ok(value),
            Err(error) if is_fatal(&error) => return Err((error, number)),
            Err(error) => match backoff.delay_after(number) {
                Some(delay) => tokio::time::sleep(delay).await,
                None => return Err((error, number)),
            },
        }
        number += 1;
    }
}

/// Connects, trying again with `backoff`; the error names the URL (password redacted), the
/// number of attempts and the last cause.
pub async fn connect(broker: &Broker, name: &str, backoff: &Backoff) -> Result<Connection, PluginError> {
    retry(backoff, |attempt| async move {
        connect_once(broker, name).await.inspect_err(|error| {
            tracing::warn!(url = %broker.redacted, attempt, %error, "connecting to the AMQP broker failed");
        })
    })
    .await
    .map_err(|(mut error, attempts)| {
        if !is_fatal(&error) {
            error.message = format!("{} ({attempts} attempts)", error.message);
        }
        error
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
        let broker = Broker::new(url, &TlsFiles::default()).unwrap();
        assert!(!broker.is_tls());
        let error = connect(&broker, "test", &backoff).await.unwrap_err();
        assert_eq!(error.code, ErrorCode::UNREACHABLE);
        assert!(error.retryable);
        assert!(error.message.contains("amqp://user:***@127.0.0.1:1/%2f"), "{error}");
        assert!(error.message.contains("3 attempts"), "{error}");
        assert!(!error.message.contains("s3cret"), "{error}");
    }

    #[tokio::test]
    async fn retry_stops_at_a_fatal_error_and_goes_on_after_others() {
        let backoff =
            Backoff { initial: Duration::from_millis(1), max: Duration::from_millis(1), attempts: 5 };
        let result: Result<(), _> = retry(&backoff, |_| async {
            Err(PluginError::new(ErrorCode::UNREACHABLE, "TLS verification failed"))
        })
        .await;
        assert_eq!(result.unwrap_err().1, 1, "a certificate failure is not retried");
        let result: Result<(), _> =
            retry(&backoff, |_| async { Err(PluginError::retryable(ErrorCode::UNREACHABLE, "refused")) })
                .await;
        assert_eq!(result.unwrap_err().1, 5);
    }
}
