//! The layer's config table: [`FaultConfig`].

use serde::{Deserialize, Serialize};

/// The faults to inject into one transport: the layer's table (`{ plugin = "faults", ... }` in a
/// transport's `layers`), every key but `plugin` and `path`. Every key is optional; the default
/// injects nothing. Unknown keys are errors.
///
/// Serializes to a table the layer reads back unchanged, in TOML too (whose integers are signed
/// 64-bit): a `seed` above `i64::MAX` is written as the negative integer with the same 64 bits,
/// which reads back as the same seed; a `delay_ms` or `jitter_ms` above `i64::MAX` (some 292
/// million years) is written as `i64::MAX`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FaultConfig {
    /// Probability (0 to 1) that a message is silently dropped.
    pub drop: f64,
    /// Fixed delay added to every message, in milliseconds.
    #[serde(serialize_with = "toml_integer::clamped")]
    pub delay_ms: u64,
    /// Upper bound of a uniformly random extra delay (`0..=jitter_ms`), in milliseconds.
    #[serde(serialize_with = "toml_integer::clamped")]
    pub jitter_ms: u64,
    /// Probability (0 to 1) that a message is sent twice.
    pub duplicate: f64,
    /// Probability (0 to 1) that a message is held and sent after the next one.
    pub reorder: f64,
    /// Seed of the decisions; the same seed replays the same decisions. Any 64-bit integer: in
    /// TOML, a negative seed `-n` is the seed `2^64 - n`.
    #[serde(serialize_with = "toml_integer::seed", deserialize_with = "toml_integer::deserialize_seed")]
    pub seed: u64,
}

impl FaultConfig {
    /// Checks that every probability is between 0 and 1; the error names the key (relative to
    /// the layer's table: `` key `drop`: ... ``).
    pub fn validate(&self) -> Result<(), String> {
        for (key, probability) in
            [("drop", self.drop), ("duplicate", self.duplicate), ("reorder", self.reorder)]
        {
            if !(0.0..=1.0).contains(&probability) {
                return Err(format!(
                    "key `{key}`: must be a probability between 0 and 1, found {probability}"
                ));
            }
        }
        Ok(())
    }

    /// Whether this config injects no fault at all (every message sent once, at once).
    pub fn is_noop(&self) -> bool {
        self.drop == 0.0
            && self.duplicate == 0.0
            && self.reorder == 0.0
            && self.delay_ms == 0
            && self.jitter_ms == 0
    }

    /// Whether messages may reach the transport in another order than they were sent: held
    /// messages go after later ones, and delayed ones (sent from concurrent tasks) may overtake
    /// each other.
    pub(crate) fn may_reorder(&self) -> bool {
        self.reorder > 0.0 || self.delay_ms > 0 || self.jitter_ms > 0
    }
}

/// The integers of [`FaultConfig`] as TOML can hold them (signed 64-bit).
mod toml_integer {
    use serde::{de, Deserializer, Serializer};
    use std::fmt;

    /// Writes a `u64` that fits in an `i64` as is, and a larger one as `i64::MAX`.
    pub(super) fn clamped<S: Serializer>(value: &u64, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u64((*value).min(i64::MAX.unsigned_abs()))
    }

    /// Writes a seed that fits in an `i64` as is, and a larger one as the negative `i64` with
    /// the same bits ([`deserialize_seed`] reads it back).
    pub(super) fn seed<S: Serializer>(seed: &u64, serializer: S) -> Result<S::Ok, S::Error> {
        match i64::try_from(*seed) {
            Ok(_) => serializer.serialize_u64(*seed),
            Err(_) => serializer.serialize_i64(i64::from_ne_bytes(seed.to_ne_bytes())),
        }
    }

    /// Reads a seed: any unsigned 64-bit integer, or a negative one standing for the unsigned
    /// integer with the same bits.
    pub(super) fn deserialize_seed<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
        struct Seed;

        impl de::Visitor<'_> for Seed {
            type Value = u64;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an integer")
            }

            fn visit_u64<E: de::Error>(self, value: u64) -> Result<u64, E> {
                Ok(value)
            }

            fn visit_i64<E: de::Error>(self, value: i64) -> Result<u64, E> {
                Ok(u64::from_ne_bytes(value.to_ne_bytes()))
            }
        }

        deserializer.deserialize_u64(Seed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use comms_plugin_api::config::parse_config;

    fn config(text: &str) -> FaultConfig {
        parse_config(text).unwrap()
    }

    #[test]
    fn validation_names_the_key() {
        for (text, key) in
            [("drop = 1.5", "drop"), ("duplicate = -0.1", "duplicate"), ("reorder = nan", "reorder")]
        {
            let error = config(text).validate().unwrap_err();
            assert!(error.starts_with(&format!("key `{key}`: must be a probability")), "{error}");
        }
        config("drop = 1.0\nduplicate = 0.0\nreorder = 0.5").validate().unwrap();
        FaultConfig::default().validate().unwrap();
    }

    #[test]
    fn config_parses_from_toml_and_rejects_unknown_keys() {
        let faults = config("drop = 0.1\nseed = 7");
        assert_eq!(faults, FaultConfig { drop: 0.1, seed: 7, ..FaultConfig::default() });
        let error = parse_config::<FaultConfig>("dorp = 0.1").unwrap_err();
        assert!(error.message.contains("unknown field `dorp`"), "{error}");
        let error = toml::from_str::<FaultConfig>("dorp = 0.1").unwrap_err();
        assert!(error.to_string().contains("unknown field `dorp`"), "{error}");
        let error = parse_config::<FaultConfig>("delay_ms = \"soon\"").unwrap_err();
        assert!(error.message.starts_with("key `delay_ms`:"), "{error}");
    }

    #[test]
    fn no_key_means_no_fault() {
        assert!(FaultConfig::default().is_noop());
        assert!(config("seed = 99").is_noop());
        assert!(!config("jitter_ms = 1").is_noop());
        assert!(!config("reorder = 0.5").is_noop());
    }

    #[test]
    fn serializes_to_toml_and_reads_back_the_same() {
        let faults =
            FaultConfig { drop: 0.1, delay_ms: 20, jitter_ms: 10, duplicate: 0.01, reorder: 0.05, seed: 7 };
        let text = toml::to_string(&faults).unwrap();
        assert_eq!(config(&text), faults, "{text}");
        // Every seed survives TOML's signed integers.
        for seed in [0, 1, i64::MAX.unsigned_abs(), i64::MAX.unsigned_abs() + 1, u64::MAX] {
            let faults = FaultConfig { seed, ..FaultConfig::default() };
            let text = toml::to_string(&faults).unwrap();
            assert_eq!(config(&text).seed, seed, "{text}");
        }
        assert_eq!(config("seed = -1").seed, u64::MAX);
        let forever = FaultConfig { delay_ms: u64::MAX, jitter_ms: u64::MAX, ..FaultConfig::default() };
        let text = toml::to_string(&forever).unwrap();
        let read = config(&text);
        assert_eq!((read.delay_ms, read.jitter_ms), (i64::MAX.unsigned_abs(), i64::MAX.unsigned_abs()));
    }
}
