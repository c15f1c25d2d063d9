//! Samples and what is read off them.

use std::time::Duration;

/// Durations measured for one thing.
#[derive(Debug, Clone, Default)]
pub struct Samples(Vec<Duration>);

impl Samples {
    /// Adds one.
    pub fn push(&mut self, sample: Duration) {
        self.0.push(sample);
    }

    /// How many there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The `q` quantile (0.5 is the median), by the nearest rank; zero without samples.
    pub fn quantile(&self, q: f64) -> Duration {
        if self.0.is_empty() {
            return Duration::ZERO;
        }
        let mut sorted = self.0.clone();
        sorted.sort_unstable();
        let rank = ((sorted.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize;
        sorted[rank]
    }

    /// The median.
    pub fn median(&self) -> Duration {
        self.quantile(0.5)
    }

    /// Every sample in the order measured, in a unit of its own (see [`micros`], [`millis`]).
    pub fn in_order(&self, unit: impl Fn(Duration) -> f64) -> Vec<f64> {
        self.0.iter().map(|&d| unit(d)).collect()
    }
}

/// How far a ratio moved within its run: the lowest and highest ratio of the values'
/// `q` quantile to the floors', over consecutive chunks of the samples (taken in the order
/// measured: each chunk's values and floors were interleaved, so they saw the same
/// machine).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Spread {
    /// The lowest chunk ratio.
    pub low: f64,
    /// The highest chunk ratio.
    pub high: f64,
    /// How many chunks.
    pub chunks: usize,
}

/// The most chunks a spread is read over.
const CHUNKS: usize = 5;

/// The [`Spread`] of the ratio of `values`' `q` quantile to `floors'`, over up to five
/// chunks of at least three samples each; `None` with too few samples or a zero floor.
pub fn spread(values: &[f64], floors: &[f64], q: f64) -> Option<Spread> {
    let n = values.len().min(floors.len());
    let chunks = (n / 3).min(CHUNKS);
    if chunks < 2 {
        return None;
    }
    let quantile = |chunk: &[f64]| {
        let mut sorted = chunk.to_vec();
        sorted.sort_unstable_by(f64::total_cmp);
        let rank = ((sorted.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize;
        sorted[rank]
    };
    let mut ratios = Vec::with_capacity(chunks);
    for i in 0..chunks {
        let (start, end) = (i * n / chunks, (i + 1) * n / chunks);
        let floor = quantile(&floors[start..end]);
        if floor == 0.0 {
            return None;
        }
        ratios.push(quantile(&values[start..end]) / floor);
    }
    Some(Spread {
        low: ratios.iter().copied().fold(f64::INFINITY, f64::min),
        high: ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        chunks,
    })
}

/// A duration in microseconds, as a float.
pub fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// A duration in milliseconds, as a float.
pub fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_read_off_the_sorted_samples() {
        let mut samples = Samples::default();
        for us in [9, 1, 5, 3, 7] {
            samples.push(Duration::from_micros(us));
        }
        assert_eq!(samples.median(), Duration::from_micros(5));
        assert_eq!(samples.quantile(0.0), Duration::from_micros(1));
        assert_eq!(samples.quantile(1.0), Duration::from_micros(9));
        assert_eq!(samples.quantile(0.9), Duration::from_micros(9));
        assert_eq!(Samples::default().median(), Duration::ZERO);
    }

    #[test]
    fn a_spread_is_the_range_of_the_chunks_ratios() {
        // Three chunks of three: ratios of medians 2, 1 and 4.
        let floors = [1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 1.0, 1.0, 1.0];
        let values = [2.0, 2.0, 9.0, 2.0, 2.0, 0.0, 4.0, 4.0, 4.0];
        let spread = spread(&values, &floors, 0.5).unwrap();
        assert_eq!((spread.low, spread.high, spread.chunks), (1.0, 4.0, 3));
        // Too few samples to say anything; a zero floor neither.
        assert_eq!(super::spread(&values[..5], &floors[..5], 0.5), None);
        assert_eq!(super::spread(&values, &[0.0; 9], 0.5), None);
    }
}
