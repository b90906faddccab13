//! Host side of host-driven I/O (contract 1.1): the host's executor runs a plugin's tasks and
//! the host's reactor drives a plugin's sockets.
//!
//! Why: a plugin library links its own tokio, whose reactor wakes its own threads. A message
//! that arrives on a plugin's socket then wakes a plugin thread, which wakes a host thread to
//! take it: two thread wake-ups per message, each a futex and a trip through the scheduler (on
//! the development machine about two thirds of a round trip's time). A socket the host adopts
//! wakes the host thread that is waiting for it, which reads the message and hands it to the
//! application on the same thread, as a plugin linked into the program would.
//!
//! Both services work only on a thread of a host tokio runtime (the host polls plugin futures
//! on its runtime's threads; that is where a plugin asks). Anywhere else they decline and the
//! plugin keeps its task or socket: a plugin never depends on them.

#[cfg(unix)]
use comms_core::abi_stable::std_types::{RSlice, RSliceMut};
use comms_core::{
    abi_stable::{sabi_trait::TD_Opaque, std_types::ROption},
    async_ffi::{FfiContext, FfiFuture, FfiPoll},
    HostSocket, HostSocketBox, HostSocket_TO, SocketResult,
};
#[cfg(unix)]
use std::mem::MaybeUninit;
use std::{io, task::Poll};

/// Runs `task` on the host runtime of the calling thread; gives it back when there is none.
pub(crate) fn spawn(task: FfiFuture<()>) -> ROption<FfiFuture<()>> {
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => {
            // Dropped unawaited: the plugin learns of the end from the task itself.
            drop(runtime.spawn(task));
            ROption::RNone
        }
        Err(_) => ROption::RSome(task),
    }
}

/// Registers the socket `fd` with the reactor of the calling thread's host runtime.
#[cfg(unix)]
pub(crate) fn adopt_socket(fd: i32) -> ROption<HostSocketBox> {
    use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
    let Ok(runtime) = tokio::runtime::Handle::try_current() else { return ROption::RNone };
    if fd < 0 {
        return ROption::RNone;
    }
    let _entered = runtime.enter();
    // SAFETY: the plugin hands over a socket it owns and no longer uses; on refusal it is
    // handed back (`into_raw_fd`) without being closed.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: an `OwnedFd` stays open, as the same descriptor, for as long as it is owned.
    match unsafe { tokio::io::unix::AsyncFd::register(owned) } {
        Ok(socket) => ROption::RSome(HostSocket_TO::from_value(AdoptedSocket { socket }, TD_Opaque)),
        Err(error) => {
            let (owned, cause) = error.into_parts();
            let _ = owned.into_raw_fd();
            tracing::debug!(%cause, "a plugin's socket could not join the host's reactor; the plugin drives it");
            ROption::RNone
        }
    }
}

#[cfg(not(unix))]
pub(crate) fn adopt_socket(_fd: i32) -> ROption<HostSocketBox> {
    ROption::RNone
}

/// A socket the host took from a plugin: registered with the host's reactor, closed on drop.
#[cfg(unix)]
struct AdoptedSocket {
    socket: tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>,
}

#[cfg(unix)]
impl AdoptedSocket {
    /// Runs `operation` once the socket is ready for `direction`, as tokio's own sockets do: a
    /// `WouldBlock` clears the readiness and waits again, and so does a short transfer (the
    /// socket had no more to give or take, so the next try would only block).
    fn poll_ready_io(
        &self,
        cx: &mut FfiContext<'_>,
        direction: tokio::io::Interest,
        len: usize,
        operation: impl Fn(i32) -> isize,
    ) -> FfiPoll<SocketResult> {
        use std::os::fd::AsRawFd;
        cx.with_context(|cx| loop {
            let ready = if direction.is_readable() {
                self.socket.poll_read_ready(cx)
            } else {
                self.socket.poll_write_ready(cx)
            };
            let mut guard = match ready {
                Poll::Pending => return FfiPoll::Pending,
                Poll::Ready(Err(error)) => return FfiPoll::Ready(Err(errno(&error)).into()),
                Poll::Ready(Ok(guard)) => guard,
            };
            let done = guard.try_io(|socket| {
                let n = operation(socket.as_raw_fd());
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match done {
                Ok(Ok(n)) => {
                    if n > 0 && n < len {
                        guard.clear_ready();
                    }
                    return FfiPoll::Ready(Ok(n as u64).into());
                }
                Ok(Err(error)) if error.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(error)) => return FfiPoll::Ready(Err(errno(&error)).into()),
                Err(_would_block) => continue,
            }
        })
    }
}

#[cfg(unix)]
impl HostSocket for AdoptedSocket {
    fn poll_read(
        &self,
        cx: &mut FfiContext<'_>,
        mut buffer: RSliceMut<'_, MaybeUninit<u8>>,
    ) -> FfiPoll<SocketResult> {
        let (pointer, len) = (buffer.as_mut_ptr(), buffer.len());
        // SAFETY: `read` writes at most `len` bytes into the buffer, which is ours for the call.
        self.poll_ready_io(cx, tokio::io::Interest::READABLE, len, |fd| unsafe {
            libc::read(fd, pointer.cast(), len)
        })
    }

    fn poll_write(&self, cx: &mut FfiContext<'_>, bytes: RSlice<'_, u8>) -> FfiPoll<SocketResult> {
        let (pointer, len) = (bytes.as_ptr(), bytes.len());
        // SAFETY: `send` reads at most `len` bytes of the slice, which is borrowed for the call.
        // MSG_NOSIGNAL: a peer that closed yields EPIPE, not a SIGPIPE that kills the host.
        self.poll_ready_io(cx, tokio::io::Interest::WRITABLE, len, |fd| unsafe {
            libc::send(fd, pointer.cast(), len, libc::MSG_NOSIGNAL)
        })
    }

    fn shutdown_write(&self) -> SocketResult {
        use std::os::fd::AsRawFd;
        // SAFETY: shutdown on a socket this object owns.
        match unsafe { libc::shutdown(self.socket.as_raw_fd(), libc::SHUT_WR) } {
            0 => Ok(0).into(),
            _ => Err(errno(&io::Error::last_os_error())).into(),
        }
    }
}

/// The operating system's error number of `error` (`EIO` for an error that has none).
fn errno(error: &io::Error) -> i32 {
    const EIO: i32 = 5;
    error.raw_os_error().unwrap_or(EIO)
}
