//! The plugin's config table (`[transports.postgres]`, or `[discovery]` with
//! `plugin = "postgres"`), and the connection settings it names.

use comms_plugin_api::{
    backoff::Backoff,
    redact::redact_url,
    requeue_delay::{self, RequeueDelay},
    serde::Deserialize,
    tls::TlsFiles,
    PluginError,
};
use std::{path::PathBuf, time::Duration};
use tokio_postgres::config::SslMode;

/// The config table of the PostgreSQL transport and discovery. Every key has a default, so an
/// empty table connects to the local server's `postgres` database over its Unix socket; an
/// unknown or mistyped key is an error that names it.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(crate = "comms_plugin_api::serde", deny_unknown_fields, default)]
pub struct PostgresConfig {
    /// The server: a libpq-style connection string (`host=/run/postgresql dbname=app user=app`)
    /// or URL (`postgres://app:secret@db.internal:5432/app`). Its password is never logged nor
    /// put in an error message.
    pub url: String,
    /// The schema holding the plugin's tables, created if missing. Nodes that share it reach one
    /// another; nodes in different schemas of one database are isolated (tests use one each).
    pub schema: String,
    /// How long a received message stays leased to this instance before it is delivered again
    /// (to this node id's next `receive`, here or in another process).
    pub lease_ms: u64,
    /// Deliveries of one message before it goes to `comms_dead_letter` instead.
    pub max_attempts: u32,
    /// How long a message the application gave back (`nack`) waits before it can be claimed
    /// again, after its first delivery; doubled at each later delivery, up to
    /// `requeue_delay_max_ms` (`comms_plugin_api::requeue_delay`). 0: at once.
    pub requeue_delay_ms: u64,
    /// Upper bound of that delay (at most one day).
    pub requeue_delay_max_ms: u64,
    /// Largest number of messages claimed by one query, and of sends written by one statement.
    pub batch_size: usize,
    /// The safety poll of an idle receiver: it is woken by `LISTEN/NOTIFY`, and looks at its
    /// mailbox on its own only this often (and when a lease it saw runs out).
    pub poll_ms: u64,
    /// Largest payload in bytes `send` accepts and `receive` delivers (at most 512 MiB).
    pub max_message_size: u64,
    /// Sends waiting for the transport's writer before `send` waits (backpressure).
    pub send_queue: usize,
    /// Time limit of one connection attempt.
    pub connect_timeout_ms: u64,
    /// Connection attempts (at open, and after a lost connection) before an operation fails.
    pub connect_attempts: u32,
    /// Discovery: how often this node's registry row is refreshed.
    pub heartbeat_ms: u64,
    /// Discovery: a node whose heartbeat is older than this is gone.
    pub peer_timeout_ms: u64,
    /// PEM file of the CA certificate(s) that signed the server's certificate. Turns TLS on
    /// (`sslmode=require`): the server's certificate and host name are checked against it, as
    /// libpq's `verify-full` does.
    pub ca_file: Option<String>,
    /// PEM certificate this client presents (with `client_key_file`), for servers that ask
    /// for one (`clientcert` in `pg_hba.conf`).
    pub client_cert_file: Option<String>,
    /// PEM private key of `client_cert_file`.
    pub client_key_file: Option<String>,
}

/// Default of [`PostgresConfig::max_message_size`]: 8 MiB.
pub const DEFAULT_MAX_MESSAGE_SIZE: u64 = 8 << 20;

/// Sizes above this are refused: PostgreSQL's limit on one `bytea` value is 1 GB, and the
/// encoded envelope needs room for its header.
pub const LARGEST_MAX_MESSAGE_SIZE: u64 = 512 << 20;

impl Default for PostgresConfig {
    fn default() -> Self {
        Self {
            url: "host=/var/run/postgresql dbname=postgres".to_string(),
            schema: "comms".to_string(),
            lease_ms: 30_000,
            max_attempts: 10,
            requeue_delay_ms: 0,
            requeue_delay_max_ms: requeue_delay::DEFAULT_MAX_MS,
            batch_size: 256,
            poll_ms: 5_000,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            send_queue: 1024,
            connect_timeout_ms: 5_000,
            connect_attempts: 5,
            heartbeat_ms: 1_000,
            peer_timeout_ms: 5_000,
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
        }
    }
}

/// The password stays out of `{:?}` too.
impl std::fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("url", &redacted_url(&self.url))
            .field("schema", &self.schema)
            .field("lease_ms", &self.lease_ms)
            .field("max_attempts", &self.max_attempts)
            .finish_non_exhaustive()
    }
}

/// `url` fit for a log line: a URL's password becomes `***`; a key/value connection string that
/// has a password is not shown at all (its quoting rules would make a partial redaction risky).
pub(crate) fn redacted_url(url: &str) -> String {
    if url.contains("://") {
        redact_url(url)
    } else if url.to_ascii_lowercase().contains("password") {
        "(a connection string with a password, not shown)".to_string()
    } else {
        url.to_string()
    }
}

fn bad(key: &str, why: impl std::fmt::Display) -> PluginError {
    PluginError::invalid_config(format!("key `{key}`: {why}"))
}

impl PostgresConfig {
    /// Rejects values that cannot work, naming the key, and returns the parsed connection
    /// settings.
    pub fn validate(&self) -> Result<tokio_postgres::Config, PluginError> {
        for (key, value) in [
            ("lease_ms", self.lease_ms),
            ("max_attempts", u64::from(self.max_attempts)),
            ("batch_size", self.batch_size as u64),
            ("poll_ms", self.poll_ms),
            ("max_message_size", self.max_message_size),
            ("send_queue", self.send_queue as u64),
            ("connect_timeout_ms", self.connect_timeout_ms),
            ("connect_attempts", u64::from(self.connect_attempts)),
            ("heartbeat_ms", self.heartbeat_ms),
        ] {
            if value == 0 {
                return Err(bad(key, "must be greater than 0"));
            }
        }
        if self.max_message_size > LARGEST_MAX_MESSAGE_SIZE {
            return Err(bad("max_message_size", format!("must be at most {LARGEST_MAX_MESSAGE_SIZE} bytes")));
        }
        if self.peer_timeout_ms <= self.heartbeat_ms {
            return Err(bad("peer_timeout_ms", "must be greater than heartbeat_ms"));
        }
        RequeueDelay::check(self.requeue_delay_ms, self.requeue_delay_max_ms)
            .map_err(|(key, why)| bad(key, why))?;
        check_schema_name(&self.schema)?;
        let mut connection: tokio_postgres::Config = self.url.parse().map_err(|error| {
            // tokio-postgres' parse errors quote no part of the string, so no password leaks.
            bad("url", format!("not a PostgreSQL connection string or URL: {error}"))
        })?;
        if connection.get_hosts().is_empty() {
            return Err(bad("url", "names no host (add host=... or postgres://HOST/...)"));
        }
        if connection.get_user().is_none() {
            // libpq's default, the operating system user; tokio-postgres asks the system for it
            // when $USER is not set.
            if let Ok(user) = std::env::var("USER") {
                connection.user(user);
            }
        }
        connection.connect_timeout(Duration::from_millis(self.connect_timeout_ms));
        let files = self.tls_files();
        // The URL's scheme says nothing about TLS in PostgreSQL (sslmode does): no scheme check.
        files.validate("", "")?;
        match (files.ca_file.is_some(), connection.get_ssl_mode()) {
            (true, SslMode::Disable) => {
                return Err(bad("ca_file", "TLS is asked for, but the url says sslmode=disable"));
            }
            (true, _) => {
                connection.ssl_mode(SslMode::Require);
            }
            (false, SslMode::Require) => {
                return Err(bad(
                    "ca_file",
                    "the url asks for sslmode=require: name the CA that signed the server's certificate \
                     (it is checked, with the host name, as libpq's verify-full does)",
                ));
            }
            (false, _) if !files.is_empty() => {
                return Err(bad(
                    "ca_file",
                    "needed with `client_cert_file`: TLS to PostgreSQL checks the server",
                ));
            }
            // Without TLS files nothing is encrypted: `prefer` falls back to a plain connection.
            (false, _) => {
                connection.ssl_mode(SslMode::Disable);
            }
        }
        // Operators find the plugin's connections in pg_stat_activity by this name, unless the
        // url names one.
        if connection.get_application_name().is_none() {
            connection.application_name("comms");
        }
        Ok(connection)
    }

    /// The certificate files, in the form the plugin API reads them.
    pub(crate) fn tls_files(&self) -> TlsFiles {
        TlsFiles {
            ca_file: self.ca_file.as_ref().map(PathBuf::from),
            client_cert_file: self.client_cert_file.as_ref().map(PathBuf::from),
            client_key_file: self.client_key_file.as_ref().map(PathBuf::from),
        }
    }

    /// When a requeued message can be claimed again.
    pub(crate) fn requeue_delay(&self) -> RequeueDelay {
        RequeueDelay::from_millis(self.requeue_delay_ms, self.requeue_delay_max_ms)
    }

    /// The reconnect policy: doubling delays from 100 ms up to 2 s, `connect_attempts` tries.
    pub(crate) fn backoff(&self) -> Backoff {
        Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
            attempts: self.connect_attempts,
        }
    }
}

/// Schema names are letters, digits and `_` (so that they need no quoting rules of their own in
/// a notification channel name or an error message), at most 48 bytes (channel names are
/// limited to 63 and carry a prefix).
fn check_schema_name(schema: &str) -> Result<(), PluginError> {
    let valid = !schema.is_empty()
        && schema.len() <= 48
        && schema.bytes().all(|byte| byte.is_ascii_alphanumeric() || byte == b'_')
        && !schema.as_bytes()[0].is_ascii_digit();
    if valid {
        Ok(())
    } else {
        Err(bad(
            "schema",
            format!("`{schema}` must be 1 to 48 ASCII letters, digits or `_`, not starting with a digit"),
        ))
    }
}

/// Where a connection goes, for logs and errors: `user@host:port/dbname`, never the password.
pub(crate) fn describe(connection: &tokio_postgres::Config) -> String {
    use tokio_postgres::config::Host;
    let host = match connection.get_hosts().first() {
        Some(Host::Tcp(host)) => host.clone(),
        Some(Host::Unix(path)) => path.display().to_string(),
        None => "?".to_string(),
    };
    let port = connection.get_ports().first().copied().unwrap_or(5432);
    format!(
        "{}@{host}:{port}/{}",
        connection.get_user().unwrap_or("(system user)"),
        connection.get_dbname().unwrap_or("(user's database)")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use comms_plugin_api::config::parse_config;

    #[test]
    fn errors_name_the_key() {
        let error = parse_config::<PostgresConfig>("lease = 5").unwrap_err();
        assert!(error.message.contains("lease"), "{}", error.message);
        let config =
            PostgresConfig { url: "postgres://a:b@".to_string() + "host:notaport/db", ..Default::default() };
        let error = config.validate().unwrap_err();
        assert!(error.message.starts_with("key `url`"), "{}", error.message);
        assert!(!error.message.contains(":b@"), "no password in {}", error.message);
        let config = PostgresConfig { schema: "bad-name".into(), ..Default::default() };
        assert!(config.validate().unwrap_err().message.starts_with("key `schema`"));
        let config = PostgresConfig { lease_ms: 0, ..Default::default() };
        assert!(config.validate().unwrap_err().message.starts_with("key `lease_ms`"));
        let config = PostgresConfig { peer_timeout_ms: 10, ..Default::default() };
        assert!(config.validate().unwrap_err().message.starts_with("key `peer_timeout_ms`"));
        let config =
            PostgresConfig { requeue_delay_ms: 1_000, requeue_delay_max_ms: 500, ..Default::default() };
        assert!(config.validate().unwrap_err().message.starts_with("key `requeue_delay_ms`"));
    }

    #[test]
    fn the_password_is_never_shown() {
        let config =
            PostgresConfig { url: "postgres://app:s3cret@db:5433/orders".into(), ..Default::default() };
        let connection = config.validate().unwrap();
        assert_eq!(describe(&connection), "app@db:5433/orders");
        assert!(!format!("{config:?}").contains("s3cret"));
        let config =
            PostgresConfig { url: "host=db user=app password=s3cret dbname=x".into(), ..Default::default() };
        assert_eq!(describe(&config.validate().unwrap()), "app@db:5432/x");
        assert!(!format!("{config:?}").contains("s3cret"));
    }
}
