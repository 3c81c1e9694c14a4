//! elector's benchmarks: `cargo run --release -p elector-tests --bin bench -- <scenario> [--json]`
//!
//! Scenarios: `failover`, `api-load`, `scale`, `protocol`, `restart`, `cluster`, `http`, `all`
//! (`http` is not part of `all`: it is about hostile load, not speed). Each prints a table (or JSON).
//! Brokers run on the test API server (failover, api-load) or standalone (scale, protocol); for
//! RSS and CPU the broker (or shim) runs as a child process of this program, so the numbers are
//! its own.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use elector_broker::daemon::{Daemon, DaemonConfig};
use elector_broker::election::ElectionTiming;
use elector_client::protocol::{LockKind, Timing};
use elector_client::{CampaignOptions, Client};
use elector_tests::RawClient;
use elector_tests::harness::TestBroker;
use elector_tests::kube_api::TestApiServer;
use serde_json::{Value, json};
use tokio::net::UnixStream;

#[derive(Debug, Parser)]
struct Args {
    #[command(subcommand)]
    scenario: Scenario,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// Failover after the leading app exits (same node, cross node) and after the leading broker dies.
    Failover {
        #[arg(long, default_value_t = 30)]
        trials: usize,
    },
    /// API requests at steady state: elections × 3 candidates × 3 brokers, next to client-go's.
    ApiLoad {
        #[arg(long, default_value_t = 100)]
        elections: usize,
        #[arg(long, default_value_t = 20)]
        seconds: u64,
    },
    /// One broker with many elections and clients: RSS, steady CPU, event fan-out latency.
    Scale {
        #[arg(long, default_value_t = 10_000)]
        clients: usize,
        #[arg(long, default_value_t = 1_000)]
        observers: usize,
        /// Leader changes fanned out to the observers (each one a trial per observer).
        #[arg(long, default_value_t = 50)]
        rounds: usize,
    },
    /// Campaign-to-reply latency, events per second through one socket; the shipped elector-shim
    /// (RSS, CPU per request) and electord (idle RSS), binary sizes.
    Protocol,
    /// Leadership through broker restarts: `electord` killed (-9) and restarted, and a surge
    /// upgrade, then a rollback (the new broker killed, the old one takes the socket back), with
    /// every election led on that broker. Leadership changes and jeopardy.
    Restart {
        #[arg(long, default_value_t = 1_000)]
        elections: usize,
    },
    /// A whole cluster's API cost: `brokers` electord processes on one test API server, elections
    /// of 3 candidates on 3 distinct brokers, all in one namespace and spread over 10.
    Cluster {
        #[arg(long, default_value_t = 30)]
        brokers: usize,
        /// Elections each broker takes part in (so brokers × this / 3 elections in all).
        #[arg(long, default_value_t = 6)]
        elections_per_broker: usize,
        #[arg(long, default_value_t = 20)]
        seconds: u64,
    },
    /// Hostile HTTP load: slow `/elections` readers at many elections (broker RSS and the
    /// socket's ping latency before, during, after), idle connections on the shim's port.
    Http {
        #[arg(long, default_value_t = 10_000)]
        elections: usize,
        /// `/elections` requests that read 1 KiB and then stop reading.
        #[arg(long, default_value_t = 200)]
        readers: usize,
        /// Idle connections opened to the shim's HTTP port.
        #[arg(long, default_value_t = 17_000)]
        shim_idle: usize,
    },
    /// Every scenario with its defaults.
    All,
    /// (internal) Run a standalone broker with its HTTP port (default limits) until killed.
    #[command(hide = true)]
    ServeHttpBroker {
        socket: PathBuf,
        http: std::net::SocketAddr,
    },
    /// (internal) Run an elector-shim on an HTTP port (default limits) until killed.
    #[command(hide = true)]
    ServeHttpShim {
        socket: PathBuf,
        http: std::net::SocketAddr,
    },
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn summary(name: &str, mut ms: Vec<f64>, target: &str) -> Value {
    ms.sort_by(|a, b| a.total_cmp(b));
    json!({"scenario": name, "trials": ms.len(), "p50_ms": pct(&ms, 50.0), "p95_ms": pct(&ms, 95.0),
           "p99_ms": pct(&ms, 99.0), "max_ms": ms.last().copied().unwrap_or(f64::NAN), "target": target})
}

const FAST: Timing = Timing {
    lease_duration: Some(1),
    renew_deadline: Some(0.6),
    retry_period: Some(0.2),
};

fn fast() -> ElectionTiming {
    ElectionTiming::new(
        Duration::from_secs(1),
        Duration::from_millis(600),
        Duration::from_millis(200),
    )
    .unwrap()
}

async fn campaign(
    socket: &Path,
    election: &str,
    who: &str,
) -> anyhow::Result<(Client, elector_client::Campaign)> {
    let c = Client::connect(socket).await?;
    let camp = c
        .campaign(
            CampaignOptions::new(election, who)
                .lock(LockKind::Lease)
                .timing(FAST),
        )
        .await?;
    Ok((c, camp))
}

async fn failover(trials: usize) -> anyhow::Result<Vec<Value>> {
    let server = TestApiServer::start().await?;
    let dir = tempfile::tempdir()?;
    let mut out = Vec::new();
    // Same node: two candidates on one broker; the leader's app exits.
    let (a, _) = TestBroker::on_server(&server, "node-a", dir.path(), fast());
    let (b, _) = TestBroker::on_server(&server, "node-b", dir.path(), fast());
    let mut same = Vec::new();
    let mut cross = Vec::new();
    for t in 0..trials {
        let e = format!("same-{t}");
        let (c1, l) = campaign(&a.socket, &e, "p1").await?;
        l.elected().await?;
        let (_c2, s) = campaign(&a.socket, &e, "p2").await?;
        let t0 = Instant::now();
        drop((l, c1));
        s.elected().await?;
        same.push(t0.elapsed().as_secs_f64() * 1000.0);

        let e = format!("cross-{t}");
        let (c1, l) = campaign(&a.socket, &e, "p1").await?;
        l.elected().await?;
        let (_c2, s) = campaign(&b.socket, &e, "p2").await?;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let t0 = Instant::now();
        drop((l, c1));
        s.elected().await?;
        cross.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    out.push(summary("failover: app exits, same node", same, "-"));
    out.push(summary(
        "failover: app exits, other node",
        cross,
        "p50 <= 50 ms, p99 <= 200 ms",
    ));
    drop((a, b));

    // The leading broker dies (no release): waited out for the lease (1 s here).
    let mut killed = Vec::new();
    for t in 0..trials {
        let e = format!("kill-{t}");
        let (a, _) = TestBroker::on_server(&server, &format!("ka-{t}"), dir.path(), fast());
        let (b, _) = TestBroker::on_server(&server, &format!("kb-{t}"), dir.path(), fast());
        let (_c1, l) = campaign(&a.socket, &e, "p1").await?;
        l.elected().await?;
        let (_c2, s) = campaign(&b.socket, &e, "p2").await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let t0 = Instant::now();
        a.kill();
        s.elected().await?;
        killed.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    out.push(summary(
        "failover: broker killed (lease 1 s)",
        killed,
        "<= lease + 250 ms = 1250 ms",
    ));
    Ok(out)
}

async fn api_load(elections: usize, seconds: u64) -> anyhow::Result<Vec<Value>> {
    let server = TestApiServer::start().await?;
    let dir = tempfile::tempdir()?;
    let timing = ElectionTiming::default();
    let mut brokers = Vec::new();
    for n in ["node-a", "node-b", "node-c"] {
        brokers.push(TestBroker::on_server(&server, n, dir.path(), timing).0);
    }
    let mut keep = Vec::new();
    for e in 0..elections {
        for (bi, b) in brokers.iter().enumerate() {
            for c in 0..3 {
                let client = Client::connect(&b.socket).await?;
                let camp = client
                    .campaign(CampaignOptions::new(format!("load-{e}"), format!("p{bi}-{c}")))
                    .await?;
                keep.push((client, camp));
            }
        }
    }
    // Settle: every election has a leader.
    let deadline = Instant::now() + Duration::from_secs(60);
    while keep.iter().filter(|(_, c)| c.is_leader()).count() < elections {
        anyhow::ensure!(Instant::now() < deadline, "not every election got a leader");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    server.clear_requests();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let log = server.requests();
    let secs = seconds as f64;
    let writes = log.iter().filter(|r| r.is_write()).count() as f64;
    let reads = log.iter().filter(|r| r.verb == "get" || r.verb == "list").count() as f64;
    let total = log.len() as f64;
    let retry = timing.retry_period.as_secs_f64();
    // client-go: every candidate Gets once per jittered retry period (mean 2.2 × retry with
    // JitterFactor 1.2), and the leader's renewals are a Get plus an Update each retry period.
    let candidates = (elections * 9) as f64;
    let client_go = elections as f64 * (2.0 / retry) + (candidates - elections as f64) / (retry * 2.2);
    Ok(vec![json!({
        "scenario": format!("api-load: {elections} elections x 3 candidates x 3 brokers, {secs} s, retry {retry} s"),
        "requests_per_s": total / secs, "writes_per_s": writes / secs, "reads_per_s": reads / secs,
        "writes_per_s_per_held_election": writes / secs / elections as f64,
        "client_go_requests_per_s": client_go,
        "target": "<= 0.5 writes/s per held election, no periodic reads",
    })])
}

fn rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmRSS:")
}

/// A `/proc/<pid>/status` field in KiB (`VmRSS:`, `RssAnon:`, `RssFile:`).
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// On-CPU time of a process, all threads, in nanoseconds (from `/proc/<pid>/task/*/schedstat`).
fn cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

fn spawn_self(args: &[&str]) -> anyhow::Result<std::process::Child> {
    Ok(std::process::Command::new(std::env::current_exe()?)
        .args(args)
        .stdout(std::process::Stdio::null())
        .spawn()?)
}

/// The shipped `electord --standalone` on `socket`, with the connection limits lifted to the
/// scale bench's size (every bench client runs as this uid).
fn spawn_standalone(socket: &Path) -> anyhow::Result<std::process::Child> {
    Ok(
        std::process::Command::new(elector_tests::workspace_bin("elector-broker", "electord"))
            .args(["--standalone", "--http-addr", "", "--attest", "none"])
            .args(["--max-connections", "50000", "--max-connections-per-uid", "50000"])
            .arg("--socket")
            .arg(socket)
            .env("RUST_LOG", "error")
            .stdout(std::process::Stdio::null())
            .spawn()?,
    )
}

async fn wait_for_socket(path: &Path) -> anyhow::Result<()> {
    for _ in 0..200 {
        if UnixStream::connect(path).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    anyhow::bail!("{} never appeared", path.display())
}

/// The observers of the fan-out measurement: plain non-blocking sockets on one thread, woken
/// by epoll, that recognise the awaited `leader` line by substring. The probe's own work per
/// event (one read, no JSON parsing, no task wake-ups) stays small, so the latency measured is
/// mostly the broker's and the kernel's, not the measuring client's, on two shared cores.
struct FanProbe {
    /// (round, its start, the awaited line fragment).
    round: Arc<Mutex<(u64, Instant, Vec<u8>)>>,
    /// Samples, a batch per epoll wake-up (one wake-up of the bench's runtime each, not one per
    /// sample).
    samples: tokio::sync::mpsc::UnboundedReceiver<Vec<Duration>>,
    observers: usize,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<anyhow::Result<()>>,
}

impl FanProbe {
    async fn start(socket: &Path, observers: usize) -> anyhow::Result<FanProbe> {
        let round = Arc::new(Mutex::new((0, Instant::now(), Vec::new())));
        let stop: Arc<std::sync::atomic::AtomicBool> = Arc::default();
        let (sample_tx, samples) = tokio::sync::mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let (socket, round2, stop2) = (socket.to_path_buf(), round.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let opened = Self::open(&socket, observers);
            let ok = opened.is_ok();
            let _ = ready_tx.send(opened.as_ref().map(|_| ()).map_err(|e| anyhow::anyhow!("{e:#}")));
            if !ok {
                return Ok(());
            }
            let (streams, pending) = opened?;
            Self::run(streams, pending, &round2, &sample_tx, &stop2)
        });
        ready_rx.await.context("the probe thread ended")??;
        Ok(FanProbe {
            round,
            samples,
            observers,
            stop,
            thread,
        })
    }

    /// Connects and observes, blocking; returns the sockets and what was read past the reply.
    fn open(socket: &Path, n: usize) -> anyhow::Result<(Vec<std::os::unix::net::UnixStream>, Vec<Vec<u8>>)> {
        use std::io::{BufRead, Write};
        let (mut streams, mut pending) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for _ in 0..n {
            let mut s = std::os::unix::net::UnixStream::connect(socket)?;
            s.write_all(b"{\"op\":\"observe\",\"election\":\"fan\"}\n")?;
            let mut r = std::io::BufReader::new(&s);
            let mut line = String::new();
            while !line.contains("\"event\":\"ok\"") {
                line.clear();
                anyhow::ensure!(r.read_line(&mut line)? > 0, "closed");
                anyhow::ensure!(!line.contains("\"event\":\"error\""), "observe failed: {line}");
            }
            pending.push(r.buffer().to_vec());
            s.set_nonblocking(true)?;
            streams.push(s);
        }
        Ok((streams, pending))
    }

    fn run(
        streams: Vec<std::os::unix::net::UnixStream>,
        mut pending: Vec<Vec<u8>>,
        round: &Mutex<(u64, Instant, Vec<u8>)>,
        samples: &tokio::sync::mpsc::UnboundedSender<Vec<Duration>>,
        stop: &std::sync::atomic::AtomicBool,
    ) -> anyhow::Result<()> {
        use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
        use std::io::Read;
        let epoll = Epoll::new(EpollCreateFlags::empty())?;
        for (i, s) in streams.iter().enumerate() {
            epoll.add(s, EpollEvent::new(EpollFlags::EPOLLIN, i as u64))?;
        }
        let mut sampled = vec![0u64; streams.len()];
        let mut events = vec![EpollEvent::empty(); 256];
        let mut buf = vec![0u8; 16 * 1024];
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let n = epoll.wait(&mut events, 100u16)?;
            let mut batch = Vec::new();
            for ev in &events[..n] {
                let i = ev.data() as usize;
                loop {
                    match (&streams[i]).read(&mut buf) {
                        Ok(0) => anyhow::bail!("the broker closed an observer's connection"),
                        Ok(k) => pending[i].extend_from_slice(&buf[..k]),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) => return Err(e.into()),
                    }
                }
                while let Some(end) = pending[i].iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = pending[i].drain(..=end).collect();
                    let (id, t0, needle) = &*round.lock().unwrap();
                    if sampled[i] < *id && contains(&line, b"\"event\":\"leader\"") && contains(&line, needle)
                    {
                        sampled[i] = *id;
                        batch.push(t0.elapsed());
                    }
                }
            }
            if !batch.is_empty() {
                let _ = samples.send(batch);
            }
        }
        Ok(())
    }

    /// Starts a round (before the change it measures is caused); the returned future gives
    /// every observer's time, from `t0`, to read a `leader` event naming `leader`.
    fn round(
        &mut self,
        t0: Instant,
        leader: &str,
    ) -> impl std::future::Future<Output = anyhow::Result<Vec<Duration>>> + '_ {
        {
            let mut r = self.round.lock().unwrap();
            *r = (r.0 + 1, t0, format!("\"leader\":\"{leader}\"").into_bytes());
        }
        async move {
            let mut got = Vec::with_capacity(self.observers);
            while got.len() < self.observers {
                got.extend(self.samples.recv().await.context("the probe thread ended")?);
            }
            Ok(got)
        }
    }

    fn stop(self) -> anyhow::Result<()> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("the probe thread panicked"))?
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

async fn scale(clients: usize, observers: usize, rounds: usize) -> anyhow::Result<Vec<Value>> {
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("scale.sock");
    let mut child = spawn_standalone(&socket)?;
    let pid = child.id();
    wait_for_socket(&socket).await?;
    let rss_idle = rss_kib(pid).unwrap_or(0);
    let mut conns = Vec::with_capacity(clients);
    for i in 0..clients {
        let mut c = RawClient::try_open(&socket).await?;
        c.try_send(&json!({"op":"campaign","election":format!("e-{i}"),"identity":format!("pod-{i}")}))
            .await?;
        conns.push(c);
    }
    for c in &mut conns {
        c.try_until("elected").await?;
    }
    // Observers of one election, to measure fan-out.
    let mut probe = FanProbe::start(&socket, observers).await?;
    // Two candidates of the observed election take turns: each round the leader resigns (and
    // campaigns again, as the standby), and every observer's time to learn of the new leader
    // is one sample.
    let names = ["first", "second"];
    // Every observer sees "first" lead (not a sample).
    let first_leads = probe.round(Instant::now(), names[0]);
    let mut fan_conns = Vec::new();
    for name in names {
        let mut c = RawClient::try_open(&socket).await?;
        c.try_send(&json!({"op":"campaign","election":"fan","identity":name}))
            .await?;
        // "first" is elected (possibly before its reply arrives); "second" waits.
        c.try_until(if name == "first" { "elected" } else { "ok" })
            .await?;
        fan_conns.push(c);
    }
    first_leads.await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Steady state: nothing happens, measure the broker's CPU.
    let cpu0 = cpu_ticks(pid).unwrap_or(0);
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let ticks_per_s = 100.0; // USER_HZ on Linux
    let cpu = (cpu_ticks(pid).unwrap_or(0) - cpu0) as f64 / ticks_per_s / t.elapsed().as_secs_f64() * 100.0;
    let rss = rss_kib(pid).unwrap_or(0);
    let mut lat = Vec::with_capacity(observers * rounds);
    let (mut broker_cpu, mut bench_cpu) = (0, 0);
    for round in 0..rounds {
        let (old, new) = (round % 2, 1 - round % 2);
        let (broker_cpu0, bench_cpu0) = (cpu_ns(pid), cpu_ns(std::process::id()));
        let t0 = Instant::now();
        let samples = probe.round(t0, names[new]);
        fan_conns[old]
            .try_send(&json!({"op":"resign","election":"fan"}))
            .await?;
        lat.extend(samples.await?.iter().map(|d| d.as_secs_f64() * 1000.0));
        broker_cpu += cpu_ns(pid) - broker_cpu0;
        bench_cpu += cpu_ns(std::process::id()) - bench_cpu0;
        fan_conns[old].try_until("ok").await?;
        fan_conns[new].try_until("elected").await?;
        fan_conns[old]
            .try_send(&json!({"op":"campaign","election":"fan","identity":names[old]}))
            .await?;
        fan_conns[old].try_until("ok").await?;
    }
    probe.stop()?;
    let _ = child.kill();
    let _ = child.wait();
    let mut fan = summary(
        &format!("scale: fan-out to {observers} observers"),
        lat,
        if observers <= 1_000 {
            "p99 <= 5 ms (1,000 observers), five runs of five"
        } else {
            "reported"
        },
    );
    fan["clients"] = json!(clients + observers + 2);
    fan["rounds"] = json!(rounds);
    fan["broker_cpu_ms_per_round"] = json!(broker_cpu as f64 / 1e6 / rounds.max(1) as f64);
    fan["bench_client_cpu_ms_per_round"] = json!(bench_cpu as f64 / 1e6 / rounds.max(1) as f64);
    Ok(vec![
        json!({"scenario": format!("scale: {clients} elections, {} connections", clients + observers + 2),
               "rss_mib_idle": rss_idle as f64 / 1024.0, "rss_mib": rss as f64 / 1024.0,
               "steady_cpu_percent_of_one_core": cpu, "target": "RSS <= 64 MB (at 10,000 elections and 10,000 clients), CPU <= 5% of one core"}),
        fan,
    ])
}

async fn protocol() -> anyhow::Result<Vec<Value>> {
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("p.sock");
    let mut child = spawn_standalone(&socket)?;
    wait_for_socket(&socket).await?;
    let mut c = RawClient::try_open(&socket).await?;
    let mut lat = Vec::new();
    for i in 0..1000 {
        let t = Instant::now();
        c.try_send(&json!({"op":"campaign","id":i,"election":format!("p-{i}"),"identity":"me"}))
            .await?;
        c.try_until("ok").await?;
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
        // Stay under the per-connection limit of campaigns.
        c.try_send(&json!({"op":"resign","election":format!("p-{i}")}))
            .await?;
        c.try_until("ok").await?;
    }
    // Events per second through one socket: pings pipelined in windows of 500 (below the
    // outbox limit: a client that never catches up is disconnected by design), each answered by
    // a pong.
    let mut p = RawClient::try_open(&socket).await?;
    let n = 100_000;
    let window = 500;
    let chunk = b"{\"op\":\"ping\"}\n".repeat(window);
    let t = Instant::now();
    let mut got = 0;
    let mut s = String::new();
    while got < n {
        p.try_send_raw(&chunk).await?;
        for _ in 0..window {
            anyhow::ensure!(p.read_line(&mut s).await?, "connection closed");
            got += 1;
        }
    }
    let eps = got as f64 / t.elapsed().as_secs_f64();
    let _ = child.kill();
    let _ = child.wait();
    let mut camp = summary("protocol: campaign to reply", lat, "-");
    camp["note"] = json!("one connection, 1000 sequential campaigns in new elections (each resigned after)");
    let mut rows = vec![
        camp,
        json!({"scenario": "protocol: events through one socket", "events_per_s": eps, "target": "-"}),
    ];
    rows.extend(shipped(1_000).await?);
    Ok(rows)
}

/// Sends `GET /` to an elector-shim over a fresh connection (as the 2016 sidecar's users poll
/// it) and returns the body.
async fn shim_get(addr: std::net::SocketAddr) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: shim\r\nConnection: close\r\n\r\n")
        .await?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).await?;
    anyhow::ensure!(resp.starts_with("HTTP/1.1 200"), "shim answered: {resp}");
    Ok(resp.split("\r\n\r\n").nth(1).unwrap_or_default().to_string())
}

/// The shipped binaries as users run them: `electord --standalone` (idle RSS) and two
/// `elector-shim` candidates of one election on it. The standby shim serves `requests` GETs,
/// then the leading shim is killed and the standby takes over; its RSS after that, and its CPU
/// per request, are the shim's cost. Also the release binaries' sizes.
async fn shipped(requests: usize) -> anyhow::Result<Vec<Value>> {
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("shipped.sock");
    let electord = elector_tests::workspace_bin("elector-broker", "electord");
    let shim_bin = elector_tests::workspace_bin("elector-broker", "elector-shim");
    let cli = elector_tests::workspace_bin("elector-cli", "elector");
    let mut broker = spawn_standalone(&socket)?;
    wait_for_socket(&socket).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let broker_idle = rss_kib(broker.id()).unwrap_or(0);
    let broker_idle_anon = status_kib(broker.id(), "RssAnon:").unwrap_or(0);
    let shim = |id: &str, addr: std::net::SocketAddr| -> anyhow::Result<std::process::Child> {
        Ok(std::process::Command::new(&shim_bin)
            .args(["--election", "shim-bench", "--ttl", "2s", "--id", id, "--http"])
            .arg(addr.to_string())
            .arg("--socket")
            .arg(&socket)
            .env("RUST_LOG", "error")
            .stdout(std::process::Stdio::null())
            .spawn()?)
    };
    let (addr_a, addr_b) = (free_local_addr()?, free_local_addr()?);
    let mut a = shim("shim-a", addr_a)?;
    let until = |addr, name: &'static str| async move {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(body) = shim_get(addr).await
                && body.contains(&format!("\"{name}\""))
            {
                return Ok(());
            }
            anyhow::ensure!(Instant::now() < deadline, "the shim never named {name}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    until(addr_a, "shim-a").await?;
    let mut b = shim("shim-b", addr_b)?;
    until(addr_b, "shim-a").await?;
    let rss_start = rss_kib(b.id()).unwrap_or(0);
    let cpu0 = cpu_ns(b.id());
    let t = Instant::now();
    for _ in 0..requests {
        shim_get(addr_b).await?;
    }
    let elapsed = t.elapsed();
    let cpu_per_request_us = (cpu_ns(b.id()) - cpu0) as f64 / 1e3 / requests as f64;
    a.kill()?;
    a.wait()?;
    until(addr_b, "shim-b").await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_after = rss_kib(b.id()).unwrap_or(0);
    let anon_after = status_kib(b.id(), "RssAnon:").unwrap_or(0);
    let _ = b.kill();
    let _ = b.wait();
    let _ = broker.kill();
    let _ = broker.wait();
    let size = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| m.len() as f64 / 1024.0 / 1024.0)
            .unwrap_or(f64::NAN)
    };
    Ok(vec![
        json!({"scenario": "protocol: elector-shim (shipped binary)",
               "rss_mib_started": rss_start as f64 / 1024.0,
               "rss_mib_after_requests_and_leader_change": rss_after as f64 / 1024.0,
               "rss_anon_mib_after": anon_after as f64 / 1024.0,
               "requests": requests, "cpu_us_per_request": cpu_per_request_us,
               "requests_per_s": requests as f64 / elapsed.as_secs_f64(),
               "note": "GET / over a new TCP connection each; then the leading shim is killed and this one takes over",
               "target": "small (one per pod)"}),
        json!({"scenario": "protocol: electord --standalone idle (shipped binary)",
               "rss_mib": broker_idle as f64 / 1024.0, "rss_anon_mib": broker_idle_anon as f64 / 1024.0,
               "target": "-"}),
        json!({"scenario": "binary sizes (this build's profile)",
               "electord_mib": size(&electord), "elector_shim_mib": size(&shim_bin),
               "elector_mib": size(&cli), "target": "-"}),
    ])
}

/// What the apps of the restart bench saw, in order: (when, which app, event).
type RestartLog = Arc<Mutex<Vec<(Instant, usize, elector_client::CampaignEvent)>>>;

/// Leadership through broker restarts, as an operator runs them: the shipped `electord` binary
/// against the test API server (renew deadline 10 s, retry 2 s: the defaults), `elections`
/// elections each led by its own app (an `elector-client` connection, which rides a broker
/// restart out in jeopardy and resumes; protocol 1.1). Three events, one after the other:
/// - `kill -9` of the broker and an immediate restart (a crash, an OOM kill);
/// - a surge upgrade: a second `electord --takeover` on the same socket while the first runs;
///   the first moves its connections to it in turns (`jeopardy`, `reconnect`);
/// - a rollback: the second is killed (-9) while the first still runs; the first takes the
///   socket path back and the apps resume there. The first is then stopped (SIGTERM,
///   `--on-shutdown=handoff`).
///
/// Reported per event: leadership changes (`elected`/`lost` seen by any app, and lock writes
/// that changed a holder, from the API server's request log), each leader's jeopardy (from its
/// `jeopardy` to its `safe`), and how long until every leader was safe again.
async fn restart(elections: usize) -> anyhow::Result<Vec<Value>> {
    use elector_client::CampaignEvent;
    use futures::StreamExt;
    let server = TestApiServer::start().await?;
    let user = server.add_user("bench-node", vec![elector_tests::kube_api::Rule::all()]);
    let kubeconfig = server.kubeconfig_path(&user);
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("elector.sock");
    let electord = elector_tests::workspace_bin("elector-broker", "electord");
    let spawn = |takeover: bool| -> anyhow::Result<std::process::Child> {
        let mut cmd = std::process::Command::new(&electord);
        cmd.arg("--kubeconfig")
            .arg(&kubeconfig)
            .args([
                "--node-name",
                "bench-node",
                "--http-addr",
                "",
                "--on-shutdown",
                "handoff",
            ])
            .args(["--max-connections", "20000", "--max-connections-per-uid", "20000"])
            // The bench's apps are host processes, not pods.
            .args(["--attest", "none"])
            .arg("--socket")
            .arg(&socket)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null());
        if takeover {
            cmd.arg("--takeover");
        }
        Ok(cmd.spawn()?)
    };
    let mut broker = spawn(false)?;
    wait_for_socket(&socket).await?;

    let log: RestartLog = Arc::default();
    let mut apps = Vec::with_capacity(elections);
    for i in 0..elections {
        let client = Client::connect(&socket).await?;
        let mut campaign = client
            .campaign(CampaignOptions::new(format!("restart-{i}"), format!("app-{i}")).lock(LockKind::Lease))
            .await?;
        let mut events = campaign.events();
        let log = log.clone();
        tokio::spawn(async move {
            while let Some(e) = events.next().await {
                log.lock().unwrap().push((Instant::now(), i, e));
            }
        });
        apps.push((client, campaign));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while !apps.iter().all(|(_, c)| c.is_leader()) {
        anyhow::ensure!(Instant::now() < deadline, "not every app was elected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let terms: Vec<Option<u64>> = apps.iter().map(|(_, c)| c.state().borrow().term).collect();
    // Who holds each Lease in which term, as the API server has it.
    async fn holders(
        server: &TestApiServer,
    ) -> std::collections::HashMap<String, (Option<String>, Option<i32>)> {
        let Ok(client) = server.client(server.admin()).await else {
            return Default::default();
        };
        let leases: kube::Api<k8s_openapi::api::coordination::v1::Lease> =
            kube::Api::namespaced(client, "default");
        let list = leases
            .list(&Default::default())
            .await
            .map(|l| l.items)
            .unwrap_or_default();
        list.into_iter()
            .map(|l| {
                let spec = l.spec.unwrap_or_default();
                (
                    l.metadata.name.unwrap_or_default(),
                    (spec.holder_identity, spec.lease_transitions),
                )
            })
            .collect()
    }
    let before = holders(&server).await;

    // Waits until every app that was in jeopardy since `from` is safe (or lost), then reports.
    let settle = |name: &'static str, from: usize, t0: Instant| {
        let (log, server, apps, terms, before) = (log.clone(), &server, &apps, &terms, &before);
        async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let done = {
                    let l = log.lock().unwrap();
                    let mut open = std::collections::HashSet::new();
                    let mut seen = 0;
                    for (_, app, e) in &l[from..] {
                        match e {
                            CampaignEvent::Jeopardy { .. } => {
                                open.insert(*app);
                                seen += 1;
                            }
                            CampaignEvent::Safe { .. } | CampaignEvent::Lost { .. } => {
                                open.remove(app);
                            }
                            _ => {}
                        }
                    }
                    seen >= elections && open.is_empty()
                };
                if done || Instant::now() > deadline {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let holders = holders(server).await;
            let moved = before.iter().filter(|(k, v)| holders.get(*k) != Some(*v)).count();
            let l = log.lock().unwrap();
            let after = &l[from..];
            let changes = after
                .iter()
                .filter(|(_, _, e)| matches!(e, CampaignEvent::Elected { .. } | CampaignEvent::Lost { .. }))
                .count();
            let mut started = std::collections::HashMap::new();
            let mut jeopardy = Vec::new();
            let mut last_safe = t0;
            for (at, app, e) in after {
                match e {
                    CampaignEvent::Jeopardy { .. } => {
                        started.insert(*app, *at);
                    }
                    CampaignEvent::Safe { .. } => {
                        if let Some(s) = started.remove(app) {
                            jeopardy.push(at.duration_since(s).as_secs_f64() * 1e3);
                        }
                        last_safe = last_safe.max(*at);
                    }
                    _ => {}
                }
            }
            let same_terms = apps
                .iter()
                .zip(terms)
                .filter(|((_, c), t)| c.is_leader() && c.state().borrow().term == **t)
                .count();
            let starts: Vec<Instant> = after
                .iter()
                .filter(|(_, _, e)| matches!(e, CampaignEvent::Jeopardy { .. }))
                .map(|(at, _, _)| *at)
                .collect();
            let first_safe = after
                .iter()
                .find(|(_, _, e)| matches!(e, CampaignEvent::Safe { .. }))
                .map(|(at, _, _)| *at);
            let ms = |a: Instant, b: Instant| b.saturating_duration_since(a).as_secs_f64() * 1e3;
            let mut row = summary(
                name,
                jeopardy,
                "0 leadership changes; surge: jeopardy p99 <= 50 ms",
            );
            if let (Some(first), Some(last), Some(safe)) = (starts.first(), starts.last(), first_safe) {
                row["jeopardies_began_within_ms"] = json!(ms(*first, *last));
                row["first_safe_after_first_jeopardy_ms"] = json!(ms(*first, safe));
                row["first_jeopardy_after_event_ms"] = json!(ms(t0, *first));
            }
            row["leadership_changes"] = json!(changes);
            row["same_leader_same_term"] = json!(format!("{same_terms}/{elections}"));
            row["lease_holder_or_term_changed"] = json!(moved);
            row["all_safe_after_ms"] = json!(last_safe.duration_since(t0).as_secs_f64() * 1e3);
            row
        }
    };

    // kill -9, then restart at once.
    let from = log.lock().unwrap().len();
    let t0 = Instant::now();
    broker.kill()?;
    broker.wait()?;
    broker = spawn(false)?;
    let mut rows = vec![settle("restart: kill -9 + restart", from, t0).await];

    // Surge upgrade: the successor takes the socket over while the old broker runs.
    let from = log.lock().unwrap().len();
    let t0 = Instant::now();
    let mut successor = spawn(true)?;
    rows.push(settle("restart: surge upgrade (--takeover)", from, t0).await);

    // Rollback: the new release crashes (kill -9) while the old broker still runs; the old
    // broker takes the socket path back and the apps resume there.
    let from = log.lock().unwrap().len();
    let t0 = Instant::now();
    successor.kill()?;
    successor.wait()?;
    rows.push(settle("restart: rollback (new broker killed -9)", from, t0).await);
    drop(apps);
    // The old broker is stopped as the DaemonSet would (SIGTERM; handoff releases nothing).
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(broker.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    broker.wait()?;
    Ok(rows)
}

/// Child processes killed when dropped (a failed bench leaves no brokers behind).
struct Children(Vec<std::process::Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

fn spread(v: &[f64]) -> Value {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    json!({"mean": mean(v), "min": min, "max": max})
}

/// `bench cluster`: both layouts, one after the other, each on a fresh test API server.
async fn cluster(brokers: usize, per_broker: usize, seconds: u64) -> anyhow::Result<Vec<Value>> {
    anyhow::ensure!(brokers >= 3, "elections need 3 distinct brokers");
    let mut rows = Vec::new();
    for namespaces in [1, 10] {
        rows.push(cluster_layout(brokers, per_broker, namespaces, seconds).await?);
    }
    Ok(rows)
}

/// `brokers` shipped electord processes (defaults: lease 15 s, retry 2 s), each its own API
/// user, on one test API server. Election `j` (of `brokers × per_broker / 3`) lives in namespace
/// `j mod namespaces` and has one candidate on each of brokers `j`, `j+1`, `j+2` (mod brokers).
/// After every election has a leader and a settling pause, the API server's request log and
/// per-watch event counts over `seconds` give the cost; each watch event is attributed to its
/// broker and split by whether the broker has a candidate in that object's election.
async fn cluster_layout(
    brokers: usize,
    per_broker: usize,
    namespaces: usize,
    seconds: u64,
) -> anyhow::Result<Value> {
    let server = TestApiServer::start().await?;
    for s in 0..namespaces {
        server.create_namespace(&format!("bench-{s}"), &[]).await?;
    }
    let dir = tempfile::tempdir()?;
    let electord = elector_tests::workspace_bin("elector-broker", "electord");
    let mut children = Children(Vec::new());
    let mut sockets = Vec::new();
    for b in 0..brokers {
        let node = format!("node-{b}");
        let user = server.add_user(&node, vec![elector_tests::kube_api::Rule::all()]);
        let socket = dir.path().join(format!("{node}.sock"));
        children.0.push(
            std::process::Command::new(&electord)
                .arg("--kubeconfig")
                .arg(server.kubeconfig_path(&user))
                .args(["--node-name", &node, "--http-addr", "", "--attest", "none"])
                .arg("--socket")
                .arg(&socket)
                .env("RUST_LOG", "error")
                .stdout(std::process::Stdio::null())
                .spawn()?,
        );
        sockets.push(socket);
    }
    for s in &sockets {
        wait_for_socket(s).await?;
    }
    let elections = brokers * per_broker / 3;
    // (namespace, name) of each election, and the brokers with a candidate in it.
    let layout: Vec<(String, String, [usize; 3])> = (0..elections)
        .map(|j| {
            (
                format!("bench-{}", j % namespaces),
                format!("cluster-{j}"),
                [j % brokers, (j + 1) % brokers, (j + 2) % brokers],
            )
        })
        .collect();
    let mut apps = Vec::with_capacity(elections * 3);
    for (ns, name, on) in &layout {
        for (c, b) in on.iter().enumerate() {
            let client = Client::connect(&sockets[*b]).await?;
            let campaign = client
                .campaign(CampaignOptions::new(name.clone(), format!("{name}-app{c}")).namespace(ns.clone()))
                .await?;
            apps.push((client, campaign));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while apps.iter().filter(|(_, c)| c.is_leader()).count() < elections {
        anyhow::ensure!(Instant::now() < deadline, "not every election got a leader");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    server.clear_requests();
    server.reset_watch_stats();
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let (log, watches) = (server.requests(), server.watch_stats());
    let secs = t.elapsed().as_secs_f64();
    let rss: Vec<f64> = children
        .0
        .iter()
        .map(|c| rss_kib(c.id()).unwrap_or(0) as f64 / 1024.0)
        .collect();
    drop(apps);
    drop(children);

    let writes = log.iter().filter(|r| r.is_write()).count() as f64;
    let reads = log.iter().filter(|r| r.verb == "get" || r.verb == "list").count() as f64;
    let watch_starts = log.iter().filter(|r| r.verb == "watch").count();
    let mine: std::collections::HashSet<(usize, &str, &str)> = layout
        .iter()
        .flat_map(|(ns, name, on)| on.iter().map(move |b| (*b, ns.as_str(), name.as_str())))
        .collect();
    let (mut own, mut discarded) = (vec![0f64; brokers], vec![0f64; brokers]);
    let mut total = 0u64;
    for w in &watches {
        total += w.events;
        let Some(b) = w.user.strip_prefix("node-").and_then(|b| b.parse::<usize>().ok()) else {
            continue;
        };
        let ns = w.namespace.as_deref().unwrap_or_default();
        for (name, n) in &w.events_by_name {
            if mine.contains(&(b, ns, name.as_str())) {
                own[b] += *n as f64 / secs;
            } else {
                discarded[b] += *n as f64 / secs;
            }
        }
    }
    let per_broker_total: Vec<f64> = own.iter().zip(&discarded).map(|(a, b)| a + b).collect();
    let open = watches.iter().filter(|w| w.open).count();
    let by_selector = watches
        .iter()
        .filter(|w| w.open && w.field_selector.is_some())
        .count();
    let retry = 2.0;
    let (m, k) = (elections as f64, 3.0);
    Ok(json!({
        "scenario": format!("cluster: {brokers} brokers, {elections} elections x 3, {namespaces} namespace(s)"),
        "seconds": secs,
        "writes_per_s": writes / secs,
        "reads_per_s": reads / secs,
        "watch_requests_in_window": watch_starts,
        "open_watches": open,
        "open_watches_by_name": by_selector,
        "watch_events_per_s": total as f64 / secs,
        "per_broker_events_per_s": spread(&per_broker_total),
        "per_broker_own_events_per_s": spread(&own),
        "per_broker_discarded_events_per_s": spread(&discarded),
        "broker_rss_mib": spread(&rss),
        "client_go_requests_per_s": m * 2.0 / retry + (m * k - m) / (2.2 * retry),
        "client_go_writes_per_s": m / retry,
        "target": "-",
    }))
}

fn free_local_addr() -> anyhow::Result<std::net::SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// The socket's ping round trip on an open connection, in ms.
async fn ping_ms(raw: &mut RawClient) -> anyhow::Result<f64> {
    let t = Instant::now();
    raw.try_send(&json!({"op":"ping","id":"canary"})).await?;
    raw.try_until("pong").await?;
    Ok(t.elapsed().as_secs_f64() * 1e3)
}

/// A `/elections` reader that reads the first KiB and then stops reading, holding the
/// connection: the HTTP status it got (0: none), and the connection.
async fn slow_reader(addr: std::net::SocketAddr) -> (u16, Option<tokio::net::TcpStream>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return (0, None);
    };
    if s.write_all(b"GET /elections HTTP/1.1\r\nHost: bench\r\n\r\n")
        .await
        .is_err()
    {
        return (0, None);
    }
    let mut buf = vec![0u8; 1024];
    let n = match tokio::time::timeout(Duration::from_secs(30), s.read(&mut buf)).await {
        Ok(Ok(n)) => n,
        _ => 0,
    };
    let status = std::str::from_utf8(&buf[..n])
        .ok()
        .and_then(|t| t.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0);
    (status, Some(s))
}

/// Whether the server closed `s` (EOF or reset), reading whatever it still sends.
async fn server_closed(s: &mut tokio::net::TcpStream) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match tokio::time::timeout(Duration::from_millis(20), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
            Err(_) => return false,
        }
    }
}

type Round = (usize, usize, usize, f64, f64, f64, Vec<f64>);

/// One round of `readers` slow `/elections` readers: (served, refused, closed by the broker,
/// peak RSS, RSS while held, RSS 3 s after they closed, ping times during) in MiB and ms.
async fn slow_readers_round(
    pid: u32,
    http: std::net::SocketAddr,
    readers: usize,
    canary: &mut RawClient,
) -> anyhow::Result<Round> {
    let mib = |kib: Option<u64>| kib.unwrap_or(0) as f64 / 1024.0;
    let started = Instant::now();
    let slow: Vec<_> = futures::future::join_all((0..readers).map(|_| slow_reader(http))).await;
    let ok = slow.iter().filter(|(s, _)| *s == 200).count();
    let busy = slow.iter().filter(|(s, _)| *s == 503).count();
    let mut conns: Vec<_> = slow.into_iter().filter_map(|(_, c)| c).collect();
    let mut peak = 0f64;
    let mut ping_during = Vec::new();
    while started.elapsed() < Duration::from_secs(5) {
        peak = peak.max(mib(rss_kib(pid)));
        ping_during.push(ping_ms(canary).await?);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    ping_during.sort_by(|a, b| a.total_cmp(b));
    // Past the write timeout (10 s): the broker closed the readers that stopped reading.
    tokio::time::sleep(Duration::from_secs(12).saturating_sub(started.elapsed())).await;
    let mut closed = 0;
    for c in &mut conns {
        if server_closed(c).await {
            closed += 1;
        }
    }
    let held_rss = mib(rss_kib(pid));
    drop(conns);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = mib(rss_kib(pid));

    Ok((ok, busy, closed, peak, held_rss, after, ping_during))
}

async fn http_load(elections: usize, readers: usize, shim_idle: usize) -> anyhow::Result<Vec<Value>> {
    // The bench itself holds thousands of connections.
    elector_broker::daemon::FdBudget::raise_nofile_limit();
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("elector.sock");
    let http = free_local_addr()?;
    let mut child = spawn_self(&[
        "serve-http-broker",
        socket.to_str().context("path")?,
        &http.to_string(),
    ])?;
    wait_for_socket(&socket).await?;
    let pid = child.id();
    let mib = |kib: Option<u64>| kib.unwrap_or(0) as f64 / 1024.0;
    let idle_rss = mib(rss_kib(pid));
    // `elections` elections, 250 per connection (the per-connection limit is 256).
    let mut holders = Vec::new();
    for chunk in (0..elections).collect::<Vec<_>>().chunks(250) {
        let mut raw = RawClient::try_open(&socket).await?;
        for i in chunk {
            raw.try_send(&json!({"op":"campaign","id":i,"election":format!("bench-{i}"),"identity":format!("pod-{i}")}))
                .await?;
        }
        for _ in chunk {
            raw.try_until("ok").await?;
        }
        holders.push(raw);
    }
    let mut canary = RawClient::try_open(&socket).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let baseline = mib(rss_kib(pid));
    let ping_before = ping_ms(&mut canary).await?;

    // Three rounds of slow readers: memory must come back after each, not grow between them.
    let mut rounds = Vec::new();
    for _ in 0..3 {
        rounds.push(slow_readers_round(pid, http, readers, &mut canary).await?);
    }
    let (ok, busy, closed, peak, held_rss, after, ping_during) = rounds[0].clone();
    let after_rounds: Vec<f64> = rounds.iter().map(|r| r.5).collect();
    let ping_after = ping_ms(&mut canary).await?;

    // The shim: idle connections on its port.
    let shim_http = free_local_addr()?;
    let mut shim = spawn_self(&[
        "serve-http-shim",
        socket.to_str().context("path")?,
        &shim_http.to_string(),
    ])?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let shim_pid = shim.id();
    let shim_before = mib(rss_kib(shim_pid));
    let opened = futures::future::join_all((0..shim_idle).map(|_| async move {
        tokio::time::timeout(Duration::from_secs(3), tokio::net::TcpStream::connect(shim_http))
            .await
            .ok()
            .and_then(Result::ok)
    }))
    .await;
    let mut idle: Vec<_> = opened.into_iter().flatten().collect();
    let shim_idle_open = idle.len();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let shim_during = mib(rss_kib(shim_pid));
    let shim_fds = std::fs::read_dir(format!("/proc/{shim_pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    // Past the header timeout (10 s): the shim closed every idle connection it accepted.
    tokio::time::sleep(Duration::from_secs(11)).await;
    let mut shim_closed = 0;
    for c in idle.iter_mut().take(1000) {
        if server_closed(c).await {
            shim_closed += 1;
        }
    }
    drop(idle);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let shim_after = mib(rss_kib(shim_pid));
    let _ = shim.kill();
    let _ = shim.wait();
    drop(holders);
    let _ = child.kill();
    let _ = child.wait();
    Ok(vec![
        json!({"scenario": format!("http: broker RSS, {elections} elections, {readers} slow /elections readers"),
               "idle_mib": idle_rss, "baseline_mib": baseline, "peak_mib": peak, "while_held_mib": held_rss,
               "after_mib": after, "after_rounds_2_3_mib": [after_rounds[1], after_rounds[2]], "target": "peak bounded (4 listings at once), after ~ baseline"}),
        json!({"scenario": "http: slow /elections readers",
               "served_200": ok, "refused_503": busy, "closed_by_broker_after_12s": closed,
               "target": "at most 4 served at once (a listing whose body fits in the socket buffers frees its slot early); non-readers closed after the 10 s write timeout"}),
        json!({"scenario": "http: socket ping during the /elections load",
               "before_ms": ping_before, "p50_during_ms": pct(&ping_during, 50.0),
               "max_during_ms": ping_during.last().copied().unwrap_or(f64::NAN), "after_ms": ping_after, "target": "-"}),
        json!({"scenario": format!("http: elector-shim RSS, {shim_idle} idle connections"),
               "before_mib": shim_before, "during_mib": shim_during, "after_mib": shim_after,
               "connected": shim_idle_open, "shim_fds_during": shim_fds,
               "closed_of_first_1000_after_11s": shim_closed,
               "target": "<= 256 accepted at once (the rest wait in the backlog), after ~ before"}),
    ])
}

fn print_table(rows: &[Value]) {
    for r in rows {
        let mut fields: Vec<String> = Vec::new();
        if let Some(o) = r.as_object() {
            for (k, v) in o {
                if k == "scenario" {
                    continue;
                }
                let v = match v {
                    Value::Number(n) if n.is_f64() => format!("{:.2}", n.as_f64().unwrap_or(0.0)),
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                fields.push(format!("{k}={v}"));
            }
        }
        println!(
            "{:<52} {}",
            r["scenario"].as_str().unwrap_or(""),
            fields.join("  ")
        );
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async {
        let rows = match args.scenario {
            Scenario::ServeHttpBroker { socket, http } => {
                let mut config = DaemonConfig::for_socket(&socket, "bench");
                config.limits.max_connections = 50_000;
                config.limits.max_connections_per_uid = 50_000;
                config.http_addr = Some(http);
                let d = Daemon::start_standalone(config).await?;
                tokio::signal::ctrl_c().await?;
                d.shutdown().await;
                return Ok(());
            }
            Scenario::ServeHttpShim { socket, http } => {
                let config = elector_broker::shim::ShimConfig {
                    election: "shim-bench".into(),
                    namespace: "default".into(),
                    id: "shim".into(),
                    ttl: Duration::from_secs(10),
                    socket,
                };
                let listener = tokio::net::TcpListener::bind(http).await?;
                elector_broker::shim::run(config, Some(listener), tokio_util::sync::CancellationToken::new())
                    .await?;
                return Ok(());
            }
            Scenario::Http {
                elections,
                readers,
                shim_idle,
            } => http_load(elections, readers, shim_idle).await?,
            Scenario::Failover { trials } => failover(trials).await?,
            Scenario::ApiLoad { elections, seconds } => api_load(elections, seconds).await?,
            Scenario::Scale {
                clients,
                observers,
                rounds,
            } => scale(clients, observers, rounds).await?,
            Scenario::Protocol => protocol().await?,
            Scenario::Restart { elections } => restart(elections).await?,
            Scenario::Cluster {
                brokers,
                elections_per_broker,
                seconds,
            } => cluster(brokers, elections_per_broker, seconds).await?,
            Scenario::All => {
                let mut rows = failover(30).await?;
                rows.extend(api_load(100, 20).await?);
                rows.extend(scale(10_000, 1_000, 50).await?);
                rows.extend(protocol().await?);
                rows.extend(restart(1_000).await?);
                rows.extend(cluster(30, 6, 20).await?);
                rows
            }
        };
        if args.json {
            println!("{}", serde_json::to_string_pretty(&rows)?);
        } else {
            print_table(&rows);
        }
        Ok(())
    })
}
