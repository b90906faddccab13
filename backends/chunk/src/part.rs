//! The part format: the `comms-chunk` header and how a message is cut into parts.
//!
//! A message of `total` bytes cut for a part size `p` has `count = ceil(total / p)` parts of
//! `part_len = ceil(total / count)` bytes each (the last one shorter). `part_len` is at most `p`
//! and depends on `total` and `count` only, so the receiver knows from any one header where every
//! part goes, without a part size of its own.

use comms_plugin_api::{Envelope, MessageId};
use std::{fmt, ops::Range};

/// The header every part carries: `<original id, 32 hex digits> <index> <count> <total length>`
/// (defined in comms-plugin-api, whose transports read it to count a message given up on once).
pub const HEADER: &str = comms_plugin_api::framework::PART_HEADER;

/// Parts of a message cut into several are at least this long (all but the last). A sender
/// with a part size of at least [`crate::MIN_PART_SIZE`] never cuts shorter ones; the receiver
/// refuses them, which bounds its bookkeeping per byte held.
pub const MIN_PART_LEN: u64 = 512;

/// What the header of one part says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartHeader {
    /// The id of the whole message (each part has a fresh id of its own).
    pub original: MessageId,
    /// Which part, from 0.
    pub index: u64,
    /// How many parts.
    pub count: u64,
    /// The whole message's payload length in bytes.
    pub total: u64,
}

impl fmt::Display for PartHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x} {} {} {}", self.original.as_u128(), self.index, self.count, self.total)
    }
}

impl PartHeader {
    /// Parses a header value; the error says what is wrong with it.
    pub fn parse(value: &str) -> Result<Self, String> {
        let fields: Vec<&str> = value.split(' ').collect();
        let [id, index, count, total] = fields[..] else {
            return Err(format!("header `{HEADER}` has {} fields, expected 4: `{value}`", fields.len()));
        };
        if id.len() != 32 {
            return Err(format!("header `{HEADER}`: the message id `{id}` is not 32 hex digits"));
        }
        let original = u128::from_str_radix(id, 16)
            .map_err(|_| format!("header `{HEADER}`: the message id `{id}` is not 32 hex digits"))?;
        let number = |what: &str, text: &str| {
            text.parse::<u64>().map_err(|_| format!("header `{HEADER}`: {what} `{text}` is not a number"))
        };
        Ok(Self {
            original: MessageId::from_u128(original),
            index: number("index", index)?,
            count: number("count", count)?,
            total: number("total length", total)?,
        })
    }
}

/// Where the parts of a message go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// The whole payload's length.
    pub total: u64,
    /// How many parts.
    pub count: u64,
    /// The length of every part but the last.
    pub part_len: u64,
}

impl Layout {
    /// How the sender cuts `total` bytes with parts of at most `part_size` (at least 1) bytes.
    pub fn cut(total: u64, part_size: u64) -> Self {
        let count = total.div_ceil(part_size.max(1)).max(1);
        Self { total, count, part_len: total.div_ceil(count) }
    }

    /// The layout a header announces, if it is one a sender can produce: at least one part,
    /// none empty, and parts of at least [`MIN_PART_LEN`] when there are several.
    pub fn from_header(header: &PartHeader) -> Result<Self, String> {
        let PartHeader { index, count, total, .. } = *header;
        if count == 0 || count > total.max(1) {
            return Err(format!("{count} parts for {total} bytes"));
        }
        if index >= count {
            return Err(format!("part index {index} of {count} parts"));
        }
        let layout = Self { total, count, part_len: total.div_ceil(count) };
        if count > 1 && layout.part_len < MIN_PART_LEN {
            return Err(format!("parts of {} bytes, below the minimum of {MIN_PART_LEN}", layout.part_len));
        }
        Ok(layout)
    }

    /// The byte range of part `index` in the whole payload.
    pub fn range(&self, index: u64) -> Range<u64> {
        let start = index.saturating_mul(self.part_len).min(self.total);
        start..start.saturating_add(self.part_len).min(self.total)
    }
}

/// Part `index` of `envelope` cut by `layout`: the envelope's addressing, correlation id, headers
/// and extensions, plus [`HEADER`], under the fresh id `part_id`, with its range of the payload
/// as a slice that shares the payload's buffer (nothing is copied). `None` if the layout does not
/// fit the payload.
pub fn part(envelope: &Envelope, layout: &Layout, index: u64, part_id: MessageId) -> Option<Envelope> {
    let range = layout.range(index);
    let payload =
        envelope.payload.slice(usize::try_from(range.start).ok()?..usize::try_from(range.end).ok()?)?;
    let header = PartHeader { original: envelope.id, index, count: layout.count, total: layout.total };
    let part = Envelope::new(part_id, envelope.from.clone(), envelope.to.clone(), payload)
        .with_correlation_id(envelope.correlation_id)
        .with_headers(envelope.headers.clone())
        .with_header(HEADER, header.to_string())
        .with_extensions(envelope.extensions.clone());
    Some(part)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_round_trips_and_names_what_is_wrong() {
        let header = PartHeader { original: MessageId::from_u128(0xabc), index: 2, count: 5, total: 4096 };
        let text = header.to_string();
        assert_eq!(text, "00000000000000000000000000000abc 2 5 4096");
        assert_eq!(PartHeader::parse(&text), Ok(header));
        assert!(PartHeader::parse("abc 2 5 4096").unwrap_err().contains("not 32 hex digits"));
        assert!(PartHeader::parse(&format!("{:032x} 2 5", 1)).unwrap_err().contains("3 fields"));
        assert!(PartHeader::parse(&format!("{:032x} 2 -5 4096", 1)).unwrap_err().contains("count `-5`"));
        assert!(PartHeader::parse(&format!("{:032x}  2 5 4096", 1)).is_err(), "one space between fields");
    }

    #[test]
    fn parts_cover_the_message_exactly_and_none_is_empty() {
        for (total, part_size) in
            [(10_000, 1024), (1024 * 1024, 1024), (1025, 1024), (3 << 30, 1 << 20), (7, 100)]
        {
            let layout = Layout::cut(total, part_size);
            assert!(layout.part_len <= part_size, "{layout:?}");
            let ranges: Vec<_> = (0..layout.count).map(|index| layout.range(index)).collect();
            assert_eq!(ranges[0].start, 0);
            assert_eq!(ranges.last().unwrap().end, total);
            assert!(ranges.windows(2).all(|pair| pair[0].end == pair[1].start));
            assert!(ranges.iter().all(|range| !range.is_empty()), "{layout:?}");
            let header =
                PartHeader { original: MessageId::from_u128(1), index: 0, count: layout.count, total };
            assert_eq!(Layout::from_header(&header), Ok(layout), "the receiver derives the same layout");
        }
    }

    #[test]
    fn a_part_shares_the_payload_buffer_and_keeps_the_envelope() {
        use comms_plugin_api::Destination;
        let payload: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
        let envelope = Envelope::new(MessageId::from_u128(7), "a", Destination::topic("t"), payload.clone())
            .with_header("app", "1")
            .with_correlation_id(Some(MessageId::from_u128(3)));
        let layout = Layout::cut(5000, 2048);
        let second = part(&envelope, &layout, 1, MessageId::from_u128(100)).unwrap();
        assert_eq!(second.id, MessageId::from_u128(100));
        assert_eq!(second.payload.as_slice(), &payload[1667..3334]);
        assert_eq!(
            second.payload.as_slice().as_ptr(),
            envelope.payload.as_slice()[1667..].as_ptr(),
            "not copied"
        );
        assert_eq!(second.header("app"), Some("1"));
        assert_eq!(second.header(HEADER), Some("00000000000000000000000000000007 1 3 5000"));
        assert_eq!((second.to, second.correlation_id), (envelope.to.clone(), envelope.correlation_id));
        assert!(part(&envelope, &Layout::cut(6000, 2048), 2, MessageId::from_u128(1)).is_none());
    }

    #[test]
    fn impossible_layouts_are_refused() {
        let header =
            |index, count, total| PartHeader { original: MessageId::from_u128(1), index, count, total };
        assert!(Layout::from_header(&header(0, 0, 10)).is_err(), "no parts");
        assert!(Layout::from_header(&header(3, 3, 100_000)).is_err(), "index out of range");
        assert!(Layout::from_header(&header(0, 11, 10)).is_err(), "empty parts");
        assert!(Layout::from_header(&header(0, 1000, 100_000)).is_err(), "parts of 100 bytes");
        assert!(Layout::from_header(&header(0, 1, 0)).is_ok(), "an empty message is one part");
    }
}
