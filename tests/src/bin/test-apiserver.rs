//! The test Kubernetes API server as a program: `cargo run -p elector-tests --bin test-apiserver`.
//! Prints where the admin kubeconfig is, for `electord`, and an anonymous one for `kubectl`
//! (client-go sends bearer tokens only over HTTPS; this server speaks HTTP).

use std::path::PathBuf;

use clap::Parser;
use elector_tests::kube_api::{Rule, ServerOptions, TestApiServer};

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
    // kubectl (client-go) sends no bearer token over plain HTTP: let it in as system:anonymous.
    let anonymous = server.add_anonymous(vec![Rule::all()]);
    println!("test API server at {}", server.url());
    println!("kubeconfig: {}", kubeconfig.display());
    println!(
        "try: electord --kubeconfig {} --node-name node-a --socket /tmp/elector.sock",
        kubeconfig.display()
    );
    println!(
        "and: KUBECONFIG={} kubectl get leases,endpoints -A",
        server.kubeconfig_path(&anonymous).display()
    );
    tokio::signal::ctrl_c().await?;
    Ok(())
}
