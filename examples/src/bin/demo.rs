//! The five-minute demo: a standalone broker (no cluster), three candidate apps on its socket,
//! then the leader is stopped twice and the failover is measured each time.
//!
//! `cargo run --release -p elector-examples --bin demo`

use std::time::{Duration, Instant};

use anyhow::Context;
use elector_broker::daemon::{Daemon, DaemonConfig};
use elector_client::{CampaignOptions, Client};

struct App {
    name: &'static str,
    client: Client,
    campaign: elector_client::Campaign,
}

async fn start_app(socket: &std::path::Path, name: &'static str) -> anyhow::Result<App> {
    let client = Client::connect(socket).await?;
    let campaign = client.campaign(CampaignOptions::new("report-job", name)).await?;
    Ok(App {
        name,
        client,
        campaign,
    })
}

fn show(apps: &[App]) -> String {
    apps.iter()
        .map(|a| {
            let s = a.campaign.state().borrow().clone();
            if s.is_leader {
                format!("{}=LEADER(term {})", a.name, s.term.unwrap_or(0))
            } else {
                format!("{}=standby", a.name)
            }
        })
        .collect::<Vec<_>>()
        .join("  ")
}

async fn wait_for_leader(apps: &[App]) -> anyhow::Result<usize> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(i) = apps.iter().position(|a| a.campaign.is_leader()) {
            return Ok(i);
        }
        anyhow::ensure!(Instant::now() < deadline, "no leader within 10 s");
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("elector.sock");
    println!("elector demo: one broker, three apps, one election (\"report-job\")\n");
    let daemon = Daemon::start_standalone(DaemonConfig::for_socket(&socket, "laptop"))
        .await
        .context("starting the standalone broker")?;
    println!("  broker   electord --standalone, socket {}", socket.display());

    let mut apps = Vec::new();
    for name in ["app-1", "app-2", "app-3"] {
        apps.push(start_app(&socket, name).await?);
    }
    wait_for_leader(&apps).await?;
    println!("  start    {}", show(&apps));

    let mut timings = Vec::new();
    for round in 1..=2 {
        let leader = wait_for_leader(&apps).await?;
        let gone = apps.remove(leader);
        println!("\n  stop     {} exits (its socket closes; no goodbye)", gone.name);
        let t = Instant::now();
        drop(gone);
        let next = wait_for_leader(&apps).await?;
        let took = t.elapsed();
        timings.push(took);
        println!(
            "  failover {} leads after {:.2} ms  ({})",
            apps[next].name,
            took.as_secs_f64() * 1000.0,
            show(&apps)
        );
        if round == 1 {
            let name = "app-4";
            apps.push(start_app(&socket, name).await?);
            tokio::time::sleep(Duration::from_millis(50)).await;
            println!("  join     {name} joins as a standby  ({})", show(&apps));
        }
    }

    let watcher = &apps[0].client;
    let mut obs = watcher
        .observe("report-job", None, elector_client::protocol::LockKind::Lease)
        .await?;
    let _ = obs.events();
    println!("\n  shutdown the broker releases the lock and tells the leader (broker_shutdown)");
    daemon.shutdown().await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    println!("  end      {}", show(&apps));
    println!(
        "\nFailover after the leading app exited: {}. (The 2016 sidecar: 30-40 s.)",
        timings
            .iter()
            .map(|t| format!("{:.2} ms", t.as_secs_f64() * 1000.0))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("Next: README.md (run electord yourself, talk to it with nc -U), PROTOCOL.md.");
    Ok(())
}
