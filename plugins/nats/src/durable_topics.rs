//! Durable topics (`durable_topics = true`): the topic stream of a deployment and the durable
//! consumer of each (node, pattern) subscription. The transport reads and settles these
//! consumers exactly like a node's inbox consumer; this module only names, creates, binds and
//! deletes them.
//!
//! | what | name | configuration |
//! |---|---|---|
//! | topic stream | `<stream>-topics` | subjects `<prefix>.topic.>`, file storage, interest retention, `topic_max_age_ms`, `topic_max_bytes` (oldest dropped) |
//! | subscription of node `n` to pattern `p` | [`subject::topic_consumer`]`(n, p)` | pull, filter `<prefix>.topic.<p>`, explicit acks, `ack_wait_ms`, deliver new, `topic_inactive_threshold_ms` |
//!
//! Interest retention: the server keeps a message until every consumer whose filter matched it
//! when it was stored has acknowledged it (or it is older than `topic_max_age_ms`), and stores
//! nothing when no consumer matches. A core NATS publish on a topic subject (a node without
//! `durable_topics`) is captured too.

use crate::{
    config::{topics_stream_name, NatsTransportConfig},
    subject,
};
use async_nats::jetstream::{
    self,
    consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer},
    stream::{ConsumerErrorKind, DiscardPolicy, RetentionPolicy, StorageType, Stream},
    ErrorCode as JetStreamErrorCode,
};
use comms_plugin_api::{ErrorCode, PluginError};
use std::time::Duration;

/// The topic stream's configuration.
fn stream_config(config: &NatsTransportConfig) -> jetstream::stream::Config {
    jetstream::stream::Config {
        name: topics_stream_name(&config.stream),
        description: Some(format!("comms durable topics of the deployment `{}`", config.prefix)),
        subjects: vec![topics_subjects(&config.prefix)],
        retention: RetentionPolicy::Interest,
        storage: StorageType::File,
        max_age: Duration::from_millis(config.topic_max_age_ms),
        // Checked by the config: at most i64::MAX.
        max_bytes: i64::try_from(config.topic_max_bytes).unwrap_or(i64::MAX),
        // A full stream drops its oldest messages: a subscriber that far behind loses them,
        // publishers never stall on a subscriber that is gone.
        discard: DiscardPolicy::Old,
        ..Default::default()
    }
}

/// Every topic subject of the deployment.
fn topics_subjects(prefix: &str) -> String {
    format!("{prefix}.topic.>")
}

/// Creates the topic stream, or takes the existing one if it captures the deployment's topics
/// with interest retention (its limits are left as they are).
pub(crate) async fn open_stream(
    jetstream: &jetstream::Context,
    config: &NatsTransportConfig,
    what: &str,
) -> Result<Stream, PluginError> {
    let wanted = stream_config(config);
    let name = wanted.name.clone();
    let stream = jetstream.get_or_create_stream(wanted).await.map_err(|error| {
        PluginError::retryable(
            ErrorCode::UNREACHABLE,
            format!("{what}: creating the JetStream stream `{name}` of `durable_topics`: {error}"),
        )
    })?;
    let existing = &stream.cached_info().config;
    let subjects = topics_subjects(&config.prefix);
    if !existing.subjects.contains(&subjects) || existing.retention != RetentionPolicy::Interest {
        return Err(PluginError::invalid_config(format!(
            "keys `stream`, `prefix` and `durable_topics`: the existing stream `{name}` holds the subjects {:?} with \
             {:?} retention, not `{subjects}` with interest retention; delete it, or use another stream name or the \
             prefix it was made for",
            existing.subjects, existing.retention
        )));
    }
    Ok(stream)
}

/// The consumer of `node`'s subscription to `pattern`, whose subject is `filter`.
fn consumer_config(config: &NatsTransportConfig, node: &str, pattern: &str, filter: &str) -> pull::Config {
    pull::Config {
        durable_name: Some(subject::topic_consumer(node, pattern)),
        description: Some(format!("comms subscription of node {node} to topic pattern {pattern}")),
        filter_subject: filter.to_string(),
        // A new subscription starts with what is published after it, like a core NATS one;
        // an existing consumer keeps its own position.
        deliver_policy: DeliverPolicy::New,
        ack_policy: AckPolicy::Explicit,
        ack_wait: Duration::from_millis(config.ack_wait_ms),
        // Unlimited at the server: the transport counts deliveries and dead-letters itself, as
        // for the inbox.
        max_deliver: -1,
        inactive_threshold: Duration::from_millis(config.topic_inactive_threshold_ms),
        ..Default::default()
    }
}

/// Creates the durable consumer of `node`'s subscription to `pattern` (subject `filter`), or
/// binds the one that exists. Once this returns, every publication on a matching subject is
/// kept for it.
pub(crate) async fn bind_consumer(
    stream: &Stream,
    config: &NatsTransportConfig,
    node: &str,
    pattern: &str,
    filter: &str,
) -> Result<PullConsumer, PluginError> {
    let wanted = consumer_config(config, node, pattern, filter);
    let name = subject::topic_consumer(node, pattern);
    let consumer: PullConsumer = match stream.create_consumer(wanted).await {
        Ok(consumer) => consumer,
        // It exists with other settings (another `ack_wait_ms`, ...): use it as it is.
        Err(create_error) => stream.get_consumer(&name).await.map_err(|_| {
            PluginError::new(
                ErrorCode::OTHER,
                format!("creating the durable consumer `{name}` of `{filter}`: {create_error}"),
            )
        })?,
    };
    let bound = &consumer.cached_info().config.filter_subject;
    if bound != filter {
        // Two patterns with the same 64-bit hash, or a consumer made by someone else.
        return Err(PluginError::new(
            ErrorCode::OTHER,
            format!(
                "the durable consumer `{name}` of the stream `{}` filters on `{bound}`, not `{filter}`; delete it",
                stream.cached_info().config.name
            ),
        ));
    }
    Ok(consumer)
}

/// Deletes the durable consumer of `node`'s subscription to `pattern`; one that does not exist
/// is not an error.
pub(crate) async fn delete_consumer(stream: &Stream, node: &str, pattern: &str) -> Result<(), PluginError> {
    let name = subject::topic_consumer(node, pattern);
    match stream.delete_consumer(&name).await {
        Ok(_) => Ok(()),
        Err(error) => match error.kind() {
            ConsumerErrorKind::JetStream(inner)
                if inner.error_code() == JetStreamErrorCode::CONSUMER_NOT_FOUND =>
            {
                Ok(())
            }
            _ => Err(PluginError::new(
                ErrorCode::OTHER,
                format!("deleting the durable consumer `{name}` of the subscription to `{pattern}`: {error}"),
            )),
        },
    }
}
