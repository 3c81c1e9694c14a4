//! Logging for `electord` and `elector-shim`, set up in one place.
//!
//! Logs go to stderr, one event per line. `--log-format text` (the default) is human-readable
//! and coloured only when stderr is a terminal (never in `kubectl logs`, files or pipes, and
//! never with `NO_COLOR` set); `--log-format json` writes one JSON object per line for log
//! pipelines, with the level, target, message and fields as keys.
//!
//! Failure modes: an invalid filter ([`LoggingError::Filter`]) or a second initialisation in
//! the same process ([`LoggingError::AlreadySet`]) are errors; nothing is half-installed.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

/// How log lines look.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines; coloured only on a terminal.
    #[default]
    Text,
    /// One JSON object per line (`timestamp`, `level`, `target`, `fields.message`, ...).
    Json,
}

/// The logging flags both binaries take (`#[command(flatten)]`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct LogArgs {
    /// Log line format: `text` (coloured only on a terminal) or `json` (one object per line).
    #[arg(long = "log-format", env = "ELECTOR_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    #[error("invalid log filter {filter:?}: {message}")]
    Filter { filter: String, message: String },
    #[error("logging was already set up in this process")]
    AlreadySet,
}

/// Whether text logs written to stderr should carry ANSI colours.
pub fn stderr_wants_colour() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

fn parse_filter(filter: &str) -> Result<EnvFilter, LoggingError> {
    EnvFilter::try_new(filter).map_err(|e| LoggingError::Filter {
        filter: filter.to_string(),
        message: e.to_string(),
    })
}

/// Installs the global subscriber writing to `writer`, for tests and for [`init`].
pub fn init_with_writer<W>(
    format: LogFormat,
    filter: &str,
    colour: bool,
    writer: W,
) -> Result<(), LoggingError>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = parse_filter(filter)?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    let installed = match format {
        LogFormat::Text => builder.with_ansi(colour).try_init(),
        LogFormat::Json => builder.json().with_ansi(false).try_init(),
    };
    installed.map_err(|_| LoggingError::AlreadySet)
}

/// Installs the process's logger: `format` to stderr, events filtered by `filter` (tracing
/// `EnvFilter` syntax, e.g. `info` or `elector_broker=debug`).
pub fn init(format: LogFormat, filter: &str) -> Result<(), LoggingError> {
    init_with_writer(format, filter, stderr_wants_colour(), std::io::stderr)
}

impl LogArgs {
    /// [`init`] with these flags.
    pub fn init(&self, filter: &str) -> Result<(), LoggingError> {
        init(self.log_format, filter)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'w> MakeWriter<'w> for Captured {
        type Writer = Captured;
        fn make_writer(&'w self) -> Captured {
            self.clone()
        }
    }

    #[test]
    fn a_bad_filter_is_a_clear_error() {
        let e =
            init_with_writer(LogFormat::Text, "elector_broker=loud", false, Captured::default()).unwrap_err();
        assert!(e.to_string().contains("elector_broker=loud"), "{e}");
    }

    // One test installs the (process-global) subscriber: JSON lines, then no second install.
    #[test]
    fn json_lines_parse_and_a_second_init_is_refused() {
        let out = Captured::default();
        init_with_writer(LogFormat::Json, "info", false, out.clone()).unwrap();
        tracing::info!(election = "my-job", "elected");
        tracing::debug!("filtered out");
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1, "{text}");
        let v: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["fields"]["message"], "elected");
        assert_eq!(v["fields"]["election"], "my-job");
        assert!(!text.contains('\u{1b}'), "no ANSI escapes: {text:?}");
        assert!(matches!(
            init_with_writer(LogFormat::Text, "info", false, Captured::default()),
            Err(LoggingError::AlreadySet)
        ));
    }
}
