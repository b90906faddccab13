//! Property tests ("fuzzing") of everything that decodes bytes from the network on an encrypted
//! stream link: the Noise handshake messages and identity payload, the encrypted records, the
//! stream frames (length prefix, hello) and envelopes. Random and mutated inputs must never
//! panic, and garbage must always be an error, never accepted.
//!
//! Inputs are random bytes, and mutations (bit flips, truncations, extensions, splices) of
//! genuine messages: freshly made ones and the seed corpus in `plugin-api/fuzz-corpus/`, which
//! every run also replays as is. `PROPTEST_CASES` sets the number of cases per property
//! (default 64); see `docs/security-links.md` for the long runs and their numbers.
//! `COMMS_FUZZ_WRITE_CORPUS=1` rewrites the seed corpus from a fresh session.

use comms_plugin_api::{
    framing::read_frame,
    security::{
        noise::{verify_payload, NoiseHandshake, NoiseIdentity},
        AllowList, Identity, LinkSecurity, NetworkKey,
    },
    stream_transport::{
        encrypted::{open_record, seal_records, split_record, EncryptedStream},
        protocol,
    },
    wire, Destination, Envelope, MessageId, NodeId,
};
use proptest::prelude::*;
use std::{path::PathBuf, sync::Arc};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A complete genuine session: the identities and the three handshake messages.
struct Session {
    initiator: Arc<NoiseIdentity>,
    responder: Arc<NoiseIdentity>,
    messages: [Vec<u8>; 3],
}

fn identity(network_key: Option<&NetworkKey>) -> Arc<NoiseIdentity> {
    NoiseIdentity::new(&LinkSecurity::new(Identity::generate(), AllowList::AnyKey, network_key.cloned()))
        .unwrap()
}

fn session(network_key: Option<&NetworkKey>) -> Session {
    let (initiator, responder) = (identity(network_key), identity(network_key));
    let mut dialer = NoiseHandshake::initiator(&initiator).unwrap();
    let mut listener = NoiseHandshake::responder(&responder).unwrap();
    let mut messages: [Vec<u8>; 3] = Default::default();
    dialer.write_message(&mut messages[0]).unwrap();
    listener.read_message(&messages[0]).unwrap();
    listener.write_message(&mut messages[1]).unwrap();
    dialer.read_message(&messages[1]).unwrap();
    dialer.write_message(&mut messages[2]).unwrap();
    listener.read_message(&messages[2]).unwrap();
    Session { initiator, responder, messages }
}

/// A responder that has answered `msg1` (so it expects the third message) and an initiator that
/// has sent its first message (so it expects the second), both with fresh ephemeral keys.
fn waiting_sides(session: &Session) -> (NoiseHandshake, NoiseHandshake) {
    let mut initiator = NoiseHandshake::initiator(&session.initiator).unwrap();
    initiator.write_message(&mut Vec::new()).unwrap();
    let mut responder = NoiseHandshake::responder(&session.responder).unwrap();
    responder.read_message(&session.messages[0]).unwrap();
    responder.write_message(&mut Vec::new()).unwrap();
    (initiator, responder)
}

/// Two transport states of a finished handshake.
fn transports() -> (
    comms_plugin_api::security::noise::snow::TransportState,
    comms_plugin_api::security::noise::snow::TransportState,
) {
    let session_ids = (identity(None), identity(None));
    let mut dialer = NoiseHandshake::initiator(&session_ids.0).unwrap();
    let mut listener = NoiseHandshake::responder(&session_ids.1).unwrap();
    let mut message = Vec::new();
    dialer.write_message(&mut message).unwrap();
    listener.read_message(&message).unwrap();
    listener.write_message(&mut message).unwrap();
    dialer.read_message(&message).unwrap();
    dialer.write_message(&mut message).unwrap();
    listener.read_message(&message).unwrap();
    (dialer.into_transport().unwrap().1, listener.into_transport().unwrap().1)
}

fn sample_envelope(payload: Vec<u8>) -> Envelope {
    Envelope::new(
        MessageId { high: 1, low: 2 },
        NodeId::new("alice"),
        Destination::Node(NodeId::new("bob")),
        payload,
    )
    .with_headers(vec![("content-type".into(), "application/octet-stream".into())])
}

/// A mutation of a genuine input.
#[derive(Debug, Clone)]
enum Mutation {
    Flip { at: usize, bit: u8 },
    Truncate(usize),
    Extend(Vec<u8>),
    Overwrite { at: usize, bytes: Vec<u8> },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
        2 => any::<usize>().prop_map(Mutation::Truncate),
        1 => proptest::collection::vec(any::<u8>(), 1..64).prop_map(Mutation::Extend),
        2 => (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, bytes)| Mutation::Overwrite { at, bytes }),
    ]
}

/// Applies `mutation`; `None` when it would leave the input unchanged.
fn mutate(input: &[u8], mutation: &Mutation) -> Option<Vec<u8>> {
    let mut out = input.to_vec();
    match mutation {
        Mutation::Flip { at, bit } if !out.is_empty() => {
            let at = at % out.len();
            out[at] ^= 1 << bit;
        }
        Mutation::Truncate(length) if !out.is_empty() => out.truncate(length % out.len()),
        Mutation::Extend(bytes) => out.extend_from_slice(bytes),
        Mutation::Overwrite { at, bytes } if !out.is_empty() => {
            let at = at % out.len();
            for (i, byte) in bytes.iter().enumerate() {
                if let Some(slot) = out.get_mut(at + i) {
                    *slot = *byte;
                }
            }
        }
        _ => return None,
    }
    (out != input).then_some(out)
}

/// Cases per property: `PROPTEST_CASES`, or 64 (a few seconds; long runs set it higher).
fn cases() -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|cases| cases.parse().ok()).unwrap_or(64)
}

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz-corpus")
}

/// The seed corpus: `(file name, bytes)`.
fn corpus() -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(corpus_dir())
        .expect("plugin-api/fuzz-corpus exists")
        .map(|entry| {
            let path = entry.unwrap().path();
            (path.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&path).unwrap())
        })
        .collect();
    files.sort();
    files
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().build().unwrap()
}

/// Reads everything a peer sent through an [`EncryptedStream`].
fn read_encrypted(
    receiver: comms_plugin_api::security::noise::snow::TransportState,
    wire_bytes: Vec<u8>,
) -> std::io::Result<Vec<u8>> {
    runtime().block_on(async move {
        let mut stream = EncryptedStream::new(wire_bytes.as_slice(), receiver);
        let mut plaintext = Vec::new();
        stream.read_to_end(&mut plaintext).await.map(|_| plaintext)
    })
}

/// What a sender's [`EncryptedStream`] puts on the wire for `writes`.
fn write_encrypted(
    sender: comms_plugin_api::security::noise::snow::TransportState,
    writes: &[Vec<u8>],
) -> Vec<u8> {
    runtime().block_on(async move {
        let mut wire_bytes = Vec::new();
        let mut stream = EncryptedStream::new(&mut wire_bytes, sender);
        for write in writes {
            stream.write_all(write).await.unwrap();
        }
        stream.flush().await.unwrap();
        drop(stream);
        wire_bytes
    })
}

#[test]
fn the_seed_corpus_is_refused_by_every_decoder() {
    if std::env::var_os("COMMS_FUZZ_WRITE_CORPUS").is_some() {
        write_corpus();
    }
    let corpus = corpus();
    assert!(corpus.len() >= 8, "the seed corpus is missing: {}", corpus_dir().display());
    let session = session(None);
    for (name, bytes) in &corpus {
        // A message recorded in another session never completes this one.
        let (mut initiator, mut responder) = waiting_sides(&session);
        assert!(initiator.read_message(bytes).is_err(), "{name} accepted as message 2");
        assert!(responder.read_message(bytes).is_err(), "{name} accepted as message 3");
        assert!(verify_payload(bytes, &[0; 32], &AllowList::AnyKey).is_err(), "{name} accepted as a payload");
        let (_, receiver) = transports();
        if let Ok(plaintext) = read_encrypted(receiver, bytes.clone()) {
            assert!(plaintext.is_empty(), "{name} decrypted to {} bytes", plaintext.len());
            assert!(bytes.is_empty(), "{name}: only an empty stream reads as empty");
        }
        let _ = protocol::parse_hello(bytes);
        let _ = wire::decode_envelope(bytes);
    }
}

/// Writes the seed corpus: genuine messages of a real session (which no other session accepts),
/// records, frames, and a few classic garbage inputs.
fn write_corpus() {
    let dir = corpus_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let psk = session(Some(&NetworkKey([7; 32])));
    let session = session(None);
    let (sender, _) = transports();
    let records =
        write_encrypted(sender, &[protocol::hello_frame(&NodeId::new("alice")), b"x".repeat(70_000)]);
    let mut envelope = Vec::new();
    wire::encode_envelope(&sample_envelope(b"payload".to_vec()), &mut envelope).unwrap();
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("handshake-1.bin", session.messages[0].clone()),
        ("handshake-2.bin", session.messages[1].clone()),
        ("handshake-3.bin", session.messages[2].clone()),
        ("handshake-psk-2.bin", psk.messages[1].clone()),
        ("handshake-psk-3.bin", psk.messages[2].clone()),
        ("records-hello-and-70k.bin", records),
        ("frame-hello.bin", protocol::hello_frame(&NodeId::new("alice"))),
        ("frame-noise.bin", protocol::noise_frame(&session.messages[1])),
        ("envelope.bin", envelope),
        ("http-request.bin", b"GET / HTTP/1.1\r\nHost: comms\r\n\r\n".to_vec()),
        ("record-max-length.bin", [0xff, 0xff].into_iter().chain(std::iter::repeat_n(0, 40)).collect()),
        ("zeros-96.bin", vec![0; 96]),
    ];
    for (name, bytes) in files {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        failure_persistence: Some(Box::new(proptest::test_runner::FileFailurePersistence::WithSource("regressions"))),
        ..ProptestConfig::default()
    })]

    /// Random bytes as any handshake message: an error, never a panic or an accepted peer.
    #[test]
    fn random_handshake_messages_are_refused(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let session = session(None);
        let (mut initiator, mut responder) = waiting_sides(&session);
        prop_assert!(initiator.read_message(&bytes).is_err());
        prop_assert!(responder.read_message(&bytes).is_err());
        prop_assert!(initiator.remote_key().is_none() && responder.remote_key().is_none());
        // As a first message only 32 bytes (an ephemeral key) can be accepted.
        let mut fresh = NoiseHandshake::responder(&session.responder).unwrap();
        if fresh.read_message(&bytes).is_ok() {
            prop_assert_eq!(bytes.len(), 32);
        }
    }

    /// Genuine handshake messages, mutated: always refused (their MAC or signature breaks).
    #[test]
    fn mutated_handshake_messages_are_refused(which in 1usize..3, mutation in mutation(), psk in any::<bool>()) {
        let key = NetworkKey([3; 32]);
        let network_key = psk.then_some(&key);
        let (initiator_id, responder_id) = (identity(network_key), identity(network_key));
        let mut initiator = NoiseHandshake::initiator(&initiator_id).unwrap();
        let mut responder = NoiseHandshake::responder(&responder_id).unwrap();
        let mut message = Vec::new();
        initiator.write_message(&mut message).unwrap();
        responder.read_message(&message).unwrap();
        responder.write_message(&mut message).unwrap();
        if which == 1 {
            if let Some(bad) = mutate(&message, &mutation) {
                prop_assert!(initiator.read_message(&bad).is_err(), "mutated message 2 accepted");
            }
            return Ok(());
        }
        initiator.read_message(&message).unwrap();
        initiator.write_message(&mut message).unwrap();
        if let Some(bad) = mutate(&message, &mutation) {
            prop_assert!(responder.read_message(&bad).is_err(), "mutated message 3 accepted");
            prop_assert!(responder.into_transport().is_err());
        }
    }

    /// Mutated seed-corpus entries through every decoder: no panic, no acceptance.
    #[test]
    fn mutated_corpus_entries_are_refused(index in any::<usize>(), mutation in mutation()) {
        let corpus = corpus();
        let (_, seed) = &corpus[index % corpus.len()];
        let bytes = mutate(seed, &mutation).unwrap_or_else(|| seed.clone());
        let session = session(None);
        let (mut initiator, mut responder) = waiting_sides(&session);
        prop_assert!(initiator.read_message(&bytes).is_err());
        prop_assert!(responder.read_message(&bytes).is_err());
        prop_assert!(verify_payload(&bytes, &[1; 32], &AllowList::AnyKey).is_err());
        let (_, receiver) = transports();
        if let Ok(plaintext) = read_encrypted(receiver, bytes.clone()) {
            prop_assert!(plaintext.is_empty() && bytes.is_empty());
        }
        let _ = protocol::parse_hello(&bytes);
        let _ = wire::decode_envelope(&bytes);
    }

    /// Random identity payloads never verify; a genuine one verifies only for its static key.
    #[test]
    fn identity_payloads_verify_only_when_genuine(
        bytes in proptest::collection::vec(any::<u8>(), 0..200),
        mutation in mutation(),
    ) {
        prop_assert!(verify_payload(&bytes, &[9; 32], &AllowList::AnyKey).is_err());
        let identity = Identity::generate();
        let static_key = [5u8; 32];
        let mut payload = identity.public_key().0.to_vec();
        payload.extend_from_slice(
            &identity.sign(&comms_plugin_api::security::noise::binding_message(&static_key)),
        );
        prop_assert!(verify_payload(&payload, &static_key, &AllowList::AnyKey).is_ok());
        if let Some(bad) = mutate(&payload, &mutation) {
            prop_assert!(verify_payload(&bad, &static_key, &AllowList::AnyKey).is_err());
        }
    }

    /// An encrypted stream with one mutation anywhere yields an error, or (a truncation at a
    /// record boundary) a clean prefix of what was sent: never altered bytes.
    #[test]
    fn mutated_encrypted_streams_yield_errors_or_a_clean_prefix(
        writes in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..3000), 1..6),
        big in any::<bool>(),
        mutation in mutation(),
    ) {
        let mut writes = writes;
        if big {
            writes.push(vec![0xab; 70_000]);
        }
        let sent: Vec<u8> = writes.concat();
        let (sender, receiver) = transports();
        let wire_bytes = write_encrypted(sender, &writes);
        let Some(bad) = mutate(&wire_bytes, &mutation) else { return Ok(()) };
        match read_encrypted(receiver, bad.clone()) {
            Ok(plaintext) => {
                prop_assert!(bad.len() < wire_bytes.len(), "only a truncation can read cleanly");
                prop_assert!(sent.starts_with(&plaintext), "altered plaintext was returned");
            }
            Err(error) => prop_assert!(matches!(
                error.kind(),
                std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof
            ), "{error}"),
        }
    }

    /// Random record bytes: `split_record` never reads past the buffer, `open_record` refuses.
    #[test]
    fn random_records_are_refused(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
        let (_, mut receiver) = transports();
        if let Some((record, used)) = split_record(&bytes) {
            prop_assert!(used <= bytes.len() && record.len() + 2 == used);
            let mut out = vec![0; record.len()];
            prop_assert!(open_record(&mut receiver, record, &mut out).is_err());
        }
        // The refusal is the record's: a genuine one opens.
        let (mut sender, mut receiver) = transports();
        let mut sealed = Vec::new();
        seal_records(&mut sender, b"genuine", &mut sealed).unwrap();
        let (record, _) = split_record(&sealed).unwrap();
        let mut out = vec![0; record.len()];
        prop_assert_eq!(open_record(&mut receiver, record, &mut out), Ok(7));
    }

    /// Stream frames: random bytes through the frame reader, the hello parser and the envelope
    /// decoder never panic, and a declared length above the limit is refused before reading.
    #[test]
    fn random_frames_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600), max in 0u32..512) {
        let frame = runtime().block_on(async { read_frame(&mut bytes.as_slice(), max).await });
        if let Ok(Some(body)) = &frame {
            prop_assert!(body.len() as u32 <= max);
            let _ = protocol::parse_hello(body);
            if body.first() == Some(&protocol::KIND_ENVELOPE) {
                let _ = wire::decode_envelope(&body[1..]);
            }
        }
        if bytes.len() >= 4 && u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) > max {
            prop_assert!(frame.is_err());
        }
    }

    /// Mutated genuine hellos and envelopes: the parsers return an error or a value, never panic;
    /// a hello that parses names a node.
    #[test]
    fn mutated_hellos_and_envelopes_never_panic(
        payload in proptest::collection::vec(any::<u8>(), 0..300),
        mutation in mutation(),
    ) {
        let hello = protocol::hello_frame(&NodeId::new("node-1"));
        if let Some(bad) = mutate(&hello[4..], &mutation) {
            let _ = protocol::parse_hello(&bad);
        }
        let mut encoded = Vec::new();
        wire::encode_envelope(&sample_envelope(payload.clone()), &mut encoded).unwrap();
        let decoded = wire::decode_envelope(&encoded).unwrap();
        prop_assert_eq!(decoded.payload.as_slice(), payload.as_slice());
        if let Some(bad) = mutate(&encoded, &mutation) {
            let _ = wire::decode_envelope(&bad);
        }
    }
}
