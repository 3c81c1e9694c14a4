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
    /// Wall-clock time of the last successful renewal, while this broker holds the lock.
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
