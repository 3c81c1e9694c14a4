//! Prometheus metrics of the broker (served on `/metrics` in the text format).

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiLabels {
    pub verb: String,
    pub resource: String,
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiLatencyLabels {
    pub verb: String,
    pub resource: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabels {
    pub code: String,
}

/// Every metric of one broker.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub elections: Gauge,
    pub elections_held: Gauge,
    pub candidates: Gauge,
    pub observers: Gauge,
    pub connected_clients: Gauge,
    pub socket_superseded: Gauge,
    pub socket_reclaims: Counter,
    pub leadership_transitions: Counter,
    pub api_requests: Family<ApiLabels, Counter>,
    pub api_latency: Family<ApiLatencyLabels, Histogram>,
    pub watch_restarts: Counter,
    pub events_sent: Counter,
    pub events_coalesced: Counter,
    pub events_dropped: Counter,
    pub rejected_requests: Family<CodeLabels, Counter>,
    pub attestation_failures: Family<ReasonLabels, Counter>,
    pub kubernetes_events_written: Counter,
    pub kubernetes_events_dropped: Family<ReasonLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("elector");
        let m = Metrics {
            elections: Gauge::default(),
            elections_held: Gauge::default(),
            candidates: Gauge::default(),
            observers: Gauge::default(),
            connected_clients: Gauge::default(),
            socket_superseded: Gauge::default(),
            socket_reclaims: Counter::default(),
            leadership_transitions: Counter::default(),
            api_requests: Family::default(),
            api_latency: Family::new_with_constructor(|| {
                Histogram::new([
                    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ])
            }),
            watch_restarts: Counter::default(),
            events_sent: Counter::default(),
            events_coalesced: Counter::default(),
            events_dropped: Counter::default(),
            rejected_requests: Family::default(),
            attestation_failures: Family::default(),
            kubernetes_events_written: Counter::default(),
            kubernetes_events_dropped: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "elections",
            "Elections this broker takes part in (candidates or observers)",
            m.elections.clone(),
        );
        registry.register(
            "elections_held",
            "Elections whose lock this broker holds",
            m.elections_held.clone(),
        );
        registry.register(
            "candidates",
            "Local candidates across all elections",
            m.candidates.clone(),
        );
        registry.register(
            "observers",
            "Local observers across all elections",
            m.observers.clone(),
        );
        registry.register(
            "connected_clients",
            "Open socket connections",
            m.connected_clients.clone(),
        );
        registry.register(
            "socket_superseded",
            "1 while a successor broker serves this broker's socket path (a rolling upgrade): connections move to it",
            m.socket_superseded.clone(),
        );
        registry.register(
            "socket_reclaims",
            "Times this broker took its socket path back from a successor that went away",
            m.socket_reclaims.clone(),
        );
        registry.register(
            "leadership_transitions",
            "Local candidates elected",
            m.leadership_transitions.clone(),
        );
        registry.register(
            "api_requests",
            "Kubernetes API requests by verb, resource and status code",
            m.api_requests.clone(),
        );
        registry.register(
            "api_request_duration_seconds",
            "Kubernetes API request latency",
            m.api_latency.clone(),
        );
        registry.register(
            "watch_restarts",
            "Lock watches re-established after an error",
            m.watch_restarts.clone(),
        );
        registry.register("events_sent", "Events written to clients", m.events_sent.clone());
        registry.register(
            "events_coalesced",
            "Leader events replaced by a newer one before a slow client read them",
            m.events_coalesced.clone(),
        );
        registry.register(
            "events_dropped",
            "Events dropped because their client was disconnected as stuck",
            m.events_dropped.clone(),
        );
        registry.register(
            "rejected_requests",
            "Requests rejected, by error code",
            m.rejected_requests.clone(),
        );
        registry.register(
            "attestation_failures",
            "Connections rejected because the calling pod could not be attested, by reason",
            m.attestation_failures.clone(),
        );
        registry.register(
            "kubernetes_events_written",
            "Kubernetes Events about leadership changes written (created or aggregated)",
            m.kubernetes_events_written.clone(),
        );
        registry.register(
            "kubernetes_events_dropped",
            "Kubernetes Events about leadership changes not written: queue_full, rate_limited, write_failed",
            m.kubernetes_events_dropped.clone(),
        );
        Metrics { registry, ..m }
    }

    pub fn api_request(&self, verb: &str, resource: &str, code: &str, latency: Duration) {
        self.api_requests
            .get_or_create(&ApiLabels {
                verb: verb.into(),
                resource: resource.into(),
                code: code.into(),
            })
            .inc();
        self.api_latency
            .get_or_create(&ApiLatencyLabels {
                verb: verb.into(),
                resource: resource.into(),
            })
            .observe(latency.as_secs_f64());
    }

    pub fn rejected(&self, code: &str) {
        self.rejected_requests
            .get_or_create(&CodeLabels { code: code.into() })
            .inc();
    }

    pub fn attestation_failure(&self, reason: &str) {
        self.attestation_failures
            .get_or_create(&ReasonLabels {
                reason: reason.into(),
            })
            .inc();
    }

    pub fn kubernetes_event_dropped(&self, reason: &str) {
        self.kubernetes_events_dropped
            .get_or_create(&ReasonLabels {
                reason: reason.into(),
            })
            .inc();
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
