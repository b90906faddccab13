//! zstd compression and bounded decompression of one payload: pure functions, no I/O.

use std::{fmt, io::Read};

/// Why a compressed payload was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecompressError {
    /// The frame declares (or produced) more bytes than the limit: a zip bomb, or a message
    /// larger than this layer takes.
    TooLarge {
        /// What the frame declared, or the limit plus one when it declared nothing.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The bytes are not a valid zstd frame.
    Corrupt(String),
}

impl fmt::Display for DecompressError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooLarge { size, limit } => {
                write!(
                    f,
                    "decompresses to {size} bytes or more, over the limit of {limit} (max_message_size)"
                )
            }
            Self::Corrupt(reason) => write!(f, "not a valid zstd frame: {reason}"),
        }
    }
}

impl std::error::Error for DecompressError {}

/// `data` compressed at `level`, or `None` when the result would not be smaller (or zstd
/// failed): the caller then sends `data` as it is.
///
/// The output buffer has room for one byte less than `data`, so that an incompressible payload
/// never costs a second buffer of its size: zstd stops with "destination too small" instead.
pub fn compress(data: &[u8], level: i32) -> Option<Vec<u8>> {
    let room = data.len().checked_sub(1)?;
    let mut out = Vec::with_capacity(room);
    // The compressor's `compress_to_buffer` fills a Vec's spare capacity (the free function of
    // that name takes a slice, which an empty Vec would make zero bytes long).
    let mut compressor = zstd::bulk::Compressor::new(level).ok()?;
    match compressor.compress_to_buffer(data, &mut out) {
        Ok(written) if written < data.len() => {
            out.shrink_to_fit();
            Some(out)
        }
        _ => None,
    }
}

/// Whether decompressing `data` is work for the blocking pool: unless it is small and declares
/// a small result. (A few kilobytes can declare a gigabyte, or declare nothing and produce one.)
pub fn is_heavy(data: &[u8], threshold: u64) -> bool {
    let declared = zstd::zstd_safe::get_frame_content_size(data);
    data.len() as u64 >= threshold || !matches!(declared, Ok(Some(size)) if size < threshold)
}

/// The bytes `data` decompresses to, if they are at most `limit`.
///
/// Never allocates more than the limit. A payload that is one frame declaring its size (every
/// payload this layer writes) is refused before anything is allocated if the size is over the
/// limit, and decompressed into a buffer of exactly that size otherwise (zstd refuses a frame
/// that produces more than it declared). Anything else (no declared size, several frames) is
/// streamed through a reader that stops one byte past the limit. zstd's own window limit
/// (128 MiB by default) bounds the decoder's memory.
pub fn decompress(data: &[u8], limit: u64) -> Result<Vec<u8>, DecompressError> {
    let corrupt = |error: &dyn fmt::Display| DecompressError::Corrupt(error.to_string());
    let declared = zstd::zstd_safe::get_frame_content_size(data)
        .map_err(|_| DecompressError::Corrupt("unreadable frame header".to_string()))?;
    if let Some(size) = declared {
        if size > limit {
            return Err(DecompressError::TooLarge { size, limit });
        }
        let single_frame =
            zstd::zstd_safe::find_frame_compressed_size(data).is_ok_and(|len| len == data.len());
        if single_frame {
            let size = usize::try_from(size).map_err(|_| DecompressError::TooLarge { size, limit })?;
            let mut out = Vec::with_capacity(size);
            let mut decompressor = zstd::bulk::Decompressor::new().map_err(|error| corrupt(&error))?;
            let written =
                decompressor.decompress_to_buffer(data, &mut out).map_err(|error| corrupt(&error))?;
            if written != size {
                return Err(DecompressError::Corrupt(format!("declared {size} bytes, produced {written}")));
            }
            return Ok(out);
        }
    }
    let decoder = zstd::stream::read::Decoder::with_buffer(data).map_err(|error| corrupt(&error))?;
    let mut out = Vec::new();
    decoder.take(limit.saturating_add(1)).read_to_end(&mut out).map_err(|error| corrupt(&error))?;
    if out.len() as u64 > limit {
        return Err(DecompressError::TooLarge { size: limit.saturating_add(1), limit });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compresses_only_when_smaller_and_round_trips() {
        let text = b"the same sentence again and again. ".repeat(100);
        let compressed = compress(&text, 3).expect("repetitive text shrinks");
        assert!(compressed.len() < text.len() / 10, "{} bytes", compressed.len());
        assert_eq!(decompress(&compressed, text.len() as u64).unwrap(), text);
        let noise: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        let noise_compressed = compress(&noise, 3);
        assert!(noise_compressed.as_ref().is_none_or(|c| c.len() < noise.len()));
        assert_eq!(compress(&[], 3), None, "nothing to gain from an empty payload");
    }

    #[test]
    fn a_declared_size_over_the_limit_is_refused_before_decompressing() {
        let zeros = vec![0u8; 1 << 20];
        let bomb = compress(&zeros, 3).unwrap();
        assert!(bomb.len() < 1024, "a mebibyte of zeros compresses to {} bytes", bomb.len());
        assert_eq!(decompress(&bomb, 1000), Err(DecompressError::TooLarge { size: 1 << 20, limit: 1000 }));
        assert_eq!(decompress(&bomb, 1 << 20).unwrap().len(), 1 << 20, "exactly at the limit is fine");
    }

    #[test]
    fn a_frame_without_declared_size_is_cut_at_the_limit() {
        // A streaming encoder does not know the size in advance and declares none.
        let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
        std::io::Write::write_all(&mut encoder, &vec![7u8; 100_000]).unwrap();
        let frame = encoder.finish().unwrap();
        assert!(matches!(zstd::zstd_safe::get_frame_content_size(&frame), Ok(None)));
        assert_eq!(
            decompress(&frame, 99_999),
            Err(DecompressError::TooLarge { size: 100_000, limit: 99_999 })
        );
        assert_eq!(decompress(&frame, 100_000).unwrap(), vec![7u8; 100_000]);
    }

    #[test]
    fn several_frames_are_bounded_by_their_total() {
        // The first frame declares 1000 bytes, the second another 1000.
        let mut two = compress(&[1u8; 1000], 3).unwrap();
        two.extend(compress(&[2u8; 1000], 3).unwrap());
        assert_eq!(decompress(&two, 1999), Err(DecompressError::TooLarge { size: 2000, limit: 1999 }));
        let both = decompress(&two, 2000).unwrap();
        assert_eq!((both.len(), both[999], both[1000]), (2000, 1, 2));
    }

    #[test]
    fn only_small_frames_declaring_a_small_result_are_light() {
        let small = compress(&[1u8; 10_000], 3).unwrap();
        assert!(!is_heavy(&small, 65_536));
        let bomb = compress(&vec![0u8; 1 << 20], 3).unwrap();
        assert!(bomb.len() < 65_536 && is_heavy(&bomb, 65_536), "small, but declares a mebibyte");
        assert!(is_heavy(b"no frame header", 65_536), "no declared size: no way to tell");
    }

    #[test]
    fn garbage_is_corrupt_not_a_panic() {
        assert!(matches!(decompress(b"not zstd at all", 1 << 20), Err(DecompressError::Corrupt(_))));
        assert!(matches!(decompress(&[], 1 << 20), Err(DecompressError::Corrupt(_))));
        let mut truncated = compress(&b"abc".repeat(1000), 3).unwrap();
        truncated.truncate(truncated.len() - 3);
        assert!(matches!(decompress(&truncated, 1 << 20), Err(DecompressError::Corrupt(_))));
    }
}
