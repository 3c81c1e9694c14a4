//! elector's test support: a test Kubernetes API server ([`kube_api`]) faithful to the real one,
//! and helpers shared by the integration tests, the chaos suite and the benchmarks.

pub mod harness;
pub mod kube_api;
pub mod manifests;
pub mod raw;
pub mod sim;
pub mod upgrade;

pub use raw::RawClient;

/// The path of a binary of this workspace (`electord`, `elector-shim`, `elector`,
/// `leader-worker`...), as `cargo nextest run --workspace` builds them next to the test
/// executables: each package that has binaries has an integration test of its own, which is
/// what makes Cargo build them, in the same build as everything else.
///
/// When a test runs without them (e.g. `-p elector-tests` alone), the binary is built first,
/// in the same profile (the bench, run with `--release`, measures release binaries), by a
/// cargo that does not inherit the variables cargo set for this test.
pub fn workspace_bin(package: &str, name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> (a test) or target/<profile>/<bin> (the bench)
    // -> target/<profile>/<name>
    let dir = exe
        .parent()
        .map(|d| {
            if d.ends_with("deps") {
                d.parent().unwrap_or(d)
            } else {
                d
            }
        })
        .expect("executable in target/<profile>");
    let bin = dir.join(name);
    if !bin.exists() {
        let release = dir.file_name().is_some_and(|p| p == "release");
        let mut cargo = std::process::Command::new(env!("CARGO"));
        for (var, _) in std::env::vars_os() {
            let set_for_this_test = var
                .to_str()
                .is_some_and(|v| v.starts_with("CARGO_") && v != "CARGO_HOME" && v != "CARGO_TARGET_DIR");
            if set_for_this_test {
                cargo.env_remove(var);
            }
        }
        let status = cargo
            .args(["build", "-q", "-p", package, "--bin", name])
            .args(release.then_some("--release"))
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
            .status()
            .expect("cargo build");
        assert!(status.success(), "building {name}");
    }
    bin
}

/// A minimal HTTP/1.0 GET (tests only; 1.0 so no server answers chunked): returns the status code and body.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// Runs `kubectl` with `kubeconfig`; returns its stdout, or panics with its stderr. (`.ci/run`
/// installs kubectl.)
pub async fn kubectl(kubeconfig: &std::path::Path, args: &[&str]) -> String {
    let out = tokio::process::Command::new("kubectl")
        .env("KUBECONFIG", kubeconfig)
        .args(args)
        .output()
        .await
        .expect("kubectl on the PATH (.ci/run installs it)");
    assert!(
        out.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("kubectl prints UTF-8")
}
