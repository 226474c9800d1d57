//! The web dashboard in a real browser: headless Chromium driven over WebDriver
//! (Debian's `chromium` and `chromium-driver`, from deploy/install.sh) against a real
//! cluster (a broker and two agents, cloud and laptop, each with its own containerd).
//!
//! Signs in (a wrong token first), sees both nodes, submits `counter` (with the laptop
//! drained, so that it lands in the cloud), watches it run there, moves it to the laptop
//! from the page, follows the progress bar through the event stream to the report, and
//! finds the workload listed on the laptop. Screenshots of each view go to
//! `$AWAY_SCREENSHOTS` (default `<target dir>/dashboard-screenshots`); the page weight and
//! the time to first render on loopback are printed, not asserted.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use away_e2e::{cluster_plan, free_port, require, require_root, wait_for, workspace_root};
use away_model::Tier;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

const NAME: &str = "dash";
const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// The WebDriver key code of Enter.
const ENTER: &str = "\u{E007}";
/// Scroll so that the workloads and the newest migration are on the screenshot.
const SHOW_MIGRATION: &str = "document.querySelector('#workloads').scrollIntoView(); return null;";

struct Down;
impl Drop for Down {
    fn drop(&mut self) {
        away_cluster::down(NAME);
    }
}

/// chromedriver, started by this test on a free port; killed (by its PID) when dropped.
struct Driver {
    child: Child,
    port: u16,
}

impl Driver {
    fn start(log: &Path) -> Driver {
        let port = free_port();
        let log = std::fs::File::create(log).unwrap();
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start chromedriver");
        let driver = Driver { child, port };
        wait_for(20, || std::net::TcpStream::connect(("127.0.0.1", port)).ok()).expect("chromedriver listens");
        driver
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn screenshots_dir() -> PathBuf {
    let dir = std::env::var_os("AWAY_SCREENSHOTS").map(PathBuf::from).unwrap_or_else(|| {
        std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace_root().join("target"))
            .join("dashboard-screenshots")
    });
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A browser session and where its screenshots go.
struct Page {
    c: Client,
    shots: PathBuf,
}

impl Page {
    async fn shot(&self, name: &str) {
        let png = self.c.screenshot().await.expect("screenshot");
        std::fs::write(self.shots.join(format!("{name}.png")), png).unwrap();
    }

    /// The text of the first element matching `css` once `ok` holds for it.
    async fn wait_text(&self, css: &str, secs: u64, ok: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut last = String::new();
        while Instant::now() < deadline {
            if let Ok(e) = self.c.find(Locator::Css(css)).await {
                last = e.text().await.unwrap_or_default();
                if ok(&last) {
                    return last;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        self.shot(&format!("failed-{}", css.replace(|c: char| !c.is_alphanumeric(), "_"))).await;
        let seen = self.diagnosis().await;
        panic!("{css} never matched within {secs} s; last text: {last:?}; the page: {seen}");
    }

    /// What the page was doing when a wait failed: its address, whether its script
    /// wired itself, the status line, and every call it made with its status and time.
    async fn diagnosis(&self) -> Value {
        self.c
            .execute(
                "return {url: location.href, ready: document.documentElement.dataset.ready || null, \
                 conn: (document.querySelector('#conn') || {}).textContent, \
                 calls: performance.getEntriesByType('resource').map(r => ({name: r.name, \
                 status: r.responseStatus, ms: Math.round(r.duration)}))};",
                vec![],
            )
            .await
            .unwrap_or_else(|e| Value::String(format!("no answer from the page: {e}")))
    }

    /// Waits until the page's script has wired its forms (before this, a click on
    /// "Sign in" would be the browser's own form submission, not the dashboard's).
    async fn wait_ready(&self, secs: u64) {
        let ready = || async {
            (self.js("return document.documentElement.dataset.ready === 'true';").await == json!(true)).then_some(())
        };
        if wait_for_async(secs, ready).await.is_some() {
            return;
        }
        let seen = self.diagnosis().await;
        panic!("the dashboard's script did not wire the page within {secs} s; the page: {seen}");
    }

    async fn attr(&self, css: &str, name: &str) -> Option<String> {
        self.c.find(Locator::Css(css)).await.ok()?.attr(name).await.ok()?
    }

    async fn click(&self, css: &str) {
        let e = self.c.find(Locator::Css(css)).await.unwrap_or_else(|e| panic!("{css}: {e}"));
        e.click().await.unwrap_or_else(|e| panic!("click {css}: {e}"));
    }

    async fn type_into(&self, css: &str, text: &str) {
        let e = self.c.find(Locator::Css(css)).await.unwrap_or_else(|e| panic!("{css}: {e}"));
        e.clear().await.unwrap();
        e.send_keys(text).await.unwrap();
    }

    /// Keys to an element as it is (`ENTER` presses Enter), without clearing it first.
    async fn type_into_more(&self, css: &str, keys: &str) {
        let e = self.c.find(Locator::Css(css)).await.unwrap_or_else(|e| panic!("{css}: {e}"));
        e.send_keys(keys).await.unwrap_or_else(|e| panic!("keys to {css}: {e}"));
    }

    async fn js(&self, script: &str) -> Value {
        self.c.execute(script, vec![]).await.expect("execute script")
    }
}

/// The migration card of counter as one value (or null): progress, state, text, events.
const MIGRATION_CARD: &str = "const m = document.querySelector('article.migration[data-workload=counter]'); \
     if (!m) return null; const p = m.querySelector('progress'); \
     return {value: p ? Number(p.value) : 0, state: m.dataset.state || '', text: m.textContent, \
     events: m.dataset.events || ''};";

#[test]
fn dashboard_signs_in_shows_the_cluster_and_moves_a_workload() {
    if !require_root()
        || !require(Path::new(CHROMIUM).is_file(), "chromium (apt-get install chromium; deploy/install.sh)")
        || !require(
            Path::new(CHROMEDRIVER).is_file(),
            "chromedriver (apt-get install chromium-driver; deploy/install.sh)",
        )
    {
        return;
    }
    away_cluster::down(NAME);
    let plan = cluster_plan(NAME, &[("cloud", Tier::Cloud), ("laptop", Tier::Client)], &["counter"]);
    let info = away_cluster::up(&plan).expect("cluster up");
    let _down = Down;
    // the broker again with the experiment results to show (`--results`, the option
    // this dashboard adds); away-cluster keeps its command line in broker.argv
    away_cluster::stop_broker(NAME);
    let argv_file = Path::new("/run/away/cluster").join(NAME).join("broker.argv");
    let mut argv: Vec<String> = serde_json::from_slice(&std::fs::read(&argv_file).unwrap()).unwrap();
    argv.extend(["--results".into(), workspace_root().join("docs/results").display().to_string()]);
    std::fs::write(&argv_file, serde_json::to_vec(&argv).unwrap()).unwrap();
    away_cluster::start_broker(NAME).expect("broker restarts with --results");

    let shots = screenshots_dir();
    let driver = Driver::start(&shots.join("chromedriver.log"));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            // the broker's certificate is from the cluster's own CA, which this throwaway
            // browser profile does not know: accepted here, in the test only
            json!({"binary": CHROMIUM, "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                "--disable-dev-shm-usage", "--window-size=1366,900", "--no-first-run",
                "--ignore-certificate-errors"]}),
        );
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let c = ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{}", driver.port))
            .await
            .expect("a Chromium session through chromedriver");
        let page = Page { c, shots: shots.clone() };
        // a failed step still ends the browser session: killing chromedriver alone
        // would leave its Chromium running
        use futures_util::FutureExt;
        let result = std::panic::AssertUnwindSafe(scenario(&page, &info, &info.broker_url, &info.user_token))
            .catch_unwind()
            .await;
        let _ = page.c.close().await;
        if let Err(panic) = result {
            std::panic::resume_unwind(panic);
        }
    });
    drop(driver);
    println!("screenshots: {}", shots.display());
}

async fn scenario(page: &Page, info: &away_cluster::ClusterInfo, url: &str, token: &str) {
    let http = away_client::http_client(Some(&info.ca_pem().unwrap())).unwrap();
    let api = |path: &str| {
        let req = http.get(format!("{url}{path}")).bearer_auth(token);
        async move {
            let r = req.send().await.ok()?;
            if !r.status().is_success() {
                return None;
            }
            r.json::<Value>().await.ok()
        }
    };
    wait_for_async(30, || async {
        api("/v1/nodes")
            .await
            .filter(|n| n.as_array().is_some_and(|a| a.iter().filter(|x| x["state"] == "online").count() == 2))
    })
    .await
    .expect("both agents registered and online");

    // page weight: what the browser loads before signing in (nothing else is fetched)
    let mut weight = 0;
    for path in ["/", "/ui/dashboard.js", "/ui/dashboard.css", "/ui/favicon.svg"] {
        let r = http.get(format!("{url}{path}")).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let csp = r.headers().get("content-security-policy").map(|v| v.to_str().unwrap().to_string());
        assert!(csp.is_some_and(|v| v.contains("default-src 'none'")), "{path} has a strict CSP");
        weight += r.bytes().await.unwrap().len();
    }
    // the dashboard's own data route refuses without the token
    let r = http.get(format!("{url}/ui/results")).send().await.unwrap();
    assert_eq!(r.status(), 401, "results need a user token");

    // 1. a wrong token: an error, no dashboard
    let started = Instant::now();
    page.c.goto(url).await.unwrap();
    page.wait_text("#signin-title", 10, |t| t == "Sign in").await;
    page.wait_ready(10).await;
    let loaded = started.elapsed();
    let paint = page
        .js("const p = performance.getEntriesByName('first-contentful-paint')[0]; return p ? p.startTime : null;")
        .await;
    let resources = page.js("return performance.getEntriesByType('resource').map(r => r.name);").await;
    let own = ["/ui/dashboard.js", "/ui/dashboard.css", "/ui/favicon.svg"].map(|p| format!("{url}{p}"));
    let loaded_urls: Vec<&str> = resources.as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert!(
        loaded_urls.len() >= 2 && loaded_urls.iter().all(|u| own.iter().any(|o| o == u)),
        "the page loads its own script, style and icon, nothing else: {resources}"
    );
    page.type_into("#token", "not-the-token").await;
    page.click("#signin-button").await;
    let error = page.wait_text("#signin-error", 20, |t| !t.is_empty()).await;
    assert!(error.contains("401") && error.contains("wrong user token"), "{error}");
    assert_eq!(page.attr("#views", "hidden").await.as_deref(), Some("true"), "no dashboard after a wrong token");
    assert!(page.c.find(Locator::Css("#node-cloud")).await.is_err(), "no node shown after a wrong token");
    page.shot("01-signin-wrong-token").await;

    // 2. the right token: both nodes, by tier, online, with their CPU and runtimes
    // by keyboard: the token, then Enter
    page.type_into("#token", token).await;
    let signed_in = Instant::now();
    page.type_into_more("#token", ENTER).await;
    page.wait_text("#node-cloud", 20, |t| t.contains("online")).await;
    let polled = signed_in.elapsed();
    // measured in the page: from pressing sign in to the nodes and workloads drawn
    let first_data =
        page.js("const m = performance.measure('d', 'away-signin', 'away-first-data'); return m.duration;").await;
    let laptop = page.wait_text("#node-laptop", 20, |t| t.contains("online")).await;
    assert!(laptop.contains("containerd"), "runtimes shown: {laptop}");
    let tiers = page.wait_text("#nodes", 5, |t| t.contains("cloud (1)") && t.contains("client (1)")).await;
    assert!(!tiers.contains("edge ("), "no edge nodes in this cluster: {tiers}");
    page.shot("02-overview-nodes").await;

    // 3. drain the laptop from the page, so that counter goes to the cloud
    page.click("#drain-laptop").await;
    page.wait_text("#node-laptop", 10, |t| t.contains("draining")).await;
    assert_eq!(api("/v1/nodes/laptop").await.unwrap()["draining"], true, "the drain went through the API");

    // 4. submit: a bad spec shows the API's field and line, then counter is placed
    page.click("#views button[data-view=submit]").await;
    page.type_into("#spec", "name: dash-bad\nimage: away/counter:latest\nresources:\n  memory: lots\n").await;
    page.click("#submit-button").await;
    let refused = page.wait_text("#submit-error", 10, |t| !t.is_empty()).await;
    assert!(refused.contains("field resources.memory"), "the field is named: {refused}");
    page.shot("03-submit-error").await;
    // counter uploaded as a file, as JSON (the bad one above was typed, as YAML)
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("counter.json");
    let spec = json!({"name": "counter", "image": "away/counter:latest", "env": {"COUNTER_PORT": "18080"},
                      "resources": {"memory": "64Mi", "cpus": 0.25}});
    std::fs::write(&file, serde_json::to_string_pretty(&spec).unwrap()).unwrap();
    page.type_into("#spec", "").await;
    page.type_into_more("#spec-file", file.to_str().unwrap()).await;
    let uploaded = wait_for_async(10, || async {
        let e = page.c.find(Locator::Css("#spec")).await.ok()?;
        e.prop("value").await.ok()?.filter(|v| v.contains("\"COUNTER_PORT\""))
    })
    .await;
    assert!(uploaded.is_some(), "the uploaded file fills the spec");
    page.click("#submit-button").await;
    let placed = page.wait_text("#submit-result", 20, |t| t.contains("Placed") || t.contains("Refused")).await;
    assert!(placed.contains("Placed counter on cloud"), "{placed}");
    assert!(placed.contains("laptop: ruled out"), "the explanation names the drained laptop: {placed}");
    page.shot("04-submit-placed").await;

    // 5. overview: counter runs in the cloud; the laptop takes work again
    page.click("#views button[data-view=overview]").await;
    page.click("#drain-laptop").await;
    page.wait_text("#node-laptop", 10, |t| !t.contains("draining")).await;
    let row = page.wait_text("#wl-counter", 90, |t| t.contains("running")).await;
    assert_eq!(page.attr("#wl-counter", "data-node").await.as_deref(), Some("cloud"), "{row}");
    assert!(row.contains("containerd"), "runtime shown: {row}");
    page.shot("05-overview-running").await;

    // 6. move it to the laptop from the page and follow the progress bar
    // by keyboard: Enter on the row's Move… button opens the form with the focus on the target
    page.type_into_more("#move-counter", ENTER).await;
    let focused = page.js("return document.activeElement.id").await;
    assert_eq!(focused, json!("move-target"), "the move form takes the focus");
    page.c.find(Locator::Css("#move-target")).await.unwrap().select_by_value("laptop").await.unwrap();
    page.click("#move-submit").await;
    let mut seen: Vec<u64> = Vec::new();
    let mut shot_in_progress = false;
    let deadline = Instant::now() + Duration::from_secs(90);
    let (events, state) = loop {
        assert!(Instant::now() < deadline, "the migration did not finish in the page; seen {seen:?}");
        // read the card in one script: the page redraws it as events arrive, so an
        // element found in one WebDriver call may be gone by the next
        let card = page.js(MIGRATION_CARD).await;
        if !card.is_null() {
            let value = card["value"].as_u64().unwrap_or(0);
            if seen.last() != Some(&value) {
                seen.push(value);
            }
            let state = card["state"].as_str().unwrap_or_default().to_string();
            if value < 3 && !shot_in_progress {
                page.js(SHOW_MIGRATION).await;
                page.shot("06-migration-in-progress").await;
                shot_in_progress = true;
            }
            let text = card["text"].as_str().unwrap_or_default();
            if state == "succeeded" && text.contains("bytes on the wire") || state == "failed" {
                break (card["events"].as_str().unwrap_or_default().to_string(), state);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(state, "succeeded");
    assert!(seen.windows(2).all(|w| w[0] < w[1]) && seen.last() == Some(&3), "the bar only advanced: {seen:?}");
    // the phases came through /v1/events, not from polling the migration record
    for kind in ["migration-started", "migration-succeeded"] {
        assert!(events.split(' ').any(|k| k == kind), "{kind} not received through SSE: {events:?}");
    }
    let report = page.wait_text("article.migration[data-workload=counter] dl.report", 5, |t| !t.is_empty()).await;
    for what in ["downtime", "total", "bytes on the wire", "mode", "why"] {
        assert!(report.contains(what), "report shows {what}: {report}");
    }
    page.js(SHOW_MIGRATION).await;
    page.shot("07-migration-report").await;

    // 7. counter is listed on the laptop, in the page and in the API
    page.wait_text("#node-laptop", 30, |t| t.contains("counter")).await;
    page.wait_text("#wl-counter", 60, |t| t.contains("running") && t.contains("laptop")).await;
    let w = api("/v1/workloads/counter").await.unwrap();
    assert_eq!(w["node"], "laptop", "{w}");

    // 8. events and results views
    page.click("#views button[data-view=events]").await;
    page.wait_text("#events", 5, |t| t.contains("migration-succeeded")).await;
    page.shot("08-events").await;
    page.click("#views button[data-view=results]").await;
    page.wait_text("#report", 20, |t| t.contains("| link | load | path |")).await;
    let fig = wait_for_async(20, || async {
        page.js("const i = document.getElementById('fig3'); return i.complete ? i.naturalWidth : 0;")
            .await
            .as_u64()
            .filter(|w| *w > 0)
    })
    .await;
    assert!(fig.is_some(), "Fig. 3 shows");
    page.shot("09-results").await;

    // 9. remove it (two presses), and sign out
    page.click("#views button[data-view=overview]").await;
    page.click("#remove-counter").await;
    page.wait_text("#remove-counter", 5, |t| t == "Confirm remove").await;
    page.click("#remove-counter").await;
    wait_for_async(60, || async { api("/v1/workloads/counter").await.is_none().then_some(()) })
        .await
        .expect("counter removed through the page");
    page.click("#signout").await;
    page.wait_text("#signin-title", 5, |t| t == "Sign in").await;
    let kept = page.js("return sessionStorage.length").await;
    assert_eq!(kept, json!(0), "signing out forgets the token");
    // the page once more, in a browser that has started already (the first paint above
    // includes a fresh Chromium's own start-up work)
    page.c.goto(url).await.unwrap();
    page.wait_text("#signin-title", 10, |t| t == "Sign in").await;
    let warm = page
        .js("const p = performance.getEntriesByName('first-contentful-paint')[0]; return p ? p.startTime : null;")
        .await;

    let ms = |v: &Value| v.as_f64().map(|p| format!("{p:.0}")).unwrap_or_else(|| "?".into());
    println!(
        "dashboard: page weight {weight} bytes ({:.1} KiB; target < 200 KiB), first contentful paint {} ms \
         (fresh browser), {} ms (loaded again); page loaded in {} ms (WebDriver round trip included); after \
         sign-in, nodes and workloads drawn in {} ms (seen by WebDriver after {} ms); loopback, target < 300 ms, \
         not asserted; load average {}",
        weight as f64 / 1024.0,
        ms(&paint),
        ms(&warm),
        loaded.as_millis(),
        ms(&first_data),
        polled.as_millis(),
        std::fs::read_to_string("/proc/loadavg").unwrap_or_default().split(' ').next().unwrap_or("?"),
    );
    println!("progress values seen: {seen:?}; migration events in the page: {events}");
}

async fn wait_for_async<T, F: std::future::Future<Output = Option<T>>>(secs: u64, f: impl Fn() -> F) -> Option<T> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
