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
}
