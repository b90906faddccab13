//! Sockets driven by the host's reactor (contract 1.1), so that a message on the hot path wakes
//! one thread, not two.
//!
//! A plugin library links its own tokio, so its sockets are watched by its own reactor: a
//! message that arrives wakes a plugin thread, which then wakes the host thread that takes the
//! message (and a message sent wakes a plugin thread to write it). From contract 1.1 the host
//! offers to drive a plugin's connected sockets itself
//! ([`HostServices::adopt_socket`](comms_core::HostServices)) and to run its tasks on the host's
//! executor ([`crate::runtime::spawn`]): the connection's reader and writer tasks then run on the
//! host's threads and are woken by the host's reactor, as if the plugin were linked into the
//! program.
//!
//! [`adopt`] is all a backend writes: it hands a freshly connected or accepted stream to the
//! host and gets a [`HostDrivenStream`] back, which is the host's socket when the host took it
//! and the plugin's own stream otherwise (a 1.0 host, a plugin linked into the program, a call
//! from a thread of the plugin's runtime, a platform other than Unix). Either way it is an
//! ordinary `AsyncRead + AsyncWrite` stream, and nothing else changes.
//!
//! Timers, connecting and accepting stay with the plugin's runtime: they are not per message.

use crate::{stable_waker::StableWaker, stream_transport::ByteStream};
use comms_core::{
    abi_stable::std_types::{ROption, RResult, RSlice, RSliceMut},
    async_ffi::FfiPoll,
    HostServicesBox, HostSocketBox,
};
use std::{
    io,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        OnceLock,
    },
    task::{Context, Poll},
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The host this library was loaded by; unset for a plugin linked into the program.
static HOST: OnceLock<HostServicesBox> = OnceLock::new();

/// Sockets of this library the host drives now.
static HOST_DRIVEN_SOCKETS: AtomicU64 = AtomicU64::new(0);

/// Keeps the services of the host that loaded this library (the first one, if it is loaded
/// again) and returns them.
pub(crate) fn attach(host: HostServicesBox) -> &'static HostServicesBox {
    HOST.get_or_init(|| host)
}

/// The services of the host that loaded this library; `None` for a plugin linked into the program.
pub(crate) fn host() -> Option<&'static HostServicesBox> {
    HOST.get()
}

/// How many sockets of this plugin library (all its transports) the host drives now.
pub fn host_driven_sockets() -> u64 {
    HOST_DRIVEN_SOCKETS.load(Relaxed)
}

/// A stream that can leave the plugin's reactor for the host's and come back: a socket, as an
/// owned file descriptor.
pub trait AdoptableStream: ByteStream + Sized {
    /// Takes the socket out of the plugin's reactor (it stays non-blocking).
    #[cfg(unix)]
    fn into_fd(self) -> io::Result<std::os::fd::OwnedFd>;
    /// Puts a socket [`AdoptableStream::into_fd`] gave back into the plugin's reactor.
    #[cfg(unix)]
    fn from_fd(fd: std::os::fd::OwnedFd) -> io::Result<Self>;
}

impl AdoptableStream for tokio::net::TcpStream {
    #[cfg(unix)]
    fn into_fd(self) -> io::Result<std::os::fd::OwnedFd> {
        Ok(self.into_std()?.into())
    }

    #[cfg(unix)]
    fn from_fd(fd: std::os::fd::OwnedFd) -> io::Result<Self> {
        tokio::net::TcpStream::from_std(fd.into())
    }
}

#[cfg(unix)]
impl AdoptableStream for tokio::net::UnixStream {
    #[cfg(unix)]
    fn into_fd(self) -> io::Result<std::os::fd::OwnedFd> {
        Ok(self.into_std()?.into())
    }

    #[cfg(unix)]
    fn from_fd(fd: std::os::fd::OwnedFd) -> io::Result<Self> {
        tokio::net::UnixStream::from_std(fd.into())
    }
}

/// Hands `stream` to the host's reactor when the host takes it, and returns it either way.
/// Call it inside the plugin (a transport's tasks, or a future the host polls) with a connected
/// stream. An error means the stream could not be moved between the reactors and is lost (the
/// connection fails like any other I/O error).
pub fn adopt<S: AdoptableStream>(stream: S) -> io::Result<HostDrivenStream<S>> {
    #[cfg(unix)]
    if let Some(host) = host() {
        use std::os::fd::{FromRawFd, IntoRawFd};
        let fd = stream.into_fd()?.into_raw_fd();
        return match host.adopt_socket(fd) {
            ROption::RSome(socket) => {
                HOST_DRIVEN_SOCKETS.fetch_add(1, Relaxed);
                Ok(HostDrivenStream::Host(HostSocketStream {
                    socket,
                    reading: StableWaker::new(),
                    writing: StableWaker::new(),
                }))
            }
            // SAFETY: the host declined, so `fd` is still this plugin's, open and unused.
            ROption::RNone => {
                Ok(HostDrivenStream::Plugin(S::from_fd(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })?))
            }
        };
    }
    Ok(HostDrivenStream::Plugin(stream))
}

/// A connected stream: the host's socket, or the plugin's own stream when the host did not take
/// it (see [`adopt`]).
#[derive(Debug)]
pub enum HostDrivenStream<S> {
    /// Driven by the host's reactor.
    Host(HostSocketStream),
    /// Driven by the plugin's reactor.
    Plugin(S),
}

impl<S> HostDrivenStream<S> {
    /// Whether the host drives it.
    pub fn is_host_driven(&self) -> bool {
        matches!(self, HostDrivenStream::Host(_))
    }
}

/// A socket the host drives, read and written through the host's services.
pub struct HostSocketStream {
    socket: HostSocketBox,
    /// The wakers of the task that reads and of the task that writes, as the host's reactor
    /// sees them: the same at every call, so that it keeps the one it has instead of cloning
    /// the waker at every registration (see [`crate::stable_waker`]).
    reading: StableWaker,
    writing: StableWaker,
}

impl std::fmt::Debug for HostSocketStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostSocketStream").finish_non_exhaustive()
    }
}

// The socket is only used through `&self`: nothing in it is ever pinned.
impl Unpin for HostSocketStream {}

impl Drop for HostSocketStream {
    fn drop(&mut self) {
        HOST_DRIVEN_SOCKETS.fetch_sub(1, Relaxed);
    }
}

/// The outcome of a host socket call as tokio wants it.
fn io_poll(poll: FfiPoll<RResult<u64, i32>>) -> Poll<io::Result<usize>> {
    match poll {
        FfiPoll::Pending => Poll::Pending,
        FfiPoll::Ready(RResult::ROk(n)) => Poll::Ready(Ok(n as usize)),
        FfiPoll::Ready(RResult::RErr(errno)) => Poll::Ready(Err(io::Error::from_raw_os_error(errno))),
        FfiPoll::Panicked => Poll::Ready(Err(io::Error::other("the host panicked driving a socket"))),
    }
}

impl AsyncRead for HostSocketStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        // SAFETY: the host writes only bytes it reads from the socket into the unfilled part (as
        // tokio's own sockets do) and de-initializes nothing; `assume_init` covers what it wrote.
        let unfilled = unsafe { buf.unfilled_mut() };
        let len = unfilled.len();
        let this = self.get_mut();
        let socket = &this.socket;
        let read = this
            .reading
            .with_context(cx.waker(), |cx| socket.poll_read(cx, RSliceMut::from_mut_slice(unfilled)));
        match io_poll(read) {
            Poll::Ready(Ok(n)) => {
                let n = n.min(len);
                // SAFETY: the host initialized the first `n` bytes of the unfilled part.
                unsafe { buf.assume_init(n) };
                buf.advance(n);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncWrite for HostSocketStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let socket = &this.socket;
        io_poll(this.writing.with_context(cx.waker(), |cx| socket.poll_write(cx, RSlice::from_slice(buf))))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(match self.socket.shutdown_write() {
            RResult::ROk(_) => Ok(()),
            RResult::RErr(errno) => Err(io::Error::from_raw_os_error(errno)),
        })
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for HostDrivenStream<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            HostDrivenStream::Host(stream) => Pin::new(stream).poll_read(cx, buf),
            HostDrivenStream::Plugin(stream) => Pin::new(stream).poll_read(cx, buf),
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for HostDrivenStream<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            HostDrivenStream::Host(stream) => Pin::new(stream).poll_write(cx, buf),
            HostDrivenStream::Plugin(stream) => Pin::new(stream).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            HostDrivenStream::Host(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
            HostDrivenStream::Plugin(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            HostDrivenStream::Host(stream) => stream.is_write_vectored(),
            HostDrivenStream::Plugin(stream) => stream.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            HostDrivenStream::Host(stream) => Pin::new(stream).poll_flush(cx),
            HostDrivenStream::Plugin(stream) => Pin::new(stream).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            HostDrivenStream::Host(stream) => Pin::new(stream).poll_shutdown(cx),
            HostDrivenStream::Plugin(stream) => Pin::new(stream).poll_shutdown(cx),
        }
    }
}
