//! Node security from the outside: `comms keygen`, node ids derived from key files, the
//! `[security]` config errors, and nodes refused because a transport cannot encrypt its links.

use comms_host::{BuildError, Node, PluginLibrary, Security, SignatureMode};
use comms_plugin_api::security::{identity::hex_encode, Identity, LinkMode, PublicKey};
use comms_tests::{artifacts, broker_available, scratch_dir, write_config};
use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
};

fn comms(args: &[&str], dir: &Path) -> std::process::Output {
    Command::new(&artifacts().comms_bin).args(args).current_dir(dir).output().expect("run comms")
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// The secret key hex of a key file (what must never be printed).
fn secret_of(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let line = text.lines().find(|l| l.starts_with("secret_key")).expect("a secret_key line");
    line.split('"').nth(1).unwrap().to_string()
}

/// A fresh key file in `dir`, written by the library (owner-only).
fn key_file(dir: &Path, name: &str) -> (PathBuf, Identity) {
    let path = dir.join(name);
    let identity = Identity::generate();
    identity.save_new(&path).unwrap();
    (path, identity)
}

fn build_error(result: Result<Node, BuildError>) -> String {
    match result {
        Ok(node) => panic!("node {} started, but it should have been refused", node.id()),
        Err(error) => error.to_string(),
    }
}

/// A memory transport table whose address is unique to this test process and `name`.
fn memory_table(name: &str) -> String {
    format!(
        "[transports.memory]\npath = \"{}\"\naddress = \"memory://security-{}-{name}\"\n",
        artifacts().memory_plugin.display(),
        std::process::id()
    )
}

#[test]
fn keygen_writes_an_owner_only_key_and_prints_only_the_public_half() {
    let dir = scratch_dir("keygen");
    let output = comms(&["keygen", "--out", "alice.key", "--label", "alice"], &dir);
    assert!(output.status.success(), "{output:?}");
    let path = dir.join("alice.key");
    assert_eq!(mode(&path), 0o600);
    let identity = Identity::load(&path).expect("a loadable key file");
    let stdout = String::from_utf8(output.stdout).unwrap();
    let secret = secret_of(&path);
    assert_eq!(secret, hex_encode(&identity.secret_bytes()));
    assert!(stdout.contains(&identity.public_key().to_hex()), "{stdout}");
    assert!(stdout.contains(identity.node_id(Some("alice")).as_str()), "{stdout}");
    assert!(!stdout.contains(&secret) && !String::from_utf8_lossy(&output.stderr).contains(&secret));

    // Never overwrites.
    let again = comms(&["keygen", "--out", "alice.key"], &dir);
    assert!(!again.status.success());
    assert_eq!(Identity::load(&path).unwrap().public_key(), identity.public_key(), "key file unchanged");

    // --show prints the public half of an existing file, never the secret.
    let shown = comms(&["keygen", "--show", "alice.key"], &dir);
    assert!(shown.status.success(), "{shown:?}");
    let shown = String::from_utf8(shown.stdout).unwrap();
    assert!(shown.contains(&identity.public_key().to_hex()) && !shown.contains(&secret), "{shown}");

    // ... and refuses a file others can read, saying how to fix it, without quoting it.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
    let refused = comms(&["keygen", "--show", "alice.key"], &dir);
    assert!(!refused.status.success());
    let stderr = String::from_utf8(refused.stderr).unwrap();
    assert!(stderr.contains("chmod 600") && !stderr.contains(&secret), "{stderr}");

    // A network key, owner-only too, never printed.
    let network = comms(&["keygen", "--network", "--out", "net.key"], &dir);
    assert!(network.status.success(), "{network:?}");
    assert_eq!(mode(&dir.join("net.key")), 0o600);
    let text = std::fs::read_to_string(dir.join("net.key")).unwrap();
    let network_key = text.lines().find(|l| l.starts_with("network_key")).unwrap().split('"').nth(1).unwrap();
    assert!(!String::from_utf8(network.stdout).unwrap().contains(network_key));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn the_node_id_is_derived_from_the_key_file() {
    let dir = scratch_dir("derived-id");
    let (_, identity) = key_file(&dir, "alice.key");
    let key = identity.public_key();
    let labelled = write_config(
        &dir,
        "alice.toml",
        &format!("[node]\nid = \"alice\"\nkey_file = \"alice.key\"\n\n{}", memory_table("labelled")),
    );
    let node = Node::from_config(&labelled).await.unwrap();
    assert_eq!(node.id().as_str(), format!("alice-{key}"));
    assert_eq!(PublicKey::of_node(node.id()), Some(key));
    node.close().await.unwrap();

    let bare = write_config(
        &dir,
        "bare.toml",
        &format!("[node]\nkey_file = \"alice.key\"\n\n{}", memory_table("bare")),
    );
    let node = Node::from_config(&bare).await.unwrap();
    assert_eq!(node.id().as_str(), key.to_hex());
    node.close().await.unwrap();

    // In code: an identity and a label.
    let node = Node::builder("carol")
        .identity(identity.clone())
        .transport_library(
            "memory",
            PluginLibrary::load(&artifacts().memory_plugin).unwrap(),
            &format!("address = \"memory://security-{}-code\"", std::process::id()),
        )
        .build()
        .await
        .unwrap();
    assert_eq!(node.id().as_str(), format!("carol-{key}"));
    node.close().await.unwrap();

    // An id bound to someone else's key is refused.
    let other = Identity::generate().node_id(Some("alice"));
    let claimed = write_config(
        &dir,
        "claimed.toml",
        &format!("[node]\nid = \"{other}\"\nkey_file = \"alice.key\"\n\n{}", memory_table("claimed")),
    );
    let error = build_error(Node::from_config(&claimed).await);
    assert!(error.contains("node.id") && error.contains("another public key"), "{error}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn security_config_errors_name_the_key_and_the_file_and_never_the_secret() {
    let dir = scratch_dir("security-errors");
    let (_, _) = key_file(&dir, "alice.key");
    let secret = secret_of(&dir.join("alice.key"));
    let case = |name: &str, node: &str, security: &str| {
        let text = format!("[node]\n{node}\n\n[security]\n{security}\n\n{}", memory_table(name));
        write_config(&dir, &format!("{name}.toml"), &text)
    };
    let expect = |error: String, path: &Path, needles: &[&str]| {
        assert!(error.contains(&path.display().to_string()), "names the file: {error}");
        for needle in needles {
            assert!(error.contains(needle), "`{needle}` missing in: {error}");
        }
        assert!(!error.contains(&secret), "{error}");
    };

    let path = case("no-id", "codec = \"json\"", "");
    expect(build_error(Node::from_config(&path).await), &path, &["node.id"]);

    let path = case("noise-no-key", "id = \"alice\"", "links = \"noise\"\nallow = [\"*\"]");
    expect(build_error(Node::from_config(&path).await), &path, &["node.key_file", "noise"]);

    let path = case("bad-allow", "id = \"alice\"\nkey_file = \"alice.key\"", "allow = [\"bob\"]");
    expect(build_error(Node::from_config(&path).await), &path, &["security.allow", "`bob`"]);

    let path = case("bad-links", "id = \"alice\"", "links = \"tls\"");
    expect(build_error(Node::from_config(&path).await), &path, &["links"]);

    let path = case("unknown", "id = \"alice\"", "signature = \"require\"");
    expect(build_error(Node::from_config(&path).await), &path, &["signature"]);

    let path = case("sign-no-key", "id = \"alice\"", "signatures = \"require\"");
    expect(build_error(Node::from_config(&path).await), &path, &["security.signatures", "node.key_file"]);

    let path = case("no-key-file", "id = \"alice\"\nkey_file = \"missing.key\"", "");
    expect(build_error(Node::from_config(&path).await), &path, &["node.key_file", "missing.key"]);

    std::fs::set_permissions(dir.join("alice.key"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let path = case("readable", "id = \"alice\"\nkey_file = \"alice.key\"", "signatures = \"sign\"");
    expect(build_error(Node::from_config(&path).await), &path, &["node.key_file", "chmod 600"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn encrypted_links_with_a_transport_that_cannot_encrypt_are_refused() {
    let dir = scratch_dir("not-encrypted");
    key_file(&dir, "alice.key");
    let path = write_config(
        &dir,
        "alice.toml",
        &format!(
            "[node]\nid = \"alice\"\nkey_file = \"alice.key\"\n\n[security]\nlinks = \"noise\"\nallow = [\"*\"]\n\n{}",
            memory_table("refused")
        ),
    );
    let error = build_error(Node::from_config(&path).await);
    assert!(
        error.contains("transport `memory` does not encrypt its links")
            && error.contains("security.links = \"plain\""),
        "{error}"
    );
    // The same node with plain links starts: nothing else was wrong.
    let plain = std::fs::read_to_string(&path).unwrap().replace("\"noise\"", "\"plain\"");
    let plain_path = write_config(&dir, "plain.toml", &plain);
    Node::from_config(&plain_path).await.unwrap().close().await.unwrap();

    // Built in code, the same rule.
    let security = Security { links: LinkMode::Noise, allow: vec!["*".into()], ..Security::default() };
    let error = build_error(
        Node::builder("alice")
            .key_file(dir.join("alice.key"))
            .security(security)
            .transport_library(
                "memory",
                PluginLibrary::load(&artifacts().memory_plugin).unwrap(),
                &format!("address = \"memory://security-{}-code-refused\"", std::process::id()),
            )
            .build()
            .await,
    );
    assert!(error.contains("does not encrypt its links"), "{error}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_plain_redis_url_is_refused_for_encrypted_links_with_the_fix() {
    if !broker_available("Redis", "127.0.0.1:6379") {
        return;
    }
    let dir = scratch_dir("redis-plain");
    key_file(&dir, "alice.key");
    let path = write_config(
        &dir,
        "alice.toml",
        &format!(
            "[node]\nid = \"alice\"\nkey_file = \"alice.key\"\n\n[security]\nlinks = \"noise\"\nallow = [\"*\"]\n\n\
             [transports.redis]\npath = \"{}\"\nurl = \"redis://127.0.0.1:6379\"\nprefix = \"comms-test-{}-plain\"\n",
            artifacts().redis_plugin.display(),
            std::process::id()
        ),
    );
    let error = build_error(Node::from_config(&path).await);
    assert!(
        error.contains("transport `redis` does not encrypt its links: use a rediss:// URL, or set security.links = \"plain\""),
        "{error}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn signatures_in_code_need_an_identity() {
    let security = Security { signatures: SignatureMode::Sign, ..Security::default() };
    let error = build_error(
        Node::builder("alice")
            .security(security)
            .transport_library(
                "memory",
                PluginLibrary::load(&artifacts().memory_plugin).unwrap(),
                &format!("address = \"memory://security-{}-unsigned\"", std::process::id()),
            )
            .build()
            .await,
    );
    assert!(error.contains("security.signatures") && error.contains("(builder)"), "{error}");
}

/// Writes `<label>.key` and a config with Noise links over tcp listening on `listen`, allowing
/// `allow`, knowing `peers` (node id, tcp address). Returns the node id it will have.
fn noise_node(
    dir: &Path,
    label: &str,
    identity: &Identity,
    listen: &str,
    allow: &[String],
    peers: &[(String, &str)],
) -> String {
    identity.save_new(&dir.join(format!("{label}.key"))).unwrap();
    let allow: Vec<String> = allow.iter().map(|entry| format!("\"{entry}\"")).collect();
    let peers: Vec<String> = peers
        .iter()
        .map(|(id, address)| format!("{{ id = \"{id}\", addresses = {{ tcp = \"{address}\" }} }}"))
        .collect();
    let text = format!(
        "[node]\nid = \"{label}\"\nkey_file = \"{label}.key\"\nplugin_dirs = [{:?}]\n\n\
         [security]\nlinks = \"noise\"\nallow = [{}]\n\n\
         [transports.tcp]\nlisten = \"{listen}\"\n\n\
         [discovery]\npeers = [{}]\n",
        artifacts().plugin_dir,
        allow.join(", "),
        peers.join(", ")
    );
    write_config(dir, &format!("{label}.toml"), &text);
    identity.node_id(Some(label)).to_string()
}

#[test]
fn noise_links_from_config_files_carry_allowed_peers_and_refuse_others() {
    let dir = scratch_dir("noise-config");
    let (alice, bob, mallory) = (Identity::generate(), Identity::generate(), Identity::generate());
    let (alice_address, bob_address, mallory_address) =
        (comms_tests::free_address(), comms_tests::free_address(), comms_tests::free_address());
    let (alice_id, bob_id) = (alice.node_id(Some("alice")).to_string(), bob.node_id(Some("bob")).to_string());
    // Bob allows alice (by key) only; mallory allows bob and knows where he is.
    noise_node(
        &dir,
        "bob",
        &bob,
        &bob_address,
        &[alice.public_key().to_hex()],
        &[(alice_id.clone(), &alice_address)],
    );
    let allow_bob = [bob_id.clone()];
    noise_node(&dir, "alice", &alice, &alice_address, &allow_bob, &[(bob_id.clone(), &bob_address)]);
    noise_node(&dir, "mallory", &mallory, &mallory_address, &allow_bob, &[(bob_id.clone(), &bob_address)]);

    let bob_log = dir.join("bob.log");
    let receiver = Command::new(&artifacts().comms_bin)
        .args(["recv", "--count", "2", "--config", "bob.toml"])
        .current_dir(&dir)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&bob_log).unwrap())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while !std::fs::read_to_string(&bob_log).unwrap().contains("(links encrypted)") {
        let log = std::fs::read_to_string(&bob_log).unwrap();
        assert!(started.elapsed() < std::time::Duration::from_secs(20), "bob did not start encrypted: {log}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // Mallory first: had it got through, it would be one of the two lines bob prints.
    let _ = comms(&["send", "--config", "mallory.toml", "--to", &bob_id, "from mallory"], &dir);
    for n in 1..=2 {
        let sent =
            comms(&["send", "--config", "alice.toml", "--to", &bob_id, &format!("from alice {n}")], &dir);
        assert!(sent.status.success(), "{sent:?}");
    }
    let output = receiver.wait_with_output().unwrap();
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert_eq!(stdout, "from alice 1\nfrom alice 2\n", "only alice's messages arrive");
    let log = std::fs::read_to_string(&bob_log).unwrap();
    assert!(
        log.contains(&mallory.public_key().to_hex()) && log.contains("not allowed"),
        "bob logs the refused key: {log}"
    );
    for key in [&alice, &bob, &mallory] {
        assert!(!log.contains(&hex_encode(&key.secret_bytes())), "a secret key in the log");
    }

    // The same config files in process: request / response over the encrypted links.
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        let bob = Node::from_config(dir.join("bob.toml")).await.unwrap();
        let alice = Node::from_config(dir.join("alice.toml")).await.unwrap();
        let encrypted = comms_plugin_api::Capabilities::ENCRYPTED;
        assert!(alice.transports()[0].capabilities.contains(encrypted));
        bob.serve("echo", |request: comms_host::Received<String>| async move {
            Ok::<_, String>(format!("echo: {}", request.message))
        })
        .await
        .unwrap();
        let wait = std::time::Duration::from_secs(10);
        let started = tokio::time::Instant::now();
        while !alice.peers().iter().any(|peer| peer.record.services.iter().any(|s| s == "echo")) {
            assert!(started.elapsed() < wait, "alice never learned of bob's service");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let answer: String = tokio::time::timeout(wait, alice.request("echo", "hi")).await.unwrap().unwrap();
        assert_eq!(answer, "echo: hi");
        alice.close().await.unwrap();
        bob.close().await.unwrap();
    });
    std::fs::remove_dir_all(&dir).unwrap();
}
