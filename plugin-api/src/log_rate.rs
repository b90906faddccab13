//! Rate-limited log lines: a warning that input from outside can repeat (one per message, per
//! datagram, per connection) is written a few times per interval, and the lines left out are
//! counted and named in the next line written.
//!
//! A peer sending 100,000 messages to the wrong node must not write 100,000 lines: the log
//! would grow by megabytes and hide everything else. One [`LogRateLimit`] per kind of line
//! (usually a `static`), checked before the line is written:
//!
//! ```
//! use comms_plugin_api::log_rate::LogRateLimit;
//!
//! static MISADDRESSED: LogRateLimit = LogRateLimit::standard(); // 5 lines per 10 s
//!
//! fn on_misaddressed(to: &str) {
//!     if let Some(repeats) = MISADDRESSED.check() {
//!         // `repeats` prints nothing, or " (and 9,999 more like this in the last 10 s)".
//!         tracing::warn!(to, "message for another node dropped{repeats}");
//!     }
//! }
//! # on_misaddressed("bob");
//! ```
//!
//! Limits: the count of the lines left out is written with the next line of that kind once the
//! interval is over; if none comes, it is not written (a burst that stopped needs no more
//! attention). Callers that need the exact total count it themselves (a counter in the stats).

use std::{
    fmt,
    sync::Mutex,
    time::{Duration, Instant},
};

/// Lets through at most `burst` lines per `interval`; see the [module documentation](self).
#[derive(Debug)]
pub struct LogRateLimit {
    interval: Duration,
    burst: u64,
    window: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    /// When the current interval began (at its first line); `None` before any.
    started: Option<Instant>,
    /// Lines let through in the current interval.
    written: u64,
    /// Lines left out since the last line written.
    left_out: u64,
    /// When the first of those was left out.
    left_out_since: Option<Instant>,
}

/// The interval of [`LogRateLimit::standard`].
pub const STANDARD_INTERVAL: Duration = Duration::from_secs(10);

/// The lines per interval of [`LogRateLimit::standard`].
pub const STANDARD_BURST: u64 = 5;

impl LogRateLimit {
    /// The limit every per-message warning of comms uses: [`STANDARD_BURST`] lines per
    /// [`STANDARD_INTERVAL`].
    pub const fn standard() -> Self {
        Self::new(STANDARD_INTERVAL, STANDARD_BURST)
    }

    /// At most `burst` lines (at least 1) per `interval`. `const`, so that it can be a `static`.
    pub const fn new(interval: Duration, burst: u64) -> Self {
        Self {
            interval,
            burst: if burst == 0 { 1 } else { burst },
            window: Mutex::new(Window { started: None, written: 0, left_out: 0, left_out_since: None }),
        }
    }

    /// Whether to write the line now: `Some` with what was left out before it (to append to the
    /// line), or `None` to leave it out (it is counted).
    pub fn check(&self) -> Option<Repeats> {
        self.check_at(Instant::now())
    }

    /// [`LogRateLimit::check`] at `now` (for tests with simulated time).
    pub fn check_at(&self, now: Instant) -> Option<Repeats> {
        // Counters only: valid after any panic.
        let mut window = self.window.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let over =
            window.started.is_none_or(|started| now.saturating_duration_since(started) >= self.interval);
        if over {
            window.started = Some(now);
            window.written = 0;
        }
        if window.written >= self.burst {
            if window.left_out == 0 {
                window.left_out_since = Some(now);
            }
            window.left_out += 1;
            return None;
        }
        window.written += 1;
        let repeats = Repeats {
            left_out: std::mem::take(&mut window.left_out),
            over: window
                .left_out_since
                .take()
                .map_or(Duration::ZERO, |since| now.saturating_duration_since(since)),
        };
        Some(repeats)
    }
}

/// What a [`LogRateLimit`] left out before the line it lets through. Its `Display` is empty
/// when nothing was, and ` (and 9,999 more like this in the last 10 s)` otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repeats {
    /// Lines left out.
    pub left_out: u64,
    /// From the first of them until now.
    pub over: Duration,
}

impl fmt::Display for Repeats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.left_out == 0 {
            return Ok(());
        }
        // Whole seconds, at least 1: "in the last 0 s" would read as a bug.
        let seconds = self.over.as_secs().max(1);
        write!(f, " (and {} more like this in the last {seconds} s)", thousands(self.left_out))
    }
}

/// `9999` as `9,999`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_let_through_then_counted_and_the_count_comes_with_the_next_line() {
        let start = Instant::now();
        let limit = LogRateLimit::new(Duration::from_secs(10), 3);
        let written: Vec<Repeats> = (0..10_002).filter_map(|_| limit.check_at(start)).collect();
        assert_eq!(written.len(), 3, "three lines per interval");
        assert!(written.iter().all(|r| r.to_string().is_empty()), "nothing left out before them");
        assert!(limit.check_at(start + Duration::from_secs(9)).is_none(), "still the same interval");
        let next = limit.check_at(start + Duration::from_secs(10)).expect("a new interval");
        assert_eq!(next.left_out, 10_000);
        assert_eq!(next.to_string(), " (and 10,000 more like this in the last 10 s)");
        let after = limit.check_at(start + Duration::from_secs(10)).expect("the count was reported");
        assert_eq!(after.to_string(), "");
    }

    #[test]
    fn counts_read_with_thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000), "1,000");
        assert_eq!(thousands(9_999), "9,999");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }
}
