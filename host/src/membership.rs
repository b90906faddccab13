//! Who is out there and alive, as the application sees it: [`PeerInfo`] and [`PeerStatus`].
//!
//! A peer is **up** from the moment discovery reports it or it is heard from (any message
//! counts, heartbeats included), and **down** once nothing has been heard from it for
//! `peer_timeout`, or at once when it says goodbye. A peer whose transport keeps an inbox (a
//! durable one) and that closed cleanly is **offline**: messages sent to it wait in its inbox.
//! Every change is published as a [`crate::PeerEvent`] (`Node::peer_events`): `Joined` (up),
//! `Left` (down, offline or withdrawn), `Updated` (its record changed). The peer table itself is
//! part of the node's engine.
//!
//! The table is bounded, whatever peers send: a record over
//! [`MAX_RECORD_BYTES`](comms_plugin_api::node_limits::MAX_RECORD_BYTES) or with an invalid id
//! is refused; a peer known only from its own hellos and heartbeats is removed once it has been
//! down for 10 peer timeouts, and at most 1,024 such peers are kept; peers reported by discovery
//! stay while discovery reports them (16,384 peers in all).

pub use crate::engine::membership::{PeerInfo, PeerStatus};
