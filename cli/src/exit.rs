//! The exit codes of `elector` (also listed in `elector --help`).

use crate::session::SessionError;
use crate::status::StatusError;

/// Done, or stopped by SIGTERM/SIGINT while no CMD ran.
pub const OK: u8 = 0;
/// The broker refused a request, or another error.
pub const FAILURE: u8 = 1;
/// `leader`: nobody leads.
pub const NO_LEADER: u8 = 3;
/// `leader`: who leads is unknown (the broker cannot read the lock, or did not answer).
pub const LEADER_UNKNOWN: u8 = 4;
/// The broker could not be reached, or the connection to it was lost (EX_UNAVAILABLE).
pub const BROKER_UNREACHABLE: u8 = 69;
/// `run --once`: leadership was lost and CMD was stopped (EX_TEMPFAIL).
pub const LEADERSHIP_LOST: u8 = 75;
/// `run`: CMD exists but could not be executed (as shells do).
pub const CANNOT_EXECUTE: u8 = 126;
/// `run`: CMD was not found (as shells do).
pub const NOT_FOUND: u8 = 127;

/// The exit code for an error: [`BROKER_UNREACHABLE`] when the broker could not be reached or
/// went away, else [`FAILURE`].
pub fn code_of(error: &anyhow::Error) -> u8 {
    for cause in error.chain() {
        if let Some(e) = cause.downcast_ref::<SessionError>()
            && e.is_unreachable()
        {
            return BROKER_UNREACHABLE;
        }
        if let Some(StatusError::Unreachable { .. }) = cause.downcast_ref::<StatusError>() {
            return BROKER_UNREACHABLE;
        }
        if let Some(elector_client::Error::Connect { .. } | elector_client::Error::Disconnected) =
            cause.downcast_ref::<elector_client::Error>()
        {
            return BROKER_UNREACHABLE;
        }
    }
    FAILURE
}

/// The exit code that reports how a child process ended: its own code, or 128+N for signal N.
pub fn of_status(status: std::process::ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => u8::try_from(c & 0xff).unwrap_or(FAILURE),
        (None, Some(sig)) => u8::try_from((128 + sig) & 0xff).unwrap_or(FAILURE),
        (None, None) => FAILURE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn child_statuses_map_like_a_shell() {
        assert_eq!(of_status(std::process::ExitStatus::from_raw(0)), 0);
        assert_eq!(of_status(std::process::ExitStatus::from_raw(7 << 8)), 7);
        // Killed by SIGKILL (9) / SIGTERM (15).
        assert_eq!(of_status(std::process::ExitStatus::from_raw(9)), 137);
        assert_eq!(of_status(std::process::ExitStatus::from_raw(15)), 143);
    }

    #[test]
    fn unreachable_brokers_get_their_own_code() {
        let e = anyhow::Error::new(elector_client::Error::Disconnected).context("campaigning");
        assert_eq!(code_of(&e), BROKER_UNREACHABLE);
        let e = anyhow::Error::new(elector_client::Error::Broker {
            code: elector_client::protocol::ErrorCode::InvalidElection,
            message: "bad".into(),
        });
        assert_eq!(code_of(&e), FAILURE);
    }
}
