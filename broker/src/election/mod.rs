//! The election logic, free of I/O: the lock [`record`] format, the lock as the logic sees it
//! ([`lock_state`]), [`timing`], and the per-election state [`machine`]. The tasks that
//! connect it to lock backends and local parties live in [`crate::registry`].
//!
//! # Why there are never two leaders
//! - A foreign holder is live until `seen_at + leaseDurationSeconds`, where `seen_at` is when
//!   this broker last saw the record (or its version) change, on the local monotonic clock.
//! - The local leader is told `lost` as soon as `last_renew_start + renew_deadline` passes
//!   without a successful renewal, where `last_renew_start` is when the last successful write
//!   was *sent*. Any other broker saw that write change the record no earlier than it was sent,
//!   so it cannot take over before `last_renew_start + lease_duration`, which is later than
//!   our deadline because `lease_duration > renew_deadline` is enforced.
//! - Every acquisition is a compare-and-swap on the version last seen: of two contenders only
//!   one write can succeed.
//! - Seeing the record change to another holder, or the object deleted, ends local leadership
//!   at once.
//!
//! # Why a leader may outlive its broker (protocol 1.1)
//! With `elected` and after each renewal the leader is told `valid_until = last_renew_start +
//! renew_deadline` on the node's `CLOCK_MONOTONIC`, which every process of the node shares.
//! When its broker goes away, the leader keeps acting until `valid_until` at most ("jeopardy"),
//! never later, by the same inequality as above: another node takes over no earlier than
//! `last_renew_start + lease_duration > valid_until`.
//! A successor broker confirms the leader ("safe") only after (1) reading the lock afresh,
//! (2) finding the record still naming that identity in that term, and (3) renewing it by a
//! compare-and-swap on the version it read, sent at `t` and answered before both `t +
//! renew_deadline` and the leader's `valid_until`. If anyone else wrote the record meanwhile
//! the swap fails; if the record changed, the claim is refused. The new guarantee, `t +
//! renew_deadline`, again falls before any other node can take over.

pub mod lock_state;
pub mod machine;
pub mod record;
pub mod timing;

pub use lock_state::{LockFailure, LockState, Observed};
pub use machine::{
    Candidacy, Claim, Contender, Farewell, JoinError, LeaderView, Notification, PartyId, Refusal, StepDown,
};
pub use timing::{ElectionTiming, TimingError};
