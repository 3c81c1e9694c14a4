//! A connection's outgoing events: bounded, coalescing, never blocking the sender.
//!
//! `leader` events coalesce per election: a newer one replaces an unread older one (moved to
//! the end, so order with `elected`/`lost` is kept), so a client that reads slowly still ends up
//! with the latest state. Everything else (replies, `elected`, `lost`) is queued; if the queue
//! reaches its limit the client is considered stuck and the connection is closed with a final
//! `slow_consumer` error.
//!
//! A leader change fanned out to many connections is queued as a shared [`LeaderNotice`] and
//! encoded once, not once per connection.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::Notify;

use crate::elections::{LeaderNotice, PartyEvent, PartySink};
use crate::metrics::Metrics;
use elector_client::protocol::{ElectedEvent, ElectionName, Event, LeaderEvent, LostEvent};

/// One queued event.
#[derive(Debug)]
pub enum Outgoing {
    Event(Event),
    /// A `leader` event, shared with every other party told of the same change.
    Leader {
        notice: Arc<LeaderNotice>,
        is_me: bool,
    },
}

impl Outgoing {
    /// The event as a protocol line.
    pub fn line(&self) -> Bytes {
        match self {
            Outgoing::Event(e) => e.to_line().into(),
            Outgoing::Leader { notice, is_me } => notice.line(*is_me),
        }
    }

    fn leader_of(&self) -> Option<&ElectionName> {
        match self {
            Outgoing::Leader { notice, .. } => Some(&notice.name),
            Outgoing::Event(Event::Leader(le)) => Some(&le.name),
            Outgoing::Event(_) => None,
        }
    }
}

#[derive(Debug, Default)]
struct State {
    queue: VecDeque<Outgoing>,
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
        self.enqueue(Outgoing::Event(event));
    }

    /// Queues a shared `leader` event. Never blocks.
    pub fn push_leader(&self, notice: Arc<LeaderNotice>, is_me: bool) {
        self.enqueue(Outgoing::Leader { notice, is_me });
    }

    fn enqueue(&self, item: Outgoing) {
        let mut s = self.lock();
        if s.closed || s.overflowed {
            self.metrics.events_dropped.inc();
            return;
        }
        if let Some(name) = item.leader_of()
            && let Some(pos) = s.queue.iter().position(|old| old.leader_of() == Some(name))
        {
            s.queue.remove(pos);
            self.metrics.events_coalesced.inc();
        }
        if s.queue.len() >= self.limit {
            s.overflowed = true;
            self.metrics.events_dropped.inc_by(s.queue.len() as u64 + 1);
            s.queue = VecDeque::new();
        } else {
            s.queue.push_back(item);
        }
        drop(s);
        self.notify.notify_one();
    }

    /// Takes everything queued; `None` once the client is judged stuck. The queue's memory
    /// goes with it: an idle connection holds no queue.
    pub fn drain(&self) -> Option<VecDeque<Outgoing>> {
        let mut s = self.lock();
        if s.overflowed {
            return None;
        }
        Some(std::mem::take(&mut s.queue))
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
}

/// The [`PartySink`] of one campaign or observation of a connection: turns its election events
/// into protocol events on the connection's outbox, and keeps the latest leader view it was
/// told (for `status`).
#[derive(Debug)]
pub struct MembershipSink {
    outbox: Arc<Outbox>,
    view: Mutex<Option<(Arc<LeaderNotice>, bool)>>,
}

impl MembershipSink {
    pub fn new(outbox: Arc<Outbox>) -> Self {
        MembershipSink {
            outbox,
            view: Mutex::new(None),
        }
    }

    /// The latest leader view this party was told.
    pub fn view(&self) -> Option<LeaderEvent> {
        let view = self.view.lock().unwrap_or_else(|p| p.into_inner());
        view.as_ref().map(|(notice, is_me)| notice.event(*is_me))
    }
}

impl PartySink for MembershipSink {
    fn deliver(&self, election: &ElectionName, event: PartyEvent) {
        let name = election.clone();
        let event = match event {
            PartyEvent::Leader { notice, is_me } => {
                *self.view.lock().unwrap_or_else(|p| p.into_inner()) = Some((notice.clone(), is_me));
                self.outbox.push_leader(notice, is_me);
                return;
            }
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
        self.outbox.push(event);
    }

    fn destination(&self) -> usize {
        Arc::as_ptr(&self.outbox) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use elector_client::protocol::{LockKind, Pong};

    fn notice(election: &str, who: &str) -> Arc<LeaderNotice> {
        let name = ElectionName {
            election: election.into(),
            namespace: "ns".into(),
            lock: LockKind::Lease,
        };
        Arc::new(LeaderNotice::new(name, Some(who.into()), Some(1)))
    }

    fn lines(queue: VecDeque<Outgoing>) -> Vec<Event> {
        queue
            .iter()
            .map(|o| elector_client::protocol::parse_event(&o.line()).unwrap())
            .collect()
    }

    #[test]
    fn leader_events_coalesce_and_overflow_closes() {
        let o = Outbox::new(4, Arc::new(Metrics::new()));
        for i in 0..100 {
            o.push_leader(notice("a", &format!("p{i}")), false);
            o.push_leader(notice("b", &format!("p{i}")), i == 99);
        }
        let events = lines(o.drain().unwrap());
        assert_eq!(
            events,
            [
                Event::Leader(notice("a", "p99").event(false)),
                Event::Leader(notice("b", "p99").event(true))
            ]
        );
        for _ in 0..5 {
            o.push(Event::Pong(Pong::default()));
        }
        assert!(o.drain().is_none(), "a stuck client overflows");
    }

    #[test]
    fn a_shared_notice_is_encoded_once_per_point_of_view() {
        let n = notice("a", "p1");
        assert!(std::ptr::eq(n.line(false).as_ptr(), n.line(false).as_ptr()));
        assert_ne!(n.line(false), n.line(true));
    }

    #[test]
    fn a_membership_remembers_its_latest_view() {
        let o = Arc::new(Outbox::new(4, Arc::new(Metrics::new())));
        let sink = MembershipSink::new(o.clone());
        assert_eq!(sink.view(), None);
        let n = notice("a", "p1");
        sink.deliver(
            &n.name.clone(),
            PartyEvent::Leader {
                notice: n.clone(),
                is_me: true,
            },
        );
        assert_eq!(sink.view(), Some(n.event(true)));
        assert_eq!(lines(o.drain().unwrap()), [Event::Leader(n.event(true))]);
    }
}
