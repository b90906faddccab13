//! Opening the shared database: WAL mode, busy timeout, and the versioned schema.
//!
//! The schema version is SQLite's `PRAGMA user_version`. Opening applies the migrations the file
//! lacks, inside one `BEGIN IMMEDIATE` transaction (so two processes opening a new file at once
//! do not both migrate it), and refuses a file whose version is newer than this plugin knows.

use crate::config::{SqliteConfig, Synchronous};
use comms_plugin_api::{ErrorCode, PluginError};
use rusqlite::{Connection, ErrorCode as SqliteCode, OpenFlags, TransactionBehavior};
use std::time::{Duration, Instant};

/// Migration `i` takes the schema from version `i` to `i + 1`. Append only: a released
/// migration is never edited.
pub(crate) const MIGRATIONS: &[&str] = &[
    // Version 1.
    "CREATE TABLE comms_mailbox (
        id           INTEGER PRIMARY KEY AUTOINCREMENT,
        recipient    TEXT    NOT NULL,
        envelope     BLOB    NOT NULL,
        enqueued_at  INTEGER NOT NULL,
        attempts     INTEGER NOT NULL DEFAULT 0,
        locked_until INTEGER NOT NULL DEFAULT 0,
        owner        TEXT
    );
    CREATE INDEX comms_mailbox_by_recipient ON comms_mailbox (recipient, id);
    CREATE TABLE comms_dead_letter (
        id          INTEGER PRIMARY KEY,
        recipient   TEXT    NOT NULL,
        envelope    BLOB    NOT NULL,
        enqueued_at INTEGER NOT NULL,
        attempts    INTEGER NOT NULL,
        dead_at     INTEGER NOT NULL,
        reason      TEXT    NOT NULL
    );
    CREATE TABLE comms_subscription (
        node_id       TEXT    NOT NULL,
        pattern       TEXT    NOT NULL,
        subscribed_at INTEGER NOT NULL,
        PRIMARY KEY (node_id, pattern)
    ) WITHOUT ROWID;
    CREATE TABLE comms_registry (
        node_id      TEXT    PRIMARY KEY,
        record       TEXT    NOT NULL,
        heartbeat_at INTEGER NOT NULL
    ) WITHOUT ROWID;",
    // Version 2: a hello, heartbeat or goodbye replaces an older unclaimed one with the same
    // key (`framework::replacement_key`, e.g. `heartbeat:alice`) in the same mailbox, so that
    // the mailbox of a node that never runs does not grow by a heartbeat a second for ever.
    // NULL (application messages, and rows written by programs that do not set it): never
    // replaced. The partial index holds only the keyed rows, so the lookup costs the same
    // however many application messages wait.
    "ALTER TABLE comms_mailbox ADD COLUMN replace_key TEXT;
    CREATE INDEX comms_mailbox_replaceable ON comms_mailbox (recipient, replace_key)
        WHERE replace_key IS NOT NULL;",
    // Version 3: a topic copy names the subscription it was written for (the recipient's
    // pattern that matched; the first in byte order when several did). A receiver claims it only
    // once its process has subscribed to that pattern again, so that the copies written while a
    // node was away wait for the application's subscription instead of arriving before it and
    // being dropped as publications nobody subscribes to. NULL (direct messages, rows of older
    // writers and of programs that do not set it): claimed at once, as before.
    "ALTER TABLE comms_mailbox ADD COLUMN pattern TEXT;",
];

/// The schema version this plugin writes and reads.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Milliseconds since the Unix epoch: leases and heartbeats are compared across processes, so
/// they use the wall clock (processes on one host share it).
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX))
}

/// Turns a SQLite error into an error that says what failed, on which file.
pub(crate) fn db_error(what: &str, config: &SqliteConfig, error: rusqlite::Error) -> PluginError {
    let path = config.path_text();
    match error.sqlite_error_code() {
        Some(SqliteCode::DatabaseBusy | SqliteCode::DatabaseLocked) => PluginError::retryable(
            ErrorCode::TIMEOUT,
            format!(
                "{what} on `{path}`: the database stayed locked by another connection for longer than \
                 busy_timeout_ms ({} ms)",
                config.busy_timeout_ms
            ),
        ),
        Some(
            SqliteCode::CannotOpen
            | SqliteCode::SystemIoFailure
            | SqliteCode::DiskFull
            | SqliteCode::ReadOnly
            | SqliteCode::PermissionDenied,
        ) => PluginError::new(ErrorCode::IO, format!("{what} on `{path}`: {error}")),
        Some(SqliteCode::NotADatabase | SqliteCode::DatabaseCorrupt) => PluginError::new(
            ErrorCode::MALFORMED,
            format!("{what} on `{path}`: the file is not a usable SQLite database: {error}"),
        ),
        _ => PluginError::new(ErrorCode::OTHER, format!("{what} on `{path}`: {error}")),
    }
}

fn is_busy(error: &rusqlite::Error) -> bool {
    matches!(error.sqlite_error_code(), Some(SqliteCode::DatabaseBusy | SqliteCode::DatabaseLocked))
}

/// Runs `step` again while it fails with "database is locked", for up to the busy timeout.
/// Needed where SQLite does not call its busy handler (switching to WAL mode, for one).
fn retry_busy<T>(
    config: &SqliteConfig,
    mut step: impl FnMut() -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    let started = Instant::now();
    loop {
        match step() {
            Err(error) if is_busy(&error) && started.elapsed() < config.busy_timeout() => {
                std::thread::sleep(Duration::from_millis(5));
            }
            result => return result,
        }
    }
}

/// Opens (creating if needed) the database at `config.database`, in WAL mode, with the busy
/// timeout, and brings its schema to [`SCHEMA_VERSION`].
pub(crate) fn open(config: &SqliteConfig) -> Result<Connection, PluginError> {
    let flags =
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let mut connection = Connection::open_with_flags(&config.database, flags)
        .map_err(|error| db_error("opening the database", config, error))?;
    connection
        .busy_timeout(config.busy_timeout())
        .map_err(|error| db_error("setting busy_timeout", config, error))?;
    let mode: String =
        retry_busy(config, || connection.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0)))
            .map_err(|error| db_error("switching to WAL mode", config, error))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(PluginError::new(
            ErrorCode::UNSUPPORTED,
            format!(
                "`{}`: SQLite refused WAL mode (journal mode is `{mode}`); the file must be on a local \
                 file system or a volume that supports shared memory",
                config.path_text()
            ),
        ));
    }
    let synchronous = match config.synchronous {
        Synchronous::Normal => "NORMAL",
        Synchronous::Full => "FULL",
    };
    connection
        .execute_batch(&format!(
            "PRAGMA synchronous = {synchronous}; PRAGMA journal_size_limit = 67108864; PRAGMA temp_store = MEMORY;"
        ))
        .map_err(|error| db_error("setting pragmas", config, error))?;
    migrate(&mut connection, config)?;
    Ok(connection)
}

fn schema_version(connection: &Connection) -> rusqlite::Result<i64> {
    connection.query_row("PRAGMA user_version", [], |row| row.get(0))
}

fn too_new(config: &SqliteConfig, found: i64) -> PluginError {
    PluginError::new(
        ErrorCode::UNSUPPORTED,
        format!(
            "`{}` has comms schema version {found}, newer than version {SCHEMA_VERSION} that comms-sqlite {} \
             knows: upgrade the plugin on this node (the file was left untouched)",
            config.path_text(),
            env!("CARGO_PKG_VERSION")
        ),
    )
}

/// Applies the missing migrations, or refuses a newer schema.
fn migrate(connection: &mut Connection, config: &SqliteConfig) -> Result<(), PluginError> {
    let found =
        schema_version(connection).map_err(|error| db_error("reading the schema version", config, error))?;
    if found > SCHEMA_VERSION {
        return Err(too_new(config, found));
    }
    if found == SCHEMA_VERSION {
        return Ok(());
    }
    let failed = |error| db_error("migrating the schema", config, error);
    let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate).map_err(failed)?;
    // Another process may have migrated it while this one waited for the lock.
    let found = schema_version(&transaction).map_err(failed)?;
    if found > SCHEMA_VERSION {
        return Err(too_new(config, found));
    }
    for migration in &MIGRATIONS[found as usize..] {
        transaction.execute_batch(migration).map_err(failed)?;
    }
    transaction.execute_batch(&format!("PRAGMA user_version = {SCHEMA_VERSION}")).map_err(failed)?;
    transaction.commit().map_err(failed)?;
    tracing::info!(path = %config.path_text(), from = found, to = SCHEMA_VERSION, "comms schema migrated");
    Ok(())
}
