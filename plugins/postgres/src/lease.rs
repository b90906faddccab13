//! The protocol logic of a receiver, with no database and no clock: which claimed rows are
//! delivered and which go to the dead-letter table (and why), how long an idle receiver sleeps,
//! and how a topic pattern becomes the regular expression stored with a subscription.
//!
//! Everything here is a pure function, tested below without a server.

use comms_plugin_api::{
    inbound::{self, StoredMessageLimits},
    Envelope,
};
use std::time::Duration;

/// The envelope of a claimed row, or why the row goes to the dead-letter table instead
/// ([`inbound::check_stored_message`], whose reasons every database backend shares).
///
/// `attempts` is the row's count *after* the claim (the claim counts itself): it is the number
/// of this delivery, so the `max_attempts`-th delivery is still made and the next claim moves
/// the row.
pub(crate) fn check_row(
    envelope: &[u8],
    attempts: i32,
    limits: &StoredMessageLimits,
) -> Result<Envelope, String> {
    inbound::check_stored_message(envelope, u64::try_from(attempts).unwrap_or(0), limits)
}

/// How long an idle receiver waits before it looks at its mailbox on its own: until the earliest
/// lease on its mailbox runs out (`next_expiry_ms` from now, as the server measured it: the rows
/// become claimable then, and nothing notifies that), and never longer than the safety poll
/// `poll` (a notification can be lost with a connection). At least 1 ms, so a lease that the
/// server says ends now is not polled in a busy loop.
pub(crate) fn idle_delay(next_expiry_ms: Option<f64>, poll: Duration) -> Duration {
    let until_expiry = next_expiry_ms
        .filter(|ms| ms.is_finite())
        .map(|ms| Duration::from_millis(ms.clamp(0.0, u64::MAX as f64) as u64 + 1));
    until_expiry.map_or(poll, |expiry| expiry.min(poll)).max(Duration::from_millis(1))
}

/// The POSIX regular expression (PostgreSQL's `~`) that matches exactly the topics `pattern`
/// matches (`comms_plugin_api::topics`): `*` one segment, a final `>` one or more. Stored with
/// the subscription, so that a publish (from comms or from SQL, `comms_publish`) finds its
/// subscribers in one query. `pattern` must be valid.
pub(crate) fn pattern_regex(pattern: &str) -> String {
    let mut regex = String::from("^");
    for (index, segment) in pattern.split('.').enumerate() {
        if index > 0 {
            regex.push_str("\\.");
        }
        match segment {
            "*" => regex.push_str("[^.]+"),
            ">" => regex.push_str(".+"),
            literal => {
                for character in literal.chars() {
                    if !character.is_alphanumeric() && character != '_' && character != '-' {
                        regex.push('\\');
                    }
                    regex.push(character);
                }
            }
        }
    }
    regex.push('$');
    regex
}

#[cfg(test)]
mod tests {
    use super::*;
    use comms_plugin_api::{
        inbound::{MALFORMED_REASON, MAX_ATTEMPTS_REASON},
        wire, Destination, MessageId, NodeId,
    };

    const LIMITS: StoredMessageLimits = StoredMessageLimits { max_attempts: 3, max_message_size: 4 };

    fn encoded(payload: &[u8]) -> Vec<u8> {
        let envelope = Envelope::new(
            MessageId::from_u128(1),
            NodeId::new("a"),
            Destination::Node(NodeId::new("b")),
            payload.to_vec(),
        );
        let mut bytes = Vec::new();
        wire::encode_envelope(&envelope, &mut bytes).unwrap();
        bytes
    }

    #[test]
    fn the_last_allowed_delivery_is_made_and_the_next_claim_dead_letters() {
        let good = encoded(b"1234");
        assert_eq!(check_row(&good, 1, &LIMITS).unwrap().payload.as_slice(), b"1234");
        assert!(check_row(&good, 3, &LIMITS).is_ok(), "the third delivery of three");
        assert_eq!(check_row(&good, 4, &LIMITS).unwrap_err(), MAX_ATTEMPTS_REASON);
        assert_eq!(check_row(&good, i32::MAX, &LIMITS).unwrap_err(), MAX_ATTEMPTS_REASON);
    }

    #[test]
    fn bad_bytes_and_oversized_payloads_have_their_own_reasons() {
        let good = encoded(b"1234");
        assert_eq!(
            check_row(&good[..good.len() - 1], 1, &LIMITS).unwrap_err(),
            "not a valid wire-encoded envelope: envelope truncated while reading payload"
        );
        assert_eq!(
            check_row(&encoded(b"12345"), 1, &LIMITS).unwrap_err(),
            inbound::oversized_reason(5, 4).unwrap()
        );
        assert!(check_row(b"", 1, &LIMITS).unwrap_err().starts_with(MALFORMED_REASON));
    }

    #[test]
    fn an_idle_receiver_wakes_for_the_next_lease_or_the_safety_poll() {
        let ms = Duration::from_millis;
        assert_eq!(idle_delay(None, ms(5000)), ms(5000));
        assert_eq!(idle_delay(Some(200.4), ms(5000)), ms(201), "just after the lease ends");
        assert_eq!(idle_delay(Some(9000.0), ms(5000)), ms(5000));
        assert_eq!(idle_delay(Some(-3.0), ms(5000)), ms(1), "already over: look now, not in a loop");
        assert_eq!(idle_delay(Some(f64::NAN), ms(50)), ms(50));
    }

    #[test]
    fn pattern_regexes_match_what_the_topic_rules_match() {
        use comms_plugin_api::topics::matches;
        let patterns = ["orders.eu.created", "orders.*.created", "orders.>", ">", "*.*", "a+b.(x)", "ü.*"];
        let topics = [
            "orders.eu.created",
            "orders.us.created",
            "orders.us.west.created",
            "orders",
            "orders.eu",
            "a.b",
            "a+b.(x)",
            "aab.(x)",
            "ü.x",
        ];
        // A tiny matcher for the regex subset pattern_regex writes, so the test needs no server:
        // literals (escaped or not), `[^.]+`, `.+` and `\.`.
        fn regex_matches(regex: &str, topic: &str) -> bool {
            let body = regex.trim_start_matches('^').trim_end_matches('$');
            let parts: Vec<String> = body.split("\\.").map(|part| part.replace('\\', "")).collect();
            let segments: Vec<&str> = topic.split('.').collect();
            for (index, part) in parts.iter().enumerate() {
                match part.as_str() {
                    ".+" => return segments.len() > index,
                    "[^.]+" if index < segments.len() => {}
                    literal if index < segments.len() && segments[index] == literal => {}
                    _ => return false,
                }
            }
            parts.len() == segments.len()
        }
        for pattern in patterns {
            let regex = pattern_regex(pattern);
            for topic in topics {
                assert_eq!(
                    regex_matches(&regex, topic),
                    matches(pattern, topic),
                    "{pattern} ({regex}) on {topic}"
                );
            }
        }
        assert_eq!(pattern_regex("orders.*.>"), "^orders\\.[^.]+\\..+$");
        assert_eq!(pattern_regex("a+b"), "^a\\+b$");
    }
}
