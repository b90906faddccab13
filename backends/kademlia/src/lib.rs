//! # comms-kademlia: discovery by a Kademlia DHT over UDP
//!
//! Loaded by the comms host as `libcomms_kademlia.so`. No server: every node runs one DHT node
//! on one UDP socket, joins through a few seed nodes and publishes its record in the DHT, where
//! any node can find it. Meant for networks too large for every node to hear every other
//! (multicast beacons, gossip) and without a shared broker (Redis, NATS).
//!
//! ```toml
//! [discovery]
//! plugin = "kademlia"
//! listen = "0.0.0.0:0"            # UDP address of the DHT node; default any port, every interface
//! seeds = ["10.0.0.5:4000"]       # nodes already in the network (host:port); none for the first
//! k = 20                          # bucket size and replication factor, 1..=32; default 20
//! alpha = 3                       # parallel queries per lookup, 1..=k; default 3
//! record_ttl_ms = 600000          # life of our records at other nodes; republished at half; default 10 min
//! refresh_interval_ms = 3600000   # idle buckets are refreshed this often; default 1 h
//! request_timeout_ms = 1000       # an unanswered request fails after this; default 1 s
//! find_services = ["billing"]     # services whose providers are looked up periodically
//! find_interval_ms = 30000        # how often; default 30 s
//! bootstrap_retry_ms = 2000       # seeds are pinged this often while no node is known; default 2 s
//! ```
//!
//! An unknown key is an error naming it, and so is a value out of range. Other nodes reach this
//! one at the address its datagrams come from (there is no `advertise`: behind NAT, the address
//! the seeds see is the one that works, if any).
//!
//! ## How it works
//!
//! All protocol logic is the sans-IO state machine [`node::DhtNode`] (routing table
//! [`routing_table`], lookups [`lookup`], record store [`store`], wire format [`protocol`], keys
//! [`key`]), tested by deterministic simulations of a thousand nodes with churn. The plugin
//! ([`discovery`]) only moves datagrams and wakes the state machine at its next timeout.
//!
//! - Keys are SHA-256 of a node's id and of `service:<name>`; distance is XOR.
//! - A node announces by storing its record under its node key and under the key of each
//!   service it serves, at the k nodes closest to each key, and republishes before expiry.
//! - [`Discovery::peers`](comms_plugin_api::Discovery::peers) lists the records of the nodes in
//!   this node's routing table (each new contact is asked for its own record; a node pushes its
//!   record to its contacts when it changes) and the providers of `find_services` found by
//!   lookup (kept until their time to live runs out unless found again). The discovery contract
//!   has no lookup call yet, so a service outside `find_services` is found only if a provider
//!   happens to be a contact. Events: `Joined` when a record is first known, `Updated` when it
//!   changes, `Left` when its contact stops answering (2 requests in a row) or says GOODBYE (on `withdraw` and
//!   `close`) and, for a provider found by lookup, when its record expires.
//!
//! ## Message format
//!
//! Version 1, magic byte `0xDB`, one message per datagram of at most
//! [`protocol::MAX_DATAGRAM`] bytes: PING / PONG, FIND (node or value) / FOUND, STORE / STORED,
//! GOODBYE. The byte layout is in [`protocol`]. Authenticated nodes (below) speak version 2:
//! every record signed by its node, and a trailer with the sender's id, clock and signature.
//!
//! ## Guarantees and limits
//!
//! - **Lookups**: about log2(n) hops; in the simulation of 1,000 nodes a service lookup sends
//!   about 24 FIND queries and finds every provider; after 20% of the nodes vanished and as many
//!   joined, still every live provider, and no vanished one once records expired.
//! - **Convergence**: a new provider is found by others at their next `find_interval`; a
//!   vanished node that did not say GOODBYE leaves the view of a contact when a request to it
//!   times out, and of nodes that found it by lookup when its record expires (`record_ttl_ms`).
//! - **Bounds**: routing table at most 256 k contacts (one per address); values kept for others:
//!   10,000 and 8 MiB, 64 publishers per key, 64 STOREs per sender address per 10 s; 10,000 known
//!   records; 4,096 pending requests; 256 lookups at once; 1,024 events waiting for the host
//!   (further ones are dropped and logged; `peers()` stays exact); records of at most
//!   [`protocol::MAX_RECORD`] bytes (`announce` of a larger one fails with `TOO_LARGE`).
//! - **Hostile input**: a datagram that does not parse is counted and dropped, never a panic;
//!   responses count only from the address the request went to and with its 64-bit random
//!   transaction id.
//! - **Authentication** (when the node runs with `[security] links = "noise"`: the host hands
//!   the plugin the node's identity and allow list; [`auth`], [`protocol`]): every datagram
//!   carries the sender's node id (bound to its public key, and whose SHA-256 must be the
//!   datagram's sender key), its clock and its Ed25519 signature, and is refused whole, before
//!   anything in it is parsed, unless the key is on `security.allow`, the signature verifies
//!   (with `security.network_key_file`, the network key is part of what is signed: a node of
//!   another network is refused even with an allowed key) and the time is within 5 minutes of
//!   ours (an older datagram replayed is refused). Records travel signed by the node they
//!   describe: a STORE or a FOUND value that its own node did not sign (a provider of a service
//!   published in another node's name) is refused, and only a node itself can remove its
//!   values. A request from a key the routing table does
//!   not have at that address makes the node PING the address first; the key enters the table
//!   when a fresh signed PONG comes back from there, so a datagram replayed from elsewhere cannot
//!   move a contact. Refused datagrams are counted (`Stats::unauthenticated`) and logged
//!   (rate-limited).
//! - **Limits of authentication**: nothing is encrypted (records can be read on the network).
//!   An allowed node can still answer lookups with made-up contacts (they enter routing tables
//!   only by answering from their own address) and refuse to keep values. A datagram replayed
//!   within the 5-minute window is accepted again: a STORE re-stores the same signed value, but a
//!   removal (`withdraw`, `close`) replayed after the node published again removes its value
//!   until its next republication. Plaintext and authenticated nodes do not understand each
//!   other. The 2,048-byte record limit includes the 64-byte signature.
//! - **Without link security** datagrams are plaintext and unsigned: anyone who can send UDP to
//!   a node can publish or remove records under any node id and poison lookups with made-up
//!   contacts (bounded by the limits above, and contacts enter the routing table only by
//!   answering from their own address). Run it so only on a network you trust.

#![warn(missing_docs)]

pub mod auth;
pub mod discovery;
pub mod key;
pub mod lookup;
pub mod node;
pub mod protocol;
pub mod routing_table;
pub mod store;

use comms_plugin_api::{async_trait, export_plugin, Plugin, PluginError, Provides, Setup};
pub use discovery::{KademliaDiscovery, KademliaSettings};
use std::sync::Arc;

/// The plugin: provides a discovery.
#[derive(Debug)]
pub struct KademliaPlugin;

#[async_trait]
impl Plugin for KademliaPlugin {
    const NAME: &'static str = "kademlia";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str =
        "Kademlia DHT discovery over UDP: records at the k closest nodes, no server";
    const PROVIDES: Provides = Provides::DISCOVERY;
    // One UDP socket and a timer: one worker is plenty.
    const WORKER_THREADS: usize = 1;

    async fn new_discovery(setup: Setup) -> Result<Arc<dyn comms_plugin_api::Discovery>, PluginError> {
        let security = setup.link_security()?;
        Ok(Arc::new(KademliaDiscovery::start_with(setup.node_id.clone(), setup.config()?, security).await?))
    }
}

export_plugin!(KademliaPlugin);

#[cfg(test)]
mod tests;
