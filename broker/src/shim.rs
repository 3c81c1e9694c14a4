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
//!   client reconnects with back-off.

use std::path::PathBuf;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use elector_client::protocol::{LockKind, Timing};
use elector_client::{CampaignOptions, Client, LeadershipState};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

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
    pub fn timing(&self) -> Result<Timing, String> {
        let ttl = self.ttl.as_secs();
        if self.ttl.subsec_nanos() != 0 || ttl < 2 {
            return Err(format!(
                "--ttl must be a whole number of seconds, at least 2 (got {:?})",
                self.ttl
            ));
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

/// Campaigns forever (reconnecting and re-campaigning), publishing the view.
pub async fn campaign_loop(config: ShimConfig, view: watch::Sender<ShimView>, stop: CancellationToken) {
    let timing = match config.timing() {
        Ok(t) => t,
        Err(e) => {
            view.send_replace(ShimView {
                problem: Some(e),
                ..Default::default()
            });
            return;
        }
    };
    let mut backoff = Duration::from_millis(100);
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
        match attempt.await {
            Ok((_client, campaign)) => {
                backoff = Duration::from_millis(100);
                tracing::info!(election = %config.election, id = %config.id, "campaigning through the broker");
                let mut state = campaign.state();
                loop {
                    let v = view_of(&config.id, &state.borrow_and_update());
                    view.send_replace(v);
                    tokio::select! {
                        _ = stop.cancelled() => {
                            let _ = campaign.resign().await;
                            return;
                        }
                        changed = state.changed() => if changed.is_err() { break },
                    }
                }
            }
            Err(e) => {
                tracing::warn!("cannot campaign yet: {e}; retrying in {backoff:?}");
                view.send_replace(ShimView {
                    name: String::new(),
                    healthy: false,
                    problem: Some(e.to_string()),
                });
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
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

/// Runs the shim until `stop` fires: campaign, and serve HTTP on `http` if given.
pub async fn run(
    config: ShimConfig,
    http: Option<tokio::net::TcpListener>,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let (tx, rx) = watch::channel(ShimView::default());
    let campaign = tokio::spawn(campaign_loop(config, tx, stop.clone()));
    if let Some(listener) = http {
        let s = stop.clone();
        axum::serve(listener, router(rx))
            .with_graceful_shutdown(async move { s.cancelled().await })
            .await?;
    }
    let _ = campaign.await;
    Ok(())
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
        assert!(bad.timing().is_err());
    }
}
