//! `electord`: leader election for every pod of a Kubernetes node, done once per node.
//!
//! Layout:
//! - [`election`]: the lock record format and the I/O-free election state machine;
//! - [`lock`]: lock backends (Endpoints, Lease, memory) and the per-namespace watch hub;
//! - [`registry`]: one task per election, joining the two;
//! - [`events`]: Kubernetes Events on the lock object when leadership changes;
//! - [`socket`]: the Unix-socket protocol server applications talk to;
//! - [`http`]: health, readiness, metrics and `/elections`;
//! - [`logging`]: the binaries' log format (text, coloured only on a terminal, or JSON);
//! - [`shim`]: `elector-shim`, the drop-in for the 2016 leader-elector sidecar.

pub mod attest;
pub mod daemon;
pub mod election;
pub mod events;
pub mod http;
pub mod lock;
pub mod logging;
pub mod metrics;
pub mod registry;
pub mod shim;
pub mod socket;

/// Where `electord` serves `/healthz`, `/readyz`, `/metrics` and `/elections` by default
/// (`deploy/daemonset.yaml` uses the same port).
pub const DEFAULT_HTTP_ADDR: &str = "0.0.0.0:4041";
