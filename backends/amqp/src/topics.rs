//! comms topic patterns as AMQP topic-exchange binding keys.
//!
//! Both use dot-separated segments and `*` for exactly one segment. comms' `>` (one or more
//! remaining segments) becomes `*.#`, because AMQP's `#` alone also matches zero segments.

use comms_plugin_api::{ErrorCode, PluginError};

/// The binding key for comms `pattern`. Refuses a pattern AMQP would read differently: a
/// segment that is exactly `#` (an AMQP wildcard that comms does not have).
pub fn binding_key(pattern: &str) -> Result<String, PluginError> {
    if pattern.is_empty() {
        return Err(PluginError::new(ErrorCode::INVALID_ADDRESS, "an empty topic pattern"));
    }
    let segments: Vec<&str> = pattern.split('.').collect();
    let mut key = Vec::with_capacity(segments.len() + 1);
    for (index, segment) in segments.iter().enumerate() {
        match *segment {
            "#" => {
                return Err(PluginError::new(
                    ErrorCode::INVALID_ADDRESS,
                    format!(
                        "topic pattern `{pattern}`: a segment `#` is an AMQP wildcard comms does not have"
                    ),
                ))
            }
            ">" if index + 1 == segments.len() => key.extend(["*", "#"]),
            other => key.push(other),
        }
    }
    Ok(key.join("."))
}

#[cfg(test)]
mod tests {
    use super::binding_key;

    #[test]
    fn wildcards_map_onto_amqp_ones() {
        assert_eq!(binding_key("orders.eu").unwrap(), "orders.eu");
        assert_eq!(binding_key("orders.*").unwrap(), "orders.*");
        assert_eq!(binding_key("orders.>").unwrap(), "orders.*.#");
        assert_eq!(binding_key(">").unwrap(), "*.#");
        assert_eq!(binding_key("a.*.b.>").unwrap(), "a.*.b.*.#");
    }

    #[test]
    fn amqp_only_wildcards_are_refused() {
        assert!(binding_key("orders.#").is_err());
        assert!(binding_key("").is_err());
    }
}
