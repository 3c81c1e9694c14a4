//! The node's monotonic clock on the wire.
//!
//! Every process of a node reads the same `CLOCK_MONOTONIC` (unless a container runs in a time
//! namespace of its own). The broker states a leader's guarantee (`valid_until`) as a reading of
//! that clock in nanoseconds, so a client can hold its leader to it without trusting wall
//! clocks. [`Instant`] uses `CLOCK_MONOTONIC` too, but cannot show its raw value: these helpers
//! convert through "now".

use std::time::Duration;

use tokio::time::Instant;

/// `CLOCK_MONOTONIC` now, in nanoseconds.
pub fn monotonic_now_ns() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(ts) => (ts.tv_sec() as u64)
            .saturating_mul(1_000_000_000)
            .saturating_add(ts.tv_nsec() as u64),
        // CLOCK_MONOTONIC exists on every Linux; should it ever fail, 0 makes every guarantee
        // look expired (the safe reading).
        Err(_) => 0,
    }
}

/// An instant as a `CLOCK_MONOTONIC` reading in nanoseconds.
pub fn to_monotonic_ns(at: Instant) -> u64 {
    let now = Instant::now();
    let mono = monotonic_now_ns();
    if at >= now {
        mono.saturating_add((at - now).as_nanos() as u64)
    } else {
        mono.saturating_sub((now - at).as_nanos() as u64)
    }
}

/// A `CLOCK_MONOTONIC` reading in nanoseconds as an instant of this process.
pub fn from_monotonic_ns(ns: u64) -> Instant {
    let now = Instant::now();
    let mono = monotonic_now_ns();
    if ns >= mono {
        now + Duration::from_nanos(ns - mono)
    } else {
        now.checked_sub(Duration::from_nanos(mono - ns)).unwrap_or(now)
    }
}

/// How far apart two processes' monotonic clocks may read and still be taken for one clock:
/// the greeting's `monotonic_now` is read before it is sent, so a shared clock reads a little
/// later here (scheduling, a busy node); a clock of another time namespace or machine is off
/// by far more (its boot time).
pub const SHARED_CLOCK_TOLERANCE: Duration = Duration::from_secs(1);

/// Whether a peer's reading `peer_now_ns`, taken just before we read ours, comes from our clock.
pub fn is_shared(peer_now_ns: u64) -> bool {
    let ours = monotonic_now_ns();
    ours >= peer_now_ns && ours - peer_now_ns <= SHARED_CLOCK_TOLERANCE.as_nanos() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_the_wire() {
        let at = Instant::now() + Duration::from_millis(1500);
        let back = from_monotonic_ns(to_monotonic_ns(at));
        let diff = if back > at { back - at } else { at - back };
        assert!(diff < Duration::from_millis(50), "{diff:?}");
        assert!(is_shared(monotonic_now_ns()));
        assert!(
            !is_shared(monotonic_now_ns() + 5_000_000_000),
            "a clock ahead of ours"
        );
        assert!(!is_shared(monotonic_now_ns().saturating_sub(3_600_000_000_000)));
    }
}
