//! `Discovery::find_service` (contract 1.2): a node asked to call a service it knows no provider
//! of asks its discovery to look the providers up, learns the records it returns, and calls one.
//! The discovery here reports no peer at all; only its lookup can find the server.

use comms_host::{request_response::RequestOptions, Node, PluginLibrary, Received};
use comms_plugin_api::{
    async_trait, Discovery, NodeId, NodeRecord, PeerEvent, Plugin, PluginError, Provides, Setup,
};
use comms_tests::artifacts;
use std::{
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

/// What the lookup returns, and the services it was asked for.
#[derive(Default)]
struct Directory {
    providers: Vec<NodeRecord>,
    asked: Vec<String>,
}

fn directory() -> &'static Mutex<Directory> {
    static DIRECTORY: OnceLock<Mutex<Directory>> = OnceLock::new();
    DIRECTORY.get_or_init(Mutex::default)
}

/// A discovery that knows nobody until asked for a service (as a DHT).
struct LookupOnly;

#[async_trait]
impl Discovery for LookupOnly {
    async fn announce(&self, _record: NodeRecord) -> Result<(), PluginError> {
        Ok(())
    }
    async fn withdraw(&self, _node: NodeId) -> Result<(), PluginError> {
        Ok(())
    }
    async fn peers(&self) -> Result<Vec<NodeRecord>, PluginError> {
        Ok(Vec::new())
    }
    async fn next_event(&self) -> Result<Option<PeerEvent>, PluginError> {
        std::future::pending().await
    }
    async fn close(&self) -> Result<(), PluginError> {
        Ok(())
    }
    async fn find_service(&self, service: &str) -> Result<Vec<NodeRecord>, PluginError> {
        let mut directory = directory().lock().unwrap();
        directory.asked.push(service.to_string());
        Ok(directory
            .providers
            .iter()
            .filter(|record| record.services.iter().any(|s| s == service))
            .cloned()
            .collect())
    }
}

struct LookupOnlyPlugin;

#[async_trait]
impl Plugin for LookupOnlyPlugin {
    const NAME: &'static str = "lookup-only";
    const VERSION: &'static str = "0.1.0";
    const DESCRIPTION: &'static str = "test discovery: knows providers only when asked";
    const PROVIDES: Provides = Provides::DISCOVERY;
    async fn new_discovery(_setup: Setup) -> Result<Arc<dyn Discovery>, PluginError> {
        Ok(Arc::new(LookupOnly))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_nobody_reported_is_looked_up_and_called() {
    let tcp = PluginLibrary::load(&artifacts().tcp_plugin).unwrap();
    let server =
        Node::builder("lookup-server").transport_library("tcp", tcp.clone(), "").build().await.unwrap();
    server
        .serve("echo", |request: Received<String>| async move { Ok::<_, String>(request.message) })
        .await
        .unwrap();
    let mut record = NodeRecord::new("lookup-server");
    record.addresses = vec![("tcp".into(), server.transports()[0].local_address.clone())];
    record.services = vec!["echo".into()];
    directory().lock().unwrap().providers.push(record);

    let client = Node::builder("lookup-client")
        .transport_library("tcp", tcp, "")
        .discovery_library(PluginLibrary::linked::<LookupOnlyPlugin>(), "")
        .request_options(RequestOptions {
            timeout: Duration::from_secs(2),
            attempts: 1,
            ..RequestOptions::default()
        })
        .build()
        .await
        .unwrap();
    let answer: String = client.request("echo", "found by lookup").await.unwrap();
    assert_eq!(answer, "found by lookup");
    assert_eq!(directory().lock().unwrap().asked, ["echo"], "one lookup, for the service called");

    // A service nobody provides: looked up, not found, and the request fails as before.
    let missing = client.request::<_, String>("nobody", "hello?").await.unwrap_err();
    assert!(missing.to_string().contains("nobody"), "{missing}");
    assert_eq!(directory().lock().unwrap().asked, ["echo", "nobody"]);
    client.close().await.unwrap();
    server.close().await.unwrap();
}
