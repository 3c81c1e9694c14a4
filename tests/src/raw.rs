//! A raw JSON-line client of the broker's socket, for tests that must see exactly what goes
//! over the wire (event order, error codes, bad input), as a netcat user would.

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
    /// The greeting.
    pub hello: Value,
}

impl RawClient {
    /// Connects and reads the greeting (which must be a `hello`).
    pub async fn open(path: &Path) -> RawClient {
        let s = UnixStream::connect(path).await.expect("connect");
        let (r, w) = s.into_split();
        let mut c = RawClient {
            r: BufReader::new(r),
            w,
            hello: Value::Null,
        };
        let hello = c.next().await.expect("greeting");
        assert_eq!(hello["event"], "hello", "{hello}");
        c.hello = hello;
        c
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.w.write_all(bytes).await.expect("write to the broker");
    }

    /// Sends one request line.
    pub async fn send(&mut self, v: Value) {
        let mut line = serde_json::to_vec(&v).expect("json");
        line.push(b'\n');
        self.send_raw(&line).await;
    }

    /// The next event, or `None` at EOF (waits at most 10 s).
    pub async fn next(&mut self) -> Option<Value> {
        self.next_within(Duration::from_secs(10))
            .await
            .expect("an event within the time limit")
    }

    /// The next event within `limit`: `Err` if none came, `Ok(None)` at EOF.
    pub async fn next_within(
        &mut self,
        limit: Duration,
    ) -> Result<Option<Value>, tokio::time::error::Elapsed> {
        let mut line = String::new();
        let n = tokio::time::timeout(limit, self.r.read_line(&mut line)).await?;
        match n {
            Ok(0) | Err(_) => Ok(None),
            Ok(_) => Ok(Some(serde_json::from_str(&line).expect("every event is JSON"))),
        }
    }

    /// Skips events until one of type `event`.
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
