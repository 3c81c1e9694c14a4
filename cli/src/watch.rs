//! `elector observe`, `elector leader` and `elector campaign`: one connection to the broker each
//! (a [`Session`]), its events printed as lines for people or, with `--json`, exactly as the
//! broker sent them.
//!
//! A `leader` event whose `leader` is `null` means "nobody leads" unless it carries `unknown`
//! (the broker cannot read the lock): then it means "unknown", and is printed as such. The first
//! `leader` event may come before or after the request's `ok`.

use std::path::Path;

use elector_client::protocol::{CampaignRequest, ElectionRef, Event, LockKind, Op, Request};

use crate::session::{Received, Refusable, Session, SessionError, answers};
use crate::signals::Signals;
use crate::{CampaignArgs, ElectionArgs, LeaderArgs, ObserveArgs, exit};

/// The namespace a request names: the one given, or the broker's default (with attestation,
/// the caller's own).
fn namespace(target: &ElectionArgs, session: &Session) -> String {
    target.namespace.clone().unwrap_or_else(|| {
        session
            .hello()
            .caller
            .as_ref()
            .and_then(|c| c.namespace.clone())
            .unwrap_or_else(|| session.hello().default_namespace.clone())
    })
}

/// A `leader` event for people: `pod-a leads (term 3)`, `nobody leads (term 3)` or
/// `unknown who leads (term 3): <why>`.
fn describe_leader(received: &Received) -> Option<String> {
    let Event::Leader(l) = &received.event else {
        return None;
    };
    let term = l.term.map(|t| format!(" (term {t})")).unwrap_or_default();
    Some(match (&l.leader, received.unknown()) {
        (_, Some(why)) => format!("unknown who leads{term}: {why}"),
        (Some(who), None) => format!("{who} leads{term}"),
        (None, None) => format!("nobody leads{term}"),
    })
}

fn refused(op: Op, event: Event) -> anyhow::Error {
    match event {
        Event::Error(e) => SessionError::Refused {
            what: Refusable::Request(op),
            code: e.code,
            message: e.message,
        }
        .into(),
        other => SessionError::Protocol(format!("unexpected reply to {op}: {other:?}")).into(),
    }
}

/// Connects and asks to observe `election`: the session, the request's id and the election's
/// namespace.
async fn start_observing(
    socket: &Path,
    election: &str,
    target: &ElectionArgs,
) -> anyhow::Result<(Session, u64, String)> {
    let mut session = Session::connect(socket).await?;
    let ns = namespace(target, &session);
    let id = session.next_id();
    session
        .send(&observe_request(id, election, &ns, target.lock.into()))
        .await?;
    Ok((session, id, ns))
}

fn observe_request(id: u64, election: &str, namespace: &str, lock: LockKind) -> Request {
    Request::Observe(ElectionRef {
        id: Some(id.into()),
        election: election.to_string(),
        namespace: Some(namespace.to_string()),
        lock: Some(lock),
    })
}

pub async fn observe(socket: &Path, args: ObserveArgs) -> anyhow::Result<u8> {
    let mut signals = Signals::install()?;
    let (mut session, id, _) = start_observing(socket, &args.election, &args.target).await?;
    loop {
        let received = tokio::select! {
            r = session.next() => r?,
            _ = signals.recv() => return Ok(exit::OK),
        };
        match &received.event {
            Event::Leader(_) if args.json => println!("{}", received.line),
            Event::Leader(_) => println!("{}", describe_leader(&received).unwrap_or_default()),
            Event::Error(_) if answers(&received.event, id) => {
                return Err(refused(Op::Observe, received.event));
            }
            _ => {}
        }
    }
}

pub async fn leader(socket: &Path, args: LeaderArgs) -> anyhow::Result<u8> {
    let (mut session, id, ns) = start_observing(socket, &args.election, &args.target).await?;
    let first = tokio::time::timeout(args.timeout, async {
        loop {
            let received = session.next().await?;
            match &received.event {
                Event::Leader(_) => return Ok(received),
                Event::Error(_) if answers(&received.event, id) => {
                    return Err(refused(Op::Observe, received.event));
                }
                _ => {}
            }
        }
    })
    .await;
    let received = match first {
        Ok(r) => r?,
        Err(_) => {
            eprintln!(
                "elector: who leads {ns}/{} is unknown: the broker did not say within {}",
                args.election,
                humantime::format_duration(args.timeout)
            );
            return Ok(exit::LEADER_UNKNOWN);
        }
    };
    let Event::Leader(l) = &received.event else {
        return Ok(exit::FAILURE);
    };
    if args.json {
        println!("{}", received.line);
    }
    if let Some(why) = received.unknown() {
        eprintln!("elector: who leads {ns}/{} is unknown: {why}", args.election);
        return Ok(exit::LEADER_UNKNOWN);
    }
    match &l.leader {
        Some(who) => {
            if !args.json {
                println!("{who}");
            }
            Ok(exit::OK)
        }
        None => {
            eprintln!("elector: nobody leads {ns}/{}", args.election);
            Ok(exit::NO_LEADER)
        }
    }
}

pub async fn campaign(socket: &Path, args: CampaignArgs) -> anyhow::Result<u8> {
    let identity = args.candidate.identity()?;
    let mut signals = Signals::install()?;
    let mut session = Session::connect(socket).await?;
    let ns = namespace(&args.target, &session);
    let id = session.next_id();
    session
        .send(&Request::Campaign(CampaignRequest {
            id: Some(id.into()),
            election: args.election.clone(),
            namespace: Some(ns.clone()),
            identity: Some(identity.clone()),
            lock: Some(args.target.lock.into()),
            timing: None,
            priority: Some(args.candidate.priority),
            term: None,
            valid_until: None,
        }))
        .await?;
    // Until interrupted; then resign and wait for the broker's `ok` (after its `lost`).
    let mut resign_id = None;
    loop {
        let received = tokio::select! {
            r = session.next() => r?,
            _ = signals.recv(), if resign_id.is_none() => {
                let rid = session.next_id();
                session
                    .send(&Request::Resign(ElectionRef {
                        id: Some(rid.into()),
                        election: args.election.clone(),
                        namespace: Some(ns.clone()),
                        lock: None,
                    }))
                    .await?;
                resign_id = Some(rid);
                continue;
            }
        };
        let event = &received.event;
        if let Some(rid) = resign_id
            && answers(event, rid)
        {
            return match received.event {
                Event::Ok(_) => Ok(exit::OK),
                other => Err(refused(Op::Resign, other)),
            };
        }
        match event {
            Event::Ok(_) if answers(event, id) => {
                eprintln!("elector: campaigning in {ns}/{} as {identity}", args.election);
            }
            Event::Error(_) if answers(event, id) => {
                return Err(refused(Op::Campaign, received.event));
            }
            Event::Leader(_) | Event::Elected(_) | Event::Lost(_) if args.json => {
                println!("{}", received.line);
            }
            Event::Leader(_) => println!("{}", describe_leader(&received).unwrap_or_default()),
            Event::Elected(e) => println!("elected: {} leads (term {})", e.identity, e.term),
            Event::Lost(l) => println!("lost: term {} ({})", l.term, l.reason),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn received(line: &str) -> Received {
        Received {
            event: elector_client::protocol::parse_event(line.as_bytes()).unwrap(),
            line: line.into(),
        }
    }

    #[test]
    fn leader_lines_tell_nobody_from_unknown() {
        let base = r#"{"event":"leader","election":"a","namespace":"d","lock":"lease","#;
        let r = received(&format!(r#"{base}"leader":"pod-a","term":3,"is_me":false}}"#));
        assert_eq!(describe_leader(&r).unwrap(), "pod-a leads (term 3)");
        let r = received(&format!(r#"{base}"leader":null,"term":3,"is_me":false}}"#));
        assert_eq!(describe_leader(&r).unwrap(), "nobody leads (term 3)");
        let r = received(&format!(
            r#"{base}"leader":null,"term":null,"is_me":false,"unknown":"403 Forbidden"}}"#
        ));
        assert_eq!(describe_leader(&r).unwrap(), "unknown who leads: 403 Forbidden");
    }
}
