//! The comms topic pattern syntax (from comms-plugin-api), with this plugin's error type. It is
//! checked and matched in Rust because SQL `LIKE`/`GLOB` cannot say "exactly one segment".

use comms_plugin_api::{topics, ErrorCode, PluginError};

pub(crate) use comms_plugin_api::topics::matches;

/// Checks a subscription pattern.
pub(crate) fn validate_pattern(pattern: &str) -> Result<(), PluginError> {
    topics::validate_pattern(pattern)
        .map_err(|error| PluginError::new(ErrorCode::INVALID_ADDRESS, error.to_string()))
}

/// Checks a topic that is published to: a valid pattern without wildcards.
pub(crate) fn validate_topic(topic: &str) -> Result<(), PluginError> {
    topics::validate_topic(topic)
        .map_err(|error| PluginError::new(ErrorCode::INVALID_ADDRESS, error.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_carry_the_plugin_error_code() {
        assert!(validate_pattern("a.*.b").is_ok() && validate_topic("a.b").is_ok());
        assert_eq!(validate_pattern("a..b").unwrap_err().code, ErrorCode::INVALID_ADDRESS);
        assert_eq!(validate_topic("a.*").unwrap_err().code, ErrorCode::INVALID_ADDRESS);
        assert!(matches("a.>", "a.b.c"));
    }
}
