//! The `elector` command as built.
//!
//! This file also makes `cargo nextest run --workspace` build the binary, in the same build
//! and with the same features as everything else (Cargo builds a package's binaries only for
//! its own integration tests); `tests/tests/cli.rs` runs it from there.

use std::process::Command;

#[test]
fn elector_reports_its_version_and_refuses_an_unknown_command() {
    let elector = env!("CARGO_BIN_EXE_elector");
    let out = Command::new(elector).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        concat!("elector ", env!("CARGO_PKG_VERSION"))
    );
    let out = Command::new(elector).arg("dance").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("dance"));
}
