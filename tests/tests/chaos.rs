//! Chaos with an oracle: 3 brokers × 2 candidates each × 2 elections (Lease and Endpoints)
//! against the test API server, under a seeded schedule of per-broker partitions, latency
//! spikes, 5xx/429 bursts, watch cuts, broker kills and restarts and rolling upgrades (a
//! successor takes the socket over while the old broker runs, which hands off; leaders ride both
//! out in jeopardy and resume, protocol 1.1), and client kills and
//! reconnects. The brokers' wall clocks are skewed apart by up to an hour (the timestamps they
//! write into lock records disagree), and slow readers (raw socket clients that read one line
//! now and then) campaign and observe alongside.
//!
//! The oracle, from the events every client received on one clock:
//! - never two clients holding `elected` without a `lost` in between, per election;
//! - terms strictly increase per election;
//! - after the faults heal, every client converges on the same leader within a bound.
//!
//! A slow reader learns late by definition (the broker's promise is about when it sends), so
//! its events are checked on their own: `elected` and `lost` alternate, terms grow, and once it
//! catches up it agrees with everyone else.
//!
//! `ELECTOR_CHAOS_SECONDS` (default 20) sets the length; `ELECTOR_CHAOS_SEED` replays a run (the
//! seed is printed, and named in every failure).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use elector_broker::registry::Defaults;
use elector_client::protocol::{LockKind, Timing};
use elector_client::{Campaign, CampaignEvent, CampaignOptions, Client};
use elector_tests::harness::{TestBroker, fast_timing};
use elector_tests::kube_api::{InjectedError, TestApiServer, User};
use futures::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::time::Instant;

const ELECTIONS: [(&str, LockKind); 2] = [
    ("chaos-lease", LockKind::Lease),
    ("chaos-endpoints", LockKind::Endpoints),
];
/// Lease 3 s, renew deadline 1.5 s: a 1.5 s margin between a leader's deadline and anyone
/// else's takeover, so that a scheduling stall on a loaded 2-core CI machine is not mistaken for
/// a protocol fault (`.config/nextest.toml` also runs this test alone). With a 0.5 s margin
/// this suite found a real bug: the driver did not wake at the renew deadline while a delayed
/// renewal was in flight (regression test: `election.rs`,
/// `lost_at_the_deadline_even_while_a_delayed_renewal_hangs`).
const TIMING: Timing = Timing {
    lease_duration: Some(3),
    renew_deadline: Some(1.5),
    retry_period: Some(0.25),
};

type Journal = Arc<Mutex<Vec<(Instant, String, String, CampaignEvent)>>>;

struct Candidate {
    election: &'static str,
    who: String,
    campaign: Campaign,
    _client: Client,
}

async fn join(
    socket: &std::path::Path,
    election: &'static str,
    lock: LockKind,
    who: &str,
    journal: &Journal,
) -> Option<Candidate> {
    let client = Client::connect(socket).await.ok()?;
    let mut campaign = client
        .campaign(
            CampaignOptions::new(election, who)
                .namespace("chaos")
                .lock(lock)
                .timing(TIMING),
        )
        .await
        .ok()?;
    let mut events = campaign.events();
    let (journal, who2) = (journal.clone(), who.to_string());
    tokio::spawn(async move {
        while let Some(e) = events.next().await {
            journal
                .lock()
                .unwrap()
                .push((Instant::now(), election.to_string(), who2.clone(), e));
        }
    });
    Some(Candidate {
        election,
        who: who.to_string(),
        campaign,
        _client: client,
    })
}

/// Kills a broker off the async workers: joining its thread must not stall the test runtime
/// (which also runs the API server and timestamps every client event).
async fn kill(b: TestBroker) {
    tokio::task::spawn_blocking(move || b.kill()).await.unwrap();
}

/// Starts a node's broker as the same API user (and with the same wall clock), off the async
/// workers: a restart after a kill, or with `takeover` a rolling upgrade (DaemonSet surge): the
/// successor binds a fresh socket and renames it over the path while the old broker runs; the
/// old one sees it, moves its clients there in turns (`jeopardy`, nothing released,
/// `reconnect`) and lives on until shut down, taking the path back if the successor dies.
async fn start(
    server: &TestApiServer,
    user: &User,
    node: &str,
    dir: &std::path::Path,
    settings: Defaults,
    takeover: bool,
) -> TestBroker {
    let (kubeconfig, node, dir) = (server.kubeconfig_path(user), node.to_string(), dir.to_path_buf());
    tokio::task::spawn_blocking(move || {
        TestBroker::start_configured(
            &node,
            &dir,
            elector_tests::harness::Backend::Kube(kubeconfig),
            settings,
            true,
            None,
            |c| c.socket.takeover = takeover,
        )
    })
    .await
    .unwrap()
}

/// A client that reads one line now and then, as a stalled app would: a raw socket, so nothing
/// reads on its behalf. It reconnects (and campaigns or observes again) when its connection ends.
struct SlowReader {
    election: &'static str,
    who: String,
    /// Every line it read, in order, and `{"event":"disconnected"}` when its connection ended.
    log: Arc<Mutex<Vec<Value>>>,
    /// Set at the end: read without pausing, to catch up.
    hurry: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl SlowReader {
    fn start(
        socket: PathBuf,
        election: &'static str,
        lock: LockKind,
        who: Option<String>,
        seed: u64,
    ) -> Self {
        let log: Arc<Mutex<Vec<Value>>> = Arc::default();
        let hurry: Arc<AtomicBool> = Arc::default();
        let mut request = json!({"election": election, "namespace": "chaos", "lock": lock});
        match &who {
            Some(identity) => {
                request["op"] = json!("campaign");
                request["identity"] = json!(identity);
                request["timing"] = serde_json::to_value(TIMING).unwrap();
            }
            None => request["op"] = json!("observe"),
        }
        let (log2, hurry2) = (log.clone(), hurry.clone());
        let task = tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed);
            loop {
                if let Err(e) = Self::session(&socket, &request, &log2, &hurry2, &mut rng).await {
                    log2.lock()
                        .unwrap()
                        .push(json!({"event": "disconnected", "why": e.to_string()}));
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        });
        SlowReader {
            election,
            who: who.unwrap_or_else(|| "observer".into()),
            log,
            hurry,
            task,
        }
    }

    async fn session(
        socket: &Path,
        request: &Value,
        log: &Mutex<Vec<Value>>,
        hurry: &AtomicBool,
        rng: &mut StdRng,
    ) -> std::io::Result<()> {
        let (r, mut w) = tokio::net::UnixStream::connect(socket).await?.into_split();
        let mut line = serde_json::to_vec(request).unwrap();
        line.push(b'\n');
        w.write_all(&line).await?;
        let mut r = BufReader::new(r);
        loop {
            if !hurry.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(rng.random_range(50..1500))).await;
            }
            let mut line = String::new();
            if r.read_line(&mut line).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            let event: Value = serde_json::from_str(&line).map_err(std::io::Error::other)?;
            log.lock().unwrap().push(event);
        }
    }

    /// (holds the election, (leader, term) of its latest `leader` event), from what it read.
    fn state(&self) -> (bool, Option<(Value, Value)>) {
        let (mut holds, mut view) = (false, None);
        for e in self.log.lock().unwrap().iter() {
            match e["event"].as_str() {
                Some("elected") => holds = true,
                Some("lost") | Some("disconnected") => {
                    holds = false;
                    if e["event"] == "disconnected" {
                        view = None;
                    }
                }
                Some("leader") => view = Some((e["leader"].clone(), e["term"].clone())),
                _ => {}
            }
        }
        (holds, view)
    }

    /// Its own oracle: `elected` and `lost` alternate, elected terms grow, leader terms never go
    /// back within a connection, and no error but `slow_consumer`.
    fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let (mut holds, mut elected_term, mut leader_term) = (false, None, 0);
        for e in self.log.lock().unwrap().iter() {
            let term = e["term"].as_u64();
            match e["event"].as_str() {
                Some("elected") => {
                    if holds {
                        problems.push(format!("{}: elected twice without lost: {e}", self.who));
                    }
                    if term.is_none() || term <= elected_term {
                        problems.push(format!("{}: elected term went back: {e}", self.who));
                    }
                    holds = true;
                    elected_term = term;
                }
                Some("lost") => holds = false,
                Some("disconnected") => (holds, leader_term) = (false, 0),
                Some("leader") => {
                    if let Some(t) = term {
                        if t < leader_term {
                            problems.push(format!("{}: leader term went back: {e}", self.who));
                        }
                        leader_term = t;
                    }
                }
                Some("error") if e["code"] != "slow_consumer" => {
                    problems.push(format!("{}: {e}", self.who));
                }
                _ => {}
            }
        }
        problems
    }
}

impl Drop for SlowReader {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Checks the journal: one holder at a time, growing terms. Returns the violations.
fn oracle(journal: &Journal) -> Vec<String> {
    let mut events = journal.lock().unwrap().clone();
    events.sort_by_key(|e| e.0);
    // A leader in jeopardy leads until its guarantee at most: its `lost`, when the client's
    // timer reports it (late on a loaded machine), counts from `valid_until`.
    for i in 0..events.len() {
        let CampaignEvent::Jeopardy { valid_until, .. } = events[i].3 else {
            continue;
        };
        let (election, who) = (events[i].1.clone(), events[i].2.clone());
        if let Some(next) = events[i + 1..].iter_mut().find(|e| e.1 == election && e.2 == who)
            && matches!(next.3, CampaignEvent::Lost { .. })
            && next.0 > valid_until
        {
            next.0 = valid_until;
        }
    }
    events.sort_by_key(|e| e.0);
    let mut problems = Vec::new();
    let mut holders: HashMap<String, Vec<String>> = HashMap::new();
    let mut last_term: HashMap<String, u64> = HashMap::new();
    for (_, election, who, e) in events {
        let h = holders.entry(election.clone()).or_default();
        match e {
            CampaignEvent::Elected { term } => {
                if !h.is_empty() && !h.contains(&who) {
                    problems.push(format!(
                        "{election}: {who} elected (term {term}) while {h:?} held it"
                    ));
                }
                if let Some(t) = last_term.get(&election)
                    && term <= *t
                {
                    problems.push(format!("{election}: term went from {t} to {term} ({who})"));
                }
                last_term.insert(election.clone(), term);
                h.retain(|x| x != &who);
                h.push(who);
            }
            CampaignEvent::Lost { .. } => h.retain(|x| x != &who),
            // In jeopardy a leader goes on leading until its guarantee ends (then `Lost`, moved
            // to `valid_until` above) or a broker confirms it (`Safe`).
            CampaignEvent::Leader { .. } | CampaignEvent::Jeopardy { .. } | CampaignEvent::Safe { .. } => {}
        }
    }
    problems
}

fn timeline(journal: &Journal) -> String {
    let mut events = journal.lock().unwrap().clone();
    events.sort_by_key(|e| e.0);
    let t0 = events.first().map(|e| e.0);
    events
        .iter()
        .filter(|e| !matches!(e.3, CampaignEvent::Leader { .. }))
        .map(|(at, el, who, e)| {
            format!(
                "{:>8.3}s {el} {who} {e:?}",
                (*at - t0.unwrap_or(*at)).as_secs_f64()
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_never_elects_two_leaders() {
    let seconds: u64 = std::env::var("ELECTOR_CHAOS_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let seed: u64 = std::env::var("ELECTOR_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("chaos: seed {seed}, {seconds} s (replay with ELECTOR_CHAOS_SEED={seed})");
    // RUST_LOG=elector_broker=debug shows every broker's decisions, by thread (node).
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_thread_names(true)
        .with_test_writer()
        .try_init();
    let mut rng = StdRng::seed_from_u64(seed);
    let server = TestApiServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let journal: Journal = Arc::default();

    let nodes = ["node-a", "node-b", "node-c"];
    let mut brokers: Vec<Option<TestBroker>> = Vec::new();
    let mut users: Vec<User> = Vec::new();
    let mut settings: Vec<Defaults> = Vec::new();
    for n in nodes {
        // Each node's wall clock is off by up to an hour, either way.
        let skew = chrono::TimeDelta::seconds(rng.random_range(-3600..=3600));
        let s = Defaults {
            timing: fast_timing(),
            wall_clock_skew: skew,
        };
        let (b, u) = TestBroker::on_server(&server, n, dir.path(), s);
        println!("chaos: {n}: wall clock skewed by {skew}");
        brokers.push(Some(b));
        users.push(u);
        settings.push(s);
    }
    let socket = |i: usize| dir.path().join(format!("{}.sock", nodes[i]));
    let mut slow = Vec::new();
    for (election, lock) in ELECTIONS {
        for who in [Some(format!("slow-{election}")), None] {
            let node = rng.random_range(0..nodes.len());
            slow.push(SlowReader::start(socket(node), election, lock, who, rng.random()));
        }
    }
    let mut cands: Vec<Candidate> = Vec::new();
    let mut next_id = 0;
    for (i, node) in nodes.iter().enumerate() {
        for (election, lock) in ELECTIONS {
            for _ in 0..2 {
                next_id += 1;
                if let Some(c) = join(
                    &socket(i),
                    election,
                    lock,
                    &format!("{node}-c{next_id}"),
                    &journal,
                )
                .await
                {
                    cands.push(c);
                }
            }
        }
    }

    let end = Instant::now() + Duration::from_secs(seconds);
    let mut actions = Vec::new();
    // Per node, the broker last upgraded away: it moves its connections to the successor and
    // lives on (as a DaemonSet's old pod does until the new one is available), taking the
    // socket path back if the successor is killed meanwhile.
    let mut retired: Vec<Option<TestBroker>> = vec![None, None, None];
    let mut taken_back = 0;
    while Instant::now() < end {
        let i = rng.random_range(0..3);
        let user = &users[i];
        let action = rng.random_range(0..9);
        match action {
            0 => server.faults(user).partition(true),
            1 => server.faults(user).partition(false),
            2 => server
                .faults(user)
                .latency(Duration::from_millis(rng.random_range(50..600))),
            3 => server.faults(user).errors(
                0.5,
                if rng.random_bool(0.5) {
                    InjectedError::Internal
                } else {
                    InjectedError::TooManyRequests {
                        retry_after_seconds: 1,
                    }
                },
            ),
            4 => server.faults(user).cut_watches(),
            5 => {
                // Kill the broker (no release); restart it later. A broker upgraded away that
                // still lives takes the socket path back and serves the node meanwhile.
                if let Some(b) = brokers[i].take() {
                    kill(b).await;
                    brokers[i] = retired[i].take();
                    taken_back += usize::from(brokers[i].is_some());
                } else {
                    // `--takeover`, as the DaemonSet always runs it.
                    brokers[i] = Some(start(&server, user, nodes[i], dir.path(), settings[i], true).await);
                }
            }
            6 => {
                // Kill a client; a new one joins elsewhere.
                if !cands.is_empty() {
                    let k = rng.random_range(0..cands.len());
                    let dead = cands.remove(k);
                    let (election, who) = (dead.election.to_string(), dead.who.clone());
                    drop(dead);
                    // A killed process holds nothing from now on.
                    journal.lock().unwrap().push((
                        Instant::now(),
                        election,
                        who,
                        CampaignEvent::Lost {
                            term: 0,
                            reason: elector_client::protocol::LostReason::Disconnected,
                        },
                    ));
                }
                let (election, lock) = ELECTIONS[rng.random_range(0..2)];
                next_id += 1;
                if let Some(c) = join(
                    &socket(i),
                    election,
                    lock,
                    &format!("{}-c{next_id}", nodes[i]),
                    &journal,
                )
                .await
                {
                    cands.push(c);
                }
            }
            7 => {
                // Roll the node's broker: the successor takes over while the old one runs.
                if brokers[i].is_some() {
                    // The pod of the previous upgrade's old broker is deleted first (it hands
                    // off whatever it still serves).
                    if let Some(old) = retired[i].take() {
                        tokio::task::spawn_blocking(move || old.shutdown()).await.unwrap();
                    }
                    let new = start(&server, user, nodes[i], dir.path(), settings[i], true).await;
                    retired[i] = brokers[i].replace(new);
                }
            }
            _ => server.faults(user).clear(),
        }
        actions.push((i, action));
        tokio::time::sleep(Duration::from_millis(rng.random_range(50..500))).await;
    }

    // Heal everything and restart dead brokers.
    for (i, u) in users.iter().enumerate() {
        server.faults(u).clear();
        if brokers[i].is_none() {
            brokers[i] = Some(start(&server, u, nodes[i], dir.path(), settings[i], true).await);
        }
    }
    // Make sure every election has candidates on a live broker.
    for (election, lock) in ELECTIONS {
        next_id += 1;
        if let Some(c) = join(&socket(0), election, lock, &format!("final-c{next_id}"), &journal).await {
            cands.push(c);
        }
    }
    let mut problems = oracle(&journal);
    problems.extend(slow.iter().flat_map(SlowReader::problems));
    assert!(
        problems.is_empty(),
        "seed {seed}: {problems:#?}\nactions: {actions:?}\n{}",
        timeline(&journal)
    );

    // Converge: one leader per election, every candidate agrees on it and its term; slow
    // readers, once they catch up, too.
    for r in &slow {
        r.hurry.store(true, Ordering::Relaxed);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut ok = true;
        let mut report = Vec::new();
        for (election, _) in ELECTIONS {
            let mine: Vec<&Candidate> = cands.iter().filter(|c| c.election == election).collect();
            let mut leaders: Vec<&str> = mine
                .iter()
                .filter(|c| c.campaign.is_leader())
                .map(|c| c.who.as_str())
                .collect();
            let states: Vec<_> = mine.iter().map(|c| c.campaign.state().borrow().clone()).collect();
            let slow_states: Vec<_> = slow
                .iter()
                .filter(|r| r.election == election)
                .map(|r| (r.who.as_str(), r.state()))
                .collect();
            leaders.extend(
                slow_states
                    .iter()
                    .filter(|(_, (holds, _))| *holds)
                    .map(|(who, _)| *who),
            );
            let term = states.first().and_then(|s| s.term);
            let agreed = leaders.len() == 1
                && term.is_some()
                && states
                    .iter()
                    .all(|s| s.leader.as_deref() == Some(leaders[0]) && s.term == term)
                && slow_states.iter().all(|(_, (_, view))| {
                    view.as_ref()
                        .is_some_and(|(leader, t)| leader == leaders[0] && t.as_u64() == term)
                });
            ok &= agreed;
            report.push(format!(
                "{election}: leaders {leaders:?}, states {states:?}, slow readers {slow_states:?}"
            ));
        }
        if ok {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "seed {seed}: no convergence after healing:\n{}",
            report.join("\n")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut problems = oracle(&journal);
    problems.extend(slow.iter().flat_map(SlowReader::problems));
    assert!(problems.is_empty(), "seed {seed}: {problems:#?}");
    let elected = journal
        .lock()
        .unwrap()
        .iter()
        .filter(|e| matches!(e.3, CampaignEvent::Elected { .. }))
        .count();
    let slow_elected: usize = slow
        .iter()
        .map(|r| {
            r.log
                .lock()
                .unwrap()
                .iter()
                .filter(|e| e["event"] == "elected")
                .count()
        })
        .sum();
    println!(
        "chaos: seed {seed}: {} actions ({} broker kills/restarts, {} rolling upgrades, {taken_back} kills of a successor whose old broker took the socket back), {elected} elections won by clients and {slow_elected} by slow readers, no violation",
        actions.len(),
        actions.iter().filter(|a| a.1 == 5).count(),
        actions.iter().filter(|a| a.1 == 7).count(),
    );
}
