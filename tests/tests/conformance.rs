//! The shared client conformance scripts (`clients/conformance/*.json`, described in the README
//! there), run against the Rust client: a fake broker on a Unix socket plays each scripted
//! conversation while the script drives `elector_client`, and every event the client emits is
//! compared with the script's. The Python and Node.js clients run the same scripts, so all
//! three stay in step.
//!
//! A script may name the Rust client in `known_divergences`: then this runner requires the script
//! to fail (so that fixing the client is noticed and the marker removed).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use elector_client::clock::monotonic_now_ns;
use elector_client::protocol::LockKind;
use elector_client::{Campaign, CampaignEvent, CampaignOptions, Client, Error, EventStream, Observation};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinHandle;

/// Every wait of a script is bounded by this.
const STEP_TIMEOUT: Duration = Duration::from_secs(5);

/// How far a guarantee the client sends back (`"~$name"`) may be from the one it was given (the
/// Rust client holds it as an `Instant` and converts it back).
const NEAR_NS: u64 = 100_000_000;

fn scripts_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../clients/conformance")
}

/// What a finished call produced.
enum Outcome {
    Campaign(Campaign),
    Observation(Observation),
    Resigned,
}

struct Connection {
    lines: Lines<BufReader<OwnedReadHalf>>,
    writer: OwnedWriteHalf,
}

/// One script being played.
struct Player {
    listener: UnixListener,
    socket: PathBuf,
    connection: Option<Connection>,
    /// Connections a later `accept` replaced while the broker left them open.
    earlier: Vec<Connection>,
    connecting: Option<JoinHandle<Result<Client, Error>>>,
    client: Option<Client>,
    captures: HashMap<String, Value>,
    calls: HashMap<String, JoinHandle<Result<Outcome, Error>>>,
    campaigns: HashMap<String, Campaign>,
    /// Kept so that observations stay registered while the script runs.
    observations: HashMap<String, Observation>,
    events: HashMap<String, EventStream>,
}

fn normalize(event: CampaignEvent) -> Value {
    match event {
        CampaignEvent::Leader {
            leader,
            term,
            unknown,
        } => {
            let mut v = json!({"type": "leader", "leader": leader, "term": term});
            if let Some(why) = unknown {
                v["unknown"] = json!(why);
            }
            v
        }
        CampaignEvent::Elected { term } => json!({"type": "elected", "term": term}),
        CampaignEvent::Lost { term, reason } => {
            json!({"type": "lost", "term": term, "reason": reason.as_str()})
        }
        CampaignEvent::Jeopardy { term, .. } => json!({"type": "jeopardy", "term": term}),
        CampaignEvent::Safe { term } => json!({"type": "safe", "term": term}),
    }
}

fn str_field<'a>(v: &'a Value, key: &str) -> Result<&'a str, String> {
    v.get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("step needs a string field {key:?}: {v}"))
}

fn lock_of(v: &Value) -> Result<LockKind, String> {
    match v.get("lock").and_then(Value::as_str) {
        None | Some("lease") => Ok(LockKind::Lease),
        Some("endpoints") => Ok(LockKind::Endpoints),
        Some(other) => Err(format!("unknown lock {other:?}")),
    }
}

impl Player {
    fn substitute(&self, v: &Value) -> Result<Value, String> {
        Ok(match v {
            Value::String(s) if s.starts_with('$') => self
                .captures
                .get(&s[1..])
                .cloned()
                .ok_or_else(|| format!("nothing captured as {s:?}"))?,
            Value::Object(m) => Value::Object(
                m.iter()
                    .map(|(k, v)| Ok((k.clone(), self.substitute(v)?)))
                    .collect::<Result<_, String>>()?,
            ),
            Value::Array(a) => Value::Array(a.iter().map(|v| self.substitute(v)).collect::<Result<_, _>>()?),
            other => other.clone(),
        })
    }

    fn matches(&self, got: &Value, want: &Value) -> Result<bool, String> {
        match want.as_str().and_then(|w| w.strip_prefix('~')) {
            Some(name) => {
                let target = self.instant(name.trim_start_matches('$'))?;
                Ok(got.as_u64().is_some_and(|g| g.abs_diff(target) <= NEAR_NS))
            }
            None => Ok(got == want),
        }
    }

    /// A clock reading captured by a `clock` step.
    fn instant(&self, name: &str) -> Result<u64, String> {
        self.captures
            .get(name)
            .and_then(Value::as_u64)
            .ok_or_else(|| format!("{name} is not a clock reading"))
    }

    fn campaign(&self, handle: &str) -> Result<&Campaign, String> {
        self.campaigns
            .get(handle)
            .ok_or_else(|| format!("no campaign {handle:?}"))
    }

    async fn accept(&mut self) -> Result<(), String> {
        let (stream, _) = tokio::time::timeout(STEP_TIMEOUT, self.listener.accept())
            .await
            .map_err(|_| "the client did not connect".to_string())?
            .map_err(|e| format!("accept: {e}"))?;
        let (r, w) = UnixStream::into_split(stream);
        let replaced = self.connection.replace(Connection {
            lines: BufReader::new(r).lines(),
            writer: w,
        });
        self.earlier.extend(replaced);
        Ok(())
    }

    /// Each earlier connection ends (the client closed it) with no request first.
    async fn expect_closed(&mut self) -> Result<(), String> {
        if self.earlier.is_empty() {
            return Err("no earlier connection is open".to_string());
        }
        for mut conn in std::mem::take(&mut self.earlier) {
            match tokio::time::timeout(STEP_TIMEOUT, conn.lines.next_line()).await {
                Ok(Ok(None)) => {}
                Ok(Ok(Some(line))) => {
                    return Err(format!("the client sent {line} on its earlier connection"));
                }
                Ok(Err(e)) => return Err(format!("read of the earlier connection: {e}")),
                Err(_) => return Err("the client did not close its earlier connection".to_string()),
            }
        }
        Ok(())
    }

    fn connection(&mut self) -> Result<&mut Connection, String> {
        self.connection
            .as_mut()
            .ok_or_else(|| "no connection is open".to_string())
    }

    async fn client(&mut self) -> Result<Client, String> {
        if let Some(task) = self.connecting.take() {
            let client = tokio::time::timeout(STEP_TIMEOUT, task)
                .await
                .map_err(|_| "connect did not finish".to_string())?
                .map_err(|e| format!("connect task: {e}"))?
                .map_err(|e| format!("connect failed: {e}"))?;
            self.client = Some(client);
        }
        self.client
            .clone()
            .ok_or_else(|| "call before connect".to_string())
    }

    async fn call(&mut self, args: &Value) -> Result<(), String> {
        let handle = str_field(args, "handle")?.to_string();
        let task: JoinHandle<Result<Outcome, Error>> = match str_field(args, "op")? {
            "campaign" => {
                let client = self.client().await?;
                let mut options =
                    CampaignOptions::new(str_field(args, "election")?, str_field(args, "identity")?)
                        .lock(lock_of(args)?);
                if let Some(ns) = args.get("namespace").and_then(Value::as_str) {
                    options = options.namespace(ns);
                }
                tokio::spawn(async move { client.campaign(options).await.map(Outcome::Campaign) })
            }
            "observe" => {
                let client = self.client().await?;
                let election = str_field(args, "election")?.to_string();
                let namespace = args.get("namespace").and_then(Value::as_str).map(str::to_string);
                let lock = lock_of(args)?;
                tokio::spawn(async move {
                    client
                        .observe(&election, namespace.as_deref(), lock)
                        .await
                        .map(Outcome::Observation)
                })
            }
            "resign" => {
                let campaign = self
                    .campaigns
                    .remove(&handle)
                    .ok_or_else(|| format!("no campaign {handle:?} to resign"))?;
                tokio::spawn(async move { campaign.resign().await.map(|()| Outcome::Resigned) })
            }
            other => return Err(format!("unknown call op {other:?}")),
        };
        self.calls.insert(handle, task);
        Ok(())
    }

    async fn finish(&mut self, handle: &str) -> Result<Result<(), Error>, String> {
        let task = self
            .calls
            .remove(handle)
            .ok_or_else(|| format!("no call {handle:?} under way"))?;
        let outcome = tokio::time::timeout(STEP_TIMEOUT, task)
            .await
            .map_err(|_| format!("call {handle:?} did not finish"))?
            .map_err(|e| format!("call task: {e}"))?;
        Ok(outcome.map(|o| match o {
            Outcome::Campaign(mut c) => {
                self.events.insert(handle.to_string(), c.events());
                self.campaigns.insert(handle.to_string(), c);
            }
            Outcome::Observation(mut o) => {
                self.events.insert(handle.to_string(), o.events());
                self.observations.insert(handle.to_string(), o);
            }
            Outcome::Resigned => {}
        }))
    }

    async fn step(&mut self, step: &Value) -> Result<(), String> {
        let obj = step.as_object().ok_or("a step must be an object")?;
        if let Some(args) = obj.get("clock") {
            let name = str_field(args, "name")?;
            let in_ms = args.get("in_ms").and_then(Value::as_u64).ok_or("in_ms")?;
            let at = monotonic_now_ns() + in_ms * 1_000_000;
            self.captures.insert(name.to_string(), json!(at));
            Ok(())
        } else if let Some(args) = obj.get("connect") {
            let _ = args;
            let socket = self.socket.clone();
            self.connecting = Some(tokio::spawn(async move { Client::connect(socket).await }));
            self.accept().await
        } else if obj.contains_key("accept") {
            self.accept().await
        } else if let Some(msg) = obj.get("send") {
            let mut line = serde_json::to_string(&self.substitute(msg)?).map_err(|e| e.to_string())?;
            line.push('\n');
            self.write(line).await
        } else if let Some(raw) = obj.get("send_raw") {
            let line = format!("{}\n", raw.as_str().ok_or("send_raw takes a string")?);
            self.write(line).await
        } else if let Some(want) = obj.get("expect_request") {
            let conn = self.connection()?;
            let line = tokio::time::timeout(STEP_TIMEOUT, conn.lines.next_line())
                .await
                .map_err(|_| format!("no request; expected {want}"))?
                .map_err(|e| format!("read: {e}"))?
                .ok_or_else(|| format!("connection closed; expected {want}"))?;
            let got: Value =
                serde_json::from_str(&line).map_err(|e| format!("request is not JSON ({e}): {line}"))?;
            for (k, v) in want.as_object().ok_or("expect_request takes an object")? {
                if !got
                    .get(k)
                    .map(|g| self.matches(g, v))
                    .transpose()?
                    .unwrap_or(false)
                {
                    return Err(format!("request {got} does not have {k} = {v}"));
                }
            }
            if let Some(name) = obj.get("capture").and_then(Value::as_str) {
                let id = got
                    .get("id")
                    .cloned()
                    .ok_or_else(|| format!("request {got} has no id"))?;
                self.captures.insert(name.to_string(), id);
            }
            Ok(())
        } else if let Some(args) = obj.get("expect_no_request") {
            let ms = args.get("within_ms").and_then(Value::as_u64).ok_or("within_ms")?;
            let conn = self.connection()?;
            match tokio::time::timeout(Duration::from_millis(ms), conn.lines.next_line()).await {
                Err(_) | Ok(Ok(None)) => Ok(()),
                Ok(Ok(Some(line))) => Err(format!("unexpected request: {line}")),
                Ok(Err(e)) => Err(format!("read: {e}")),
            }
        } else if obj.contains_key("expect_closed") {
            self.expect_closed().await
        } else if obj.contains_key("disconnect") {
            self.connection = None;
            Ok(())
        } else if let Some(args) = obj.get("call") {
            self.call(args).await
        } else if let Some(handle) = obj.get("returns") {
            let handle = handle.as_str().ok_or("returns takes a handle")?;
            self.finish(handle)
                .await?
                .map_err(|e| format!("call {handle:?} failed: {e}"))
        } else if let Some(args) = obj.get("raises") {
            let handle = str_field(args, "handle")?;
            let code = str_field(args, "code")?;
            match self.finish(handle).await? {
                Err(Error::Broker { code: got, .. }) if got.as_str() == code => Ok(()),
                Err(e) => Err(format!("call {handle:?} failed with {e}, not {code}")),
                Ok(()) => Err(format!("call {handle:?} succeeded; expected {code}")),
            }
        } else if let Some(args) = obj.get("expect_events") {
            let handle = str_field(args, "handle")?;
            let want = args.get("events").and_then(Value::as_array).ok_or("events")?;
            // When the events must come: not before a clock reading, and at most late_ms after.
            let window = match args.get("not_before").and_then(Value::as_str) {
                Some(name) => {
                    let late = args.get("late_ms").and_then(Value::as_u64).unwrap_or(1000);
                    Some((name.to_string(), self.instant(name)?, late * 1_000_000))
                }
                None => None,
            };
            let stream = self
                .events
                .get_mut(handle)
                .ok_or_else(|| format!("no events for {handle:?}"))?;
            for w in want {
                let got = tokio::time::timeout(STEP_TIMEOUT, stream.next())
                    .await
                    .map_err(|_| format!("no event on {handle:?}; expected {w}"))?
                    .ok_or_else(|| format!("events of {handle:?} ended; expected {w}"))?;
                let arrived = monotonic_now_ns();
                let got = normalize(got);
                if &got != w {
                    return Err(format!("event on {handle:?}: got {got}, expected {w}"));
                }
                if let Some((name, at, late)) = &window {
                    if arrived < *at {
                        return Err(format!("{w} came {} ns before {name}", at - arrived));
                    }
                    if arrived > at + late {
                        return Err(format!("{w} came {} ms after {name}", (arrived - at) / 1_000_000));
                    }
                }
            }
            Ok(())
        } else if let Some(args) = obj.get("expect_no_events") {
            let handle = str_field(args, "handle")?;
            let ms = args.get("within_ms").and_then(Value::as_u64).ok_or("within_ms")?;
            let stream = self
                .events
                .get_mut(handle)
                .ok_or_else(|| format!("no events for {handle:?}"))?;
            match tokio::time::timeout(Duration::from_millis(ms), stream.next()).await {
                Err(_) => Ok(()),
                Ok(e) => Err(format!(
                    "unexpected event on {handle:?}: {}",
                    e.map(normalize).unwrap_or(Value::Null)
                )),
            }
        } else if let Some(args) = obj.get("expect_state") {
            let handle = str_field(args, "handle")?;
            let state = self.campaign(handle)?.state().borrow().clone();
            let got = json!({"is_leader": state.is_leader, "jeopardy": state.jeopardy});
            for (k, v) in args.as_object().ok_or("expect_state takes an object")? {
                if k != "handle" && got.get(k) != Some(v) {
                    return Err(format!("state of {handle:?} is {got}, expected {args}"));
                }
            }
            Ok(())
        } else if let Some(handle) = obj.get("expect_end") {
            let handle = handle.as_str().ok_or("expect_end takes a handle")?;
            let stream = self
                .events
                .get_mut(handle)
                .ok_or_else(|| format!("no events for {handle:?}"))?;
            match tokio::time::timeout(STEP_TIMEOUT, stream.next()).await {
                Ok(None) => Ok(()),
                Ok(Some(e)) => Err(format!("events of {handle:?} go on: {}", normalize(e))),
                Err(_) => Err(format!("events of {handle:?} did not end")),
            }
        } else {
            Err(format!("unknown step {step}"))
        }
    }

    async fn write(&mut self, line: String) -> Result<(), String> {
        self.connection()?
            .writer
            .write_all(line.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))
    }
}

async fn play(script: &Value, dir: &Path) -> Result<(), String> {
    let socket = dir.join("broker.sock");
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket).map_err(|e| format!("bind: {e}"))?;
    let mut player = Player {
        listener,
        socket,
        connection: None,
        earlier: Vec::new(),
        connecting: None,
        client: None,
        captures: HashMap::new(),
        calls: HashMap::new(),
        campaigns: HashMap::new(),
        observations: HashMap::new(),
        events: HashMap::new(),
    };
    let steps = script
        .get("steps")
        .and_then(Value::as_array)
        .ok_or("a script needs steps")?;
    for (i, step) in steps.iter().enumerate() {
        player
            .step(step)
            .await
            .map_err(|e| format!("step {i} {step}: {e}"))?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_client_plays_every_conformance_script() {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(scripts_dir())
        .expect("clients/conformance exists")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    paths.sort();
    assert!(paths.len() >= 5, "conformance scripts missing: {paths:?}");
    let mut failures = Vec::new();
    for path in &paths {
        let script: Value = serde_json::from_str(&std::fs::read_to_string(path).expect("read script"))
            .expect("script is JSON");
        let dir = tempfile::tempdir().unwrap();
        let result = play(&script, dir.path()).await;
        let divergence = script.pointer("/known_divergences/rust").and_then(Value::as_str);
        let name = path.file_name().unwrap().to_string_lossy();
        match (result, divergence) {
            (Ok(()), None) => eprintln!("ok: {name}"),
            (Err(e), Some(why)) => eprintln!("known divergence: {name}: {why}\n  ({e})"),
            (Err(e), None) => failures.push(format!("{name}: {e}")),
            (Ok(()), Some(why)) => failures.push(format!(
                "{name} passes now: remove its known divergence for rust ({why})"
            )),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
