//! The test Kubernetes API server as a program: `cargo run -p elector-tests --bin test-apiserver`.
//! Prints where the admin kubeconfig is, so `kubectl` and `electord` can use it unmodified.

use std::path::PathBuf;

use clap::Parser;
use elector_tests::kube_api::{ServerOptions, TestApiServer};

/// A test Kubernetes API server (endpoints, pods, leases) for running elector without a cluster.
#[derive(Debug, Parser)]
struct Args {
    /// Port on 127.0.0.1 (0: any free port).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Where to write kubeconfig files.
    #[arg(long, default_value = "/tmp/elector-test-apiserver")]
    dir: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt().with_writer(std::io::stderr).init();
    let server = TestApiServer::start_with(ServerOptions {
        port: args.port,
        dir: Some(args.dir.clone()),
        ..ServerOptions::default()
    })
    .await?;
    let kubeconfig = server.kubeconfig_path(server.admin());
    println!("test API server at {}", server.url());
    println!("kubeconfig: {}", kubeconfig.display());
    println!(
        "try: electord --kubeconfig {} --node-name node-a --socket /tmp/elector.sock",
        kubeconfig.display()
    );
    tokio::signal::ctrl_c().await?;
    Ok(())
}
