//! The emulated link between the two nodes of a run: `away-link`'s packet-level link
//! (two network namespaces joined by TUN devices, the default) or its split-TCP proxy.

use std::net::SocketAddr;

use away_link::packet::{run_in_netns, Endpoint, PacketLink};
use away_link::LinkProfile;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// How the link is emulated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LinkEmulator {
    /// `away_link::packet::PacketLink`: the source side runs in namespace A, the target
    /// side in namespace B, and every IP packet between them crosses the link model.
    #[default]
    Packet,
    /// `away_link::proxy`: a userspace TCP relay with rate and delay per direction.
    SplitTcpProxy,
}

impl LinkEmulator {
    /// What the report says about the emulation, with its limits.
    pub fn label(self) -> &'static str {
        match self {
            LinkEmulator::Packet => {
                "packet level: TUN between two network namespaces, rate/delay per IP packet; \
                 the endpoints' TCP sees the real round trip"
            }
            LinkEmulator::SplitTcpProxy => {
                "split-TCP proxy (away-link): TCP's behaviour over the long RTT is not reproduced; \
                 VM migration bytes queued in the relay count as sent"
            }
        }
    }

    /// Put the link in front of `upstream`: connections to the returned front's address
    /// reach `upstream` through the link. The link goes when the front is dropped.
    /// Only for [`LinkEmulator::SplitTcpProxy`]; the packet link is [`PacketSides::up`].
    pub async fn start(self, upstream: SocketAddr, profile: LinkProfile) -> std::io::Result<LinkFront> {
        match self {
            LinkEmulator::Packet => Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "the packet link has no front: run the endpoints in its namespaces",
            )),
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

/// A packet link for one run: side A (the source, 10.254.0.1) and side B (the target,
/// 10.254.0.2) are network namespaces. The namespaces go when this is dropped.
pub struct PacketSides {
    link: PacketLink,
}

impl PacketSides {
    /// Bring up `awl-<name>-a` and `awl-<name>-b` joined by `profile` in both directions.
    pub async fn up(name: &str, profile: LinkProfile) -> Result<PacketSides, String> {
        let owned = name.to_string();
        let link = tokio::task::spawn_blocking(move || PacketLink::up(&owned, profile))
            .await
            .map_err(|e| format!("packet link {name}: {e}"))?
            .map_err(|e| format!("packet link {name}: {}", away_model::ErrorChain(&e)))?;
        Ok(PacketSides { link })
    }

    /// A short, valid link name for run `run` of this process.
    pub fn name_for(run: u32) -> String {
        format!("lab{}-{run}", std::process::id() % 100_000)
    }

    pub fn a(&self) -> &Endpoint {
        self.link.a()
    }

    pub fn b(&self) -> &Endpoint {
        self.link.b()
    }

    /// `nsenter` arguments that put a command into `end`'s network namespace only
    /// (not `ip netns exec`, which remounts /sys and breaks runc's cgroups).
    pub fn nsenter_args(end: &Endpoint) -> Vec<String> {
        vec![format!("--net=/run/netns/{}", end.netns), "--".into()]
    }

    /// Whether a TCP connection from side A to `addr` succeeds within `limit`.
    pub async fn connect_from_a(&self, addr: SocketAddr, limit: std::time::Duration) -> bool {
        let netns = self.a().netns.clone();
        tokio::task::spawn_blocking(move || {
            run_in_netns(&netns, move || std::net::TcpStream::connect_timeout(&addr, limit).is_ok()).unwrap_or(false)
        })
        .await
        .unwrap_or(false)
    }

    /// Stop forwarding and delete the namespaces (off the async threads: it joins the
    /// forwarders and runs `ip`).
    pub async fn down(self) {
        let link = self.link;
        let _ = tokio::task::spawn_blocking(move || {
            if let Err(e) = link.down() {
                tracing::warn!("packet link down: {e}");
            }
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn packet_is_the_default() {
        assert_eq!(LinkEmulator::default(), LinkEmulator::Packet);
        assert!(LinkEmulator::Packet.label().starts_with("packet level"));
        assert_eq!(serde_json::to_string(&LinkEmulator::Packet).unwrap(), "\"packet\"");
        let name = PacketSides::name_for(999);
        assert!(name.len() <= 20, "{name}");
    }

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
