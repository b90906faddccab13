//! # comms-gossip: discovery by SWIM-style gossip membership over UDP
//!
//! Loaded by the comms host as `libcomms_gossip.so`. No server, no broker, no multicast: every
//! node runs a member of a [SWIM](https://www.cs.cornell.edu/projects/Quicksilver/public_pdfs/SWIM.pdf)
//! group over one UDP socket, and finds every other member through one or a few seeds. Any
//! transport works with it (TCP, UDP, ...): the gossip carries each node's record (id, transport
//! addresses, services, topics, metadata).
//!
//! ```toml
//! [discovery]
//! plugin = "gossip"
//! listen = "0.0.0.0:7946"        # UDP; default "0.0.0.0:0" (any free port: fine for a node
//!                                # that is no one's seed)
//! advertise = "10.0.0.5:7946"    # what other members are told; default: the bound address, or
//!                                # for 0.0.0.0 / [::] the IP of the interface with the default route
//! seeds = ["10.0.0.1:7946", "seed-2.internal:7946"]   # default: none (wait to be joined)
//! protocol_period_ms = 1000      # one probe per period; default 1000
//! probe_timeout_ms = 500         # direct ping deadline; default min(500, period / 2)
//! indirect_probes = 3            # k members asked to ping-req; default 3
//! suspicion_multiplier = 4       # suspicion timeout = 4 · max(1, log10 n) · period; default 4
//! retransmit_multiplier = 4      # each update piggybacked 4 · ceil(log10(n + 1)) times; default 4
//! max_members = 4096             # member table entries, tombstones included; default 4096
//! max_datagram = 1400            # bytes per datagram; default 1400 (one Ethernet frame)
//! sync_interval_ms = 30000       # full table sync with a random member; default 30 s, scaled
//!                                # by 1 + ceil(log2(n / 32)) beyond 32 members
//! ```
//!
//! An unknown key is an error naming it; a value out of range is an error naming its key. Seeds
//! are resolved once, at start.
//!
//! ## How it works
//!
//! The protocol is a sans-IO state machine, [`node::GossipNode`], built from one module per
//! concept: [`membership`] (the member table, incarnations, refutation, bounds),
//! [`failure_detector`] (one probe per period: ping, then ping-req through `k` members, then
//! suspicion), [`dissemination`] (updates piggybacked on probe traffic, each sent
//! λ·log10(n+1) times, least-sent first) and [`protocol`] (the datagram format). This crate's
//! [`discovery::GossipDiscovery`] only moves datagrams between a tokio UDP socket and the state
//! machine and runs its timer; it is tested with no sockets in `tests/simulation.rs` (1,000
//! members, loss, crashes, hostile input).
//!
//! - **Join**: `announce` sends this node's record to the seeds, which gossip it on and answer
//!   with their member table; two syncs with random members follow a few periods later.
//! - **Failure detection**: each period a node pings one member (round-robin over a shuffled
//!   list); no ack within `probe_timeout_ms` → `k` members ping it on its behalf; still no ack
//!   by the end of the period → the member is *suspect* (still listed by `peers`), and unless it
//!   refutes (it raises its incarnation and gossips that it is alive) within the suspicion
//!   timeout it is declared *dead*: `LEFT`. O(1) datagrams per node per period, whatever n.
//! - **Updates**: `announce` with a changed record raises the incarnation and gossips the
//!   record: `UPDATED` everywhere. `withdraw` (and `close`) gossips a graceful leave, pushed at
//!   once to a few members: `LEFT` everywhere within a few periods.
//! - **Anti-entropy**: every `sync_interval_ms` (scaled) a node exchanges its whole table with a
//!   random member, which heals what gossip missed.
//!
//! ## Message format
//!
//! One datagram per message, at most `max_datagram` bytes: magic `0xC6 0x55`, version `1`, a
//! postcard-encoded body (`Ping`, `PingReq`, `Ack`, `State`, `Join`, `Push`), then a count and
//! the piggybacked updates (`Alive` with the record, `Suspect`, `Dead`, `Left`, each with the
//! member's id and incarnation). Field by field in [`protocol`]. Hostile input (garbage,
//! truncation, trailing bytes, oversized datagrams, absurd counts or incarnations) is refused
//! with an error and changes nothing; a rate-limited warning is logged. Authenticated members
//! (below) speak version 2: every `Alive` signed by its member, and a trailer with the sender's
//! id, clock and signature.
//!
//! ## Guarantees and limits
//!
//! - **Convergence**: measured in simulation (`tests/simulation.rs`, 1 s periods, 1-5 ms
//!   latency, deterministic): 1,000 nodes starting within 2 s through 3 seeds all know each
//!   other 15 s after the last one started; a record update reaches all 999 others in 6.5 s and
//!   a graceful leave in 6 s; 10 crashed nodes are `LEFT` at every survivor 20 s after the crash
//!   (suspicion timeout 12 s at n = 1,000); with 5% datagram loss over 60 periods (60,000
//!   probes), 37 suspicions were raised and none ended in a death; at 10% loss none either, at
//!   20% refutations no longer get through in time and members are wrongly declared dead (then
//!   rejoin): Lifeguard's extensions are not implemented.
//! - **Cost**: 2 probe datagrams (a ping and an ack) per node per period in steady state, plus
//!   `k` ping-reqs and relayed pings after a failed direct probe, plus a table sync (25
//!   datagrams each way for 1,000 small records) per scaled sync interval: 0.28 datagrams per
//!   node per period at 1,000 members with the defaults.
//! - **Suspect members** stay in `peers()` until declared dead; a node wrongly suspected
//!   refutes and nothing is reported. A node wrongly declared dead (a partition longer than the
//!   suspicion timeout) reappears as `JOINED` when it refutes or syncs.
//! - **Offline records** (durable transports) are gossiped like any record while the node runs;
//!   once it stops, nobody answers for it and it is declared dead: gossip has no one to keep the
//!   record of an absent node.
//! - **Bounds**: `max_members` table entries (an `Alive` about a new member beyond it evicts the
//!   oldest tombstone or is refused); one record per datagram (`max_datagram` − 320 bytes on
//!   the wire, about 1 KiB by default; `announce` fails with `TOO_LARGE` beyond it) and
//!   `NodeRecord::check`; at most `max_members` updates queued for piggybacking (the most sent
//!   is dropped first); 4096 datagrams waiting to be sent; events waiting for the host about
//!   1024 nodes, one per node, the latest (`comms_plugin_api::peer_events`; an event about one
//!   more node is dropped and logged; `peers` stays exact); 1024 relayed probes
//!   pending. Table requests (joins, syncs) are answered at most once per source address per
//!   period and 16 times per period in all, which bounds the traffic a stranger can make a node
//!   send (a table is the largest answer).
//! - **Authentication** (when the node runs with `[security] links = "noise"`: the host hands
//!   the plugin the node's identity and allow list; [`auth`], [`protocol`]): every datagram
//!   carries the sender's node id (bound to its public key), its clock and its Ed25519
//!   signature, and is refused whole, before anything in it is decoded, unless the key is on
//!   `security.allow`, the signature verifies (with `security.network_key_file`, the network key
//!   is part of what is signed: a node of another network is refused even with an allowed key)
//!   and the time is within 5 minutes of ours (an older datagram replayed is refused). Every
//!   `Alive` (a member's record, address and incarnation) carries the signature of the member it
//!   is about, checked when it is news: no member can forge or alter another's record. A `Join`
//!   carries only its sender's own record, and a table reply (which ends a join's retries) comes
//!   from an allowed member. Refused datagrams are counted (`Stats::unauthenticated`) and logged
//!   (rate-limited).
//! - **Limits of authentication**: nothing is encrypted (records can be read on the network).
//!   An allowed member can still gossip `Suspect`, `Dead` or `Left` about another member (which
//!   refutes it when it hears of it, as it does any false suspicion) and make members probe an
//!   address. A datagram replayed within the 5-minute window is accepted again: updates are
//!   idempotent, so it only restates what its sender said, and the answer to a replayed `Ping`
//!   or `Join` goes to the replayer's address (table answers stay rate-limited). Plaintext and
//!   authenticated members do not understand each other. An `Alive` takes at most
//!   `max_datagram` − 648 bytes, its 64-byte signature included (752 bytes by default).
//! - **Without link security** gossip is plaintext and **unauthenticated**: anyone who can send
//!   UDP datagrams to a member can read the records and forge updates (announce fake members up
//!   to `max_members`, change other members' records, suspect or kill them; a node refutes what
//!   is said about itself, but not what is said about others), and can make members probe
//!   arbitrary addresses. Run it so only on a network you trust.
//! - **Addresses**: one address family per group (an IPv4 socket cannot reach IPv6 seeds).

#![warn(missing_docs)]

pub mod auth;
pub mod discovery;
pub mod dissemination;
pub mod failure_detector;
pub mod membership;
pub mod node;
pub mod protocol;

use comms_plugin_api::{async_trait, export_plugin, Discovery, Plugin, PluginError, Provides, Setup};
use std::sync::Arc;

pub use discovery::{GossipDiscovery, GossipSettings};

/// The plugin: provides a discovery.
#[derive(Debug)]
pub struct GossipPlugin;

#[async_trait]
impl Plugin for GossipPlugin {
    const NAME: &'static str = "gossip";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str =
        "SWIM-style gossip discovery over UDP: probes, suspicion, piggybacked updates";
    const PROVIDES: Provides = Provides::DISCOVERY;
    // One task per discovery drives its UDP socket and the protocol: one worker is plenty.
    const WORKER_THREADS: usize = 1;

    async fn new_discovery(setup: Setup) -> Result<Arc<dyn Discovery>, PluginError> {
        let security = setup.link_security()?;
        Ok(Arc::new(GossipDiscovery::start_with(setup.node_id.clone(), setup.config()?, security).await?))
    }
}

export_plugin!(GossipPlugin);
