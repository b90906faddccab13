//! The mailbox table, synchronously: writing messages, claiming them with a lease, settling them.
//!
//! Everything here runs on the transport's database thread (see [`crate::worker`]), never on an
//! async worker. One [`SqliteMailbox`] per transport instance: one connection, one lease owner.

use crate::{config::SqliteConfig, schema::now_ms, topic_pattern};
use comms_plugin_api::{wire, Inbound, Settlement, SettlementOutcome};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use std::collections::BTreeSet;

/// One message to write.
#[derive(Debug)]
pub(crate) enum Outgoing {
    /// To the mailbox of one node.
    Direct {
        /// The node id (the address the sender was given).
        recipient: String,
        /// The envelope in wire encoding.
        encoded: Vec<u8>,
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

const REASON_ATTEMPTS: &str = "delivered max_attempts times without being accepted";
const REASON_DISCARDED: &str = "rejected by the receiving host (REJECTED_DISCARD)";
const REASON_MALFORMED: &str = "not a valid wire-encoded envelope";

impl SqliteMailbox {
    pub(crate) fn new(
        connection: Connection,
        config: SqliteConfig,
        recipient: String,
        owner: String,
    ) -> Self {
        Self { connection, config, recipient, owner }
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
            } else {
                transaction
                    .prepare_cached("DELETE FROM comms_subscription WHERE node_id = ?1 AND pattern = ?2")?
                    .execute(params![self.recipient, change.pattern])?;
            }
        }
        let mut subscriptions: Option<Vec<(String, String)>> = None;
        {
            let mut insert = transaction.prepare_cached(
                "INSERT INTO comms_mailbox (recipient, envelope, enqueued_at) VALUES (?1, ?2, ?3)",
            )?;
            for message in outgoing {
                match message {
                    Outgoing::Direct { recipient, encoded } => {
                        insert.execute(params![recipient, encoded, now])?;
                        recipients.insert(recipient.clone());
                    }
                    Outgoing::Topic { topic, encoded } => {
                        if subscriptions.is_none() {
                            let mut select = transaction
                                .prepare_cached("SELECT node_id, pattern FROM comms_subscription")?;
                            let rows = select.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?;
                            subscriptions = Some(rows.collect::<rusqlite::Result<_>>()?);
                        }
                        let subscribers: BTreeSet<&String> = subscriptions
                            .iter()
                            .flatten()
                            .filter(|(_, pattern)| topic_pattern::matches(pattern, topic))
                            .map(|(node, _)| node)
                            .collect();
                        for node in subscribers {
                            insert.execute(params![node, encoded, now])?;
                            recipients.insert(node.clone());
                        }
                    }
                }
            }
            for settlement in settlements {
                if settle_one(&transaction, &self.owner, settlement, now)? {
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

/// Applies one settlement; `true` if it made a message available again (requeued).
fn settle_one(
    transaction: &rusqlite::Transaction<'_>,
    owner: &str,
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
            dead_letter(transaction, id, Some(owner), now, REASON_DISCARDED)?
        }
        // REJECTED_REQUEUE, and any outcome a newer host may invent: deliver it again.
        _ => {
            requeue = true;
            transaction
                .prepare_cached(
                    "UPDATE comms_mailbox SET locked_until = 0, owner = NULL WHERE id = ?1 AND owner = ?2",
                )?
                .execute(params![id, owner])?
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
            .prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM comms_mailbox WHERE recipient = ?1 AND locked_until <= ?2)",
            )?
            .query_row(params![self.recipient, now], |row| row.get(0))?;
        if !available {
            let next_lease_expiry = self.next_lease_expiry(now)?;
            return Ok(Claimed { data_version, looked: true, next_lease_expiry, ..Claimed::default() });
        }

        let max_attempts = i64::from(self.config.max_attempts);
        let limit = i64::try_from(max.min(self.config.batch_size)).unwrap_or(i64::MAX);
        let transaction = self.connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let now = now_ms();
        let locked_until = now.saturating_add(i64::try_from(self.config.lease_ms).unwrap_or(i64::MAX));
        let mut rows: Vec<(i64, Vec<u8>, i64)> = transaction
            .prepare_cached(
                "UPDATE comms_mailbox SET owner = ?1, locked_until = ?2, attempts = attempts + 1
                 WHERE id IN (SELECT id FROM comms_mailbox WHERE recipient = ?3 AND locked_until <= ?4
                              ORDER BY id LIMIT ?5)
                 RETURNING id, envelope, attempts",
            )?
            .query_map(params![self.owner, locked_until, self.recipient, now, limit], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?))
            })?
            .collect::<rusqlite::Result<_>>()?;
        rows.sort_unstable_by_key(|(id, _, _)| *id);
        let mut claimed = Claimed { data_version, looked: true, ..Claimed::default() };
        for (id, encoded, attempts) in rows {
            if attempts > max_attempts {
                dead_letter(&transaction, id, None, now, REASON_ATTEMPTS)?;
                claimed.dead_lettered += 1;
                continue;
            }
            match wire::decode_envelope(&encoded) {
                Ok(envelope) => claimed.messages.push(Inbound { envelope, delivery_tag: id as u64 }),
                Err(error) => {
                    tracing::warn!(row = id, %error, "undecodable message moved to comms_dead_letter");
                    dead_letter(&transaction, id, None, now, REASON_MALFORMED)?;
                    claimed.dead_lettered += 1;
                }
            }
        }
        transaction.commit()?;
        if claimed.dead_lettered > 0 {
            tracing::warn!(
                node = %self.recipient,
                count = claimed.dead_lettered,
                "messages moved to the dead-letter table comms_dead_letter"
            );
        }
        Ok(claimed)
    }

    fn next_lease_expiry(&self, now: i64) -> rusqlite::Result<Option<i64>> {
        self.connection
            .prepare_cached(
                "SELECT MIN(locked_until) FROM comms_mailbox WHERE recipient = ?1 AND locked_until > ?2",
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
            "INSERT INTO comms_dead_letter (id, recipient, envelope, enqueued_at, attempts, dead_at, reason)
             SELECT id, recipient, envelope, enqueued_at, attempts, ?3, ?4 FROM comms_mailbox
             WHERE id = ?1 AND (?2 IS NULL OR owner = ?2)",
        )?
        .execute(params![id, owner, now, reason])?;
    if moved > 0 {
        transaction.prepare_cached("DELETE FROM comms_mailbox WHERE id = ?1")?.execute(params![id])?;
    }
    Ok(moved)
}
