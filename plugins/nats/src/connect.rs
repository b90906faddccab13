//! Connecting to the NATS server: options from the config, retries with backoff at start, and
//! errors that never carry a credential.

use crate::config::Connection;
use async_nats::{Client, ConnectErrorKind, ConnectOptions, Event};
use comms_plugin_api::{
    redact::redact_url, tls::verification_failure, ErrorCode, IncidentCounters, PluginError,
};
use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

/// Credentials and files read once, before the first attempt: a missing file is a config
/// error, not something a retry fixes.
struct Prepared {
    creds: Option<String>,
    ca_file: Option<PathBuf>,
}

async fn prepare(connection: &Connection) -> Result<Prepared, PluginError> {
    let creds = match &connection.creds_file {
        Some(path) => {
            let content = tokio::fs::read_to_string(path).await.map_err(|error| {
                PluginError::invalid_config(format!("key `creds_file`: cannot read `{path}`: {error}"))
            })?;
            // Parsed now so that a malformed file is reported as such (not as a failed connection).
            ConnectOptions::with_credentials(&content).map_err(|error| {
                PluginError::invalid_config(format!(
                    "key `creds_file`: `{path}` is not a NATS creds file: {error}"
                ))
            })?;
            Some(content)
        }
        None => None,
    };
    let ca_file = match &connection.ca_file {
        Some(path) => {
            tokio::fs::metadata(path).await.map_err(|error| {
                PluginError::invalid_config(format!("key `ca_file`: cannot read `{path}`: {error}"))
            })?;
            Some(PathBuf::from(path))
        }
        None => None,
    };
    Ok(Prepared { creds, ca_file })
}

/// The URL(s) with passwords replaced by `***`, for logs and errors.
pub(crate) fn redacted(connection: &Connection) -> String {
    connection.url.split(',').map(|url| redact_url(url.trim())).collect::<Vec<_>>().join(",")
}

/// `text` with every secret of `connection` replaced by `***` (a client error may quote a URL).
pub(crate) fn scrub(connection: &Connection, text: &str) -> String {
    let mut text = text.to_string();
    // The URL's own password, or its token (a user name alone), decoded as it is sent.
    let from_url = connection.url_credentials().map(|(user, password)| password.unwrap_or(user));
    let secrets = [connection.password.clone(), connection.token.clone(), from_url];
    for secret in secrets.into_iter().flatten().filter(|secret| !secret.is_empty()) {
        text = text.replace(&secret, "***");
    }
    for url in connection.url.split(',') {
        let url = url.trim();
        text = text.replace(url, &redact_url(url));
    }
    text
}

fn options(
    connection: &Connection,
    prepared: &Prepared,
    incidents: &Arc<IncidentCounters>,
) -> ConnectOptions {
    let mut options = ConnectOptions::new();
    if let Some(creds) = &prepared.creds {
        // Checked in `prepare`; cannot fail here.
        options = options.credentials(creds).unwrap_or_else(|_| ConnectOptions::new());
    }
    if let (Some(user), Some(password)) = (&connection.user, &connection.password) {
        options = options.user_and_password(user.clone(), password.clone());
    }
    if let Some(token) = &connection.token {
        options = options.token(token.clone());
    }
    // Only when no key gives credentials (the config refuses both).
    match connection.url_credentials() {
        Some((user, Some(password))) => options = options.user_and_password(user, password),
        Some((token, None)) => options = options.token(token),
        None => {}
    }
    if let Some(ca_file) = &prepared.ca_file {
        options = options.add_root_certificates(ca_file.clone()).require_tls(true);
    }
    let timeout = Duration::from_millis(connection.request_timeout_ms);
    let lost = Arc::new(AtomicBool::new(false));
    let incidents = Arc::clone(incidents);
    let url = redacted(connection);
    options
        .connection_timeout(timeout)
        .request_timeout(Some(timeout))
        // After the first connection the client reconnects for ever (with its own backoff);
        // publishes and pulls fail or time out meanwhile, and the transport retries them.
        .max_reconnects(None)
        .event_callback(move |event| {
            let lost = Arc::clone(&lost);
            let incidents = Arc::clone(&incidents);
            let url = url.clone();
            async move {
                match event {
                    Event::Disconnected => {
                        lost.store(true, Ordering::Relaxed);
                        incidents.failed();
                        tracing::warn!(%url, "lost the connection to NATS; reconnecting");
                    }
                    Event::Connected if lost.swap(false, Ordering::Relaxed) => {
                        incidents.reconnected();
                        tracing::info!(%url, "reconnected to NATS");
                    }
                    Event::SlowConsumer(_) => {
                        incidents.failed();
                        tracing::warn!(%url, "a topic subscription fell behind; NATS dropped messages for it");
                    }
                    _ => {}
                }
            }
        })
}

/// Whether retrying cannot help: the server refused the credentials or TLS failed.
fn is_permanent(error: &async_nats::ConnectError) -> bool {
    matches!(
        error.kind(),
        ConnectErrorKind::Authentication
            | ConnectErrorKind::AuthorizationViolation
            | ConnectErrorKind::Tls
            | ConnectErrorKind::ServerParse
    ) || tls_handshake_refused(error)
}

/// A TLS handshake that failed over a certificate: the client library reports it as an I/O
/// error, with the TLS library's verdict inside.
fn tls_handshake_refused(error: &async_nats::ConnectError) -> bool {
    verification_failure(error).is_some()
}

/// Connects, retrying `connect_attempts` times with doubling delays. `what` names the caller
/// in errors (e.g. "the nats transport of node `a`").
pub(crate) async fn connect(
    connection: &Connection,
    what: &str,
    incidents: &Arc<IncidentCounters>,
) -> Result<Client, PluginError> {
    let prepared = prepare(connection).await?;
    let servers: Vec<&str> = connection.url.split(',').map(str::trim).collect();
    let result = connection
        .backoff()
        .retry(|attempt| {
            let options = options(connection, &prepared, incidents);
            let servers = &servers;
            async move {
                match options.connect(servers.as_slice()).await {
                    Ok(client) => Ok(Ok(client)),
                    Err(error) if is_permanent(&error) => Ok(Err(error)),
                    Err(error) => {
                        tracing::debug!(attempt, url = %redacted(connection),
                            error = %scrub(connection, &error.to_string()), "connecting to NATS failed");
                        Err(error)
                    }
                }
            }
        })
        .await;
    match result {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(error)) => {
            let hint = match error.kind() {
                _ if tls_handshake_refused(&error) => {
                    " (TLS failed: check `ca_file` and the server's certificate)"
                }
                ConnectErrorKind::Tls => " (TLS failed: check `ca_file` and the server's certificate)",
                ConnectErrorKind::ServerParse => " (check `url`)",
                _ => " (check `creds_file`, `user`/`password` or `token`)",
            };
            Err(PluginError::new(
                if error.kind() == ConnectErrorKind::ServerParse {
                    ErrorCode::INVALID_CONFIG
                } else {
                    ErrorCode::UNREACHABLE
                },
                format!(
                    "{what}: NATS at {} refused the connection: {}{hint}",
                    redacted(connection),
                    scrub(connection, &error.to_string())
                ),
            ))
        }
        Err((error, attempts)) => Err(PluginError::retryable(
            ErrorCode::UNREACHABLE,
            format!(
                "{what}: cannot connect to NATS at {} after {attempts} attempts: {}",
                redacted(connection),
                scrub(connection, &error.to_string())
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connection(url: &str) -> Connection {
        Connection {
            url: url.to_string(),
            creds_file: None,
            user: Some("me".into()),
            password: Some("s3cret".into()),
            token: None,
            ca_file: None,
            connect_attempts: 2,
            request_timeout_ms: 500,
        }
    }

    #[test]
    fn scrub_hides_passwords_and_url_credentials() {
        let connection = connection("nats://me:hunter2@host:4222");
        let text = scrub(&connection, "auth failed for nats://me:hunter2@host:4222 with s3cret");
        assert!(!text.contains("hunter2") && !text.contains("s3cret"), "{text}");
        assert_eq!(redacted(&connection), "nats://me:***@host:4222");
    }

    #[test]
    fn credentials_in_the_url_are_read_decoded_and_scrubbed() {
        let mut connection = connection("nats://me:p%40ss%3Aword@host:4222,nats://other:x@host2");
        connection.user = None;
        connection.password = None;
        assert_eq!(connection.url_credentials(), Some(("me".to_string(), Some("p@ss:word".to_string()))));
        assert!(!scrub(&connection, "server said p@ss:word").contains("p@ss:word"));
        connection.url = "tls://s3cr3t-token@host:4222/path@x".into();
        assert_eq!(connection.url_credentials(), Some(("s3cr3t-token".to_string(), None)));
        assert_eq!(scrub(&connection, "bad token s3cr3t-token"), "bad token ***");
        connection.url = "nats://host:4222".into();
        assert_eq!(connection.url_credentials(), None);
    }

    #[tokio::test]
    async fn an_unreachable_server_fails_after_the_attempts_with_the_redacted_url() {
        // A port nothing listens on: bind one, then free it.
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port());
        let port = port.expect("a free port");
        let connection = connection(&format!("nats://me:hunter2@127.0.0.1:{port}"));
        let error = connect(&connection, "test", &Arc::default()).await.expect_err("nothing listens");
        assert_eq!(error.code, ErrorCode::UNREACHABLE);
        assert!(error.message.contains("after 2 attempts"), "{}", error.message);
        assert!(!error.message.contains("hunter2"), "{}", error.message);
    }

    #[tokio::test]
    async fn a_missing_creds_file_is_a_config_error_naming_the_key() {
        let mut connection = connection("nats://127.0.0.1:1");
        connection.user = None;
        connection.password = None;
        connection.creds_file = Some("/nonexistent/x.creds".into());
        let error = connect(&connection, "test", &Arc::default()).await.expect_err("no file");
        assert!(error.message.contains("`creds_file`"), "{}", error.message);
    }
}
