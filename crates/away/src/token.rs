//! `away token`: the broker's join tokens (`/v1/join-tokens`) and users' tokens
//! (`/v1/user-tokens`), made, listed and revoked with an admin token from the environment.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use away_model::{JoinTokenRequest, TokenState, UserTokenRequest};

use crate::output::print_json;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Make a join token, or with --user a user's token; its secret is printed this once
    /// (alone on stdout, or in --json)
    #[command(after_help = "Examples:
  AWAY_JOIN_TOKEN=$(away token create --broker https://10.0.0.1:7700 --ca ca.pem --expires 1h)
  away token create --broker https://10.0.0.1:7700 --ca ca.pem --user anna --expires 30d")]
    Create {
        #[command(flatten)]
        broker: BrokerArgs,
        /// Make a token for this user (a lower-case letter, then up to 62 lower-case letters,
        /// digits or '-'; not admin): it may use the broker's whole user API (submit, move, logs, events,
        /// the dashboard) but not manage tokens. Without --user: a join token for a new node
        #[arg(long, value_name = "NAME", value_parser = parse_user)]
        user: Option<String>,
        /// It stops working after this long: 90s, 30m, 12h, 7d [default: never]
        #[arg(long, value_parser = parse_expiry, value_name = "DURATION")]
        expires: Option<u64>,
        /// What it is for, shown by `away token list`
        #[arg(long)]
        label: Option<String>,
        /// Print {id, token, expires_unix_ms} (and user) as JSON
        #[arg(long)]
        json: bool,
    },
    /// List the join and user tokens made over the API (not the broker's configured ones),
    /// without secrets
    List {
        #[command(flatten)]
        broker: BrokerArgs,
        /// Print the list as JSON: one array, each token with its `kind` (join or user)
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token by its id: a join token (jt-…) registers no node from now on, a
    /// user's token (ut-…) is refused from its next request on
    Revoke {
        /// The token's id (jt-… or ut-…), from `away token create` or `list`
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
        self.client_needing("away token needs an admin token of the broker (one of its --user-token)")
    }

    /// A client of the broker with the token in AWAY_USER_TOKEN; `needs` says which token
    /// the command wants when there is none.
    pub(crate) fn client_needing(&self, needs: &str) -> anyhow::Result<away_client::Client> {
        // only from the environment: a token on the command line is readable by every user (ps)
        let token = std::env::var("AWAY_USER_TOKEN")
            .ok()
            .filter(|t| !t.trim().is_empty())
            .with_context(|| format!("{needs}: set AWAY_USER_TOKEN"))?;
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
            Command::Create { broker, user: Some(user), expires, label, json } => {
                let req = UserTokenRequest { user, expires_in_s: expires, label };
                let made = broker.client()?.create_user_token(&req).await.context("create a user token")?;
                if json {
                    print_json(&made)?;
                } else {
                    // the secret alone on stdout, words on stderr
                    println!("{}", made.token);
                    eprintln!(
                        "user token {} for {} ({}): give it to {} as AWAY_USER_TOKEN (environment, not the command \
                         line; the dashboard asks for it); it is not shown again. It uses the user API, not tokens. \
                         Revoke it with `away token revoke {}`",
                        made.id,
                        made.user,
                        expiry(made.expires_unix_ms, now_ms()),
                        made.user,
                        made.id
                    );
                }
            }
            Command::Create { broker, user: None, expires, label, json } => {
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
                let client = broker.client()?;
                let (joins, users) =
                    tokio::try_join!(client.join_tokens(), client.user_tokens()).context("list tokens")?;
                let mut rows: Vec<Row> = joins
                    .into_iter()
                    .map(|t| Row {
                        kind: Kind::Join,
                        // the node it joined (a made join token joins that one)
                        user: t.used_by.as_ref().map(|n| format!("node {n}")),
                        created: t.created_unix_ms,
                        json: serde_json::to_value(&t),
                        id: t.id,
                        state: t.state,
                        expires: t.expires_unix_ms,
                        revoked: t.revoked_unix_ms,
                        label: t.label,
                    })
                    .chain(users.into_iter().map(|t| Row {
                        kind: Kind::User,
                        created: t.created_unix_ms,
                        json: serde_json::to_value(&t),
                        id: t.id,
                        user: Some(t.user),
                        state: t.state,
                        expires: t.expires_unix_ms,
                        revoked: t.revoked_unix_ms,
                        label: t.label,
                    }))
                    .collect();
                rows.sort_by(|a, b| (a.created, &a.id).cmp(&(b.created, &b.id)));
                if json {
                    let mut all = Vec::with_capacity(rows.len());
                    for r in rows {
                        let mut v = r.json?;
                        v["kind"] = r.kind.as_str().into();
                        all.push(v);
                    }
                    print_json(&all)?;
                } else {
                    print_list(&rows, now_ms());
                }
            }
            Command::Revoke { id, broker, json } => match id.split('-').next() {
                Some("jt") => {
                    let t = broker
                        .client()?
                        .revoke_join_token(&id)
                        .await
                        .with_context(|| format!("revoke join token {id}"))?;
                    if json {
                        print_json(&t)?;
                    } else {
                        println!("join token {} revoked: no node registers with it any more", t.id);
                    }
                }
                Some("ut") => {
                    let t = broker
                        .client()?
                        .revoke_user_token(&id)
                        .await
                        .with_context(|| format!("revoke user token {id}"))?;
                    if json {
                        print_json(&t)?;
                    } else {
                        println!("user token {} of {} revoked: the broker refuses its next request", t.id, t.user);
                    }
                }
                _ => anyhow::bail!(
                    "{id:?} is not a token id: join tokens' ids start with jt-, user tokens' with ut- (away token list)"
                ),
            },
        }
        Ok(ExitCode::SUCCESS)
    })
}

#[derive(Clone, Copy)]
enum Kind {
    Join,
    User,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Join => "join",
            Kind::User => "user",
        }
    }
}

/// One token of either kind, as `away token list` shows it.
struct Row {
    kind: Kind,
    id: String,
    user: Option<String>,
    state: TokenState,
    created: u64,
    expires: Option<u64>,
    revoked: Option<u64>,
    label: Option<String>,
    /// The broker's view of it, for --json.
    json: serde_json::Result<serde_json::Value>,
}

fn print_list(rows: &[Row], now: u64) {
    if rows.is_empty() {
        println!("no tokens made over the API (the broker's configured join token and admin tokens are not listed)");
        return;
    }
    // FOR: a user token's user, the node a join token joined
    println!("{:<4} {:<17} {:<16} {:<8} {:<26} LABEL", "KIND", "ID", "FOR", "STATE", "EXPIRES");
    for t in rows {
        let expires = match t.revoked {
            Some(at) => format!("revoked {} ago", span(now.saturating_sub(at))),
            None => expiry(t.expires, now),
        };
        println!(
            "{:<4} {:<17} {:<16} {:<8} {:<26} {}",
            t.kind.as_str(),
            t.id,
            t.user.as_deref().unwrap_or("-"),
            t.state.as_str(),
            expires,
            t.label.as_deref().unwrap_or("-")
        );
    }
}

/// A user name as the broker takes it (away_model::USER_NAME_PATTERN).
fn parse_user(text: &str) -> Result<String, String> {
    if away_model::is_user_name(text) {
        Ok(text.to_string())
    } else if text == away_model::ADMIN_USER {
        Err("\"admin\" is taken: the broker's events call its configured tokens so".into())
    } else {
        Err(format!(
            "{text:?}: a user name is a lower-case letter, then up to 62 lower-case letters, digits or '-' (anna, \
             ci-runner-2)"
        ))
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
    fn user_names_are_checked_before_the_broker_is_asked() {
        assert_eq!(parse_user("anna"), Ok("anna".into()));
        assert!(parse_user("Anna").unwrap_err().contains("lower-case letter"));
        assert!(parse_user("").is_err());
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
