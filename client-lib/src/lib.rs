//! `elector-client`: leader election for Kubernetes apps, through the node's elector broker.
//!
//! The broker (`electord`, one per node) runs the elections against the Kubernetes API; this
//! library talks to it over its Unix socket. Any disconnect means "not leader" at once, and the
//! client reconnects (with back-off) and campaigns again by itself.
//!
//! ```no_run
//! use elector_client::{Client, CampaignOptions};
//!
//! # async fn demo() -> Result<(), elector_client::Error> {
//! let client = Client::connect("/var/run/elector/elector.sock").await?;
//! let campaign = client.campaign(CampaignOptions::new("my-app", "pod-a")).await?;
//! // Runs only while this pod leads; `stop` fires the moment leadership is lost.
//! campaign
//!     .run_while_leader(|stop| async move {
//!         while !stop.is_cancelled() {
//!             // ... do the leader's work ...
//!             tokio::time::sleep(std::time::Duration::from_secs(1)).await;
//!         }
//!     })
//!     .await?;
//! campaign.resign().await?;
//! # Ok(()) }
//! ```
//!
//! The wire format is in [`protocol`] (shared with the broker) and documented for other
//! languages in `PROTOCOL.md`.

pub mod backoff;
mod client;
pub mod clock;
pub mod codec;
pub mod protocol;

pub use client::{
    Campaign, CampaignEvent, CampaignOptions, Client, Error, EventStream, LeadershipState, Observation,
};
pub use tokio_util::sync::CancellationToken;
