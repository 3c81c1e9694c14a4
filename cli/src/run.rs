//! `elector run`: CMD runs only while this instance leads (`consul lock` semantics).
//!
//! Guarantees and failure modes:
//! - CMD is started only after the broker said `elected`, and only if no `lost` was already
//!   queued behind it.
//! - On `lost` (including a broken connection to the broker) CMD's process group gets SIGTERM,
//!   then SIGKILL after `--grace`. The broker says `lost` at the renew deadline, before any other
//!   node can take the lock: a grace shorter than lease duration minus renew deadline stops CMD
//!   before another node starts its own. A broker that dies takes its connections with it and
//!   never releases the lock, so other nodes wait out the lease.
//! - When CMD exits by itself, elector resigns at once (unless `--restart-on-lead`), so the next
//!   candidate starts within milliseconds; CMD's leftovers in its group are killed first.
//! - SIGTERM / SIGINT are forwarded to CMD (SIGKILL after `--grace`); then elector resigns and
//!   exits with CMD's code. While no CMD runs they end elector at once (exit 0), resigning.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use elector_client::{Campaign, CampaignEvent, CampaignOptions, Client, EventStream};
use futures::{FutureExt, StreamExt};
use nix::sys::signal::Signal;
use tokio::time::Instant;

use crate::RunArgs;

/// How long a resign may wait for the broker's answer.
const RESIGN_TIMEOUT: Duration = Duration::from_secs(5);
use crate::child::Child;
use crate::exit;
use crate::session::{SessionError, connect_hint};
use crate::signals::Signals;

/// How one run of CMD ended.
enum Ended {
    /// CMD exited by itself.
    Exited(u8),
    /// Leadership was lost; CMD was stopped.
    Lost,
    /// A forwarded signal stopped CMD.
    Interrupted(u8),
}

pub async fn run(socket: &Path, args: RunArgs) -> anyhow::Result<u8> {
    let identity = args.candidate.identity()?;
    let mut signals = Signals::install()?;
    let client = Client::connect(socket).await.map_err(unreachable)?;
    let namespace = match &args.target.namespace {
        Some(ns) => ns.clone(),
        None => client
            .hello()
            .map(|h| h.default_namespace)
            .unwrap_or_else(|| "default".into()),
    };
    let options = CampaignOptions::new(args.election.clone(), identity.clone())
        .namespace(namespace.clone())
        .lock(args.target.lock.into())
        .priority(args.candidate.priority);
    let name = format!("{namespace}/{}", args.election);

    loop {
        let campaign = tokio::select! {
            c = client.campaign(options.clone()) => c.with_context(|| format!("campaigning in {name} as {identity}"))?,
            _ = signals.recv() => return Ok(exit::OK),
        };
        eprintln!("elector: campaigning in {name} as {identity}");
        let mut campaign = campaign;
        let mut events = campaign.events();
        // Leads, loses and leads again on the same campaign until CMD ends by itself.
        loop {
            let term = tokio::select! {
                term = elected(&mut events) => term.with_context(|| format!("campaigning in {name}"))?,
                _ = signals.recv() => {
                    resign(campaign).await;
                    return Ok(exit::OK);
                }
            };
            // A `lost` already queued behind `elected`: do not start CMD for nothing.
            if !drain_until_lost(&mut events) || !campaign.is_leader() {
                continue;
            }
            let env = [
                ("ELECTOR_TERM", term.to_string()),
                ("ELECTOR_ELECTION", args.election.clone()),
                ("ELECTOR_NAMESPACE", namespace.clone()),
                ("ELECTOR_IDENTITY", identity.clone()),
            ];
            let ended = loop {
                eprintln!("elector: elected in {name} (term {term}): starting CMD");
                let mut child = match Child::spawn(&args.command, &env) {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("elector: {e}");
                        resign(campaign).await;
                        return Ok(e.exit_code());
                    }
                };
                let ended = lead(&mut child, &mut events, &mut signals, args.grace).await;
                match ended {
                    Ended::Exited(_) if args.restart_on_lead && campaign.is_leader() => {
                        eprintln!("elector: CMD exited while leading: starting it again (--restart-on-lead)");
                        continue;
                    }
                    other => break other,
                }
            };
            match ended {
                Ended::Exited(code) => {
                    eprintln!("elector: CMD exited ({code}): resigning");
                    resign(campaign).await;
                    if args.once {
                        return Ok(code);
                    }
                    break; // campaign again
                }
                Ended::Interrupted(code) => {
                    resign(campaign).await;
                    return Ok(code);
                }
                Ended::Lost => {
                    if args.once {
                        resign(campaign).await;
                        return Ok(exit::LEADERSHIP_LOST);
                    }
                    eprintln!("elector: waiting to lead {name} again");
                }
            }
        }
    }
}

/// Gives up the campaign: at once if the broker is reachable (it hands over), else by
/// dropping it (the client stops re-campaigning; the broker already let go with the connection).
async fn resign(campaign: Campaign) {
    if campaign.state().borrow().connected {
        let _ = tokio::time::timeout(RESIGN_TIMEOUT, campaign.resign()).await;
    }
}

/// Waits for `elected`; returns its term.
async fn elected(events: &mut EventStream) -> anyhow::Result<u64> {
    while let Some(e) = events.next().await {
        match e {
            CampaignEvent::Elected { term } => return Ok(term),
            CampaignEvent::Leader {
                leader,
                term,
                unknown,
            } => {
                let term = term.map(|t| format!(" (term {t})")).unwrap_or_default();
                match (leader, unknown) {
                    (_, Some(why)) => eprintln!("elector: unknown who leads{term}: {why}"),
                    (Some(who), None) => eprintln!("elector: {who} leads{term}"),
                    (None, None) => eprintln!("elector: nobody leads{term}"),
                }
            }
            CampaignEvent::Lost { .. } | CampaignEvent::Jeopardy { .. } | CampaignEvent::Safe { .. } => {}
        }
    }
    Err(anyhow::Error::new(elector_client::Error::Disconnected))
}

/// Consumes the events already queued; false if one of them is `lost`.
fn drain_until_lost(events: &mut EventStream) -> bool {
    while let Some(Some(e)) = events.next().now_or_never() {
        if let CampaignEvent::Lost { term, reason } = e {
            eprintln!("elector: lost term {term} ({reason}) before CMD started");
            return false;
        }
    }
    true
}

/// Runs CMD until it exits, leadership is lost, or a signal comes.
///
/// A jeopardy (the broker went away while leading; the client still holds a guarantee until
/// `valid_until`) keeps CMD running, unless the guarantee runs out: CMD gets SIGTERM `grace`
/// before `valid_until` and SIGKILL at `valid_until`, so that it is gone when the guarantee is.
async fn lead(child: &mut Child, events: &mut EventStream, signals: &mut Signals, grace: Duration) -> Ended {
    let mut jeopardy_until: Option<Instant> = None;
    loop {
        let stop_at = jeopardy_until.map(|until| until.checked_sub(grace).unwrap_or_else(Instant::now));
        tokio::select! {
            status = child.wait() => {
                return Ended::Exited(status.map(exit::of_status).unwrap_or(exit::FAILURE));
            }
            event = events.next() => match event {
                Some(CampaignEvent::Lost { reason, .. }) => {
                    eprintln!(
                        "elector: leadership lost ({reason}): stopping CMD (SIGTERM, SIGKILL after {})",
                        humantime::format_duration(grace)
                    );
                    let _ = child.stop(Signal::SIGTERM, grace).await;
                    return Ended::Lost;
                }
                Some(CampaignEvent::Jeopardy { term, valid_until }) => {
                    let left = valid_until.saturating_duration_since(Instant::now());
                    eprintln!(
                        "elector: the broker is unreachable: term {term} stays valid for {} at most; \
                         CMD goes on unless no broker confirms it by then",
                        humantime::format_duration(Duration::from_millis(left.as_millis() as u64))
                    );
                    jeopardy_until = Some(valid_until);
                }
                Some(CampaignEvent::Safe { term }) => {
                    eprintln!("elector: a broker confirmed term {term}: CMD goes on");
                    jeopardy_until = None;
                }
                Some(_) => {}
                None => {
                    let _ = child.stop(Signal::SIGTERM, grace).await;
                    return Ended::Lost;
                }
            },
            _ = tokio::time::sleep_until(stop_at.unwrap_or_else(Instant::now)), if stop_at.is_some() => {
                let left = jeopardy_until
                    .map(|until| until.saturating_duration_since(Instant::now()))
                    .unwrap_or_default()
                    .max(Duration::from_millis(1));
                eprintln!(
                    "elector: no broker confirmed the leadership: stopping CMD (SIGTERM, SIGKILL after {})",
                    humantime::format_duration(Duration::from_millis(left.as_millis() as u64))
                );
                let _ = child.stop(Signal::SIGTERM, left).await;
                return Ended::Lost;
            }
            sig = signals.recv() => {
                eprintln!("elector: {sig}: forwarding it to CMD");
                let status = child.stop(sig, grace).await;
                return Ended::Interrupted(status.map(exit::of_status).unwrap_or(exit::FAILURE));
            }
        }
    }
}

/// The client's connect error, with the path and what to check.
fn unreachable(e: elector_client::Error) -> anyhow::Error {
    match e {
        elector_client::Error::Connect { path, source } => anyhow::Error::new(SessionError::Unreachable {
            path,
            reason: source.to_string(),
            hint: connect_hint(source.kind()),
        }),
        other => anyhow::Error::new(other),
    }
}
