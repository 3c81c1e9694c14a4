//! The broker's HTTP endpoints: `/healthz` (alive), `/readyz` (socket listening and the API
//! reachable recently), `/metrics` (Prometheus text) and `/elections` (JSON).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use crate::daemon::Readiness;
use crate::registry::Elections;

#[derive(Debug, Clone)]
struct AppState {
    elections: Elections,
    readiness: Arc<Readiness>,
}

/// The router, for serving or for tests.
pub fn router(elections: Elections, readiness: Arc<Readiness>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/elections", get(elections_json))
        .with_state(AppState { elections, readiness })
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    match s.readiness.check() {
        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")),
    }
}

async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.elections.metrics().encode(),
    )
}

async fn elections_json(State(s): State<AppState>) -> impl IntoResponse {
    axum::Json(s.elections.info().await)
}

/// Serves the endpoints on `listener` until `shutdown` fires.
pub async fn serve(
    listener: tokio::net::TcpListener,
    elections: Elections,
    readiness: Arc<Readiness>,
    shutdown: CancellationToken,
) {
    let app = router(elections, readiness);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
    {
        tracing::error!("HTTP server failed: {e}");
    }
}

/// Binds the HTTP listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}
