//! Length-prefixed frames: the framing every stream transport shares.
//!
//! ```text
//! +----------------------+---------------------+
//! | length: u32, big end | body: length bytes  |
//! +----------------------+---------------------+
//! ```
//!
//! `length` counts the body only. A reader refuses a frame whose length exceeds its configured
//! maximum *before* reading or allocating the body, so a hostile length cannot exhaust memory.

use tokio::io::{AsyncRead, AsyncReadExt};

/// Bytes taken by the length prefix.
pub const LENGTH_PREFIX_BYTES: usize = 4;

/// Default maximum body size: 16 MiB.
pub const DEFAULT_MAX_FRAME_SIZE: u32 = 16 * 1024 * 1024;

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The declared length is above the maximum.
    #[error("frame of {length} bytes exceeds the maximum of {max} bytes")]
    TooLarge {
        /// Declared body length.
        length: u32,
        /// Configured maximum.
        max: u32,
    },
    /// The stream ended in the middle of a frame.
    #[error("connection closed in the middle of a frame")]
    Truncated,
    /// The stream failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Appends one frame (prefix and body) to `out`. The caller checks the size limit.
pub fn append_frame(out: &mut Vec<u8>, body: &[u8]) {
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
}

/// Reads one frame body. `Ok(None)` means the stream ended cleanly between frames.
pub async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    max: u32,
) -> Result<Option<Vec<u8>>, FrameError> {
    let mut prefix = [0u8; LENGTH_PREFIX_BYTES];
    let mut filled = 0;
    while filled < prefix.len() {
        match reader.read(&mut prefix[filled..]).await? {
            0 if filled == 0 => return Ok(None),
            0 => return Err(FrameError::Truncated),
            n => filled += n,
        }
    }
    let length = u32::from_be_bytes(prefix);
    if length > max {
        return Err(FrameError::TooLarge { length, max });
    }
    let mut body = vec![0u8; length as usize];
    reader.read_exact(&mut body).await.map_err(|error| match error.kind() {
        std::io::ErrorKind::UnexpectedEof => FrameError::Truncated,
        _ => FrameError::Io(error),
    })?;
    Ok(Some(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_end_cleanly() {
        let mut bytes = Vec::new();
        append_frame(&mut bytes, b"hello");
        append_frame(&mut bytes, b"");
        let mut reader = bytes.as_slice();
        assert_eq!(read_frame(&mut reader, 10).await.unwrap(), Some(b"hello".to_vec()));
        assert_eq!(read_frame(&mut reader, 10).await.unwrap(), Some(Vec::new()));
        assert_eq!(read_frame(&mut reader, 10).await.unwrap(), None);
    }

    #[tokio::test]
    async fn oversized_length_is_refused_before_reading_the_body() {
        let bytes = u32::MAX.to_be_bytes();
        let error = read_frame(&mut bytes.as_slice(), 1024).await.unwrap_err();
        assert!(matches!(error, FrameError::TooLarge { length: u32::MAX, max: 1024 }));
    }

    #[tokio::test]
    async fn truncated_frame_is_an_error() {
        let mut bytes = Vec::new();
        append_frame(&mut bytes, b"hello");
        bytes.truncate(7);
        assert!(matches!(read_frame(&mut bytes.as_slice(), 10).await, Err(FrameError::Truncated)));
        assert!(matches!(read_frame(&mut &[0u8, 0][..], 10).await, Err(FrameError::Truncated)));
    }
}
