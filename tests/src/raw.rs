//! The one raw JSON-line client of the broker's socket, for tests and benchmarks that must see
//! exactly what goes over the wire (event order, error codes, bad input), as a netcat user
//! would.
//!
//! Two flavours of each call: the `try_` ones return an [`std::io::Error`] (closed connection,
//! a line that is not JSON, a refused connection) for the benchmarks, which report failures;
//! the others panic with a message, for tests, and wait at most [`RawClient::PATIENCE`].

use std::io;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

/// One connection to a broker, read line by line.
#[derive(Debug)]
pub struct RawClient {
    r: BufReader<OwnedReadHalf>,
    w: OwnedWriteHalf,
    /// The first line the broker sent: its greeting (`hello`), or, when it refused the
    /// connection, the `error` saying why.
    pub hello: Value,
}

impl RawClient {
    /// How long the panicking calls wait for an event (generous: CI is a loaded 2-core VM).
    pub const PATIENCE: Duration = Duration::from_secs(10);

    /// Connects and reads the first line, whatever it is (see [`RawClient::hello`]).
    pub async fn connect(path: &Path) -> io::Result<RawClient> {
        let (r, w) = UnixStream::connect(path).await?.into_split();
        let mut c = RawClient {
            r: BufReader::new(r),
            w,
            hello: Value::Null,
        };
        c.hello = c
            .read_event()
            .await?
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "closed before greeting"))?;
        Ok(c)
    }

    /// Connects and reads the greeting; a refused connection (any first line but a `hello`)
    /// is an error.
    pub async fn try_open(path: &Path) -> io::Result<RawClient> {
        let c = RawClient::connect(path).await?;
        if c.hello["event"] != "hello" {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!("connection refused: {}", c.hello),
            ));
        }
        Ok(c)
    }

    /// Connects and reads the greeting (which must be a `hello` of protocol 1).
    pub async fn open(path: &Path) -> RawClient {
        let c = RawClient::try_open(path).await.expect("connect and greeting");
        assert_eq!(c.hello["protocol"], 1, "{}", c.hello);
        c
    }

    /// Writes `bytes` as they are (bad input, partial lines, several lines at once).
    pub async fn try_send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.w.write_all(bytes).await
    }

    /// Writes `bytes` as they are (bad input, partial lines, several lines at once).
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.try_send_raw(bytes).await.expect("write to the broker");
    }

    /// Reads the next line into `line` (cleared first) as sent, unparsed, for throughput
    /// measurements; `false` at EOF.
    pub async fn read_line(&mut self, line: &mut String) -> io::Result<bool> {
        line.clear();
        Ok(self.r.read_line(line).await? > 0)
    }

    /// Sends one request line.
    pub async fn try_send(&mut self, request: &Value) -> io::Result<()> {
        let mut line = serde_json::to_vec(request)?;
        line.push(b'\n');
        self.try_send_raw(&line).await
    }

    /// Sends one request line.
    pub async fn send(&mut self, request: Value) {
        self.try_send(&request).await.expect("write to the broker");
    }

    /// The next event, `None` at EOF (or a reset connection), waiting as long as it takes.
    pub async fn read_event(&mut self) -> io::Result<Option<Value>> {
        let mut line = String::new();
        match self.r.read_line(&mut line).await {
            Ok(0) => Ok(None),
            Ok(_) => Ok(Some(serde_json::from_str(&line)?)),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The next event within `limit`: `Err` if none came, `Ok(None)` at EOF or when the
    /// connection broke. Panics on a line that is not JSON.
    pub async fn next_within(
        &mut self,
        limit: Duration,
    ) -> Result<Option<Value>, tokio::time::error::Elapsed> {
        Ok(match tokio::time::timeout(limit, self.read_event()).await? {
            Ok(event) => event,
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                panic!("every event is a JSON line: {e}")
            }
            Err(_) => None,
        })
    }

    /// The next event, or `None` at EOF (waits at most [`RawClient::PATIENCE`]).
    pub async fn next(&mut self) -> Option<Value> {
        self.next_within(Self::PATIENCE)
            .await
            .expect("an event within the time limit")
    }

    /// Reads until an event of type `event`; an `error` event on the way, or EOF, is an error.
    pub async fn try_until(&mut self, event: &str) -> io::Result<Value> {
        loop {
            let e = self.read_event().await?.ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("closed waiting for {event}"),
                )
            })?;
            if e["event"] == event {
                return Ok(e);
            }
            if e["event"] == "error" {
                return Err(io::Error::other(format!("waiting for {event}: {e}")));
            }
        }
    }

    /// Skips events (errors too) until one of type `event`.
    pub async fn until(&mut self, event: &str) -> Value {
        loop {
            let e = self
                .next()
                .await
                .unwrap_or_else(|| panic!("EOF waiting for {event}"));
            if e["event"] == event {
                return e;
            }
        }
    }

    /// Sends `request` and returns its answer: the next `ok` or `error` event.
    pub async fn ask(&mut self, request: Value) -> Value {
        self.send(request).await;
        loop {
            let e = self.next().await.expect("a reply before EOF");
            if e["event"] == "ok" || e["event"] == "error" {
                return e;
            }
        }
    }

    /// The code of the next `error` event.
    pub async fn error_code(&mut self) -> String {
        self.until("error").await["code"]
            .as_str()
            .expect("code")
            .to_string()
    }

    /// Pings and waits for the pong.
    pub async fn ping_ok(&mut self) {
        self.send(serde_json::json!({"op":"ping","id":"p"})).await;
        assert_eq!(self.until("pong").await["id"], "p");
    }
}
