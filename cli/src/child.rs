//! CMD of `elector run`: started in its own process group, stopped as a group.
//!
//! Signals go to the whole group, so a shell's children stop with the shell, and whatever CMD
//! left running in its group when it exited is killed then too (nothing of a leader may outlive
//! its leadership). A program that leaves its process group (`setsid`) escapes this.
//!
//! Failure mode: if `elector` itself is killed with SIGKILL, CMD is not told. In a container,
//! where `elector` is the entrypoint (PID 1), the kernel then kills every other process of the
//! container; elsewhere CMD would be orphaned.

use std::ffi::OsString;
use std::process::ExitStatus;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// A running CMD.
#[derive(Debug)]
pub struct Child {
    process: tokio::process::Child,
    group: Pid,
}

/// Why CMD could not be started.
#[derive(Debug, thiserror::Error)]
#[error("cannot start {program:?}: {source}")]
pub struct SpawnError {
    pub program: OsString,
    #[source]
    pub source: std::io::Error,
}

impl SpawnError {
    /// The exit code a shell would give.
    pub fn exit_code(&self) -> u8 {
        match self.source.kind() {
            std::io::ErrorKind::NotFound => crate::exit::NOT_FOUND,
            _ => crate::exit::CANNOT_EXECUTE,
        }
    }
}

impl Child {
    /// Starts `command` (program and arguments) with `env` added to this process's environment,
    /// in a new process group.
    pub fn spawn(command: &[OsString], env: &[(&str, String)]) -> Result<Child, SpawnError> {
        let (program, args) = command.split_first().ok_or_else(|| SpawnError {
            program: OsString::new(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "no command given"),
        })?;
        let mut c = tokio::process::Command::new(program);
        c.args(args).process_group(0).kill_on_drop(false);
        for (k, v) in env {
            c.env(k, v);
        }
        let process = c.spawn().map_err(|source| SpawnError {
            program: program.clone(),
            source,
        })?;
        let pid = process.id().ok_or_else(|| SpawnError {
            program: program.clone(),
            source: std::io::Error::other("exited before its pid could be read"),
        })?;
        let group = Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX));
        Ok(Child { process, group })
    }

    /// Sends `signal` to CMD's process group (nothing if it is gone).
    pub fn signal(&self, signal: Signal) {
        let _ = killpg(self.group, signal);
    }

    /// Waits until CMD exits by itself; then kills what it left in its group.
    pub async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        let status = self.process.wait().await;
        self.signal(Signal::SIGKILL);
        status
    }

    /// Sends `first` (SIGTERM, or a forwarded signal) to CMD's group, and SIGKILL if it has not
    /// exited `grace` later. Returns how it ended.
    pub async fn stop(&mut self, first: Signal, grace: Duration) -> std::io::Result<ExitStatus> {
        self.signal(first);
        match tokio::time::timeout(grace, self.process.wait()).await {
            Ok(status) => {
                self.signal(Signal::SIGKILL);
                status
            }
            Err(_) => {
                eprintln!(
                    "elector: CMD did not exit within {} of {first}: sending SIGKILL",
                    humantime::format_duration(grace)
                );
                self.signal(Signal::SIGKILL);
                self.process.wait().await
            }
        }
    }
}

impl Drop for Child {
    /// Never leave CMD running behind an `elector` that stops (an error, a panic).
    fn drop(&mut self) {
        if matches!(self.process.try_wait(), Ok(None)) {
            self.signal(Signal::SIGKILL);
        }
    }
}
