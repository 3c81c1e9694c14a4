//! The README's test command is what CI runs: `.ci/run` takes it from README.md (its
//! `test_cmd=` line, run here through bash as CI runs it), and it covers the whole workspace
//! from the lock file, so that every test counts and none is left to a command CI never runs.

use std::path::Path;
use std::process::Command;

fn repo_file(path: &str) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    std::fs::read_to_string(root.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The command shown in the README's "Run the tests" section.
fn readme_test_command() -> String {
    let readme = repo_file("README.md");
    let section = readme
        .split("## Run the tests")
        .nth(1)
        .expect("README.md has a 'Run the tests' section");
    section
        .lines()
        .take_while(|l| !l.starts_with("## "))
        .map(str::trim)
        .find(|l| l.starts_with("cargo nextest run"))
        .expect("the section shows a cargo nextest run command")
        .to_string()
}

/// What `.ci/run` extracts from README.md and runs.
fn ci_test_command() -> String {
    let ci = repo_file(".ci/run");
    let extract = ci
        .lines()
        .find(|l| l.starts_with("test_cmd="))
        .expect(".ci/run sets test_cmd");
    let out = Command::new("bash")
        .args([
            "-c",
            &format!("set -euo pipefail\n{extract}\nprintf '%s' \"$test_cmd\""),
        ])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .output()
        .expect("bash runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("UTF-8")
}

#[test]
fn ci_runs_the_readme_test_command_over_the_whole_workspace() {
    let readme = readme_test_command();
    assert_eq!(ci_test_command(), readme, "what .ci/run runs");
    let args: Vec<&str> = readme.split_whitespace().collect();
    assert!(
        args.contains(&"--workspace") && args.contains(&"--locked"),
        "{readme}: every crate's tests, from the lock file"
    );
    assert!(
        !args
            .iter()
            .any(|a| a.starts_with("-E") || *a == "--test" || *a == "-p"),
        "{readme}: no test is filtered out"
    );
    let ci = repo_file(".ci/run");
    for check in [
        "cargo fmt --all -- --check",
        "cargo clippy --workspace --all-targets --locked -- -D warnings",
    ] {
        assert!(ci.contains(check), ".ci/run runs {check:?}, as README.md says");
    }
}
