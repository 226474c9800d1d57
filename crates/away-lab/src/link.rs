//! The emulated link between the two nodes of a run. Today it is `away-link`'s
//! split-TCP proxy; the packet-level emulator is to be another variant of
//! [`LinkEmulator`], started the same way.

use std::net::SocketAddr;

use away_link::LinkProfile;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// How the link is emulated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LinkEmulator {
    /// `away_link::proxy`: a userspace TCP relay with rate and delay per direction.
    #[default]
    SplitTcpProxy,
}

impl LinkEmulator {
    /// What the report says about the emulation, with its limits.
    pub fn label(self) -> &'static str {
        match self {
            LinkEmulator::SplitTcpProxy => {
                "split-TCP proxy (away-link): TCP's behaviour over the long RTT is not reproduced; \
                 VM migration bytes queued in the relay count as sent"
            }
        }
    }

    /// Put the link in front of `upstream`: connections to the returned front's address
    /// reach `upstream` through the link. The link goes when the front is dropped.
    pub async fn start(self, upstream: SocketAddr, profile: LinkProfile) -> std::io::Result<LinkFront> {
        match self {
            LinkEmulator::SplitTcpProxy => {
                let listener = TcpListener::bind("127.0.0.1:0").await?;
                let addr = listener.local_addr()?;
                let task = tokio::spawn(away_link::proxy(listener, upstream, profile));
                Ok(LinkFront { addr, task })
            }
        }
    }
}

/// A running link: connect to `addr` to reach the upstream through it.
#[derive(Debug)]
pub struct LinkFront {
    pub addr: SocketAddr,
    task: JoinHandle<std::io::Result<()>>,
}

impl Drop for LinkFront {
    fn drop(&mut self) {
        // Stops accepting; relays of open connections end when their connections close.
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn proxy_front_relays_with_delay() {
        let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up = upstream.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = upstream.accept().await.unwrap();
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).await.unwrap();
            s.write_all(&buf).await.unwrap();
        });
        let profile = LinkProfile { delay: std::time::Duration::from_millis(20), ..LinkProfile::lan() };
        let front = LinkEmulator::SplitTcpProxy.start(up, profile).await.unwrap();
        let t0 = std::time::Instant::now();
        let mut c = tokio::net::TcpStream::connect(front.addr).await.unwrap();
        c.write_all(b"hello").await.unwrap();
        let mut back = [0u8; 5];
        c.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"hello");
        assert!(t0.elapsed() >= std::time::Duration::from_millis(40), "{:?}", t0.elapsed());
    }
}
