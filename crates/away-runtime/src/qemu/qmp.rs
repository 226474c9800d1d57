//! A small QMP client over a tokio `UnixStream`.
//!
//! Why not the `qapi` / `qapi-qmp` crates: their command types are generated at build
//! time from one QEMU version's schema (they lag QEMU 10, e.g. `file:` migration URIs
//! and `migrate-incoming` options), the generated code is large to compile, and the
//! async feature pulls futures, tokio-util, bytes and memchr. `away` sends about eight
//! commands with one or two arguments each; JSON lines with serde_json are enough.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("qmp socket {socket}: {source}")]
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
}

/// One QMP session (QEMU serves one client at a time, so keep sessions short).
pub struct Qmp {
    socket: String,
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    timeout: Duration,
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
        let mut qmp = Qmp { socket: name, reader: BufReader::new(r), writer: w, timeout };
        let greeting = qmp.read_message("greeting").await?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol {
                socket: qmp.socket.clone(),
                message: format!("unexpected greeting {greeting}"),
            });
        }
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// Run one command; Ok(its `return` value).
    pub async fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut line = msg.to_string();
        line.push('\n');
        let io = |source| QmpError::Io { socket: self.socket.clone(), source };
        self.writer.write_all(line.as_bytes()).await.map_err(io)?;
        loop {
            let reply = self.read_message(command).await?;
            // Asynchronous events (STOP, RESUME, MIGRATION, ...) arrive in between: skip them.
            if reply.get("event").is_some() {
                continue;
            }
            if let Some(ret) = reply.get("return") {
                return Ok(ret.clone());
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

    /// `query-status` -> the run state ("running", "paused", "inmigrate", "postmigrate", ...).
    pub async fn run_state(&mut self) -> Result<String, QmpError> {
        let v = self.execute("query-status", None).await?;
        Ok(v.get("status").and_then(Value::as_str).unwrap_or("unknown").to_string())
    }

    /// `query-migrate` -> (status, error description if any).
    pub async fn migration_status(&mut self) -> Result<(String, Option<String>), QmpError> {
        let v = self.execute("query-migrate", None).await?;
        let status = v.get("status").and_then(Value::as_str).unwrap_or("none").to_string();
        let err = v.get("error-desc").and_then(Value::as_str).map(str::to_string);
        Ok((status, err))
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
