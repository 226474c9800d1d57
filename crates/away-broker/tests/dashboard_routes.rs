//! The dashboard's routes on a real broker over HTTP (no agents, no browser; the browser
//! test is tests/tests/dashboard.rs): the page is public and locked down by its CSP, the
//! results need the user token, name nothing outside the results directory, and say
//! which option is missing when there are none.

use std::sync::Arc;

use away_broker::{Broker, BrokerConfig};
use serde_json::Value;

const USER: &str = "dashboard-user-token";

async fn start(dir: &std::path::Path, results: Option<std::path::PathBuf>) -> (String, tokio::task::JoinHandle<()>) {
    let mut config = BrokerConfig::new(vec![USER.into()], "join".into());
    config.db_path = dir.join("broker.db");
    config.results_dir = results;
    let broker = Arc::new(Broker::open(config).expect("open broker"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        let _ = away_broker::serve(broker, listener).await;
    });
    (url, server)
}

async fn get(url: &str, token: Option<&str>) -> (u16, String, String) {
    let mut req = away_identity::http::client_builder(None).build().unwrap().get(url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.unwrap();
    let ct = r.headers().get("content-type").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    (r.status().as_u16(), ct, r.text().await.unwrap())
}

#[tokio::test]
async fn page_is_public_results_need_the_token_and_stay_in_their_directory() {
    let dir = tempfile::tempdir().unwrap();
    let results = dir.path().join("results");
    std::fs::create_dir_all(results.join("2026-01-01-run")).unwrap();
    std::fs::write(results.join("2026-01-01-run/report.md"), "| link | load |\n").unwrap();
    std::fs::write(results.join("2026-01-01-run/logs.tar.xz"), "secret-ish").unwrap();
    std::fs::write(dir.path().join("outside.md"), "CONTENT OF A FILE OUTSIDE").unwrap();
    let (url, server) = start(dir.path(), Some(results)).await;

    let r = away_identity::http::client_builder(None).build().unwrap().get(format!("{url}/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let csp = r.headers()["content-security-policy"].to_str().unwrap().to_string();
    assert!(csp.contains("default-src 'none'") && csp.contains("script-src 'self'"), "{csp}");
    assert!(r.text().await.unwrap().contains("/ui/dashboard.js"));
    for asset in ["/ui/dashboard.js", "/ui/dashboard.css", "/ui/favicon.svg"] {
        assert_eq!(get(&format!("{url}{asset}"), None).await.0, 200, "{asset}");
    }

    // data needs the user token
    assert_eq!(get(&format!("{url}/ui/results"), None).await.0, 401);
    assert_eq!(get(&format!("{url}/ui/results"), Some("wrong")).await.0, 401);
    assert_eq!(get(&format!("{url}/ui/results/2026-01-01-run/report.md"), None).await.0, 401);
    let (status, _, body) = get(&format!("{url}/ui/results"), Some(USER)).await;
    assert_eq!(status, 200);
    let runs: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(runs, serde_json::json!([{"name": "2026-01-01-run", "files": ["report.md"]}]));
    let (status, ct, body) = get(&format!("{url}/ui/results/2026-01-01-run/report.md"), Some(USER)).await;
    assert_eq!((status, ct.as_str(), body.as_str()), (200, "text/markdown; charset=utf-8", "| link | load |\n"));

    // only the shown files, only inside the directory
    let (status, _, body) = get(&format!("{url}/ui/results/2026-01-01-run/logs.tar.xz"), Some(USER)).await;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("report.md"), "the answer names the files shown: {body}");
    for bad in
        ["/ui/results/..%2Foutside.md/report.md", "/ui/results/.hidden/report.md", "/ui/results/..%2F../report.md"]
    {
        let (status, _, body) = get(&format!("{url}{bad}"), Some(USER)).await;
        assert!(status == 400 || status == 404, "{bad}: {status} {body}");
        assert!(!body.contains("CONTENT OF A FILE OUTSIDE"), "{bad}: {body}");
    }
    assert_eq!(get(&format!("{url}/ui/results/2026-02-02-none/report.md"), Some(USER)).await.0, 404);

    // the API is unchanged beside it
    assert_eq!(get(&format!("{url}/v1/nodes"), None).await.0, 401);
    assert_eq!(get(&format!("{url}/nothing-here"), None).await.0, 404);
    server.abort();
}

#[tokio::test]
async fn without_a_results_directory_the_answer_names_the_option() {
    let dir = tempfile::tempdir().unwrap();
    let (url, server) = start(dir.path(), None).await;
    let (status, _, body) = get(&format!("{url}/ui/results"), Some(USER)).await;
    assert_eq!(status, 404);
    assert!(body.contains("--results"), "{body}");
    server.abort();
}
