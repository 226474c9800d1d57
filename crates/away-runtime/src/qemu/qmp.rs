//! A small QMP client over a tokio `UnixStream`.
//!
//! Why not the `qapi` / `qapi-qmp` crates: their command types are generated at build
//! time from one QEMU version's schema (they lag QEMU 10, e.g. `file:` migration URIs
//! and `migrate-incoming` options), the generated code is large to compile, and the
//! async feature pulls futures, tokio-util, bytes and memchr. `away` sends about a dozen
//! commands with one or two arguments each; JSON lines with serde_json are enough, and
//! [`commands`] types the few commands and replies by hand from QEMU's QAPI schema.
//!
//! Every command goes through one typed [`Qmp::execute`]: the command's type names it,
//! carries its arguments and says what its reply deserializes into.

pub mod block;
pub mod commands;

use std::collections::VecDeque;
use std::path::Path;
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

pub use commands::Command;
use commands::{QmpCapabilities, QueryStatus};

/// A failed QMP exchange. Each variant names the socket or the command; the cause of
/// [`QmpError::Io`], [`QmpError::Encode`] and [`QmpError::Decode`] is their `source()`,
/// not part of their text (render the chain with `away_model::error_chain`).
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("qmp socket {socket}")]
    Io {
        socket: String,
        #[source]
        source: std::io::Error,
    },
    #[error("qmp socket {socket}: no answer to {what} within {secs} s")]
    Timeout { socket: String, what: String, secs: u64 },
    #[error("qmp command {command} failed: {class}: {desc}")]
    Command { command: String, class: String, desc: String },
    #[error("qmp socket {socket}: {message}")]
    Protocol { socket: String, message: String },
    #[error("qmp command {command}: cannot encode its arguments")]
    Encode {
        command: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("qmp command {command}: unexpected reply {reply}")]
    Decode {
        command: &'static str,
        reply: String,
        #[source]
        source: serde_json::Error,
    },
}

/// One QMP session (QEMU serves one client at a time, so keep sessions short).
pub struct Qmp {
    socket: String,
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    timeout: Duration,
    /// Events that arrived between replies, oldest first (at most [`MAX_EVENTS`]).
    events: VecDeque<QmpEvent>,
}

/// Events kept per session; older ones are dropped first.
const MAX_EVENTS: usize = 1024;

/// An asynchronous QMP event (`STOP`, `RESUME`, `MIGRATION`, ...).
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    pub name: String,
    pub data: Value,
    /// When QEMU emitted it: its `timestamp` (the host's wall clock, microseconds).
    pub at: SystemTime,
}

impl QmpEvent {
    fn from_json(v: &Value) -> Option<QmpEvent> {
        let name = v.get("event")?.as_str()?.to_string();
        let ts = v.get("timestamp");
        let secs = ts.and_then(|t| t.get("seconds")).and_then(Value::as_u64).unwrap_or(0);
        let micros = ts.and_then(|t| t.get("microseconds")).and_then(Value::as_u64).unwrap_or(0);
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(micros);
        Some(QmpEvent { name, data: v.get("data").cloned().unwrap_or(Value::Null), at })
    }
}

impl Qmp {
    /// Connect, read the greeting and leave capabilities negotiation mode.
    /// `timeout` bounds each step and every later command.
    pub async fn connect(socket: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let name = socket.display().to_string();
        let stream = tokio::time::timeout(timeout, UnixStream::connect(socket))
            .await
            .map_err(|_| QmpError::Timeout { socket: name.clone(), what: "connect".into(), secs: timeout.as_secs() })?
            .map_err(|source| QmpError::Io { socket: name.clone(), source })?;
        let (r, w) = stream.into_split();
        let mut qmp = Qmp { socket: name, reader: BufReader::new(r), writer: w, timeout, events: VecDeque::new() };
        let greeting = qmp.read_message("greeting").await?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol {
                socket: qmp.socket.clone(),
                message: format!("unexpected greeting {greeting}"),
            });
        }
        qmp.execute(&QmpCapabilities).await?;
        Ok(qmp)
    }

    /// Run one command; Ok(its `return` value).
    pub async fn execute<C: Command>(&mut self, cmd: &C) -> Result<C::Reply, QmpError> {
        let command = C::NAME;
        let mut msg = json!({ "execute": command });
        match serde_json::to_value(cmd) {
            // A unit struct: a command without arguments.
            Ok(Value::Null) => {}
            Ok(arguments) => msg["arguments"] = arguments,
            Err(source) => return Err(QmpError::Encode { command, source }),
        }
        let mut line = msg.to_string();
        line.push('\n');
        let io = |source| QmpError::Io { socket: self.socket.clone(), source };
        self.writer.write_all(line.as_bytes()).await.map_err(io)?;
        loop {
            let reply = self.read_message(command).await?;
            // Asynchronous events (STOP, RESUME, MIGRATION, ...) arrive in between: keep them
            // for `take_events`.
            if reply.get("event").is_some() {
                if let Some(e) = QmpEvent::from_json(&reply) {
                    if self.events.len() == MAX_EVENTS {
                        self.events.pop_front();
                    }
                    self.events.push_back(e);
                }
                continue;
            }
            if let Some(ret) = reply.get("return") {
                return C::Reply::deserialize(ret).map_err(|source| QmpError::Decode {
                    command,
                    reply: ret.to_string(),
                    source,
                });
            }
            if let Some(err) = reply.get("error") {
                let s = |k: &str| err.get(k).and_then(Value::as_str).unwrap_or("").to_string();
                return Err(QmpError::Command { command: command.into(), class: s("class"), desc: s("desc") });
            }
            return Err(QmpError::Protocol {
                socket: self.socket.clone(),
                message: format!("unexpected reply to {command}: {reply}"),
            });
        }
    }

    /// The events received so far in this session (oldest first), emptying the buffer.
    /// Events are read while waiting for replies: run a command (e.g. `query-status`)
    /// to collect the ones QEMU sent since.
    pub fn take_events(&mut self) -> Vec<QmpEvent> {
        self.events.drain(..).collect()
    }

    /// The events named one of `names` received so far (oldest first), taken out of
    /// the buffer; the others stay for [`Qmp::take_events`].
    pub fn take_events_named(&mut self, names: &[&str]) -> Vec<QmpEvent> {
        let (taken, kept) = self.events.drain(..).partition(|e| names.contains(&e.name.as_str()));
        self.events = kept;
        taken.into()
    }

    /// `query-status` -> the run state ("running", "paused", "inmigrate", "postmigrate", ...).
    pub async fn run_state(&mut self) -> Result<String, QmpError> {
        Ok(self.execute(&QueryStatus).await?.status)
    }

    async fn read_message(&mut self, what: &str) -> Result<Value, QmpError> {
        let mut line = String::new();
        loop {
            line.clear();
            let n = tokio::time::timeout(self.timeout, self.reader.read_line(&mut line))
                .await
                .map_err(|_| QmpError::Timeout {
                    socket: self.socket.clone(),
                    what: what.into(),
                    secs: self.timeout.as_secs(),
                })?
                .map_err(|source| QmpError::Io { socket: self.socket.clone(), source })?;
            if n == 0 {
                return Err(QmpError::Protocol {
                    socket: self.socket.clone(),
                    message: format!("qemu closed the connection while waiting for {what}"),
                });
            }
            if line.trim().is_empty() {
                continue;
            }
            return serde_json::from_str(line.trim()).map_err(|e| QmpError::Protocol {
                socket: self.socket.clone(),
                message: format!("bad json ({e}): {}", line.trim()),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_keep_their_qemu_timestamp() {
        let v = json!({"event": "STOP", "timestamp": {"seconds": 1700000000, "microseconds": 250}});
        let e = QmpEvent::from_json(&v).unwrap();
        assert_eq!(e.name, "STOP");
        assert_eq!(e.data, Value::Null);
        assert_eq!(e.at.duration_since(SystemTime::UNIX_EPOCH).unwrap(), Duration::new(1_700_000_000, 250_000));
        assert!(QmpEvent::from_json(&json!({"return": {}})).is_none());
    }
}
