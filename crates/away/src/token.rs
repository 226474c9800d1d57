//! `away token`: the broker's join tokens (`/v1/join-tokens`), made, listed and revoked
//! with a user token from the environment.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use away_model::{JoinTokenRequest, JoinTokenView};

use crate::output::print_json;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Make a join token; its secret is printed this once (alone on stdout, or in --json)
    Create {
        #[command(flatten)]
        broker: BrokerArgs,
        /// It stops working after this long: 90s, 30m, 12h, 7d [default: never]
        #[arg(long, value_parser = parse_expiry, value_name = "DURATION")]
        expires: Option<u64>,
        /// What it is for, shown by `away token list`
        #[arg(long)]
        label: Option<String>,
        /// Print {id, token, expires_unix_ms} as JSON
        #[arg(long)]
        json: bool,
    },
    /// List the join tokens made over the API (not the broker's configured one), without secrets
    List {
        #[command(flatten)]
        broker: BrokerArgs,
        /// Print the list as JSON
        #[arg(long)]
        json: bool,
    },
    /// Revoke a join token: no node registers with it from now on
    Revoke {
        /// The token's id (jt-…), from `away token create` or `list`
        id: String,
        #[command(flatten)]
        broker: BrokerArgs,
        /// Print the revoked token as JSON
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
pub struct BrokerArgs {
    /// The broker's URL (https://host:port; http:// for one started with --insecure-loopback)
    #[arg(long, value_name = "URL")]
    broker: String,
    /// The broker's CA certificate (its ca.pem), the only root trusted for it
    #[arg(long, env = "AWAY_CA", value_name = "FILE")]
    ca: Option<PathBuf>,
}

impl BrokerArgs {
    fn client(&self) -> anyhow::Result<away_client::Client> {
        // only from the environment: a token on the command line is readable by every user (ps)
        let token = std::env::var("AWAY_USER_TOKEN")
            .ok()
            .filter(|t| !t.trim().is_empty())
            .context("away token needs a user token of the broker: set AWAY_USER_TOKEN")?;
        let ca = match &self.ca {
            Some(path) => Some(away_identity::read_ca_file(path)?),
            None => None,
        };
        Ok(away_client::Client::with_ca(&self.broker, token, ca.as_deref())?)
    }
}

pub fn run(cmd: Command) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        match cmd {
            Command::Create { broker, expires, label, json } => {
                let req = JoinTokenRequest { expires_in_s: expires, label };
                let made = broker.client()?.create_join_token(&req).await.context("create a join token")?;
                if json {
                    print_json(&made)?;
                } else {
                    // the secret alone on stdout (AWAY_JOIN_TOKEN=$(away token create …)), words on stderr
                    println!("{}", made.token);
                    eprintln!(
                        "join token {} ({}): give it to the new node's agent as AWAY_JOIN_TOKEN (environment, not \
                         its command line); it is not shown again. Revoke it with `away token revoke {}`",
                        made.id,
                        expiry(made.expires_unix_ms, now_ms()),
                        made.id
                    );
                }
            }
            Command::List { broker, json } => {
                let list = broker.client()?.join_tokens().await.context("list join tokens")?;
                if json {
                    print_json(&list)?;
                } else {
                    print_list(&list, now_ms());
                }
            }
            Command::Revoke { id, broker, json } => {
                let t =
                    broker.client()?.revoke_join_token(&id).await.with_context(|| format!("revoke join token {id}"))?;
                if json {
                    print_json(&t)?;
                } else {
                    println!("join token {} revoked: no node registers with it any more", t.id);
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

fn print_list(list: &[JoinTokenView], now: u64) {
    if list.is_empty() {
        println!("no join tokens made over the API (the broker's AWAY_JOIN_TOKEN is not listed)");
        return;
    }
    println!("{:<17} {:<8} {:<26} LABEL", "ID", "STATE", "EXPIRES");
    for t in list {
        let expires = match t.revoked_unix_ms {
            Some(at) => format!("revoked {} ago", span(now.saturating_sub(at))),
            None => expiry(t.expires_unix_ms, now),
        };
        println!("{:<17} {:<8} {:<26} {}", t.id, t.state.as_str(), expires, t.label.as_deref().unwrap_or("-"));
    }
}

/// "expires in 59m 58s", "expired 2h ago", "never expires".
fn expiry(expires_unix_ms: Option<u64>, now: u64) -> String {
    match expires_unix_ms {
        None => "never expires".into(),
        Some(at) if at > now => format!("expires in {}", span(at - now)),
        Some(at) => format!("expired {} ago", span(now - at)),
    }
}

/// A span in its two largest units: `3d 4h`, `59m 58s`, `12s`.
fn span(ms: u64) -> String {
    let s = ms / 1000;
    let (d, h, m, s) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// `90s`, `30m`, `12h`, `7d` as seconds. Hand-written: four units are all a join
/// token's lifetime needs, not worth a dependency.
fn parse_expiry(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let unit = match &t[split..] {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{text:?}: give a whole number with s, m, h or d, e.g. 30m or 7d")),
    };
    let n: u64 =
        t[..split].parse().map_err(|_| format!("{text:?}: give a whole number with s, m, h or d, e.g. 30m"))?;
    match n.checked_mul(unit) {
        Some(0) => Err(format!("{text:?}: a token must live at least 1 s")),
        Some(s) if s <= away_model::MAX_JOIN_TOKEN_LIFETIME_S => Ok(s),
        _ => Err(format!("{text:?}: at most 10 years (3650d); leave --expires out for no expiry")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_durations_parse_and_bad_ones_name_the_problem() {
        assert_eq!(parse_expiry("90s"), Ok(90));
        assert_eq!(parse_expiry("30m"), Ok(1800));
        assert_eq!(parse_expiry("1h"), Ok(3600));
        assert_eq!(parse_expiry("7d"), Ok(604_800));
        assert!(parse_expiry("0s").unwrap_err().contains("at least 1 s"));
        assert!(parse_expiry("1w").unwrap_err().contains("s, m, h or d"));
        assert!(parse_expiry("h").unwrap_err().contains("whole number"));
        assert!(parse_expiry("99999999999999999999d").unwrap_err().contains("whole number"));
        assert!(parse_expiry("3651d").unwrap_err().contains("at most 10 years"));
    }

    #[test]
    fn spans_and_expiries_read_as_words() {
        assert_eq!(span(12_000), "12s");
        assert_eq!(span(3_598_000), "59m 58s");
        assert_eq!(span(7_260_000), "2h 1m");
        assert_eq!(span(3 * 86_400_000 + 4 * 3_600_000), "3d 4h");
        assert_eq!(expiry(None, 5), "never expires");
        assert_eq!(expiry(Some(61_000), 0), "expires in 1m 1s");
        assert_eq!(expiry(Some(0), 2_000), "expired 2s ago");
    }
}
