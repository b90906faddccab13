//! [`Text`]: strings that cross the plugin boundary without being copied.

use comms_core::abi_stable::std_types::RString;
use std::{borrow::Borrow, fmt, hash::Hash, ops::Deref};

/// Immutable UTF-8 text (node ids, topic and service names, header names and values).
///
/// It reads like a `&str` (`Deref<Target = str>`) and converts from `String` and `&str`. Its
/// buffer moves across the plugin boundary as it is: a name received from a plugin is never
/// copied on its way to the application, and one sent is never copied on its way to the plugin.
#[derive(Clone, Default, PartialOrd, Ord)]
pub struct Text(RString);

impl Text {
    /// Text from anything string-like.
    pub fn new(text: impl Into<Text>) -> Self {
        text.into()
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    pub(crate) fn into_abi(self) -> RString {
        self.0
    }

    pub(crate) fn from_abi(text: RString) -> Self {
        Self(text)
    }
}

impl Deref for Text {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for Text {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl Borrow<str> for Text {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl Hash for Text {
    /// Hashes like the `str` it holds, so that maps keyed by `Text` can be searched with `&str`.
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state)
    }
}

impl PartialEq for Text {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Text {}

impl PartialEq<str> for Text {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Text {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<String> for Text {
    fn eq(&self, other: &String) -> bool {
        self.as_str() == other
    }
}

impl From<String> for Text {
    /// Takes the string's buffer; no copy.
    fn from(text: String) -> Self {
        Self(RString::from(text))
    }
}

impl From<&str> for Text {
    fn from(text: &str) -> Self {
        Self(RString::from(text))
    }
}

impl From<&String> for Text {
    fn from(text: &String) -> Self {
        Self(RString::from(text.as_str()))
    }
}

impl From<&Text> for Text {
    fn from(text: &Text) -> Self {
        text.clone()
    }
}

impl From<Text> for String {
    /// Copies the bytes (the buffer may belong to another library).
    fn from(text: Text) -> Self {
        text.as_str().to_owned()
    }
}

impl fmt::Display for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl serde::Serialize for Text {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for Text {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Text::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn reads_and_hashes_like_str() {
        let text = Text::from("orders.eu");
        assert_eq!(text, "orders.eu");
        assert_eq!(text.split('.').count(), 2);
        let map: HashMap<Text, u32> = [(text.clone(), 7)].into_iter().collect();
        assert_eq!(map.get("orders.eu"), Some(&7));
    }
}
