//! The plugin's config tables: `[transports.<name>]` ([`NatsTransportConfig`]) and
//! `[discovery]` ([`NatsDiscoveryConfig`]). Every key has a default, so an empty table works
//! against a local NATS server; a key neither struct reads is an error that names it.

use comms_plugin_api::{
    backoff::Backoff,
    requeue_delay::{self, RequeueDelay},
    serde::Deserialize,
    PluginError,
};
use std::time::Duration;

/// How to reach and authenticate to the NATS server: the keys both tables share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    /// `nats://host:port` or `tls://host:port` (TLS required); several servers separated by
    /// commas. User and password may be in the URL (`nats://user:password@host:4222`), or a
    /// token (`nats://token@host:4222`), instead of the keys below.
    pub url: String,
    /// A `.creds` file (JWT and nkey seed, from `nsc`).
    pub creds_file: Option<String>,
    /// User name, with `password`.
    pub user: Option<String>,
    /// Password of `user`. Never logged.
    pub password: Option<String>,
    /// Authentication token. Never logged.
    pub token: Option<String>,
    /// PEM file of the CA(s) the server's certificate is checked against (a private CA); turns
    /// TLS on. Without it a `tls://` URL is checked against the system's roots.
    pub ca_file: Option<String>,
    /// Connection attempts before the constructor gives up (delays double from 100 ms to 2 s).
    pub connect_attempts: u32,
    /// Bound of one request to the server (a JetStream API call, a publish acknowledgement).
    pub request_timeout_ms: u64,
}

impl Connection {
    /// The retry schedule of the first connection.
    pub fn backoff(&self) -> Backoff {
        Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
            attempts: self.connect_attempts.max(1),
        }
    }

    /// Credentials written in a server URL: `nats://user:password@host` gives a user and a
    /// password, `nats://token@host` a token (NATS's convention); percent-escapes are decoded.
    /// The client library reads credentials from its options only, so the transport passes
    /// these on itself.
    pub fn url_credentials(&self) -> Option<(String, Option<String>)> {
        self.url.split(',').find_map(|url| {
            let rest = url.trim().split_once("://")?.1;
            let authority = rest.split(['/', '?', '#']).next()?;
            let (userinfo, _) = authority.rsplit_once('@')?;
            match userinfo.split_once(':') {
                Some((user, password)) => Some((percent_decoded(user), Some(percent_decoded(password)))),
                None if userinfo.is_empty() => None,
                None => Some((percent_decoded(userinfo), None)),
            }
        })
    }

    fn validate(&self) -> Result<(), PluginError> {
        let bad = |key: &str, why: &str| Err(PluginError::invalid_config(format!("key `{key}`: {why}")));
        for server in self.url.split(',') {
            let server = server.trim();
            let scheme_ok = ["nats://", "tls://"].iter().any(|scheme| server.starts_with(scheme));
            if !scheme_ok || server.len() <= "nats://".len() {
                return bad(
                    "url",
                    &format!(
                        "`{}` is not a NATS URL (`nats://host:port` or `tls://host:port`)",
                        comms_plugin_api::redact::redact_url(server)
                    ),
                );
            }
        }
        if self.password.is_some() && self.user.is_none() {
            return bad("password", "a password needs `user`");
        }
        if self.user.is_some() && self.password.is_none() {
            return bad("user", "a user needs `password`");
        }
        let methods = [self.creds_file.is_some(), self.user.is_some(), self.token.is_some()];
        if methods.iter().filter(|set| **set).count() > 1 {
            return bad(
                "creds_file",
                "use one of `creds_file`, `user` + `password` and `token`, not several",
            );
        }
        if methods.contains(&true) && self.url_credentials().is_some() {
            return bad(
                "url",
                "credentials are in the URL and in `creds_file`, `user` or `token`: give them once",
            );
        }
        if self.connect_attempts == 0 {
            return bad("connect_attempts", "must be at least 1");
        }
        if self.request_timeout_ms == 0 {
            return bad("request_timeout_ms", "must be above 0");
        }
        Ok(())
    }
}

/// `%XX` escapes decoded (a byte each); anything else kept as it is.
fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| text.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) => {
                decoded.push(byte);
                i += 3;
            }
            None => {
                decoded.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&decoded).into_owned()
}

fn default_url() -> String {
    "nats://127.0.0.1:4222".to_string()
}

/// `[transports.<name>]`: a JetStream stream per deployment, a durable consumer per node.
///
/// ```toml
/// [transports.nats]
/// url = "nats://127.0.0.1:4222"
/// stream = "COMMS"          # the JetStream stream of the deployment (created if absent)
/// prefix = "comms"          # subjects: comms.inbox.<node>, comms.dead-letter.<node>, comms.topic.<topic>
/// ack_wait_ms = 30000       # a message taken and not settled is delivered again after this long
/// max_deliveries = 10       # deliveries without acceptance before it goes to the dead letters
/// requeue_delay_ms = 0      # a nacked message comes again after this, doubled per delivery (0: at once)
/// requeue_delay_max_ms = 300000  # ... up to this
/// durable_topics = false    # true: topics through the stream `<stream>-topics`, a durable consumer
///                           # per (node, pattern), at-least-once
/// ```
///
/// ## Durable topics (`durable_topics = true`)
///
/// Off by default: topics are core NATS subjects, at-most-once, and a subscriber that is down
/// misses what is published meanwhile. On:
///
/// - the stream `<stream>-topics` (file storage, **interest retention**) captures
///   `<prefix>.topic.>`: a publication is kept until every subscription that existed when it
///   was published has acknowledged it, and not at all when there is none. `publish` (a send
///   with an empty address) returns once the stream stored it;
/// - each `subscribe(pattern)` creates (or binds again) the durable pull consumer
///   `<node>_<hash>` ([`crate::subject::topic_consumer`]) filtering on
///   `<prefix>.topic.<pattern>`; its messages are settled like the inbox's (acknowledged when
///   the host accepts them, delivered again after `ack_wait_ms`, dead-lettered after
///   `max_deliveries`). The consumer outlives `close` and a crash: the node that comes back
///   with the same id and subscribes again gets what was published meanwhile;
///   `unsubscribe(pattern)` deletes it;
/// - limits: the stream drops a message older than `topic_max_age_ms`, and its oldest ones
///   beyond `topic_max_bytes`, acknowledged or not; the server deletes a consumer nobody pulled
///   from for `topic_inactive_threshold_ms` (a subscriber gone for good stops holding
///   messages then; one that comes back later starts afresh and has missed the interval).
///
/// A node without the option, on the same `prefix`, still receives the publications of durable
/// nodes on the core subjects, and its own publications are stored for durable subscribers.
#[derive(Debug, Clone, Deserialize)]
#[serde(crate = "comms_plugin_api::serde", default)]
pub struct NatsTransportConfig {
    /// See [`Connection::url`].
    pub url: String,
    /// See [`Connection::creds_file`].
    pub creds_file: Option<String>,
    /// See [`Connection::user`].
    pub user: Option<String>,
    /// See [`Connection::password`].
    pub password: Option<String>,
    /// See [`Connection::token`].
    pub token: Option<String>,
    /// See [`Connection::ca_file`].
    pub ca_file: Option<String>,
    /// See [`Connection::connect_attempts`] (default 5).
    pub connect_attempts: u32,
    /// See [`Connection::request_timeout_ms`] (default 5,000).
    pub request_timeout_ms: u64,
    /// Name of the JetStream stream that holds the deployment's inboxes and dead letters
    /// (default `COMMS`); created with file storage and work-queue retention if it does not
    /// exist. Letters, digits, `-` and `_`.
    pub stream: String,
    /// First token of every subject (default `comms`). Two deployments on one server need
    /// different prefixes (and streams).
    pub prefix: String,
    /// How long a delivered message may stay unsettled before the server delivers it again
    /// (default 30,000 ms).
    pub ack_wait_ms: u64,
    /// Deliveries of a message that the host never accepted before it is moved to the dead
    /// letters (default 10).
    pub max_deliveries: u32,
    /// How long a message the application gave back (`nack`) waits before the server delivers
    /// it again, after its first delivery; doubled at each later delivery, up to
    /// `requeue_delay_max_ms` (`comms_plugin_api::requeue_delay`; a negative acknowledgement
    /// with a delay). Default 0: at once.
    pub requeue_delay_ms: u64,
    /// Upper bound of that delay (default 300,000 ms, at most a day).
    pub requeue_delay_max_ms: u64,
    /// Messages handed to the host and not yet settled, at most (default 1,000).
    pub max_unsettled: usize,
    /// Messages asked for in one pull request, at most (default 256).
    pub fetch_batch: usize,
    /// How long one pull request waits for messages before the next one is made (default
    /// 5,000 ms).
    pub fetch_expires_ms: u64,
    /// Largest payload accepted (default: the server's `max_payload` less 64 KiB for the
    /// headers); may not exceed that.
    pub max_message_size: Option<u64>,
    /// Bound of `close` (default 5,000 ms).
    pub close_timeout_ms: u64,
    /// Topics through the JetStream stream `<stream>-topics` with a durable consumer per
    /// subscription (at-least-once, kept while the subscriber is away) instead of core NATS
    /// subjects (at-most-once). Default false. See the type's documentation.
    pub durable_topics: bool,
    /// With `durable_topics`: how long the topic stream keeps a message that some subscription
    /// has not acknowledged (default 86,400,000 ms: a day).
    pub topic_max_age_ms: u64,
    /// With `durable_topics`: size of the topic stream, at most; beyond it the oldest messages
    /// are dropped (default 1 GiB).
    pub topic_max_bytes: u64,
    /// With `durable_topics`: a topic consumer nobody has pulled from for this long is deleted
    /// by the server, and so stops holding messages (default 86,400,000 ms: a day). A longer
    /// time keeps the subscriptions of nodes that are away longer, and what is published for
    /// them; a shorter one frees the stream sooner from subscribers that never come back. At
    /// least twice `fetch_expires_ms`, so that a running node's consumer never expires.
    pub topic_inactive_threshold_ms: u64,
}

impl Default for NatsTransportConfig {
    fn default() -> Self {
        Self {
            url: default_url(),
            creds_file: None,
            user: None,
            password: None,
            token: None,
            ca_file: None,
            connect_attempts: 5,
            request_timeout_ms: 5_000,
            stream: "COMMS".to_string(),
            prefix: "comms".to_string(),
            ack_wait_ms: 30_000,
            max_deliveries: 10,
            requeue_delay_ms: 0,
            requeue_delay_max_ms: requeue_delay::DEFAULT_MAX_MS,
            max_unsettled: 1_000,
            fetch_batch: 256,
            fetch_expires_ms: 5_000,
            max_message_size: None,
            close_timeout_ms: 5_000,
            durable_topics: false,
            topic_max_age_ms: 86_400_000,
            topic_max_bytes: 1 << 30,
            topic_inactive_threshold_ms: 86_400_000,
        }
    }
}

/// Smallest `topic_max_bytes`.
const MIN_TOPIC_BYTES: u64 = 1 << 20;

/// The name of the topic stream of the deployment whose stream is `stream` (`durable_topics`).
pub fn topics_stream_name(stream: &str) -> String {
    format!("{stream}-topics")
}

/// Whether `name` is usable as a stream or bucket name (and a subject token).
pub(crate) fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_')
}

/// Whether `prefix` is a valid subject prefix: plain names separated by dots.
fn is_subject_prefix(prefix: &str) -> bool {
    prefix.split('.').all(is_plain_name)
}

impl NatsTransportConfig {
    /// When a requeued message comes again.
    pub fn requeue_delay(&self) -> RequeueDelay {
        RequeueDelay::from_millis(self.requeue_delay_ms, self.requeue_delay_max_ms)
    }

    /// The connection keys.
    pub fn connection(&self) -> Connection {
        Connection {
            url: self.url.clone(),
            creds_file: self.creds_file.clone(),
            user: self.user.clone(),
            password: self.password.clone(),
            token: self.token.clone(),
            ca_file: self.ca_file.clone(),
            connect_attempts: self.connect_attempts,
            request_timeout_ms: self.request_timeout_ms,
        }
    }

    /// Checks every key; the error names the first bad one.
    pub fn validate(&self) -> Result<(), PluginError> {
        self.connection().validate()?;
        let bad = |key: &str, why: &str| Err(PluginError::invalid_config(format!("key `{key}`: {why}")));
        if !is_plain_name(&self.stream) {
            return bad("stream", "1 to 64 letters, digits, `-` or `_`");
        }
        if !is_subject_prefix(&self.prefix) {
            return bad("prefix", "tokens of letters, digits, `-` or `_`, separated by `.`");
        }
        if self.ack_wait_ms == 0 {
            return bad("ack_wait_ms", "must be above 0");
        }
        if self.max_deliveries == 0 {
            return bad("max_deliveries", "must be at least 1");
        }
        if let Err((key, why)) = RequeueDelay::check(self.requeue_delay_ms, self.requeue_delay_max_ms) {
            return bad(key, &why);
        }
        if self.max_unsettled == 0 {
            return bad("max_unsettled", "must be at least 1");
        }
        if self.fetch_batch == 0 {
            return bad("fetch_batch", "must be at least 1");
        }
        if self.fetch_expires_ms < 100 {
            return bad("fetch_expires_ms", "must be at least 100");
        }
        if self.max_message_size == Some(0) {
            return bad("max_message_size", "must be above 0");
        }
        if self.durable_topics {
            // The stream's name is `<stream>-topics`: still a plain name.
            if !is_plain_name(&topics_stream_name(&self.stream)) {
                return bad(
                    "stream",
                    "with `durable_topics`, at most 57 characters (the topic stream is `<stream>-topics`)",
                );
            }
            if self.topic_max_age_ms < 1_000 {
                return bad("topic_max_age_ms", "must be at least 1000");
            }
            if self.topic_max_bytes < MIN_TOPIC_BYTES || self.topic_max_bytes > i64::MAX as u64 {
                return bad(
                    "topic_max_bytes",
                    "must be at least 1048576 (1 MiB, the room of one large message)",
                );
            }
            if self.topic_inactive_threshold_ms < 2 * self.fetch_expires_ms {
                return bad(
                    "topic_inactive_threshold_ms",
                    &format!(
                        "must be at least twice `fetch_expires_ms` ({} ms), or the server would delete the \
                         consumer of a running node between two pulls",
                        2 * self.fetch_expires_ms
                    ),
                );
            }
        }
        Ok(())
    }
}

/// `[discovery]` with `plugin = "nats"`: node records in a JetStream key-value bucket.
///
/// ```toml
/// [discovery]
/// plugin = "nats"
/// url = "nats://127.0.0.1:4222"
/// bucket = "comms_nodes"    # created if absent
/// ttl_ms = 10000            # a crashed node disappears at most this long after its last heartbeat
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(crate = "comms_plugin_api::serde", default)]
pub struct NatsDiscoveryConfig {
    /// See [`Connection::url`].
    pub url: String,
    /// See [`Connection::creds_file`].
    pub creds_file: Option<String>,
    /// See [`Connection::user`].
    pub user: Option<String>,
    /// See [`Connection::password`].
    pub password: Option<String>,
    /// See [`Connection::token`].
    pub token: Option<String>,
    /// See [`Connection::ca_file`].
    pub ca_file: Option<String>,
    /// See [`Connection::connect_attempts`] (default 5).
    pub connect_attempts: u32,
    /// See [`Connection::request_timeout_ms`] (default 5,000).
    pub request_timeout_ms: u64,
    /// The key-value bucket of node records (default `comms_nodes`).
    pub bucket: String,
    /// How long a record lives without a heartbeat (default 10,000 ms); the heartbeat rewrites
    /// it every third of that.
    pub ttl_ms: u64,
    /// How often the bucket is scanned for records past their TTL (default 1,000 ms).
    pub scan_interval_ms: u64,
}

impl Default for NatsDiscoveryConfig {
    fn default() -> Self {
        Self {
            url: default_url(),
            creds_file: None,
            user: None,
            password: None,
            token: None,
            ca_file: None,
            connect_attempts: 5,
            request_timeout_ms: 5_000,
            bucket: "comms_nodes".to_string(),
            ttl_ms: 10_000,
            scan_interval_ms: 1_000,
        }
    }
}

impl NatsDiscoveryConfig {
    /// The connection keys.
    pub fn connection(&self) -> Connection {
        Connection {
            url: self.url.clone(),
            creds_file: self.creds_file.clone(),
            user: self.user.clone(),
            password: self.password.clone(),
            token: self.token.clone(),
            ca_file: self.ca_file.clone(),
            connect_attempts: self.connect_attempts,
            request_timeout_ms: self.request_timeout_ms,
        }
    }

    /// Checks every key; the error names the first bad one.
    pub fn validate(&self) -> Result<(), PluginError> {
        self.connection().validate()?;
        let bad = |key: &str, why: &str| Err(PluginError::invalid_config(format!("key `{key}`: {why}")));
        if !is_plain_name(&self.bucket) {
            return bad("bucket", "1 to 64 letters, digits, `-` or `_`");
        }
        if self.ttl_ms < 300 {
            return bad("ttl_ms", "must be at least 300");
        }
        if self.scan_interval_ms == 0 {
            return bad("scan_interval_ms", "must be above 0");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use comms_plugin_api::config::parse_config;

    #[test]
    fn an_empty_table_is_valid() {
        let config: NatsTransportConfig = parse_config("").expect("defaults");
        config.validate().expect("valid defaults");
        let config: NatsDiscoveryConfig = parse_config("").expect("defaults");
        config.validate().expect("valid defaults");
    }

    #[test]
    fn errors_name_the_key() {
        let error = parse_config::<NatsTransportConfig>("strem = \"X\"").expect_err("unknown key");
        assert!(error.message.contains("strem"), "{}", error.message);
        let check = |toml: &str, key: &str| {
            let config: NatsTransportConfig = parse_config(toml).expect("parses");
            let error = config.validate().expect_err(toml);
            assert!(error.message.contains(&format!("`{key}`")), "{toml}: {}", error.message);
        };
        check("url = \"redis://host\"", "url");
        check("stream = \"a.b\"", "stream");
        check("prefix = \"a..b\"", "prefix");
        check("prefix = \"a b\"", "prefix");
        check("password = \"x\"", "password");
        check("token = \"t\"\nuser = \"u\"\npassword = \"p\"", "creds_file");
        check("ack_wait_ms = 0", "ack_wait_ms");
        check("durable_topics = true\ntopic_max_age_ms = 10", "topic_max_age_ms");
        check("durable_topics = true\ntopic_max_bytes = 1000", "topic_max_bytes");
        check("durable_topics = true\ntopic_inactive_threshold_ms = 5000", "topic_inactive_threshold_ms");
        check(&format!("durable_topics = true\nstream = \"{}\"", "s".repeat(60)), "stream");
        // The topic keys are read, and checked, only with durable topics on.
        let config: NatsTransportConfig = parse_config("topic_max_age_ms = 10").expect("parses");
        config.validate().expect("durable topics off: the topic keys are not used");
        let error = parse_config::<NatsTransportConfig>("durable_topic = true").expect_err("unknown key");
        assert!(error.message.contains("durable_topic"), "{}", error.message);
    }

    #[test]
    fn a_bad_url_error_hides_the_password() {
        let config: NatsTransportConfig = parse_config("url = \"http://me:s3cret@host\"").expect("parses");
        let error = config.validate().expect_err("not a NATS URL");
        assert!(!error.message.contains("s3cret"), "{}", error.message);
    }
}
