//! Election timing: lease duration, renew deadline, retry period, and the inequalities between
//! them that the safety argument needs ([`ElectionTiming::new`] enforces them).

use std::time::Duration;

/// Election timing. Invariant (checked by [`ElectionTiming::new`]):
/// `lease_duration > renew_deadline > 1.2 × retry_period`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ElectionTiming {
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

/// Why a timing was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimingError {
    #[error("lease_duration must be a whole number of seconds from 1 to 86400, got {0:?}")]
    LeaseDuration(Duration),
    #[error("renew_deadline ({renew_deadline:?}) must be shorter than lease_duration ({lease_duration:?})")]
    RenewDeadlineTooLong {
        renew_deadline: Duration,
        lease_duration: Duration,
    },
    #[error("renew_deadline ({renew_deadline:?}) must be longer than 1.2 × retry_period ({retry_period:?})")]
    RetryPeriodTooLong {
        renew_deadline: Duration,
        retry_period: Duration,
    },
    #[error("retry_period must be at least 10ms, got {0:?}")]
    RetryPeriodTooShort(Duration),
}

impl ElectionTiming {
    pub fn new(
        lease_duration: Duration,
        renew_deadline: Duration,
        retry_period: Duration,
    ) -> Result<Self, TimingError> {
        if lease_duration.subsec_nanos() != 0
            || lease_duration.as_secs() == 0
            || lease_duration.as_secs() > 86_400
        {
            return Err(TimingError::LeaseDuration(lease_duration));
        }
        if renew_deadline >= lease_duration {
            return Err(TimingError::RenewDeadlineTooLong {
                renew_deadline,
                lease_duration,
            });
        }
        if retry_period < Duration::from_millis(10) {
            return Err(TimingError::RetryPeriodTooShort(retry_period));
        }
        if renew_deadline.as_secs_f64() <= 1.2 * retry_period.as_secs_f64() {
            return Err(TimingError::RetryPeriodTooLong {
                renew_deadline,
                retry_period,
            });
        }
        Ok(ElectionTiming {
            lease_duration,
            renew_deadline,
            retry_period,
        })
    }
}

impl Default for ElectionTiming {
    /// client-go's customary 15 s / 10 s / 2 s.
    fn default() -> Self {
        ElectionTiming {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timing_invariants() {
        assert!(
            ElectionTiming::new(
                Duration::from_secs(10),
                Duration::from_secs(10),
                Duration::from_secs(2)
            )
            .is_err()
        );
        assert!(
            ElectionTiming::new(
                Duration::from_secs(15),
                Duration::from_secs(10),
                Duration::from_secs(9)
            )
            .is_err()
        );
        assert!(
            ElectionTiming::new(
                Duration::from_millis(1500),
                Duration::from_secs(1),
                Duration::from_millis(100)
            )
            .is_err()
        );
        assert!(
            ElectionTiming::new(
                Duration::from_secs(1),
                Duration::from_millis(600),
                Duration::from_millis(200)
            )
            .is_ok()
        );
    }
}
