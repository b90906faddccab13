//! What every benchmark program shares: the `COMMS_BENCH_SCALE` setting, time-limited steps,
//! failing with a message instead of hanging, percentiles.

use std::{future::Future, time::Duration};

/// The `COMMS_BENCH_SCALE` multiplier for message counts (default 1). Ends the program with a
/// message when it is not a positive number.
pub fn scale(bench: &str) -> f64 {
    match std::env::var("COMMS_BENCH_SCALE") {
        Err(_) => 1.0,
        Ok(text) => match text.trim().parse::<f64>() {
            Ok(scale) if scale.is_finite() && scale > 0.0 => scale,
            _ => fail(bench, &format!("COMMS_BENCH_SCALE must be a positive number, not `{text}`")),
        },
    }
}

/// `count` times `scale`, at least 1.
pub fn scaled(count: usize, scale: f64) -> usize {
    ((count as f64 * scale).round() as usize).max(1)
}

/// Ends the benchmark `bench` with a message, without waiting for tasks that may be stuck.
pub fn fail(bench: &str, message: &str) -> ! {
    eprintln!("{bench} benchmark failed: {message}");
    std::process::exit(1)
}

/// Runs one step of a benchmark under a time limit; the error names the step.
pub async fn step<T>(
    what: &str,
    limit: Duration,
    work: impl Future<Output = Result<T, String>>,
) -> Result<T, String> {
    match tokio::time::timeout(limit, work).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(format!("{what}: {error}")),
        Err(_) => Err(format!("{what}: not done within {} s; the benchmark is stuck", limit.as_secs())),
    }
}

/// The `percent` percentile of sorted durations, in microseconds (NaN when empty).
pub fn percentile_micros(sorted: &[Duration], percent: usize) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (sorted.len() * percent).div_ceil(100).max(1);
    sorted[rank.min(sorted.len()) - 1].as_secs_f64() * 1e6
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_the_rank() {
        let sorted: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        assert_eq!(percentile_micros(&sorted, 50), 50.0);
        assert_eq!(percentile_micros(&sorted, 99), 99.0);
        assert!(percentile_micros(&[], 50).is_nan());
        assert_eq!(scaled(1000, 0.25), 250);
        assert_eq!(scaled(1, 0.01), 1);
    }
}
