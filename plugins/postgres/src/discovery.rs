//! Discovery through the database: `<schema>.comms_registry` holds one row per announced node
//! with its record (JSON text), a heartbeat time stamp and whether the node is offline.
//!
//! The discovery itself is [`comms_plugin_api::registry`]'s (heartbeats, reading the live rows,
//! events, offline records, removal on close); this file holds the registry's statements and its
//! wake-ups. A trigger notifies the schema's registry channel when a row appears, changes its
//! record or goes (not on heartbeats), and the discovery's connection, which `LISTEN`s to it,
//! has the rows read at once: joins, updates and withdrawals are seen within a round trip; a
//! node that stops without withdrawing is seen leaving when its heartbeat is `peer_timeout_ms`
//! old (at the next heartbeat after that).

use crate::{
    config::PostgresConfig,
    link::{Link, Purpose},
    schema,
};
use comms_plugin_api::{
    async_trait,
    registry::{RegistryDiscovery, RegistryStore, RegistryTimes},
    IncidentCounters, NodeId, PluginError,
};
use std::{sync::Arc, time::Duration};

/// Discovery through `<schema>.comms_registry`; see the module docs.
pub type PostgresDiscovery = RegistryDiscovery<PostgresRegistry>;

/// The SQL of one schema.
#[derive(Debug)]
struct Statements {
    upsert: String,
    live: String,
    withdraw: String,
    garbage: String,
}

impl Statements {
    fn new(schema: &str) -> Self {
        let registry = format!("\"{schema}\".comms_registry");
        Self {
            upsert: format!(
                "INSERT INTO {registry} (node_id, record, heartbeat_at, offline) VALUES ($1, $2, now(), $3)
                 ON CONFLICT (node_id) DO UPDATE
                 SET record = excluded.record, heartbeat_at = excluded.heartbeat_at, offline = excluded.offline"
            ),
            live: format!(
                "SELECT node_id, record FROM {registry}
                 WHERE offline OR heartbeat_at > now() - $1::float8 * interval '1 millisecond'"
            ),
            withdraw: format!("DELETE FROM {registry} WHERE node_id = ANY($1)"),
            garbage: format!(
                "DELETE FROM {registry} WHERE NOT offline AND heartbeat_at < now() - $1::float8 * interval '1 millisecond'"
            ),
        }
    }
}

/// The registry of one schema, on a connection that listens to its notifications.
#[derive(Debug)]
pub struct PostgresRegistry {
    schema: String,
    link: Link,
    statements: Statements,
}

/// Validates `config`, connects, creates or migrates the schema, listens to the registry's
/// notifications, and starts the heartbeat and watch task.
pub(crate) async fn open(node: NodeId, config: PostgresConfig) -> Result<PostgresDiscovery, PluginError> {
    // Heartbeats need no flush: a lost one is written again a heartbeat later.
    let link = Link::open(&config, Purpose::Registry, Arc::new(IncidentCounters::default())).await?;
    {
        let mut dedicated = link.dedicated().await?;
        schema::migrate(&link, &mut dedicated, &config.schema).await?;
    }
    let schema_name = config.schema.as_str();
    let channel = link
        .run("naming the notification channel", |client| async move {
            client.query_one("SELECT 'comms_registry_' || md5($1)", &[&schema_name]).await
        })
        .await?
        .get::<_, String>(0);
    link.listen(channel).await?;
    let times = RegistryTimes {
        heartbeat: Duration::from_millis(config.heartbeat_ms),
        peer_timeout: Duration::from_millis(config.peer_timeout_ms),
    };
    let store = PostgresRegistry { statements: Statements::new(&config.schema), schema: config.schema, link };
    Ok(RegistryDiscovery::start(node, store, times))
}

/// Milliseconds in `duration`, as the statements take them.
fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

#[async_trait]
impl RegistryStore for PostgresRegistry {
    async fn upsert(&self, rows: Vec<(String, String)>, offline: bool) -> Result<(), PluginError> {
        for (id, record) in &rows {
            self.link
                .run("writing to the node registry", |client| async move {
                    client.execute(&self.statements.upsert, &[id, record, &offline]).await
                })
                .await?;
        }
        Ok(())
    }

    async fn delete(&self, ids: Vec<String>) -> Result<(), PluginError> {
        let ids = &ids;
        self.link
            .run("removing nodes from the node registry", |client| async move {
                client.execute(&self.statements.withdraw, &[ids]).await
            })
            .await
            .map(drop)
    }

    async fn live_rows(&self, peer_timeout: Duration) -> Result<Vec<(String, String)>, PluginError> {
        let timeout = millis(peer_timeout);
        let rows = self
            .link
            .run("reading the node registry", |client| async move {
                client.query(&self.statements.live, &[&timeout]).await
            })
            .await?;
        Ok(rows.iter().map(|row| (row.get(0), row.get(1))).collect())
    }

    async fn delete_older_than(&self, age: Duration) -> Result<(), PluginError> {
        let age = millis(age);
        self.link
            .run("deleting long-dead registry rows", |client| async move {
                client.execute(&self.statements.garbage, &[&age]).await
            })
            .await
            .map(drop)
    }

    /// A notification of the registry's channel.
    async fn changed(&self) {
        self.link.wake().notified().await;
    }

    fn close(&self) {
        self.link.close();
    }

    fn describe(&self) -> String {
        format!("postgres discovery (schema `{}`)", self.schema)
    }
}
