//! The plugin's tables in their schema, and the versioned migrations that create them.
//!
//! The schema version is the one row of `<schema>.comms_schema_version`. Opening applies the
//! migrations the schema lacks, in one transaction under an advisory lock (so two processes
//! opening a new schema at once do not both migrate it), and refuses a schema whose version is
//! newer than this plugin knows, leaving it untouched.

use crate::link::{db_error, Link};
use comms_plugin_api::{ErrorCode, PluginError};
use tokio_postgres::{Client, GenericClient};

/// Migration `i` takes the schema from version `i` to `i + 1`; `{schema}` stands for the
/// schema's name (validated: letters, digits and `_`, so it is safe inside quotes and literals).
/// Append only: a released migration is never edited.
const MIGRATIONS: &[&str] = &[
    // Version 1.
    r#"
CREATE TABLE "{schema}".comms_mailbox (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    recipient    text        NOT NULL,
    envelope     bytea       NOT NULL,
    enqueued_at  timestamptz NOT NULL DEFAULT now(),
    attempts     integer     NOT NULL DEFAULT 0,
    locked_until timestamptz NOT NULL DEFAULT '-infinity',
    owner        text,
    replace_key  text
);
CREATE INDEX comms_mailbox_by_recipient ON "{schema}".comms_mailbox (recipient, id);
CREATE INDEX comms_mailbox_by_owner ON "{schema}".comms_mailbox (owner) WHERE owner IS NOT NULL;
CREATE INDEX comms_mailbox_replaceable ON "{schema}".comms_mailbox (recipient, replace_key)
    WHERE replace_key IS NOT NULL;
CREATE TABLE "{schema}".comms_dead_letter (
    id          bigint      PRIMARY KEY,
    recipient   text        NOT NULL,
    envelope    bytea       NOT NULL,
    enqueued_at timestamptz NOT NULL,
    attempts    integer     NOT NULL,
    dead_at     timestamptz NOT NULL DEFAULT now(),
    reason      text        NOT NULL
);
CREATE TABLE "{schema}".comms_subscription (
    node_id       text        NOT NULL,
    pattern       text        NOT NULL,
    pattern_regex text        NOT NULL,
    subscribed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (node_id, pattern)
);
CREATE TABLE "{schema}".comms_registry (
    node_id      text        PRIMARY KEY,
    record       text        NOT NULL,
    heartbeat_at timestamptz NOT NULL,
    offline      boolean     NOT NULL DEFAULT false
);

-- The channel a receiver of node `recipient` listens on: one per node, so a message wakes its
-- receivers only; md5 keeps it within PostgreSQL's 63-byte limit on channel names.
CREATE FUNCTION "{schema}".comms_mailbox_channel(recipient text) RETURNS text
    LANGUAGE sql IMMUTABLE STRICT
    AS $$ SELECT 'comms_' || md5('{schema}/' || recipient) $$;

-- A row that can be claimed (new, or set free again) wakes its node's receivers when the
-- transaction commits, whoever wrote it: the outbox functions below, or any program. Not the
-- plugin's own connections (they set comms.notify = off): a transaction that notifies holds
-- PostgreSQL's notification lock from its commit until its WAL is flushed, which serialises
-- every such commit in the database, so the plugin writes first and notifies in a transaction
-- of its own that writes nothing (and so flushes nothing).
CREATE FUNCTION "{schema}".comms_mailbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify("{schema}".comms_mailbox_channel(NEW.recipient), '');
    RETURN NULL;
END $$;
CREATE TRIGGER comms_mailbox_notify AFTER INSERT OR UPDATE OF owner ON "{schema}".comms_mailbox
    FOR EACH ROW WHEN (NEW.owner IS NULL AND current_setting('comms.notify', true) IS DISTINCT FROM 'off')
    EXECUTE FUNCTION "{schema}".comms_mailbox_notify();

-- The registry's watchers are woken when a record appears, changes or goes (not by heartbeats).
CREATE FUNCTION "{schema}".comms_registry_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('comms_registry_' || md5('{schema}'), '');
    RETURN NULL;
END $$;
CREATE TRIGGER comms_registry_changed AFTER INSERT OR DELETE ON "{schema}".comms_registry
    FOR EACH ROW EXECUTE FUNCTION "{schema}".comms_registry_notify();
CREATE TRIGGER comms_registry_updated AFTER UPDATE ON "{schema}".comms_registry
    FOR EACH ROW WHEN (OLD.record IS DISTINCT FROM NEW.record OR OLD.offline IS DISTINCT FROM NEW.offline)
    EXECUTE FUNCTION "{schema}".comms_registry_notify();

-- The transactional outbox: the wire encoding (docs/wire.md) in SQL, so that any client can
-- write a comms message in its own transaction.
CREATE FUNCTION "{schema}".comms_wire_str(value text) RETURNS bytea
    LANGUAGE plpgsql IMMUTABLE STRICT AS $$
DECLARE
    bytes bytea := convert_to(value, 'UTF8');
BEGIN
    IF length(bytes) > 65535 THEN
        RAISE EXCEPTION 'comms: a text of % bytes does not fit the wire format (at most 65535)', length(bytes);
    END IF;
    RETURN substring(int4send(length(bytes)) FROM 3 FOR 2) || bytes;
END $$;

CREATE FUNCTION "{schema}".comms_envelope(
    destination_kind integer, destination text, sender text, payload bytea,
    headers text[] DEFAULT '{}', message_id uuid DEFAULT gen_random_uuid()
) RETURNS bytea LANGUAGE plpgsql AS $$
DECLARE
    encoded bytea;
    pairs integer := coalesce(cardinality(headers), 0) / 2;
BEGIN
    IF destination_kind NOT IN (0, 1, 2) THEN
        RAISE EXCEPTION 'comms: destination_kind must be 0 (node), 1 (topic) or 2 (service)';
    END IF;
    IF coalesce(array_ndims(headers), 1) <> 1 OR coalesce(cardinality(headers), 0) % 2 <> 0 THEN
        RAISE EXCEPTION 'comms: headers must be a flat array of name, value, name, value ...';
    END IF;
    encoded := '\x01'::bytea || uuid_send(message_id) || set_byte('\x00'::bytea, 0, destination_kind)
        || "{schema}".comms_wire_str(destination) || "{schema}".comms_wire_str(sender)
        || '\x00'::bytea || substring(int4send(pairs) FROM 3 FOR 2);
    FOR i IN 1 .. pairs LOOP
        encoded := encoded || "{schema}".comms_wire_str(headers[2 * i - 1])
            || "{schema}".comms_wire_str(headers[2 * i]);
    END LOOP;
    RETURN encoded || int4send(length(payload)) || payload;
END $$;

CREATE FUNCTION "{schema}".comms_send(
    recipient text, payload bytea, headers text[] DEFAULT '{}', sender text DEFAULT 'sql'
) RETURNS uuid LANGUAGE plpgsql AS $$
DECLARE
    message_id uuid := gen_random_uuid();
BEGIN
    INSERT INTO "{schema}".comms_mailbox (recipient, envelope)
    VALUES (recipient, "{schema}".comms_envelope(0, recipient, sender, payload, headers, message_id));
    RETURN message_id;
END $$;

CREATE FUNCTION "{schema}".comms_publish(
    topic text, payload bytea, headers text[] DEFAULT '{}', sender text DEFAULT 'sql'
) RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    encoded bytea := "{schema}".comms_envelope(1, topic, sender, payload, headers);
    written integer;
BEGIN
    INSERT INTO "{schema}".comms_mailbox (recipient, envelope)
    SELECT DISTINCT s.node_id, encoded FROM "{schema}".comms_subscription s
    WHERE topic ~ s.pattern_regex;
    GET DIAGNOSTICS written = ROW_COUNT;
    RETURN written;
END $$;
"#,
    // Version 2: a topic copy names the subscription it was written for (the recipient's
    // matching pattern, the first in byte order when several match). A receiver claims it only
    // once its instance has subscribed to that pattern again, so that the copies written while a
    // node was away wait for the application's subscription instead of arriving before it and
    // being dropped as publications nobody subscribes to. NULL (direct messages, rows written
    // before this version or by programs that do not set it): claimed at once, as before.
    r#"
ALTER TABLE "{schema}".comms_mailbox ADD COLUMN pattern text;

CREATE OR REPLACE FUNCTION "{schema}".comms_publish(
    topic text, payload bytea, headers text[] DEFAULT '{}', sender text DEFAULT 'sql'
) RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    encoded bytea := "{schema}".comms_envelope(1, topic, sender, payload, headers);
    written integer;
BEGIN
    INSERT INTO "{schema}".comms_mailbox (recipient, envelope, pattern)
    SELECT s.node_id, encoded, min(s.pattern COLLATE "C") FROM "{schema}".comms_subscription s
    WHERE topic ~ s.pattern_regex GROUP BY s.node_id;
    GET DIAGNOSTICS written = ROW_COUNT;
    RETURN written;
END $$;
"#,
    // Version 3: no index on `owner`. Every claim sets `owner` on the rows it takes, so the
    // index took a new entry for each claimed row (and a dead one once the row was settled):
    // work on every message for a statement that runs once per transport instance, at its close
    // (`release`, which now finds the instance's rows through `recipient`, as claims do).
    // Without it a node takes messages from a backlog about 15 % faster (benchmark `postgres`,
    // subscribe: 0.97 of raw tokio-postgres against 0.85, docs/benchmarks.md).
    r#"
DROP INDEX IF EXISTS "{schema}".comms_mailbox_by_owner;
"#,
];

/// The schema version this plugin writes and reads.
pub const SCHEMA_VERSION: i32 = MIGRATIONS.len() as i32;

/// `pg_advisory_xact_lock(MIGRATION_LOCK, hashtext(schema))`: serialises migrations per schema.
const MIGRATION_LOCK: i32 = 0x636f_6d6d; // "comm"

fn too_new(link: &Link, schema: &str, found: i32) -> PluginError {
    PluginError::new(
        ErrorCode::UNSUPPORTED,
        format!(
            "schema `{schema}` on {} has comms schema version {found}, newer than version {SCHEMA_VERSION} \
             that comms-postgres {} knows: upgrade the plugin on this node (the schema was left untouched)",
            link.described(),
            env!("CARGO_PKG_VERSION")
        ),
    )
}

async fn read_version<C: GenericClient>(
    client: &C,
    schema: &str,
) -> Result<Option<i32>, tokio_postgres::Error> {
    let table = format!("\"{schema}\".comms_schema_version");
    let exists = client.query_one("SELECT to_regclass($1) IS NOT NULL", &[&table]).await?;
    if !exists.get::<_, bool>(0) {
        return Ok(None);
    }
    let row = client.query_one(&format!("SELECT max(version) FROM {table}"), &[]).await?;
    Ok(row.get::<_, Option<i32>>(0))
}

/// Brings `schema` to [`SCHEMA_VERSION`] (creating it if missing), or refuses a newer one.
/// Runs on a connection of its own, which it may use for a transaction.
pub(crate) async fn migrate(link: &Link, client: &mut Client, schema: &str) -> Result<(), PluginError> {
    let failed = |error| db_error(link, &format!("migrating schema `{schema}`"), error);
    match read_version(client, schema).await.map_err(failed)? {
        Some(found) if found == SCHEMA_VERSION => return Ok(()),
        Some(found) if found > SCHEMA_VERSION => return Err(too_new(link, schema, found)),
        _ => {}
    }
    let transaction = client.transaction().await.map_err(failed)?;
    transaction
        .execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", &[&MIGRATION_LOCK, &schema])
        .await
        .map_err(failed)?;
    transaction
        .batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS \"{schema}\";
             CREATE TABLE IF NOT EXISTS \"{schema}\".comms_schema_version (version integer NOT NULL);"
        ))
        .await
        .map_err(failed)?;
    // Another process may have migrated it while this one waited for the lock.
    let found = read_version(&transaction, schema).await.map_err(failed)?.unwrap_or(0);
    if found > SCHEMA_VERSION {
        return Err(too_new(link, schema, found));
    }
    if found == SCHEMA_VERSION {
        return Ok(());
    }
    for migration in &MIGRATIONS[found as usize..] {
        transaction.batch_execute(&migration.replace("{schema}", schema)).await.map_err(failed)?;
    }
    transaction
        .batch_execute(&format!(
            "DELETE FROM \"{schema}\".comms_schema_version;
             INSERT INTO \"{schema}\".comms_schema_version (version) VALUES ({SCHEMA_VERSION});"
        ))
        .await
        .map_err(failed)?;
    transaction.commit().await.map_err(failed)?;
    tracing::info!(schema, from = found, to = SCHEMA_VERSION, "comms schema migrated");
    Ok(())
}
