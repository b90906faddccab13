//! Topic names and subscription patterns, as every part of comms understands them: the host's
//! fan-out and the backends that map patterns onto a broker's own syntax use this one definition.
//!
//! A topic is a dot-separated list of non-empty segments: `orders.eu.created`. A pattern may use
//! two wildcards: `*` matches exactly one segment (`orders.*.created`), `>` as the last segment
//! matches one or more remaining segments (`orders.>`). A topic that is published to contains no
//! wildcard.

/// Why a topic or pattern is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// Empty string or an empty segment (`a..b`, `.a`, `a.`).
    #[error("topic `{0}` has an empty segment")]
    EmptySegment(String),
    /// `>` somewhere other than the last segment, or a wildcard inside a segment (`a*`).
    #[error("pattern `{0}`: `*` must be a whole segment and `>` the whole last segment")]
    MisplacedWildcard(String),
    /// A wildcard in a topic that is published to.
    #[error("topic `{0}` contains a wildcard; wildcards are for subscriptions")]
    WildcardInTopic(String),
}

/// Checks a subscription pattern.
pub fn validate_pattern(pattern: &str) -> Result<(), TopicError> {
    let segments: Vec<&str> = pattern.split('.').collect();
    for (index, segment) in segments.iter().enumerate() {
        if segment.is_empty() {
            return Err(TopicError::EmptySegment(pattern.to_string()));
        }
        let is_last = index + 1 == segments.len();
        let bad_wildcard = (segment.contains('*') && *segment != "*")
            || (segment.contains('>') && (*segment != ">" || !is_last));
        if bad_wildcard {
            return Err(TopicError::MisplacedWildcard(pattern.to_string()));
        }
    }
    Ok(())
}

/// Checks a topic that is published to.
pub fn validate_topic(topic: &str) -> Result<(), TopicError> {
    validate_pattern(topic)?;
    if topic.split('.').any(|segment| segment == "*" || segment == ">") {
        return Err(TopicError::WildcardInTopic(topic.to_string()));
    }
    Ok(())
}

/// Whether `topic` matches `pattern` (both assumed valid).
pub fn matches(pattern: &str, topic: &str) -> bool {
    let mut pattern_segments = pattern.split('.');
    let mut topic_segments = topic.split('.');
    loop {
        match (pattern_segments.next(), topic_segments.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(expected), Some(actual)) if expected == actual => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_star_and_tail_wildcards() {
        assert!(matches("orders.eu.created", "orders.eu.created"));
        assert!(!matches("orders.eu.created", "orders.us.created"));
        assert!(matches("orders.*.created", "orders.us.created"));
        assert!(!matches("orders.*.created", "orders.us.west.created"));
        assert!(!matches("orders.*.created", "orders.created"));
        assert!(matches("orders.>", "orders.eu"));
        assert!(matches("orders.>", "orders.eu.created.late"));
        assert!(!matches("orders.>", "orders"), "`>` needs at least one segment");
        assert!(matches(">", "anything.at.all"));
        assert!(matches("*.*", "a.b"));
        assert!(!matches("*.*", "a.b.c"));
        assert!(!matches("orders", "orders.eu"));
        assert!(!matches("orders.eu", "orders"));
    }

    #[test]
    fn invalid_patterns_and_topics_are_refused() {
        assert!(validate_pattern("orders.*.created").is_ok());
        assert!(validate_pattern("orders.>").is_ok());
        assert_eq!(validate_pattern("a..b"), Err(TopicError::EmptySegment("a..b".into())));
        assert!(validate_pattern("").is_err());
        assert!(validate_pattern("a.>.b").is_err());
        assert!(validate_pattern("a*.b").is_err());
        assert!(validate_pattern("a.b>").is_err());
        assert!(validate_topic("orders.eu").is_ok());
        assert_eq!(validate_topic("orders.*"), Err(TopicError::WildcardInTopic("orders.*".into())));
    }
}
