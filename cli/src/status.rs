//! `elector status`: the node's elections, from the broker's `/elections` (HTTP).
//!
//! The socket's `status` op describes only the asking connection's own campaigns and
//! observations, so a fresh connection would see nothing; `/elections` covers every election of
//! the node, with its local candidates.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde::Deserialize;

use crate::{StatusArgs, exit};

const TIMEOUT: Duration = Duration::from_secs(10);

/// What can go wrong reading `/elections`.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(
        "cannot reach the elector broker's HTTP endpoint at {addr}: {reason} (is electord running \
         with --http-addr {addr}? --http-addr or ELECTOR_HTTP_ADDR name another address)"
    )]
    Unreachable { addr: String, reason: String },
    #[error("the broker at {addr} answered /elections with HTTP {status}: {body}")]
    Status { addr: String, status: u16, body: String },
    #[error("the broker at {addr} sent /elections that this elector cannot read: {reason}")]
    Invalid { addr: String, reason: String },
}

/// One election of `/elections` (the fields shown; others are ignored).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct ElectionRow {
    pub namespace: String,
    pub election: String,
    pub lock: String,
    pub leader: Option<String>,
    pub term: Option<u64>,
    /// Set when the broker cannot tell who leads.
    #[serde(default)]
    pub unknown: Option<String>,
    #[serde(default)]
    pub held_by_this_broker: bool,
    #[serde(default)]
    pub candidates: Vec<CandidateRow>,
    #[serde(default)]
    pub observers: usize,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct CandidateRow {
    pub identity: String,
    #[serde(default)]
    pub priority: i32,
    #[serde(default)]
    pub is_leader: bool,
}

/// GETs `/elections` from `addr`: the body as sent, and parsed.
async fn fetch(addr: &str) -> Result<(String, Vec<ElectionRow>), StatusError> {
    let unreachable = |reason: String| StatusError::Unreachable {
        addr: addr.to_string(),
        reason,
    };
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    tokio::spawn(connection);
    let request = hyper::Request::get("/elections")
        .header(hyper::header::HOST, addr)
        .body(Empty::<Bytes>::new())
        .map_err(|e| unreachable(format!("invalid address: {e}")))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| unreachable(e.to_string()))?
        .to_bytes();
    let body = String::from_utf8_lossy(&body).into_owned();
    if status != 200 {
        return Err(StatusError::Status {
            addr: addr.to_string(),
            status,
            body,
        });
    }
    let rows = serde_json::from_str(&body).map_err(|e| StatusError::Invalid {
        addr: addr.to_string(),
        reason: e.to_string(),
    })?;
    Ok((body, rows))
}

/// The table for people: one line per election, columns aligned.
pub fn table(rows: &[ElectionRow]) -> String {
    let header = [
        "NAMESPACE",
        "ELECTION",
        "LOCK",
        "LEADER",
        "TERM",
        "HELD HERE",
        "LOCAL CANDIDATES",
        "OBSERVERS",
    ];
    let mut lines: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
    for r in rows {
        let leader = match (&r.unknown, &r.leader) {
            (Some(_), _) => "<unknown>".to_string(),
            (None, Some(l)) => l.clone(),
            (None, None) => "<none>".to_string(),
        };
        let candidates = if r.candidates.is_empty() {
            "-".to_string()
        } else {
            r.candidates
                .iter()
                .map(|c| {
                    let star = if c.is_leader { "*" } else { "" };
                    let prio = if c.priority != 0 {
                        format!("(p{})", c.priority)
                    } else {
                        String::new()
                    };
                    format!("{}{star}{prio}", c.identity)
                })
                .collect::<Vec<_>>()
                .join(",")
        };
        lines.push(vec![
            r.namespace.clone(),
            r.election.clone(),
            r.lock.clone(),
            leader,
            r.term.map(|t| t.to_string()).unwrap_or_else(|| "-".into()),
            if r.held_by_this_broker { "yes" } else { "no" }.into(),
            candidates,
            r.observers.to_string(),
        ]);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|i| lines.iter().map(|l| l[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for l in &lines {
        let cells: Vec<String> = l.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

pub async fn status(args: StatusArgs) -> anyhow::Result<u8> {
    let (body, rows) = tokio::time::timeout(TIMEOUT, fetch(&args.http_addr))
        .await
        .map_err(|_| StatusError::Unreachable {
            addr: args.http_addr.clone(),
            reason: format!("no answer within {TIMEOUT:?}"),
        })??;
    if args.json {
        println!("{}", body.trim_end());
    } else if rows.is_empty() {
        println!("no elections on this node");
    } else {
        print!("{}", table(&rows));
        for r in rows.iter().filter(|r| r.unknown.is_some()) {
            println!(
                "{}/{}: who leads is unknown: {}",
                r.namespace,
                r.election,
                r.unknown.as_deref().unwrap_or_default()
            );
        }
    }
    Ok(exit::OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_marks_the_local_leader_and_aligns() {
        let rows: Vec<ElectionRow> = serde_json::from_str(
            r#"[{"election":"job","namespace":"default","lock":"lease","leader":"pod-a","term":2,
                 "held_by_this_broker":true,"observers":1,"last_renew":null,
                 "candidates":[{"identity":"pod-a","priority":0,"is_leader":true},
                               {"identity":"pod-b","priority":5,"is_leader":false}]},
                {"election":"web-frontend","namespace":"team-a","lock":"endpoints","leader":null,
                 "term":null,"held_by_this_broker":false,"observers":0,"candidates":[]}]"#,
        )
        .unwrap();
        let t = table(&rows);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        assert!(lines[0].starts_with("NAMESPACE  ELECTION      LOCK"), "{t}");
        assert!(lines[1].contains("pod-a*,pod-b(p5)"), "{t}");
        assert!(lines[2].contains("<none>"), "{t}");
        let col = lines[0].find("LEADER").unwrap();
        assert_eq!(&lines[1][col..col + 5], "pod-a", "{t}");
    }
}
