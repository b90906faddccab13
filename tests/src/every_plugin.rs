//! One process with every in-tree plugin library loaded and in service, for the thread budget:
//! how many threads a node costs when it uses everything this repository ships.
//!
//! Two nodes, because a node has one discovery:
//! - `<name>-a`: the transports TCP (under the compress and chunk layers and the faults layer
//!   loaded from `libcomms_faults.so`), UDP, memory, Redis, RabbitMQ and SQLite, and gossip
//!   discovery;
//! - `<name>-b`: TCP and Kademlia discovery.
//!
//! That is the eleven libraries of `backends/`. Needs the Redis and RabbitMQ of the broker
//! tests ([`crate::REDIS`], `127.0.0.1:5672`).

use crate::{artifacts, scratch_dir, write_config};
use comms_host::Node;
use std::path::PathBuf;

const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The two running nodes and what they leave on the brokers.
#[derive(Debug)]
pub struct EveryPlugin {
    /// `<name>-a` and `<name>-b`.
    pub nodes: Vec<Node>,
    redis_prefix: String,
    amqp_queue_prefix: String,
    _dir: PathBuf,
}

impl EveryPlugin {
    /// Builds both nodes from config files, as `comms run` would.
    pub async fn start(name: &str) -> Result<Self, String> {
        let dir = scratch_dir(name);
        let artifacts = artifacts();
        let plugin_dirs = format!("plugin_dirs = [{:?}]", artifacts.plugin_dir);
        let redis_prefix = format!("comms-{name}-{}", std::process::id());
        let amqp_queue_prefix = format!("comms-{name}-{}.", std::process::id());
        let a = write_config(
            &dir,
            "a.toml",
            &format!(
                "[node]\nid = \"{name}-a\"\n{plugin_dirs}\n\n\
                 [transports.tcp]\nlisten = \"127.0.0.1:0\"\n\
                 layers = [\"compress\", \"chunk\", {{ path = {faults:?}, drop = 0.0 }}]\n\n\
                 [transports.udp]\nlisten = \"127.0.0.1:0\"\n\n\
                 [transports.memory]\naddress = \"memory://{name}-{pid}\"\n\n\
                 [transports.redis]\nurl = \"redis://{redis}\"\nprefix = {redis_prefix:?}\n\n\
                 [transports.amqp]\nurl = {AMQP_URL:?}\nqueue_prefix = {amqp_queue_prefix:?}\n\n\
                 [transports.sqlite]\ndatabase = {database:?}\n\n\
                 [discovery]\nplugin = \"gossip\"\nlisten = \"127.0.0.1:0\"\n",
                faults = artifacts.faults_plugin,
                pid = std::process::id(),
                redis = crate::REDIS,
                database = dir.join("comms.db"),
            ),
        );
        let b = write_config(
            &dir,
            "b.toml",
            &format!(
                "[node]\nid = \"{name}-b\"\n{plugin_dirs}\n\n\
                 [transports.tcp]\nlisten = \"127.0.0.1:0\"\n\n\
                 [discovery]\nplugin = \"kademlia\"\nlisten = \"127.0.0.1:0\"\n"
            ),
        );
        let mut nodes = Vec::new();
        for config in [a, b] {
            let node = Node::from_config(&config)
                .await
                .map_err(|error| format!("building the node of {}: {error}", config.display()))?;
            nodes.push(node);
        }
        Ok(Self { nodes, redis_prefix, amqp_queue_prefix, _dir: dir })
    }

    /// Closes both nodes and deletes what they left on Redis and RabbitMQ.
    pub async fn close(self) -> Result<(), String> {
        for node in &self.nodes {
            node.close().await.map_err(|error| format!("closing node {}: {error}", node.id()))?;
        }
        crate::delete_redis_keys(&self.redis_prefix).await;
        let connection =
            lapin::Connection::connect(AMQP_URL, lapin::ConnectionProperties::default())
                .await
                .map_err(|error| format!("connecting to RabbitMQ to delete the test's queue: {error}"))?;
        let channel = connection.create_channel().await.map_err(|error| error.to_string())?;
        let queue = format!("{}{}", self.amqp_queue_prefix, self.nodes[0].id());
        let _ =
            channel.queue_delete(queue.as_str().into(), lapin::options::QueueDeleteOptions::default()).await;
        let _ = connection.close(0, "done".into()).await;
        Ok(())
    }
}
