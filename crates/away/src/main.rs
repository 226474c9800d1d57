//! `away`: the one binary users type. Parses arguments and calls the libraries;
//! behaviour lives in the `away-*` crates so that tests can reach it.

mod broker;
mod cluster;
mod demo;
mod doctor;
mod image;
mod lab;
mod link;
mod migrate;
mod node;
mod output;
mod signal;
mod token;
mod workload;

use clap::{Parser, Subcommand};

/// Run lab workloads as OCI containers when possible and as QEMU VMs otherwise,
/// and move them between cloud, edge and client machines while they run.
#[derive(Parser)]
#[command(name = "away", version, propagate_version = true, max_term_width = 100)]
struct Cli {
    /// Log filter, e.g. `info` or `away_runtime=debug` (also RUST_LOG)
    #[arg(long, global = true, env = "AWAY_LOG", default_value = "warn")]
    log: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The main demo: scale a running lab app away from the cloud to a student's laptop
    Demo(demo::DemoArgs),
    /// Check this host: container runtimes, CRIU, QEMU, KVM, kernel features
    Doctor(doctor::Args),
    /// Build, inspect and convert lab app images (OCI layout, docker-archive, VM boot artifact)
    #[command(subcommand)]
    Image(image::Command),
    /// Run a workload from a spec or an image: a container when possible, a VM otherwise
    Run(workload::RunArgs),
    /// List workloads on this node
    Ps(workload::PsArgs),
    /// Print a workload's output
    Logs(workload::LogsArgs),
    /// Stop a workload
    Stop(workload::StopArgs),
    /// Remove a workload
    Rm(workload::RmArgs),
    /// Run the broker (HTTP API, placement, agents' heartbeats)
    Broker(broker::BrokerArgs),
    // (their help, with examples, is the args structs' own doc)
    Agent(migrate::AgentArgs),
    Migrate(migrate::MigrateArgs),
    /// List or prune checkpoint archives
    #[command(subcommand)]
    Archives(migrate::ArchivesCommand),
    /// The comparison experiments: VM vs container migration
    #[command(subcommand)]
    Lab(lab::Command),
    /// Emulate a network link (rate, delay, jitter, loss) in userspace
    #[command(subcommand)]
    Link(link::Command),
    /// Run a whole cluster on this machine (broker + agents in network namespaces)
    #[command(subcommand)]
    Cluster(cluster::Command),
    /// Make, list and revoke a broker's join tokens and users' tokens
    ///
    /// A new node registers with a join token (AWAY_JOIN_TOKEN of its agent). One made here
    /// can expire and be revoked; nodes that joined with it keep working (they use their
    /// certificates). A user's token (--user NAME) lets that user use the broker's whole
    /// user API (submit, move, logs, events, the dashboard) until it expires or is revoked;
    /// it does not manage tokens. Managing tokens needs an admin token (one of the broker's
    /// --user-token), from AWAY_USER_TOKEN, never the command line.
    ///
    /// Examples:
    ///   away token create --broker https://10.0.0.1:7700 --ca ca.pem --expires 1h --label laptop-anna
    ///   away token create --broker https://10.0.0.1:7700 --ca ca.pem --user anna --expires 30d
    ///   away token list --broker https://10.0.0.1:7700 --ca ca.pem
    ///   away token revoke ut-1a2b3c4d5e6f --broker https://10.0.0.1:7700 --ca ca.pem
    #[command(subcommand, verbatim_doc_comment)]
    Token(token::Command),
    /// List a broker's nodes and revoke a lost or stolen one
    ///
    /// The user token comes from AWAY_USER_TOKEN, never the command line.
    ///
    /// Examples:
    ///   away node list --broker https://10.0.0.1:7700 --ca ca.pem
    ///   away node revoke laptop-anna --broker https://10.0.0.1:7700 --ca ca.pem
    #[command(subcommand, verbatim_doc_comment)]
    Node(node::Command),
}

fn main() -> std::process::ExitCode {
    // `away doctor` runs away itself as the process its CRIU stack-page probe dumps
    away_runtime::host::criu_stack::serve_if_asked();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cli.log)),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Doctor(args) => doctor::run(args),
        Command::Demo(a) => demo::run(a),
        Command::Image(cmd) => image::run(cmd),
        Command::Run(a) => workload::run(a),
        Command::Ps(a) => workload::ps(a),
        Command::Logs(a) => workload::logs(a),
        Command::Stop(a) => workload::stop(a),
        Command::Rm(a) => workload::rm(a),
        Command::Broker(a) => broker::run(a),
        Command::Agent(a) => migrate::agent(a),
        Command::Migrate(a) => migrate::migrate(a),
        Command::Archives(c) => migrate::archives(c),
        Command::Cluster(c) => cluster::run(c),
        Command::Link(c) => link::run(c),
        Command::Lab(c) => lab::run(c),
        Command::Token(c) => token::run(c),
        Command::Node(c) => node::run(c),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    /// The libraries read the e2e tests' `AWAY_FAULT_*` variables only when this binary
    /// asked for it (`--features fault-injection`, tests/src/lib.rs): a crate that
    /// turned the libraries' feature on through Cargo.toml would put it, by feature
    /// unification, into the `away` of `cargo build --workspace` and `cargo test`.
    #[test]
    fn fault_injection_only_when_asked_for() {
        let asked = cfg!(feature = "fault-injection");
        assert_eq!(away_migrate::FAULT_INJECTION, asked, "away-migrate's fault-injection feature leaked in");
        assert_eq!(away_agent::FAULT_INJECTION, asked, "away-agent's fault-injection feature leaked in");
    }
}
