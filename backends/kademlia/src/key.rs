//! 256-bit keys and the XOR metric.
//!
//! Every node and every record lives at a [`Key`]: the SHA-256 of the node's id
//! ([`Key::for_node`]) or of `"service:" + name` ([`Key::for_service`]). The distance between two
//! keys is their XOR read as a big-endian 256-bit number, so comparing distances is comparing
//! byte arrays.
//!
//! ```
//! use comms_kademlia::key::Key;
//! let a = Key::for_node("alice");
//! assert_eq!(a.distance(&a), Key::ZERO);
//! assert_eq!(a.bucket_index(&a), None);
//! ```

use sha2::{Digest, Sha256};
use std::fmt;

/// Bytes in a key.
pub const KEY_BYTES: usize = 32;
/// Bits in a key, and buckets in a routing table.
pub const KEY_BITS: usize = KEY_BYTES * 8;

/// A point in the 256-bit key space (also used for distances).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Key(pub [u8; KEY_BYTES]);

impl Key {
    /// The all-zero key (the distance of a key to itself).
    pub const ZERO: Key = Key([0; KEY_BYTES]);

    /// The key of a node: SHA-256 of its id.
    pub fn for_node(id: &str) -> Key {
        Key(Sha256::digest(id.as_bytes()).into())
    }

    /// The key under which the providers of a service are stored: SHA-256 of `service:<name>`.
    pub fn for_service(name: &str) -> Key {
        let mut hasher = Sha256::new();
        hasher.update(b"service:");
        hasher.update(name.as_bytes());
        Key(hasher.finalize().into())
    }

    /// The key as two 128-bit halves (big-endian), for word-wide XOR and comparison.
    fn halves(&self) -> (u128, u128) {
        let mut high = [0u8; 16];
        let mut low = [0u8; 16];
        high.copy_from_slice(&self.0[..16]);
        low.copy_from_slice(&self.0[16..]);
        (u128::from_be_bytes(high), u128::from_be_bytes(low))
    }

    /// XOR distance to `other`. (Word-wide: lookups and routing compute it for every contact.)
    pub fn distance(&self, other: &Key) -> Key {
        let (a_high, a_low) = self.halves();
        let (b_high, b_low) = other.halves();
        let mut out = [0u8; KEY_BYTES];
        out[..16].copy_from_slice(&(a_high ^ b_high).to_be_bytes());
        out[16..].copy_from_slice(&(a_low ^ b_low).to_be_bytes());
        Key(out)
    }

    /// Leading zero bits.
    pub fn leading_zeros(&self) -> usize {
        let (high, low) = self.halves();
        if high != 0 {
            high.leading_zeros() as usize
        } else {
            128 + low.leading_zeros() as usize
        }
    }

    /// The bucket `other` falls in from this key's point of view: the index of the highest bit
    /// in which they differ (0 = the closest half-bit, 255 = the far half of the key space), or
    /// `None` for the same key.
    pub fn bucket_index(&self, other: &Key) -> Option<usize> {
        let zeros = self.distance(other).leading_zeros();
        (zeros < KEY_BITS).then(|| KEY_BITS - 1 - zeros)
    }

    /// A key in bucket `index` of this key, made from `random` bits: it shares the bits above
    /// `index` with this key, differs at bit `index`, and takes the bits below from `random`.
    /// Used to refresh a bucket with a lookup of a key in its range.
    pub fn random_in_bucket(&self, index: usize, random: &Key) -> Key {
        let index = index.min(KEY_BITS - 1);
        let mut out = self.0;
        for bit in 0..=index {
            // Bit `bit` counted from the least significant end.
            let byte = KEY_BYTES - 1 - bit / 8;
            let mask = 1u8 << (bit % 8);
            let value = if bit == index { !self.0[byte] & mask } else { random.0[byte] & mask };
            out[byte] = (out[byte] & !mask) | value;
        }
        Key(out)
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({self})")
    }
}

/// The first 8 bytes in hex: enough to tell keys apart in logs.
impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in &self.0[..8] {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distance_is_symmetric_and_bucket_index_is_the_highest_differing_bit() {
        let (a, b) = (Key::for_node("a"), Key::for_node("b"));
        assert_eq!(a.distance(&b), b.distance(&a));
        assert_ne!(Key::for_node("x"), Key::for_service("x"), "node and service keys differ");
        let mut near = a;
        near.0[KEY_BYTES - 1] ^= 1;
        assert_eq!(a.bucket_index(&near), Some(0));
        let mut far = a;
        far.0[0] ^= 0x80;
        assert_eq!(a.bucket_index(&far), Some(255));
        for index in [0, 7, 8, 100, 255] {
            let random = Key::for_node(&format!("r{index}"));
            assert_eq!(a.bucket_index(&a.random_in_bucket(index, &random)), Some(index));
        }
    }
}
