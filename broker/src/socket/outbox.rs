//! A connection's outgoing events: bounded, coalescing, never blocking the sender.
//!
//! `leader` events coalesce per election: a newer one replaces an unread older one (moved to
//! the end, so order with `elected`/`lost` is kept), so a client that reads slowly still ends up
//! with the latest state. Everything else (replies, `elected`, `lost`) is queued; if the queue
//! reaches its limit the client is considered stuck and the connection is closed with a final
//! `slow_consumer` error.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::elections::{PartyEvent, PartySink};
use crate::metrics::Metrics;
use elector_client::protocol::{ElectedEvent, ElectionName, Event, LeaderEvent, LostEvent};

#[derive(Debug, Default)]
struct State {
    queue: VecDeque<Event>,
    /// The latest leader view per election (for `status`).
    views: HashMap<ElectionName, LeaderEvent>,
    overflowed: bool,
    closed: bool,
}

/// The outgoing queue of one connection.
#[derive(Debug)]
pub struct Outbox {
    state: Mutex<State>,
    notify: Notify,
    limit: usize,
    metrics: Arc<Metrics>,
}

impl Outbox {
    pub fn new(limit: usize, metrics: Arc<Metrics>) -> Self {
        Outbox {
            state: Mutex::new(State::default()),
            notify: Notify::new(),
            limit: limit.max(1),
            metrics,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Every critical section leaves the queue consistent: poisoning cannot corrupt it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues an event. Never blocks.
    pub fn push(&self, event: Event) {
        let mut s = self.lock();
        if s.closed || s.overflowed {
            self.metrics.events_dropped.inc();
            return;
        }
        if let Event::Leader(le) = &event {
            s.views.insert(le.name.clone(), le.clone());
            if let Some(pos) = s
                .queue
                .iter()
                .position(|e| matches!(e, Event::Leader(old) if old.name == le.name))
            {
                s.queue.remove(pos);
                self.metrics.events_coalesced.inc();
            }
        }
        if s.queue.len() >= self.limit {
            s.overflowed = true;
            self.metrics.events_dropped.inc_by(s.queue.len() as u64 + 1);
            s.queue.clear();
        } else {
            s.queue.push_back(event);
        }
        drop(s);
        self.notify.notify_one();
    }

    /// Takes everything queued; `None` once the client is judged stuck.
    pub fn drain(&self) -> Option<Vec<Event>> {
        let mut s = self.lock();
        if s.overflowed {
            return None;
        }
        Some(s.queue.drain(..).collect())
    }

    /// Waits until something is queued (or the outbox overflowed).
    pub async fn ready(&self) {
        loop {
            let notified = self.notify.notified();
            {
                let s = self.lock();
                if !s.queue.is_empty() || s.overflowed || s.closed {
                    return;
                }
            }
            notified.await;
        }
    }

    /// Stops accepting events (the connection is going away).
    pub fn close(&self) {
        self.lock().closed = true;
        self.notify.notify_one();
    }

    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// The latest leader view of an election, as this connection was told.
    pub fn view(&self, name: &ElectionName) -> Option<LeaderEvent> {
        self.lock().views.get(name).cloned()
    }

    pub fn forget_view(&self, name: &ElectionName) {
        self.lock().views.remove(name);
    }
}

/// The [`PartySink`] of a connection: turns election events into protocol events.
#[derive(Debug, Clone)]
pub struct ConnectionSink(pub Arc<Outbox>);

impl PartySink for ConnectionSink {
    fn deliver(&self, election: &ElectionName, event: PartyEvent) {
        let name = election.clone();
        let event = match event {
            PartyEvent::Leader { leader, term, is_me } => Event::Leader(LeaderEvent {
                name,
                leader,
                term,
                is_me,
            }),
            PartyEvent::Elected { identity, term } => Event::Elected(ElectedEvent { name, identity, term }),
            PartyEvent::Lost {
                identity,
                term,
                reason,
            } => Event::Lost(LostEvent {
                name,
                identity,
                term,
                reason,
            }),
        };
        self.0.push(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use elector_client::protocol::{LockKind, Pong};

    fn leader(election: &str, who: &str) -> Event {
        Event::Leader(LeaderEvent {
            name: ElectionName {
                election: election.into(),
                namespace: "ns".into(),
                lock: LockKind::Lease,
            },
            leader: Some(who.into()),
            term: Some(1),
            is_me: false,
        })
    }

    #[test]
    fn leader_events_coalesce_and_overflow_closes() {
        let o = Outbox::new(4, Arc::new(Metrics::new()));
        for i in 0..100 {
            o.push(leader("a", &format!("p{i}")));
            o.push(leader("b", &format!("p{i}")));
        }
        let events = o.drain().unwrap();
        assert_eq!(events, vec![leader("a", "p99"), leader("b", "p99")]);
        for _ in 0..5 {
            o.push(Event::Pong(Pong::default()));
        }
        assert!(o.drain().is_none(), "a stuck client overflows");
    }
}
