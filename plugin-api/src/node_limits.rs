//! What a node id and a node record may hold: the checks every node applies to its own
//! configuration and to what it is told by peers (hellos, heartbeats) and by discovery.
//!
//! A node id names a node in logs, broker queue names, table rows and keys: it is 1 to
//! [`MAX_NODE_ID_BYTES`] bytes of UTF-8 with no control character (no newline, no NUL, no
//! escape), so that it can neither forge a log line nor break a name built from it. A record is
//! at most [`MAX_RECORD_BYTES`], counted by [`NodeRecord::size`], so that a peer cannot make
//! another node hold megabytes for it.
//!
//! ```
//! use comms_plugin_api::{NodeId, NodeRecord};
//! assert!(NodeId::new("alice").check().is_ok());
//! assert_eq!(NodeId::new("").check().unwrap_err(), "is empty");
//! assert!(NodeId::new("eve\nINFO forged").check().unwrap_err().contains("U+000A"));
//! let mut record = NodeRecord::new("bob");
//! record.metadata.push(("blob".into(), "x".repeat(1 << 20)));
//! assert!(record.check().unwrap_err().contains("at most 16384"));
//! ```

use crate::{NodeId, NodeRecord};

/// The longest node id, in bytes (a key-bound id, `label-<public key>`, takes 53 plus its label).
pub const MAX_NODE_ID_BYTES: usize = 255;

/// The largest node record, as counted by [`NodeRecord::size`]: enough for hundreds of
/// services and topic patterns, small enough that a thousand peers' records fit in 16 MiB.
pub const MAX_RECORD_BYTES: usize = 16 * 1024;

/// What each entry of a record (an address, a service, a topic, a metadata pair, an
/// extension) counts for beyond its text: what it costs to keep it, so that many empty entries
/// count too.
const ENTRY_BYTES: usize = 16;

impl NodeId {
    /// `Err` with what is wrong (`"is empty"`, `"contains the control character U+000A at byte
    /// 3"`, `"is 300 bytes long; at most 255"`) when this id cannot name a node. See the
    /// [module documentation](crate::node_limits).
    pub fn check(&self) -> Result<(), String> {
        let id = self.as_str();
        if id.is_empty() {
            return Err("is empty".to_string());
        }
        if id.len() > MAX_NODE_ID_BYTES {
            return Err(format!("is {} bytes long; at most {MAX_NODE_ID_BYTES}", id.len()));
        }
        match id.char_indices().find(|(_, c)| c.is_control()) {
            Some((at, c)) => Err(format!("contains the control character U+{:04X} at byte {at}", c as u32)),
            None => Ok(()),
        }
    }
}

impl NodeRecord {
    /// The record's size: the bytes of its text (id, addresses, services, topics, metadata,
    /// extensions) and 16 per entry.
    pub fn size(&self) -> usize {
        let pairs = |pairs: &[(String, String)]| -> usize {
            pairs.iter().map(|(key, value)| key.len() + value.len() + ENTRY_BYTES).sum()
        };
        let list = |list: &[String]| -> usize { list.iter().map(|item| item.len() + ENTRY_BYTES).sum() };
        let extensions: usize =
            self.extensions.iter().map(|(key, value)| key.len() + value.len() + ENTRY_BYTES).sum();
        self.id.as_str().len()
            + pairs(&self.addresses)
            + list(&self.services)
            + list(&self.topics)
            + pairs(&self.metadata)
            + extensions
    }

    /// `Err` with what is wrong when a node should not keep this record: its id fails
    /// [`NodeId::check`], or it is larger than [`MAX_RECORD_BYTES`].
    pub fn check(&self) -> Result<(), String> {
        self.id.check().map_err(|problem| format!("node id {:?} {problem}", self.id.as_str()))?;
        let size = self.size();
        if size > MAX_RECORD_BYTES {
            return Err(format!(
                "record of node `{}` is {size} bytes ({} addresses, {} services, {} topics, {} metadata \
                 entries); at most {MAX_RECORD_BYTES}",
                self.id,
                self.addresses.len(),
                self.services.len(),
                self.topics.len(),
                self.metadata.len()
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_with_control_characters_or_none_at_all_are_refused() {
        for bad in ["", "a\nb", "a\0b", "a\rb", "\u{1b}[31mred", "a\u{85}b", &"x".repeat(256)] {
            assert!(NodeId::new(bad).check().is_err(), "{bad:?} refused");
        }
        for good in ["a", "alice", "h3-a", "bob-9f2c", "nœud é", "with space", &"x".repeat(255)] {
            assert_eq!(NodeId::new(good).check(), Ok(()), "{good:?} accepted");
        }
        assert_eq!(
            NodeId::new("ab\0").check().unwrap_err(),
            "contains the control character U+0000 at byte 2"
        );
    }

    #[test]
    fn a_record_is_measured_by_its_text_and_entries() {
        let mut record = NodeRecord::new("n");
        record.services = vec![String::new(); 2000];
        assert_eq!(record.size(), 1 + 2000 * ENTRY_BYTES, "empty entries count too");
        assert!(record.check().is_err());
        record.services.truncate(10);
        assert_eq!(record.check(), Ok(()));
        let mut bad = NodeRecord::new("x\ny");
        bad.services.push("s".into());
        assert!(
            bad.check().unwrap_err().starts_with("node id \"x\\ny\" contains"),
            "the id is quoted, escaped"
        );
    }
}
