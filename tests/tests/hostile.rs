//! Hostile and careless load on one node (issue 20): a broker and a shim keep serving the
//! election socket whatever HTTP clients, pipelining clients or a low open-file limit do.
//! Through the real socket and HTTP ports; as processes where the process matters (file
//! descriptor limits, the shim's timeouts).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use elector_broker::daemon::{Daemon, DaemonConfig};
use elector_tests::RawClient;
use elector_tests::workspace_bin;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// A standalone `electord` process, optionally under `prlimit --nofile=N:N`, its log collected.
struct Electord {
    child: Child,
    socket: PathBuf,
    http: Option<SocketAddr>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Electord {
    fn start(dir: &Path, nofile: Option<u64>, args: &[&str]) -> Electord {
        let socket = dir.join("elector.sock");
        let electord = workspace_bin("elector-broker", "electord");
        let mut cmd = match nofile {
            Some(n) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={n}:{n}")).arg(&electord);
                c
            }
            None => Command::new(&electord),
        };
        let mut child = cmd
            .args(["--standalone", "--log", "info", "--log-format", "text"])
            .args(args)
            .arg("--socket")
            .arg(&socket)
            .env_remove("ELECTOR_HTTP_ADDR")
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("electord starts");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let lines = log.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                let http = line
                    .strip_prefix("electord: node")
                    .and_then(|l| l.split(", http ").nth(1))
                    .and_then(|a| a.trim().parse::<SocketAddr>().ok());
                let serving = line.contains("electord serving");
                lines.lock().unwrap().push(line);
                if serving || http.is_some() {
                    let _ = tx.send(http);
                }
            }
        });
        let wants_http = args.windows(2).any(|w| w[0] == "--http-addr" && !w[1].is_empty());
        let (mut http, mut serving) = (None, false);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !serving || (wants_http && http.is_none()) {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(Some(a)) => http = Some(a),
                Ok(None) => serving = true,
                Err(_) => {}
            }
            assert!(
                Instant::now() < deadline,
                "electord did not start: {:?}",
                log.lock().unwrap()
            );
        }
        Electord {
            child,
            socket,
            http,
            log,
        }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

impl Drop for Electord {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Connects to the socket: `Ok(hello)` or the first event if it is not one (an error), `Err`
/// when nothing came within `limit` (a hang).
async fn greeting(socket: &Path, limit: Duration) -> Result<(Value, tokio::net::UnixStream), String> {
    let attempt = async {
        let s = tokio::net::UnixStream::connect(socket)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let mut r = BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line).await.map_err(|e| format!("read: {e}"))?;
        let v: Value = serde_json::from_str(&line).map_err(|e| format!("{e}: {line:?}"))?;
        Ok((v, r.into_inner()))
    };
    tokio::time::timeout(limit, attempt)
        .await
        .map_err(|_| "no greeting: the broker left the client hanging".to_string())?
}

/// Campaigns on a fresh connection and waits for `elected`.
async fn campaign_and_win(socket: &Path, election: &str) {
    let mut c = RawClient::open(socket).await;
    c.send(json!({"op":"campaign","id":1,"election":election,"identity":"canary"}))
        .await;
    assert_eq!(c.until("ok").await["id"], 1);
    c.until("elected").await;
}

/// Whether the peer closed `s` within `limit` (EOF or reset on read).
fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
    s.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 4096];
    let start = Instant::now();
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return false;
            }
            Err(_) => return true,
        }
        if start.elapsed() > limit {
            return false;
        }
    }
}

/// A free local port (for the shim, which does not print the one it bound).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A GET on a fresh connection: the status line's code, or `None` when nothing came within `limit`.
fn get_status(addr: SocketAddr, path: &str, limit: Duration) -> Option<u16> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(limit)).unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .ok()?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).ok()?;
    std::str::from_utf8(&buf[..n])
        .ok()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// With a low open-file limit, HTTP connections up to (and beyond) the HTTP cap cannot take the
/// election socket's descriptors: a new socket client still gets its greeting and can campaign,
/// the process never runs out of descriptors, and HTTP is served again once the idle ones time
/// out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_connections_cannot_starve_the_election_socket() {
    let dir = tempfile::tempdir().unwrap();
    // 300 descriptors: 64 reserved, HTTP at most (300 - 64) / 8 = 29, the socket the rest.
    let broker = Electord::start(
        dir.path(),
        Some(300),
        &["--http-addr", "127.0.0.1:0", "--http-timeout", "3"],
    );
    let http = broker.http.expect("HTTP address");
    assert!(
        broker.log().contains("http_max_connections=29"),
        "the clamp is logged: {}",
        broker.log()
    );
    // 150 idle HTTP connections: five times HTTP's share, more than the kernel's backlog (128)
    // holds beyond the 29 served.
    let mut idle = Vec::new();
    for _ in 0..150 {
        idle.push(TcpStream::connect(http).expect("the kernel's backlog takes them"));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fds = broker.open_fds();
    assert!(
        fds < 300 - 100,
        "HTTP holds at most its share: {fds} descriptors open"
    );
    // A new socket client: greeted, and it can campaign.
    campaign_and_win(&broker.socket, "canary").await;
    // More socket clients than HTTP could ever leave room for, all greeted.
    let mut clients = Vec::new();
    for _ in 0..150 {
        let (hello, stream) = greeting(&broker.socket, Duration::from_secs(10)).await.unwrap();
        assert_eq!(hello["event"], "hello", "{hello}");
        clients.push(stream);
    }
    assert!(
        !broker.log().contains("Too many open files"),
        "never out of descriptors: {}",
        broker.log()
    );
    // The idle connections time out (3 s), the backlog drains, and HTTP answers again.
    drop(idle);
    let deadline = Instant::now() + Duration::from_secs(30);
    while get_status(http, "/healthz", Duration::from_secs(2)) != Some(200) {
        assert!(
            Instant::now() < deadline,
            "HTTP serves again once the load is gone"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `ulimit -n` below `--max-connections`: the broker raises the soft limit to the hard one,
/// clamps `--max-connections` to what fits and says so, and clients beyond the budget get
/// `too_many_connections` at once instead of hanging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_beyond_the_fd_budget_get_too_many_connections_not_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    // 200 descriptors and no HTTP: 200 - 64 = 136 socket clients.
    let broker = Electord::start(dir.path(), Some(200), &["--http-addr", ""]);
    assert!(
        broker.log().contains("max_connections=136") && broker.log().contains("clamped"),
        "the clamp is logged: {}",
        broker.log()
    );
    let (mut greeted, refused) = connect_many(&broker.socket, 260).await;
    assert_eq!(greeted.len(), 136, "exactly the budget is served");
    assert_eq!(refused, 260 - 136);
    // Room again once some leave.
    greeted.truncate(100);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (first, _s) = greeting(&broker.socket, Duration::from_secs(10)).await.unwrap();
        if first["event"] == "hello" {
            break;
        }
        assert!(Instant::now() < deadline, "{first}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    campaign_and_win(&broker.socket, "after-the-flood").await;
}

/// Opens `n` connections one after another: those greeted (kept open) and how many were refused
/// with `too_many_connections` (anything else fails the test).
async fn connect_many(socket: &Path, n: usize) -> (Vec<tokio::net::UnixStream>, usize) {
    let mut greeted = Vec::new();
    let mut refused = 0;
    for i in 0..n {
        let (first, stream) = greeting(socket, Duration::from_secs(10))
            .await
            .unwrap_or_else(|e| panic!("client {i}: {e}"));
        match first["event"].as_str() {
            Some("hello") => greeted.push(stream),
            Some("error") => {
                assert_eq!(first["code"], "too_many_connections", "{first}");
                refused += 1;
            }
            _ => panic!("client {i}: {first}"),
        }
    }
    (greeted, refused)
}

/// A broker that runs out of descriptors anyway (its limit lowered under it, so the budget it
/// planned at start no longer holds): each waiting client is accepted on the spare descriptor
/// and told `too_many_connections`, none is left hanging, and the broker does not spin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_waiting_clients_are_refused_not_left_hanging() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Electord::start(dir.path(), None, &["--http-addr", ""]);
    let pid = broker.child.id();
    let limit = broker.open_fds() + 8;
    let status = Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={limit}:{limit}"))
        .status()
        .unwrap();
    assert!(status.success(), "prlimit --pid");
    let (greeted, refused) = connect_many(&broker.socket, 40).await;
    // About 8 fit under the new limit (one more while the spare is free).
    assert!(greeted.len() <= 12, "{} greeted", greeted.len());
    assert!(refused >= 28, "{refused} refused");
    assert_eq!(greeted.len() + refused, 40);
    // The log is read on another thread: give it time on a loaded machine.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !broker.log().contains("out of file descriptors") {
        assert!(Instant::now() < deadline, "{}", broker.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The ones served are served well, and the broker recovers when descriptors free up.
    drop(greeted);
    tokio::time::sleep(Duration::from_millis(200)).await;
    campaign_and_win(&broker.socket, "after-emfile").await;
}

/// 100,000 pings pipelined in one write: every pong arrives, in order; the connection is not
/// cut off as a slow consumer, because the broker stops reading while the replies wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_pipelined_pings_are_all_answered() {
    const PINGS: u64 = 100_000;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("elector.sock");
    let daemon = Daemon::start_standalone(DaemonConfig::for_socket(&path, "n"))
        .await
        .unwrap();
    let stream = tokio::net::UnixStream::connect(&path).await.unwrap();
    let (r, mut w) = stream.into_split();
    let mut batch = Vec::new();
    for i in 0..PINGS {
        batch.extend_from_slice(format!("{{\"op\":\"ping\",\"id\":{i}}}\n").as_bytes());
    }
    let writer = tokio::spawn(async move {
        w.write_all(&batch).await.expect("one write of every ping");
        w
    });
    let mut lines = BufReader::new(r).lines();
    let hello = lines.next_line().await.unwrap().unwrap();
    assert!(hello.contains("\"hello\""), "{hello}");
    let reading = async {
        for i in 0..PINGS {
            let line = lines
                .next_line()
                .await
                .unwrap()
                .unwrap_or_else(|| panic!("EOF after {i} pongs"));
            let v: Value = serde_json::from_str(&line).unwrap();
            assert_eq!(
                (v["event"].as_str(), v["id"].as_u64()),
                (Some("pong"), Some(i)),
                "{v}"
            );
        }
    };
    tokio::time::timeout(Duration::from_secs(120), reading)
        .await
        .expect("every pong within the time limit");
    let mut w = writer.await.unwrap();
    w.write_all(b"{\"op\":\"ping\",\"id\":\"last\"}\n").await.unwrap();
    let last: Value = serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
    assert_eq!(last["id"], "last", "the connection is still usable");
    daemon.shutdown().await;
}

/// Ids come back exactly or not at all; a key given twice is refused, never "last one wins".
#[tokio::test]
async fn big_ids_and_duplicate_keys_are_refused_not_guessed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("elector.sock");
    let daemon = Daemon::start_standalone(DaemonConfig::for_socket(&path, "n"))
        .await
        .unwrap();
    let mut c = RawClient::open(&path).await;
    // 2^64 would come back as 1.8446744073709552e19: refused, saying how to send it.
    c.send_raw(b"{\"op\":\"ping\",\"id\":18446744073709551616}\n")
        .await;
    let e = c.next().await.unwrap();
    assert_eq!(
        (e["event"].as_str(), e["code"].as_str()),
        (Some("error"), Some("invalid_request")),
        "{e}"
    );
    assert!(e["message"].as_str().unwrap().contains("as strings"), "{e}");
    for bad in ["1.5", "9007199254740992", "1e3"] {
        c.send_raw(format!("{{\"op\":\"ping\",\"id\":{bad}}}\n").as_bytes())
            .await;
        assert_eq!(c.next().await.unwrap()["code"], "invalid_request", "{bad}");
    }
    // The largest exact integer, and the big one as a string, come back byte for byte.
    c.send_raw(b"{\"op\":\"ping\",\"id\":9007199254740991}\n").await;
    c.send_raw(b"{\"op\":\"ping\",\"id\":\"18446744073709551616\"}\n")
        .await;
    let mut raw = Vec::new();
    for _ in 0..2 {
        let e = c.next().await.unwrap();
        assert_eq!(e["event"], "pong", "{e}");
        raw.push(e["id"].to_string());
    }
    assert_eq!(raw, ["9007199254740991", "\"18446744073709551616\""]);

    // `op` twice: a reader sees a ping, serde would have run a campaign. Refused, nothing runs.
    c.send_raw(b"{\"op\":\"ping\",\"op\":\"campaign\",\"election\":\"dup\",\"identity\":\"x\",\"id\":7}\n")
        .await;
    let e = c.next().await.unwrap();
    assert_eq!(e["code"], "invalid_request", "{e}");
    assert!(
        e["message"].as_str().unwrap().contains("duplicate key \"op\""),
        "{e}"
    );
    c.send_raw(b"{\"op\":\"campaign\",\"election\":\"dup\",\"identity\":\"a\",\"identity\":\"b\"}\n")
        .await;
    assert_eq!(c.next().await.unwrap()["code"], "invalid_request");
    c.send(json!({"op":"status","id":"s"})).await;
    let status = c.until("status").await;
    assert_eq!(status["campaigns"], json!([]), "nothing ran: {status}");
    daemon.shutdown().await;
}

/// The shim's HTTP port: idle, slowloris and kept-alive connections are closed after the
/// timeout, and the connection cap holds new ones back (in the backlog) instead of taking
/// descriptors, until the held ones are gone.
#[test]
fn the_shim_drops_idle_and_slowloris_connections_after_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut shim = Command::new(workspace_bin("elector-broker", "elector-shim"))
        .args(["--election", "example", "--id", "pod-a"])
        .args([
            "--http",
            &addr.to_string(),
            "--http-timeout",
            "1",
            "--http-max-connections",
            "4",
        ])
        .arg("--socket")
        .arg(dir.path().join("no-broker.sock"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while get_status(addr, "/", Duration::from_secs(1)).is_none() {
        assert!(Instant::now() < deadline, "the shim serves HTTP");
        std::thread::sleep(Duration::from_millis(50));
    }
    check_http_timeouts(addr);
    let _ = shim.kill();
    let _ = shim.wait();
}

/// The broker's HTTP port holds the same line.
#[test]
fn the_broker_drops_idle_and_slowloris_http_connections_after_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Electord::start(
        dir.path(),
        None,
        &[
            "--http-addr",
            "127.0.0.1:0",
            "--http-timeout",
            "1",
            "--http-max-connections",
            "4",
        ],
    );
    check_http_timeouts(broker.http.unwrap());
}

/// Idle, slowloris and kept-alive connections closed within the (1 s) timeout, and the
/// (4-connection) cap.
fn check_http_timeouts(addr: SocketAddr) {
    let limit = Duration::from_secs(10);
    // Idle: connected, sends nothing.
    let mut idle = TcpStream::connect(addr).unwrap();
    // Slowloris: a header that never ends, one byte every 200 ms.
    let mut slow = TcpStream::connect(addr).unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap();
    let mut dripping = slow.try_clone().unwrap();
    let drip = std::thread::spawn(move || {
        for _ in 0..50 {
            if dripping.write_all(b"X").is_err() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        false
    });
    // Kept alive after one answered request.
    let mut kept = TcpStream::connect(addr).unwrap();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut buf = [0u8; 512];
    kept.set_read_timeout(Some(limit)).unwrap();
    let n = kept.read(&mut buf).unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 "),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    // A fourth fills the cap; a fifth waits in the backlog, unanswered.
    let _fourth = TcpStream::connect(addr).unwrap();
    let start = Instant::now();
    assert!(closed_within(&mut idle, limit), "idle connection dropped");
    assert!(closed_within(&mut kept, limit), "kept-alive connection dropped");
    assert!(closed_within(&mut slow, limit), "slowloris connection dropped");
    assert!(drip.join().unwrap(), "the slowloris header was cut off");
    assert!(start.elapsed() < Duration::from_secs(8), "{:?}", start.elapsed());
    // Once they are gone, new connections are served.
    assert!(get_status(addr, "/healthz", limit).is_some(), "served again");
}
