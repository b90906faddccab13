//! Turning a plugin's TOML table into the plugin's own config struct.
//!
//! [`parse_config`] (and [`crate::Setup::config`], which calls it) rejects every key the struct
//! does not read, whatever its serde attributes are: a plugin does not need
//! `#[serde(deny_unknown_fields)]` for a misspelt key to be an error. The error names the key, the
//! table it is in when nested, and the keys that table accepts:
//!
//! ```
//! use comms_plugin_api::{config::parse_config, serde::Deserialize};
//!
//! #[derive(Debug, Deserialize)]
//! #[serde(crate = "comms_plugin_api::serde")]
//! struct Config {
//!     listen: String,
//!     #[serde(default)]
//!     max_frame_size: u32,
//! }
//!
//! let error = parse_config::<Config>("listen = \"127.0.0.1:0\"\nmax_frame_sise = 1").unwrap_err();
//! assert_eq!(error.message, "unknown field `max_frame_sise`, expected `listen` or `max_frame_size`");
//! ```
//!
//! What cannot be checked: keys inside a `#[serde(flatten)]`ed struct or an untagged enum are
//! buffered by serde before the struct sees them, so a typo there is ignored as serde would
//! ignore it. Add `#[serde(deny_unknown_fields)]` to such types if that matters.

use crate::PluginError;
use serde::de::{self, DeserializeOwned, IntoDeserializer, Visitor};
use std::cell::Cell;

/// Deserializes `toml_text` (the plugin's table) into `T`.
///
/// Errors name the offending key: `key `max_frame_size`: invalid type ...` for a bad value,
/// ``unknown field `max_frame_sise`, expected one of `listen`, `max_frame_size`, ...`` for a key
/// `T` does not read (followed by `` in `tls` `` when nested), whether or not `T` has
/// `#[serde(deny_unknown_fields)]`. The host adds the file and table.
pub fn parse_config<T: DeserializeOwned>(toml_text: &str) -> Result<T, PluginError> {
    let mut ignored: Vec<Vec<Segment>> = Vec::new();
    let mut on_ignored = |path: serde_ignored::Path<'_>| ignored.push(segments(&path));
    let deserializer = serde_ignored::Deserializer::new(toml::Deserializer::new(toml_text), &mut on_ignored);
    let result: Result<T, _> = serde_path_to_error::deserialize(deserializer);
    // A key read before the failure was ignored: most likely the misspelling of the key the
    // failure is about (a missing field, say), so it is the error worth reporting.
    if let Some(error) = ignored.iter().find_map(|path| unknown_key::<T>(path)) {
        return Err(error);
    }
    result.map_err(|error| {
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

/// One step of the path to a key: a table key or an array index.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Key(String),
    Index(usize),
}

/// The path serde_ignored reports, as keys and indices (`Option` and newtype layers, which the
/// TOML text does not show, left out).
fn segments(path: &serde_ignored::Path<'_>) -> Vec<Segment> {
    use serde_ignored::Path;
    match path {
        Path::Root => Vec::new(),
        Path::Seq { parent, index } => {
            let mut segments = segments(parent);
            segments.push(Segment::Index(*index));
            segments
        }
        Path::Map { parent, key } => {
            let mut segments = segments(parent);
            segments.push(Segment::Key(key.clone()));
            segments
        }
        Path::Some { parent } | Path::NewtypeStruct { parent } | Path::NewtypeVariant { parent } => {
            segments(parent)
        }
    }
}

/// `path` as it reads in TOML: `servers[0].tls`.
fn display(path: &[Segment]) -> String {
    let mut text = String::new();
    for segment in path {
        match segment {
            Segment::Key(key) if text.is_empty() => text.push_str(key),
            Segment::Key(key) => {
                text.push('.');
                text.push_str(key);
            }
            Segment::Index(index) => text.push_str(&format!("[{index}]")),
        }
    }
    text
}

/// The error for the key at `path` that `T` did not read: the same words serde uses for
/// `deny_unknown_fields`, and the table it is in. `None` for a field `T` declares and ignores on
/// purpose (a field of type `serde::de::IgnoredAny`).
fn unknown_key<T: DeserializeOwned>(path: &[Segment]) -> Option<PluginError> {
    let Some((Segment::Key(key), parent)) = path.split_last() else {
        return Some(PluginError::invalid_config(format!("`{}`: not read by this plugin", display(path))));
    };
    let message = match expected_fields::<T>(parent) {
        Some(fields) if fields.contains(&key.as_str()) => return None,
        Some(fields) => <de::value::Error as de::Error>::unknown_field(key, fields).to_string(),
        None => format!("unknown field `{key}`"),
    };
    let at = match parent.is_empty() {
        true => String::new(),
        false => format!(" in `{}`", display(parent)),
    };
    Some(PluginError::invalid_config(format!("{message}{at}")))
}

/// The field names of the struct that `T` reads at `path`, as serde derives them (renames and
/// aliases included): `T` is deserialized from a [`FieldProbe`] that walks `path` and stops at
/// the struct there. `None` where no struct is found (a map, a flattened struct, an enum).
fn expected_fields<T: DeserializeOwned>(path: &[Segment]) -> Option<&'static [&'static str]> {
    let found = Cell::new(None);
    let _ = T::deserialize(FieldProbe { path, found: &found });
    found.get()
}

/// A deserializer holding nothing but one path: each table on the way has the one key the path
/// continues with, each array one element. Where the path ends, the `fields` serde passes to
/// `deserialize_struct` are recorded and deserialization stops with an error.
struct FieldProbe<'a> {
    path: &'a [Segment],
    found: &'a Cell<Option<&'static [&'static str]>>,
}

fn stop() -> de::value::Error {
    de::Error::custom("field probe stopped")
}

impl<'de> de::Deserializer<'de> for FieldProbe<'_> {
    type Error = de::value::Error;

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Self::Error> {
        Err(stop())
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        if self.path.is_empty() {
            self.found.set(Some(fields));
            return Err(stop());
        }
        self.deserialize_map(visitor)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        match self.path.split_first() {
            Some((Segment::Key(key), rest)) => {
                visitor.visit_map(OneEntry { key: Some(key), rest, found: self.found })
            }
            _ => Err(stop()),
        }
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        match self.path.split_first() {
            // Every element has the same type: the first stands for the one at `index`.
            Some((Segment::Index(_), rest)) => {
                visitor.visit_seq(OneElement { rest: Some(rest), found: self.found })
            }
            _ => Err(stop()),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        visitor.visit_some(self)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        visitor.visit_newtype_struct(self)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf unit
        unit_struct tuple tuple_struct enum identifier ignored_any
    }
}

/// The one key of a table on a [`FieldProbe`]'s path.
struct OneEntry<'a> {
    key: Option<&'a str>,
    rest: &'a [Segment],
    found: &'a Cell<Option<&'static [&'static str]>>,
}

impl<'de> de::MapAccess<'de> for OneEntry<'_> {
    type Error = de::value::Error;

    fn next_key_seed<K: de::DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Self::Error> {
        match self.key.take() {
            Some(key) => seed.deserialize(key.into_deserializer()).map(Some),
            None => Err(stop()),
        }
    }

    fn next_value_seed<V: de::DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Self::Error> {
        seed.deserialize(FieldProbe { path: self.rest, found: self.found })
    }
}

/// The one element of an array on a [`FieldProbe`]'s path.
struct OneElement<'a> {
    rest: Option<&'a [Segment]>,
    found: &'a Cell<Option<&'static [&'static str]>>,
}

impl<'de> de::SeqAccess<'de> for OneElement<'_> {
    type Error = de::value::Error;

    fn next_element_seed<T: de::DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Self::Error> {
        match self.rest.take() {
            Some(path) => seed.deserialize(FieldProbe { path, found: self.found }).map(Some),
            None => Err(stop()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use std::{collections::BTreeMap, fmt};

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Strict {
        listen: String,
        #[serde(default)]
        max_frame_size: u32,
        #[serde(default)]
        batch: u32,
    }

    /// The same fields, without `deny_unknown_fields`: what most plugins write.
    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Lenient {
        listen: String,
        #[serde(default)]
        max_frame_size: u32,
        #[serde(default)]
        batch: u32,
    }

    #[derive(Debug, Deserialize, Default)]
    #[serde(default)]
    #[allow(dead_code)]
    struct Outer {
        name: String,
        tls: Option<Tls>,
        routes: Vec<Route>,
        labels: BTreeMap<String, String>,
        #[serde(rename = "ttl-ms", alias = "ttl")]
        ttl_ms: u64,
        wrapped: Wrapped,
    }

    #[derive(Debug, Deserialize, Default)]
    #[allow(dead_code)]
    struct Tls {
        ca_file: String,
        #[serde(default)]
        client_cert_file: Option<String>,
    }

    #[derive(Debug, Deserialize, Default)]
    #[allow(dead_code)]
    struct Route {
        topic: String,
        to: String,
    }

    #[derive(Debug, Deserialize, Default)]
    #[allow(dead_code)]
    struct Wrapped(Tls);

    fn message<T: DeserializeOwned + fmt::Debug>(toml: &str) -> String {
        parse_config::<T>(toml).unwrap_err().message
    }

    #[test]
    fn unknown_key_is_named_with_or_without_deny_unknown_fields() {
        let toml = "listen = \"x\"\nmax_frame_sise = 2";
        let expected = "unknown field `max_frame_sise`, expected one of `listen`, `max_frame_size`, `batch`";
        assert_eq!(message::<Strict>(toml), expected);
        assert_eq!(message::<Lenient>(toml), expected);
    }

    #[test]
    fn a_misspelt_required_key_is_reported_as_unknown_not_missing() {
        let toml = "lisen = \"x\"";
        assert_eq!(message::<Lenient>(toml), message::<Strict>(toml));
        assert!(message::<Lenient>(toml).starts_with("unknown field `lisen`"));
    }

    #[test]
    fn unknown_keys_in_nested_tables_name_the_table_and_its_keys() {
        assert_eq!(
            message::<Outer>("[tls]\nca_fle = \"ca.pem\""),
            "unknown field `ca_fle`, expected `ca_file` or `client_cert_file` in `tls`"
        );
        assert_eq!(
            message::<Outer>("[[routes]]\ntopic = \"a\"\nto = \"b\"\n[[routes]]\ntopic = \"c\"\ntoo = \"d\""),
            "unknown field `too`, expected `topic` or `to` in `routes[1]`"
        );
        assert_eq!(
            message::<Outer>("[wrapped]\nca_file = \"a\"\nca = 1"),
            "unknown field `ca`, expected `ca_file` or `client_cert_file` in `wrapped`"
        );
        let top = message::<Outer>("nmae = \"x\"");
        assert!(top.starts_with("unknown field `nmae`, expected one of `name`, `tls`"), "{top}");
        assert!(!top.contains(" in `"), "a top-level key has no parent: {top}");
    }

    #[test]
    fn maps_renames_and_aliases_accept_their_keys() {
        let config = parse_config::<Outer>("ttl = 5\n[labels]\nanything = \"goes\"").unwrap();
        assert_eq!((config.ttl_ms, config.labels.len()), (5, 1));
        let config = parse_config::<Outer>("ttl-ms = 6").unwrap();
        assert_eq!(config.ttl_ms, 6);
    }

    #[test]
    fn a_field_ignored_on_purpose_is_not_unknown() {
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct Legacy {
            port: u16,
            /// Accepted and ignored: an old key kept so that old configs still load.
            #[serde(default)]
            host: Option<serde::de::IgnoredAny>,
        }
        assert!(parse_config::<Legacy>("port = 1\nhost = \"old\"").is_ok());
        assert_eq!(
            message::<Legacy>("port = 1\nhots = 2"),
            "unknown field `hots`, expected `port` or `host`"
        );
    }

    #[test]
    fn mistyped_key_is_named() {
        let error = parse_config::<Strict>("listen = 1").unwrap_err();
        assert_eq!(error.message.split(':').next(), Some("key `listen`"), "{error}");
        let error = parse_config::<Outer>("[tls]\nca_file = 1").unwrap_err();
        assert!(error.message.starts_with("key `tls.ca_file`:"), "{error}");
    }

    #[test]
    fn valid_config_parses() {
        let config = parse_config::<Lenient>("listen = \"a\"\nbatch = 3").unwrap();
        assert_eq!((config.listen.as_str(), config.batch), ("a", 3));
    }

    #[test]
    fn setup_config_leaves_out_the_hosts_security_key_and_still_rejects_typos() {
        let setup = |toml: &str| crate::Setup {
            node_id: crate::NodeId::new("n"),
            instance_name: "x".into(),
            config_toml: toml.into(),
            host_interface: comms_core::INTERFACE_VERSION,
            extensions: Default::default(),
        };
        let security = format!("[{}]\nlinks = \"plain\"\n", crate::security::SETUP_KEY);
        let config: Lenient = setup(&format!("listen = \"a\"\n{security}")).config().unwrap();
        assert_eq!(config.listen, "a");
        let error = setup(&format!("listen = \"a\"\nbatc = 1\n{security}")).config::<Lenient>().unwrap_err();
        assert!(error.message.starts_with("unknown field `batc`"), "{error}");
        assert!(setup(&security).link_security().unwrap().is_none());
        let noise = format!("[{}]\nlinks = \"noise\"\n", crate::security::SETUP_KEY);
        let error = setup(&noise).link_security().unwrap_err();
        #[cfg(not(feature = "noise"))]
        assert!(error.message.contains("comms-plugin-api feature `noise`"), "{error}");
        #[cfg(feature = "noise")]
        assert!(error.message.contains("node.key_file"), "{error}");
    }
}
