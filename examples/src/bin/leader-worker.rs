//! A Rust app that does its work only while it leads (examples/rust/README.md).
//!
//! `cargo run -p elector-examples --bin leader-worker -- --socket /tmp/elector.sock --election report-job --id pod-a`

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use elector_client::{CampaignEvent, CampaignOptions, Client};
use futures::StreamExt;

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, env = "ELECTOR_SOCKET", default_value = elector_client::protocol::DEFAULT_SOCKET_PATH)]
    socket: PathBuf,
    #[arg(long, default_value = "report-job")]
    election: String,
    /// This instance's identity (in a pod: the pod name).
    #[arg(long, env = "POD_NAME")]
    id: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let client = Client::connect(&args.socket).await?;
    let mut campaign = client
        .campaign(CampaignOptions::new(&args.election, &args.id))
        .await?;
    let mut events = campaign.events();
    tokio::spawn(async move {
        while let Some(e) = events.next().await {
            match e {
                CampaignEvent::Leader {
                    unknown: Some(why), ..
                } => println!("leader unknown ({why})"),
                CampaignEvent::Leader { leader, term, .. } => {
                    println!(
                        "leader {} term {}",
                        leader.as_deref().unwrap_or("-"),
                        term.unwrap_or(0)
                    )
                }
                CampaignEvent::Elected { term } => println!("elected term {term}"),
                CampaignEvent::Lost { term, reason } => println!("lost term {term} ({reason})"),
                CampaignEvent::Jeopardy { term, .. } => println!("jeopardy term {term} (broker away)"),
                CampaignEvent::Safe { term } => println!("safe term {term}"),
            }
        }
    });
    loop {
        // Work runs only while leading; `stop` fires the moment leadership is lost.
        campaign
            .run_while_leader(|stop| async move {
                let mut n = 0u64;
                while !stop.is_cancelled() {
                    n += 1;
                    println!("working: batch {n}");
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                }
                println!("stopped working");
            })
            .await?;
    }
}
