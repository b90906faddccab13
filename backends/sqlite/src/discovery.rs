//! Discovery through the shared file: the `comms_registry` table, one row per announced node with
//! its record as JSON and a heartbeat time stamp.
//!
//! The discovery itself is [`comms_plugin_api::registry`]'s (heartbeats, reading the live rows,
//! events, offline records, removal on close); this file holds the registry's statements. The
//! rows are read at each heartbeat (`heartbeat_ms`): SQLite has no notifications. An offline
//! record is written with a heartbeat that never goes stale (`i64::MAX`).

use crate::{
    config::SqliteConfig,
    schema::{self, db_error, now_ms},
};
use comms_plugin_api::{
    async_trait,
    registry::{RegistryDiscovery, RegistryStore, RegistryTimes},
    ErrorCode, NodeId, PluginError,
};
use rusqlite::{params, Connection};
use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

/// Discovery through the `comms_registry` table of the shared file; see the module docs.
pub type SqliteDiscovery = RegistryDiscovery<SqliteRegistry>;

/// The open database file, with the statements of the registry.
pub struct SqliteRegistry {
    config: SqliteConfig,
    connection: Arc<Mutex<Connection>>,
}

/// Validates `config`, opens the database and starts the heartbeat and watch task. Must run
/// inside a tokio runtime.
pub(crate) async fn open(node: NodeId, config: SqliteConfig) -> Result<SqliteDiscovery, PluginError> {
    config.validate()?;
    let opened = config.clone();
    let connection = tokio::task::spawn_blocking(move || schema::open(&opened))
        .await
        .map_err(|error| PluginError::new(ErrorCode::OTHER, format!("opening the database: {error}")))??;
    let times = RegistryTimes {
        heartbeat: Duration::from_millis(config.heartbeat_ms),
        peer_timeout: Duration::from_millis(config.peer_timeout_ms),
    };
    let store = SqliteRegistry { config, connection: Arc::new(Mutex::new(connection)) };
    Ok(RegistryDiscovery::start(node, store, times))
}

impl std::fmt::Debug for SqliteRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteRegistry").field("database", &self.config.database).finish_non_exhaustive()
    }
}

impl SqliteRegistry {
    /// Runs `work` on the connection, on a blocking thread.
    async fn with_db<T: Send + 'static>(
        &self,
        what: &'static str,
        work: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, PluginError> {
        let (connection, config) = (Arc::clone(&self.connection), self.config.clone());
        tokio::task::spawn_blocking(move || {
            let connection = connection.lock().unwrap_or_else(|p| p.into_inner());
            work(&connection).map_err(|error| db_error(what, &config, error))
        })
        .await
        .map_err(|error| PluginError::new(ErrorCode::OTHER, format!("{what}: {error}")))?
    }
}

/// Milliseconds in `duration`, as SQLite's integers hold them.
fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

#[async_trait]
impl RegistryStore for SqliteRegistry {
    async fn upsert(&self, rows: Vec<(String, String)>, offline: bool) -> Result<(), PluginError> {
        let heartbeat_at = if offline { i64::MAX } else { now_ms() };
        self.with_db("writing to the node registry", move |connection| {
            immediate(connection, || {
                let mut statement = connection.prepare_cached(
                    "INSERT INTO comms_registry (node_id, record, heartbeat_at) VALUES (?1, ?2, ?3)
                     ON CONFLICT (node_id) DO UPDATE SET record = excluded.record, heartbeat_at = excluded.heartbeat_at",
                )?;
                for (id, record) in &rows {
                    statement.execute(params![id, record, heartbeat_at])?;
                }
                Ok(())
            })
        })
        .await
    }

    async fn delete(&self, ids: Vec<String>) -> Result<(), PluginError> {
        self.with_db("removing nodes from the node registry", move |connection| {
            immediate(connection, || {
                for id in &ids {
                    connection.execute("DELETE FROM comms_registry WHERE node_id = ?1", params![id])?;
                }
                Ok(())
            })
        })
        .await
    }

    async fn live_rows(&self, peer_timeout: Duration) -> Result<Vec<(String, String)>, PluginError> {
        let since = now_ms().saturating_sub(millis(peer_timeout));
        self.with_db("reading the node registry", move |connection| {
            let mut select = connection
                .prepare_cached("SELECT node_id, record FROM comms_registry WHERE heartbeat_at > ?1")?;
            let rows = select.query_map(params![since], |row| Ok((row.get(0)?, row.get(1)?)))?;
            rows.collect()
        })
        .await
    }

    async fn delete_older_than(&self, age: Duration) -> Result<(), PluginError> {
        let before = now_ms().saturating_sub(millis(age));
        self.with_db("deleting long-dead registry rows", move |connection| {
            connection
                .execute("DELETE FROM comms_registry WHERE heartbeat_at < ?1", params![before])
                .map(drop)
        })
        .await
    }

    fn describe(&self) -> String {
        format!("sqlite discovery on `{}`", self.config.path_text())
    }
}

/// Runs `work` in a `BEGIN IMMEDIATE` transaction: the write lock is taken (waiting up to the
/// busy timeout) before anything is read, so the transaction can never fail to upgrade.
fn immediate<T>(connection: &Connection, work: impl FnOnce() -> rusqlite::Result<T>) -> rusqlite::Result<T> {
    connection.execute_batch("BEGIN IMMEDIATE")?;
    match work() {
        Ok(value) => {
            connection.execute_batch("COMMIT")?;
            Ok(value)
        }
        Err(error) => {
            let _ = connection.execute_batch("ROLLBACK");
            Err(error)
        }
    }
}
