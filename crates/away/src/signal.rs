//! The stop signals every long-running command treats alike: Ctrl-C (SIGINT) from a terminal
//! and SIGTERM from a supervisor, `timeout` or `kill`. Each command finishes or undoes what it
//! started on either, so a service manager stopping away leaves nothing behind.

use std::io;

use tokio::signal::unix::{signal, Signal, SignalKind};

/// Both handlers, installed at once: from `register_in` on, neither signal kills the process
/// with its default action, so a command registers before it creates what it must undo.
pub struct StopSignals {
    int: Signal,
    term: Signal,
}

impl StopSignals {
    /// Install both handlers on `rt`'s signal driver.
    pub fn register_in(rt: &tokio::runtime::Runtime) -> io::Result<Self> {
        let _in_rt = rt.enter();
        Ok(Self { int: signal(SignalKind::interrupt())?, term: signal(SignalKind::terminate())? })
    }

    /// Wait for the next SIGINT or SIGTERM; returns the name of the one that came.
    pub async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "SIGINT",
            _ = self.term.recv() => "SIGTERM",
        }
    }
}
