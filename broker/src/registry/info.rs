//! The view of an election that `/elections` shows.

use serde::Serialize;

use elector_client::protocol::ElectionName;

/// One election as shown on `/elections`.
#[derive(Debug, Clone, Serialize)]
pub struct ElectionInfo {
    #[serde(flatten)]
    pub name: ElectionName,
    pub leader: Option<String>,
    pub term: Option<u64>,
    pub held_by_this_broker: bool,
    pub candidates: Vec<CandidateInfo>,
    pub observers: usize,
    /// While this broker holds the lock: when the last successful renewal (or the acquisition)
    /// was sent, on the wall clock (RFC 3339). The leader's guarantee counts from that moment;
    /// a renewal still in flight, or one that failed, does not move it.
    pub last_renew: Option<String>,
    pub lease_duration_seconds: u64,
    pub renew_deadline_seconds: f64,
    pub retry_period_seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct CandidateInfo {
    pub identity: String,
    pub priority: i32,
    pub is_leader: bool,
}
