//! One plain connection to the broker's socket, for the commands that watch or campaign until
//! interrupted (`observe`, `leader`, `campaign`).
//!
//! Unlike [`elector_client::Client`], a [`Session`] never reconnects: these commands report
//! what one connection sees, and a broken connection ends them ([`SessionError::ConnectionLost`]).
//! Every event is handed over with its line exactly as the broker sent it, so that `--json`
//! prints the protocol's own format (including fields newer than this build).

use std::path::{Path, PathBuf};
use std::time::Duration;

use elector_client::codec::{Frame, LineCodec};
use elector_client::protocol::{self, ErrorCode, Event, Hello, MAX_LINE_BYTES, Op, Request};
use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio_util::codec::FramedRead;

/// How long the broker may take to greet a new connection.
const GREETING_TIMEOUT: Duration = Duration::from_secs(10);

/// What can go wrong on a session.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// Nothing answers at the socket path (or it answered with something else than a greeting).
    #[error("cannot reach the elector broker at {path}: {reason}{hint}")]
    Unreachable {
        path: PathBuf,
        reason: String,
        /// What to check, for the common causes.
        hint: &'static str,
    },
    /// The broker closed the connection (it stopped, restarted, or closed it after an error).
    #[error("the connection to the elector broker at {path} was lost{}", because(.last_error))]
    ConnectionLost {
        path: PathBuf,
        last_error: Option<String>,
    },
    /// The broker answered a request (or the connection itself) with an error.
    #[error("the broker refused the {what}: {code}: {message}")]
    Refused {
        what: Refusable,
        code: ErrorCode,
        message: String,
    },
    #[error("the broker sent something this elector does not understand: {0}")]
    Protocol(String),
}

/// What the broker refused: the connection (before greeting it) or a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusable {
    Connection,
    Request(Op),
}

impl std::fmt::Display for Refusable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusable::Connection => f.write_str("connection"),
            Refusable::Request(op) => op.fmt(f),
        }
    }
}

fn because(last_error: &Option<String>) -> String {
    last_error.as_ref().map(|e| format!(" ({e})")).unwrap_or_default()
}

impl SessionError {
    /// True when the broker could not be reached or went away (as opposed to refusing).
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            SessionError::Unreachable { .. } | SessionError::ConnectionLost { .. }
        )
    }
}

/// The hint for a failed connect, by cause.
pub fn connect_hint(kind: std::io::ErrorKind) -> &'static str {
    match kind {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
            " (is electord running on this node, and is its socket directory mounted here? \
             --socket or ELECTOR_SOCKET name another path)"
        }
        std::io::ErrorKind::PermissionDenied => {
            " (the socket's mode or group does not let this user connect: see electord \
             --socket-mode / --socket-group)"
        }
        _ => "",
    }
}

/// One event and its line as sent.
#[derive(Debug)]
pub struct Received {
    pub event: Event,
    pub line: String,
}

impl Received {
    /// For a `leader` event from a broker that cannot read the lock: why (`leader` is then
    /// `null` and means "unknown", not "nobody").
    pub fn unknown(&self) -> Option<String> {
        let value: serde_json::Value = serde_json::from_str(&self.line).ok()?;
        match value.get("unknown")? {
            serde_json::Value::Null => None,
            serde_json::Value::String(s) => Some(s.clone()),
            other => Some(other.to_string()),
        }
    }
}

/// A connection to the broker.
#[derive(Debug)]
pub struct Session {
    path: PathBuf,
    lines: FramedRead<OwnedReadHalf, LineCodec>,
    writer: OwnedWriteHalf,
    hello: Hello,
    next_id: u64,
    last_error: Option<String>,
}

impl Session {
    /// Connects and reads the greeting.
    pub async fn connect(path: &Path) -> Result<Session, SessionError> {
        let unreachable = |reason: String, hint| SessionError::Unreachable {
            path: path.to_path_buf(),
            reason,
            hint,
        };
        let stream = UnixStream::connect(path)
            .await
            .map_err(|e| unreachable(e.to_string(), connect_hint(e.kind())))?;
        let (read, writer) = stream.into_split();
        let mut lines = FramedRead::new(read, LineCodec::new(MAX_LINE_BYTES));
        let first = tokio::time::timeout(GREETING_TIMEOUT, lines.next())
            .await
            .map_err(|_| unreachable(format!("no greeting within {GREETING_TIMEOUT:?}"), ""))?;
        let line = match first {
            Some(Ok(Frame::Line(l))) => l,
            Some(Ok(Frame::TooLong)) => {
                return Err(SessionError::Protocol("an overlong greeting".into()));
            }
            Some(Err(e)) => return Err(unreachable(e.to_string(), "")),
            None => return Err(unreachable("it closed the connection before greeting".into(), "")),
        };
        match protocol::parse_event(&line) {
            Ok(Event::Hello(hello)) => Ok(Session {
                path: path.to_path_buf(),
                lines,
                writer,
                hello,
                next_id: 1,
                last_error: None,
            }),
            // E.g. `unattested` or `too_many_connections`: the broker says why and closes.
            Ok(Event::Error(e)) => Err(SessionError::Refused {
                what: Refusable::Connection,
                code: e.code,
                message: e.message,
            }),
            _ => Err(SessionError::Protocol(format!(
                "expected a greeting, got {}",
                String::from_utf8_lossy(&line)
            ))),
        }
    }

    pub fn hello(&self) -> &Hello {
        &self.hello
    }

    /// A fresh request id.
    pub fn next_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Sends one request (its id, if any, is set by the caller).
    pub async fn send(&mut self, request: &Request) -> Result<(), SessionError> {
        let mut line = serde_json::to_vec(request).map_err(|e| SessionError::Protocol(e.to_string()))?;
        line.push(b'\n');
        self.writer
            .write_all(&line)
            .await
            .map_err(|_| self.connection_lost())
    }

    fn connection_lost(&self) -> SessionError {
        SessionError::ConnectionLost {
            path: self.path.clone(),
            last_error: self.last_error.clone(),
        }
    }

    /// The next event. An error the broker sends without a request id (it is about to close
    /// the connection: `shutting_down`, `timeout`, ...) is remembered and named when the
    /// connection ends.
    pub async fn next(&mut self) -> Result<Received, SessionError> {
        loop {
            let line = match self.lines.next().await {
                Some(Ok(Frame::Line(l))) => l,
                Some(Ok(Frame::TooLong)) => continue,
                Some(Err(_)) | None => return Err(self.connection_lost()),
            };
            let text = String::from_utf8_lossy(&line).into_owned();
            let event =
                protocol::parse_event(&line).map_err(|e| SessionError::Protocol(format!("{e}: {text}")))?;
            if let Event::Error(e) = &event
                && e.id.is_none()
            {
                self.last_error = Some(format!("{}: {}", e.code, e.message));
            }
            return Ok(Received { event, line: text });
        }
    }
}

/// The id of a reply, when it answers request `id`.
pub fn answers(event: &Event, id: u64) -> bool {
    let of = |v: &Option<serde_json::Value>| v.as_ref().and_then(|v| v.as_u64()) == Some(id);
    match event {
        Event::Ok(ok) => of(&ok.id),
        Event::Error(e) => of(&e.id),
        Event::Status(s) => of(&s.id),
        Event::Pong(p) => of(&p.id),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_is_read_from_the_line() {
        let line = r#"{"event":"leader","election":"a","namespace":"d","lock":"lease","leader":null,"term":3,"is_me":false,"unknown":"api unreachable"}"#;
        let r = Received {
            event: protocol::parse_event(line.as_bytes()).unwrap(),
            line: line.into(),
        };
        assert_eq!(r.unknown().as_deref(), Some("api unreachable"));
        let line = r#"{"event":"leader","election":"a","namespace":"d","lock":"lease","leader":null,"term":3,"is_me":false}"#;
        let r = Received {
            event: protocol::parse_event(line.as_bytes()).unwrap(),
            line: line.into(),
        };
        assert_eq!(r.unknown(), None);
    }

    #[test]
    fn replies_are_matched_by_id() {
        let ok = protocol::parse_event(br#"{"event":"ok","id":7,"op":"observe"}"#).unwrap();
        assert!(answers(&ok, 7));
        assert!(!answers(&ok, 8));
        let err = protocol::parse_event(br#"{"event":"error","code":"timeout","message":"idle"}"#).unwrap();
        assert!(!answers(&err, 7));
    }
}
