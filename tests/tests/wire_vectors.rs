//! The test vectors of `docs/wire-vectors.json` (shown in `docs/wire.md`) are what comms
//! writes and reads: every envelope encodes to its bytes and decodes back, every invalid one is
//! refused with its reason, the TCP frames and the record message of hellos and heartbeats are
//! byte for byte the same. The Python client checks the same file
//! (`clients/python/tests/test_vectors.py`), so both sides agree through it.

use comms_host::control::RecordMessage;
use comms_plugin_api::{
    stream_transport::protocol, wire, Destination, Envelope, Extensions, MessageId, NodeId,
};
use comms_tests::workspace_root;
use serde_json::Value;

fn vectors() -> Value {
    let path = workspace_root().join("docs/wire-vectors.json");
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

fn text<'a>(value: &'a Value, key: &str) -> &'a str {
    value[key].as_str().unwrap_or_else(|| panic!("`{key}` is not a string in {value}"))
}

fn list<'a>(value: &'a Value, key: &str) -> &'a Vec<Value> {
    value[key].as_array().unwrap_or_else(|| panic!("`{key}` is not an array in {value}"))
}

fn unhex(text: &str) -> Vec<u8> {
    assert!(text.len() % 2 == 0, "odd hex {text}");
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex")).collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn id(text: &str) -> MessageId {
    MessageId::from_u128(u128::from_str_radix(text, 16).expect("a hex id"))
}

fn pairs(value: &Value, key: &str) -> Vec<(String, String)> {
    list(value, key)
        .iter()
        .map(|pair| (pair[0].as_str().unwrap().to_string(), pair[1].as_str().unwrap().to_string()))
        .collect()
}

/// The envelope a vector describes, built from its fields (not from its bytes).
fn envelope_of(vector: &Value) -> Envelope {
    let kind = match text(vector, "to_kind") {
        "node" => Destination::node(text(vector, "to")),
        "topic" => Destination::topic(text(vector, "to")),
        "service" => Destination::service(text(vector, "to")),
        other => panic!("unknown to_kind {other}"),
    };
    let mut extensions = Extensions::new();
    for extension in list(vector, "extensions") {
        extensions.set(extension[0].as_str().unwrap(), unhex(extension[1].as_str().unwrap()));
    }
    Envelope::new(
        id(text(vector, "id")),
        NodeId::new(text(vector, "from")),
        kind,
        unhex(text(vector, "payload_hex")),
    )
    .with_correlation_id(vector["correlation_id"].as_str().map(id))
    .with_headers(pairs(vector, "headers"))
    .with_extensions(extensions)
}

#[test]
fn every_envelope_vector_encodes_to_its_bytes_and_decodes_back() {
    let vectors = vectors();
    assert_eq!(vectors["wire_version"], u64::from(wire::WIRE_VERSION));
    let envelopes = list(&vectors, "envelopes");
    assert!(envelopes.len() >= 5, "the vectors cover requests, responses, topics, hellos");
    for vector in envelopes {
        let name = text(vector, "name");
        let envelope = envelope_of(vector);
        let mut bytes = Vec::new();
        wire::encode_envelope(&envelope, &mut bytes).unwrap();
        assert_eq!(hex(&bytes), text(vector, "hex"), "vector `{name}` encodes differently");
        assert_eq!(wire::encoded_len(&envelope).unwrap(), bytes.len(), "vector `{name}`");
        let decoded = wire::decode_envelope(&unhex(text(vector, "hex")))
            .unwrap_or_else(|e| panic!("vector `{name}` does not decode: {e}"));
        assert_eq!(decoded, envelope, "vector `{name}` decodes differently");
    }
}

#[test]
fn every_invalid_envelope_vector_is_refused_with_its_reason() {
    let vectors = vectors();
    let invalid = list(&vectors, "invalid_envelopes");
    assert!(!invalid.is_empty());
    for vector in invalid {
        let name = text(vector, "name");
        let error = wire::decode_envelope(&unhex(text(vector, "hex")))
            .expect_err(&format!("invalid vector `{name}` decoded"));
        assert!(
            error.to_string().contains(text(vector, "error")),
            "vector `{name}`: the error `{error}` does not say `{}`",
            text(vector, "error")
        );
    }
}

#[test]
fn tcp_frame_vectors_are_what_stream_transports_write() {
    let vectors = vectors();
    let envelopes = list(&vectors, "envelopes");
    for vector in list(&vectors, "tcp_frames") {
        let written = match text(vector, "name") {
            "hello" => {
                let frame = protocol::hello_frame(&NodeId::new(text(vector, "node")));
                assert_eq!(protocol::parse_hello(&frame[4..]), Ok(NodeId::new(text(vector, "node"))));
                frame
            }
            "envelope" => {
                let wanted = text(vector, "envelope");
                let source = envelopes.iter().find(|e| text(e, "name") == wanted).expect("named envelope");
                protocol::envelope_frame(&envelope_of(source), u32::MAX).unwrap()
            }
            "goodbye" => protocol::goodbye_frame(),
            other => panic!("unknown frame vector `{other}`"),
        };
        assert_eq!(hex(&written), text(vector, "hex"), "frame `{}`", text(vector, "name"));
    }
}

#[test]
fn record_message_vectors_are_what_hellos_and_heartbeats_carry() {
    let vectors = vectors();
    for vector in list(&vectors, "record_messages") {
        let strings = |key: &str| -> Vec<String> {
            list(vector, key).iter().map(|s| s.as_str().unwrap().to_string()).collect()
        };
        let message = RecordMessage {
            v: 1,
            addresses: pairs(vector, "addresses"),
            services: strings("services"),
            topics: strings("topics"),
            metadata: pairs(vector, "metadata"),
            reply: vector["reply"].as_bool().unwrap(),
            offline: vector["offline"].as_bool().unwrap(),
            // The vectors have none: the key is then left out, as before it existed.
            extensions: Default::default(),
        };
        assert_eq!(String::from_utf8(message.encode()).unwrap(), text(vector, "json"));
        assert_eq!(RecordMessage::decode(text(vector, "json").as_bytes()).unwrap(), message);
    }
    // The `hello` envelope vector carries the record message vector as its payload.
    let hello = list(&vectors, "envelopes").iter().find(|e| text(e, "name") == "hello").expect("a hello");
    let record = &list(&vectors, "record_messages")[0];
    assert_eq!(unhex(text(hello, "payload_hex")), text(record, "json").as_bytes());
}
