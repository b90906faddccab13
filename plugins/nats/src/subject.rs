//! Subjects and names derived from node ids and topics.
//!
//! | what | subject |
//! |---|---|
//! | inbox of node `n` (the transport's address) | `<prefix>.inbox.<token(n)>` |
//! | dead letters of node `n` | `<prefix>.dead-letter.<token(n)>` |
//! | topic `t` (and pattern `p`, wildcards unchanged) | `<prefix>.topic.<t>` |
//!
//! A node id may hold any character but control characters; [`token`] turns it into one
//! subject token (and key-value key, and consumer name). With `durable_topics`, the consumer of
//! node `n`'s subscription to pattern `p` is [`topic_consumer`]`(n, p)`.

use comms_plugin_api::{topics, ErrorCode, PluginError};

/// Most bytes of a [`token`] before the id is shortened to a prefix and a hash.
const MAX_TOKEN: usize = 120;

/// `id` as one subject token: letters, digits, `-` and `_` stay, every other byte becomes
/// `=XX` (upper-case hex). Ids whose token would be longer than 120 bytes keep their first 100
/// bytes of token and end with `=H` and a 64-bit FNV-1a hash of the whole id.
pub fn token(id: &str) -> String {
    let mut token = String::with_capacity(id.len());
    for byte in id.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_' {
            token.push(char::from(byte));
        } else {
            token.push_str(&format!("={byte:02X}"));
        }
    }
    if token.len() > MAX_TOKEN {
        let mut cut = 100;
        // Never cut inside an `=XX` escape.
        while token.as_bytes()[cut - 1] == b'=' || (cut >= 2 && token.as_bytes()[cut - 2] == b'=') {
            cut -= 1;
        }
        let hash = fnv1a(id);
        token.truncate(cut);
        token.push_str(&format!("=H{hash:016x}"));
    }
    token
}

/// Whether `candidate` is [`token`]`(id)`, without building the token when `id` needs none of
/// its escapes (the common case, checked for every message sent).
pub fn is_token_of(id: &str, candidate: &str) -> bool {
    let plain = id.len() <= MAX_TOKEN
        && id.bytes().all(|byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_');
    if plain {
        id == candidate
    } else {
        token(id) == candidate
    }
}

/// The 64-bit FNV-1a hash of `text`'s bytes: stable across versions and machines (the names it
/// is part of must stay the same for a node that comes back).
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The durable consumer name of `node`'s subscription to the topic pattern `pattern`
/// (`durable_topics`): `<token(node)>_<16 hex digits>`, the digits being the 64-bit FNV-1a hash
/// of the pattern. Deterministic, so that the node gets the same consumer back when it
/// subscribes again; a valid consumer name whatever the pattern holds (`.`, `*`, `>`). The
/// hash has a fixed length, so names of different nodes never collide.
pub fn topic_consumer(node: &str, pattern: &str) -> String {
    format!("{}_{:016x}", token(node), fnv1a(pattern))
}

/// The inbox subject of `node`: its address.
pub fn inbox(prefix: &str, node: &str) -> String {
    format!("{prefix}.inbox.{}", token(node))
}

/// The dead-letter subject of `node`.
pub fn dead_letter(prefix: &str, node: &str) -> String {
    format!("{prefix}.dead-letter.{}", token(node))
}

/// The subject of `topic` or of a pattern (`*` and `>` mean on NATS what they mean in comms).
/// Refuses what NATS subjects cannot carry: whitespace.
pub fn topic(prefix: &str, topic_or_pattern: &str) -> Result<String, PluginError> {
    if topic_or_pattern.chars().any(char::is_whitespace) {
        return Err(PluginError::new(
            ErrorCode::INVALID_ADDRESS,
            format!("topic `{topic_or_pattern}` contains whitespace, which NATS subjects cannot carry"),
        ));
    }
    topics::validate_pattern(topic_or_pattern)
        .map_err(|error| PluginError::new(ErrorCode::INVALID_ADDRESS, error.to_string()))?;
    Ok(format!("{prefix}.topic.{topic_or_pattern}"))
}

/// The topic of a subject received on a topic subscription, if it has the prefix.
pub fn topic_of<'a>(prefix: &str, subject: &'a str) -> Option<&'a str> {
    subject.strip_prefix(prefix)?.strip_prefix(".topic.")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_keep_plain_ids_and_escape_the_rest() {
        assert_eq!(token("node-1_a"), "node-1_a");
        assert_eq!(token("a.b c*>"), "a=2Eb=20c=2A=3E");
        assert_eq!(token("é"), "=C3=A9");
        assert_ne!(token("a.b"), token("a_b"), "distinct ids, distinct tokens");
        let long = "x.".repeat(200);
        let shortened = token(&long);
        assert!(shortened.len() <= MAX_TOKEN && shortened.contains("=H"), "{shortened}");
        assert_ne!(shortened, token(&"x.".repeat(201)));
        assert!(shortened.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_=".contains(&b)));
    }

    #[test]
    fn a_token_is_recognised_without_being_built_and_only_its_own() {
        let long_plain = "n".repeat(MAX_TOKEN + 5);
        for id in ["node-1_a", "a.b c*>", "é", "", long_plain.as_str(), &"x.".repeat(200)] {
            assert!(is_token_of(id, &token(id)), "{id}");
            assert!(!is_token_of(id, &format!("{}x", token(id))), "{id}");
        }
        // The escaped form of an id is not the token of the id spelled that way, and back.
        assert!(!is_token_of("a.b", "a.b"));
        assert!(!is_token_of("a=2Eb", "a=2Eb"), "`=` is escaped too");
        assert!(!is_token_of("a=2Eb", &token("a.b")));
    }

    #[test]
    fn subjects() {
        assert_eq!(inbox("comms", "a.b"), "comms.inbox.a=2Eb");
        assert_eq!(dead_letter("comms", "a"), "comms.dead-letter.a");
        assert_eq!(topic("comms", "orders.*").ok(), Some("comms.topic.orders.*".to_string()));
        assert!(topic("comms", "orders eu").is_err());
        assert!(topic("comms", "a..b").is_err());
        assert_eq!(topic_of("comms", "comms.topic.orders.eu"), Some("orders.eu"));
        assert_eq!(topic_of("comms", "other.topic.orders"), None);
    }

    #[test]
    fn topic_consumer_names_are_stable_valid_and_distinct() {
        // Pinned: a node that comes back must find the consumer an older build made.
        assert_eq!(topic_consumer("node-1", "orders.>"), format!("node-1_{:016x}", fnv1a("orders.>")));
        assert_eq!(fnv1a(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a("a"), 0xaf63_dc4c_8601_ec8c);
        let names = [
            topic_consumer("a", "orders.*"),
            topic_consumer("a", "orders.>"),
            topic_consumer("b", "orders.*"),
            topic_consumer("a.b", "x"),
        ];
        for (i, name) in names.iter().enumerate() {
            assert!(name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_=".contains(&b)), "{name}");
            assert!(names[i + 1..].iter().all(|other| other != name), "{names:?}");
        }
    }
}
