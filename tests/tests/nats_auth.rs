//! The NATS plugin against servers that demand credentials or TLS: a `nats-server` of the test's
//! own, started with `--user`/`--pass`, with `--auth` (a token), and with `--tls` and a
//! certificate for `localhost` signed by a CA made here.
//!
//! With the right credentials (or the CA, `ca_file`) a message goes from one node's transport
//! to another's. With the wrong ones, the start fails at once (no retries: a retry cannot fix a
//! refused password or an untrusted certificate), says what to check, and never shows the
//! secret.

#[path = "support/nats.rs"]
mod support;
#[path = "support/tls_ca.rs"]
mod tls_ca;

use comms_plugin_api::{host_side::PluginLibrary, ErrorCode, NodeId};
use comms_tests::{
    artifacts,
    connecting::{self, RETRYING_START},
    scratch_dir,
};
use support::OwnNats;
use tls_ca::TestCa;

const PASSWORD: &str = "pw-n3ver-shown";
const TOKEN: &str = "t0ken-n3ver-shown";
/// A message goes through a pair of transports opened with `config`.
async fn one_message_goes_through(library: &PluginLibrary, config: &str) {
    let (sender, receiver) = connecting::one_message_goes_through(library, "nats", config).await;
    sender.close().await.unwrap();
    receiver.close().await.unwrap();
}

/// Opening with `config` is refused at once, with `hint` in the error and no secret.
async fn refused_at_once(library: &PluginLibrary, config: &str, hint: &str) {
    let error = connecting::refused_at_once(library, "nats", config).await;
    assert!(error.message.contains("refused the connection"), "{error}");
    assert!(error.message.contains(hint), "the error says what to check ({hint}): {error}");
    for secret in [PASSWORD, TOKEN, "wrong-pw", "wrong-token"] {
        assert!(!error.message.contains(secret), "a secret leaked: {error}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_and_password_are_required_and_a_wrong_password_is_refused_without_showing_it() {
    let dir = scratch_dir("nats-auth-user");
    let Some(nats) = OwnNats::start_with(&dir, &["--user", "comms", "--pass", PASSWORD]) else { return };
    let library = PluginLibrary::load(artifacts().nats_plugin()).unwrap_or_else(|error| panic!("{error}"));
    let url = nats.url();

    let right = format!("url = \"{url}\"\nuser = \"comms\"\npassword = \"{PASSWORD}\"\n{RETRYING_START}");
    one_message_goes_through(&library, &right).await;
    // The same credentials in the URL.
    let in_url = format!("url = \"nats://comms:{PASSWORD}@127.0.0.1:{}\"\n{RETRYING_START}", nats.port());
    one_message_goes_through(&library, &in_url).await;

    let hint = "check `creds_file`, `user`/`password` or `token`";
    let wrong = format!("url = \"{url}\"\nuser = \"comms\"\npassword = \"wrong-pw\"\n{RETRYING_START}");
    refused_at_once(&library, &wrong, hint).await;
    let wrong_in_url = format!("url = \"nats://comms:wrong-pw@127.0.0.1:{}\"\n{RETRYING_START}", nats.port());
    refused_at_once(&library, &wrong_in_url, hint).await;
    refused_at_once(&library, &format!("url = \"{url}\"\n{RETRYING_START}"), hint).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_is_required_and_a_wrong_one_is_refused_without_showing_it() {
    let dir = scratch_dir("nats-auth-token");
    let Some(nats) = OwnNats::start_with(&dir, &["--auth", TOKEN]) else { return };
    let library = PluginLibrary::load(artifacts().nats_plugin()).unwrap_or_else(|error| panic!("{error}"));
    let url = nats.url();
    one_message_goes_through(&library, &format!("url = \"{url}\"\ntoken = \"{TOKEN}\"\n{RETRYING_START}"))
        .await;
    // NATS's convention: a user name alone in the URL is a token.
    let in_url = format!("url = \"nats://{TOKEN}@127.0.0.1:{}\"\n{RETRYING_START}", nats.port());
    one_message_goes_through(&library, &in_url).await;
    let hint = "check `creds_file`, `user`/`password` or `token`";
    refused_at_once(&library, &format!("url = \"{url}\"\ntoken = \"wrong-token\"\n{RETRYING_START}"), hint)
        .await;
    let wrong_in_url = format!("url = \"nats://wrong-token@127.0.0.1:{}\"\n{RETRYING_START}", nats.port());
    refused_at_once(&library, &wrong_in_url, hint).await;
    // Credentials given twice are a config error, named as such.
    let twice = format!("url = \"nats://{TOKEN}@127.0.0.1:{}\"\ntoken = \"{TOKEN}\"\n", nats.port());
    let error =
        library.new_transport(&NodeId::new("twice"), "nats", &twice).await.map(drop).expect_err("refused");
    assert_eq!(error.code, ErrorCode::INVALID_CONFIG, "{error}");
    assert!(error.message.contains("give them once") && !error.message.contains(TOKEN), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_the_servers_ca_goes_through_and_without_it_is_refused() {
    let dir = scratch_dir("nats-tls");
    let ca = TestCa::new("comms NATS test CA");
    let (certificate, key) = ca.write_localhost_files(&dir);
    let (certificate, key) = (certificate.display().to_string(), key.display().to_string());
    let options = [
        "--tls",
        "--tlscert",
        certificate.as_str(),
        "--tlskey",
        key.as_str(),
        "--user",
        "comms",
        "--pass",
        PASSWORD,
    ];
    let Some(nats) = OwnNats::start_with(&dir, &options) else { return };
    let library = PluginLibrary::load(artifacts().nats_plugin()).unwrap_or_else(|error| panic!("{error}"));
    let ca_file = ca.write_pem(&dir, "ca.pem");
    let credentials = format!("user = \"comms\"\npassword = \"{PASSWORD}\"\n{RETRYING_START}");

    // The certificate names `localhost`: the URL must too.
    let url = format!("tls://localhost:{}", nats.port());
    one_message_goes_through(&library, &format!("url = \"{url}\"\nca_file = {ca_file:?}\n{credentials}"))
        .await;
    let nats_url = format!("nats://localhost:{}", nats.port());
    one_message_goes_through(
        &library,
        &format!("url = \"{nats_url}\"\nca_file = {ca_file:?}\n{credentials}"),
    )
    .await;

    // The system's roots do not know this CA; another CA does not either.
    let hint = "TLS failed: check `ca_file`";
    refused_at_once(&library, &format!("url = \"{url}\"\n{credentials}"), hint).await;
    let other_ca = TestCa::new("another CA").write_pem(&dir, "other-ca.pem");
    refused_at_once(&library, &format!("url = \"{url}\"\nca_file = {other_ca:?}\n{credentials}"), hint).await;
}
