//! Discovery with authenticated datagrams (`[security] links = "noise"`), shared by the gossip
//! and Kademlia tests: nodes with key files, a discovery loaded on its own as a watcher, and a
//! check that the watcher hears of the insiders and never of an outsider.

use crate::artifacts;
use comms_host::{Node, PluginLibrary};
use std::time::Duration;

/// A node with encrypted links (`[security] links = "noise"`, TCP) whose key file is `<label>.key`
/// in `dir`, allowing `allow` (public keys in hex), with the discovery of `library` configured
/// by `discovery`; returns it.
pub async fn noise_node(
    dir: &std::path::Path,
    label: &str,
    identity: &comms_plugin_api::security::Identity,
    allow: &[String],
    library: &PluginLibrary,
    discovery: &str,
) -> Node {
    let key_file = dir.join(format!("{label}.key"));
    identity.save_new(&key_file).unwrap();
    let security = comms_host::Security {
        links: comms_plugin_api::security::LinkMode::Noise,
        allow: allow.to_vec(),
        ..comms_host::Security::default()
    };
    let node = Node::builder(label)
        .key_file(key_file)
        .security(security)
        .transport_library(
            "tcp",
            PluginLibrary::load(&artifacts().tcp_plugin).unwrap_or_else(|error| panic!("{error}")),
            "",
        )
        .discovery_library(library.clone(), discovery)
        .build()
        .await
        .unwrap_or_else(|error| panic!("{label}: {error}"));
    assert_eq!(node.id(), &identity.node_id(Some(label)), "the node id is bound to its key");
    node
}

/// A discovery loaded on its own (instance `instance`) as node `id` with link security (an allowed member, like the
/// nodes): what the plugin itself reports, apart from what hosts learn from each other's hellos.
pub async fn noise_watcher(
    dir: &std::path::Path,
    instance: &str,
    id: &str,
    identity: &comms_plugin_api::security::Identity,
    allow: &[String],
    library: &PluginLibrary,
    discovery: &str,
) -> comms_plugin_api::host_side::LoadedDiscovery {
    let key_file = dir.join("watcher.key");
    identity.save_new(&key_file).unwrap();
    let allow: Vec<String> = allow.iter().map(|key| format!("\"{key}\"")).collect();
    let link = format!("links = \"noise\"\nkey_file = {key_file:?}\nallow = [{}]\n", allow.join(", "));
    let watcher = library
        .new_discovery_with(&comms_plugin_api::NodeId::new(id), instance, discovery, Some(&link))
        .await
        .unwrap_or_else(|error| panic!("{error}"));
    watcher.announce(comms_plugin_api::NodeRecord::new(id)).await.unwrap();
    watcher
}

/// Reads `watcher`'s events until it has heard of every one of `insiders` and of `server`
/// offering `service`; fails if any event is about `outsider`.
pub async fn watch_insiders(
    watcher: &comms_plugin_api::host_side::LoadedDiscovery,
    insiders: &[String],
    (server, service): (&str, &str),
    outsider: &str,
) {
    let mut heard = std::collections::HashSet::new();
    let mut serves = false;
    let watching = async {
        while heard.len() < insiders.len() || !serves {
            let event = watcher.next_event().await.expect("the discovery works").expect("open");
            let id = event.record.id.to_string();
            assert_ne!(id, outsider, "the watcher heard of the outsider: {event:?}");
            if insiders.contains(&id) && event.kind != comms_plugin_api::PeerEventKind::Left {
                heard.insert(id.clone());
            }
            serves |= id == server && event.record.services.iter().any(|s| s == service);
        }
    };
    if tokio::time::timeout(Duration::from_secs(20), watching).await.is_err() {
        let peers = watcher.peers().await.unwrap();
        panic!("within 20 s the watcher heard of {heard:?} of the insiders (service seen: {serves}); it knows {peers:?}");
    }
}
