//! `away link`: emulate a network link in userspace (this kernel has no netem).

use std::net::SocketAddr;
use std::process::ExitCode;

use away_link::{parse_duration, LinkModel, LinkProfile, Rate};

/// The link's properties, shared by both modes.
#[derive(clap::Args)]
pub struct LinkArgs {
    /// Rate, e.g. 37mbit, 1gbit, 10MB (bytes/s) or unlimited
    #[arg(long, default_value = "37mbit")]
    rate: Rate,
    /// One-way delay, e.g. 36.784ms
    #[arg(long, default_value = "36.784ms", value_parser = parse_duration)]
    delay: std::time::Duration,
    /// Extra uniform delay per packet in [0, jitter) (order is kept)
    #[arg(long, default_value = "0ms", value_parser = parse_duration)]
    jitter: std::time::Duration,
    /// Share of packets lost, 0..1
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// Router queue: how far ahead of the wire a sender may get before packets are dropped
    #[arg(long, default_value = "200ms", value_parser = parse_duration)]
    queue: std::time::Duration,
}

impl LinkArgs {
    fn model(&self) -> anyhow::Result<LinkModel> {
        anyhow::ensure!((0.0..1.0).contains(&self.loss), "--loss {}: a share in [0, 1)", self.loss);
        let profile =
            LinkProfile { rate_bits_per_sec: self.rate.0, delay: self.delay, jitter: self.jitter, queue: self.queue };
        Ok(LinkModel::with_loss(profile, self.loss))
    }
}

#[derive(clap::Subcommand)]
pub enum Command {
    /// Packet level (the main mode): two network namespaces joined by TUN devices, every
    /// IP packet delayed and rate-limited, so the endpoints' own TCP sees the real round
    /// trip. Runs until Ctrl-C or SIGTERM, then removes the namespaces.
    ///
    /// Example: away link up wan --rate 37mbit --delay 36.784ms
    ///          ip netns exec awl-wan-b iperf3 -s & ip netns exec awl-wan-a iperf3 -c 10.254.0.2
    Up {
        /// Link name: namespaces awl-NAME-a (10.254.0.1) and awl-NAME-b (10.254.0.2)
        name: String,
        #[command(flatten)]
        link: LinkArgs,
    },
    /// TCP proxy (quick use): relay connections from --listen to --upstream through the
    /// link model. Split TCP: the ends do not see the long round trip's TCP behaviour.
    ///
    /// Example: away link proxy --listen 127.0.0.1:9000 --upstream 127.0.0.1:7801 --rate 37mbit --delay 36.784ms
    Proxy {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        upstream: SocketAddr,
        #[command(flatten)]
        link: LinkArgs,
    },
}

pub fn run(cmd: Command) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    // before anything is created: a stop signal from here on undoes it instead of killing us
    let mut stops = crate::signal::StopSignals::register_in(&rt)?;
    match cmd {
        Command::Up { name, link } => {
            let model = link.model()?;
            let up = away_link::packet::PacketLink::up(&name, model)?;
            println!(
                "link {name} up: {} ({}) <-> {} ({}), {} one way, {}",
                up.a().netns,
                up.a().addr,
                up.b().netns,
                up.b().addr,
                humantime(link.delay),
                link.rate
            );
            println!("Ctrl-C or SIGTERM removes it");
            let why = rt.block_on(stops.next());
            let stats = up.stats();
            up.down()?;
            println!("link {name} down ({why}); forwarded {stats:?}");
        }
        Command::Proxy { listen, upstream, link } => {
            let model = link.model()?;
            rt.block_on(async {
                let l = tokio::net::TcpListener::bind(listen).await?;
                eprintln!("relaying {listen} -> {upstream} at {}, {} one way", link.rate, humantime(link.delay));
                tokio::select! {
                    r = away_link::proxy_with(l, upstream, model) => r,
                    _ = stops.next() => Ok(()),
                }
            })?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn humantime(d: std::time::Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}
