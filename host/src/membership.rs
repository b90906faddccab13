//! Who is out there and alive, as the application sees it: [`PeerInfo`] and [`PeerStatus`].
//!
//! A peer is **up** from the moment discovery reports it or it is heard from (any message
//! counts, heartbeats included), and **down** once nothing has been heard from it for
//! `peer_timeout`, or at once when it says goodbye. A peer whose transport keeps an inbox (a
//! durable one) and that closed cleanly is **offline**: messages sent to it wait in its inbox.
//! Every change is published as a [`crate::PeerEvent`] (`Node::peer_events`): `Joined` (up),
//! `Left` (down, offline or withdrawn), `Updated` (its record changed). The peer table itself is
//! part of the node's engine.

pub use crate::engine::membership::{PeerInfo, PeerStatus};
