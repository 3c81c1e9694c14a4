//! `elector-shim`: a drop-in for the 2016 `leader-elector` sidecar.
//!
//! Same flags (`--election`, `--election-namespace`, `--id`, `--ttl`, `--http`), same answer:
//! `GET` on any path returns `{"name":"<leader>"}` (empty when unknown). It holds no Kubernetes
//! credentials: it campaigns through the node broker's socket, on the Endpoints lock the
//! original used, so it interoperates with old sidecars during a migration.
//!
//! The original's bugs are fixed by construction:
//! - a standby reports the *current* leader: the name is driven by the broker's events;
//! - a leader whose renewals fail stops reporting itself at once (`lost` clears it);
//! - broker unreachable: the name is unknown (`""`) and `/healthz` answers 503 while the
//!   client reconnects with back-off;
//! - the HTTP port is bounded ([`crate::http::serve_bounded`]): a connection cap, and idle,
//!   slowloris and non-reading clients closed after a timeout (`--http-max-connections`,
//!   `--http-timeout`), so its memory returns to baseline after any load.
//!
//! Errors: transient ones (no broker yet, a broker restart, `unattested` while the pod is not
//! yet in the broker's pod watch, limits, `shutting_down`) are retried with back-off, forever.
//! Permanent ones, which no retry can fix (a request the broker rejects as invalid, e.g.
//! `invalid_election` for `--election Bad_Name`, or `forbidden_namespace`), end [`run`] with
//! [`ShimError::Refused`]: the binary exits non-zero with the broker's message.
//!
//! `--ttl` takes Go's duration syntax ([`parse_go_duration`]), as the original's flag did.

use std::path::PathBuf;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use elector_client::backoff::RetryDelays;
use elector_client::protocol::{ErrorCode, LockKind, Timing};
use elector_client::{CampaignOptions, Client, LeadershipState};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::http::{HttpLimits, serve_bounded};

/// Why the shim stopped.
#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    /// The configuration cannot work (e.g. `--ttl` below 2 s).
    #[error("{0}")]
    Config(String),
    /// The broker rejected the campaign for a reason no retry can fix.
    #[error(
        "the broker refused to campaign in election {election:?} (namespace {namespace:?}): {code}: {message}"
    )]
    Refused {
        election: String,
        namespace: String,
        code: ErrorCode,
        message: String,
    },
    /// `--ttl` cannot be an election's lease duration.
    #[error("--ttl must be a whole number of seconds, at least 2 (got {ttl:?})")]
    InvalidTtl { ttl: Duration },
    /// Serving HTTP failed.
    #[error("serving HTTP: {0}")]
    Http(#[from] std::io::Error),
}

/// Whether a broker error can go away by itself (retry) or never will (give up).
pub fn is_permanent(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::InvalidRequest
            | ErrorCode::UnknownOp
            | ErrorCode::InvalidElection
            | ErrorCode::InvalidNamespace
            | ErrorCode::InvalidIdentity
            | ErrorCode::InvalidTiming
            | ErrorCode::ForbiddenNamespace
            | ErrorCode::ForbiddenIdentity
            | ErrorCode::LineTooLong
            | ErrorCode::InvalidUtf8
            | ErrorCode::InvalidJson
    )
}

/// Why a duration flag was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("invalid duration {0:?}: expected Go syntax such as 10s, 1m30s, 1.5m or 300ms")]
    Syntax(String),
    #[error("invalid duration {0:?}: unknown unit {1:?} (use ns, us, µs, ms, s, m or h)")]
    Unit(String, String),
    #[error("invalid duration {0:?}: out of range")]
    Range(String),
    #[error("invalid duration {0:?}: must be positive")]
    NotPositive(String),
}

/// Parses a Go duration (`time.ParseDuration`): an optional sign, then one or more decimal
/// numbers, each with an optional fraction and a unit (`ns`, `us`/`µs`/`μs`, `ms`, `s`, `m`,
/// `h`), e.g. `1m30s`, `1.5h`, `300ms`; `0` alone needs no unit. Only positive durations are
/// accepted, since every duration flag of the shim is a period.
pub fn parse_go_duration(text: &str) -> Result<Duration, DurationError> {
    let syntax = || DurationError::Syntax(text.to_string());
    let (negative, mut rest) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    if rest == "0" {
        return Err(DurationError::NotPositive(text.to_string()));
    }
    if rest.is_empty() {
        return Err(syntax());
    }
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let int_len = rest.bytes().take_while(u8::is_ascii_digit).count();
        let (int_part, after) = rest.split_at(int_len);
        let (frac_part, after) = match after.strip_prefix('.') {
            Some(f) => {
                let n = f.bytes().take_while(u8::is_ascii_digit).count();
                f.split_at(n)
            }
            None => ("", after),
        };
        if int_part.is_empty() && frac_part.is_empty() {
            return Err(syntax());
        }
        let unit_len = after
            .char_indices()
            .find(|(_, c)| c.is_ascii_digit() || *c == '.')
            .map_or(after.len(), |(i, _)| i);
        let (unit, after) = after.split_at(unit_len);
        let nanos_per_unit: u128 = match unit {
            "ns" => 1,
            "us" | "\u{b5}s" | "\u{3bc}s" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "" => return Err(syntax()),
            other => return Err(DurationError::Unit(text.to_string(), other.to_string())),
        };
        let range = || DurationError::Range(text.to_string());
        let whole: u128 = if int_part.is_empty() {
            0
        } else {
            int_part.parse::<u64>().map_err(|_| range())?.into()
        };
        // Fraction digits beyond nanosecond precision cannot matter (at most 3.6e12 ns/unit).
        let frac_digits = &frac_part[..frac_part.len().min(15)];
        let frac: u128 = if frac_digits.is_empty() {
            0
        } else {
            frac_digits.parse::<u128>().map_err(|_| syntax())?
        };
        let scale = 10u128.pow(frac_digits.len() as u32);
        total = whole
            .checked_mul(nanos_per_unit)
            .and_then(|w| w.checked_add(frac * nanos_per_unit / scale))
            .and_then(|v| total.checked_add(v))
            .ok_or_else(range)?;
        rest = after;
    }
    // Go's durations are int64 nanoseconds.
    if total > i64::MAX as u128 {
        return Err(DurationError::Range(text.to_string()));
    }
    if negative || total == 0 {
        return Err(DurationError::NotPositive(text.to_string()));
    }
    Ok(Duration::from_nanos(total as u64))
}

/// What the shim campaigns for.
#[derive(Debug, Clone)]
pub struct ShimConfig {
    pub election: String,
    pub namespace: String,
    pub id: String,
    /// Lease duration; the renew deadline is half of it and the retry period a quarter, as in
    /// the original.
    pub ttl: Duration,
    pub socket: PathBuf,
}

impl ShimConfig {
    /// The election timing the original derived from `--ttl`.
    pub fn timing(&self) -> Result<Timing, ShimError> {
        let ttl = self.ttl.as_secs();
        if self.ttl.subsec_nanos() != 0 || ttl < 2 {
            return Err(ShimError::InvalidTtl { ttl: self.ttl });
        }
        Ok(Timing {
            lease_duration: Some(ttl),
            renew_deadline: Some(ttl as f64 / 2.0),
            retry_period: Some(ttl as f64 / 4.0),
        })
    }
}

/// What the HTTP side shows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShimView {
    pub name: String,
    pub healthy: bool,
    pub problem: Option<String>,
}

fn view_of(id: &str, s: &LeadershipState) -> ShimView {
    // Never claim ourselves unless the broker says we lead right now.
    let name = match &s.leader {
        Some(l) if l == id && !s.is_leader => String::new(),
        Some(l) => l.clone(),
        None => String::new(),
    };
    ShimView {
        name,
        healthy: s.connected,
        problem: (!s.connected).then(|| "the elector broker is unreachable".to_string()),
    }
}

/// Campaigns until `stop` (reconnecting and re-campaigning after transient errors),
/// publishing the view; returns an error only for a permanent one.
pub async fn campaign_loop(
    config: ShimConfig,
    view: watch::Sender<ShimView>,
    stop: CancellationToken,
) -> Result<(), ShimError> {
    let timing = match config.timing() {
        Ok(t) => t,
        Err(e) => {
            view.send_replace(ShimView {
                problem: Some(e.to_string()),
                ..Default::default()
            });
            return Err(e);
        }
    };
    let mut backoff = RetryDelays::starting_at(Duration::from_millis(100));
    loop {
        let attempt = async {
            let client = Client::connect(&config.socket).await?;
            let campaign = client
                .campaign(
                    CampaignOptions::new(&config.election, &config.id)
                        .namespace(&config.namespace)
                        .lock(LockKind::Endpoints)
                        .timing(timing),
                )
                .await?;
            Ok::<_, elector_client::Error>((client, campaign))
        };
        let delay = match attempt.await {
            Ok((_client, campaign)) => {
                backoff.reset();
                tracing::info!(election = %config.election, id = %config.id, "campaigning through the broker");
                let mut state = campaign.state();
                loop {
                    let v = view_of(&config.id, &state.borrow_and_update());
                    view.send_replace(v);
                    tokio::select! {
                        _ = stop.cancelled() => {
                            let _ = campaign.resign().await;
                            return Ok(());
                        }
                        changed = state.changed() => if changed.is_err() { break },
                    }
                }
                backoff.next_delay()
            }
            Err(elector_client::Error::Broker { code, message }) if is_permanent(code) => {
                let e = ShimError::Refused {
                    election: config.election.clone(),
                    namespace: config.namespace.clone(),
                    code,
                    message,
                };
                tracing::error!("{e}; not retrying");
                view.send_replace(ShimView {
                    name: String::new(),
                    healthy: false,
                    problem: Some(e.to_string()),
                });
                return Err(e);
            }
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!("cannot campaign yet: {e}; retrying in {delay:?}");
                view.send_replace(ShimView {
                    name: String::new(),
                    healthy: false,
                    problem: Some(e.to_string()),
                });
                delay
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

async fn name(State(view): State<watch::Receiver<ShimView>>) -> impl IntoResponse {
    let name = view.borrow().name.clone();
    (
        [("content-type", "application/json")],
        serde_json::json!({ "name": name }).to_string(),
    )
}

async fn healthz(State(view): State<watch::Receiver<ShimView>>) -> impl IntoResponse {
    let v = view.borrow().clone();
    if v.healthy {
        (StatusCode::OK, "ok\n".to_string())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{}\n", v.problem.unwrap_or_else(|| "not connected".into())),
        )
    }
}

/// The HTTP side: `/healthz`, and `{"name":...}` on every other path.
pub fn router(view: watch::Receiver<ShimView>) -> Router {
    Router::new()
        .route("/healthz", axum::routing::get(healthz))
        .fallback(name)
        .with_state(view)
}

/// Runs the shim until `stop` fires or a permanent error: campaign, and serve HTTP on `http`
/// if given (the server stops with the campaign), with the default [`HttpLimits`].
pub async fn run(
    config: ShimConfig,
    http: Option<tokio::net::TcpListener>,
    stop: CancellationToken,
) -> Result<(), ShimError> {
    run_limited(config, http, HttpLimits::default(), stop).await
}

/// [`run`], with the HTTP server's connection cap and timeouts as given (see
/// [`crate::http::serve_bounded`]: idle and slowloris connections are closed after
/// `limits.header_timeout`).
pub async fn run_limited(
    config: ShimConfig,
    http: Option<tokio::net::TcpListener>,
    limits: HttpLimits,
    stop: CancellationToken,
) -> Result<(), ShimError> {
    let (tx, rx) = watch::channel(ShimView::default());
    let serving = stop.child_token();
    let campaign = tokio::spawn({
        let serving = serving.clone();
        async move {
            let outcome = campaign_loop(config, tx, stop).await;
            serving.cancel();
            outcome
        }
    });
    if let Some(listener) = http {
        serve_bounded(listener, router(rx), limits, serving).await;
    }
    match campaign.await {
        Ok(outcome) => outcome,
        // The campaign task panicked or was aborted: say so rather than exit quietly.
        Err(e) => Err(ShimError::Config(format!(
            "the campaign task ended abnormally: {e}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_reports_itself_unless_leading() {
        let s = LeadershipState {
            connected: true,
            leader: Some("me".into()),
            term: Some(1),
            is_leader: false,
            ..LeadershipState::default()
        };
        assert_eq!(view_of("me", &s).name, "");
        assert_eq!(view_of("other", &s).name, "me");
        assert!(!view_of("me", &LeadershipState::default()).healthy);
    }

    #[test]
    fn ttl_timing_as_the_original() {
        let c = ShimConfig {
            election: "e".into(),
            namespace: "default".into(),
            id: "a".into(),
            ttl: Duration::from_secs(10),
            socket: "/x".into(),
        };
        let t = c.timing().unwrap();
        assert_eq!(
            (t.lease_duration, t.renew_deadline, t.retry_period),
            (Some(10), Some(5.0), Some(2.5))
        );
        let bad = ShimConfig {
            ttl: Duration::from_millis(1500),
            ..c
        };
        assert!(matches!(bad.timing(), Err(ShimError::InvalidTtl { .. })));
    }

    #[test]
    fn go_durations() {
        let ok = |t: &str| parse_go_duration(t).unwrap();
        assert_eq!(ok("10s"), Duration::from_secs(10));
        assert_eq!(ok("1m30s"), Duration::from_secs(90));
        assert_eq!(ok("1.5m"), Duration::from_secs(90));
        assert_eq!(ok("1h2m3s"), Duration::from_secs(3723));
        assert_eq!(ok("300ms"), Duration::from_millis(300));
        assert_eq!(ok(".5s"), Duration::from_millis(500));
        assert_eq!(ok("1.s"), Duration::from_secs(1));
        assert_eq!(ok("+2s"), Duration::from_secs(2));
        assert_eq!(ok("1500us"), Duration::from_micros(1500));
        assert_eq!(ok("1500\u{b5}s"), Duration::from_micros(1500));
        assert_eq!(ok("7ns"), Duration::from_nanos(7));
        assert_eq!(
            ok("2562047h47m16.854775807s"),
            Duration::from_nanos(i64::MAX as u64)
        );
        for bad in ["", "10", "s", ".s", "1x", "1.2.3s", "1s2", " 1s", "1 s", "1sec"] {
            assert!(parse_go_duration(bad).is_err(), "{bad:?} accepted");
        }
        assert!(matches!(parse_go_duration("1d"), Err(DurationError::Unit(_, u)) if u == "d"));
        assert!(matches!(
            parse_go_duration("0"),
            Err(DurationError::NotPositive(_))
        ));
        assert!(matches!(
            parse_go_duration("-1s"),
            Err(DurationError::NotPositive(_))
        ));
        assert!(matches!(
            parse_go_duration("0s"),
            Err(DurationError::NotPositive(_))
        ));
        assert!(matches!(
            parse_go_duration("2562048h"),
            Err(DurationError::Range(_))
        ));
        assert!(matches!(
            parse_go_duration("99999999999999999999s"),
            Err(DurationError::Range(_))
        ));
    }

    #[test]
    fn invalid_requests_are_permanent_and_limits_are_not() {
        assert!(is_permanent(ErrorCode::InvalidElection));
        assert!(is_permanent(ErrorCode::ForbiddenNamespace));
        for transient in [
            ErrorCode::Unattested,
            ErrorCode::IdentityInUse,
            ErrorCode::TooManyConnections,
            ErrorCode::ShuttingDown,
            ErrorCode::Internal,
        ] {
            assert!(!is_permanent(transient), "{transient:?}");
        }
    }
}
