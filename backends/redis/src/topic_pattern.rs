//! comms topic patterns on Redis pub/sub channels.
//!
//! A topic `a.b` is published on channel `<prefix>:topic:a.b`. A pattern is subscribed with
//! `PSUBSCRIBE` on a Redis glob: literal segments are escaped, `*` (one segment) and `>` (the
//! rest) both become the glob `*`. Redis' `*` also matches dots, so the glob is coarser than
//! the comms pattern: every message is checked again with the exact comms semantics
//! ([`matches()`]) before it is delivered, and delivered once even when several patterns match.

pub use comms_plugin_api::topics::matches;

/// The channel a topic is published on.
pub fn channel(prefix: &str, topic: &str) -> String {
    format!("{prefix}:topic:{topic}")
}

/// The topic of a channel, if it is one of this prefix.
pub fn topic_of<'a>(prefix: &str, channel: &'a str) -> Option<&'a str> {
    channel.strip_prefix(prefix)?.strip_prefix(":topic:")
}

/// The Redis glob that selects (at least) every channel whose topic matches `pattern`.
pub fn glob(prefix: &str, pattern: &str) -> String {
    let mut glob = String::with_capacity(prefix.len() + pattern.len() + 8);
    escape_into(&mut glob, prefix);
    glob.push_str(":topic:");
    for (index, segment) in pattern.split('.').enumerate() {
        if index > 0 {
            glob.push('.');
        }
        match segment {
            "*" | ">" => glob.push('*'),
            literal => escape_into(&mut glob, literal),
        }
    }
    glob
}

pub(crate) fn escape_into(out: &mut String, literal: &str) {
    for c in literal.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
}

/// Redis glob matching (`*`, `?`, `[...]`, `\` escapes), as the server does it, to tell which
/// of a node's globs a channel matched (used in tests to check [`glob`]).
#[cfg(test)]
fn glob_matches(glob: &[u8], text: &[u8]) -> bool {
    match glob.split_first() {
        None => text.is_empty(),
        Some((b'*', rest)) => (0..=text.len()).any(|skip| glob_matches(rest, &text[skip..])),
        Some((b'?', rest)) => !text.is_empty() && glob_matches(rest, &text[1..]),
        Some((b'\\', rest)) if !rest.is_empty() => {
            text.first() == Some(&rest[0]) && glob_matches(&rest[1..], &text[1..])
        }
        Some((c, rest)) => text.first() == Some(c) && glob_matches(rest, &text[1..]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_glob_selects_every_matching_channel() {
        let cases = [("a.*", "a.b"), ("a.>", "a.b.c"), ("a[1]?.b", "a[1]?.b"), ("x.*.z", "x.yy.z")];
        for (pattern, topic) in cases {
            assert!(matches(pattern, topic));
            let glob = glob("comms", pattern);
            assert!(glob_matches(glob.as_bytes(), channel("comms", topic).as_bytes()), "{glob} vs {topic}");
        }
        // Literal glob characters do not act as wildcards.
        assert!(!glob_matches(glob("comms", "a?").as_bytes(), channel("comms", "ab").as_bytes()));
        assert_eq!(topic_of("comms", "comms:topic:a.b"), Some("a.b"));
        assert_eq!(topic_of("comms", "other:topic:a.b"), None);
    }
}
