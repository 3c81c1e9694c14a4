//! What local parties are told, and how: [`PartyEvent`]s delivered to a [`PartySink`] (a
//! connection's membership), and the [`LeaderNotice`] shared by every party told of one leader
//! change, encoded for the wire once.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use elector_client::protocol::{ElectionName, Event, LeaderEvent, LostReason};
use tokio::time::Instant;

use crate::election::LeaderView;

/// Who leads an election, as of one change: shared by every party told of that change (one
/// allocation per change, however many parties), and encoded for the wire at most twice (as
/// its own leader's party sees it, and as everyone else does), not once per party.
#[derive(Debug)]
pub struct LeaderNotice {
    pub name: ElectionName,
    pub leader: Option<String>,
    pub term: Option<u64>,
    /// `Some(why)`: the broker cannot tell who leads.
    pub unknown: Option<String>,
    lines: [OnceLock<Bytes>; 2],
}

impl LeaderNotice {
    pub fn new(name: ElectionName, leader: Option<String>, term: Option<u64>) -> Self {
        LeaderNotice {
            name,
            leader,
            term,
            unknown: None,
            lines: Default::default(),
        }
    }

    /// The notice of a leader view.
    pub fn of_view(name: ElectionName, view: &LeaderView) -> Self {
        LeaderNotice {
            unknown: view.unknown.clone(),
            ..LeaderNotice::new(name, view.leader.clone(), view.term)
        }
    }

    /// The `leader` event, for a party that is (`is_me`) or is not the leader.
    pub fn event(&self, is_me: bool) -> LeaderEvent {
        LeaderEvent {
            name: self.name.clone(),
            leader: self.leader.clone(),
            term: self.term,
            is_me,
            unknown: self.unknown.clone(),
        }
    }

    /// The `leader` event as a protocol line, encoded on first use.
    pub fn line(&self, is_me: bool) -> Bytes {
        self.lines[usize::from(is_me)]
            .get_or_init(|| Event::Leader(self.event(is_me)).to_line().into())
            .clone()
    }
}

/// What a local party is told about an election. Instants are on the broker's monotonic
/// clock (the wire carries them as `CLOCK_MONOTONIC` nanoseconds).
#[derive(Debug, Clone)]
pub enum PartyEvent {
    Leader {
        notice: Arc<LeaderNotice>,
        is_me: bool,
    },
    /// The party leads in `term`; it may act until `valid_until` unless told more.
    Elected {
        identity: String,
        term: u64,
        valid_until: Instant,
    },
    /// A renewal succeeded: the leader may act until `valid_until`.
    Renewed {
        identity: String,
        term: u64,
        valid_until: Instant,
    },
    /// A resumed claim was confirmed ("safe"): the party goes on leading in the same term.
    Resumed {
        identity: String,
        term: u64,
        valid_until: Instant,
    },
    Lost {
        identity: String,
        term: u64,
        reason: LostReason,
    },
    /// The broker may not act on this election's lock (see [`crate::election::Refusal`]).
    Refused {
        code: elector_client::protocol::ErrorCode,
        message: String,
    },
    /// The broker goes away without releasing, for a successor to resume the leadership:
    /// the party may act until `valid_until`, no longer, unless a successor confirms it.
    Jeopardy {
        identity: String,
        term: u64,
        valid_until: Instant,
    },
}

/// Where a party's events go. `deliver` must not block.
pub trait PartySink: Send + Sync + std::fmt::Debug {
    fn deliver(&self, election: &ElectionName, event: PartyEvent);

    /// Where events end up (one connection): parties with the same destination are one
    /// audience, so `is_me` is true for all of them while any of them leads (a connection
    /// that campaigns in an election and also observes it is told the same thing twice).
    fn destination(&self) -> usize;
}
