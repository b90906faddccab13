//! The statements of the transport, one per operation. Each is a single SQL statement, so each
//! is a transaction of its own (autocommit) and safe on a connection that other operations
//! share; and each is safe to run again after a lost connection (see [`Link::run`]).

use crate::config::PostgresConfig;
use crate::{lease, link::Link};
use comms_plugin_api::{inbound::StoredMessageLimits, Inbound, PluginError};

/// One message to write.
#[derive(Debug)]
pub(crate) enum Outgoing {
    /// To the mailbox of one node.
    Direct {
        /// The node id (the address the sender was given).
        recipient: String,
        /// The envelope in wire encoding.
        encoded: Vec<u8>,
        /// `framework::replacement_key`: replaces an older unclaimed row with the same key in the
        /// same mailbox.
        replace_key: Option<String>,
    },
    /// One row per node subscribed to a matching pattern, at the time of the write.
    Topic {
        /// The topic published to.
        topic: String,
        /// The envelope in wire encoding.
        encoded: Vec<u8>,
    },
}

/// What a claim found.
#[derive(Debug, Default)]
pub(crate) struct Claimed {
    /// Messages leased to this instance, oldest first; each `delivery_tag` is the row id.
    pub(crate) messages: Vec<Inbound>,
    /// Rows moved to the dead-letter table by this claim.
    pub(crate) dead_lettered: u64,
    /// When nothing was claimed: milliseconds until the earliest lease on the mailbox ends.
    pub(crate) next_expiry_ms: Option<f64>,
}

/// The SQL of one schema, written once.
#[derive(Debug)]
pub(crate) struct Statements {
    insert_direct: String,
    insert_replacing: String,
    insert_topic: String,
    claim: String,
    dead_letter: String,
    accept: String,
    requeue: String,
    requeue_delayed: String,
    release: String,
    subscribe: String,
    unsubscribe: String,
    notify: String,
}

impl Statements {
    pub(crate) fn new(schema: &str) -> Self {
        let mailbox = format!("\"{schema}\".comms_mailbox");
        Self {
            // One statement for a whole batch, in batch order (identity values are drawn in the
            // order of `ORDER BY n`). Most batches hold application messages only: they take this
            // one, without the replacement's join.
            insert_direct: format!(
                "INSERT INTO {mailbox} (recipient, envelope)
                 SELECT recipient, envelope FROM unnest($1::text[], $2::bytea[])
                     WITH ORDINALITY AS b(recipient, envelope, n)
                 ORDER BY n"
            ),
            // A batch with a framework message: replaced framework messages go, the new rows come.
            insert_replacing: format!(
                "WITH batch AS (
                     SELECT * FROM unnest($1::text[], $2::bytea[], $3::text[])
                         WITH ORDINALITY AS b(recipient, envelope, replace_key, n)),
                 replaced AS (
                     DELETE FROM {mailbox} m USING batch b
                     WHERE b.replace_key IS NOT NULL AND m.recipient = b.recipient
                       AND m.replace_key = b.replace_key AND m.locked_until <= now())
                 INSERT INTO {mailbox} (recipient, envelope, replace_key)
                 SELECT recipient, envelope, replace_key FROM batch ORDER BY n"
            ),
            // After the write committed, in a transaction that writes nothing: see schema.rs.
            notify: format!(
                "SELECT pg_notify(\"{schema}\".comms_mailbox_channel(r), '')
                 FROM (SELECT DISTINCT unnest($1::text[]) AS r) recipients"
            ),
            insert_topic: format!(
                "WITH batch AS (
                     SELECT * FROM unnest($1::text[], $2::bytea[]) WITH ORDINALITY AS b(topic, envelope, n))
                 INSERT INTO {mailbox} (recipient, envelope, pattern)
                 SELECT s.node_id, b.envelope, s.pattern FROM batch b
                 CROSS JOIN LATERAL (
                     SELECT node_id, min(pattern COLLATE \"C\") AS pattern
                     FROM \"{schema}\".comms_subscription
                     WHERE b.topic ~ pattern_regex GROUP BY node_id) s
                 ORDER BY b.n, s.node_id
                 RETURNING recipient"
            ),
            // SKIP LOCKED: concurrent receivers of one node id take different rows instead of
            // waiting for each other; `attempts` counts this delivery. When nothing is claimed,
            // one row with a NULL id says in how many milliseconds the earliest lease held by
            // someone else on this mailbox ends (NULL if none), saving a round trip. A topic copy
            // is taken only once this instance subscribes to its pattern again ($5, see
            // `Mailbox::live_patterns`).
            //
            // The cost of a claim must not grow with the backlog: the free rows are found by
            // walking the (recipient, id) index in order and stopping after $4, and the rows
            // taken are then updated through the primary key. The receiving connection pins the
            // plan to that (`Purpose::Receiving` in link.rs); `= ANY(ARRAY(...))` rather than a
            // join leaves the planner no hash join to build over the whole table.
            claim: format!(
                "WITH claimed AS (
                     UPDATE {mailbox} m
                     SET owner = $2, locked_until = now() + $3::float8 * interval '1 millisecond',
                         attempts = m.attempts + 1
                     WHERE m.id = ANY(ARRAY(
                         SELECT id FROM {mailbox}
                         WHERE recipient = $1 AND locked_until <= now()
                           AND (pattern IS NULL OR pattern = ANY($5::text[]))
                         ORDER BY id LIMIT $4 FOR UPDATE SKIP LOCKED))
                     RETURNING m.id, m.envelope, m.attempts)
                 SELECT id, envelope, attempts, NULL::float8 FROM claimed
                 UNION ALL
                 SELECT NULL, NULL, NULL,
                        (SELECT (extract(epoch FROM min(locked_until) - clock_timestamp()) * 1000)::float8
                         FROM {mailbox} WHERE recipient = $1 AND locked_until > now())
                 WHERE NOT EXISTS (SELECT 1 FROM claimed)"
            ),
            dead_letter: format!(
                "WITH refused AS (
                     SELECT * FROM unnest($1::bigint[], $2::text[]) AS r(id, reason)),
                 moved AS (
                     DELETE FROM {mailbox} m USING refused r WHERE m.id = r.id AND m.owner = $3
                     RETURNING m.id, m.recipient, m.envelope, m.enqueued_at, m.attempts, r.reason)
                 INSERT INTO \"{schema}\".comms_dead_letter (id, recipient, envelope, enqueued_at, attempts, reason)
                 SELECT id, recipient, envelope, enqueued_at, attempts, reason FROM moved
                 ON CONFLICT (id) DO NOTHING"
            ),
            accept: format!("DELETE FROM {mailbox} WHERE id = ANY($1) AND owner = $2"),
            requeue: format!(
                "UPDATE {mailbox} SET owner = NULL, locked_until = '-infinity' WHERE id = ANY($1) AND owner = $2"
            ),
            // A row's delay is picked by its deliveries so far (`attempts`) from $3, the delays
            // in milliseconds after the first, second, ... delivery (`RequeueDelay::after`); the
            // last one holds for any later delivery. The claim takes it once `locked_until` is
            // past, and an idle receiver sleeps until then (the claim's next expiry).
            requeue_delayed: format!(
                "UPDATE {mailbox} SET owner = NULL,
                     locked_until = now() + ($3::float8[])[least(greatest(attempts, 1), cardinality($3::float8[]))]
                                            * interval '1 millisecond'
                 WHERE id = ANY($1) AND owner = $2"
            ),
            // Every row this instance claimed is in the mailbox of its node: the (recipient, id)
            // index finds them (schema version 3 has no index on owner).
            release: format!(
                "UPDATE {mailbox} SET owner = NULL, locked_until = '-infinity' WHERE recipient = $1 AND owner = $2"
            ),
            subscribe: format!(
                "INSERT INTO \"{schema}\".comms_subscription (node_id, pattern, pattern_regex)
                 VALUES ($1, $2, $3) ON CONFLICT DO NOTHING"
            ),
            // Copies still waiting for the subscription that ends would wait for ever: they are
            // delivered as they are (the host drops what no subscription matches).
            unsubscribe: format!(
                "WITH ended AS (
                     DELETE FROM \"{schema}\".comms_subscription WHERE node_id = $1 AND pattern = $2)
                 UPDATE {mailbox} SET pattern = NULL WHERE recipient = $1 AND pattern = $2"
            ),
        }
    }
}

/// For each message of `outgoing`: whether a later one in the batch replaces it (a framework
/// message with the same replacement key for the same node).
fn superseded_in_batch(outgoing: &[&Outgoing]) -> Vec<bool> {
    let mut newest = std::collections::HashSet::new();
    let mut superseded = vec![false; outgoing.len()];
    for (index, message) in outgoing.iter().enumerate().rev() {
        if let Outgoing::Direct { recipient, replace_key: Some(key), .. } = message {
            superseded[index] = !newest.insert((recipient.as_str(), key.as_str()));
        }
    }
    superseded
}

/// The mailbox of one node, seen through one transport instance's connection.
#[derive(Debug)]
pub(crate) struct Mailbox {
    /// Claims and settlements (commits not flushed: their loss means a redelivery), `LISTEN`.
    link: Link,
    /// Sends and subscriptions: `send` returns once the commit is flushed.
    writer: Link,
    statements: Statements,
    /// The node whose mailbox this is.
    recipient: String,
    /// Written into `owner` of claimed rows: unique per transport instance, so a settlement
    /// never touches a row that has since been claimed by someone else.
    owner: String,
    limits: StoredMessageLimits,
    lease_ms: f64,
    /// Milliseconds a requeued message waits, after its 1st, 2nd, ... delivery (the last for any
    /// later one); empty: requeued messages are free at once.
    requeue_delays_ms: Vec<f64>,
    /// The patterns this instance subscribes to now: the topic copies it may claim. Restarted
    /// empty, so that what waited for a subscription while the node was away waits until the
    /// application subscribes again.
    live_patterns: std::sync::Mutex<Vec<String>>,
}

impl Mailbox {
    /// The mailbox of node `recipient` in `config`'s schema, claimed as `owner`, with `config`'s
    /// leases, delivery limits and requeue delays.
    pub(crate) fn new(
        link: Link,
        writer: Link,
        config: &PostgresConfig,
        recipient: String,
        owner: String,
    ) -> Self {
        let limits = StoredMessageLimits {
            max_attempts: u64::from(config.max_attempts),
            max_message_size: config.max_message_size,
        };
        let requeue_delay = config.requeue_delay();
        // A message is delivered at most `max_attempts` times, and after 31 doublings any delay
        // is at its cap: the table needs no more entries than that.
        let deliveries = limits.max_attempts.clamp(1, 32);
        let requeue_delays_ms = match requeue_delay.is_immediate() {
            true => Vec::new(),
            false => (1..=deliveries).map(|n| requeue_delay.after(n).as_secs_f64() * 1000.0).collect(),
        };
        Self {
            link,
            writer,
            statements: Statements::new(&config.schema),
            recipient,
            owner,
            limits,
            lease_ms: config.lease_ms as f64,
            requeue_delays_ms,
            live_patterns: std::sync::Mutex::new(Vec::new()),
        }
    }

    fn live_patterns(&self) -> Vec<String> {
        self.live_patterns.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Woken by notifications for this node and by reconnects of the receiving connection.
    pub(crate) fn wake(&self) -> &tokio::sync::Notify {
        self.link.wake()
    }

    /// Closes both connections.
    pub(crate) fn close(&self) {
        self.link.close();
        self.writer.close();
    }

    /// Writes `outgoing`: all direct messages in one statement, all publications in another. A
    /// framework message followed in the batch by one with the same replacement key for the
    /// same node is not written: the later one replaces it.
    /// Returns the nodes that got messages, for [`Mailbox::notify`].
    pub(crate) async fn write(&self, outgoing: &[&Outgoing]) -> Result<Vec<String>, PluginError> {
        let mut recipients = Vec::new();
        let mut envelopes: Vec<&[u8]> = Vec::new();
        let mut keys = Vec::new();
        let mut topics = Vec::new();
        let mut published: Vec<&[u8]> = Vec::new();
        let superseded = superseded_in_batch(outgoing);
        for (message, superseded) in outgoing.iter().zip(superseded) {
            match message {
                Outgoing::Direct { .. } if superseded => {}
                Outgoing::Direct { recipient, encoded, replace_key } => {
                    recipients.push(recipient.as_str());
                    envelopes.push(encoded);
                    keys.push(replace_key.as_deref());
                }
                Outgoing::Topic { topic, encoded } => {
                    topics.push(topic.as_str());
                    published.push(encoded);
                }
            }
        }
        if keys.iter().any(Option::is_some) {
            let (recipients, envelopes, keys) = (&recipients, &envelopes, &keys);
            self.writer
                .run("writing messages", |client| async move {
                    client.execute(&self.statements.insert_replacing, &[recipients, envelopes, keys]).await
                })
                .await?;
        } else if !recipients.is_empty() {
            let (recipients, envelopes) = (&recipients, &envelopes);
            self.writer
                .run("writing messages", |client| async move {
                    client.execute(&self.statements.insert_direct, &[recipients, envelopes]).await
                })
                .await?;
        }
        let mut woken: Vec<String> = recipients.iter().map(|recipient| recipient.to_string()).collect();
        if !topics.is_empty() {
            let (topics, published) = (&topics, &published);
            let rows = self
                .writer
                .run("publishing messages", |client| async move {
                    client.query(&self.statements.insert_topic, &[topics, published]).await
                })
                .await?;
            woken.extend(rows.iter().map(|row| row.get::<_, String>(0)));
        }
        // One notification per node, however many messages it got.
        woken.sort_unstable();
        woken.dedup();
        Ok(woken)
    }

    /// Wakes the receivers of `recipients`. A failure only delays them until their safety
    /// poll: the messages are committed.
    pub(crate) async fn notify(&self, recipients: Vec<String>) {
        if recipients.is_empty() {
            return;
        }
        let recipients = &recipients;
        let notified = self
            .writer
            .run("notifying receivers", |client| async move {
                client.execute(&self.statements.notify, &[recipients]).await
            })
            .await;
        if let Err(error) = notified {
            tracing::debug!(%error, "notifying receivers failed; they find the messages at their next poll");
        }
    }

    /// Leases up to `max` free messages, oldest first; rows that cannot be delivered go to the
    /// dead-letter table with their reason.
    pub(crate) async fn claim(&self, max: usize) -> Result<Claimed, PluginError> {
        let limit = i64::try_from(max).unwrap_or(i64::MAX);
        let live = &self.live_patterns();
        let rows = self
            .link
            .run("claiming messages", |client| async move {
                client
                    .query(
                        &self.statements.claim,
                        &[&self.recipient, &self.owner, &self.lease_ms, &limit, live],
                    )
                    .await
            })
            .await?;
        let mut claimed = Claimed::default();
        let mut refused_ids = Vec::new();
        let mut reasons = Vec::new();
        let mut rows: Vec<(i64, &[u8], i32)> = rows
            .iter()
            .filter_map(|row| match row.get::<_, Option<i64>>(0) {
                Some(id) => Some((id, row.get(1), row.get(2))),
                None => {
                    claimed.next_expiry_ms = row.get(3);
                    None
                }
            })
            .collect();
        // RETURNING gives no order.
        rows.sort_unstable_by_key(|(id, _, _)| *id);
        for (id, envelope, attempts) in rows {
            match lease::check_row(envelope, attempts, &self.limits) {
                Ok(envelope) => claimed.messages.push(Inbound { envelope, delivery_tag: id as u64 }),
                Err(reason) => {
                    refused_ids.push(id);
                    reasons.push(reason);
                }
            }
        }
        if !refused_ids.is_empty() {
            claimed.dead_lettered = self.dead_letter(&refused_ids, &reasons).await?;
            // One line per claim, not per row: a flood of bad rows must not flood the log.
            tracing::warn!(
                node = %self.recipient,
                count = claimed.dead_lettered,
                first_reason = %reasons[0],
                "messages moved to the dead-letter table comms_dead_letter"
            );
        }
        Ok(claimed)
    }

    /// Moves rows leased to this instance to the dead-letter table, each with its reason.
    pub(crate) async fn dead_letter(&self, ids: &[i64], reasons: &[String]) -> Result<u64, PluginError> {
        self.link
            .run("moving messages to the dead-letter table", |client| async move {
                client.execute(&self.statements.dead_letter, &[&ids, &reasons, &self.owner]).await
            })
            .await
    }

    /// Deletes accepted messages.
    pub(crate) async fn accept(&self, ids: &[i64]) -> Result<(), PluginError> {
        self.link
            .run("settling messages", |client| async move {
                client.execute(&self.statements.accept, &[&ids, &self.owner]).await
            })
            .await
            .map(drop)
    }

    /// Frees rejected messages, at once or after their requeue delay (their node's receivers are
    /// notified either way: an idle one then sleeps until the delay is over).
    pub(crate) async fn requeue(&self, ids: &[i64]) -> Result<(), PluginError> {
        let delays = &self.requeue_delays_ms;
        let requeued = self
            .link
            .run("requeueing messages", |client| async move {
                if delays.is_empty() {
                    client.execute(&self.statements.requeue, &[&ids, &self.owner]).await
                } else {
                    client.execute(&self.statements.requeue_delayed, &[&ids, &self.owner, delays]).await
                }
            })
            .await?;
        if requeued > 0 {
            self.notify(vec![self.recipient.clone()]).await;
        }
        Ok(())
    }

    /// Frees every message leased to this instance and not settled.
    pub(crate) async fn release(&self) -> Result<u64, PluginError> {
        let released = self
            .link
            .run("releasing leases", |client| async move {
                client.execute(&self.statements.release, &[&self.recipient, &self.owner]).await
            })
            .await?;
        if released > 0 {
            self.notify(vec![self.recipient.clone()]).await;
        }
        Ok(released)
    }

    /// Adds or removes a subscription of this node; then wakes its receivers, for the copies
    /// that waited for this subscription (or, once it ends, no longer wait).
    pub(crate) async fn subscription(&self, pattern: &str, subscribe: bool) -> Result<(), PluginError> {
        if subscribe {
            let regex = lease::pattern_regex(pattern);
            let regex = &regex;
            self.writer
                .run("subscribing", |client| async move {
                    client.execute(&self.statements.subscribe, &[&self.recipient, &pattern, regex]).await
                })
                .await?;
            let mut live = self.live_patterns.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if !live.iter().any(|known| known == pattern) {
                live.push(pattern.to_string());
            }
        } else {
            self.live_patterns
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .retain(|known| known != pattern);
            self.writer
                .run("unsubscribing", |client| async move {
                    client.execute(&self.statements.unsubscribe, &[&self.recipient, &pattern]).await
                })
                .await?;
        }
        self.notify(vec![self.recipient.clone()]).await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config::PostgresConfig, link::Purpose, schema};
    use comms_plugin_api::IncidentCounters;
    use std::sync::Arc;

    /// The tests' PostgreSQL server (trust authentication, database `test`), as the comms tests
    /// use it. Unreachable: a failure in CI (`CI=true`), a skip with a reason elsewhere.
    fn server_available() -> bool {
        let address = std::net::SocketAddr::from(([127, 0, 0, 1], 5432));
        if std::net::TcpStream::connect_timeout(&address, std::time::Duration::from_secs(2)).is_ok() {
            return true;
        }
        assert!(
            std::env::var("CI").map_or(true, |ci| ci != "true"),
            "PostgreSQL at {address} is not reachable, and in CI a database test must not skip"
        );
        eprintln!("SKIPPED: PostgreSQL at {address} is not reachable (outside CI database tests skip)");
        false
    }

    /// The claim prepared as `claim` on `client` is run once with these arguments.
    const CLAIM_BOB: &str = "claim('bob', 'bob@test', 30000, 64, '{}')";

    /// The plan of one execution of the prepared claim, as `EXPLAIN ANALYZE` shows it.
    async fn claim_plan(client: &tokio_postgres::Client) -> String {
        let explain = format!("EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF) EXECUTE {CLAIM_BOB}");
        let rows = client.query(explain.as_str(), &[]).await.unwrap();
        rows.iter().map(|row| row.get::<_, String>(0)).collect::<Vec<_>>().join("\n")
    }

    /// A claim walks the mailbox's index and stops after one batch, with the plan PostgreSQL
    /// made while the mailbox was empty (the generic plan it keeps for a prepared statement) as
    /// with one made from statistics of a large backlog. Without the receiving connection's
    /// settings the first reads the whole table to find the claimed rows (a sequential scan),
    /// and a plan made without statistics sorts the whole backlog.
    #[tokio::test]
    async fn a_claim_reads_one_batch_however_large_the_backlog() {
        if !server_available() {
            return;
        }
        let schema = format!("comms_claim_plan_{}", std::process::id());
        let config = PostgresConfig {
            url: "postgres://postgres@127.0.0.1:5432/test".to_string(),
            schema: schema.clone(),
            ..PostgresConfig::default()
        };
        let link = Link::lazy(&config, Purpose::Receiving, Arc::new(IncidentCounters::default())).unwrap();
        let mut client = link.dedicated().await.unwrap();
        client.batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE")).await.unwrap();
        schema::migrate(&link, &mut client, &schema).await.unwrap();
        // Prepared by name, as the plugin's connection prepares it (tokio-postgres names its
        // statements itself), so that EXPLAIN can run that prepared statement.
        let statements = Statements::new(&schema);
        let prepare = format!("PREPARE claim(text, text, float8, bigint, text[]) AS {}", statements.claim);
        client.batch_execute(&prepare).await.unwrap();
        // Six claims of an empty mailbox: from the sixth on PostgreSQL may keep a generic plan.
        for _ in 0..6 {
            let found = client.simple_query(&format!("EXECUTE {CLAIM_BOB}")).await.unwrap();
            let rows =
                found.iter().filter(|message| matches!(message, tokio_postgres::SimpleQueryMessage::Row(_)));
            assert_eq!(rows.count(), 1, "an empty mailbox: the one row saying when a lease ends");
        }
        client
            .batch_execute(&format!(
                "INSERT INTO \"{schema}\".comms_mailbox (recipient, envelope)
                 SELECT 'bob', '\\x00' FROM generate_series(1, 5000)"
            ))
            .await
            .unwrap();
        let planned_when_empty = claim_plan(&client).await;
        client.batch_execute(&format!("ANALYZE \"{schema}\".comms_mailbox")).await.unwrap();
        let planned_from_statistics = claim_plan(&client).await;
        client.batch_execute(&format!("DROP SCHEMA \"{schema}\" CASCADE")).await.unwrap();
        for plan in [planned_when_empty, planned_from_statistics] {
            assert!(!plan.contains("Seq Scan") && !plan.contains("Sort"), "reads the whole backlog:\n{plan}");
            // The index walk stopped after the batch, having passed over the batch the plan
            // before claimed at most.
            assert!(plan.contains("Limit (actual rows=64 loops=1)"), "{plan}");
            for line in plan.lines().filter_map(|line| line.trim().strip_prefix("Rows Removed by Filter: ")) {
                assert!(line.parse::<u32>().unwrap() <= 64, "read past more than one batch:\n{plan}");
            }
        }
    }

    fn direct(recipient: &str, key: Option<&str>) -> Outgoing {
        Outgoing::Direct {
            recipient: recipient.to_string(),
            encoded: Vec::new(),
            replace_key: key.map(str::to_string),
        }
    }

    #[test]
    fn only_the_last_framework_message_per_node_and_key_in_a_batch_is_written() {
        let batch = [
            direct("bob", Some("heartbeat:alice")),
            direct("bob", None),
            direct("carol", Some("heartbeat:alice")),
            direct("bob", Some("hello:alice")),
            direct("bob", Some("heartbeat:alice")),
            direct("bob", None),
            Outgoing::Topic { topic: "news".to_string(), encoded: Vec::new() },
        ];
        let batch: Vec<&Outgoing> = batch.iter().collect();
        assert_eq!(superseded_in_batch(&batch), [true, false, false, false, false, false, false]);
    }
}
