//! One client connection: reads requests, answers them, and writes events from its outbox.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::time::Instant;
use tokio_util::codec::FramedRead;

use super::ServerShared;
use super::outbox::{MembershipSink, Outbox};
use crate::attest::Caller;
use crate::election::{Candidacy, Claim, JoinError as RefusedJoin, StepDown};
use crate::election::{ElectionTiming, PartyId};
use crate::registry::{Farewell, JoinError};
use elector_client::clock::{from_monotonic_ns, monotonic_now_ns};
use elector_client::codec::{Frame, LineCodec};
use elector_client::protocol::{
    self, BareRequest, Caller as WireCaller, CampaignRequest, ElectionName, ElectionRef, ElectionStatus,
    ErrorCode, Event, Hello, MAX_LINE_BYTES, OkReply, Pong, ReconnectEvent, Request, RequestError, RequestId,
    StatusReply,
};

/// Why the writer stopped.
enum WriterEnd {
    /// Everything was flushed after the connection closed.
    Flushed,
    /// The client stopped reading (outbox overflow or a stalled write).
    Stuck,
    /// The client went away.
    Broken,
}

async fn writer(
    mut out: OwnedWriteHalf,
    outbox: Arc<Outbox>,
    write_timeout: Duration,
    metrics: Arc<crate::metrics::Metrics>,
) -> WriterEnd {
    loop {
        outbox.ready().await;
        let events = match outbox.drain() {
            Some(e) => e,
            None => {
                let bye = RequestError::new(
                    None,
                    ErrorCode::SlowConsumer,
                    "too many unread events: the connection is closed; reconnect and read your events",
                )
                .into_event();
                let _ = tokio::time::timeout(Duration::from_secs(1), out.write_all(&bye.to_line())).await;
                return WriterEnd::Stuck;
            }
        };
        if events.is_empty() && outbox.is_closed() {
            let _ = out.shutdown().await;
            return WriterEnd::Flushed;
        }
        let buf = match events.len() {
            1 => events[0].line(),
            _ => {
                let mut buf = Vec::new();
                for e in &events {
                    buf.extend_from_slice(&e.line());
                }
                buf.into()
            }
        };
        match tokio::time::timeout(write_timeout, out.write_all(&buf)).await {
            Ok(Ok(())) => {
                metrics.events_sent.inc_by(events.len() as u64);
            }
            Ok(Err(_)) => return WriterEnd::Broken,
            Err(_) => return WriterEnd::Stuck,
        }
    }
}

/// What a membership of a connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Campaign,
    Observation,
}

/// One campaign (with its identity) or observation of this connection.
struct Membership {
    name: ElectionName,
    party: PartyId,
    identity: Option<String>,
    sink: Arc<MembershipSink>,
}

impl Membership {
    fn role(&self) -> Role {
        if self.identity.is_some() {
            Role::Campaign
        } else {
            Role::Observation
        }
    }

    fn is(&self, role: Role, namespace: &str, election: &str) -> bool {
        self.role() == role && self.name.namespace == namespace && self.name.election == election
    }
}

struct Conn {
    shared: Arc<ServerShared>,
    /// The attested caller (`None` without attestation).
    caller: Option<Caller>,
    outbox: Arc<Outbox>,
    /// Campaigns and observations: a few per connection (at most
    /// `max_elections_per_connection`), so a list, grown one at a time, is smallest.
    memberships: Vec<Membership>,
    /// The sink of a membership just added, opened once its `ok` is queued.
    gated: Option<Arc<MembershipSink>>,
}

fn err(id: Option<RequestId>, code: ErrorCode, message: impl Into<String>) -> RequestError {
    RequestError::new(id, code, message)
}

impl Conn {
    fn namespace(&self, id: &Option<RequestId>, ns: &Option<String>) -> Result<String, RequestError> {
        if let Some(caller) = &self.caller {
            return caller
                .namespace(ns.as_deref())
                .map_err(|e| err(id.clone(), e.code(), e.to_string()));
        }
        let ns = ns
            .clone()
            .unwrap_or_else(|| self.shared.identity.default_namespace.clone());
        if !protocol::is_dns1123_label(&ns) {
            return Err(err(
                id.clone(),
                ErrorCode::InvalidNamespace,
                format!(
                    "namespace {:?} is not a valid Kubernetes namespace name (a DNS-1123 label)",
                    truncate(&ns)
                ),
            ));
        }
        Ok(ns)
    }

    fn election(&self, id: &Option<RequestId>, election: &str) -> Result<(), RequestError> {
        if !protocol::is_dns1123_subdomain(election) {
            return Err(err(
                id.clone(),
                ErrorCode::InvalidElection,
                format!(
                    "election {:?} is not a valid object name: lowercase letters, digits, '-' and '.', starting and ending with a letter or digit, at most 253 characters",
                    truncate(election)
                ),
            ));
        }
        Ok(())
    }

    fn timing(&self, req: &CampaignRequest) -> Result<Option<ElectionTiming>, RequestError> {
        let Some(t) = req.timing else { return Ok(None) };
        let d = self.shared.elections.defaults().timing;
        let secs = |v: Option<f64>, default: Duration, field: &str| -> Result<Duration, RequestError> {
            match v {
                None => Ok(default),
                Some(s) if s.is_finite() && s > 0.0 && s <= 86_400.0 => Ok(Duration::from_secs_f64(s)),
                Some(s) => Err(err(
                    req.id.clone(),
                    ErrorCode::InvalidTiming,
                    format!("timing.{field} must be a positive number of seconds up to 86400, got {s}"),
                )),
            }
        };
        let lease = match t.lease_duration {
            None => d.lease_duration,
            Some(s) => Duration::from_secs(s),
        };
        let renew = secs(t.renew_deadline, d.renew_deadline, "renew_deadline")?;
        let retry = secs(t.retry_period, d.retry_period, "retry_period")?;
        ElectionTiming::new(lease, renew, retry)
            .map(Some)
            .map_err(|e| err(req.id.clone(), ErrorCode::InvalidTiming, e.to_string()))
    }

    fn room_for_one_more(&self, id: &Option<RequestId>) -> Result<(), RequestError> {
        let max = self.shared.limits.max_elections_per_connection;
        if self.memberships.len() >= max {
            return Err(err(
                id.clone(),
                ErrorCode::TooManyCampaigns,
                format!(
                    "this connection already takes part in {max} elections (the maximum); use another connection"
                ),
            ));
        }
        Ok(())
    }

    /// `campaign`, or with `resume` a campaign that first claims a leadership (protocol 1.1).
    async fn campaign(&mut self, req: CampaignRequest, resume: bool) -> Result<Event, RequestError> {
        let id = req.id.clone();
        self.election(&id, &req.election)?;
        let claim = match (resume, req.term, req.valid_until) {
            (true, Some(term), Some(valid_until)) => Some(Claim {
                term,
                valid_until: from_monotonic_ns(valid_until),
            }),
            (true, _, _) => {
                return Err(err(
                    id,
                    ErrorCode::InvalidRequest,
                    "`resume` needs `term` (the term led in) and `valid_until` (the guarantee the leader acts on, CLOCK_MONOTONIC ns)",
                ));
            }
            (false, None, None) => None,
            (false, _, _) => {
                return Err(err(
                    id,
                    ErrorCode::InvalidRequest,
                    "`term` and `valid_until` belong to `resume`, not `campaign`",
                ));
            }
        };
        let namespace = self.namespace(&id, &req.namespace)?;
        let requested = match &self.caller {
            Some(caller) => Some(
                caller
                    .identity(req.identity.as_deref())
                    .map_err(|e| err(id.clone(), e.code(), e.to_string()))?,
            ),
            None => req.identity.clone(),
        };
        let identity = match &requested {
            Some(i) if !i.is_empty() && i.len() <= 253 && !i.chars().any(char::is_control) => i.clone(),
            Some(i) => {
                return Err(err(
                    id,
                    ErrorCode::InvalidIdentity,
                    format!(
                        "identity {:?} must be 1 to 253 characters without control characters",
                        truncate(i)
                    ),
                ));
            }
            None => {
                return Err(err(
                    id,
                    ErrorCode::InvalidIdentity,
                    "field `identity` is required: the holder identity to write into the lock (usually the pod name)",
                ));
            }
        };
        let timing = self.timing(&req)?;
        if let Some(m) = self.find(Role::Campaign, &namespace, &req.election) {
            return Err(err(
                id,
                ErrorCode::AlreadyCampaigning,
                format!(
                    "this connection already campaigns in {} as {:?}",
                    m.name,
                    m.identity.as_deref().unwrap_or("")
                ),
            ));
        }
        self.room_for_one_more(&id)?;
        let name = ElectionName {
            election: req.election.clone(),
            namespace,
            lock: req.lock.unwrap_or_default(),
        };
        let party = self.shared.elections.new_party();
        let sink = Arc::new(MembershipSink::new(self.outbox.clone()));
        let joined = self
            .shared
            .elections
            .campaign(
                &name,
                party,
                Candidacy::new(identity.clone())
                    .priority(req.priority.unwrap_or(0))
                    .pod(self.caller.as_ref().map(|c| c.pod.uid.clone()))
                    .claim(claim),
                timing,
                sink.clone(),
            )
            .await;
        match joined {
            Ok(()) => {
                self.gated = Some(sink.clone());
                self.add(Membership {
                    name: name.clone(),
                    party,
                    identity: Some(identity.clone()),
                    sink,
                });
                Ok(Event::Ok(OkReply {
                    id,
                    op: if resume { "resume" } else { "campaign" }.into(),
                    name: Some(name),
                    identity: Some(identity),
                }))
            }
            Err(e) => {
                let code = match e {
                    JoinError::Refused(RefusedJoin::IdentityInUse(_)) => ErrorCode::IdentityInUse,
                    JoinError::Refused(RefusedJoin::TimingMismatch { .. }) => ErrorCode::InvalidTiming,
                    JoinError::ShuttingDown => ErrorCode::ShuttingDown,
                };
                Err(err(id, code, e.to_string()))
            }
        }
    }

    async fn resign(&mut self, req: ElectionRef) -> Result<Event, RequestError> {
        let namespace = self.namespace(&req.id, &req.namespace)?;
        let Some(m) = self.remove(Role::Campaign, &namespace, &req.election) else {
            return Err(err(
                req.id,
                ErrorCode::NotCampaigning,
                format!(
                    "this connection does not campaign in {namespace}/{}",
                    truncate(&req.election)
                ),
            ));
        };
        self.shared
            .elections
            .leave(&m.name, m.party, StepDown::Resigned, Farewell::Tell)
            .await;
        Ok(Event::Ok(OkReply {
            id: req.id,
            op: "resign".into(),
            name: Some(m.name),
            identity: m.identity,
        }))
    }

    fn observe(&mut self, req: ElectionRef) -> Result<Event, RequestError> {
        self.election(&req.id, &req.election)?;
        let namespace = self.namespace(&req.id, &req.namespace)?;
        let name = ElectionName {
            election: req.election.clone(),
            namespace: namespace.clone(),
            lock: req.lock.unwrap_or_default(),
        };
        if let Some(m) = self.find(Role::Observation, &namespace, &req.election) {
            if m.name.lock != name.lock {
                return Err(err(
                    req.id,
                    ErrorCode::InvalidRequest,
                    format!(
                        "this connection already observes {} with another lock kind",
                        m.name
                    ),
                ));
            }
        } else {
            self.room_for_one_more(&req.id)?;
            let party = self.shared.elections.new_party();
            let sink = Arc::new(MembershipSink::new(self.outbox.clone()));
            self.shared.elections.observe(&name, party, sink.clone());
            self.gated = Some(sink.clone());
            self.add(Membership {
                name: name.clone(),
                party,
                identity: None,
                sink,
            });
        }
        Ok(Event::Ok(OkReply {
            id: req.id,
            op: "observe".into(),
            name: Some(name),
            identity: None,
        }))
    }

    async fn unobserve(&mut self, req: ElectionRef) -> Result<Event, RequestError> {
        let namespace = self.namespace(&req.id, &req.namespace)?;
        let Some(m) = self.remove(Role::Observation, &namespace, &req.election) else {
            return Err(err(
                req.id,
                ErrorCode::NotObserving,
                format!(
                    "this connection does not observe {namespace}/{}",
                    truncate(&req.election)
                ),
            ));
        };
        self.shared
            .elections
            .leave(&m.name, m.party, StepDown::Resigned, Farewell::Silent)
            .await;
        Ok(Event::Ok(OkReply {
            id: req.id,
            op: "unobserve".into(),
            name: Some(m.name),
            identity: None,
        }))
    }

    fn status(&self, req: BareRequest) -> Event {
        let describe = |m: &Membership| {
            let view = m.sink.view();
            ElectionStatus {
                name: m.name.clone(),
                identity: m.identity.clone(),
                leader: view.as_ref().and_then(|v| v.leader.clone()),
                term: view.as_ref().and_then(|v| v.term),
                is_me: m.identity.is_some() && view.as_ref().is_some_and(|v| v.is_me),
                unknown: match &view {
                    Some(v) => v.unknown.clone(),
                    None => Some("the lock has not been read yet".into()),
                },
            }
        };
        let (campaigns, observations): (Vec<_>, Vec<_>) =
            self.memberships.iter().partition(|m| m.identity.is_some());
        let mut campaigns: Vec<_> = campaigns.into_iter().map(describe).collect();
        let mut observations: Vec<_> = observations.into_iter().map(describe).collect();
        campaigns.sort_by(|a, b| a.name.cmp(&b.name));
        observations.sort_by(|a, b| a.name.cmp(&b.name));
        Event::Status(StatusReply {
            id: req.id,
            campaigns,
            observations,
        })
    }

    async fn handle(&mut self, request: Request) -> Result<Event, RequestError> {
        match request {
            Request::Campaign(r) => self.campaign(r, false).await,
            Request::Resume(r) => self.campaign(r, true).await,
            Request::Resign(r) => self.resign(r).await,
            Request::Observe(r) => self.observe(r),
            Request::Unobserve(r) => self.unobserve(r).await,
            Request::Status(r) => Ok(self.status(r)),
            Request::Ping(r) => Ok(Event::Pong(Pong { id: r.id })),
        }
    }

    fn has_elections(&self) -> bool {
        !self.memberships.is_empty()
    }

    fn find(&self, role: Role, namespace: &str, election: &str) -> Option<&Membership> {
        self.memberships.iter().find(|m| m.is(role, namespace, election))
    }

    fn remove(&mut self, role: Role, namespace: &str, election: &str) -> Option<Membership> {
        let i = self
            .memberships
            .iter()
            .position(|m| m.is(role, namespace, election))?;
        Some(self.memberships.swap_remove(i))
    }

    fn add(&mut self, m: Membership) {
        self.memberships.reserve_exact(1);
        self.memberships.push(m);
    }

    /// Ends every campaign of this connection at once (as closing it does), keeping its
    /// observations.
    fn resign_campaigns(&mut self) {
        let elections = &self.shared.elections;
        self.memberships.retain(|m| {
            if m.identity.is_some() {
                elections.leave_nowait(&m.name, m.party, Farewell::Silent);
            }
            m.identity.is_none()
        });
    }

    /// Waits until every observation has been told who leads (or that it is unknown).
    fn observations_told(&self) -> impl Future<Output = ()> + use<> {
        let sinks: Vec<_> = self.memberships.iter().map(|m| m.sink.clone()).collect();
        async move {
            futures::future::join_all(sinks.iter().map(|s| s.told_leader())).await;
        }
    }

    /// Moves every membership to a successor broker: each leader is told `jeopardy` with its
    /// guarantee and its lock is left for the successor to adopt ([`Farewell::HandOff`]);
    /// returns once those events are queued.
    async fn hand_off_all(&mut self) {
        let elections = self.shared.elections.clone();
        let leaving = self.memberships.drain(..).map(|m| {
            let elections = elections.clone();
            async move {
                let farewell = match m.role() {
                    Role::Campaign => Farewell::HandOff,
                    Role::Observation => Farewell::Silent,
                };
                elections
                    .leave(&m.name, m.party, StepDown::Resigned, farewell)
                    .await;
            }
        });
        futures::future::join_all(leaving).await;
    }

    /// Ends every membership: `Silent` when the app closed the connection (a leader's lock is
    /// released or handed over at once), `Abandon` when the broker cut it (the app may still
    /// lead until its guarantee: nothing is released, see [`Farewell::Abandon`]).
    fn leave_all(&mut self, farewell: Farewell) {
        for m in self.memberships.drain(..) {
            self.shared.elections.leave_nowait(&m.name, m.party, farewell);
        }
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(80).collect()
}

/// Serves one accepted connection through its phases: attestation, greeting, the read loop,
/// teardown. `admission` (the connection's place in the server's limits) is given back when
/// this returns.
pub(crate) async fn serve(
    stream: UnixStream,
    pid: Option<i32>,
    shared: Arc<ServerShared>,
    admission: super::Admission,
) {
    let _admission = admission;
    let mut stream = stream;
    let Ok(caller) = attest(&mut stream, pid, &shared).await else {
        return;
    };
    let mut session = Session::greet(stream, caller, shared);
    let end = session.read_requests().await;
    session.teardown(end).await;
}

/// The caller was not attested: it was told why and the connection is closed.
struct Unattested;

/// Phase 1: with `--attest=kubernetes`, which pod is calling (`Ok(None)` without attestation).
async fn attest(
    stream: &mut UnixStream,
    pid: Option<i32>,
    shared: &ServerShared,
) -> Result<Option<Caller>, Unattested> {
    let Some(attestor) = &shared.attestor else {
        return Ok(None);
    };
    // Boxed: awaited once, it need not stay in every connection's state.
    match Box::pin(attestor.attest(pid)).await {
        Ok(c) => Ok(Some(c)),
        Err(e) => {
            let metrics = shared.elections.metrics();
            metrics.rejected(ErrorCode::Unattested.as_str());
            metrics.attestation_failure(e.reason());
            tracing::warn!(pid = ?pid, reason = e.reason(), "rejected an unattested caller: {e}");
            let bye = err(
                None,
                ErrorCode::Unattested,
                format!("the broker could not tell which pod is calling: {e}"),
            );
            let _ = tokio::time::timeout(
                shared.limits.write_timeout,
                stream.write_all(&bye.into_event().to_line()),
            )
            .await;
            let _ = stream.shutdown().await;
            Err(Unattested)
        }
    }
}

/// How the read loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadEnd {
    /// The client shut its sending side down: it asks nothing more, but may wait for answers.
    HalfClosed,
    /// The connection is done (closed, broken, timed out, broker shutdown).
    Done,
    /// The broker cut the connection while its app may live on (it sent only bad requests).
    Cut,
    /// A successor broker took the socket over and this connection's turn to move came.
    Moved,
}

/// A greeted connection: its requests, its elections, and the task writing its outbox.
struct Session {
    conn: Conn,
    outbox: Arc<Outbox>,
    frames: FramedRead<OwnedReadHalf, LineCodec>,
    writer_task: tokio::task::JoinHandle<WriterEnd>,
    /// Set once the writer task has ended.
    writer_done: Option<WriterEnd>,
    /// This connection's turn to move to a successor broker, and when it began (dropped with
    /// the session if unused: its client went away, or it moved nothing).
    move_turn: Option<(tokio::sync::OwnedSemaphorePermit, Instant)>,
    metrics: Arc<crate::metrics::Metrics>,
}

impl Session {
    /// Phase 2: queue the greeting (`hello`) and start the writer.
    fn greet(stream: UnixStream, caller: Option<Caller>, shared: Arc<ServerShared>) -> Session {
        let metrics = shared.elections.metrics().clone();
        let limits = &shared.limits;
        let (read, write) = stream.into_split();
        let outbox = Arc::new(Outbox::new(limits.outbox_limit, metrics.clone()));
        let default_namespace = caller
            .as_ref()
            .map(|c| c.pod.namespace.clone())
            .unwrap_or_else(|| shared.identity.default_namespace.clone());
        outbox.push(Event::Hello(Hello {
            protocol: protocol::PROTOCOL_VERSION,
            broker_version: env!("CARGO_PKG_VERSION").to_string(),
            node: shared.identity.node.clone(),
            default_namespace,
            protocol_minor: Some(protocol::PROTOCOL_MINOR),
            monotonic_now: Some(monotonic_now_ns()),
            caller: caller.as_ref().map(|c| WireCaller {
                namespace: Some(c.pod.namespace.clone()),
                pod: Some(c.pod.name.clone()),
            }),
        }));
        let writer_task = tokio::spawn(writer(
            write,
            outbox.clone(),
            limits.write_timeout,
            metrics.clone(),
        ));
        // Requests are small: start with a small buffer (it grows up to the line limit when a
        // long line arrives). With 8 KiB, the default, 10,000 idle connections would hold 80 MiB.
        let frames = FramedRead::with_capacity(read, LineCodec::new(MAX_LINE_BYTES), 512);
        Session {
            conn: Conn {
                caller,
                outbox: outbox.clone(),
                shared,
                memberships: Vec::new(),
                gated: None,
            },
            outbox,
            frames,
            writer_task,
            writer_done: None,
            move_turn: None,
            metrics,
        }
    }

    /// Phase 3: answer requests until the connection is done. Backpressure: while the outbox
    /// holds half its limit, no request is read, so a client that pipelines many requests and
    /// reads its replies is never cut off; one that stops reading stalls the writer, which
    /// closes the connection after the write timeout (`slow_consumer`).
    async fn read_requests(&mut self) -> ReadEnd {
        let shared = self.conn.shared.clone();
        let limits = &shared.limits;
        let mut deadline = Instant::now() + limits.first_request_timeout;
        let mut seen_request = false;
        let mut consecutive_errors = 0u32;
        // After a successor took the socket over: this connection's turn to move there. Until
        // it comes, requests are answered as usual.
        let turns = shared.handoff_turns.clone();
        let mut path_state = shared.path_state.subscribe();
        let move_turn = async {
            loop {
                // Never into a socket nobody answers on (a successor that died): the
                // connection then stays, and this broker may take the path back.
                if path_state.wait_for(|s| s.may_move()).await.is_err() {
                    return std::future::pending().await;
                }
                let turn = turns.clone().acquire_owned().await.ok();
                if path_state.borrow().may_move() {
                    return turn;
                }
            }
        };
        tokio::pin!(move_turn);
        loop {
            if !self.outbox.has_room_for_replies() {
                tokio::select! {
                    turn = &mut move_turn => {
                        self.move_turn = turn.map(|t| (t, Instant::now()));
                        return ReadEnd::Moved;
                    }
                    _ = self.outbox.room_for_replies() => {}
                    end = &mut self.writer_task => {
                        self.writer_done = Some(end.unwrap_or(WriterEnd::Broken));
                        return ReadEnd::Done;
                    }
                    _ = shared.shutdown.cancelled() => return Self::stopped(&shared),
                }
                // The client is reading: its next request starts a fresh idle period.
                deadline = Instant::now() + limits.idle_timeout;
                continue;
            }
            tokio::select! {
                frame = self.frames.next() => {
                    let result = match frame {
                        None => return ReadEnd::HalfClosed,
                        Some(Err(_)) => return ReadEnd::Done,
                        Some(Ok(Frame::TooLong)) => Err(err(None, ErrorCode::LineTooLong, format!(
                            "line longer than {MAX_LINE_BYTES} bytes: discarded"
                        ))),
                        Some(Ok(Frame::Line(line))) if line.iter().all(u8::is_ascii_whitespace) => continue,
                        Some(Ok(Frame::Line(line))) => match protocol::parse_request(&line) {
                            // Boxed: the futures of the requests would otherwise make every
                            // idle connection's task as big as the biggest of them.
                            Ok(req) => Box::pin(self.conn.handle(req)).await,
                            Err(e) => Err(e),
                        },
                    };
                    seen_request = true;
                    deadline = Instant::now() + limits.idle_timeout;
                    match result {
                        Ok(reply) => {
                            consecutive_errors = 0;
                            self.outbox.push(reply);
                            if let Some(sink) = self.conn.gated.take() {
                                sink.open();
                            }
                        }
                        Err(e) => {
                            self.metrics.rejected(e.code.as_str());
                            tracing::debug!(code = %e.code, message = %e.message, "rejected request");
                            consecutive_errors += 1;
                            self.outbox.push(e.into_event());
                            if consecutive_errors >= limits.max_consecutive_errors {
                                self.metrics.rejected(ErrorCode::TooManyErrors.as_str());
                                self.outbox.push(err(None, ErrorCode::TooManyErrors, format!(
                                    "{consecutive_errors} bad requests in a row: closing the connection"
                                )).into_event());
                                return ReadEnd::Cut;
                            }
                        }
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {
                    if self.conn.has_elections() {
                        deadline = Instant::now() + limits.idle_timeout;
                        continue;
                    }
                    let message = if seen_request {
                        format!("idle for {:?} with nothing campaigned or observed: closing", limits.idle_timeout)
                    } else {
                        format!("no request within {:?} of connecting: closing", limits.first_request_timeout)
                    };
                    self.metrics.rejected(ErrorCode::Timeout.as_str());
                    self.outbox.push(err(None, ErrorCode::Timeout, message).into_event());
                    return ReadEnd::Done;
                }
                end = &mut self.writer_task => {
                    self.writer_done = Some(end.unwrap_or(WriterEnd::Broken));
                    return ReadEnd::Done;
                }
                turn = &mut move_turn => {
                    self.move_turn = turn.map(|t| (t, Instant::now()));
                    return ReadEnd::Moved;
                }
                _ = shared.shutdown.cancelled() => return Self::stopped(&shared),
            }
        }
    }

    /// How a connection ends when the broker stops: one that a successor serves already (the
    /// broker was superseded and is stopped before this connection's turn) is told to
    /// reconnect, as if its turn had come; its leaders were told `jeopardy` by the shutdown.
    fn stopped(shared: &super::ServerShared) -> ReadEnd {
        if matches!(*shared.path_state.borrow(), super::PathState::Superseded { .. }) {
            ReadEnd::Moved
        } else {
            ReadEnd::Done
        }
    }

    /// Phase 4: leave every election at once, flush what is queued, close.
    async fn teardown(mut self, end: ReadEnd) {
        let shared = self.conn.shared.clone();
        let limits = &shared.limits;
        if end == ReadEnd::HalfClosed && self.writer_done.is_none() {
            // The client shut down its sending side (`nc -U` does at the end of its input): it
            // asks nothing more. Its campaigns end at once, but each observation first gets the
            // answer it asked for, its first `leader` event, so a one-shot "who leads?" works.
            // Bounded: parties are told within a retry period, if only that who leads is unknown.
            self.conn.resign_campaigns();
            tokio::select! {
                _ = tokio::time::timeout(limits.first_request_timeout, self.conn.observations_told()) => {}
                end = &mut self.writer_task => self.writer_done = Some(end.unwrap_or(WriterEnd::Broken)),
                _ = shared.shutdown.cancelled() => {}
            }
        }
        // Resign everything at once: that is how a crashed app hands over in milliseconds. A
        // connection the broker cut (its app stopped reading, or sent only bad requests) is not
        // evidence that the app is gone: its leaderships are abandoned, not released.
        let cut = end == ReadEnd::Cut || matches!(self.writer_done, Some(WriterEnd::Stuck));
        let had_elections = self.conn.has_elections();
        if end == ReadEnd::Moved && self.writer_done.is_none() {
            // A successor serves the socket: each leader is told `jeopardy` with its guarantee
            // (nothing is written: the successor adopts the record when the app resumes), then
            // the client is told to reconnect.
            self.conn.hand_off_all().await;
            self.outbox.push(Event::Reconnect(ReconnectEvent {
                reason: "superseded".into(),
            }));
            // The turn lasts at least `handoff_turn` from its start (it paces the successor's
            // resumes), but not while this client reads its last events: a slow reader must
            // not hold up everyone else's move.
            if let Some((turn, began)) = self.move_turn.take()
                && had_elections
            {
                let ends = began + limits.handoff_turn;
                tokio::spawn(async move {
                    tokio::time::sleep_until(ends).await;
                    drop(turn);
                });
            }
        } else {
            self.conn
                .leave_all(if cut { Farewell::Abandon } else { Farewell::Silent });
        }
        self.outbox.close();
        if self.writer_done.is_none() {
            match tokio::time::timeout(limits.write_timeout, &mut self.writer_task).await {
                Ok(Ok(end)) => self.writer_done = Some(end),
                _ => self.writer_task.abort(),
            }
        }
        if matches!(self.writer_done, Some(WriterEnd::Stuck)) {
            self.metrics.rejected(ErrorCode::SlowConsumer.as_str());
            tracing::info!("closed a connection whose client stopped reading");
        }
    }
}
