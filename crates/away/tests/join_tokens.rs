//! `away token create|list|revoke` against a real `away broker` (tests/common): a fake
//! node registers with the join token the CLI printed; a user calls the broker with the
//! user token it printed, until it is revoked. Root-free.

mod common;

use common::{away, registration, Broker};

const USER: &str = "token-test-user-token";
const JOIN: &str = "token-test-join-token";

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).to_string()
}

#[tokio::test]
async fn create_register_list_revoke() {
    let broker = Broker::start(USER, JOIN).await;
    let (url, client) = (broker.url.as_str(), &broker.client);

    // made in words: the secret alone on stdout, what to do with it on stderr
    let out = away(&["token", "create", "--broker", url, "--expires", "1h", "--label", "laptop-anna"], Some(USER));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let secret = text(&out.stdout).trim().to_string();
    assert_eq!(secret.len(), 64, "{secret:?}");
    let stderr = text(&out.stderr);
    assert!(stderr.contains("AWAY_JOIN_TOKEN") && stderr.contains("expires in 59m"), "{stderr}");
    client.register(&secret, &registration("anna")).await.expect("register with the made token");
    // it joins that one node: another name is refused, naming the node that used it
    let other = client.register(&secret, &registration("bob")).await.expect_err("a second node with anna's token");
    assert!(format!("{other:#}").contains("was used by node anna"), "{other:#}");

    // made as JSON
    let out = away(&["token", "create", "--broker", url, "--json"], Some(USER));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let made: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    let id = made["id"].as_str().unwrap().to_string();
    assert!(made["token"].as_str().is_some_and(|t| t.len() == 64) && made.get("expires_unix_ms").is_none(), "{made}");

    // listed without secrets
    let out = away(&["token", "list", "--broker", url], Some(USER));
    let listed = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(listed.contains("laptop-anna") && listed.contains(&id) && listed.contains("never expires"), "{listed}");
    assert!(listed.lines().any(|l| l.contains("laptop-anna") && l.contains("node anna")), "{listed}");
    assert!(!listed.contains(&secret) && !listed.contains(made["token"].as_str().unwrap()), "{listed}");
    let out = away(&["token", "list", "--broker", url, "--json"], Some(USER));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON list");
    assert_eq!(list.as_array().map(Vec::len), Some(2), "{list}");

    // revoked: the broker refuses it, naming why
    let out = away(&["token", "revoke", &id, "--broker", url], Some(USER));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains(&format!("join token {id} revoked")), "{}", text(&out.stdout));
    let e = client.register(made["token"].as_str().unwrap(), &registration("mallory")).await.unwrap_err();
    assert_eq!(e.status(), Some(401));
    assert!(e.to_string().contains("revoked"), "{e}");

    // unknown id, no user token, a bad duration
    let out = away(&["token", "revoke", "jt-ghost", "--broker", url], Some(USER));
    assert!(!out.status.success() && text(&out.stderr).contains("404"), "{}", text(&out.stderr));
    let out = away(&["token", "list", "--broker", url], None);
    assert!(!out.status.success() && text(&out.stderr).contains("set AWAY_USER_TOKEN"), "{}", text(&out.stderr));
    let out = away(&["token", "create", "--broker", url, "--expires", "1w"], Some(USER));
    assert!(!out.status.success() && text(&out.stderr).contains("s, m, h or d"), "{}", text(&out.stderr));
}

#[tokio::test]
async fn user_tokens_create_list_revoke() {
    let broker = Broker::start(USER, JOIN).await;
    let url = broker.url.as_str();

    // made in words: the secret alone on stdout, whose it is and what to do on stderr
    let out = away(&["token", "create", "--broker", url, "--user", "anna", "--expires", "30d"], Some(USER));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let secret = text(&out.stdout).trim().to_string();
    assert_eq!(secret.len(), 64, "{secret:?}");
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("for anna") && stderr.contains("AWAY_USER_TOKEN") && stderr.contains("expires in 29d"),
        "{stderr}"
    );
    // anna uses the user API with it (the CLI's own client, as any user command would)
    let anna = away_client::Client::new(url, &secret).unwrap();
    anna.nodes().await.expect("anna lists nodes");
    // made as JSON, with a label; a join token beside them
    let out =
        away(&["token", "create", "--broker", url, "--user", "ci-runner", "--label", "nightly", "--json"], Some(USER));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let ci: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert_eq!(ci["user"], "ci-runner");
    let out = away(&["token", "create", "--broker", url, "--json"], Some(USER));
    let join: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");

    // anna's token manages no tokens: the broker's 403 reason, through the CLI
    let out = away(&["token", "list", "--broker", url], Some(&secret));
    assert!(!out.status.success() && text(&out.stderr).contains("needs an admin token"), "{}", text(&out.stderr));

    // listed, both kinds, without secrets
    let out = away(&["token", "list", "--broker", url], Some(USER));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let listed = text(&out.stdout);
    let header = listed.lines().next().unwrap_or_default();
    assert!(header.starts_with("KIND") && header.contains("FOR"), "{listed}");
    let anna_id = listed.lines().find(|l| l.contains(" anna ")).and_then(|l| l.split_whitespace().nth(1)).unwrap();
    assert!(anna_id.starts_with("ut-"), "{listed}");
    assert!(
        listed.lines().any(|l| l.starts_with("user") && l.contains("ci-runner") && l.contains("nightly")),
        "{listed}"
    );
    assert!(listed.lines().any(|l| l.starts_with("join") && l.contains(join["id"].as_str().unwrap())), "{listed}");
    assert!(!listed.contains(&secret) && !listed.contains(ci["token"].as_str().unwrap()), "{listed}");
    let out = away(&["token", "list", "--broker", url, "--json"], Some(USER));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON list");
    let kinds: Vec<&str> = list.as_array().unwrap().iter().filter_map(|t| t["kind"].as_str()).collect();
    assert_eq!(kinds, ["user", "user", "join"], "{list}");

    // revoked by its id: anna's next call is refused, naming why
    let out = away(&["token", "revoke", anna_id, "--broker", url], Some(USER));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains(&format!("user token {anna_id} of anna revoked")), "{}", text(&out.stdout));
    let e = anna.nodes().await.unwrap_err();
    assert_eq!(e.status(), Some(401), "{e}");
    assert!(e.to_string().contains(&format!("user token {anna_id} revoked")), "{e}");
    let out = away(&["token", "list", "--broker", url, "--json"], Some(USER));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON list");
    assert!(list.as_array().unwrap().iter().any(|t| t["id"] == anna_id && t["state"] == "revoked"), "{list}");

    // a bad name, an id of no kind, an unknown user token
    let out = away(&["token", "create", "--broker", url, "--user", "Anna"], Some(USER));
    assert!(!out.status.success() && text(&out.stderr).contains("lower-case letter"), "{}", text(&out.stderr));
    let out = away(&["token", "revoke", "xy-1", "--broker", url], Some(USER));
    assert!(
        !out.status.success() && text(&out.stderr).contains("jt-") && text(&out.stderr).contains("ut-"),
        "{}",
        text(&out.stderr)
    );
    let out = away(&["token", "revoke", "ut-ghost", "--broker", url], Some(USER));
    assert!(!out.status.success() && text(&out.stderr).contains("404"), "{}", text(&out.stderr));

    // --help teaches both kinds
    let out = away(&["token", "create", "--help"], None);
    // as words, whatever the terminal's width wrapped
    let help = text(&out.stdout).split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(
        help.contains("--user <NAME>") && help.contains("not manage tokens") && help.contains("Examples"),
        "{help}"
    );
}
