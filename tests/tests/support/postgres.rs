//! What the PostgreSQL tests share, included by each of them with `#[path =
//! "support/postgres.rs"] mod support;`: psql on the test database, and a schema of a test's own,
//! dropped when the test ends.
//!
//! In a subdirectory, so that cargo does not take it for a test target of its own.
#![allow(dead_code)]

use comms_tests::POSTGRES;
use std::process::Command;

/// Runs `sql` with psql on the test database and returns its output (unaligned, tuples only);
/// panics with psql's error if it fails.
pub(crate) fn psql(sql: &str) -> String {
    let output = Command::new("psql")
        .args(["-h", "127.0.0.1", "-U", "postgres", "-d", "test", "-X", "-q", "-t", "-A"])
        .args(["-v", "ON_ERROR_STOP=1", "-c", sql])
        .output()
        .expect("run psql");
    assert!(output.status.success(), "psql -c {sql}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

/// A schema of this test's own, dropped (with everything in it) when the test ends, passed or not.
pub(crate) struct Schema(pub(crate) String);

impl Schema {
    /// A fresh name for the test `name`: unique per process and per call.
    pub(crate) fn new(name: &str) -> Self {
        Self(format!("comms_test_{}_{:06x}_{name}", std::process::id(), rand::random::<u32>() & 0xff_ffff))
    }

    /// A config table of the plugin: the test database, this schema, then `extra`.
    pub(crate) fn config(&self, extra: &str) -> String {
        format!("url = \"postgres://postgres@{POSTGRES}/test\"\nschema = \"{}\"\n{extra}", self.0)
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .args(["-h", "127.0.0.1", "-U", "postgres", "-d", "test", "-X", "-q", "-c"])
            .arg(format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.0))
            .output();
    }
}
