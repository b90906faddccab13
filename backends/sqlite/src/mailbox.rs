//! The mailbox table, synchronously: writing messages, claiming them with a lease, settling them.
//!
//! Everything here runs on the transport's database thread (see [`crate::worker`]), never on an
//! async worker. One [`SqliteMailbox`] per transport instance: one connection, one lease owner.

use crate::{config::SqliteConfig, schema::now_ms, topic_pattern};
#[cfg(doc)]
use comms_plugin_api::framework;
use comms_plugin_api::{
    inbound::{self, StoredMessageLimits},
    requeue_delay::RequeueDelay,
    Envelope, Inbound, Settlement, SettlementOutcome,
};
use rusqlite::{
    params,
    types::{Type, ValueRef},
    Connection, OptionalExtension, TransactionBehavior,
};
use std::collections::{BTreeMap, BTreeSet};

/// The rows a receiver may claim: not leased (or with a lease of a foreign type), and either
/// not a topic copy held for a subscription or one whose pattern this connection subscribes to
/// now (`temp.comms_live_pattern`, see [`SqliteMailbox::new`]). `?2` is now (Unix ms).
const CLAIMABLE: &str = "(locked_until <= ?2 OR typeof(locked_until) <> 'integer')
    AND (pattern IS NULL OR pattern IN (SELECT pattern FROM temp.comms_live_pattern))";

/// One message to write.
#[derive(Debug)]
pub(crate) enum Outgoing {
    /// To the mailbox of one node.
    Direct {
        /// The node id (the address the sender was given).
        recipient: String,
        /// The envelope in wire encoding.
        encoded: Vec<u8>,
        /// [`framework::replacement_key`]: the message replaces an older unclaimed one with the
        /// same key in the same mailbox.
        replace_key: Option<String>,
    },
    /// One row per node subscribed to a pattern that matches the topic.
    Topic {
        /// The topic published to.
        topic: String,
        /// The envelope in wire encoding.
        encoded: Vec<u8>,
    },
}

/// A subscription change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SubscriptionChange {
    pub(crate) pattern: String,
    pub(crate) subscribe: bool,
}

/// What a poll of the mailbox found.
#[derive(Debug, Default)]
pub(crate) struct Claimed {
    /// Claimed messages, oldest first; each `delivery_tag` is the row id.
    pub(crate) messages: Vec<Inbound>,
    /// `PRAGMA data_version` read before looking: if it is unchanged at the next poll, no other
    /// connection has committed anything since, and the poll can skip the query.
    pub(crate) data_version: i64,
    /// `false` when the poll was skipped because `data_version` had not changed.
    pub(crate) looked: bool,
    /// When the earliest lease on this mailbox held by someone expires (Unix ms), if any: the
    /// rows become claimable then without any commit announcing it.
    pub(crate) next_lease_expiry: Option<i64>,
    /// Rows moved to the dead-letter table by this poll.
    pub(crate) dead_lettered: usize,
}

/// The mailbox of one node, seen through one connection.
#[derive(Debug)]
pub(crate) struct SqliteMailbox {
    connection: Connection,
    config: SqliteConfig,
    /// The node whose mailbox this is.
    recipient: String,
    /// Written into `owner` of claimed rows: unique per transport instance, so a settlement can
    /// never touch a row that has since been claimed by someone else.
    owner: String,
}

/// The envelope of a claimed row, or why the row goes to the dead-letter table instead. Any
/// program can write into the table, so nothing is assumed about the values' types. The reason
/// names what is wrong: an operator reading `comms_dead_letter` can tell a broken writer
/// (wrong column type), a writer of another wire version, an oversized message and a message
/// that kept failing apart.
fn check_row(
    envelope: ValueRef<'_>,
    attempts: ValueRef<'_>,
    locked_until: ValueRef<'_>,
    limits: &StoredMessageLimits,
) -> Result<Envelope, String> {
    let attempts = match attempts {
        ValueRef::Integer(attempts) => attempts,
        other => return Err(format!("attempts column holds {}, not an INTEGER", sql_type(other))),
    };
    if !matches!(locked_until, ValueRef::Integer(_)) {
        return Err(format!("locked_until column holds {}, not an INTEGER", sql_type(locked_until)));
    }
    // This claim would be delivery number `attempts + 1` (checked first: a row that kept
    // failing is moved whatever else is wrong with it).
    let delivery = u64::try_from(attempts.saturating_add(1)).unwrap_or(0);
    if delivery > limits.max_attempts {
        return Err(inbound::MAX_ATTEMPTS_REASON.to_string());
    }
    let ValueRef::Blob(bytes) = envelope else {
        return Err(format!("envelope column holds {}, not a BLOB in the wire encoding", sql_type(envelope)));
    };
    inbound::check_stored_message(bytes, delivery, limits)
}

/// The SQL name of a value's type, as `typeof()` would say it (upper case).
fn sql_type(value: ValueRef<'_>) -> &'static str {
    match value.data_type() {
        Type::Null => "NULL",
        Type::Integer => "INTEGER",
        Type::Real => "REAL",
        Type::Text => "TEXT",
        Type::Blob => "BLOB",
    }
}

impl SqliteMailbox {
    /// The mailbox of `recipient` through `connection`, which it keeps for itself: the patterns
    /// this instance subscribes to live in a temporary table of that connection (gone with it),
    /// which is what lets topic copies wait for the application to subscribe again after a
    /// restart (schema version 3).
    pub(crate) fn new(
        connection: Connection,
        config: SqliteConfig,
        recipient: String,
        owner: String,
    ) -> rusqlite::Result<Self> {
        connection.execute_batch(
            "CREATE TEMP TABLE IF NOT EXISTS comms_live_pattern (pattern TEXT PRIMARY KEY) WITHOUT ROWID",
        )?;
        Ok(Self { connection, config, recipient, owner })
    }

    pub(crate) fn config(&self) -> &SqliteConfig {
        &self.config
    }

    pub(crate) fn recipient(&self) -> &str {
        &self.recipient
    }

    /// Writes `outgoing`, applies `settlements` and `subscriptions`, all in one transaction.
    /// Returns the nodes that got messages to deliver, new or requeued (to wake their receivers in
    /// this process).
    pub(crate) fn write(
        &mut self,
        outgoing: &[&Outgoing],
        settlements: &[Settlement],
        subscriptions: &[&SubscriptionChange],
    ) -> rusqlite::Result<BTreeSet<String>> {
        let now = now_ms();
        let mut recipients = BTreeSet::new();
        let transaction = self.connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
        for change in subscriptions {
            if change.subscribe {
                transaction
                    .prepare_cached(
                        "INSERT INTO comms_subscription (node_id, pattern, subscribed_at) VALUES (?1, ?2, ?3)
                     ON CONFLICT DO NOTHING",
                    )?
                    .execute(params![self.recipient, change.pattern, now])?;
                transaction
                    .prepare_cached(
                        "INSERT INTO temp.comms_live_pattern (pattern) VALUES (?1) ON CONFLICT DO NOTHING",
                    )?
                    .execute(params![change.pattern])?;
                // The copies that waited for this subscription can be claimed now.
                recipients.insert(self.recipient.clone());
            } else {
                transaction
                    .prepare_cached("DELETE FROM comms_subscription WHERE node_id = ?1 AND pattern = ?2")?
                    .execute(params![self.recipient, change.pattern])?;
                transaction
                    .prepare_cached("DELETE FROM temp.comms_live_pattern WHERE pattern = ?1")?
                    .execute(params![change.pattern])?;
                // Copies still waiting for a subscription the node has ended would wait for ever:
                // they are delivered as they are (and dropped by the host if nothing matches).
                transaction
                    .prepare_cached(
                        "UPDATE comms_mailbox SET pattern = NULL WHERE recipient = ?1 AND pattern = ?2",
                    )?
                    .execute(params![self.recipient, change.pattern])?;
            }
        }
        let mut subscriptions: Option<Vec<(String, String)>> = None;
        {
            let mut insert = transaction.prepare_cached(
                "INSERT INTO comms_mailbox (recipient, envelope, enqueued_at, replace_key, pattern)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            for message in outgoing {
                match message {
                    Outgoing::Direct { recipient, encoded, replace_key } => {
                        if let Some(key) = replace_key {
                            // Only unclaimed rows: one being handled is settled by its receiver.
                            transaction
                                .prepare_cached(
                                    "DELETE FROM comms_mailbox
                                     WHERE recipient = ?1 AND replace_key = ?2 AND locked_until <= ?3",
                                )?
                                .execute(params![recipient, key, now])?;
                        }
                        insert.execute(params![recipient, encoded, now, replace_key, None::<&str>])?;
                        recipients.insert(recipient.clone());
                    }
                    Outgoing::Topic { topic, encoded } => {
                        if subscriptions.is_none() {
                            let mut select = transaction
                                .prepare_cached("SELECT node_id, pattern FROM comms_subscription")?;
                            let rows = select.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?;
                            subscriptions = Some(rows.collect::<rusqlite::Result<_>>()?);
                        }
                        // One copy per subscribed node, held for the first of its matching
                        // patterns in byte order.
                        let mut subscribers: BTreeMap<&String, &String> = BTreeMap::new();
                        for (node, pattern) in subscriptions.iter().flatten() {
                            if topic_pattern::matches(pattern, topic) {
                                let held_for = subscribers.entry(node).or_insert(pattern);
                                *held_for = (*held_for).min(pattern);
                            }
                        }
                        for (node, pattern) in subscribers {
                            insert.execute(params![node, encoded, now, None::<&str>, pattern])?;
                            recipients.insert(node.clone());
                        }
                    }
                }
            }
            for settlement in settlements {
                if settle_one(&transaction, (&self.owner, self.config.requeue_delay()), settlement, now)? {
                    // A requeued message is available again, and this commit is on the
                    // receiver's own connection, which PRAGMA data_version does not count.
                    recipients.insert(self.recipient.clone());
                }
            }
        }
        transaction.commit()?;
        Ok(recipients)
    }
}

/// Applies one settlement of a message leased to `owner`; `true` if it made a message available
/// again (requeued: at once, or once its requeue delay is over).
fn settle_one(
    transaction: &rusqlite::Transaction<'_>,
    (owner, requeue_delay): (&str, RequeueDelay),
    settlement: &Settlement,
    now: i64,
) -> rusqlite::Result<bool> {
    let id = i64::try_from(settlement.delivery_tag).unwrap_or(-1);
    let mut requeue = false;
    let changed = match settlement.outcome {
        SettlementOutcome::ACCEPTED => transaction
            .prepare_cached("DELETE FROM comms_mailbox WHERE id = ?1 AND owner = ?2")?
            .execute(params![id, owner])?,
        SettlementOutcome::REJECTED_DISCARD => {
            dead_letter(transaction, id, Some(owner), now, comms_plugin_api::inbound::DISCARDED_BY_RECEIVER)?
        }
        // REJECTED_REQUEUE, and any outcome a newer host may invent: deliver it again, at once
        // (`locked_until` 0) or after the delay for its deliveries so far.
        _ => {
            requeue = true;
            let free_at = if requeue_delay.is_immediate() {
                0
            } else {
                let attempts: Option<i64> = transaction
                    .prepare_cached("SELECT attempts FROM comms_mailbox WHERE id = ?1 AND owner = ?2")?
                    .query_row(params![id, owner], |row| row.get(0))
                    .optional()?;
                let delay = requeue_delay.after(attempts.map_or(1, |n| u64::try_from(n).unwrap_or(1)));
                now.saturating_add(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX))
            };
            transaction
                .prepare_cached(
                    "UPDATE comms_mailbox SET locked_until = ?3, owner = NULL WHERE id = ?1 AND owner = ?2",
                )?
                .execute(params![id, owner, free_at])?
        }
    };
    if changed == 0 {
        tracing::debug!(
            delivery_tag = settlement.delivery_tag,
            "settlement of a message whose lease had expired (it is delivered again)"
        );
    }
    Ok(requeue && changed > 0)
}

impl SqliteMailbox {
    /// Claims up to `max` messages whose lease is free, oldest first, leasing them to this
    /// instance for `lease_ms`. With `unless_version`, does nothing if `PRAGMA data_version` still
    /// has that value (nobody else committed since the last poll).
    pub(crate) fn claim(&mut self, max: usize, unless_version: Option<i64>) -> rusqlite::Result<Claimed> {
        let data_version: i64 = self.connection.query_row("PRAGMA data_version", [], |row| row.get(0))?;
        if unless_version == Some(data_version) {
            return Ok(Claimed { data_version, ..Claimed::default() });
        }
        let now = now_ms();
        // Look before taking the write lock: idle receivers must not queue up for it.
        let available: bool = self
            .connection
            .prepare_cached(&format!(
                "SELECT EXISTS (SELECT 1 FROM comms_mailbox WHERE recipient = ?1 AND {CLAIMABLE})"
            ))?
            .query_row(params![self.recipient, now], |row| row.get(0))?;
        if !available {
            let next_lease_expiry = self.next_lease_expiry(now)?;
            return Ok(Claimed { data_version, looked: true, next_lease_expiry, ..Claimed::default() });
        }

        let limits = StoredMessageLimits {
            max_attempts: u64::from(self.config.max_attempts),
            max_message_size: self.config.max_message_size,
        };
        let limit = i64::try_from(max.min(self.config.batch_size)).unwrap_or(i64::MAX);
        let transaction = self.connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let now = now_ms();
        let locked_until = now.saturating_add(i64::try_from(self.config.lease_ms).unwrap_or(i64::MAX));
        let mut claimed = Claimed { data_version, looked: true, ..Claimed::default() };
        // Every column is read as whatever SQLite holds (`ValueRef`), never converted: a value of
        // an unexpected type is a reason to dead-letter its row, not an error that fails the
        // claim (and so every later claim, for ever).
        let mut refused: Vec<(i64, String)> = Vec::new();
        {
            let mut select = transaction.prepare_cached(&format!(
                "SELECT id, envelope, attempts, locked_until FROM comms_mailbox
                 WHERE recipient = ?1 AND {CLAIMABLE} ORDER BY id LIMIT ?3"
            ))?;
            let mut rows = select.query(params![self.recipient, now, limit])?;
            while let Some(row) = rows.next()? {
                let id: i64 = row.get(0)?;
                match check_row(row.get_ref(1)?, row.get_ref(2)?, row.get_ref(3)?, &limits) {
                    Ok(envelope) => claimed.messages.push(Inbound { envelope, delivery_tag: id as u64 }),
                    Err(reason) => refused.push((id, reason)),
                }
            }
        }
        for (id, reason) in &refused {
            tracing::debug!(row = id, %reason, "message moved to comms_dead_letter");
            claimed.dead_lettered += dead_letter(&transaction, *id, None, now, reason)?;
        }
        if let (Some(first), Some(last)) = (claimed.messages.first(), claimed.messages.last()) {
            // One statement for the whole batch. The claimable rows of this mailbox between the
            // first and the last good one are exactly the good ones: the SELECT took every
            // claimable row up to `last` (oldest first, same `now`, same live patterns), the
            // refused ones were just moved out, and the write lock keeps everyone else out.
            let leased = transaction
                .prepare_cached(&format!(
                    "UPDATE comms_mailbox SET owner = ?3, locked_until = ?4, attempts = attempts + 1
                     WHERE recipient = ?1 AND id BETWEEN ?5 AND ?6 AND {CLAIMABLE}"
                ))?
                .execute(params![
                    self.recipient,
                    now,
                    self.owner,
                    locked_until,
                    first.delivery_tag as i64,
                    last.delivery_tag as i64,
                ])?;
            debug_assert_eq!(leased, claimed.messages.len(), "the range held other rows");
        }
        transaction.commit()?;
        if let Some((_, reason)) = refused.first() {
            // One line per claim, not per row: a flood of bad rows must not flood the log.
            tracing::warn!(
                node = %self.recipient,
                count = claimed.dead_lettered,
                first_reason = %reason,
                "messages moved to the dead-letter table comms_dead_letter"
            );
        }
        Ok(claimed)
    }

    fn next_lease_expiry(&self, now: i64) -> rusqlite::Result<Option<i64>> {
        self.connection
            .prepare_cached(
                "SELECT MIN(locked_until) FROM comms_mailbox
                 WHERE recipient = ?1 AND typeof(locked_until) = 'integer' AND locked_until > ?2",
            )?
            .query_row(params![self.recipient, now], |row| row.get(0))
            .optional()
            .map(Option::flatten)
    }

    /// Makes every message leased to this instance and not settled available again at once.
    pub(crate) fn release_leases(&mut self) -> rusqlite::Result<usize> {
        let transaction = self.connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let released = transaction
            .prepare_cached("UPDATE comms_mailbox SET locked_until = 0, owner = NULL WHERE owner = ?1")?
            .execute(params![self.owner])?;
        transaction.commit()?;
        Ok(released)
    }
}

/// Moves row `id` (if `owner` is given, only while leased to it) to the dead-letter table.
fn dead_letter(
    transaction: &rusqlite::Transaction<'_>,
    id: i64,
    owner: Option<&str>,
    now: i64,
    reason: &str,
) -> rusqlite::Result<usize> {
    let moved = transaction
        .prepare_cached(
            // IFNULL: the columns are NOT NULL in both tables, but a row the schema did not
            // guard must still be moved rather than fail the claim.
            "INSERT INTO comms_dead_letter (id, recipient, envelope, enqueued_at, attempts, dead_at, reason)
             SELECT id, recipient, IFNULL(envelope, x''), IFNULL(enqueued_at, 0), IFNULL(attempts, 0), ?3, ?4
             FROM comms_mailbox WHERE id = ?1 AND (?2 IS NULL OR owner = ?2)",
        )?
        .execute(params![id, owner, now, reason])?;
    if moved > 0 {
        transaction.prepare_cached("DELETE FROM comms_mailbox WHERE id = ?1")?.execute(params![id])?;
    }
    Ok(moved)
}

#[cfg(test)]
mod tests {
    use super::*;
    use comms_plugin_api::{wire, Destination, MessageId, NodeId};

    const LIMITS: StoredMessageLimits = StoredMessageLimits { max_attempts: 3, max_message_size: 4 };

    fn encoded(payload: &[u8]) -> Vec<u8> {
        let envelope = Envelope::new(
            MessageId::from_u128(1),
            NodeId::new("a"),
            Destination::Node(NodeId::new("b")),
            payload.to_vec(),
        );
        let mut bytes = Vec::new();
        wire::encode_envelope(&envelope, &mut bytes).unwrap();
        bytes
    }

    #[test]
    fn every_kind_of_bad_row_has_its_own_reason() {
        let good = encoded(b"1234");
        let blob = ValueRef::Blob(&good);
        let zero = ValueRef::Integer(0);
        assert_eq!(check_row(blob, zero, zero, &LIMITS).unwrap().payload.as_slice(), b"1234");
        fn reason(envelope: ValueRef<'_>, attempts: ValueRef<'_>, locked_until: ValueRef<'_>) -> String {
            check_row(envelope, attempts, locked_until, &LIMITS).unwrap_err()
        }
        // NULL cannot be written into the v1 schema's NOT NULL columns, but a table that lost the
        // constraint must not stop the node either.
        assert_eq!(
            reason(ValueRef::Null, zero, zero),
            "envelope column holds NULL, not a BLOB in the wire encoding"
        );
        assert_eq!(reason(blob, ValueRef::Null, zero), "attempts column holds NULL, not an INTEGER");
        assert_eq!(reason(blob, zero, ValueRef::Null), "locked_until column holds NULL, not an INTEGER");
        assert_eq!(
            reason(ValueRef::Text(b"x"), zero, zero),
            "envelope column holds TEXT, not a BLOB in the wire encoding"
        );
        assert_eq!(
            reason(blob, ValueRef::Integer(3), zero),
            inbound::MAX_ATTEMPTS_REASON,
            "a fourth delivery of three"
        );
        assert!(check_row(blob, ValueRef::Integer(2), zero, &LIMITS).is_ok(), "the third delivery");
        assert_eq!(
            reason(blob, ValueRef::Integer(i64::MAX), zero),
            inbound::MAX_ATTEMPTS_REASON,
            "no overflow"
        );
        assert_eq!(
            reason(ValueRef::Blob(&encoded(b"12345")), zero, zero),
            inbound::oversized_reason(5, 4).unwrap()
        );
        assert_eq!(
            reason(ValueRef::Blob(&good[..good.len() - 1]), zero, zero),
            "not a valid wire-encoded envelope: envelope truncated while reading payload"
        );
    }
}
