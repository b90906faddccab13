//! Reassembly of parts into whole messages: a sans-IO state machine.
//!
//! [`Reassembler`] owns no socket, no task and no clock: the caller hands it each received part
//! with the current time ([`Reassembler::handle_part`]), calls [`Reassembler::handle_timeout`]
//! at [`Reassembler::poll_timeout`], and takes out what to settle on the inner transport
//! ([`Reassembler::take_settlements`]). Completed messages are returned by `handle_part`.
//!
//! ## Memory
//!
//! A message's buffer is allocated whole when its first part arrives (the header says how long
//! it is), and each part is copied into it, so a message in reassembly costs its length once:
//! no list of parts, no copy at the end. Before allocating, the message's **reservation** (its
//! length, plus the bookkeeping of its parts and its headers: see [`reservation`]) is taken from
//! [`Config::max_reassembly_bytes`], shared by every sender; a message that does not fit is
//! **refused** (its part is not held). Held bytes never exceed the budget, and nothing else grows
//! with what peers send: without acknowledgements the keys of refused messages are remembered
//! (at most [`MAX_REFUSED`], each for the timeout) so that their later parts are dropped
//! without a new allocation.
//!
//! ## Settlements (acknowledging inner transport only)
//!
//! Every part's inner delivery tag is settled exactly once:
//!
//! | what happened to the part | outcome |
//! |---|---|
//! | its message completed | the caller's: the host's outcome for the whole message (tags in [`Complete::inner_tags`]) |
//! | it repeats a part held already | `ACCEPTED` (the held copy stands for it) |
//! | malformed, or contradicts the parts held | `REJECTED_DISCARD` (it would fail again) |
//! | refused for lack of budget | `REJECTED_REQUEUE` (a broker delivers it again, maybe when there is room) |
//! | its message expired incomplete | `REJECTED_DISCARD`: the missing parts did not come within the timeout, so they most likely never will (the sender died between parts, or another consumer took them); requeued, the held parts would come back, wait and expire again, holding budget forever. A broker's dead-letter queue keeps them for inspection. |
//! | still held when the layer closes ([`Reassembler::abandon_all`]) | `REJECTED_REQUEUE`: delivered again to the next consumer |

use crate::part::{Layout, PartHeader, HEADER};
use comms_plugin_api::{Envelope, MessageId, NodeId, Payload, Settlement, SettlementOutcome};
use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

/// Keys of refused messages remembered (without acknowledgements) so that their later parts are
/// dropped at once.
pub const MAX_REFUSED: usize = 1024;

/// Bytes reserved per message beyond its payload and headers (the map entry, the envelope).
pub const MESSAGE_BOOKKEEPING: u64 = 512;

/// Limits of a [`Reassembler`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Largest whole message accepted.
    pub max_message_size: u64,
    /// Reservations of all messages in reassembly together stay within this.
    pub max_reassembly_bytes: u64,
    /// An incomplete message with no new part for this long is dropped.
    pub timeout: Duration,
    /// The inner transport settles delivery tags (see the module documentation).
    pub acknowledging: bool,
}

/// A message whose parts all arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Complete {
    /// The message as it was sent: its own id, the headers without [`HEADER`], the whole payload.
    pub envelope: Envelope,
    /// The inner delivery tags of its parts, to settle with the host's outcome for the message
    /// (empty without acknowledgements).
    pub inner_tags: Vec<u64>,
}

/// What [`Reassembler::handle_part`] did with a part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handled {
    /// It was the last missing one. (Boxed: the other variants are small.)
    Complete(Box<Complete>),
    /// Held until the others arrive.
    Held,
    /// That part was held already; dropped.
    Duplicate,
    /// No room in the budget; dropped (the reason says which message and how much is held).
    Refused(String),
    /// The header is invalid or contradicts the parts held; dropped.
    Malformed(String),
}

/// Counters; `bytes_held` is the current reservation, the others are totals.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Parts handled.
    pub parts_received: u64,
    /// Messages completed.
    pub messages_reassembled: u64,
    /// Parts dropped as repeats.
    pub duplicate_parts: u64,
    /// Parts dropped as malformed or contradicting.
    pub malformed_parts: u64,
    /// Parts dropped for lack of budget.
    pub refused_parts: u64,
    /// Incomplete messages dropped after the timeout.
    pub expired_messages: u64,
    /// Bytes reserved by messages in reassembly now.
    pub bytes_held: u64,
    /// The most ever reserved at once.
    pub bytes_held_peak: u64,
    /// Messages in reassembly now.
    pub partial_messages: u64,
}

/// What a message in reassembly is reserved: its payload, a bit per part (and a tag per part
/// with acknowledgements), its headers and names, and [`MESSAGE_BOOKKEEPING`].
pub fn reservation(layout: &Layout, envelope: &Envelope, acknowledging: bool) -> u64 {
    let per_part = if acknowledging { 8 } else { 0 };
    let headers: usize = envelope.headers.iter().map(|(name, value)| name.len() + value.len() + 32).sum();
    let extensions: usize = envelope.extensions.iter().map(|(key, value)| key.len() + value.len() + 32).sum();
    let names = envelope.from.as_str().len() + envelope.to.name().len();
    layout.total
        + layout.count.div_ceil(8)
        + layout.count * per_part
        + (headers + extensions + names) as u64
        + MESSAGE_BOOKKEEPING
}

type Key = (NodeId, MessageId);

/// One message in reassembly.
#[derive(Debug)]
struct Partial {
    /// The message's envelope without payload: id, addressing, headers (without [`HEADER`]).
    envelope: Envelope,
    layout: Layout,
    buffer: Vec<u8>,
    /// Bit `i` set: part `i` is in `buffer`.
    received: Vec<u64>,
    received_count: u64,
    inner_tags: Vec<u64>,
    reserved: u64,
    last_part: Instant,
}

impl Partial {
    fn has(&self, index: u64) -> bool {
        self.received[(index / 64) as usize] & (1 << (index % 64)) != 0
    }

    fn insert(&mut self, index: u64, bytes: &[u8], tag: Option<u64>, now: Instant) {
        let range = self.layout.range(index);
        self.buffer[range.start as usize..range.end as usize].copy_from_slice(bytes);
        self.received[(index / 64) as usize] |= 1 << (index % 64);
        self.received_count += 1;
        self.inner_tags.extend(tag);
        self.last_part = now;
    }
}

/// The state machine; see the module documentation.
#[derive(Debug)]
pub struct Reassembler {
    config: Config,
    partials: HashMap<Key, Partial>,
    /// Refused messages (without acknowledgements) and until when their parts are dropped.
    refused: HashMap<Key, Instant>,
    settlements: Vec<Settlement>,
    stats: Stats,
}

impl Reassembler {
    /// A reassembler with nothing held.
    pub fn new(config: Config) -> Self {
        Self {
            config,
            partials: HashMap::new(),
            refused: HashMap::new(),
            settlements: Vec::new(),
            stats: Stats::default(),
        }
    }

    /// The counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// What to settle on the inner transport, taken out (empty without acknowledgements).
    pub fn take_settlements(&mut self) -> Vec<Settlement> {
        std::mem::take(&mut self.settlements)
    }

    /// When [`Reassembler::handle_timeout`] has something to do: the earliest expiry.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.partials.values().map(|partial| partial.last_part + self.config.timeout).min()
    }

    fn settle(&mut self, delivery_tag: u64, outcome: SettlementOutcome) {
        if self.config.acknowledging {
            self.settlements.push(Settlement { delivery_tag, outcome });
        }
    }

    fn malformed(&mut self, tag: u64, from: &NodeId, reason: String) -> Handled {
        self.stats.malformed_parts += 1;
        self.settle(tag, SettlementOutcome::REJECTED_DISCARD);
        Handled::Malformed(format!("part from {from}: {reason}"))
    }

    /// Takes one received part (an envelope carrying [`HEADER`]) with its inner delivery tag.
    pub fn handle_part(&mut self, now: Instant, mut envelope: Envelope, tag: u64) -> Handled {
        self.stats.parts_received += 1;
        let from = envelope.from.clone();
        let header = match envelope.header(HEADER).map(PartHeader::parse) {
            Some(Ok(header)) => header,
            Some(Err(reason)) => return self.malformed(tag, &from, reason),
            None => return self.malformed(tag, &from, format!("no `{HEADER}` header")),
        };
        let layout = match Layout::from_header(&header) {
            Ok(layout) => layout,
            Err(reason) => {
                return self.malformed(tag, &from, format!("message {}: {reason}", header.original))
            }
        };
        let id = header.original;
        if header.total > self.config.max_message_size {
            let reason = format!(
                "message {id} of {} bytes exceeds max_message_size {}",
                header.total, self.config.max_message_size
            );
            return self.malformed(tag, &from, reason);
        }
        let range = layout.range(header.index);
        if envelope.payload.len() as u64 != range.end - range.start {
            let reason = format!(
                "message {id}: part {} has {} bytes where its layout has {}",
                header.index,
                envelope.payload.len(),
                range.end - range.start
            );
            return self.malformed(tag, &from, reason);
        }
        let inner_tag = self.config.acknowledging.then_some(tag);
        let key = (from, id);
        if let Some(partial) = self.partials.get_mut(&key) {
            if partial.layout != layout {
                let reason = format!(
                    "message {id}: part {} says {} parts and {} bytes, earlier parts said {} and {}",
                    header.index, layout.count, layout.total, partial.layout.count, partial.layout.total
                );
                return self.malformed(tag, &key.0, reason);
            }
            if partial.has(header.index) {
                self.stats.duplicate_parts += 1;
                self.settle(tag, SettlementOutcome::ACCEPTED);
                return Handled::Duplicate;
            }
            partial.insert(header.index, &envelope.payload, inner_tag, now);
            if partial.received_count < layout.count {
                return Handled::Held;
            }
            return match self.partials.remove(&key) {
                Some(partial) => self.finish(partial),
                None => Handled::Held,
            };
        }
        envelope.id = id;
        envelope.headers.remove(HEADER);
        if layout.count == 1 {
            // A message of one part: nothing to hold (a sender never makes one, but it is valid).
            self.stats.messages_reassembled += 1;
            return Handled::Complete(Box::new(Complete {
                envelope,
                inner_tags: inner_tag.into_iter().collect(),
            }));
        }
        if let Some(until) = self.refused.get_mut(&key) {
            // An earlier part of this message was refused: it cannot complete, do not hold it.
            *until = now + self.config.timeout;
            self.stats.refused_parts += 1;
            return Handled::Refused(format!("message {id} from {}: an earlier part was refused", key.0));
        }
        let reserved = reservation(&layout, &envelope, self.config.acknowledging);
        let budget = self.config.max_reassembly_bytes;
        if self.stats.bytes_held.saturating_add(reserved) > budget {
            self.stats.refused_parts += 1;
            self.settle(tag, SettlementOutcome::REJECTED_REQUEUE);
            let reason = format!(
                "message {id} from {} needs {reserved} bytes, {} of max_reassembly_bytes {budget} are held",
                key.0, self.stats.bytes_held
            );
            if !self.config.acknowledging {
                self.remember_refused(key, now);
            }
            return Handled::Refused(reason);
        }
        let Ok(length) = usize::try_from(layout.total) else {
            let reason = format!("message {id} of {} bytes does not fit this machine's memory", layout.total);
            return self.malformed(tag, &key.0, reason);
        };
        let payload = std::mem::replace(&mut envelope.payload, Payload::from_vec(Vec::new()));
        let mut partial = Partial {
            envelope,
            layout,
            // Zeroed pages from the allocator: memory is touched only as parts arrive.
            buffer: vec![0; length],
            received: vec![0; layout.count.div_ceil(64) as usize],
            received_count: 0,
            inner_tags: Vec::new(),
            reserved,
            last_part: now,
        };
        partial.insert(header.index, &payload, inner_tag, now);
        self.stats.bytes_held += reserved;
        self.stats.bytes_held_peak = self.stats.bytes_held_peak.max(self.stats.bytes_held);
        self.partials.insert(key, partial);
        self.stats.partial_messages = self.partials.len() as u64;
        Handled::Held
    }

    fn finish(&mut self, partial: Partial) -> Handled {
        self.stats.bytes_held -= partial.reserved;
        self.stats.partial_messages = self.partials.len() as u64;
        self.stats.messages_reassembled += 1;
        let mut envelope = partial.envelope;
        envelope.payload = Payload::from_vec(partial.buffer);
        Handled::Complete(Box::new(Complete { envelope, inner_tags: partial.inner_tags }))
    }

    fn remember_refused(&mut self, key: Key, now: Instant) {
        if self.refused.len() >= MAX_REFUSED {
            self.refused.retain(|_, until| *until > now);
        }
        if self.refused.len() >= MAX_REFUSED {
            // Forget the one that would be forgotten soonest.
            if let Some(oldest) =
                self.refused.iter().min_by_key(|(_, until)| **until).map(|(key, _)| key.clone())
            {
                self.refused.remove(&oldest);
            }
        }
        self.refused.insert(key, now + self.config.timeout);
    }

    /// Drops the incomplete messages that got no part for the timeout (their parts settled as
    /// discarded); returns how many.
    pub fn handle_timeout(&mut self, now: Instant) -> u64 {
        let timeout = self.config.timeout;
        self.refused.retain(|_, until| *until > now);
        let expired: Vec<Key> = self
            .partials
            .iter()
            .filter(|(_, partial)| partial.last_part + timeout <= now)
            .map(|(key, _)| key.clone())
            .collect();
        for key in &expired {
            if let Some(partial) = self.partials.remove(key) {
                self.drop_partial(partial, SettlementOutcome::REJECTED_DISCARD);
                self.stats.expired_messages += 1;
            }
        }
        expired.len() as u64
    }

    /// Drops every message in reassembly, its parts settled for redelivery (the layer is
    /// closing).
    pub fn abandon_all(&mut self) {
        for (_, partial) in std::mem::take(&mut self.partials) {
            self.drop_partial(partial, SettlementOutcome::REJECTED_REQUEUE);
        }
    }

    fn drop_partial(&mut self, partial: Partial, outcome: SettlementOutcome) {
        self.stats.bytes_held -= partial.reserved;
        self.stats.partial_messages = self.partials.len() as u64;
        for tag in partial.inner_tags {
            self.settle(tag, outcome);
        }
    }
}

#[cfg(test)]
mod tests;
