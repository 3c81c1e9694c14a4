//! The broker's HTTP endpoints, `/healthz` (alive), `/readyz` (socket listening and the API
//! reachable recently), `/metrics` (Prometheus text) and `/elections` (JSON), and the bounded
//! HTTP/1 server that both `electord` and `elector-shim` serve with ([`serve_bounded`]).
//!
//! Guarantees of [`serve_bounded`], so that no HTTP client can hurt the election socket:
//! - at most [`HttpLimits::max_connections`] connections at once: the accept loop takes a
//!   semaphore permit before it accepts, so connections beyond the cap wait in the kernel's
//!   backlog and hold none of this process's file descriptors;
//! - a connection must send a request's whole header within [`HttpLimits::header_timeout`]
//!   (hyper's `header_read_timeout`), also for the next request of a kept-alive connection: idle,
//!   slowloris and keep-alive connections are closed after it;
//! - a response that makes no write progress for [`HttpLimits::write_timeout`] (a client that
//!   does not read) closes the connection, freeing its buffers;
//! - on accept errors (`EMFILE` and the like) the loop backs off (10 ms, doubling to 1 s)
//!   instead of spinning.
//!
//! `/elections` is streamed (a JSON array written a few elections at a time, as the client
//! reads), at most [`HttpLimits::max_listings`] at once (others get `503` and `Retry-After`),
//! and shown only to callers the [`ListingAccess`] allows: by default loopback only (`kubectl
//! exec ... -- elector status`), since it names every election and identity of the node.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::registry::Elections;
use elector_client::protocol::ElectionName;

/// Why `/readyz` says not ready.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotReady {
    #[error("the Kubernetes API last answered {0:?} ago")]
    ApiSilentFor(Duration),
    #[error("the Kubernetes API has not answered yet")]
    ApiNeverAnswered,
}

/// What `/readyz` checks.
#[derive(Debug)]
pub struct Readiness {
    /// `None` in standalone mode: there is no API to reach.
    last_api_contact: Option<Mutex<Option<Instant>>>,
    window: Duration,
}

impl Readiness {
    pub fn standalone() -> Self {
        Readiness {
            last_api_contact: None,
            window: Duration::ZERO,
        }
    }

    pub fn kubernetes(window: Duration) -> Self {
        Readiness {
            last_api_contact: Some(Mutex::new(None)),
            window,
        }
    }

    pub fn api_contact(&self) {
        if let Some(m) = &self.last_api_contact {
            *m.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        }
    }

    pub fn check(&self) -> Result<(), NotReady> {
        let Some(m) = &self.last_api_contact else {
            return Ok(());
        };
        match *m.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(t) if t.elapsed() <= self.window => Ok(()),
            Some(t) => Err(NotReady::ApiSilentFor(t.elapsed())),
            None => Err(NotReady::ApiNeverAnswered),
        }
    }
}

/// Who may read `/elections` (every election and identity of the node).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ListingAccess {
    /// Only callers on the loopback interface (inside the broker's pod: `kubectl exec`).
    #[default]
    Local,
    /// Anyone who can reach the port.
    Everyone,
}

/// Limits of an HTTP server (the broker's and the shim's).
#[derive(Debug, Clone)]
pub struct HttpLimits {
    /// Connections at once; more wait in the kernel's backlog.
    pub max_connections: usize,
    /// A request's header must arrive within this long (idle kept-alive connections too).
    pub header_timeout: Duration,
    /// A response write that makes no progress for this long closes the connection.
    pub write_timeout: Duration,
    /// `/elections` responses at once.
    pub max_listings: usize,
    /// Who may read `/elections`.
    pub listing_access: ListingAccess,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_connections: 256,
            header_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
            max_listings: 4,
            listing_access: ListingAccess::Local,
        }
    }
}

/// Elections per chunk of a streamed `/elections`.
const LISTING_CHUNK: usize = 64;

#[derive(Debug, Clone)]
struct AppState {
    elections: Elections,
    readiness: Arc<Readiness>,
    listings: Arc<Semaphore>,
    access: ListingAccess,
}

/// The broker's router. Handlers that need the caller's address read the
/// `ConnectInfo<SocketAddr>` that [`serve_bounded`] puts on every request.
pub fn router(elections: Elections, readiness: Arc<Readiness>, limits: &HttpLimits) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/elections", get(elections_json))
        .with_state(AppState {
            elections,
            readiness,
            listings: Arc::new(Semaphore::new(limits.max_listings.max(1))),
            access: limits.listing_access,
        })
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

async fn elections_json(State(s): State<AppState>, request: axum::extract::Request) -> Response {
    let local = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .is_some_and(|ConnectInfo(addr)| addr.ip().is_loopback());
    if s.access == ListingAccess::Local && !local {
        return (
            StatusCode::FORBIDDEN,
            "/elections is served on the loopback interface only (electord --http-elections=everyone opens it): kubectl exec into the broker's pod and run `elector status`\n",
        )
            .into_response();
    }
    let Ok(permit) = s.listings.clone().try_acquire_owned() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "1")],
            "too many /elections requests at once; retry\n",
        )
            .into_response();
    };
    let names = s.elections.names();
    (
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(listing_chunks(s.elections.clone(), names, permit)),
    )
        .into_response()
}

/// The JSON array of the elections named, [`LISTING_CHUNK`] per chunk, each chunk's state asked
/// of the elections only when the client has read the previous one: a listing holds the names
/// and one chunk, never every election's state at once. The permit goes with the last chunk (or
/// with the connection, if it dies first).
fn listing_chunks(
    elections: Elections,
    names: Vec<ElectionName>,
    permit: OwnedSemaphorePermit,
) -> impl futures::Stream<Item = Result<Bytes, Infallible>> + Send {
    // (where the next chunk starts, whether an element was written yet: commas go between)
    let state = (elections, names, 0usize, false, Some(permit));
    futures::stream::unfold(state, |(elections, names, at, mut any, permit)| async move {
        let permit = permit?;
        let end = (at + LISTING_CHUNK).min(names.len());
        let infos = elections.info_of(&names[at..end]).await;
        let mut buf = Vec::with_capacity(infos.len() * 400 + 2);
        if at == 0 {
            buf.push(b'[');
        }
        for info in &infos {
            if any {
                buf.push(b',');
            }
            any = true;
            // An ElectionInfo is plain data: serializing it into memory cannot fail.
            let _ = serde_json::to_writer(&mut buf, info);
        }
        if end == names.len() {
            buf.push(b']');
            drop(permit);
            return Some((Ok(Bytes::from(buf)), (elections, names, end, any, None)));
        }
        Some((Ok(Bytes::from(buf)), (elections, names, end, any, Some(permit))))
    })
}

/// Serves `app` on `listener` within `limits` (see the module docs) until `shutdown` fires,
/// then lets requests in flight finish (up to a second).
pub async fn serve_bounded(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: HttpLimits,
    shutdown: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let connections = TaskTracker::new();
    let mut backoff = Duration::ZERO;
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => {
                    backoff = Duration::ZERO;
                    a
                }
                Err(e) => {
                    backoff = (backoff * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
                    tracing::warn!("HTTP accept failed: {e}; retrying in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    continue;
                }
            },
        };
        let mut io = tokio_io_timeout::TimeoutStream::new(tcp);
        io.set_write_timeout(Some(limits.write_timeout));
        let io = TokioIo::new(Box::pin(io));
        let app = app.clone();
        let service =
            hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
                request.extensions_mut().insert(ConnectInfo(peer));
                app.clone().oneshot(request)
            });
        let header_timeout = limits.header_timeout;
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let _permit = permit;
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .max_buf_size(64 * 1024);
            let conn = builder.serve_connection(io, service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(1), conn).await;
                }
            }
        });
    }
    drop(listener);
    connections.close();
    let _ = tokio::time::timeout(Duration::from_secs(2), connections.wait()).await;
}

/// Serves the broker's endpoints on `listener` until `shutdown` fires.
pub async fn serve(
    listener: tokio::net::TcpListener,
    elections: Elections,
    readiness: Arc<Readiness>,
    limits: HttpLimits,
    shutdown: CancellationToken,
) {
    let app = router(elections, readiness, &limits);
    serve_bounded(listener, app, limits, shutdown).await;
}

/// Binds the HTTP listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    /// A party that ignores its events.
    #[derive(Debug)]
    struct Deaf;

    impl crate::registry::PartySink for Deaf {
        fn deliver(&self, _: &ElectionName, _: crate::registry::PartyEvent) {}
        fn destination(&self) -> usize {
            0
        }
    }

    fn observed(elections: &Elections, i: usize) {
        let name = ElectionName {
            election: format!("e{i:03}"),
            namespace: "ns".into(),
            lock: Default::default(),
        };
        elections.observe(&name, elections.new_party(), Arc::new(Deaf));
    }

    #[tokio::test]
    async fn a_listing_is_one_json_array_and_frees_its_permit_at_the_end() {
        let semaphore = Arc::new(Semaphore::new(1));
        let elections = Elections::new(
            crate::lock::Backends::memory(),
            crate::registry::Defaults::default(),
            None,
        );
        let mut n = 0;
        for want in [0, 1, LISTING_CHUNK, LISTING_CHUNK + 1, 3 * LISTING_CHUNK] {
            while n < want {
                observed(&elections, n);
                n += 1;
            }
            let permit = semaphore.clone().try_acquire_owned().unwrap();
            let chunks: Vec<_> = listing_chunks(elections.clone(), elections.names(), permit)
                .collect()
                .await;
            let body: Vec<u8> = chunks.into_iter().flat_map(|c| c.unwrap().to_vec()).collect();
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            let listed: Vec<&str> = v
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["election"].as_str().unwrap())
                .collect();
            assert_eq!(listed.len(), n);
            assert!(listed.is_sorted(), "{listed:?}");
            assert_eq!(semaphore.available_permits(), 1, "permit back after {n}");
        }
        // Elections that end while a listing runs are left out; the JSON stays whole.
        let names = elections.names();
        let gone = ElectionName {
            election: "vanished".into(),
            namespace: "ns".into(),
            lock: Default::default(),
        };
        let mut with_gone = vec![gone.clone()];
        with_gone.extend(names);
        with_gone.push(gone);
        let permit = semaphore.clone().try_acquire_owned().unwrap();
        let chunks: Vec<_> = listing_chunks(elections.clone(), with_gone, permit)
            .collect()
            .await;
        let body: Vec<u8> = chunks.into_iter().flat_map(|c| c.unwrap().to_vec()).collect();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v.as_array().unwrap().len(), n);
    }

    async fn get_elections(app: &Router, from: &str) -> Response {
        let mut request = axum::http::Request::get("/elections")
            .body(Body::empty())
            .unwrap();
        request
            .extensions_mut()
            .insert(ConnectInfo(from.parse::<SocketAddr>().unwrap()));
        app.clone().oneshot(request).await.unwrap()
    }

    #[tokio::test]
    async fn elections_are_listed_to_loopback_only_and_a_few_at_once() {
        let elections = Elections::new(
            crate::lock::Backends::memory(),
            crate::registry::Defaults::default(),
            None,
        );
        let limits = HttpLimits {
            max_listings: 1,
            ..HttpLimits::default()
        };
        let app = router(elections.clone(), Arc::new(Readiness::standalone()), &limits);
        assert_eq!(
            get_elections(&app, "10.1.2.3:5000").await.status(),
            StatusCode::FORBIDDEN
        );
        assert_eq!(get_elections(&app, "[::1]:5000").await.status(), StatusCode::OK);
        // A listing whose body is not read yet holds its permit: the next one waits its turn.
        let unread = get_elections(&app, "127.0.0.1:5000").await;
        assert_eq!(unread.status(), StatusCode::OK);
        let busy = get_elections(&app, "127.0.0.1:5001").await;
        assert_eq!(busy.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(busy.headers()[header::RETRY_AFTER], "1");
        drop(unread);
        assert_eq!(
            get_elections(&app, "127.0.0.1:5002").await.status(),
            StatusCode::OK
        );

        let open = HttpLimits {
            listing_access: ListingAccess::Everyone,
            ..HttpLimits::default()
        };
        let app = router(elections, Arc::new(Readiness::standalone()), &open);
        assert_eq!(
            get_elections(&app, "10.1.2.3:5000").await.status(),
            StatusCode::OK
        );
    }

    #[test]
    fn readiness_errors_are_typed() {
        let r = Readiness::kubernetes(Duration::from_secs(30));
        assert_eq!(r.check(), Err(NotReady::ApiNeverAnswered));
        r.api_contact();
        assert_eq!(r.check(), Ok(()));
        assert_eq!(Readiness::standalone().check(), Ok(()));
    }
}
