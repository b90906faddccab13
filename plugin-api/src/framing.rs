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
//!
//! Two readers: [`read_frame`] reads one frame into a `Vec` of its own (handshakes, a few frames),
//! and [`FrameReader`] reads a stream of frames in chunks and hands the frame bodies out as
//! ranges of the chunk they were read into, without copying them (the data path).

use crate::SharedBuffer;
use std::ops::Range;
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
    /// The frame needs more memory than the whole [`FrameBudget`] of its reader.
    #[error("a frame needing {needed} bytes of buffer cannot fit the budget of {budget} bytes for partly received frames")]
    OverBudget {
        /// Bytes the frame needs beyond the reader's chunk.
        needed: usize,
        /// The budget's size.
        budget: usize,
    },
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

/// Bytes a [`FrameReader`] reads into one chunk by default.
pub const DEFAULT_CHUNK_BYTES: usize = 64 * 1024;

/// Bytes that partly received frames may hold, shared by every [`FrameReader`] of one node.
///
/// A reader reads into a chunk of its own ([`DEFAULT_CHUNK_BYTES`]); only a frame larger than
/// that grows the chunk, and every byte of growth is taken from the budget first. A reader
/// that finds the budget used up waits (it stops reading, so TCP flow control slows its
/// sender) until another reader completes or drops its frame. The bytes are returned when the
/// frame is complete (it is then the application's message, counted by the receive queue) or
/// the reader is dropped. So however many peers declare large frames and send them slowly, the
/// memory they hold beyond one chunk each stays below the budget; a caller bounds the wait
/// (a read timeout) so that a reader stuck for budget does not wait for ever.
#[derive(Debug)]
pub struct FrameBudget {
    available: tokio::sync::Semaphore,
    total: usize,
}

impl FrameBudget {
    /// A budget of `bytes` (at most [`tokio::sync::Semaphore::MAX_PERMITS`]).
    pub fn new(bytes: usize) -> Self {
        let total = bytes.min(tokio::sync::Semaphore::MAX_PERMITS);
        Self { available: tokio::sync::Semaphore::new(total), total }
    }

    /// The size of the budget, in bytes.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Bytes held by readers right now.
    pub fn in_use(&self) -> usize {
        self.total - self.available.available_permits()
    }
}

/// Reads length-prefixed frames in chunks and hands out their bodies without copying them.
///
/// Each read goes into the current chunk (a `Vec<u8>` of [`DEFAULT_CHUNK_BYTES`], or the size
/// given to [`FrameReader::with_chunk_bytes`]) and returns every frame it completed:
///
/// - When the completed frames fill at least an eighth of a chunk, the chunk becomes a
///   [`SharedBuffer`] and each frame is a range of it ([`Frame::shared`]): nothing is copied,
///   and the bytes after the last complete frame (the start of the next one) move to a fresh
///   chunk. A payload taken from such a buffer keeps the whole chunk alive until it is dropped.
///   The reader keeps the last such buffer and, once every payload of it has been dropped,
///   reads into it again: under steady traffic two chunks take turns, instead of a fresh chunk
///   (and fresh pages) for every read. An incoming connection therefore holds at most two
///   chunks of its own.
/// - Otherwise (a few small frames, as in request/response traffic) the frames are lent from
///   the chunk ([`Frame::shared`] is `None`), which is kept and reused: copying a small message
///   costs less than a chunk, and a payload kept by the application does not keep a chunk alive.
///
/// A frame larger than a chunk grows the chunk as its bytes arrive, not on its declared length:
/// each time the chunk is full it doubles, never past the frame and the next length prefix (so
/// the last read ends at the frame). (Only a frame of up to two chunks whose prefix came with
/// the frames before it gets its size at once, so that mid-size messages are not copied.) A peer that declares 16 MiB and sends 1 KiB costs one
/// chunk, not 16 MiB. A declared length above the maximum frame size is refused before anything
/// is allocated, and with a [`FrameBudget`] ([`FrameReader::with_budget`]) the growth of every
/// reader of a node together is bounded.
#[derive(Debug)]
pub struct FrameReader {
    /// Bytes read: `chunk[start..]` is not handed out yet (complete frames were lent up to `start`).
    chunk: Vec<u8>,
    start: usize,
    chunk_bytes: usize,
    max: u32,
    /// Ranges of the complete frames found by the last read, reused.
    ranges: Vec<Range<usize>>,
    /// Where the growth of the chunk beyond `chunk_bytes` is taken from, and how much is taken.
    budget: Option<std::sync::Arc<FrameBudget>>,
    reserved: usize,
    /// The last chunk handed out as a shared buffer, read into again once nothing else holds it.
    spare: Option<SharedBuffer>,
    /// Chunks allocated to replace one handed out as a shared buffer (none when the spare is
    /// free): what recycling saves, counted for the tests.
    fresh_chunks: u64,
}

/// What one [`FrameReader::read_step`] found.
#[derive(Debug)]
pub enum ReadStep<'a> {
    /// At least one frame is complete: these are all the complete ones.
    Frames(Frames<'a>),
    /// Bytes arrived, no frame is complete yet ([`FrameReader::pending_bytes`] says how many are
    /// waiting).
    More,
    /// The stream ended cleanly between frames.
    End,
}

/// Where the frames of one read are.
#[derive(Debug)]
enum Source<'a> {
    Shared(SharedBuffer),
    Lent(&'a [u8]),
}

/// The frames completed by one [`FrameReader::read`], in order; never empty.
#[derive(Debug)]
pub struct Frames<'a> {
    source: Source<'a>,
    ranges: &'a [Range<usize>],
}

/// One frame of [`Frames`].
#[derive(Debug, Clone, Copy)]
pub struct Frame<'a> {
    body: &'a [u8],
    shared: Option<(&'a SharedBuffer, usize)>,
}

impl<'a> Frame<'a> {
    /// The frame body (the length prefix excluded).
    pub fn body(&self) -> &'a [u8] {
        self.body
    }

    /// The buffer the body is part of, and the range of the body in it, when the frame can be
    /// shared without copying (see [`FrameReader`]).
    pub fn shared(&self) -> Option<(&'a SharedBuffer, Range<usize>)> {
        self.shared.map(|(buffer, start)| (buffer, start..start + self.body.len()))
    }
}

impl Frames<'_> {
    /// How many frames there are.
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    /// Whether there are none (never, for frames returned by [`FrameReader::read`]).
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Whether the frames are ranges of a [`SharedBuffer`] (else they are lent from the chunk).
    pub fn is_shared(&self) -> bool {
        matches!(self.source, Source::Shared(_))
    }

    /// The frames, in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = Frame<'_>> + '_ {
        self.ranges.iter().map(move |range| match &self.source {
            Source::Shared(buffer) => {
                Frame { body: &buffer.as_slice()[range.clone()], shared: Some((buffer, range.start)) }
            }
            Source::Lent(bytes) => Frame { body: &bytes[range.clone()], shared: None },
        })
    }
}

/// Where the first incomplete frame of a chunk starts, and how many bytes it takes with its
/// prefix when the prefix has been read.
#[derive(Debug, Clone, Copy)]
struct Partial {
    at: usize,
    needs: Option<usize>,
}

/// What one read into the chunk led to (no borrow of the reader, so that a loop can go on).
enum Advance {
    Complete(Partial),
    More,
    End,
}

impl FrameReader {
    /// A reader of frames of at most `max` body bytes, in chunks of [`DEFAULT_CHUNK_BYTES`].
    pub fn new(max: u32) -> Self {
        Self::with_chunk_bytes(max, DEFAULT_CHUNK_BYTES)
    }

    /// A reader of frames of at most `max` body bytes, in chunks of `chunk_bytes` (at least 64).
    pub fn with_chunk_bytes(max: u32, chunk_bytes: usize) -> Self {
        let chunk_bytes = chunk_bytes.max(64);
        Self {
            chunk: Vec::with_capacity(chunk_bytes),
            start: 0,
            chunk_bytes,
            max,
            ranges: Vec::new(),
            budget: None,
            reserved: 0,
            spare: None,
            fresh_chunks: 0,
        }
    }

    /// This reader, taking what its chunk grows beyond its usual size from `budget` (waiting
    /// while the budget is used up). A frame that could never fit the budget is refused with
    /// [`FrameError::OverBudget`].
    pub fn with_budget(mut self, budget: std::sync::Arc<FrameBudget>) -> Self {
        self.budget = Some(budget);
        self
    }

    /// Bytes read of a frame that is not complete yet (0 between frames).
    pub fn pending_bytes(&self) -> usize {
        self.chunk.len() - self.start
    }

    /// Reads until at least one frame is complete and returns every complete frame.
    /// `Ok(None)` means the stream ended cleanly between frames. Cancel-safe: bytes read
    /// before a cancelled call are kept for the next one.
    pub async fn read<R: AsyncRead + Unpin>(
        &mut self,
        reader: &mut R,
    ) -> Result<Option<Frames<'_>>, FrameError> {
        loop {
            match self.advance(reader).await? {
                Advance::Complete(partial) => return Ok(Some(self.hand_out(partial))),
                Advance::More => {}
                Advance::End => return Ok(None),
            }
        }
    }

    /// Reads once (or hands out frames completed earlier) and says what came of it, so that the
    /// caller can time a frame from its first byte ([`FrameReader::pending_bytes`]). Cancel-safe
    /// like [`FrameReader::read`].
    pub async fn read_step<R: AsyncRead + Unpin>(
        &mut self,
        reader: &mut R,
    ) -> Result<ReadStep<'_>, FrameError> {
        Ok(match self.advance(reader).await? {
            Advance::Complete(partial) => ReadStep::Frames(self.hand_out(partial)),
            Advance::More => ReadStep::More,
            Advance::End => ReadStep::End,
        })
    }

    /// Hands out complete frames if there are any, else reads once.
    async fn advance<R: AsyncRead + Unpin>(&mut self, reader: &mut R) -> Result<Advance, FrameError> {
        if self.start > 0 {
            // Frames were lent from this chunk: keep the rest (part of a frame) at its front.
            self.chunk.copy_within(self.start.., 0);
            self.chunk.truncate(self.chunk.len() - self.start);
            self.start = 0;
        }
        let partial = self.scan()?;
        if !self.ranges.is_empty() {
            return Ok(Advance::Complete(partial));
        }
        self.make_room(partial).await?;
        if reader.read_buf(&mut self.chunk).await? == 0 {
            return match self.chunk.is_empty() {
                true => Ok(Advance::End),
                false => Err(FrameError::Truncated),
            };
        }
        let partial = self.scan()?;
        Ok(match self.ranges.is_empty() {
            true => Advance::More,
            false => Advance::Complete(partial),
        })
    }

    /// Finds the complete frames of the chunk (into `ranges`) and what follows them.
    fn scan(&mut self) -> Result<Partial, FrameError> {
        self.ranges.clear();
        let bytes = self.chunk.as_slice();
        let mut at = self.start;
        loop {
            let Some(prefix) = bytes.get(at..at + LENGTH_PREFIX_BYTES) else {
                return Ok(Partial { at, needs: None });
            };
            let length = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]);
            if length > self.max {
                // The frames before it are handed out first; the next read fails.
                return match self.ranges.is_empty() {
                    true => Err(FrameError::TooLarge { length, max: self.max }),
                    false => Ok(Partial { at, needs: None }),
                };
            }
            let needs = LENGTH_PREFIX_BYTES + length as usize;
            if bytes.len() - at < needs {
                return Ok(Partial { at, needs: Some(needs) });
            }
            self.ranges.push(at + LENGTH_PREFIX_BYTES..at + needs);
            at += needs;
        }
    }

    /// Makes sure the chunk has room for more of the partial frame (which starts at 0 here):
    /// a full chunk doubles, up to the frame and the next prefix, with the growth taken from
    /// the budget first.
    async fn make_room(&mut self, partial: Partial) -> Result<(), FrameError> {
        if self.chunk.len() < self.chunk.capacity() {
            return Ok(());
        }
        // The chunk is full and holds no complete frame, so the frame's prefix is in it and the
        // frame needs more than the chunk holds: the target is always larger than the chunk.
        let needs = partial.needs.unwrap_or(LENGTH_PREFIX_BYTES) + LENGTH_PREFIX_BYTES;
        let target = needs.min(self.chunk.capacity().saturating_mul(2)).max(self.chunk_bytes);
        self.reserve(target.saturating_sub(self.chunk_bytes)).await?;
        // Realloc, which the allocator can often do in place (large blocks are remapped).
        self.chunk.reserve_exact(target - self.chunk.len());
        Ok(())
    }

    /// Holds `bytes` of the budget (if there is one), waiting for them.
    async fn reserve(&mut self, bytes: usize) -> Result<(), FrameError> {
        let Some(budget) = &self.budget else { return Ok(()) };
        if bytes <= self.reserved {
            return Ok(());
        }
        let over = || FrameError::OverBudget { needed: bytes, budget: budget.total };
        if bytes > budget.total {
            return Err(over());
        }
        let more = u32::try_from(bytes - self.reserved).map_err(|_| over())?;
        // The semaphore is never closed.
        if let Ok(permit) = budget.available.acquire_many(more).await {
            permit.forget();
            self.reserved = bytes;
        }
        Ok(())
    }

    /// Holds `bytes` of the budget (none held before) if it has them now.
    fn try_reserve(&mut self, bytes: usize) -> bool {
        let Some(budget) = &self.budget else { return true };
        let Ok(count) = u32::try_from(bytes) else { return false };
        match budget.available.try_acquire_many(count) {
            Ok(permit) => {
                permit.forget();
                self.reserved = bytes;
                true
            }
            Err(_) => false,
        }
    }

    /// Gives back what the budget lent (the chunk is back to its usual size).
    fn release(&mut self) {
        if let Some(budget) = &self.budget {
            budget.available.add_permits(std::mem::take(&mut self.reserved));
        }
    }

    fn hand_out(&mut self, partial: Partial) -> Frames<'_> {
        let complete = partial.at - self.start;
        if complete < self.chunk_bytes / 8 {
            self.start = partial.at;
            return Frames { source: Source::Lent(&self.chunk), ranges: &self.ranges };
        }
        // What follows the complete frames is less than a chunk: at most the next prefix after
        // a grown chunk, which ends there. A next frame of up to two chunks (its prefix read)
        // gets its size at once, when the budget has it now, so that mid-size messages are
        // read without being copied again: a declared length costs at most one extra chunk.
        self.release();
        let capacity = match partial.needs.map(|needs| needs + LENGTH_PREFIX_BYTES) {
            Some(wanted) if wanted > self.chunk_bytes && wanted <= 2 * self.chunk_bytes => {
                match self.try_reserve(wanted - self.chunk_bytes) {
                    true => wanted,
                    false => self.chunk_bytes,
                }
            }
            _ => self.chunk_bytes,
        };
        let mut next = match self.spare.take().and_then(SharedBuffer::reclaim) {
            Some(mut spare) if spare.capacity() >= capacity => {
                spare.clear();
                spare
            }
            _ => {
                self.fresh_chunks += 1;
                Vec::with_capacity(capacity)
            }
        };
        next.extend_from_slice(&self.chunk[partial.at..]);
        let mut full = std::mem::replace(&mut self.chunk, next);
        full.truncate(partial.at);
        let recyclable = full.capacity() == self.chunk_bytes;
        let shared = SharedBuffer::from(full);
        // A grown chunk is not kept: it was taken from the budget for one large frame.
        self.spare = recyclable.then(|| shared.clone());
        Frames { source: Source::Shared(shared), ranges: &self.ranges }
    }
}

impl Drop for FrameReader {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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

    fn stream_of(bodies: &[Vec<u8>]) -> Vec<u8> {
        let mut bytes = Vec::new();
        for body in bodies {
            append_frame(&mut bytes, body);
        }
        bytes
    }

    /// Reads everything from `bytes`, given to the reader `step` bytes at a time; each frame's
    /// body and whether it was shared.
    async fn read_all(
        bytes: &[u8],
        step: usize,
        reader: &mut FrameReader,
    ) -> Result<Vec<(Vec<u8>, bool)>, FrameError> {
        let (mut write, mut read) = tokio::io::duplex(step);
        let bytes = bytes.to_vec();
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let _ = write.write_all(&bytes).await;
        });
        let mut frames = Vec::new();
        while let Some(read) = reader.read(&mut read).await? {
            assert!(!read.is_empty());
            for frame in read.iter() {
                if let Some((buffer, range)) = frame.shared() {
                    assert_eq!(&buffer.as_slice()[range], frame.body());
                }
                frames.push((frame.body().to_vec(), frame.shared().is_some()));
            }
        }
        writer.await.unwrap();
        Ok(frames)
    }

    #[tokio::test]
    async fn a_frame_reader_returns_every_frame_whatever_the_read_sizes() {
        let bodies: Vec<Vec<u8>> =
            (0..60).map(|n| vec![n as u8; [0, 1, 63, 200, 1000, 5000, 70_000][n % 7]]).collect();
        let bytes = stream_of(&bodies);
        for step in [3, 100, 4096, 65_536, 1 << 20] {
            for chunk in [64, 1000, DEFAULT_CHUNK_BYTES] {
                let mut reader = FrameReader::with_chunk_bytes(100_000, chunk);
                let frames = read_all(&bytes, step, &mut reader).await.unwrap();
                let read: Vec<Vec<u8>> = frames.into_iter().map(|(body, _)| body).collect();
                assert!(read == bodies, "read {step} bytes at a time in chunks of {chunk}");
            }
        }
    }

    #[tokio::test]
    async fn bulk_frames_are_shared_and_a_few_small_ones_are_lent() {
        let small: Vec<Vec<u8>> = (0..3).map(|n| vec![n; 64]).collect();
        let mut reader = FrameReader::new(1 << 20);
        let frames = read_all(&stream_of(&small), 1 << 20, &mut reader).await.unwrap();
        assert!(frames.iter().all(|(_, shared)| !shared), "a few small frames are lent");

        let bulk: Vec<Vec<u8>> = (0..2000).map(|n| vec![n as u8; 64]).collect();
        let frames = read_all(&stream_of(&bulk), 1 << 20, &mut reader).await.unwrap();
        let shared = frames.iter().filter(|(_, shared)| *shared).count();
        assert!(shared > 1900, "bulk frames are shared ({shared} of 2000)");

        let large: Vec<Vec<u8>> = (0..10).map(|n| vec![n; 200_000]).collect();
        let frames = read_all(&stream_of(&large), 1 << 20, &mut reader).await.unwrap();
        assert!(frames.iter().all(|(_, shared)| *shared), "large frames are shared");
    }

    #[tokio::test]
    async fn a_shared_chunk_is_read_into_again_once_released_and_never_while_held() {
        let bulk = stream_of(&(0..64).map(|n| vec![n as u8; 10]).collect::<Vec<_>>());
        let mut stream = bulk.as_slice();
        let mut reader = FrameReader::with_chunk_bytes(1 << 10, 64);
        // Frames dropped after each read: the two chunks take turns, one allocated in all.
        for _ in 0..5 {
            let frames = reader.read(&mut stream).await.unwrap().unwrap();
            assert!(frames.is_shared(), "bulk frames are shared");
        }
        assert_eq!(reader.fresh_chunks, 1, "released chunks are read into again");

        // A payload kept from a chunk keeps that chunk: a fresh one replaces it, and the kept
        // bytes stay as they were while later reads go on.
        let kept = {
            let frames = reader.read(&mut stream).await.unwrap().unwrap();
            let frame = frames.iter().next().unwrap();
            let (buffer, range) = frame.shared().unwrap();
            (buffer.payload(range).unwrap(), frame.body().to_vec())
        };
        for _ in 0..4 {
            reader.read(&mut stream).await.unwrap().unwrap();
        }
        assert_eq!(reader.fresh_chunks, 2, "one chunk allocated in place of the one still held");
        assert_eq!(kept.0.as_slice(), kept.1.as_slice(), "a kept payload is never overwritten");
    }

    #[tokio::test]
    async fn a_frame_reader_refuses_an_oversized_length_and_a_truncated_frame() {
        let mut bytes = stream_of(&[b"fine".to_vec()]);
        bytes.extend_from_slice(&1025u32.to_be_bytes());
        let mut reader = FrameReader::new(1024);
        let error = read_all(&bytes, 4096, &mut reader).await.unwrap_err();
        assert!(matches!(error, FrameError::TooLarge { length: 1025, max: 1024 }));

        let mut bytes = stream_of(&[b"hello".to_vec()]);
        bytes.truncate(7);
        let error = read_all(&bytes, 4096, &mut FrameReader::new(1024)).await.unwrap_err();
        assert!(matches!(error, FrameError::Truncated));
    }

    /// A reader and the writing end of its stream, which stays open.
    fn stream() -> (tokio::io::DuplexStream, tokio::io::DuplexStream) {
        tokio::io::duplex(1 << 20)
    }

    /// Writes `bytes` and reads until they are all in `reader` (no frame completes).
    async fn feed(
        reader: &mut FrameReader,
        write: &mut tokio::io::DuplexStream,
        read: &mut tokio::io::DuplexStream,
        bytes: &[u8],
    ) {
        use tokio::io::AsyncWriteExt;
        let target = reader.pending_bytes() + bytes.len();
        write.write_all(bytes).await.unwrap();
        while reader.pending_bytes() < target {
            assert!(matches!(reader.read_step(read).await.unwrap(), ReadStep::More));
        }
    }

    #[tokio::test]
    async fn a_large_frame_grows_its_chunk_as_its_bytes_arrive_not_on_its_declared_length() {
        let (mut write, mut read) = stream();
        let mut reader = FrameReader::new(DEFAULT_MAX_FRAME_SIZE);
        let mut bytes = DEFAULT_MAX_FRAME_SIZE.to_be_bytes().to_vec();
        bytes.extend_from_slice(&[7; 1000]);
        feed(&mut reader, &mut write, &mut read, &bytes).await;
        assert_eq!(reader.chunk.capacity(), DEFAULT_CHUNK_BYTES, "1 KiB of a 16 MiB frame costs one chunk");
        feed(&mut reader, &mut write, &mut read, &vec![7; 300_000]).await;
        let capacity = reader.chunk.capacity();
        assert!((301_004..=2 * 301_004).contains(&capacity), "grown with what arrived: {capacity}");
    }

    #[tokio::test(start_paused = true)]
    async fn readers_share_one_budget_and_wait_while_it_is_used_up() {
        // A's 200 KB of a 250 KB frame hold all but 1,016 bytes of the budget: B cannot grow
        // its 1 KiB chunk until A is done.
        let budget = std::sync::Arc::new(FrameBudget::new(250_000));
        let (mut write_a, mut read_a) = stream();
        let (mut write_b, mut read_b) = stream();
        let mut a = FrameReader::with_chunk_bytes(1 << 20, 1024).with_budget(budget.clone());
        let mut b = FrameReader::with_chunk_bytes(1 << 20, 1024).with_budget(budget.clone());
        let mut frame = 250_000u32.to_be_bytes().to_vec();
        frame.extend_from_slice(&[1; 200_000]);
        feed(&mut a, &mut write_a, &mut read_a, &frame).await;
        let held = budget.in_use();
        assert!(held >= 200_000 - 1024 && held <= budget.total(), "{held}");

        use tokio::io::AsyncWriteExt;
        write_b.write_all(&frame).await.unwrap();
        let mut stalled = 0;
        // B reads its first chunk, then waits for budget: time passes (paused clock), no read.
        while tokio::time::timeout(Duration::from_secs(1), b.read_step(&mut read_b)).await.is_ok() {
            stalled += 1;
            assert!(stalled < 100, "b kept reading without budget");
        }
        assert_eq!(b.pending_bytes(), 1024, "b waits with its own chunk full");
        assert!(budget.in_use() <= budget.total());

        drop(a);
        feed(&mut b, &mut write_b, &mut read_b, &[]).await;
        while b.pending_bytes() < frame.len() {
            assert!(matches!(b.read_step(&mut read_b).await.unwrap(), ReadStep::More));
        }
        write_b.write_all(&[2; 50_000]).await.unwrap();
        while !matches!(b.read_step(&mut read_b).await.unwrap(), ReadStep::Frames(_)) {}
        assert_eq!(budget.in_use(), 0, "a complete frame gives its budget back");
    }

    #[tokio::test]
    async fn a_frame_larger_than_the_whole_budget_is_refused() {
        let budget = std::sync::Arc::new(FrameBudget::new(100_000));
        let mut reader = FrameReader::with_chunk_bytes(1 << 20, 1024).with_budget(budget.clone());
        let mut bytes = 500_000u32.to_be_bytes().to_vec();
        bytes.extend_from_slice(&[0; 200_000]);
        let error = read_all(&bytes, 4096, &mut reader).await.unwrap_err();
        assert!(matches!(error, FrameError::OverBudget { budget: 100_000, .. }), "{error}");
        drop(reader);
        assert_eq!(budget.in_use(), 0, "a dropped reader gives its budget back");
    }
}
