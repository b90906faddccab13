//! TLS to PostgreSQL (`ca_file`), against this machine's server: Debian's PostgreSQL runs with
//! `ssl = on` and the `ssl-cert` package's self-signed certificate for `localhost`, which is
//! then its own CA.
//!
//! A link that names that certificate as `ca_file` is encrypted (the server's `pg_stat_ssl` says
//! so for every connection of the plugin) and carries messages. One with another CA, or naming
//! the server by an address the certificate does not hold, is refused at once (no retries: a
//! certificate does not get better), saying TLS failed. TLS asked for inconsistently is a
//! config error naming the key.

#[path = "support/postgres.rs"]
mod support;
#[path = "support/tls_ca.rs"]
mod tls_ca;

use comms_plugin_api::{host_side::PluginLibrary, ErrorCode, NodeId, PluginError};
use comms_tests::{
    artifacts, broker_available,
    connecting::{self, RETRYING_START},
    scratch_dir, POSTGRES,
};
use support::{psql, Schema};
use tls_ca::TestCa;

/// The server's certificate (`ssl_cert_file`), self-signed: the CA to trust.
const SERVER_CERTIFICATE: &str = "/etc/ssl/certs/ssl-cert-snakeoil.pem";

/// Whether the server speaks TLS with the certificate this test trusts; in CI it must.
fn server_tls_on() -> bool {
    let ssl = psql("SHOW ssl");
    let certificate = psql("SHOW ssl_cert_file");
    let usable =
        ssl == "on" && certificate == SERVER_CERTIFICATE && std::fs::metadata(SERVER_CERTIFICATE).is_ok();
    if !usable {
        let why = format!("PostgreSQL at {POSTGRES} has ssl = {ssl}, ssl_cert_file = {certificate}");
        assert!(std::env::var("CI").as_deref() != Ok("true"), "{why}: in CI the TLS test must not skip");
        eprintln!("SKIPPED: {why} (wanted on and {SERVER_CERTIFICATE})");
    }
    usable
}

/// `url` for host `host` on the test server's port, named `application` in `pg_stat_activity`.
fn url(host: &str, application: &str, extra: &str) -> String {
    let port = POSTGRES.rsplit_once(':').map_or("5432", |(_, port)| port);
    format!("postgres://postgres@{host}:{port}/test?application_name={application}{extra}")
}

/// Opening with `config` is refused at once, saying TLS failed over a certificate.
async fn refused_at_once(library: &PluginLibrary, config: &str) -> PluginError {
    let error = connecting::refused_at_once(library, "postgres", config).await;
    assert!(error.message.contains("TLS failed") && error.message.contains("certificate"), "{error}");
    assert!(error.message.contains("check `ca_file`"), "{error}");
    error
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_with_the_servers_ca_is_encrypted_and_a_wrong_ca_or_host_name_is_refused_at_once() {
    if !broker_available("PostgreSQL", POSTGRES) || !server_tls_on() {
        return;
    }
    let library =
        PluginLibrary::load(artifacts().postgres_plugin()).unwrap_or_else(|error| panic!("{error}"));
    let schema = Schema::new("tls");
    let name = schema.0.clone();
    let config =
        |url: &str, extra: &str| format!("url = {url:?}\nschema = {name:?}\n{RETRYING_START}{extra}");
    let trusted = format!("ca_file = {SERVER_CERTIFICATE:?}\n");

    let through_tls = config(&url("localhost", &name, ""), &trusted);
    let (sender, receiver) = connecting::one_message_goes_through(&library, "postgres", &through_tls).await;

    // The server's view: every connection of the plugin (named by application_name) is TLS.
    let count = |ssl: &str| {
        psql(&format!(
            "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.application_name = '{name}' AND s.ssl = {ssl}"
        ))
    };
    assert_ne!(count("true"), "0", "the plugin's connections are encrypted");
    assert_eq!(count("false"), "0", "no connection of the plugin is in the clear");
    // And TLS runs over sockets the host's reactor drives (this test runs on a host runtime).
    let stats = sender.stats();
    let host_driven = stats.transport.counters.iter().find(|(name, _)| name == "io.host_driven_sockets");
    assert!(host_driven.is_some_and(|(_, count)| *count >= 2), "host-driven sockets: {host_driven:?}");
    sender.close().await.unwrap();
    receiver.close().await.unwrap();

    // Another CA; the right CA but an address the certificate does not name.
    let dir = scratch_dir("postgres-tls");
    let other_ca = TestCa::new("another CA").write_pem(&dir, "other-ca.pem");
    refused_at_once(&library, &config(&url("localhost", &name, ""), &format!("ca_file = {other_ca:?}\n")))
        .await;
    let by_address = refused_at_once(&library, &config(&url("127.0.0.1", &name, ""), &trusted)).await;
    assert!(by_address.message.contains("not valid for name"), "rustls' reason is given: {by_address}");
    eprintln!("refused: {by_address}");

    // TLS asked for inconsistently: a config error naming the key.
    let cases = [
        (config(&url("localhost", &name, "&sslmode=require"), ""), "sslmode=require"),
        (config(&url("localhost", &name, "&sslmode=disable"), &trusted), "sslmode=disable"),
        (config(&url("localhost", &name, ""), "client_cert_file = \"client.pem\"\n"), "client_key_file"),
    ];
    for (config, says) in cases {
        let error = library
            .new_transport(&NodeId::new("tls-config"), "postgres", &config)
            .await
            .map(drop)
            .expect_err("a config error");
        assert_eq!(error.code, ErrorCode::INVALID_CONFIG, "{error}");
        assert!(error.message.contains(says), "{says}: {error}");
    }
}
