//! An encrypted byte stream: what a stream transport runs its protocol over once the Noise
//! handshake ([`crate::security::noise`]) has authenticated the peer.
//!
//! Bytes written are cut into records; each record is one Noise transport message:
//!
//! ```text
//! +--------------------------+---------------------------------------------+
//! | length: u16, big endian  | ciphertext: length bytes (plaintext + 16 B tag) |
//! +--------------------------+---------------------------------------------+
//! ```
//!
//! A record holds at most 65,519 plaintext bytes. Nonces are implicit and count up in each
//! direction, so a record that is altered, dropped, reordered or replayed fails authentication;
//! the stream then fails with [`std::io::ErrorKind::InvalidData`] for good, and nothing of that
//! record or after it is returned. Writes are buffered: call `flush` after `write_all`.
//!
//! Needs the cargo feature `noise`; without it every link is plain.

#[cfg(feature = "noise")]
use crate::security::noise::{snow, MAX_MESSAGE_BYTES, MAX_PLAINTEXT_BYTES, TAG_BYTES};
#[cfg(feature = "noise")]
use std::task::ready;
use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

#[cfg(feature = "noise")]
/// Bytes of the record length prefix.
pub const RECORD_PREFIX_BYTES: usize = 2;
#[cfg(feature = "noise")]
/// Ciphertext read from the stream per call, at most (several records).
const READ_BUFFER_BYTES: usize = 4 * (RECORD_PREFIX_BYTES + MAX_MESSAGE_BYTES);
#[cfg(feature = "noise")]
/// Plaintext taken per `poll_write`, at most: a 64 KiB writer batch in one call.
const WRITE_CHUNK_BYTES: usize = 2 * MAX_PLAINTEXT_BYTES;

#[cfg(feature = "noise")]
/// Why a record could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// Shorter than the authentication tag.
    #[error("encrypted record of {0} bytes is shorter than its tag")]
    TooShort(usize),
    /// Authentication failed.
    #[error("encrypted record failed authentication (tampered, replayed or out of order)")]
    Decrypt,
}

#[cfg(feature = "noise")]
/// Splits the first complete record off `buffer`: its ciphertext and the bytes it takes with
/// its prefix. `None` until the buffer holds a whole record.
pub fn split_record(buffer: &[u8]) -> Option<(&[u8], usize)> {
    let prefix: [u8; RECORD_PREFIX_BYTES] = buffer.get(..RECORD_PREFIX_BYTES)?.try_into().ok()?;
    let length = usize::from(u16::from_be_bytes(prefix));
    let record = buffer.get(RECORD_PREFIX_BYTES..RECORD_PREFIX_BYTES + length)?;
    Some((record, RECORD_PREFIX_BYTES + length))
}

#[cfg(feature = "noise")]
/// Decrypts one record's ciphertext into `out` (at least `ciphertext.len() - 16` bytes long);
/// returns the plaintext length.
pub fn open_record(
    noise: &mut snow::TransportState,
    ciphertext: &[u8],
    out: &mut [u8],
) -> Result<usize, RecordError> {
    if ciphertext.len() < TAG_BYTES {
        return Err(RecordError::TooShort(ciphertext.len()));
    }
    noise.read_message(ciphertext, out).map_err(|_| RecordError::Decrypt)
}

#[cfg(feature = "noise")]
/// Appends `plaintext` to `out` as records.
pub fn seal_records(
    noise: &mut snow::TransportState,
    plaintext: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), snow::Error> {
    for chunk in plaintext.chunks(MAX_PLAINTEXT_BYTES) {
        let start = out.len();
        out.resize(start + RECORD_PREFIX_BYTES + chunk.len() + TAG_BYTES, 0);
        let length = noise.write_message(chunk, &mut out[start + RECORD_PREFIX_BYTES..])?;
        out[start..start + RECORD_PREFIX_BYTES].copy_from_slice(&(length as u16).to_be_bytes());
        out.truncate(start + RECORD_PREFIX_BYTES + length);
    }
    Ok(())
}

#[cfg(feature = "noise")]
/// A stream whose bytes travel as encrypted records.
pub struct EncryptedStream<S> {
    inner: S,
    noise: snow::TransportState,
    /// Ciphertext read but not yet opened: `cipher[cipher_start..cipher_end]`.
    cipher: Box<[u8]>,
    cipher_start: usize,
    cipher_end: usize,
    /// Plaintext opened but not yet returned: `plain[plain_start..plain_end]`.
    plain: Box<[u8]>,
    plain_start: usize,
    plain_end: usize,
    /// Set once a record failed: the stream never returns data again.
    failed: Option<RecordError>,
    /// Sealed records not yet written: `outgoing[written..]`.
    outgoing: Vec<u8>,
    written: usize,
}

#[cfg(feature = "noise")]
impl<S> std::fmt::Debug for EncryptedStream<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncryptedStream").field("failed", &self.failed).finish_non_exhaustive()
    }
}

#[cfg(feature = "noise")]
impl<S> EncryptedStream<S> {
    /// Wraps `inner`, whose handshake produced `noise`.
    pub fn new(inner: S, noise: snow::TransportState) -> Self {
        Self {
            inner,
            noise,
            cipher: vec![0; READ_BUFFER_BYTES].into_boxed_slice(),
            cipher_start: 0,
            cipher_end: 0,
            plain: vec![0; MAX_MESSAGE_BYTES].into_boxed_slice(),
            plain_start: 0,
            plain_end: 0,
            failed: None,
            outgoing: Vec::with_capacity(WRITE_CHUNK_BYTES + 2 * (RECORD_PREFIX_BYTES + TAG_BYTES)),
            written: 0,
        }
    }
}

#[cfg(feature = "noise")]
fn invalid(error: &RecordError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, error.to_string())
}

#[cfg(feature = "noise")]
impl<S: AsyncWrite + Unpin> EncryptedStream<S> {
    /// Writes out every sealed record.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.outgoing.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.outgoing[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.outgoing.clear();
        self.written = 0;
        Poll::Ready(Ok(()))
    }
}

#[cfg(feature = "noise")]
impl<S: AsyncRead + Unpin> AsyncRead for EncryptedStream<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.plain_start < this.plain_end {
                let n = buf.remaining().min(this.plain_end - this.plain_start);
                buf.put_slice(&this.plain[this.plain_start..this.plain_start + n]);
                this.plain_start += n;
                return Poll::Ready(Ok(()));
            }
            if let Some(error) = &this.failed {
                return Poll::Ready(Err(invalid(error)));
            }
            if let Some((record, used)) = split_record(&this.cipher[this.cipher_start..this.cipher_end]) {
                let plaintext = record.len().saturating_sub(TAG_BYTES);
                // Straight into the caller's buffer when it has room: one copy less.
                let opened = if buf.remaining() >= plaintext && plaintext > 0 {
                    let out = buf.initialize_unfilled_to(plaintext);
                    open_record(&mut this.noise, record, out).inspect(|&n| buf.advance(n))
                } else {
                    open_record(&mut this.noise, record, &mut this.plain).map(|n| {
                        this.plain_start = 0;
                        this.plain_end = n;
                        0
                    })
                };
                this.cipher_start += used;
                match opened {
                    Ok(n) if n > 0 => return Poll::Ready(Ok(())),
                    Ok(_) => continue,
                    Err(error) => {
                        this.failed = Some(error);
                        continue;
                    }
                }
            }
            // Need more ciphertext: move the partial record to the front, then read.
            if this.cipher_start > 0 {
                this.cipher.copy_within(this.cipher_start..this.cipher_end, 0);
                this.cipher_end -= this.cipher_start;
                this.cipher_start = 0;
            }
            let mut read = ReadBuf::new(&mut this.cipher[this.cipher_end..]);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            let n = read.filled().len();
            if n == 0 {
                return Poll::Ready(match this.cipher_end {
                    0 => Ok(()),
                    _ => Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed in the middle of an encrypted record",
                    )),
                });
            }
            this.cipher_end += n;
        }
    }
}

#[cfg(feature = "noise")]
impl<S: AsyncWrite + Unpin> AsyncWrite for EncryptedStream<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let taken = buf.len().min(WRITE_CHUNK_BYTES);
        seal_records(&mut this.noise, &buf[..taken], &mut this.outgoing)
            .map_err(|error| io::Error::other(format!("encrypting: {error}")))?;
        // Start writing now; whatever is left goes out on the next write or flush.
        if let Poll::Ready(Err(error)) = this.poll_drain(cx) {
            return Poll::Ready(Err(error));
        }
        Poll::Ready(Ok(taken))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

/// A link's stream: plain, or encrypted after a handshake.
#[derive(Debug)]
pub(super) enum LinkStream<S> {
    Plain(S),
    #[cfg(feature = "noise")]
    Encrypted(Box<EncryptedStream<S>>),
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for LinkStream<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            LinkStream::Plain(stream) => Pin::new(stream).poll_read(cx, buf),
            #[cfg(feature = "noise")]
            LinkStream::Encrypted(stream) => Pin::new(stream.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for LinkStream<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            LinkStream::Plain(stream) => Pin::new(stream).poll_write(cx, buf),
            #[cfg(feature = "noise")]
            LinkStream::Encrypted(stream) => Pin::new(stream.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            LinkStream::Plain(stream) => Pin::new(stream).poll_flush(cx),
            #[cfg(feature = "noise")]
            LinkStream::Encrypted(stream) => Pin::new(stream.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            LinkStream::Plain(stream) => Pin::new(stream).poll_shutdown(cx),
            #[cfg(feature = "noise")]
            LinkStream::Encrypted(stream) => Pin::new(stream.as_mut()).poll_shutdown(cx),
        }
    }
}
