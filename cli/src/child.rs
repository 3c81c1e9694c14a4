//! CMD of `elector run`: started in its own process group, stopped as a group.
//!
//! Signals go to the whole group, so a shell's children stop with the shell, and whatever CMD
//! left running in its group when it exited is killed then too (nothing of a leader may outlive
//! its leadership). A program that leaves its process group (`setsid`) escapes this.
//!
//! Even an `elector` killed with SIGKILL (an OOM kill) takes CMD's group with it: CMD must not
//! go on leading once nobody holds the leadership for it (the broker releases the lock when
//! `elector`'s connection closes, and another instance starts its CMD within milliseconds).
//! Beside each CMD runs a [`Guard`]: a second `elector` process (`elector guard`, hidden) that
//! waits on a pipe whose writing end only this process holds. The kernel closes that end when
//! this process dies, however it dies; the guard then kills CMD's group. When CMD ends the
//! normal way, the guard is told so first and exits without killing anything. The guard runs
//! in a process group of its own, so a SIGKILL to this process's whole group (a shell's
//! `kill -9 %1`, `timeout -s KILL`) does not take it too, and a terminal's Ctrl-C does not reach
//! it; it is started from `/proc/self/exe`, the running image, so a binary deleted or replaced
//! meanwhile (a package upgrade) does not leave CMD unguarded. It blocks every signal (a
//! `pkill -USR1 elector` that ends this process must not end its guard too), so only SIGKILL
//! (or SIGSTOP) stops it early; then CMD loses this protection, never its normal stop.
//!
//! Not covered: a SIGKILL in the instant between CMD's start and its guard's (CMD is then
//! orphaned); a CMD that leaves its process group.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// A running CMD.
#[derive(Debug)]
pub struct Child {
    process: tokio::process::Child,
    group: Pid,
    /// `None` if the guard could not be started (CMD then runs unguarded, as stderr said).
    guard: Option<Guard>,
}

/// The process that kills CMD's group should this process die first (see the module docs).
#[derive(Debug)]
struct Guard {
    process: tokio::process::Child,
    /// The pipe's writing end: one byte ([`STAND_DOWN`]) tells the guard CMD ended normally;
    /// its closing without that byte means this process is gone.
    pipe: std::fs::File,
}

/// What the guard is told when CMD's group was stopped the normal way.
const STAND_DOWN: u8 = b'D';

impl Guard {
    /// Starts `elector guard GROUP` (this very binary) reading the pipe.
    fn start(group: Pid) -> std::io::Result<Guard> {
        // Close-on-exec: neither the guard's own copy (it gets the reading end as stdin only)
        // nor any later CMD may hold the writing end, or the pipe would never close.
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let process = tokio::process::Command::new(own_executable()?)
            .arg0(std::env::args_os().next().unwrap_or_else(|| "elector".into()))
            .arg(GUARD_COMMAND)
            .arg(group.as_raw().to_string())
            .stdin(std::process::Stdio::from(read))
            .stdout(std::process::Stdio::null())
            // A process group of its own: whoever SIGKILLs this process's group (a shell's
            // `kill -9 %1`, `timeout -s KILL`, a supervisor's group kill) kills this process,
            // not its guard.
            .process_group(0)
            .kill_on_drop(false)
            .spawn()?;
        Ok(Guard {
            process,
            pipe: std::fs::File::from(write),
        })
    }

    /// CMD's group is gone the normal way: the guard exits without killing anything. (Reaped
    /// by tokio once dropped.)
    fn stand_down(mut self) {
        use std::io::Write;
        let _ = self.pipe.write_all(&[STAND_DOWN]);
        drop(self.pipe);
        let _ = self.process.try_wait();
    }
}

/// This process's executable as the kernel keeps it: `/proc/self/exe` opens the running image
/// even once its path was deleted or replaced (a package upgrade renames a new version over
/// it), where the path [`std::env::current_exe`] gives would name nothing (or another version).
/// Without procfs, that path.
fn own_executable() -> std::io::Result<PathBuf> {
    const PROC_SELF_EXE: &str = "/proc/self/exe";
    if Path::new(PROC_SELF_EXE).exists() {
        Ok(PathBuf::from(PROC_SELF_EXE))
    } else {
        std::env::current_exe()
    }
}

/// The hidden subcommand that runs a [`Guard`].
pub const GUARD_COMMAND: &str = "guard";

/// `elector guard GROUP`: waits until the pipe on stdin says [`STAND_DOWN`] or closes; on a
/// close without it (the `elector` that started this one died), SIGKILLs process group
/// `GROUP`. Returns the exit code (0).
pub fn guard(group: i32) -> u8 {
    use std::io::Read;
    // Started as `/proc/self/exe`, it would be named `exe` in `ps`, `top` and `pkill`.
    #[cfg(target_os = "linux")]
    let _ = nix::sys::prctl::set_name(c"elector");
    // Every signal blocked (SIGKILL and SIGSTOP cannot be): whatever ends `elector` by its
    // default action (`pkill -USR1 elector` reaches both) must not end its guard too. Blocked,
    // not handled: a blocked signal stays pending and never ends this process.
    let _ = nix::sys::signal::SigSet::all().thread_block();
    let mut word = [0u8; 1];
    let told = loop {
        match std::io::stdin().read(&mut word) {
            Ok(0) => break None,
            Ok(_) => break Some(word[0]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break None,
        }
    };
    if told != Some(STAND_DOWN) && group > 1 {
        match killpg(Pid::from_raw(group), Signal::SIGKILL) {
            Ok(()) => eprintln!(
                "elector guard: the elector process that ran CMD died: killed CMD's process group {group}"
            ),
            Err(nix::errno::Errno::ESRCH) => {}
            Err(e) => eprintln!("elector guard: cannot kill CMD's process group {group}: {e}"),
        }
    }
    crate::exit::OK
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
        let guard = match Guard::start(group) {
            Ok(g) => Some(g),
            Err(e) => {
                eprintln!(
                    "elector: cannot start the guard that stops CMD should elector be killed ({e}): CMD runs unguarded"
                );
                None
            }
        };
        Ok(Child {
            process,
            group,
            guard,
        })
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
    /// Never leave CMD running behind an `elector` that stops (an error, a panic); then the
    /// guard stands down.
    fn drop(&mut self) {
        if matches!(self.process.try_wait(), Ok(None)) {
            self.signal(Signal::SIGKILL);
        }
        if let Some(guard) = self.guard.take() {
            guard.stand_down();
        }
    }
}
