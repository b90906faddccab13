//! The config tables of the Redis transport and the Redis discovery, with their defaults and
//! validation. Unknown keys are errors naming the key.

use comms_plugin_api::{
    backoff::Backoff,
    requeue_delay::{self, RequeueDelay},
    tls::TlsFiles,
    PluginError,
};
use serde::Deserialize;
use std::{path::PathBuf, time::Duration};

/// Default of `url`: the local Redis.
pub const DEFAULT_URL: &str = "redis://127.0.0.1:6379";

/// Default of `prefix`: every key and channel the plugin uses starts with `comms:`.
pub const DEFAULT_PREFIX: &str = "comms";

/// Default of `claim_idle_ms`: what a crashed consumer took is delivered again 5 to 7.5 s
/// later. The cost of a short value: a live instance that holds a message longer than this may
/// see another instance of the same node take it too (a duplicate, with the same message id).
pub const DEFAULT_CLAIM_IDLE_MS: u64 = 5_000;

/// Largest payload Redis itself can store in one field (its `proto-max-bulk-len` default).
pub const REDIS_MAX_BULK: u64 = 512 * 1024 * 1024;

/// The `[transports.redis]` table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisTransportConfig {
    /// `redis://[user:password@]host:port[/db]`, or `rediss://` for TLS.
    pub url: String,
    /// With `rediss://`: PEM file of the CA certificate(s) that signed the server's certificate
    /// (a private CA). They replace the system's trusted roots for this connection. Default:
    /// the system's roots. A relative path is relative to the process' working directory.
    pub ca_file: Option<PathBuf>,
    /// With `rediss://`: PEM certificate (chain) this client presents, for servers that
    /// require client certificates (`tls-auth-clients yes`). Needs `client_key_file`.
    pub client_cert_file: Option<PathBuf>,
    /// With `rediss://`: PEM private key of `client_cert_file`.
    pub client_key_file: Option<PathBuf>,
    /// Namespace of every key and channel (`<prefix>:inbox:<node id>`, `<prefix>:topic:<topic>`).
    pub prefix: String,
    /// Consumer group of the inbox streams.
    pub group: String,
    /// Largest payload in bytes (default 16 MiB, at most 512 MiB).
    pub max_message_size: u64,
    /// Entries read per `XREADGROUP` (`COUNT`).
    pub read_batch: usize,
    /// How long one `XREADGROUP` blocks waiting for entries, in milliseconds.
    pub block_ms: u64,
    /// Messages delivered to the host and not yet settled, at most (prefetch).
    pub max_unsettled: usize,
    /// Outgoing messages queued before `send` waits (with `confirm_sends = false`); also the
    /// largest pipeline the writer sends at once.
    pub send_queue: usize,
    /// Whether `send` returns only once Redis stored the message (`true`) or once it is queued.
    pub confirm_sends: bool,
    /// Pending entries idle this long (taken by a consumer that crashed, or whose
    /// acknowledgement was lost) are claimed and delivered again, in milliseconds. Every
    /// claimable entry is claimed in one pass (as fast as `max_unsettled` lets the host take
    /// them), and a pass runs every `claim_idle_ms / 2`.
    pub claim_idle_ms: u64,
    /// Deliveries of one entry (Redis' delivery count of the group's pending entry) before it
    /// goes to `<inbox>:dead-letter` instead of to the host again: an entry requeued, or left
    /// unsettled by consumers that crash on it, every time.
    pub max_attempts: u32,
    /// A message settled `REJECTED_REQUEUE` (the application's `nack`) is delivered again after
    /// this long, doubled at each later delivery up to `requeue_delay_max_ms`
    /// ([`comms_plugin_api::requeue_delay`]), in milliseconds; 0: at once. Meanwhile the entry
    /// stays pending under this consumer (kept from looking idle, so no claim pass takes it
    /// early) and keeps its place in `max_unsettled`; if the process dies, another consumer
    /// claims it after `claim_idle_ms`.
    pub requeue_delay_ms: u64,
    /// Upper bound of that delay, in milliseconds (at most a day).
    pub requeue_delay_max_ms: u64,
    /// Consumers of the inbox's group (other instances of this node, usually crashed ones) that
    /// have not read for this long and have nothing pending are removed from the group
    /// (`XGROUP DELCONSUMER`), in milliseconds; 0 keeps them. Their pending entries are claimed
    /// first (after `claim_idle_ms`), so removing one loses nothing.
    pub consumer_idle_ms: u64,
    /// Approximate cap on the entries of an inbox stream (`XADD MAXLEN ~`); 0 for none.
    pub max_inbox_len: u64,
    /// Connection attempts at start before the transport gives up.
    pub connect_attempts: u32,
    /// Delay after the first failed connection attempt, doubled after each (milliseconds).
    pub connect_backoff_ms: u64,
    /// Time limit of one command, in milliseconds.
    pub command_timeout_ms: u64,
    /// Time `close` waits for queued messages to be written, in milliseconds.
    pub close_timeout_ms: u64,
}

impl Default for RedisTransportConfig {
    fn default() -> Self {
        Self {
            url: DEFAULT_URL.to_string(),
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
            prefix: DEFAULT_PREFIX.to_string(),
            group: "comms".to_string(),
            max_message_size: 16 * 1024 * 1024,
            read_batch: 256,
            block_ms: 500,
            max_unsettled: 1024,
            send_queue: 1024,
            confirm_sends: true,
            claim_idle_ms: DEFAULT_CLAIM_IDLE_MS,
            max_attempts: 10,
            requeue_delay_ms: 0,
            requeue_delay_max_ms: requeue_delay::DEFAULT_MAX_MS,
            consumer_idle_ms: 60_000,
            max_inbox_len: 1_000_000,
            connect_attempts: 5,
            connect_backoff_ms: 200,
            command_timeout_ms: 5_000,
            close_timeout_ms: 5_000,
        }
    }
}

fn positive(key: &str, value: u64) -> Result<(), PluginError> {
    if value == 0 {
        return Err(PluginError::invalid_config(format!("key `{key}`: must be greater than 0")));
    }
    Ok(())
}

fn name_part(key: &str, value: &str) -> Result<(), PluginError> {
    if value.is_empty() || value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(PluginError::invalid_config(format!(
            "key `{key}`: must be non-empty, without spaces or control characters"
        )));
    }
    Ok(())
}

fn url(value: &str) -> Result<(), PluginError> {
    if !(value.starts_with("redis://") || value.starts_with("rediss://")) {
        return Err(PluginError::invalid_config(format!(
            "key `url`: `{}` is not a redis:// or rediss:// URL",
            comms_plugin_api::redact::redact_url(value)
        )));
    }
    if value.contains('#') {
        return Err(PluginError::invalid_config(
            "key `url`: a URL fragment such as `#insecure` (TLS without certificate verification) is not \
             supported; use `ca_file` for a private CA",
        ));
    }
    Ok(())
}

impl RedisTransportConfig {
    /// Rejects values that cannot work, naming the key.
    pub fn validate(&self) -> Result<(), PluginError> {
        url(&self.url)?;
        self.tls_files().validate(&self.url, "rediss://")?;
        name_part("prefix", &self.prefix)?;
        name_part("group", &self.group)?;
        positive("max_message_size", self.max_message_size)?;
        if self.max_message_size > REDIS_MAX_BULK - 64 * 1024 {
            return Err(PluginError::invalid_config(format!(
                "key `max_message_size`: {} is above what Redis stores in one field ({} bytes less 64 KiB)",
                self.max_message_size, REDIS_MAX_BULK
            )));
        }
        positive("read_batch", self.read_batch as u64)?;
        positive("block_ms", self.block_ms)?;
        positive("max_unsettled", self.max_unsettled as u64)?;
        positive("send_queue", self.send_queue as u64)?;
        positive("claim_idle_ms", self.claim_idle_ms)?;
        positive("max_attempts", u64::from(self.max_attempts))?;
        if let Err((key, why)) = RequeueDelay::check(self.requeue_delay_ms, self.requeue_delay_max_ms) {
            return Err(PluginError::invalid_config(format!("key `{key}`: {why}")));
        }
        // A live consumer reads at least every `block_ms`; leave it ample room.
        if self.consumer_idle_ms != 0 && self.consumer_idle_ms < 4 * self.block_ms {
            return Err(PluginError::invalid_config(format!(
                "key `consumer_idle_ms`: {} is too short for block_ms = {} (at least 4 x block_ms, or 0 to keep \
                 idle consumers)",
                self.consumer_idle_ms, self.block_ms
            )));
        }
        positive("connect_attempts", u64::from(self.connect_attempts))?;
        positive("command_timeout_ms", self.command_timeout_ms)?;
        Ok(())
    }

    /// The backoff of the connection attempts at start.
    pub fn connect_backoff(&self) -> Backoff {
        connect_backoff(self.connect_attempts, self.connect_backoff_ms)
    }

    /// When a requeued message is delivered again.
    pub fn requeue_delay(&self) -> RequeueDelay {
        RequeueDelay::from_millis(self.requeue_delay_ms, self.requeue_delay_max_ms)
    }

    /// The certificate files of a `rediss://` connection.
    pub fn tls_files(&self) -> TlsFiles {
        TlsFiles {
            ca_file: self.ca_file.clone(),
            client_cert_file: self.client_cert_file.clone(),
            client_key_file: self.client_key_file.clone(),
        }
    }
}

fn connect_backoff(attempts: u32, initial_ms: u64) -> Backoff {
    Backoff {
        initial: Duration::from_millis(initial_ms.max(1)),
        max: Duration::from_secs(5),
        attempts: attempts.max(1),
    }
}

/// The `[discovery]` table of a node that uses Redis discovery.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisDiscoveryConfig {
    /// `redis://[user:password@]host:port[/db]`, or `rediss://` for TLS.
    pub url: String,
    /// With `rediss://`: PEM file of the CA certificate(s) that signed the server's certificate
    /// (a private CA). They replace the system's trusted roots for this connection. Default:
    /// the system's roots. A relative path is relative to the process' working directory.
    pub ca_file: Option<PathBuf>,
    /// With `rediss://`: PEM certificate (chain) this client presents, for servers that
    /// require client certificates (`tls-auth-clients yes`). Needs `client_key_file`.
    pub client_cert_file: Option<PathBuf>,
    /// With `rediss://`: PEM private key of `client_cert_file`.
    pub client_key_file: Option<PathBuf>,
    /// Namespace: records are `<prefix>:node:<id>`, notifications go to `<prefix>:nodes`.
    pub prefix: String,
    /// Lifetime of a node record without a heartbeat, in milliseconds: a node that stops
    /// (crash) leaves at most this long after its last heartbeat.
    pub ttl_ms: u64,
    /// How often the record's TTL is refreshed; default a third of `ttl_ms`.
    pub heartbeat_ms: Option<u64>,
    /// How often the records are listed to notice expiries and missed notifications; default
    /// `heartbeat_ms`.
    pub scan_interval_ms: Option<u64>,
    /// Connection attempts at start before the discovery gives up.
    pub connect_attempts: u32,
    /// Delay after the first failed connection attempt, doubled after each (milliseconds).
    pub connect_backoff_ms: u64,
    /// Time limit of one command, in milliseconds.
    pub command_timeout_ms: u64,
}

impl Default for RedisDiscoveryConfig {
    fn default() -> Self {
        Self {
            url: DEFAULT_URL.to_string(),
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
            prefix: DEFAULT_PREFIX.to_string(),
            ttl_ms: 10_000,
            heartbeat_ms: None,
            scan_interval_ms: None,
            connect_attempts: 5,
            connect_backoff_ms: 200,
            command_timeout_ms: 5_000,
        }
    }
}

impl RedisDiscoveryConfig {
    /// Rejects values that cannot work, naming the key.
    pub fn validate(&self) -> Result<(), PluginError> {
        url(&self.url)?;
        self.tls_files().validate(&self.url, "rediss://")?;
        name_part("prefix", &self.prefix)?;
        if self.ttl_ms < 100 {
            return Err(PluginError::invalid_config("key `ttl_ms`: must be at least 100"));
        }
        if let Some(heartbeat) = self.heartbeat_ms {
            if heartbeat == 0 || heartbeat >= self.ttl_ms {
                return Err(PluginError::invalid_config(
                    "key `heartbeat_ms`: must be greater than 0 and less than `ttl_ms`",
                ));
            }
        }
        if self.scan_interval_ms == Some(0) {
            return Err(PluginError::invalid_config("key `scan_interval_ms`: must be greater than 0"));
        }
        positive("connect_attempts", u64::from(self.connect_attempts))?;
        positive("command_timeout_ms", self.command_timeout_ms)?;
        Ok(())
    }

    /// Interval of the TTL refresh.
    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms.unwrap_or(self.ttl_ms / 3).max(1))
    }

    /// Interval of the expiry scan.
    pub fn scan_interval(&self) -> Duration {
        self.scan_interval_ms.map(Duration::from_millis).unwrap_or_else(|| self.heartbeat())
    }

    /// The backoff of the connection attempts at start.
    pub fn connect_backoff(&self) -> Backoff {
        connect_backoff(self.connect_attempts, self.connect_backoff_ms)
    }

    /// The certificate files of a `rediss://` connection.
    pub fn tls_files(&self) -> TlsFiles {
        TlsFiles {
            ca_file: self.ca_file.clone(),
            client_cert_file: self.client_cert_file.clone(),
            client_key_file: self.client_key_file.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use comms_plugin_api::config::parse_config;

    #[test]
    fn defaults_are_valid_and_unknown_keys_are_named() {
        RedisTransportConfig::default().validate().unwrap();
        RedisDiscoveryConfig::default().validate().unwrap();
        let error = parse_config::<RedisTransportConfig>("ur1 = \"redis://x\"").unwrap_err();
        assert!(error.message.contains("ur1"), "{error}");
    }

    #[test]
    fn bad_values_name_the_key_and_hide_the_password() {
        let config: RedisTransportConfig = parse_config("url = \"http://u:secret@host\"").unwrap();
        let error = config.validate().unwrap_err();
        assert!(error.message.contains("key `url`"), "{error}");
        assert!(!error.message.contains("secret"), "{error}");
        let config: RedisTransportConfig =
            parse_config("url = \"rediss://u:secret@host/#insecure\"").unwrap();
        let error = config.validate().unwrap_err();
        assert!(error.message.contains("key `url`") && error.message.contains("#insecure"), "{error}");
        let config: RedisTransportConfig = parse_config("read_batch = 0").unwrap();
        assert!(config.validate().unwrap_err().message.contains("read_batch"));
        let config: RedisTransportConfig =
            parse_config("requeue_delay_ms = 5000\nrequeue_delay_max_ms = 1000").unwrap();
        assert!(config.validate().unwrap_err().message.contains("key `requeue_delay_ms`"));
        let config: RedisDiscoveryConfig = parse_config("ttl_ms = 1000\nheartbeat_ms = 1000").unwrap();
        assert!(config.validate().unwrap_err().message.contains("heartbeat_ms"));
    }

    #[test]
    fn certificate_files_need_a_rediss_url() {
        // The rules themselves (pairs, redaction) are tested in comms_plugin_api::tls.
        let config: RedisTransportConfig =
            parse_config("url = \"redis://u:secret@host\"\nca_file = \"ca.pem\"").unwrap();
        let error = config.validate().unwrap_err();
        assert!(
            error.message.contains("key `ca_file`") && error.message.contains("not a rediss:// URL"),
            "{error}"
        );
        let config: RedisDiscoveryConfig = parse_config(
            "url = \"rediss://host\"\nca_file = \"ca.pem\"\nclient_cert_file = \"c.pem\"\nclient_key_file = \"k.pem\"",
        )
        .unwrap();
        config.validate().unwrap();
        let config: RedisDiscoveryConfig = parse_config("client_cert_file = \"c.pem\"").unwrap();
        assert!(config.validate().unwrap_err().message.contains("key `client_cert_file`"));
    }
}
