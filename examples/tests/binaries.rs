//! The example apps as built.
//!
//! This file also makes `cargo nextest run --workspace` build them, in the same build and with
//! the same features as everything else (Cargo builds a package's binaries only for its own
//! integration tests); `tests/tests/examples.rs` runs `leader-worker` from there.

use std::process::Command;

#[test]
fn leader_worker_needs_an_identity() {
    let worker = env!("CARGO_BIN_EXE_leader-worker");
    let out = Command::new(worker).env_remove("POD_NAME").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--id"));
}
