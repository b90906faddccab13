//! Turning a plugin's TOML table into the plugin's own config struct.

use crate::PluginError;
use serde::de::DeserializeOwned;

/// Deserializes `toml_text` (the plugin's table) into `T`.
///
/// Give `T` `#[serde(deny_unknown_fields)]` so that a misspelt key is an error. The error names
/// the offending key (`key `max_frame_size`: invalid type ...`); the host adds the file and table.
pub fn parse_config<T: DeserializeOwned>(toml_text: &str) -> Result<T, PluginError> {
    let deserializer = toml::Deserializer::new(toml_text);
    serde_path_to_error::deserialize(deserializer).map_err(|error| {
        let path = error.path().to_string();
        let message = error.inner().message().to_string();
        if path == "." || message.contains("unknown field") {
            // The message already names an unknown field; add the table it is in, if nested.
            let at = match path.rsplit_once('.') {
                Some((parent, _)) => format!(" in `{parent}`"),
                None => String::new(),
            };
            PluginError::invalid_config(format!("{message}{at}"))
        } else {
            PluginError::invalid_config(format!("key `{path}`: {message}"))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Example {
        port: u16,
        #[serde(default)]
        name: String,
    }

    #[test]
    fn unknown_key_is_named() {
        let error = parse_config::<Example>("port = 1\nprot = 2").unwrap_err();
        assert!(error.message.starts_with("unknown field `prot`"), "{error}");
        assert!(!error.message.contains(" in `"), "a top-level key has no parent: {error}");
    }

    #[test]
    fn mistyped_key_is_named() {
        let error = parse_config::<Example>("port = \"eighty\"").unwrap_err();
        assert!(error.message.contains("key `port`"), "{error}");
    }

    #[test]
    fn valid_config_parses() {
        let config = parse_config::<Example>("port = 80").unwrap();
        assert_eq!(config.port, 80);
    }
}
