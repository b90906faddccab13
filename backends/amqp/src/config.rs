//! The config tables of the transport and the discovery. Every key is optional; an unknown key
//! is an error naming it.

use comms_plugin_api::{
    backoff::Backoff,
    redact::redact_url,
    requeue_delay::{self, RequeueDelay},
    tls::TlsFiles,
    PluginError,
};
use serde::Deserialize;
use std::{path::PathBuf, time::Duration};

/// Default broker URL: RabbitMQ's default user on this machine, default virtual host.
pub const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Default of [`AmqpConfig::max_message_size`]: 16 MiB (RabbitMQ 4's own default limit; 3.x
/// allows 128 MiB).
pub const DEFAULT_MAX_MESSAGE_SIZE: u64 = 16 * 1024 * 1024;

/// Default of [`AmqpConfig::dead_letter_exchange`] and [`AmqpConfig::dead_letter_queue`].
pub const DEFAULT_DEAD_LETTER: &str = "comms.dead-letter";

/// Default of [`AmqpConfig::discovery_exchange`] and [`AmqpDiscoveryConfig::exchange`].
pub const DEFAULT_DISCOVERY_EXCHANGE: &str = "comms.discovery";

/// Default of [`AmqpConfig::max_attempts`]: as SQLite, Redis, PostgreSQL and NATS.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 10;

/// Largest accepted `requeue_delay_max_ms`: 15 minutes. The transport holds a requeued message
/// unacknowledged for its delay, and RabbitMQ closes the channel of a delivery left
/// unacknowledged for its `consumer_timeout` (30 minutes by default): half of it is left for
/// the handler.
pub const LARGEST_REQUEUE_DELAY_MS: u64 = 900_000;

/// What kind of queue the inbox is (`x-queue-type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    /// RabbitMQ's classic queue: one copy on one broker node. It does not count a message's
    /// deliveries, only marks them redelivered: the transport counts those it gets itself, in
    /// memory ([`crate::redeliveries`]).
    #[default]
    Classic,
    /// A quorum queue (RabbitMQ 3.8 and later): replicated (Raft), and it counts each message's
    /// deliveries (header `x-delivery-count`), which `max_attempts` reads: across restarts and
    /// across every consumer of the inbox.
    Quorum,
}

/// The `[transports.amqp]` table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AmqpConfig {
    /// Broker URL, `amqp://` or `amqps://` (TLS), with credentials and virtual host
    /// (`%2f` is `/`). Never logged with its password.
    pub url: String,
    /// With `amqps://`: PEM file of the CA certificate(s) that signed the broker's certificate
    /// (a private CA), trusted in addition to the system's roots and the bundled Mozilla roots.
    /// A relative path is relative to the process' working directory.
    pub ca_file: Option<PathBuf>,
    /// With `amqps://`: PEM certificate (chain) this client presents, for brokers that
    /// require client certificates (`ssl_options.fail_if_no_peer_cert`). Needs
    /// `client_key_file`.
    pub client_cert_file: Option<PathBuf>,
    /// With `amqps://`: PEM private key of `client_cert_file`.
    pub client_key_file: Option<PathBuf>,
    /// The node's inbox queue is this prefix followed by the node id; it is also the address
    /// peers send to.
    pub queue_prefix: String,
    /// Topic exchange for native topics (declared durable if missing).
    pub topic_exchange: String,
    /// Unacknowledged messages the broker pushes ahead per consuming queue (`basic.qos`).
    pub prefetch: u16,
    /// Largest payload in bytes this transport sends. Keep it at or below the broker's own
    /// `max_message_size`.
    pub max_message_size: u64,
    /// Deletes an inbox the broker has seen unused (no consumer) for this long (`x-expires`),
    /// with what is in it. Default: kept until deleted by hand. Every node sharing an inbox
    /// must use the same value.
    pub inbox_expires_ms: Option<u64>,
    /// `classic` (default) or `quorum`: what kind of queue the inbox is declared as. Every node
    /// sharing an inbox must use the same value, and an existing inbox keeps its kind (changing
    /// it means deleting the queue).
    pub inbox_queue_type: QueueType,
    /// A message delivered this many times and never accepted (requeued each time, or left by
    /// consumers that crashed on it) goes to the dead letters, with the reason `delivered
    /// max_attempts times without being accepted`. Default 10. A quorum inbox counts the
    /// deliveries; on a classic inbox, which does not, and on the topic queue, each process
    /// counts the redeliveries it gets (see [`crate::redeliveries`] for what that count misses).
    pub max_attempts: Option<u32>,
    /// A message settled REJECTED_REQUEUE (the application's `nack`) comes again after this
    /// long instead of at once: the transport holds it unacknowledged for the delay, then
    /// hands it back (`basic.nack(requeue)`). The delay doubles at each delivery (counted as
    /// for `max_attempts`) up to `requeue_delay_max_ms` ([`comms_plugin_api::requeue_delay`]).
    /// 0 (default): at once.
    pub requeue_delay_ms: u64,
    /// Upper bound of that delay, at most [`LARGEST_REQUEUE_DELAY_MS`].
    pub requeue_delay_max_ms: u64,
    /// Exchange that dead letters go to (a message refused for good: not a comms message,
    /// above `max_message_size`, or settled REJECTED_DISCARD), declared at start (`fanout`,
    /// durable) if missing. It is also the inbox's `x-dead-letter-exchange`, so the broker's own
    /// dead letters (TTL, length limits) go there too: same rule as `inbox_expires_ms`. Empty:
    /// no dead-lettering, refused messages are dropped (logged).
    pub dead_letter_exchange: String,
    /// Queue bound to `dead_letter_exchange` (declared at start, durable) so that dead letters
    /// are kept until someone reads them. Empty: none (bind your own).
    pub dead_letter_queue: String,
    /// Cap of `dead_letter_queue` (`x-max-length`): past it the broker drops the oldest dead
    /// letters.
    pub dead_letter_queue_max_length: u64,
    /// Fanout exchange of AMQP discovery, declared at start (durable) so that programs that are
    /// not comms can publish announcements to it before any comms node with AMQP discovery ran.
    /// Empty: not declared.
    pub discovery_exchange: String,
    /// Connection attempts at start before the transport reports the broker unreachable.
    pub connect_attempts: u32,
    /// First delay between connection attempts; doubles each time.
    pub reconnect_initial_delay_ms: u64,
    /// Longest delay between connection attempts (at start and after losing the connection).
    pub reconnect_max_delay_ms: u64,
    /// How long a `send` waits for the connection to come back and for the broker's confirm
    /// before it fails (the message may then still arrive: at-least-once).
    pub send_timeout_ms: u64,
}

impl Default for AmqpConfig {
    fn default() -> Self {
        Self {
            url: DEFAULT_URL.to_string(),
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
            queue_prefix: "comms.inbox.".to_string(),
            topic_exchange: "comms.topics".to_string(),
            prefetch: 256,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            inbox_expires_ms: None,
            inbox_queue_type: QueueType::Classic,
            max_attempts: None,
            requeue_delay_ms: 0,
            requeue_delay_max_ms: requeue_delay::DEFAULT_MAX_MS,
            dead_letter_exchange: DEFAULT_DEAD_LETTER.to_string(),
            dead_letter_queue: DEFAULT_DEAD_LETTER.to_string(),
            dead_letter_queue_max_length: 100_000,
            discovery_exchange: DEFAULT_DISCOVERY_EXCHANGE.to_string(),
            connect_attempts: 5,
            reconnect_initial_delay_ms: 100,
            reconnect_max_delay_ms: 5_000,
            send_timeout_ms: 30_000,
        }
    }
}

impl AmqpConfig {
    /// The certificate files of an `amqps://` connection.
    pub fn tls_files(&self) -> TlsFiles {
        TlsFiles {
            ca_file: self.ca_file.clone(),
            client_cert_file: self.client_cert_file.clone(),
            client_key_file: self.client_key_file.clone(),
        }
    }

    /// Rejects values that cannot work, naming the key.
    pub fn validate(&self) -> Result<(), PluginError> {
        validate_url(&self.url)?;
        self.tls_files().validate(&self.url, "amqps://")?;
        positive("prefetch", u64::from(self.prefetch))?;
        positive("max_message_size", self.max_message_size)?;
        positive("connect_attempts", u64::from(self.connect_attempts))?;
        positive("send_timeout_ms", self.send_timeout_ms)?;
        if self.inbox_expires_ms == Some(0) {
            return Err(PluginError::invalid_config("key `inbox_expires_ms`: must be greater than 0"));
        }
        if let Some(attempts) = self.max_attempts {
            positive("max_attempts", u64::from(attempts))?;
        }
        if let Err((key, why)) = RequeueDelay::check(self.requeue_delay_ms, self.requeue_delay_max_ms) {
            return Err(PluginError::invalid_config(format!("key `{key}`: {why}")));
        }
        if self.requeue_delay_max_ms > LARGEST_REQUEUE_DELAY_MS {
            return Err(PluginError::invalid_config(format!(
                "key `requeue_delay_max_ms`: must be at most {LARGEST_REQUEUE_DELAY_MS} (15 minutes): a requeued \
                 message is held unacknowledged for its delay, and RabbitMQ closes the channel of a delivery \
                 unacknowledged for its consumer_timeout (30 minutes by default)"
            )));
        }
        if self.topic_exchange.is_empty() {
            return Err(PluginError::invalid_config("key `topic_exchange`: must not be empty"));
        }
        if !self.dead_letter_queue.is_empty() && self.dead_letter_exchange.is_empty() {
            return Err(PluginError::invalid_config(
                "key `dead_letter_queue`: needs a `dead_letter_exchange` to be bound to",
            ));
        }
        positive("dead_letter_queue_max_length", self.dead_letter_queue_max_length)?;
        for (key, name) in [
            ("dead_letter_exchange", &self.dead_letter_exchange),
            ("dead_letter_queue", &self.dead_letter_queue),
            ("discovery_exchange", &self.discovery_exchange),
        ] {
            if name.len() > 255 {
                return Err(PluginError::invalid_config(format!(
                    "key `{key}`: longer than AMQP's 255 bytes"
                )));
            }
        }
        Ok(())
    }

    /// Delays between connection attempts at start.
    pub fn backoff(&self) -> Backoff {
        backoff(self.connect_attempts, self.reconnect_initial_delay_ms, self.reconnect_max_delay_ms)
    }

    /// When a requeued message comes again.
    pub fn requeue_delay(&self) -> RequeueDelay {
        RequeueDelay::from_millis(self.requeue_delay_ms, self.requeue_delay_max_ms)
    }

    /// The deliveries after which a message goes to the dead letters.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS)
    }
}

/// The `[discovery]` table (with `plugin = "amqp"`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AmqpDiscoveryConfig {
    /// Broker URL, as for the transport.
    pub url: String,
    /// As for the transport.
    pub ca_file: Option<PathBuf>,
    /// As for the transport.
    pub client_cert_file: Option<PathBuf>,
    /// As for the transport.
    pub client_key_file: Option<PathBuf>,
    /// Fanout exchange the announcements go through (declared durable if missing).
    pub exchange: String,
    /// How often this node re-announces itself.
    pub heartbeat_interval_ms: u64,
    /// A peer not heard from for this long has left. Default: 3 heartbeat intervals. Peers
    /// use the value each node states in its announcements.
    pub expiry_ms: Option<u64>,
    /// Connection attempts at start.
    pub connect_attempts: u32,
    /// First delay between connection attempts; doubles each time.
    pub reconnect_initial_delay_ms: u64,
    /// Longest delay between connection attempts.
    pub reconnect_max_delay_ms: u64,
}

impl Default for AmqpDiscoveryConfig {
    fn default() -> Self {
        Self {
            url: DEFAULT_URL.to_string(),
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
            exchange: DEFAULT_DISCOVERY_EXCHANGE.to_string(),
            heartbeat_interval_ms: 1_000,
            expiry_ms: None,
            connect_attempts: 5,
            reconnect_initial_delay_ms: 100,
            reconnect_max_delay_ms: 5_000,
        }
    }
}

impl AmqpDiscoveryConfig {
    /// The certificate files of an `amqps://` connection.
    pub fn tls_files(&self) -> TlsFiles {
        TlsFiles {
            ca_file: self.ca_file.clone(),
            client_cert_file: self.client_cert_file.clone(),
            client_key_file: self.client_key_file.clone(),
        }
    }

    /// Rejects values that cannot work, naming the key.
    pub fn validate(&self) -> Result<(), PluginError> {
        validate_url(&self.url)?;
        self.tls_files().validate(&self.url, "amqps://")?;
        positive("heartbeat_interval_ms", self.heartbeat_interval_ms)?;
        positive("connect_attempts", u64::from(self.connect_attempts))?;
        if self.exchange.is_empty() {
            return Err(PluginError::invalid_config("key `exchange`: must not be empty"));
        }
        if self.expiry().as_millis() as u64 <= self.heartbeat_interval_ms {
            return Err(PluginError::invalid_config(
                "key `expiry_ms`: must be longer than heartbeat_interval_ms",
            ));
        }
        Ok(())
    }

    /// After this long without an announcement a peer has left.
    pub fn expiry(&self) -> Duration {
        Duration::from_millis(self.expiry_ms.unwrap_or(self.heartbeat_interval_ms.saturating_mul(3)))
    }

    /// Delays between connection attempts at start.
    pub fn backoff(&self) -> Backoff {
        backoff(self.connect_attempts, self.reconnect_initial_delay_ms, self.reconnect_max_delay_ms)
    }
}

fn backoff(attempts: u32, initial_ms: u64, max_ms: u64) -> Backoff {
    Backoff {
        initial: Duration::from_millis(initial_ms),
        max: Duration::from_millis(max_ms.max(initial_ms)),
        attempts,
    }
}

fn positive(key: &str, value: u64) -> Result<(), PluginError> {
    if value == 0 {
        return Err(PluginError::invalid_config(format!("key `{key}`: must be greater than 0")));
    }
    Ok(())
}

fn validate_url(url: &str) -> Result<(), PluginError> {
    if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
        return Err(PluginError::invalid_config(format!(
            "key `url`: `{}` is not an amqp:// or amqps:// URL",
            redact_url(url)
        )));
    }
    url.parse::<lapin::uri::AMQPUri>().map_err(|error| {
        PluginError::invalid_config(format!(
            "key `url`: `{}` is not a valid AMQP URL: {}",
            redact_url(url),
            crate::connection::scrub(url, &error.to_string())
        ))
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use comms_plugin_api::{config::parse_config, ErrorCode};

    #[test]
    fn defaults_are_valid_and_keys_are_checked() {
        AmqpConfig::default().validate().unwrap();
        AmqpDiscoveryConfig::default().validate().unwrap();
        let config: AmqpConfig = parse_config("prefetch = 10\ninbox_expires_ms = 60000").unwrap();
        assert_eq!((config.prefetch, config.inbox_expires_ms), (10, Some(60000)));
        let error = parse_config::<AmqpConfig>("prefech = 10").unwrap_err();
        assert!(error.message.contains("prefech"), "{error}");
        let error = parse_config::<AmqpConfig>("prefetch = 0").unwrap().validate().unwrap_err();
        assert_eq!(error.code, ErrorCode::INVALID_CONFIG);
        assert!(error.message.contains("`prefetch`"), "{error}");
    }

    #[test]
    fn max_attempts_defaults_to_ten_on_either_kind_of_inbox_and_must_be_positive() {
        assert_eq!(AmqpConfig::default().max_attempts(), DEFAULT_MAX_ATTEMPTS);
        for text in ["inbox_queue_type = \"quorum\"", "inbox_queue_type = \"classic\""] {
            let config: AmqpConfig = parse_config(text).unwrap();
            config.validate().unwrap();
            assert_eq!(config.max_attempts(), DEFAULT_MAX_ATTEMPTS, "{text}");
        }
        let three: AmqpConfig = parse_config("max_attempts = 3").unwrap();
        three.validate().unwrap();
        assert_eq!(three.max_attempts(), 3);
        let error = parse_config::<AmqpConfig>("max_attempts = 0").unwrap().validate().unwrap_err();
        assert!(error.message.contains("key `max_attempts`: must be greater than 0"), "{error}");
        let error = parse_config::<AmqpConfig>("inbox_queue_type = \"stream\"").unwrap_err();
        assert!(error.message.contains("stream"), "{error}");
    }

    #[test]
    fn requeue_delay_keys_are_checked_and_held_well_within_the_consumer_timeout() {
        assert!(AmqpConfig::default().requeue_delay().is_immediate());
        let config: AmqpConfig = parse_config("requeue_delay_ms = 500\nrequeue_delay_max_ms = 2000").unwrap();
        config.validate().unwrap();
        assert_eq!(config.requeue_delay().after(3), Duration::from_millis(2_000));
        for (text, key) in [
            ("requeue_delay_ms = 5000\nrequeue_delay_max_ms = 1000", "key `requeue_delay_ms`"),
            ("requeue_delay_max_ms = 900001", "key `requeue_delay_max_ms`: must be at most 900000"),
        ] {
            let error = parse_config::<AmqpConfig>(text).unwrap().validate().unwrap_err();
            assert_eq!(error.code, ErrorCode::INVALID_CONFIG);
            assert!(error.message.contains(key), "{text}: {error}");
        }
    }

    #[test]
    fn bad_urls_are_refused_without_their_password() {
        for url in ["redis://user:hunter2@host", "amqp://user:hunter2@host:notaport/%2f"] {
            let config = AmqpConfig { url: url.to_string(), ..AmqpConfig::default() };
            let error = config.validate().unwrap_err();
            assert!(error.message.contains("key `url`"), "{error}");
            assert!(!error.message.contains("hunter2"), "{error}");
        }
        let amqps = AmqpConfig { url: "amqps://u:p@broker.example:5671/%2f".into(), ..AmqpConfig::default() };
        amqps.validate().unwrap();
    }

    #[test]
    fn certificate_files_need_an_amqps_url() {
        // The rules themselves (pairs, redaction) are tested in comms_plugin_api::tls.
        let config: AmqpConfig =
            parse_config("url = \"amqp://u:secret@host/%2f\"\nca_file = \"ca.pem\"").unwrap();
        let error = config.validate().unwrap_err();
        assert!(
            error.message.contains("key `ca_file`") && error.message.contains("not an amqps:// URL"),
            "{error}"
        );
        let config: AmqpDiscoveryConfig = parse_config(
            "url = \"amqps://host/%2f\"\nclient_cert_file = \"c.pem\"\nclient_key_file = \"k.pem\"",
        )
        .unwrap();
        config.validate().unwrap();
        let config: AmqpDiscoveryConfig = parse_config("client_key_file = \"k.pem\"").unwrap();
        assert!(config.validate().unwrap_err().message.contains("key `client_key_file`"));
    }

    #[test]
    fn discovery_expiry_defaults_to_three_heartbeats_and_must_exceed_one() {
        let config = AmqpDiscoveryConfig { heartbeat_interval_ms: 200, ..AmqpDiscoveryConfig::default() };
        assert_eq!(config.expiry(), Duration::from_millis(600));
        let short = AmqpDiscoveryConfig { expiry_ms: Some(100), ..config };
        assert!(short.validate().unwrap_err().message.contains("expiry_ms"));
    }
}
