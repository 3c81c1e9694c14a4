//! `electord` and `elector-shim` as built, checking their command lines before anything is
//! bound or contacted.
//!
//! This file also makes `cargo nextest run --workspace` build both binaries, in the same
//! build and with the same features as everything else: Cargo builds a package's binaries
//! only for its own integration tests. The integration tests in `tests/tests/` start them
//! from there (`elector_tests::workspace_bin`) instead of building them in the middle of a
//! test run.

use std::process::Command;

fn run(bin: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(bin)
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("the binary runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn electord_names_a_bad_flag_and_starts_nothing() {
    let electord = env!("CARGO_BIN_EXE_electord");
    let (code, out) = run(electord, &["--version"]);
    assert_eq!(
        (code, out.trim()),
        (0, concat!("electord ", env!("CARGO_PKG_VERSION")))
    );
    let socket_dir = tempfile::tempdir().unwrap();
    let socket = socket_dir.path().join("e.sock");
    for (flag, named) in [
        ("--renew-deadline=-1", "--renew-deadline"),
        ("--shutdown-grace=0", "--shutdown-grace"),
        ("--http-addr=nowhere", "--http-addr"),
        ("--attest=kubernetes", "--attest=kubernetes"),
    ] {
        let (code, out) = run(
            electord,
            &["--standalone", "--socket", socket.to_str().unwrap(), flag],
        );
        assert_ne!(code, 0, "{flag}: {out}");
        assert!(out.contains(named), "{flag}: {out}");
        assert!(!socket.exists(), "{flag}: nothing was bound");
    }
}

#[test]
fn the_shim_requires_an_election() {
    let shim = env!("CARGO_BIN_EXE_elector-shim");
    let (code, out) = run(shim, &["--id", "pod-a"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("--election"), "{out}");
}
