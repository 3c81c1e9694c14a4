//! A connection's outgoing events: bounded, coalescing, never blocking the sender.
//!
//! `leader` events coalesce per election: a newer one replaces an unread older one (moved to
//! the end, so order with `elected`/`lost` is kept), so a client that reads slowly still ends up
//! with the latest state. Everything else (replies, `elected`, `lost`) is queued; if the queue
//! reaches its limit the client is considered stuck and the connection is closed with a final
//! `slow_consumer` error.
//!
//! Replies cannot get there by themselves: the connection reads no request while the queue
//! holds half its limit ([`Outbox::has_room_for_replies`]) and resumes when the writer drains
//! it, so a client that pipelines many requests and reads is slowed down, never cut off. The
//! other half is room for election events.
//!
//! A leader change fanned out to many connections is queued as a shared [`LeaderNotice`] and
//! encoded once, not once per connection.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::Notify;

use crate::metrics::Metrics;
use crate::registry::{LeaderNotice, PartyEvent, PartySink};
use elector_client::clock::to_monotonic_ns;
use elector_client::protocol::{ElectedEvent, ElectionName, Event, GuaranteeEvent, LeaderEvent, LostEvent};

fn guarantee(
    name: ElectionName,
    identity: String,
    term: u64,
    valid_until: tokio::time::Instant,
) -> GuaranteeEvent {
    GuaranteeEvent {
        name,
        identity,
        term,
        valid_until: to_monotonic_ns(valid_until),
    }
}

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
    /// Woken when the writer took the queue.
    drained: Notify,
    limit: usize,
    metrics: Arc<Metrics>,
}

impl Outbox {
    pub fn new(limit: usize, metrics: Arc<Metrics>) -> Self {
        Outbox {
            state: Mutex::new(State::default()),
            notify: Notify::new(),
            drained: Notify::new(),
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

    pub(crate) fn enqueue(&self, item: Outgoing) {
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
        let taken = std::mem::take(&mut s.queue);
        drop(s);
        self.drained.notify_one();
        Some(taken)
    }

    /// Whether the queue is below half its limit: room for the replies to more requests.
    pub fn has_room_for_replies(&self) -> bool {
        let s = self.lock();
        s.queue.len() < self.limit.div_ceil(2) || s.overflowed || s.closed
    }

    /// Waits until [`Outbox::has_room_for_replies`].
    pub async fn room_for_replies(&self) {
        loop {
            let drained = self.drained.notified();
            if self.has_room_for_replies() {
                return;
            }
            drained.await;
        }
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
///
/// A sink starts *gated*: events the election delivers before the connection has queued its
/// reply to the request (`ok`) are held, so a client always reads `ok` before the events of
/// what it asked for. [`MembershipSink::open`] releases them.
#[derive(Debug)]
pub struct MembershipSink {
    outbox: Arc<Outbox>,
    state: Mutex<SinkState>,
    /// Woken when a leader view arrives.
    told: Notify,
}

#[derive(Debug)]
struct SinkState {
    view: Option<(Arc<LeaderNotice>, bool)>,
    /// `Some` while gated: what arrived before the reply.
    held: Option<Vec<Outgoing>>,
}

impl MembershipSink {
    pub fn new(outbox: Arc<Outbox>) -> Self {
        MembershipSink {
            outbox,
            state: Mutex::new(SinkState {
                view: None,
                held: Some(Vec::new()),
            }),
            told: Notify::new(),
        }
    }

    /// Waits until this party has been told who leads (or that it is unknown).
    pub async fn told_leader(&self) {
        loop {
            let told = self.told.notified();
            if self.lock().view.is_some() {
                return;
            }
            told.await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SinkState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The latest leader view this party was told.
    pub fn view(&self) -> Option<LeaderEvent> {
        let s = self.lock();
        s.view.as_ref().map(|(notice, is_me)| notice.event(*is_me))
    }

    /// Ends the gate: call once the reply to the request has been queued. Events held until
    /// now follow it, in order.
    pub fn open(&self) {
        let mut s = self.lock();
        for item in s.held.take().unwrap_or_default() {
            self.outbox.enqueue(item);
        }
    }
}

impl PartySink for MembershipSink {
    fn deliver(&self, election: &ElectionName, event: PartyEvent) {
        let name = election.clone();
        let mut s = self.lock();
        let item = match event {
            PartyEvent::Leader { notice, is_me } => {
                s.view = Some((notice.clone(), is_me));
                Outgoing::Leader { notice, is_me }
            }
            PartyEvent::Elected {
                identity,
                term,
                valid_until,
            } => Outgoing::Event(Event::Elected(ElectedEvent {
                name,
                identity,
                term,
                valid_until: Some(to_monotonic_ns(valid_until)),
            })),
            PartyEvent::Renewed {
                identity,
                term,
                valid_until,
            } => Outgoing::Event(Event::Renewed(guarantee(name, identity, term, valid_until))),
            PartyEvent::Resumed {
                identity,
                term,
                valid_until,
            } => Outgoing::Event(Event::Safe(guarantee(name, identity, term, valid_until))),
            PartyEvent::Jeopardy {
                identity,
                term,
                valid_until,
            } => Outgoing::Event(Event::Jeopardy(guarantee(name, identity, term, valid_until))),
            PartyEvent::Refused { code, message } => Outgoing::Event(
                elector_client::protocol::RequestError::new(None, code, format!("{name}: {message}"))
                    .into_event(),
            ),
            PartyEvent::Lost {
                identity,
                term,
                reason,
            } => Outgoing::Event(Event::Lost(LostEvent {
                name,
                identity,
                term,
                reason,
            })),
        };
        let is_view = matches!(item, Outgoing::Leader { .. });
        match &mut s.held {
            Some(held) => held.push(item),
            None => self.outbox.enqueue(item),
        }
        drop(s);
        if is_view {
            self.told.notify_waiters();
        }
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
    fn replies_wait_for_room_instead_of_overflowing() {
        let o = Outbox::new(4, Arc::new(Metrics::new()));
        o.push(Event::Pong(Pong::default()));
        assert!(o.has_room_for_replies());
        o.push(Event::Pong(Pong::default()));
        assert!(!o.has_room_for_replies(), "half full: read no more requests");
        assert_eq!(o.drain().unwrap().len(), 2);
        assert!(o.has_room_for_replies());
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
        sink.open();
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

    #[test]
    fn a_gated_membership_holds_its_events_until_the_reply_is_queued() {
        let o = Arc::new(Outbox::new(8, Arc::new(Metrics::new())));
        let sink = MembershipSink::new(o.clone());
        let n = notice("a", "p1");
        sink.deliver(
            &n.name.clone(),
            PartyEvent::Elected {
                identity: "p1".into(),
                term: 1,
                valid_until: tokio::time::Instant::now(),
            },
        );
        sink.deliver(
            &n.name.clone(),
            PartyEvent::Leader {
                notice: n.clone(),
                is_me: true,
            },
        );
        assert!(o.drain().unwrap().is_empty(), "held while gated");
        o.push(Event::Pong(Pong::default()));
        sink.open();
        let events = lines(o.drain().unwrap());
        assert!(matches!(
            &events[..],
            [Event::Pong(_), Event::Elected(_), Event::Leader(_)]
        ));
    }
}
