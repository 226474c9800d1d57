//! Userspace link emulation: this machine's kernel has no `tc netem`, so delay and rate
//! are applied by a process in the path. Two modes (see `docs/link.md` for measurements):
//!
//! - [`packet`]: the main mode. Two network namespaces joined by TUN devices; every IP
//!   packet passes through a link model in this process (token bucket at the rate,
//!   drop-tail router queue, delay with optional jitter, random loss). The endpoints'
//!   own TCP sees the real round trip, slow start and congestion window, as over netem.
//! - [`proxy`] / [`proxy_with`]: a TCP relay for quick use, each direction through the
//!   same model applied to relayed chunks. It is split TCP: both ends see a fast local
//!   peer, not the emulated round trip, so TCP's behaviour over the long path (slow
//!   start, congestion window) is not reproduced, and a sender counts bytes still queued
//!   in the relay as sent.

pub mod packet;

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant};

/// A link's properties, per direction.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LinkProfile {
    /// Bits per second; `f64::INFINITY` for no limit.
    pub rate_bits_per_sec: f64,
    /// One-way delay.
    pub delay: Duration,
    /// Uniform extra delay in [0, jitter) per segment (order is kept).
    pub jitter: Duration,
    /// Router queue: how far ahead of the wire the sender may get before it waits.
    pub queue: Duration,
}

impl LinkProfile {
    /// The research's WAN: 37 Mbit/s with 36.784 ms one-way delay.
    pub fn wan() -> Self {
        LinkProfile {
            rate_bits_per_sec: 37e6,
            delay: Duration::from_micros(36_784),
            jitter: Duration::ZERO,
            queue: Duration::from_millis(200),
        }
    }

    /// The research's LAN: 938 Mbit/s net, negligible delay.
    pub fn lan() -> Self {
        LinkProfile {
            rate_bits_per_sec: 938e6,
            delay: Duration::from_micros(100),
            jitter: Duration::ZERO,
            queue: Duration::from_millis(50),
        }
    }

    /// Time `bytes` take on the wire at this rate.
    pub fn wire_time(&self, bytes: u64) -> Duration {
        if self.rate_bits_per_sec.is_infinite() {
            return Duration::ZERO;
        }
        Duration::from_secs_f64(bytes as f64 * 8.0 / self.rate_bits_per_sec)
    }

    /// The round-trip time.
    pub fn rtt(&self) -> Duration {
        self.delay * 2
    }
}

/// A [`LinkProfile`] with random loss, the whole model one direction of a link applies.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LinkModel {
    #[serde(flatten)]
    pub profile: LinkProfile,
    /// Probability in [0, 1] that a packet (packet mode) is dropped, or that a relayed
    /// chunk (proxy mode) needs a retransmission.
    #[serde(default)]
    pub loss: f64,
}

impl From<LinkProfile> for LinkModel {
    fn from(profile: LinkProfile) -> Self {
        LinkModel { profile, loss: 0.0 }
    }
}

impl LinkModel {
    /// The same link with loss probability `loss`.
    pub fn with_loss(profile: LinkProfile, loss: f64) -> Self {
        LinkModel { profile, loss: loss.clamp(0.0, 1.0) }
    }
}

/// A rate such as `37mbit`, `1gbit`, `500kbit`, `10MB` (bytes), or `unlimited`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate(pub f64);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("rate {0:?}: expected e.g. 37mbit, 1gbit, 500kbit, 10MB (bytes/s) or unlimited")]
    Rate(String),
    #[error("duration {0:?}: expected e.g. 36.784ms, 2s, 500us")]
    Duration(String),
}

impl FromStr for Rate {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        if t.eq_ignore_ascii_case("unlimited") {
            return Ok(Rate(f64::INFINITY));
        }
        let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
        let n: f64 = t[..split].parse().map_err(|_| ParseError::Rate(s.into()))?;
        let mult = match &t[split..] {
            "bit" | "bps" => 1.0,
            "kbit" => 1e3,
            "mbit" => 1e6,
            "gbit" => 1e9,
            "B" => 8.0,
            "KB" | "kB" => 8e3,
            "MB" => 8e6,
            "GB" => 8e9,
            _ => return Err(ParseError::Rate(s.into())),
        };
        Ok(Rate(n * mult))
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_infinite() {
            f.write_str("unlimited")
        } else {
            write!(f, "{}mbit", self.0 / 1e6)
        }
    }
}

/// `36.784ms`, `2s`, `500us`.
pub fn parse_duration(s: &str) -> Result<Duration, ParseError> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let n: f64 = t[..split].parse().map_err(|_| ParseError::Duration(s.into()))?;
    let secs = match &t[split..] {
        "s" => n,
        "ms" => n / 1e3,
        "us" => n / 1e6,
        _ => return Err(ParseError::Duration(s.into())),
    };
    Ok(Duration::from_secs_f64(secs))
}

/// A tiny xorshift for jitter and loss draws (no rand crate for uniform draws).
struct Xorshift(u64);
impl Xorshift {
    fn new(seed: u64) -> Self {
        Xorshift(seed | 1)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [0, max).
    fn duration(&mut self, max: Duration) -> Duration {
        if max.is_zero() {
            return Duration::ZERO;
        }
        max.mul_f64(self.unit())
    }
}

/// Forward one direction through the link model until either side closes.
async fn pipe(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, model: LinkModel, seed: u64) {
    let link = model.profile;
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(4096);
    let writer = tokio::spawn(async move {
        while let Some((at, bytes)) = rx.recv().await {
            sleep_until(at).await;
            if to.write_all(&bytes).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    });
    let mut next_free = Instant::now();
    let mut last_due = Instant::now();
    let mut rng = Xorshift::new(0x9E37_79B9_7F4A_7C15 ^ seed);
    let mut buf = vec![0u8; 16 << 10];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let now = Instant::now();
        next_free = next_free.max(now) + link.wire_time(n as u64);
        // a full router queue pushes back on the sender instead of growing forever
        if next_free > now + link.queue {
            sleep_until(next_free - link.queue).await;
        }
        // a lost segment comes one round trip late (TCP's fast retransmit), holding up
        // the stream behind it
        let mut due = next_free + link.delay + rng.duration(link.jitter);
        if model.loss > 0.0 && rng.unit() < model.loss {
            due += link.rtt();
        }
        // jitter never reorders: a segment is due no earlier than the one before it
        let due = due.max(last_due);
        last_due = due;
        if tx.send((due, buf[..n].to_vec())).await.is_err() {
            break;
        }
    }
    drop(tx);
    let _ = writer.await;
}

/// Relay every connection accepted on `listener` to `upstream` through `link` (both
/// directions). Runs until the listener fails.
pub async fn proxy(listener: TcpListener, upstream: SocketAddr, link: LinkProfile) -> std::io::Result<()> {
    proxy_with(listener, upstream, link.into()).await
}

/// [`proxy`] with loss: a relayed chunk counted as lost arrives one round trip late, as
/// after a fast retransmit (a byte stream cannot lose bytes). Runs until the listener
/// fails.
pub async fn proxy_with(listener: TcpListener, upstream: SocketAddr, link: LinkModel) -> std::io::Result<()> {
    let mut seed = 0u64;
    loop {
        let (client, peer) = listener.accept().await?;
        let server = match TcpStream::connect(upstream).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(%peer, %upstream, "cannot reach upstream: {e}");
                continue;
            }
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        let (cr, cw) = client.into_split();
        let (sr, sw) = server.into_split();
        seed += 2;
        tokio::spawn(pipe(cr, sw, link, seed));
        tokio::spawn(pipe(sr, cw, link, seed + 1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_and_durations_parse() {
        assert_eq!("37mbit".parse::<Rate>().unwrap().0, 37e6);
        assert_eq!("1gbit".parse::<Rate>().unwrap().0, 1e9);
        assert_eq!("10MB".parse::<Rate>().unwrap().0, 80e6);
        assert!("unlimited".parse::<Rate>().unwrap().0.is_infinite());
        assert!("fast".parse::<Rate>().is_err());
        assert_eq!(parse_duration("36.784ms").unwrap(), Duration::from_micros(36_784));
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert!(parse_duration("2 fortnights").is_err());
    }

    /// The proxy delivers at the set rate and adds the set delay (loopback upstream).
    #[tokio::test]
    async fn proxy_keeps_rate_and_delay() {
        let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up_addr = upstream.local_addr().unwrap();
        // upstream: echo one byte for the latency probe, then swallow everything and count
        let counter = tokio::spawn(async move {
            let (mut s, _) = upstream.accept().await.unwrap();
            let mut b = [0u8; 1];
            s.read_exact(&mut b).await.unwrap();
            s.write_all(&b).await.unwrap();
            // the rate from the first data to the last: the echo's trip back and the
            // data's trip out (a round trip) are delay, not rate
            let (mut total, mut first) = (0u64, None);
            let mut buf = vec![0u8; 64 << 10];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) if first.is_none() => first = Some((Instant::now(), n as u64)),
                    Ok(n) => total += n as u64,
                }
            }
            let (start, first_n) = first.unwrap();
            (total, first_n, start.elapsed())
        });
        let link = LinkProfile {
            rate_bits_per_sec: 37e6,
            delay: Duration::from_millis(20),
            jitter: Duration::ZERO,
            queue: Duration::from_millis(50),
        };
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let front_addr = front.local_addr().unwrap();
        tokio::spawn(proxy(front, up_addr, link));
        let mut c = TcpStream::connect(front_addr).await.unwrap();
        let t = Instant::now();
        c.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        c.read_exact(&mut b).await.unwrap();
        let rtt = t.elapsed();
        assert!(rtt >= Duration::from_millis(40) && rtt < Duration::from_millis(60), "rtt {rtt:?}");
        let data = vec![7u8; 4 << 20];
        c.write_all(&data).await.unwrap();
        c.shutdown().await.unwrap();
        let (total, first_n, took) = counter.await.unwrap();
        assert_eq!(first_n + total, 4 << 20);
        let mbit = total as f64 * 8.0 / took.as_secs_f64() / 1e6;
        eprintln!("proxy: {mbit:.2} Mbit/s for 37, round trip {rtt:?} for 40 ms");
        assert!((mbit - 37.0).abs() / 37.0 < 0.02, "achieved {mbit:.2} Mbit/s for 37");
    }
}
