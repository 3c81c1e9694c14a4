//! The delays between retries: the client's reconnects to the broker, and `elector-shim`'s
//! campaign attempts. They double from a first delay up to [`MAX_RETRY_DELAY`] and go on
//! without end (a broker may be down for a while during an upgrade); a success starts them
//! over. Built on `backon`'s exponential back-off, without jitter: the callers are one per
//! process and retry a local socket, so there is no herd to spread.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// The longest wait between two attempts.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(5);

/// Doubling retry delays, capped at [`MAX_RETRY_DELAY`].
#[derive(Debug)]
pub struct RetryDelays {
    builder: ExponentialBuilder,
    delays: ExponentialBackoff,
}

impl RetryDelays {
    /// Delays of `first`, then twice that, and so on up to [`MAX_RETRY_DELAY`].
    pub fn starting_at(first: Duration) -> Self {
        let builder = ExponentialBuilder::new()
            .with_min_delay(first)
            .with_factor(2.0)
            .with_max_delay(MAX_RETRY_DELAY)
            .without_max_times();
        RetryDelays {
            builder,
            delays: builder.build(),
        }
    }

    /// How long to wait before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        self.delays.next().unwrap_or(MAX_RETRY_DELAY)
    }

    /// An attempt succeeded: the next failure waits the first delay again.
    pub fn reset(&mut self) {
        self.delays = self.builder.build();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_and_starts_over_after_a_success() {
        let mut d = RetryDelays::starting_at(Duration::from_millis(50));
        let ms: Vec<u128> = (0..10).map(|_| d.next_delay().as_millis()).collect();
        assert_eq!(ms, [50, 100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
        d.reset();
        assert_eq!(d.next_delay(), Duration::from_millis(50));
        let mut d = RetryDelays::starting_at(Duration::from_millis(100));
        assert!((0..1000).all(|_| d.next_delay() <= MAX_RETRY_DELAY));
    }
}
