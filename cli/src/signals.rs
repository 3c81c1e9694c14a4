//! SIGTERM, SIGINT and SIGHUP as a stream, so that each command decides what stopping means
//! (`run` forwards the signal to CMD and stops it; a hangup of elector's terminal or session
//! must not kill elector outright, which would cut CMD's grace period short).

use anyhow::Context;
use nix::sys::signal::Signal;
use tokio::sync::mpsc;

/// SIGTERM, SIGINT and SIGHUP, as they arrive.
pub struct Signals(mpsc::UnboundedReceiver<Signal>);

impl Signals {
    pub fn install() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        let (tx, rx) = mpsc::unbounded_channel();
        for (kind, sig) in [
            (SignalKind::terminate(), Signal::SIGTERM),
            (SignalKind::interrupt(), Signal::SIGINT),
            (SignalKind::hangup(), Signal::SIGHUP),
        ] {
            let mut stream = signal(kind).context("installing signal handlers")?;
            let tx = tx.clone();
            tokio::spawn(async move {
                while stream.recv().await.is_some() {
                    if tx.send(sig).is_err() {
                        break;
                    }
                }
            });
        }
        Ok(Signals(rx))
    }

    pub async fn recv(&mut self) -> Signal {
        // The senders live as long as the runtime.
        self.0.recv().await.unwrap_or(Signal::SIGTERM)
    }
}
