//! Encrypted links: a transport that declares `encrypted` under the suite's link security
//! authenticates its peers by their keys and does not put payloads on the wire in the clear.
//!
//! The suite can only check link security it configured itself (`comms check --key-file`,
//! [`SuiteConfig::with_noise_links`](crate::conformance::SuiteConfig::with_noise_links)): a
//! transport that declares `encrypted` because of its own config (TLS to a broker) has the case
//! skipped. The wire is looked at only for `ip:port` addresses, through a loopback relay.

use crate::conformance::{
    harness::{
        envelope, failed, pseudo_random_bytes, unique_name, unique_node_id, within, CaseError, CaseResult,
        Harness, Settling,
    },
    relay::Relay,
};
use comms_plugin_api::{
    security::{Identity, SETUP_KEY},
    Destination,
};
use std::{net::SocketAddr, path::PathBuf};
use tokio::time::Instant;

/// A directory removed when dropped.
struct ScratchDir(PathBuf);

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The suite's config text with the link security replaced: this key file, any peer allowed.
fn outsider_config(config_toml: &str, key_file: &std::path::Path) -> Result<String, CaseError> {
    let mut config: toml::Table = toml::from_str(config_toml)
        .map_err(|error| failed(format!("the suite's own plugin config does not parse: {error}")))?;
    let Some(toml::Value::Table(links)) = config.get_mut(SETUP_KEY) else {
        return Err(failed(format!("the suite's plugin config has no `{SETUP_KEY}` table")));
    };
    links.insert("key_file".into(), toml::Value::String(key_file.display().to_string()));
    links.insert("allow".into(), toml::Value::Array(vec![toml::Value::String("*".into())]));
    toml::to_string(&config).map_err(|error| failed(format!("writing the outsider's config failed: {error}")))
}

pub(super) async fn encrypted_links(h: &Harness) -> CaseResult {
    if !h.noise_links() {
        return Err(CaseError::Skipped(
            "the transport declares encrypted by its own config (for example TLS to a broker); the suite checks \
             encryption only with link security of its own (comms check --key-file)"
                .into(),
        ));
    }
    let limit = h.operation_limit();
    let receiver = h.open("the receiver").await?;
    let sender = h.open("the sender").await?;
    let mut inbox = h.inbox(&receiver, Settling::AcceptAll);

    // An outsider: a node with a key of its own that allows everyone, but whose key the suite's
    // nodes do not allow.
    let dir = ScratchDir(std::env::temp_dir().join(unique_name("outsider")));
    std::fs::create_dir_all(&dir.0)
        .map_err(|error| failed(format!("creating {} failed: {error}", dir.0.display())))?;
    let identity = Identity::generate();
    let key_file = dir.0.join("outsider.key");
    identity
        .save_new(&key_file)
        .map_err(|error| failed(format!("writing the outsider's key failed: {error}")))?;
    let config = outsider_config(h.config_toml(), &key_file)?;
    let node = unique_node_id("outsider", Some(&identity.public_key()));
    let outsider =
        h.open_node_with_config("an outsider (a key the others do not allow)", node, &config).await?;
    let mut outsider_inbox = h.inbox(&outsider, Settling::AcceptAll);

    let intrusion =
        envelope(&outsider, Destination::Node(receiver.node.clone()), b"from an outsider".to_vec());
    let intrusion_id = intrusion.id;
    // Refused or accepted and dropped later: either is fine, as long as nothing is delivered.
    let _ = within("a send from the outsider", limit, outsider.send(receiver.address(), intrusion)).await?;
    let leak = envelope(&sender, Destination::Node(outsider.node.clone()), b"to an outsider".to_vec());
    let _ = within("a send to the outsider", limit, sender.send(outsider.address(), leak)).await?;
    // A message between allowed nodes arrives, so that "nothing else arrived" means something.
    let own = envelope(&sender, Destination::Node(receiver.node.clone()), b"between allowed nodes".to_vec());
    let own_id = own.id;
    sender.send_to(&receiver, own).await?;
    match inbox.next_before(Instant::now() + limit).await? {
        Some(inbound) if inbound.envelope.id == own_id => {}
        Some(inbound) if inbound.envelope.id == intrusion_id => {
            return Err(failed(
                "the receiver delivered a message from a node whose key it does not allow (not on its allow-list)",
            ))
        }
        Some(_) => return Err(failed("the receiver got a message nobody sent it")),
        None => return Err(failed("a message between two allowed nodes did not arrive")),
    }
    inbox.expect_nothing("the only other message came from a node whose key it does not allow").await?;
    outsider_inbox
        .expect_nothing("its one message came from a node that does not allow the outsider's key")
        .await?;

    // On the wire, through a relay: the payload must not be readable.
    let Ok(target) = receiver.address().parse::<SocketAddr>() else {
        h.note(format!(
            "the address {} is not ip:port: what crosses the wire was not looked at",
            receiver.address()
        ));
        return Ok(());
    };
    let relay = Relay::start(target)
        .await
        .map_err(|error| failed(format!("starting a loopback relay failed: {error}")))?;
    let mut marker = b"comms conformance plaintext marker ".to_vec();
    marker.extend(pseudo_random_bytes(29, rand::random()));
    let secret = envelope(&sender, Destination::Node(receiver.node.clone()), marker.clone());
    let secret_id = secret.id;
    let through = within("a send through the relay", limit, sender.send(&relay.address(), secret)).await?;
    let arrived = match through {
        Ok(()) => inbox.next_before(Instant::now() + limit).await?,
        Err(_) => None,
    };
    match arrived {
        Some(inbound) if inbound.envelope.id == secret_id => {}
        Some(_) => return Err(failed("the receiver got a message nobody sent it")),
        None => {
            h.note(format!(
                "a message sent through a loopback relay to {target} did not arrive: what crosses the wire was not \
                 looked at"
            ));
            return Ok(());
        }
    }
    if relay.carried(&marker) {
        return Err(failed(format!(
            "a {}-byte payload crossed the link in the clear (seen in the {} bytes relayed towards the receiver)",
            marker.len(),
            relay.carried_len()
        )));
    }
    Ok(())
}
