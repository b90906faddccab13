//! What a transport can do beyond plain point-to-point delivery.

use abi_stable::StableAbi;

/// Capability flags a transport declares in [`crate::TransportInfo`].
///
/// The host uses them to decide what it must provide itself (for example topic fan-out when a
/// transport has no [`Capabilities::NATIVE_TOPICS`]) and the conformance suite uses them to decide
/// which cases apply. A plugin must only declare what it really guarantees.
#[repr(transparent)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Capabilities(pub u64);

impl Capabilities {
    /// No capability beyond point-to-point, best-effort delivery.
    pub const NONE: Self = Self(0);
    /// Messages from one sender to one receiver arrive in the order they were sent.
    pub const ORDERED: Self = Self(1 << 0);
    /// The transport honours [`crate::Settlement`]s: a message the host did not accept is
    /// delivered again.
    pub const ACKNOWLEDGEMENTS: Self = Self(1 << 1);
    /// Messages survive a restart of the process or the medium.
    pub const DURABLE: Self = Self(1 << 2);
    /// The transport routes topics ([`crate::Destination::TOPIC`]) itself (broker pub/sub).
    pub const NATIVE_TOPICS: Self = Self(1 << 3);
    /// A message accepted by `send` is delivered unless the receiver is gone for good
    /// (retransmission, reconnect with resend).
    pub const RELIABLE: Self = Self(1 << 4);
    /// Every link is encrypted and its far end authenticated before anything is delivered: a peer
    /// by its identity key (Noise links), or a broker by its certificate (TLS; authenticity of
    /// the senders behind a broker then comes from envelope signatures). The host refuses a
    /// transport without it when the node's config requires encrypted links.
    pub const ENCRYPTED: Self = Self(1 << 5);
    /// `send_batch` costs about what one `send` costs (one write, one round trip to confirm the
    /// whole batch), so the host gathers sends that overlap into batches. Added in 1.1 without
    /// a layout change: a host that does not know the flag ignores it and sends one by one.
    pub const BATCHED_SEND: Self = Self(1 << 6);

    /// Whether every flag in `other` is set in `self`.
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// The union of both sets of flags.
    pub const fn union(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }

    /// Names of the flags that are set, for display.
    pub fn names(self) -> Vec<&'static str> {
        const NAMES: [(Capabilities, &str); 7] = [
            (Capabilities::ORDERED, "ordered"),
            (Capabilities::ACKNOWLEDGEMENTS, "acknowledgements"),
            (Capabilities::DURABLE, "durable"),
            (Capabilities::NATIVE_TOPICS, "native-topics"),
            (Capabilities::RELIABLE, "reliable"),
            (Capabilities::ENCRYPTED, "encrypted"),
            (Capabilities::BATCHED_SEND, "batched-send"),
        ];
        NAMES.iter().filter(|(flag, _)| self.contains(*flag)).map(|(_, name)| *name).collect()
    }
}

impl std::ops::BitOr for Capabilities {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        self.union(rhs)
    }
}
