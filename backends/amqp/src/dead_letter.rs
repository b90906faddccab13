//! Dead letters: where a message goes that is refused for good, and why.
//!
//! | cause | where it goes | header `comms-dead-letter-reason` |
//! |---|---|---|
//! | not a comms message (no or bad `message_id`, malformed `comms-*` headers) | republished to `dead_letter_exchange`, original acknowledged | what is wrong, e.g. ``message_id `x` is not up to 32 hex digits`` |
//! | body above `max_message_size` | the same | [`comms_plugin_api::inbound::oversized_reason`] |
//! | settled `REJECTED_DISCARD` by the receiving node | `basic.reject`: the broker dead-letters it to the queue's `x-dead-letter-exchange` | none (the broker's `x-death` header says `rejected`) |
//! | delivered `max_attempts` times and never accepted (counted by a quorum inbox in [`DELIVERY_COUNT_HEADER`], by the plugin on a classic one and on the topic queue: [`crate::redeliveries`]) | republished to `dead_letter_exchange`, original acknowledged | [`MAX_ATTEMPTS_REASON`] |
//!
//! `basic.reject` cannot add a header, so for the causes the plugin knows it publishes a copy
//! (body and properties unchanged, plus the headers [`DEAD_LETTER_REASON_HEADER`] and
//! [`DEAD_LETTER_QUEUE_HEADER`]) to the dead-letter exchange with the original queue as routing
//! key, waits for the broker's confirm, and only then acknowledges the original: a crash in
//! between leaves a duplicate dead letter, never none. If the broker refuses the copy, the
//! original is rejected instead (dead-lettered by the broker, without the reason header).
//!
//! The exchange (`fanout`, durable) and a queue bound to it (durable, capped at
//! `dead_letter_queue_max_length`, oldest dropped first) are declared at start, so dead letters
//! are kept until someone reads them.

use crate::{
    config::AmqpConfig,
    connection,
    format::{DEAD_LETTER_QUEUE_HEADER, DEAD_LETTER_REASON_HEADER},
};
use comms_plugin_api::{inbound::MAX_ATTEMPTS_REASON, ErrorCode, PluginError};
use lapin::{
    message::Delivery,
    options::{
        BasicAckOptions, BasicPublishOptions, BasicRejectOptions, ExchangeDeclareOptions, QueueBindOptions,
        QueueDeclareOptions,
    },
    types::{AMQPValue, FieldTable, LongString},
    Channel, Confirmation, ExchangeKind,
};

/// Declares `dead_letter_exchange` and `dead_letter_queue` bound to it, if configured.
pub(crate) async fn declare(channel: &Channel, config: &AmqpConfig) -> Result<(), PluginError> {
    let exchange = config.dead_letter_exchange.as_str();
    if exchange.is_empty() {
        return Ok(());
    }
    let url = config.url.as_str();
    let refused = |key: &str, what: String| {
        let key = key.to_string();
        move |error: lapin::Error| {
            let mut error = connection::amqp_error(url, &what, &error);
            if error.message.contains("PRECONDITION_FAILED") {
                error.code = ErrorCode::INVALID_CONFIG;
                error.retryable = false;
                error.message.push_str(&format!(
                    " (it exists with other settings: key `{key}` names one that was declared otherwise; \
                     pick another name or delete it)"
                ));
            }
            error
        }
    };
    let durable = ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() };
    channel
        .exchange_declare(exchange.into(), ExchangeKind::Fanout, durable, FieldTable::default())
        .await
        .map_err(refused(
            "dead_letter_exchange",
            format!("declaring the dead-letter exchange `{exchange}`"),
        ))?;
    let queue = config.dead_letter_queue.as_str();
    if queue.is_empty() {
        return Ok(());
    }
    let mut arguments = FieldTable::default();
    arguments
        .insert("x-max-length".into(), AMQPValue::LongLongInt(config.dead_letter_queue_max_length as i64));
    let durable = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
    channel
        .queue_declare(queue.into(), durable, arguments)
        .await
        .map_err(refused("dead_letter_queue", format!("declaring the dead-letter queue `{queue}`")))?;
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(refused("dead_letter_queue", format!("binding the dead-letter queue `{queue}`")))
}

/// The inbox's (or topic queue's) arguments for broker-side dead-lettering.
pub(crate) fn queue_arguments(config: &AmqpConfig, arguments: &mut FieldTable) {
    if !config.dead_letter_exchange.is_empty() {
        arguments.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(LongString::from(config.dead_letter_exchange.as_str())),
        );
    }
}

/// The header in which a quorum queue counts a message's earlier deliveries that were not
/// accepted (requeued, or unsettled when their consumer went away).
pub const DELIVERY_COUNT_HEADER: &str = "x-delivery-count";

/// How often `delivery` was delivered before and not accepted, by its quorum queue's count
/// ([`DELIVERY_COUNT_HEADER`]); `None` where the queue does not count (a classic queue).
pub(crate) fn earlier_deliveries(delivery: &Delivery) -> Option<u64> {
    let earlier = delivery.properties.headers().as_ref()?.inner().get(DELIVERY_COUNT_HEADER)?;
    let earlier = match earlier {
        AMQPValue::LongLongInt(n) => *n,
        AMQPValue::LongInt(n) => i64::from(*n),
        AMQPValue::LongUInt(n) => i64::from(*n),
        AMQPValue::ShortInt(n) => i64::from(*n),
        AMQPValue::ShortUInt(n) => i64::from(*n),
        AMQPValue::ShortShortInt(n) => i64::from(*n),
        AMQPValue::ShortShortUInt(n) => i64::from(*n),
        _ => return None,
    };
    u64::try_from(earlier).ok()
}

/// [`MAX_ATTEMPTS_REASON`] if a message was delivered `max_attempts` times before (`earlier`:
/// its queue's count, or this process' on a classic queue) and never accepted: it goes to the
/// dead letters instead of to the application a further time.
pub(crate) fn past_delivery_limit(earlier: u64, max_attempts: u32) -> Option<String> {
    (earlier >= u64::from(max_attempts)).then(|| MAX_ATTEMPTS_REASON.to_string())
}

/// Where a refused delivery is taken from and sent to.
pub(crate) struct Refusal<'a> {
    /// The confirm-mode channel the copy is published on.
    pub publisher: &'a Channel,
    /// The channel the delivery came on: the original is settled there.
    pub consumer: &'a Channel,
    /// The queue it came from (routing key of the copy, and [`DEAD_LETTER_QUEUE_HEADER`]).
    pub queue: &'a str,
    /// `dead_letter_exchange`; empty: the message is dropped.
    pub exchange: &'a str,
}

/// Dead-letters `delivery` with `reason` (see the module docs). Errors are logged: if the
/// connection is gone the broker delivers the message again, and it is refused again.
pub(crate) async fn refuse(refusal: Refusal<'_>, delivery: Delivery, reason: &str) {
    let Refusal { publisher, consumer, queue, exchange } = refusal;
    let tag = delivery.delivery_tag;
    if exchange.is_empty() {
        tracing::warn!(queue, %reason, "AMQP message refused and dropped (no dead_letter_exchange)");
        let _ = consumer.basic_reject(tag, BasicRejectOptions { requeue: false }).await;
        return;
    }
    tracing::warn!(queue, %reason, exchange, "AMQP message refused and dead-lettered");
    let mut headers = delivery.properties.headers().clone().unwrap_or_default();
    headers.insert(DEAD_LETTER_REASON_HEADER.into(), AMQPValue::LongString(LongString::from(reason)));
    headers.insert(DEAD_LETTER_QUEUE_HEADER.into(), AMQPValue::LongString(LongString::from(queue)));
    let properties = delivery.properties.clone().with_headers(headers);
    let published = async {
        publisher
            .basic_publish(
                exchange.into(),
                queue.into(),
                BasicPublishOptions::default(),
                &delivery.data,
                properties,
            )
            .await?
            .await
    };
    let settled = match published.await {
        Ok(Confirmation::Ack(_) | Confirmation::NotRequested) => {
            consumer.basic_ack(tag, BasicAckOptions { multiple: false }).await
        }
        Ok(Confirmation::Nack(_)) => {
            tracing::warn!(
                queue,
                exchange,
                "the broker refused the dead letter; rejecting the message instead"
            );
            consumer.basic_reject(tag, BasicRejectOptions { requeue: false }).await
        }
        Err(error) => Err(error),
    };
    if let Err(error) = settled {
        tracing::debug!(queue, %error, "dead-lettering failed; the broker delivers the message again");
    }
}
