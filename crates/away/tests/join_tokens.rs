//! `away token create|list|revoke` against a real `away broker` (tests/common); a fake
//! node registers with the token the CLI printed. Root-free.

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
