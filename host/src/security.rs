//! Node security as the host sees it: the `[security]` settings, this node's identity, and
//! end-to-end envelope signatures.
//!
//! Link encryption (Noise) is done by the transport plugins; the host only hands them the
//! settings (a `[comms_security]` table, see [`comms_plugin_api::security`]) and refuses to
//! start a node whose config asks for encrypted links with a transport that does not declare
//! [`Capabilities::ENCRYPTED`](comms_plugin_api::Capabilities::ENCRYPTED).
//!
//! ## Envelope signatures
//!
//! With `signatures = "sign"` or `"require"` every envelope this node sends (messages, requests,
//! responses, publications, heartbeats, goodbyes) carries two headers, appended last:
//!
//! | header | value |
//! |---|---|
//! | `comms-signed-at` | when it was signed, milliseconds since the Unix epoch (decimal) |
//! | `comms-signature` | Ed25519 signature by the sender's identity key, 128 hex digits |
//!
//! The signature covers [`signed_bytes`]: the context string `comms envelope signature v1`
//! and a NUL byte, then the envelope in the wire encoding of [`comms_plugin_api::wire`]
//! with the `comms-signature` header left out (so it covers the id, the sender, the destination's
//! kind and name, the correlation id, every other header in order, `comms-signed-at` included,
//! and the payload). Every transport carries these fields unchanged, so the signature survives
//! brokers, databases and relays.
//!
//! With `"require"` an incoming envelope is accepted only if the key its sender id is bound to
//! ([`PublicKey::of_node`]) is allowed (`security.allow`, when set and not `"*"`), the signature
//! verifies, `comms-signed-at` is within `max_clock_skew_ms` of this node's clock, and its
//! `(sender, id)` was not seen before (a bounded cache of recent ids). Anything else is dropped,
//! logged at `warn` (sender and reason), counted ([`crate::Node::rejected_count`]) and, on
//! transports with acknowledgements, settled `REJECTED_DISCARD` so it is not delivered again.

use comms_plugin_api::{
    security::{
        identity::hex_decode, identity::hex_encode, AllowList, Identity, LinkMode, LinkSecurityConfig,
        PublicKey, SETUP_KEY,
    },
    Envelope, MessageId, NodeId,
};
use serde::Deserialize;
use std::{
    collections::{HashSet, VecDeque},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

/// Header holding the signature (hex) of a signed envelope.
pub const SIGNATURE_HEADER: &str = "comms-signature";
/// Header holding when a signed envelope was signed (Unix milliseconds).
pub const SIGNED_AT_HEADER: &str = "comms-signed-at";
/// Default `max_clock_skew_ms`: how far `comms-signed-at` may be from this node's clock.
pub const DEFAULT_MAX_CLOCK_SKEW: Duration = Duration::from_secs(300);
/// Default `replay_cache_size`: how many recent message ids are remembered per node.
pub const DEFAULT_REPLAY_CACHE_SIZE: usize = 100_000;

const SIGNATURE_CONTEXT: &[u8] = b"comms envelope signature v1\0";

/// Whether this node signs what it sends and requires signatures on what it receives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SignatureMode {
    /// No signatures (default).
    #[default]
    Off,
    /// Sign every envelope sent; accept envelopes without checking them (to roll signatures out
    /// before requiring them).
    Sign,
    /// Sign every envelope sent; drop every incoming envelope whose signature does not verify.
    Require,
}

/// A node's security settings: the `[security]` section of its config, or
/// [`crate::NodeBuilder::security`]. The identity itself comes from `[node] key_file`
/// ([`crate::NodeBuilder::key_file`]) or [`crate::NodeBuilder::identity`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Security {
    /// `plain` (default) or `noise`: whether every transport must encrypt its links.
    pub links: LinkMode,
    /// Peers allowed: public keys (hex), node ids bound to keys, or `"*"`. Empty: any key (for
    /// signatures); with `noise` links an empty list needs `network_key_file`.
    pub allow: Vec<String>,
    /// A network key file shared by every node (Noise links): only holders may connect.
    pub network_key_file: Option<PathBuf>,
    /// Envelope signatures.
    pub signatures: SignatureMode,
    /// How far a signature's time may be from this node's clock.
    pub max_clock_skew: Duration,
    /// How many recent `(sender, message id)` pairs are remembered to refuse replays.
    pub replay_cache_size: usize,
}

impl Default for Security {
    fn default() -> Self {
        Self {
            links: LinkMode::Plain,
            allow: Vec::new(),
            network_key_file: None,
            signatures: SignatureMode::Off,
            max_clock_skew: DEFAULT_MAX_CLOCK_SKEW,
            replay_cache_size: DEFAULT_REPLAY_CACHE_SIZE,
        }
    }
}

/// The `[comms_security]` table the host hands a transport for Noise links: `config` with its
/// paths made absolute (plugins do not know where the config file was).
pub(crate) fn link_security_table(config: &LinkSecurityConfig) -> toml::Table {
    let absolute = |path: &Path| std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let text = |path: &Path| toml::Value::String(absolute(path).display().to_string());
    let mut table = toml::Table::new();
    table.insert("links".into(), "noise".into());
    if let Some(path) = &config.key_file {
        table.insert("key_file".into(), text(path));
    }
    if let Some(path) = &config.network_key_file {
        table.insert("network_key_file".into(), text(path));
    }
    let allow = config.allow.iter().cloned().map(toml::Value::String).collect();
    table.insert("allow".into(), toml::Value::Array(allow));
    table
}

/// A transport's config text with the host's link security table added under
/// [`SETUP_KEY`]. Errors (a TOML error, or the config already using the reserved key) are
/// messages for the caller to prefix with the table or file they came from.
pub(crate) fn with_link_security(config_toml: &str, link_table: &toml::Table) -> Result<String, String> {
    let mut config: toml::Table = toml::from_str(config_toml).map_err(|e| e.message().to_string())?;
    if config.contains_key(SETUP_KEY) {
        return Err(format!("key `{SETUP_KEY}`: reserved for the host (set [security] instead)"));
    }
    config.insert(SETUP_KEY.into(), toml::Value::Table(link_table.clone()));
    toml::to_string(&config).map_err(|e| e.to_string())
}

/// The bytes a signature covers: see the module documentation. `None` if the envelope cannot be
/// encoded (a field too long for the wire format).
pub fn signed_bytes(envelope: &Envelope) -> Option<Vec<u8>> {
    fn put(out: &mut Vec<u8>, text: &str) -> Option<()> {
        out.extend_from_slice(&u16::try_from(text.len()).ok()?.to_be_bytes());
        out.extend_from_slice(text.as_bytes());
        Some(())
    }
    let headers: Vec<(&str, &str)> =
        envelope.headers.iter().filter(|(name, _)| *name != SIGNATURE_HEADER).collect();
    let mut out = Vec::with_capacity(SIGNATURE_CONTEXT.len() + 128 + envelope.payload.len());
    out.extend_from_slice(SIGNATURE_CONTEXT);
    // The layout of `comms_plugin_api::wire` (version 1).
    out.push(comms_plugin_api::wire::WIRE_VERSION);
    out.extend_from_slice(&envelope.id.as_u128().to_be_bytes());
    out.push(envelope.to.kind_code());
    put(&mut out, envelope.to.name())?;
    put(&mut out, envelope.from.as_str())?;
    let has_extensions = !envelope.extensions.is_empty();
    out.push(u8::from(envelope.correlation_id.is_some()) | (u8::from(has_extensions) << 1));
    if let Some(id) = envelope.correlation_id {
        out.extend_from_slice(&id.as_u128().to_be_bytes());
    }
    out.extend_from_slice(&u16::try_from(headers.len()).ok()?.to_be_bytes());
    for (name, value) in headers {
        put(&mut out, name)?;
        put(&mut out, value)?;
    }
    if has_extensions {
        out.extend_from_slice(&u16::try_from(envelope.extensions.len()).ok()?.to_be_bytes());
        for (key, value) in envelope.extensions.iter() {
            put(&mut out, key)?;
            out.extend_from_slice(&u32::try_from(value.len()).ok()?.to_be_bytes());
            out.extend_from_slice(value);
        }
    }
    out.extend_from_slice(&u32::try_from(envelope.payload.len()).ok()?.to_be_bytes());
    out.extend_from_slice(envelope.payload.as_slice());
    Some(out)
}

/// Signs `envelope` as `identity` at `signed_at_ms`: replaces any signature headers with fresh
/// ones. Fails only if the envelope cannot be encoded.
pub fn sign_envelope(identity: &Identity, envelope: &mut Envelope, signed_at_ms: u64) -> Result<(), String> {
    envelope.headers.retain(|name, _| name != SIGNATURE_HEADER && name != SIGNED_AT_HEADER);
    envelope.headers.push(SIGNED_AT_HEADER, signed_at_ms.to_string());
    let bytes = signed_bytes(envelope).ok_or("the envelope is too large to sign")?;
    envelope.headers.push(SIGNATURE_HEADER, hex_encode(&identity.sign(&bytes)));
    Ok(())
}

/// Checks the signature of `envelope` against the key its sender id is bound to. Returns when
/// it was signed, or why it is refused.
pub fn verify_envelope(envelope: &Envelope) -> Result<(PublicKey, u64), &'static str> {
    let key = PublicKey::of_node(&envelope.from).ok_or("the sender id is not bound to a public key")?;
    let single = |name: &str| {
        let mut values = envelope.headers.iter().filter(|(n, _)| *n == name).map(|(_, v)| v);
        match (values.next(), values.next()) {
            (Some(value), None) => Ok(Some(value)),
            (None, _) => Ok(None),
            (Some(_), Some(_)) => Err(()),
        }
    };
    let signature = match single(SIGNATURE_HEADER) {
        Ok(Some(signature)) => signature,
        Ok(None) => return Err("unsigned"),
        Err(()) => return Err("more than one signature header"),
    };
    let signed_at = match single(SIGNED_AT_HEADER) {
        Ok(Some(text)) => text.parse::<u64>().map_err(|_| "malformed comms-signed-at")?,
        Ok(None) => return Err("no comms-signed-at header"),
        Err(()) => return Err("more than one comms-signed-at header"),
    };
    let signature = hex_decode(signature).ok_or("malformed signature")?;
    let bytes = signed_bytes(envelope).ok_or("the envelope cannot be encoded")?;
    if !key.verify(&bytes, &signature) {
        return Err("bad signature");
    }
    Ok((key, signed_at))
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Recent `(sender, id)` pairs of accepted envelopes, bounded. When an entry still young
/// enough to pass the clock check has to be evicted, anything signed at or before it is
/// refused from then on, so a replay cannot slip through a full cache.
struct RecentIds {
    capacity: usize,
    order: VecDeque<((NodeId, MessageId), u64)>,
    seen: HashSet<(NodeId, MessageId)>,
    watermark: u64,
}

impl RecentIds {
    fn new(capacity: usize) -> Self {
        Self { capacity: capacity.max(1), order: VecDeque::new(), seen: HashSet::new(), watermark: 0 }
    }

    fn insert(
        &mut self,
        key: (NodeId, MessageId),
        signed_at: u64,
        now: u64,
        skew: u64,
    ) -> Result<(), &'static str> {
        if self.seen.contains(&key) {
            return Err("replayed message id");
        }
        if signed_at <= self.watermark {
            return Err("signed before the oldest message the replay cache remembers");
        }
        while let Some((_, front_at)) = self.order.front() {
            let expired = front_at.saturating_add(skew) < now;
            if !expired && self.order.len() < self.capacity {
                break;
            }
            let (old, old_at) = self.order.pop_front().expect("front exists");
            self.seen.remove(&old);
            if !expired {
                self.watermark = self.watermark.max(old_at);
            }
        }
        self.seen.insert(key.clone());
        self.order.push_back((key, signed_at));
        Ok(())
    }
}

/// Signing and checking envelopes for one node.
pub(crate) struct Signatures {
    identity: Arc<Identity>,
    mode: SignatureMode,
    allow: AllowList,
    max_skew_ms: u64,
    recent: Mutex<RecentIds>,
}

impl Signatures {
    pub(crate) fn new(identity: Arc<Identity>, security: &Security, allow: AllowList) -> Self {
        Self {
            identity,
            mode: security.signatures,
            allow,
            max_skew_ms: security.max_clock_skew.as_millis() as u64,
            recent: Mutex::new(RecentIds::new(security.replay_cache_size)),
        }
    }

    /// Signs an envelope this node sends.
    pub(crate) fn seal(&self, envelope: &mut Envelope) {
        if let Err(error) = sign_envelope(&self.identity, envelope, now_ms()) {
            tracing::warn!(id = %envelope.id, %error, "envelope sent unsigned");
        }
    }

    /// Whether an incoming envelope may be taken; `Err` names why not.
    pub(crate) fn check(&self, envelope: &Envelope) -> Result<(), &'static str> {
        if self.mode != SignatureMode::Require {
            return Ok(());
        }
        let key = PublicKey::of_node(&envelope.from).ok_or("the sender id is not bound to a public key")?;
        // This node's own envelopes come back too (a request to its own service, a publication
        // through a broker); its key need not be on its allow-list.
        if key != self.identity.public_key() && !self.allow.permits(&key) {
            return Err("the sender's key is not on the allow-list");
        }
        let (_, signed_at) = verify_envelope(envelope)?;
        let now = now_ms();
        if signed_at.abs_diff(now) > self.max_skew_ms {
            return Err("signed-at is outside max_clock_skew_ms");
        }
        self.recent.lock().unwrap_or_else(|p| p.into_inner()).insert(
            (envelope.from.clone(), envelope.id),
            signed_at,
            now,
            self.max_skew_ms,
        )
    }
}

/// Refused incoming envelopes, for [`crate::Node::rejected_count`].
#[derive(Debug, Default)]
pub(crate) struct RejectedCounter(AtomicU64);

impl RejectedCounter {
    pub(crate) fn add(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use comms_plugin_api::{Destination, Payload};

    fn envelope(from: &NodeId) -> Envelope {
        Envelope::new(
            MessageId::from_u128(42),
            from.clone(),
            Destination::Node(NodeId::new("bob")),
            Payload::from(b"{\"n\":1}".to_vec()),
        )
        .with_correlation_id(Some(MessageId::from_u128(7)))
        .with_headers(vec![("content-type".into(), "application/json".into()), ("x".into(), "1".into())])
    }

    fn require(allow: AllowList) -> Signatures {
        let security = Security { signatures: SignatureMode::Require, ..Security::default() };
        Signatures::new(Arc::new(Identity::generate()), &security, allow)
    }

    fn edit_headers(envelope: &mut Envelope, edit: impl FnOnce(&mut Vec<(String, String)>)) {
        let mut headers = envelope.headers.to_vec();
        edit(&mut headers);
        envelope.headers = headers.into();
    }

    #[test]
    fn the_signed_form_is_the_wire_encoding_without_the_signature() {
        let alice = Identity::generate();
        let mut signed = envelope(&alice.node_id(Some("alice")));
        sign_envelope(&alice, &mut signed, 1_000).unwrap();
        let mut without = signed.clone();
        without.headers.retain(|n, _| n != SIGNATURE_HEADER);
        let mut wire = SIGNATURE_CONTEXT.to_vec();
        comms_plugin_api::wire::encode_envelope(&without, &mut wire).unwrap();
        assert_eq!(signed_bytes(&signed).unwrap(), wire);
        assert_eq!(signed_bytes(&signed), signed_bytes(&signed.clone()), "deterministic");
        assert_eq!(signed.headers.iter().next_back().unwrap().0, SIGNATURE_HEADER);
    }

    #[test]
    fn a_signature_verifies_and_any_change_breaks_it() {
        let alice = Identity::generate();
        let mut signed = envelope(&alice.node_id(Some("alice")));
        sign_envelope(&alice, &mut signed, 1_000).unwrap();
        assert_eq!(verify_envelope(&signed), Ok((alice.public_key(), 1_000)));
        type Change = Box<dyn Fn(&mut Envelope)>;
        let tampered: Vec<Change> = vec![
            Box::new(|e| e.id = MessageId::from_u128(43)),
            Box::new(|e| e.to = Destination::Node(NodeId::new("carol"))),
            Box::new(|e| e.to = Destination::Service("bob".into())),
            Box::new(|e| e.correlation_id = None),
            Box::new(|e| edit_headers(e, |h| h[1].1 = "2".into())),
            Box::new(|e| edit_headers(e, |h| h.swap(0, 1))),
            Box::new(|e| edit_headers(e, |h| h.insert(0, ("y".into(), "z".into())))),
            Box::new(|e| e.payload = Payload::from(b"{\"n\":2}".to_vec())),
            Box::new(|e| {
                edit_headers(e, |h| {
                    let at = h.iter().position(|(n, _)| n == SIGNED_AT_HEADER).unwrap();
                    h[at].1 = "2000".into();
                })
            }),
        ];
        for (n, change) in tampered.iter().enumerate() {
            let mut copy = signed.clone();
            change(&mut copy);
            assert_eq!(verify_envelope(&copy), Err("bad signature"), "change {n}");
        }
        // Someone else's key, claiming alice's id.
        let mallory = Identity::generate();
        let mut forged = envelope(&alice.node_id(Some("alice")));
        sign_envelope(&mallory, &mut forged, 1_000).unwrap();
        assert_eq!(verify_envelope(&forged), Err("bad signature"));
        let mut unsigned = envelope(&alice.node_id(Some("alice")));
        assert_eq!(verify_envelope(&unsigned), Err("unsigned"));
        unsigned.from = NodeId::new("alice");
        assert_eq!(verify_envelope(&unsigned), Err("the sender id is not bound to a public key"));
    }

    #[test]
    fn require_mode_refuses_unlisted_keys_stale_times_and_replays() {
        let alice = Identity::generate();
        let checker = require(AllowList::parse(&[alice.public_key().to_hex()], "allow").unwrap());
        let mut message = envelope(&alice.node_id(Some("alice")));
        sign_envelope(&alice, &mut message, now_ms()).unwrap();
        assert_eq!(checker.check(&message), Ok(()));
        assert_eq!(checker.check(&message), Err("replayed message id"));

        let mut old = envelope(&alice.node_id(Some("alice")));
        old.id = MessageId::from_u128(1);
        sign_envelope(&alice, &mut old, now_ms() - 301_000).unwrap();
        assert_eq!(checker.check(&old), Err("signed-at is outside max_clock_skew_ms"));

        let stranger = Identity::generate();
        let mut other = envelope(&stranger.node_id(None));
        sign_envelope(&stranger, &mut other, now_ms()).unwrap();
        assert_eq!(checker.check(&other), Err("the sender's key is not on the allow-list"));
        assert_eq!(require(AllowList::AnyKey).check(&other), Ok(()));

        // Its own envelopes need no allow-list entry, but still a valid signature.
        let mut own = envelope(&checker.identity.node_id(Some("me")));
        sign_envelope(&checker.identity, &mut own, now_ms()).unwrap();
        assert_eq!(checker.check(&own), Ok(()));
        let mut own_forged = envelope(&checker.identity.node_id(Some("me")));
        own_forged.id = MessageId::from_u128(2);
        sign_envelope(&stranger, &mut own_forged, now_ms()).unwrap();
        assert_eq!(checker.check(&own_forged), Err("bad signature"));

        let sign_only = Signatures::new(
            Arc::new(Identity::generate()),
            &Security { signatures: SignatureMode::Sign, ..Security::default() },
            AllowList::AnyKey,
        );
        assert_eq!(sign_only.check(&envelope(&NodeId::new("anyone"))), Ok(()));
    }

    #[test]
    fn a_full_replay_cache_refuses_what_it_can_no_longer_tell_apart() {
        let mut recent = RecentIds::new(2);
        let key = |n: u128| (NodeId::new("a"), MessageId::from_u128(n));
        let now = 1_000_000;
        assert_eq!(recent.insert(key(1), now - 3, now, 300_000), Ok(()));
        assert_eq!(recent.insert(key(2), now - 2, now, 300_000), Ok(()));
        assert_eq!(recent.insert(key(3), now - 1, now, 300_000), Ok(()));
        // Id 1 was evicted while still young: a replay of it is refused all the same.
        assert!(recent.insert(key(1), now - 3, now, 300_000).is_err());
        assert_eq!(recent.insert(key(4), now, now, 300_000), Ok(()));
        // Entries too old to pass the clock check anyway leave without raising the watermark.
        let mut recent = RecentIds::new(2);
        assert_eq!(recent.insert(key(1), 10, now, 300_000), Ok(()));
        assert_eq!(recent.insert(key(2), now, now, 300_000), Ok(()));
        assert_eq!(recent.insert(key(3), now, now, 300_000), Ok(()));
        assert_eq!(recent.watermark, 0);
    }
}
