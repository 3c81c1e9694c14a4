//! The documented commands, run as written: every `$ ` command of every `sh` block in
//! PROTOCOL.md and the examples' READMEs runs in `sh` from the repository root against a
//! standalone broker, and what it prints must match the lines the doc shows under it. And the
//! kustomizations the docs tell users to apply render with every ConfigMap they mount.
//!
//! The doc format (each file says it too): in a ```` ```sh ```` block, `$ cmd` is a command
//! (`&` at the end: it keeps running in the background, as job 1, 2, ... of the block);
//! `# ...` is a comment; every other line is output of the command above it, where `...`
//! stands for anything. Output lines are matched as a set, not in order (the broker's event
//! order may vary where PROTOCOL.md says so), against the lines any of the block's processes
//! printed since the command started. A command that exits must print exactly the lines shown
//! (so "who leads?" cannot print a stale `null` first); one still running once its lines
//! appeared (a campaign holding its connection) keeps running while the next commands run.
//! `kill %N` stops job N. Substituted: the socket paths (`/var/run/elector/elector.sock`,
//! `/tmp/elector.sock`) by a fresh one, `cargo run -p P --bin B --` by the binary B that the
//! workspace's test build built, and `hostname` prints `web-0`. A block that starts no
//! `electord` gets a standalone one, as on a node.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::time::Instant;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .expect("repository root")
}

/// `cargo run -p <package> --bin <name> [--]` in a doc command becomes the binary that
/// `cargo nextest run --workspace` built (`elector_tests::workspace_bin`): what `cargo run`
/// would build and start, without a second build of the workspace in the middle of the tests
/// (with other features, replacing the binaries other tests run).
fn use_built_binaries(command: &str) -> String {
    let mut out = String::new();
    let mut rest = command;
    while let Some(at) = rest.find("cargo run -p ") {
        out.push_str(&rest[..at]);
        let after = &rest[at + "cargo run -p ".len()..];
        let mut words = after.splitn(4, ' ');
        let (Some(package), Some("--bin"), Some(name)) = (words.next(), words.next(), words.next()) else {
            panic!("a doc's cargo run names no --bin: {command}");
        };
        out.push_str(&elector_tests::workspace_bin(package, name).display().to_string());
        rest = words.next().unwrap_or("");
        rest = rest
            .strip_prefix("-- ")
            .or(rest.strip_prefix("--"))
            .unwrap_or(rest);
        if !rest.is_empty() {
            out.push(' ');
        }
    }
    out.push_str(rest);
    out
}

/// Takes out the variables cargo sets for this test (some build scripts watch them, so a
/// `cargo` run with them would rebuild what the same command in a shell built, and back).
fn without_test_env(command: &mut std::process::Command) -> &mut std::process::Command {
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if [
            "CARGO_MANIFEST_",
            "CARGO_PKG_",
            "CARGO_CRATE_",
            "CARGO_BIN_",
            "CARGO_PRIMARY_",
        ]
        .iter()
        .any(|p| key.starts_with(p))
            || key == "CARGO_TARGET_TMPDIR"
        {
            command.env_remove(&*key);
        }
    }
    command
}

/// One `$ ` command and the output shown under it.
#[derive(Debug, Clone)]
struct Step {
    /// Where it is written, for failure messages.
    line: usize,
    command: String,
    background: bool,
    expected: Vec<String>,
}

/// The `sh` blocks of a markdown file, as steps.
fn sh_blocks(path: &Path) -> Vec<Vec<Step>> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut blocks = Vec::new();
    let mut current: Option<Vec<Step>> = None;
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        match (&mut current, line.trim_end()) {
            (None, "```sh") => current = Some(Vec::new()),
            (Some(steps), "```") => {
                assert!(
                    !steps.is_empty(),
                    "{}:{n}: an sh block without `$ ` commands is not tested; mark its commands with `$ `",
                    path.display()
                );
                blocks.push(current.take().unwrap());
            }
            (Some(steps), l) => {
                if let Some(cmd) = l.strip_prefix("$ ") {
                    let background = cmd.ends_with(" &");
                    let command = cmd.strip_suffix(" &").unwrap_or(cmd).trim().to_string();
                    steps.push(Step {
                        line: n,
                        command,
                        background,
                        expected: Vec::new(),
                    });
                } else if l.is_empty() || l.starts_with('#') {
                } else {
                    let step = steps
                        .last_mut()
                        .unwrap_or_else(|| panic!("{}:{n}: output before any `$ ` command", path.display()));
                    step.expected.push(l.to_string());
                }
            }
            (None, _) => {}
        }
    }
    assert!(current.is_none(), "{}: unterminated sh block", path.display());
    blocks
}

/// `pattern` with `...` standing for any text, matched against the whole line.
fn glob_match(pattern: &str, line: &str) -> bool {
    let parts: Vec<&str> = pattern.split("...").collect();
    if parts.len() == 1 {
        return pattern == line;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !line.starts_with(first) || !line[first.len()..].ends_with(last) {
        return false;
    }
    let mut rest = &line[first.len()..line.len() - last.len()];
    for middle in &parts[1..parts.len() - 1] {
        match rest.find(middle) {
            Some(at) => rest = &rest[at + middle.len()..],
            None => return false,
        }
    }
    true
}

/// Assigns each expected line a distinct matching actual line (a maximum bipartite matching,
/// so a loose pattern cannot take the line a stricter one needs); returns the unmatched ones.
fn unmatched<'a>(expected: &'a [String], actual: &[&str]) -> Vec<&'a str> {
    fn augment(e: usize, edges: &[Vec<usize>], owner: &mut [Option<usize>], visited: &mut [bool]) -> bool {
        for &a in &edges[e] {
            if !visited[a] {
                visited[a] = true;
                if owner[a].is_none_or(|other| augment(other, edges, owner, visited)) {
                    owner[a] = Some(e);
                    return true;
                }
            }
        }
        false
    }
    let edges: Vec<Vec<usize>> = expected
        .iter()
        .map(|e| (0..actual.len()).filter(|&i| glob_match(e, actual[i])).collect())
        .collect();
    let mut owner = vec![None; actual.len()];
    let mut missing = Vec::new();
    for (i, e) in expected.iter().enumerate() {
        if !augment(i, &edges, &mut owner, &mut vec![false; actual.len()]) {
            missing.push(e.as_str());
        }
    }
    missing
}

enum Output {
    Line { process: usize, text: String },
    Closed { process: usize },
}

/// A process of the block (its own process group, so `kill` reaches the whole pipeline).
struct Process {
    step: Step,
    child: Child,
    stderr: PathBuf,
    stdout_closed: bool,
}

impl Process {
    fn signal(&self, signal: Signal) {
        if let Some(pid) = self.child.id() {
            let _ = killpg(Pid::from_raw(pid as i32), signal);
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

struct Block {
    doc: PathBuf,
    dir: tempfile::TempDir,
    socket: PathBuf,
    path_env: String,
    processes: Vec<Process>,
    jobs: Vec<usize>,
    lines: Vec<(usize, String)>,
    tx: mpsc::UnboundedSender<Output>,
    rx: mpsc::UnboundedReceiver<Output>,
}

impl Block {
    fn new(doc: &Path) -> Block {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("elector.sock");
        // `hostname` prints web-0, the pod the docs' examples run in.
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        let hostname = bin.join("hostname");
        std::fs::write(&hostname, "#!/bin/sh\necho web-0\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&hostname, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path_env = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
        let (tx, rx) = mpsc::unbounded_channel();
        Block {
            doc: doc.to_path_buf(),
            dir,
            socket,
            path_env,
            processes: Vec::new(),
            jobs: Vec::new(),
            lines: Vec::new(),
            tx,
            rx,
        }
    }

    fn substitute(&self, command: &str) -> String {
        let socket = self.socket.to_str().unwrap();
        use_built_binaries(command)
            .replace("/var/run/elector/elector.sock", socket)
            .replace("/tmp/elector.sock", socket)
    }

    fn spawn(&mut self, step: Step, command: &str) -> usize {
        let index = self.processes.len();
        let stderr = self.dir.path().join(format!("stderr-{index}"));
        let mut sh = std::process::Command::new("sh");
        without_test_env(&mut sh);
        let mut child = Command::from(sh)
            .arg("-c")
            .arg(command)
            .current_dir(repo())
            .env("PATH", &self.path_env)
            .env_remove("RUST_BACKTRACE")
            .process_group(0)
            .stdin(Stdio::piped()) // held open: a command reading it (cat) waits, as in a terminal
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {command:?}: {e}"));
        let out = child.stdout.take().unwrap();
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(out).lines();
            while let Ok(Some(text)) = lines.next_line().await {
                let _ = tx.send(Output::Line { process: index, text });
            }
            let _ = tx.send(Output::Closed { process: index });
        });
        self.processes.push(Process {
            step,
            child,
            stderr,
            stdout_closed: false,
        });
        index
    }

    fn receive(&mut self, output: Output) {
        match output {
            Output::Line { process, text } => self.lines.push((process, text)),
            Output::Closed { process } => self.processes[process].stdout_closed = true,
        }
    }

    /// Waits up to `within` for the next output, or returns at once if there is none coming.
    async fn receive_for(&mut self, within: Duration) {
        if let Ok(Some(o)) = tokio::time::timeout(within, self.rx.recv()).await {
            self.receive(o);
        }
        while let Ok(o) = self.rx.try_recv() {
            self.receive(o);
        }
    }

    fn where_(&self, step: &Step) -> String {
        format!("{}:{}: `{}`", self.doc.display(), step.line, step.command)
    }

    fn diagnostics(&self) -> String {
        let mut s = String::from("\noutput so far:\n");
        for (p, l) in &self.lines {
            s.push_str(&format!("  [{}] {l}\n", self.processes[*p].step.command));
        }
        for p in &self.processes {
            let e = p.stderr();
            if !e.trim().is_empty() {
                let tail: Vec<&str> = e.lines().rev().take(15).collect();
                s.push_str(&format!(
                    "stderr of `{}` (last lines):\n  {}\n",
                    p.step.command,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n  ")
                ));
            }
        }
        s
    }

    async fn wait_for_socket(&mut self, step: &Step) {
        // Generous: the CI machine is a loaded 2-core VM.
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.socket.exists() {
            assert!(
                Instant::now() < deadline,
                "{}: no broker socket appeared{}",
                self.where_(step),
                self.diagnostics()
            );
            self.receive_for(Duration::from_millis(50)).await;
        }
    }

    async fn run_step(&mut self, step: Step) {
        if !step.command.contains("electord") {
            self.wait_for_socket(&step).await;
        }
        let mark = self.lines.len();
        let process = if let Some(job) = step.command.strip_prefix("kill %") {
            let job: usize = job.trim().parse().expect("kill %N");
            let p = *self
                .jobs
                .get(job - 1)
                .unwrap_or_else(|| panic!("{}: there is no job {job}", self.where_(&step)));
            self.processes[p].signal(Signal::SIGTERM);
            None
        } else {
            let command = self.substitute(&step.command);
            let p = self.spawn(step.clone(), &command);
            if step.background {
                self.jobs.push(p);
            }
            Some(p)
        };

        let deadline = Instant::now() + Duration::from_secs(60);
        let mut all_seen_at: Option<Instant> = None;
        loop {
            self.receive_for(Duration::from_millis(50)).await;
            let since: Vec<&str> = self.lines[mark..].iter().map(|(_, l)| l.as_str()).collect();
            let missing = unmatched(&step.expected, &since);
            let exited = match process {
                Some(p) if !step.background => {
                    let proc_ = &mut self.processes[p];
                    proc_.stdout_closed && proc_.child.try_wait().ok().flatten().is_some()
                }
                _ => false,
            };
            if exited {
                let p = process.unwrap();
                let own: Vec<&str> = self.lines[mark..]
                    .iter()
                    .filter(|(q, _)| *q == p)
                    .map(|(_, l)| l.as_str())
                    .collect();
                let missing = unmatched(&step.expected, &own);
                assert!(
                    missing.is_empty() && own.len() == step.expected.len(),
                    "{}: printed {own:#?}\nbut the doc shows {:#?}{}",
                    self.where_(&step),
                    step.expected,
                    self.diagnostics()
                );
                return;
            }
            if missing.is_empty() {
                // Background, `kill`, or still running: give a one-shot command the time to
                // finish, so that what it prints is checked whole; a command that keeps
                // running (a campaign holds its connection) goes on while the next ones run.
                let grace = if step.background || process.is_none() {
                    Duration::ZERO
                } else {
                    Duration::from_secs(5)
                };
                let at = *all_seen_at.get_or_insert_with(Instant::now);
                if at.elapsed() >= grace {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "{}: the doc shows {missing:#?}, which never came{}",
                self.where_(&step),
                self.diagnostics()
            );
        }
    }

    async fn run(mut self, steps: Vec<Step>) {
        if !steps.iter().any(|s| s.command.contains("electord")) {
            let broker = elector_tests::workspace_bin("elector-broker", "electord");
            let command = format!(
                "exec {} --standalone --socket {} --http-addr ''",
                broker.display(),
                self.socket.display()
            );
            let step = Step {
                line: 0,
                command: "electord (the node's broker)".into(),
                background: true,
                expected: Vec::new(),
            };
            self.spawn(step, &command);
        }
        for step in steps {
            self.run_step(step).await;
        }
        for p in &self.processes {
            p.signal(Signal::SIGTERM);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        for p in &self.processes {
            p.signal(Signal::SIGKILL);
        }
    }
}

async fn run_doc(relative: &str) {
    let doc = repo().join(relative);
    let blocks = sh_blocks(&doc);
    assert!(!blocks.is_empty(), "{relative} has no sh block");
    for steps in blocks {
        Block::new(&doc).run(steps).await;
    }
}

#[test]
fn a_docs_cargo_run_starts_the_built_binary() {
    let electord = elector_tests::workspace_bin("elector-broker", "electord");
    let worker = elector_tests::workspace_bin("elector-examples", "leader-worker");
    assert_eq!(
        use_built_binaries(
            "cargo run -p elector-broker --bin electord -- --standalone & cargo run -p elector-examples --bin leader-worker --"
        ),
        format!("{} --standalone & {}", electord.display(), worker.display())
    );
    assert_eq!(use_built_binaries("nc -U x.sock"), "nc -U x.sock");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_md_shell_commands() {
    run_doc("PROTOCOL.md").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn netcat_example_readme() {
    run_doc("examples/netcat/README.md").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_example_readme() {
    run_doc("examples/python/README.md").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_example_readme() {
    run_doc("examples/rust/README.md").await;
}

/// Fixed ports (the 2016 app's :8080, its sidecar's :4040): in the `fixed-ports` test group
/// with the shim test that uses them (.config/nextest.toml).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_example_readme() {
    run_doc("examples/node/README.md").await;
}

#[test]
fn the_doc_format_is_parsed_as_documented() {
    assert!(glob_match(
        r#"{"event":"hello",...}"#,
        r#"{"event":"hello","protocol":1}"#
    ));
    assert!(glob_match(
        r#"{"a":1,...,"c":3,...}"#,
        r#"{"a":1,"b":2,"c":3,"d":4}"#
    ));
    assert!(!glob_match(
        r#"{"a":1,...,"c":3,...}"#,
        r#"{"a":1,"b":2,"c":4,"d":4}"#
    ));
    assert!(!glob_match("Master is pod-a", "Master is pod-b"));
    assert!(!glob_match("a...a", "a"));
    let expected = vec!["x...".to_string(), "x1".to_string()];
    assert_eq!(unmatched(&expected, &["x1", "x2"]), Vec::<&str>::new());
    assert_eq!(unmatched(&expected, &["x1"]), vec!["x1"]);
}

// --- the manifests the docs tell users to apply ---------------------------------------------

/// `kubectl kustomize DIR` as documents.
fn kustomize(dir: &str) -> Vec<serde_json::Value> {
    let out = std::process::Command::new("kubectl")
        .args(["kustomize", dir])
        .current_dir(repo())
        .output()
        .expect("kubectl must be installed: .ci/run installs it");
    assert!(
        out.status.success(),
        "kubectl kustomize {dir}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).expect("rendered YAML"))
        .collect()
}

fn kind<'a>(docs: &'a [serde_json::Value], kind: &str) -> Vec<&'a serde_json::Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn images(docs: &[serde_json::Value]) -> Vec<String> {
    docs.iter()
        .flat_map(|d| {
            d["spec"]["template"]["spec"]["containers"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .filter_map(|c| c["image"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn deploy_renders_with_kubectl_kustomize_and_its_image_can_be_overridden() {
    let docs = kustomize("deploy/");
    // Two ClusterRoles: the lock role (bound per enabled namespace, not here) and the
    // attestation role (bound cluster-wide); the admission policy and its binding.
    for (k, n) in [
        ("Namespace", 1),
        ("ServiceAccount", 1),
        ("ClusterRole", 2),
        ("ClusterRoleBinding", 1),
        ("ValidatingAdmissionPolicy", 1),
        ("ValidatingAdmissionPolicyBinding", 1),
        ("DaemonSet", 1),
    ] {
        assert_eq!(kind(&docs, k).len(), n, "{k}");
    }
    // The `images:` entry names the image the DaemonSet uses, so overriding it takes effect.
    let kustomization: serde_json::Value =
        serde_yaml::from_str(&std::fs::read_to_string(repo().join("deploy/kustomization.yaml")).unwrap())
            .unwrap();
    let entry = &kustomization["images"][0];
    let rendered = images(&docs);
    assert_eq!(
        rendered,
        vec![format!(
            "{}:{}",
            entry["newName"].as_str().unwrap(),
            entry["newTag"].as_str().unwrap()
        )]
    );
    let daemonset = std::fs::read_to_string(repo().join("deploy/daemonset.yaml")).unwrap();
    let name = entry["name"].as_str().unwrap();
    assert!(
        daemonset.contains(&format!("image: {name}:")),
        "deploy/kustomization.yaml's images[0].name {name} must be the DaemonSet's image"
    );
}

#[test]
fn deploy_examples_render_with_every_configmap_they_mount() {
    let docs = kustomize("deploy/examples");
    let configmaps: Vec<&str> = kind(&docs, "ConfigMap")
        .iter()
        .map(|c| c["metadata"]["name"].as_str().unwrap())
        .collect();
    let deployments = kind(&docs, "Deployment");
    assert_eq!(deployments.len(), 2);
    let mut mounted = 0;
    for d in deployments {
        for v in d["spec"]["template"]["spec"]["volumes"].as_array().unwrap() {
            if let Some(name) = v["configMap"]["name"].as_str() {
                mounted += 1;
                assert!(
                    configmaps.contains(&name),
                    "{} mounts ConfigMap {name}, which the kustomization does not render (it renders {configmaps:?})",
                    d["metadata"]["name"]
                );
            }
        }
    }
    assert_eq!(mounted, 2, "leader-app and report-job");
    // The ConfigMaps hold the example sources, unchanged.
    for (prefix, key, source) in [
        ("leader-app", "app.js", "examples/node/app.js"),
        ("report-job", "leader.py", "examples/python/leader.py"),
    ] {
        let cm = kind(&docs, "ConfigMap")
            .into_iter()
            .find(|c| c["metadata"]["name"].as_str().unwrap().starts_with(prefix))
            .unwrap_or_else(|| panic!("no ConfigMap {prefix}"));
        assert_eq!(
            cm["data"][key].as_str().unwrap(),
            std::fs::read_to_string(repo().join(source)).unwrap(),
            "{prefix}"
        );
    }
    assert!(
        images(&docs)
            .iter()
            .any(|i| i.starts_with("ghcr.io/elector-dev/elector:")),
        "the shim sidecar"
    );
}

// --- docs/operations.md against an API server ------------------------------------------------

/// The "Who leads?" commands of docs/operations.md, as written there (placeholders filled),
/// with kubectl against the test API server while a broker holds a Lease and an Endpoints
/// lock: each prints the holder's name alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_md_who_leads_commands_print_the_name() {
    use elector_client::protocol::LockKind;
    use elector_client::{CampaignOptions, Client};
    use elector_tests::harness::{TestBroker, fast_timing};
    use elector_tests::kube_api::{Rule, TestApiServer};

    let doc = std::fs::read_to_string(repo().join("docs/operations.md")).unwrap();
    let command = |prefix: &str, election: &str| {
        doc.lines()
            .map(str::trim)
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("docs/operations.md has no `{prefix} ...` line"))
            .replace("<election>", election)
            .replace("<ns>", "demo")
    };
    let lease_cmd = command("kubectl get lease <election>", "job");
    let endpoints_cmd = command("kubectl get endpoints <election>", "web");

    let server = TestApiServer::start().await.unwrap();
    let anonymous = server.add_anonymous(vec![Rule::all()]);
    let kubeconfig = server.kubeconfig_path(&anonymous);
    let dir = tempfile::tempdir().unwrap();
    let (broker, _) = TestBroker::on_server(&server, "node-a", dir.path(), fast_timing());
    let client = Client::connect(&broker.socket).await.unwrap();
    let mut campaigns = Vec::new();
    for (election, lock) in [("job", LockKind::Lease), ("web", LockKind::Endpoints)] {
        let c = client
            .campaign(
                CampaignOptions::new(election, "web-0")
                    .namespace("demo")
                    .lock(lock),
            )
            .await
            .unwrap();
        let mut state = c.state();
        tokio::time::timeout(Duration::from_secs(20), state.wait_for(|s| s.is_leader))
            .await
            .expect("web-0 leads")
            .unwrap();
        campaigns.push(c);
    }
    for cmd in [lease_cmd, endpoints_cmd] {
        let out = Command::new("sh")
            .arg("-c")
            .arg(&cmd)
            .env("KUBECONFIG", &kubeconfig)
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "{cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout), "web-0\n", "{cmd}");
    }
    drop(campaigns);
}
