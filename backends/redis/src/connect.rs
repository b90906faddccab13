//! Opening connections to Redis: URL checks, TLS set-up, retries with backoff at start, and
//! turning Redis errors into [`PluginError`]s that never contain a password.

use crate::{
    connection::{Connection, Direct},
    tls,
};
use comms_plugin_api::{backoff::Backoff, redact::redact_url, tls::TlsFiles, ErrorCode, PluginError};
use redis::{
    aio::{ConnectionManager, ConnectionManagerConfig},
    Client, RedisError, TlsCertificates,
};
use std::{future::Future, time::Duration};

/// Runs `opening` as a task of the plugin's runtime. redis-rs builds a new rustls config in
/// every TLS connect, and that reads and parses the system's root certificates synchronously
/// (`load_native_certs`, even when `ca_file` replaces them): one poll of the transport's
/// constructor held the host's thread for 12 ms in a debug build here, and once for 0.6 s on a
/// loaded machine. A task of its own holds a plugin thread instead, never the caller's (the
/// host's).
async fn opened_apart<T: Send + 'static>(
    opening: impl Future<Output = Result<T, RedisError>> + Send + 'static,
) -> Result<T, RedisError> {
    match tokio::spawn(opening).await {
        Ok(opened) => opened,
        Err(failed) => {
            Err(RedisError::from(std::io::Error::other(format!("opening the connection failed: {failed}"))))
        }
    }
}

/// A pub/sub connection of `client` (topics, discovery notifications), opened apart from the
/// caller's thread as [`opened_apart`] says.
pub(crate) async fn pubsub(client: Client) -> Result<redis::aio::PubSub, RedisError> {
    opened_apart(async move { client.get_async_pubsub().await }).await
}

/// Most time one connection attempt may take, the Redis handshake included.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// A Redis URL with the secret parts kept apart, so that messages can name it safely, and the
/// certificates of a `rediss://` connection.
#[derive(Clone)]
pub(crate) struct RedisUrl {
    url: String,
    redacted: String,
    /// The `ca_file` / client certificate contents; `None`: the system's roots, no client
    /// certificate.
    certificates: Option<TlsCertificates>,
}

impl std::fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted)
    }
}

impl RedisUrl {
    /// The URL (checked by the config's `validate`) and its certificate files, read now: an
    /// unreadable file is an error naming its key and path.
    pub(crate) fn new(url: &str, files: &TlsFiles) -> Result<Self, PluginError> {
        Ok(Self { url: url.to_string(), redacted: redact_url(url), certificates: tls::load(files)? })
    }

    /// Whether the connection is TLS (`rediss://`): encrypted, and the server authenticated by
    /// its certificate.
    pub(crate) fn is_tls(&self) -> bool {
        self.url.starts_with("rediss://")
    }

    /// The URL with its password replaced by `***`.
    pub(crate) fn redacted(&self) -> &str {
        &self.redacted
    }

    /// `text` with the password (if any, and if it appears) replaced by `***`: Redis errors
    /// may echo parts of what they were given.
    pub(crate) fn scrub(&self, text: &str) -> String {
        let mut text = text.replace(&self.url, &self.redacted);
        if let Some(password) = password(&self.url) {
            if password.len() >= 3 {
                text = text.replace(&password, "***");
            }
        }
        text
    }

    /// The client for this URL (no connection yet).
    pub(crate) fn client(&self) -> Result<Client, PluginError> {
        if self.is_tls() {
            // redis' rustls support needs a process-wide crypto provider; another part of the
            // program may have installed one already, which is fine.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let client = match &self.certificates {
            Some(certificates) => Client::build_with_tls(self.url.as_str(), certificates.clone()),
            None => Client::open(self.url.as_str()),
        };
        client.map_err(|error| {
            PluginError::invalid_config(format!(
                "key `url`: `{}` is not a valid Redis URL: {}",
                self.redacted,
                self.scrub(&error.to_string())
            ))
        })
    }

    /// A reconnecting connection, tried `backoff.attempts` times before giving up with an
    /// [`ErrorCode::UNREACHABLE`] error naming the (redacted) URL. `response_timeout` bounds
    /// every command on it. A failed certificate verification is not tried again: the error
    /// says so at once. A plain TCP or Unix-socket connection is the plugin's own, driven by the
    /// host when it offers to ([`crate::connection`]); a TLS one is redis-rs' manager.
    pub(crate) async fn connect(
        &self,
        what: &str,
        backoff: &Backoff,
        response_timeout: Duration,
    ) -> Result<Connection, PluginError> {
        let client = self.client()?;
        // One attempt per (re)connection: the callers retry with their own backoff, and the
        // manager's own retries start at a full second.
        let config = ConnectionManagerConfig::new()
            .set_number_of_retries(0)
            .set_connection_timeout(CONNECT_TIMEOUT)
            .set_response_timeout(response_timeout);
        let direct = Connection::is_direct(client.get_connection_info());
        let mut attempt = 1;
        loop {
            let opened = if direct {
                Direct::open(client.get_connection_info().clone(), CONNECT_TIMEOUT, response_timeout)
                    .await
                    .map(Connection::Direct)
            } else {
                opened_apart(ConnectionManager::new_with_config(client.clone(), config.clone()))
                    .await
                    .map(Connection::Managed)
            };
            let error = match opened {
                Ok(connection) => return Ok(connection),
                Err(error) => error,
            };
            if let Some(cause) = tls::verification_failure(&error) {
                return Err(self.tls_error(what, &cause));
            }
            tracing::debug!(url = %self.redacted, attempt, error = %self.scrub(&error.to_string()),
                "connecting to Redis failed");
            match backoff.delay_after(attempt) {
                Some(delay) => tokio::time::sleep(delay).await,
                None => {
                    return Err(PluginError::new(
                        ErrorCode::UNREACHABLE,
                        format!(
                            "{what}: cannot connect to Redis at {} after {attempt} attempts: {}",
                            self.redacted,
                            self.scrub(&error.to_string())
                        ),
                    ))
                }
            }
            attempt += 1;
        }
    }

    /// The error for a TLS handshake that failed over a certificate: not retryable, naming the
    /// URL (password redacted) and what to check.
    fn tls_error(&self, what: &str, cause: &str) -> PluginError {
        PluginError::new(
            ErrorCode::UNREACHABLE,
            format!(
                "{what}: TLS verification failed connecting to Redis at {}: {}; not retried. Check that \
                 the host name in `url` is one the certificate names, and set `ca_file` to the CA that \
                 signed it if it is a private one",
                self.redacted,
                self.scrub(cause)
            ),
        )
    }

    /// A [`PluginError`] for a failed command: `what` failed, on this server, because of `error`.
    pub(crate) fn error(&self, what: &str, error: &RedisError) -> PluginError {
        if let Some(cause) = tls::verification_failure(error) {
            return self.tls_error(what, &cause);
        }
        let message =
            format!("{what} on Redis at {} failed: {}", self.redacted, self.scrub(&error.to_string()));
        if is_connection_error(error) {
            PluginError::retryable(ErrorCode::UNREACHABLE, message)
        } else {
            PluginError::new(ErrorCode::OTHER, message)
        }
    }
}

/// The password of `url`, percent-decoding aside.
fn password(url: &str) -> Option<String> {
    let rest = &url[url.find("://")? + 3..];
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    let userinfo = &authority[..authority.rfind('@')?];
    Some(match userinfo.split_once(':') {
        Some((_, password)) => password.to_string(),
        None => userinfo.to_string(),
    })
    .filter(|password| !password.is_empty())
}

/// Whether retrying on another connection may help (the broker went away or timed out); not
/// for a failed certificate verification.
pub(crate) fn is_connection_error(error: &RedisError) -> bool {
    if tls::verification_failure(error).is_some() {
        return false;
    }
    error.is_io_error()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_timeout()
        || error.is_unrecoverable_error()
        || matches!(error.kind(), redis::ErrorKind::TryAgain | redis::ErrorKind::BusyLoadingError)
        || error.code() == Some("LOADING")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_scrubbed_from_any_text() {
        let url = RedisUrl::new("redis://user:hunter22@127.0.0.1:1/0", &TlsFiles::default()).unwrap();
        assert_eq!(url.redacted(), "redis://user:***@127.0.0.1:1/0");
        let text = url.scrub("failed for redis://user:hunter22@127.0.0.1:1/0 with hunter22");
        assert!(!text.contains("hunter22"), "{text}");
        assert_eq!(password("rediss://:token123@host"), Some("token123".into()));
        assert_eq!(password("redis://host:6379"), None);
    }

    #[test]
    fn tls_urls_with_credentials_are_accepted() {
        // Builds the client (and installs the TLS crypto provider) without connecting.
        let url = RedisUrl::new("rediss://user:hunter22@127.0.0.1:6380/0", &TlsFiles::default()).unwrap();
        assert!(url.is_tls());
        url.client().unwrap();
    }

    #[test]
    fn an_invalid_url_is_a_config_error_without_the_password() {
        let error =
            RedisUrl::new("redis://user:hunter22@[bad", &TlsFiles::default()).unwrap().client().unwrap_err();
        assert_eq!(error.code, ErrorCode::INVALID_CONFIG);
        assert!(!error.message.contains("hunter22"), "{error}");
    }
}
