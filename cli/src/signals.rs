//! SIGTERM and SIGINT as a stream, so that each command decides what stopping means.

use anyhow::Context;
use nix::sys::signal::Signal;
use tokio::sync::mpsc;

/// SIGTERM and SIGINT, as they arrive.
pub struct Signals(mpsc::UnboundedReceiver<Signal>);

impl Signals {
    pub fn install() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        let (tx, rx) = mpsc::unbounded_channel();
        for (kind, sig) in [
            (SignalKind::terminate(), Signal::SIGTERM),
            (SignalKind::interrupt(), Signal::SIGINT),
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
