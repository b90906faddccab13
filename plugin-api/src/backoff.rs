//! Exponential backoff for reconnecting: shared by every backend that retries a connection.

use std::time::Duration;

/// Delays that double from `initial` up to `max`, for at most `attempts` tries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backoff {
    /// Delay after the first failure.
    pub initial: Duration,
    /// Upper bound of any delay.
    pub max: Duration,
    /// How many attempts in total before giving up (at least 1).
    pub attempts: u32,
}

impl Backoff {
    /// The delay to wait after failed attempt number `attempt` (1-based), or `None` when no
    /// attempts are left.
    pub fn delay_after(&self, attempt: u32) -> Option<Duration> {
        if attempt >= self.attempts.max(1) {
            return None;
        }
        let factor = 1u32.checked_shl(attempt.saturating_sub(1)).unwrap_or(u32::MAX);
        Some(self.initial.saturating_mul(factor).min(self.max))
    }

    /// Runs `attempt` until it succeeds or the attempts are used up, sleeping between tries.
    /// Returns the last error and the number of attempts made on failure.
    pub async fn retry<T, E, F, Fut>(&self, mut attempt: F) -> Result<T, (E, u32)>
    where
        F: FnMut(u32) -> Fut,
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        let mut number = 1;
        loop {
            match attempt(number).await {
                Ok(value) => return Ok(value),
                Err(error) => match self.delay_after(number) {
                    Some(delay) => tokio::time::sleep(delay).await,
                    None => return Err((error, number)),
                },
            }
            number += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_and_stop_after_the_attempts() {
        let backoff =
            Backoff { initial: Duration::from_millis(10), max: Duration::from_millis(35), attempts: 5 };
        let delays: Vec<_> = (1..=5).map(|n| backoff.delay_after(n)).collect();
        assert_eq!(
            delays,
            vec![
                Some(Duration::from_millis(10)),
                Some(Duration::from_millis(20)),
                Some(Duration::from_millis(35)),
                Some(Duration::from_millis(35)),
                None
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn retry_returns_the_first_success_or_the_last_error() {
        let backoff =
            Backoff { initial: Duration::from_millis(1), max: Duration::from_millis(1), attempts: 3 };
        let ok: Result<u32, (&str, u32)> = backoff
            .retry(|n| async move {
                if n == 2 {
                    Ok(n)
                } else {
                    Err("no")
                }
            })
            .await;
        assert_eq!(ok, Ok(2));
        let failed: Result<u32, (&str, u32)> = backoff.retry(|_| async { Err("down") }).await;
        assert_eq!(failed, Err(("down", 3)));
    }
}
