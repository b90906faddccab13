//! Notices a plugin that blocks the host's thread: every poll of a plugin future is timed.
//!
//! A plugin future runs its code inside the host's `poll`. A plugin that calls
//! `std::thread::sleep` or blocking I/O there holds the host's thread: timers, other tasks and
//! every other transport on that thread stall. The watch measures each poll (two reads of a
//! coarse clock: it is read on every poll) and logs a poll longer than [`BLOCKING_POLL`] once per
//! occurrence, naming the plugin and the operation; the conformance suite reads the longest one
//! to fail such a plugin.

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

/// A poll that takes longer than this blocked its thread.
pub const BLOCKING_POLL: Duration = Duration::from_millis(100);

/// The longest blocking poll of one plugin object, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockingPoll {
    /// The operation (`receive`, `send`, ...).
    pub operation: &'static str,
    /// How long the poll held the thread.
    pub duration: Duration,
}

/// Times the polls of one plugin object's futures.
#[derive(Debug)]
pub(crate) struct PollWatch {
    plugin: String,
    longest: Mutex<Option<BlockingPoll>>,
}

impl PollWatch {
    pub(crate) fn new(plugin: &str) -> Arc<Self> {
        Arc::new(Self { plugin: plugin.to_string(), longest: Mutex::new(None) })
    }

    /// The longest poll above [`BLOCKING_POLL`] seen so far.
    pub(crate) fn longest(&self) -> Option<BlockingPoll> {
        *self.longest.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `future`, timing each of its polls.
    pub(crate) fn watch<F: Future>(self: &Arc<Self>, operation: &'static str, future: F) -> Watched<F> {
        Watched { future, operation, watch: Arc::clone(self) }
    }

    fn record(&self, operation: &'static str, duration: Duration) {
        tracing::warn!(
            plugin = %self.plugin,
            "plugin {} blocked a thread for {:.1} s in {operation}: use tokio::time or spawn_blocking",
            self.plugin,
            duration.as_secs_f64()
        );
        let mut longest = self.longest.lock().unwrap_or_else(|p| p.into_inner());
        if longest.is_none_or(|l| l.duration < duration) {
            *longest = Some(BlockingPoll { operation, duration });
        }
    }
}

pin_project_lite::pin_project! {
    /// A plugin future whose polls are timed.
    pub(crate) struct Watched<F> {
        #[pin]
        future: F,
        operation: &'static str,
        watch: Arc<PollWatch>,
    }
}

impl<F: Future> Future for Watched<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let start = CoarseClock::now();
        let result = this.future.poll(cx);
        let took = CoarseClock::now().saturating_sub(start);
        if took > BLOCKING_POLL {
            this.watch.record(this.operation, took);
        }
        result
    }
}

/// The clock of the watch: every poll of a plugin future reads it twice, so it is the cheapest
/// monotonic clock there is. On Linux that is `CLOCK_MONOTONIC_COARSE`, which reads the time of
/// the last timer tick without reading the hardware counter (a few milliseconds' resolution,
/// far below [`BLOCKING_POLL`]; the precise clock was about 1.5 % of a round trip's time in a
/// profile). Elsewhere it is [`std::time::Instant`].
struct CoarseClock;

impl CoarseClock {
    /// The time since an unspecified start.
    #[cfg(target_os = "linux")]
    fn now() -> Duration {
        let mut time = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: `time` is a valid timespec to write; the clock id is a constant Linux knows.
        let status = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut time) };
        if status != 0 {
            return Duration::ZERO;
        }
        Duration::new(u64::try_from(time.tv_sec).unwrap_or(0), u32::try_from(time.tv_nsec).unwrap_or(0))
    }

    #[cfg(not(target_os = "linux"))]
    fn now() -> Duration {
        static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        START.get_or_init(std::time::Instant::now).elapsed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_poll_that_sleeps_is_named_and_a_pending_wait_is_not() {
        let watch = PollWatch::new("spool");
        watch.watch("receive", tokio::time::sleep(Duration::from_millis(150))).await;
        assert_eq!(watch.longest(), None, "waiting without holding the thread is fine");
        watch.watch("receive", async { std::thread::sleep(Duration::from_millis(150)) }).await;
        let blocked = watch.longest().expect("the blocking poll was noticed");
        assert_eq!(blocked.operation, "receive");
        // The coarse clock may read up to a tick (at most 10 ms) short.
        assert!(blocked.duration >= Duration::from_millis(140), "{blocked:?}");
    }
}
