//! elector's test support: a test Kubernetes API server ([`kube_api`]) faithful to the real one,
//! and helpers shared by the integration tests, the chaos suite and the benchmarks.

pub mod harness;
pub mod kube_api;
