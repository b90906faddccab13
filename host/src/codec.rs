//! How typed messages become payload bytes.

use serde::{de::DeserializeOwned, Serialize};

/// The header that names a payload's encoding, so that a receiver decodes correctly whatever
/// codec it uses itself.
pub const CONTENT_TYPE_HEADER: &str = "content-type";

/// A message encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Codec {
    /// Compact binary ([postcard](https://docs.rs/postcard)); the default.
    #[default]
    Binary,
    /// JSON: larger, readable by any language and by people.
    Json,
}

/// Why a message could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The binary codec failed.
    #[error("binary codec: {0}")]
    Binary(#[from] postcard::Error),
    /// The JSON codec failed.
    #[error("json codec: {0}")]
    Json(#[from] serde_json::Error),
    /// The content-type header names an encoding this node does not know.
    #[error("unknown content type `{0}`")]
    UnknownContentType(String),
}

impl Codec {
    /// The value of the `content-type` header for this codec.
    pub fn content_type(self) -> &'static str {
        match self {
            Codec::Binary => "application/x-postcard",
            Codec::Json => "application/json",
        }
    }

    /// The codec a `content-type` value names.
    pub fn from_content_type(content_type: &str) -> Result<Self, CodecError> {
        match content_type {
            "application/x-postcard" => Ok(Codec::Binary),
            "application/json" => Ok(Codec::Json),
            other => Err(CodecError::UnknownContentType(other.to_string())),
        }
    }

    /// Encodes `message`.
    pub fn encode<T: Serialize + ?Sized>(self, message: &T) -> Result<Vec<u8>, CodecError> {
        Ok(match self {
            Codec::Binary => postcard::to_allocvec(message)?,
            Codec::Json => serde_json::to_vec(message)?,
        })
    }

    /// Decodes `bytes`.
    pub fn decode<T: DeserializeOwned>(self, bytes: &[u8]) -> Result<T, CodecError> {
        Ok(match self {
            Codec::Binary => postcard::from_bytes(bytes)?,
            Codec::Json => serde_json::from_slice(bytes)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Order {
        id: u32,
        item: String,
    }

    #[test]
    fn both_codecs_round_trip_and_differ() {
        let order = Order { id: 7, item: "tea".into() };
        let binary = Codec::Binary.encode(&order).unwrap();
        let json = Codec::Json.encode(&order).unwrap();
        assert_eq!(json, br#"{"id":7,"item":"tea"}"#);
        assert!(binary.len() < json.len());
        assert_eq!(Codec::Binary.decode::<Order>(&binary).unwrap(), order);
        assert_eq!(Codec::Json.decode::<Order>(&json).unwrap(), order);
    }

    #[test]
    fn content_types_map_back() {
        for codec in [Codec::Binary, Codec::Json] {
            assert_eq!(Codec::from_content_type(codec.content_type()).unwrap(), codec);
        }
        assert!(Codec::from_content_type("text/plain").is_err());
    }
}
