//! The lock as the election logic sees it: an object's record and version ([`Observed`]), its
//! presence ([`LockState`]), and how a request about it failed ([`LockFailure`]). The backends
//! in [`crate::lock`] speak this vocabulary.

use std::time::Duration;

use super::record::LeaderRecord;

/// A lock object as last read: its record (if it has a parseable one) and version.
#[derive(Debug, Clone, PartialEq)]
pub struct Observed<Raw> {
    pub record: Option<LeaderRecord>,
    /// The object's `resourceVersion`: the compare-and-swap token.
    pub version: String,
    /// The whole object, so a replace keeps everything else it carries.
    pub raw: Raw,
}

/// What the lock looks like to the broker.
#[derive(Debug, Clone, PartialEq)]
pub enum LockState<Raw> {
    /// Not read yet.
    Unknown,
    /// The object does not exist.
    Missing,
    Present(Observed<Raw>),
}

/// How a write or read failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockFailure {
    /// Someone else wrote first (409 Conflict / AlreadyExists).
    Conflict,
    /// The object is gone (404 on replace).
    NotFound,
    /// Anything else: server errors, throttling (with the server's `Retry-After`), timeouts.
    Transient {
        retry_after: Option<Duration>,
        /// What went wrong, for people (logs, and the `unknown` of a leader view).
        cause: String,
    },
    /// The API server refused the request (403): RBAC (the namespace has no RoleBinding for the
    /// broker) or the admission policy. `message` is the server's, naming what was missing.
    Forbidden { message: String },
    /// The object is not a lock: an Endpoints with subsets is a live Service's, which the broker
    /// never writes. Nothing was sent.
    NotALock { message: String },
}

impl LockFailure {
    /// A transient failure without a `Retry-After`.
    pub fn transient(cause: impl Into<String>) -> Self {
        LockFailure::Transient {
            retry_after: None,
            cause: cause.into(),
        }
    }
}
