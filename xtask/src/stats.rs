//! The summaries the benchmarks print: percentiles and medians of what they measured.

use std::time::Duration;

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Milliseconds as a program logged them (`duration_ms=12.5`), as durations.
pub fn millis(values: &[f64]) -> Vec<Duration> {
    values
        .iter()
        .map(|m| Duration::from_secs_f64(m / 1e3))
        .collect()
}

/// The `p`th percentile (nearest rank) of `values`.
pub fn percentile(values: &[Duration], p: usize) -> Duration {
    let mut sorted = values.to_vec();
    sorted.sort();
    percentile_of_sorted(&sorted, p)
}

/// [`percentile`] of values already sorted (a load generator's latencies, sorted once for all
/// its percentiles); the default value when there are none.
pub fn percentile_of_sorted<T: Copy + Default>(sorted: &[T], p: usize) -> T {
    if sorted.is_empty() {
        return T::default();
    }
    let rank = (p * sorted.len()).div_ceil(100).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// The median of `values`, NaN when there are none.
pub fn median_f64(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&v, 50), Duration::from_millis(50));
        assert_eq!(percentile(&v, 99), Duration::from_millis(99));
        assert_eq!(percentile(&v, 100), Duration::from_millis(100));
        let few = [3, 1, 2].map(Duration::from_millis);
        assert_eq!(percentile(&few, 50), Duration::from_millis(2));
        assert_eq!(percentile(&few, 99), Duration::from_millis(3));
        assert_eq!(percentile(&[], 50), Duration::ZERO);
        assert_eq!(percentile_of_sorted(&[10u64, 20, 30, 40], 50), 20);
        assert_eq!(percentile_of_sorted::<u64>(&[], 99), 0);
    }

    #[test]
    fn medians_take_the_middle_value() {
        assert_eq!(median_f64(vec![5.0, 1.0, 3.0]), 3.0);
        assert!(median_f64(Vec::new()).is_nan());
    }
}
