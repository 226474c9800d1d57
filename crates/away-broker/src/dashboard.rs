//! The web dashboard at `/`: one static HTML page, a little vanilla JavaScript and CSS,
//! embedded in the binary (nothing is fetched at run time, no front-end build). The page
//! holds no data and no power: the script signs in with a user token and then calls the
//! same `/v1` API as `curl` and the CLI, with that token. See docs/dashboard.md.
//!
//! | method | path | auth | answer |
//! | --- | --- | --- | --- |
//! | GET | / | none | the page (no data in it) |
//! | GET | /ui/dashboard.js, /ui/dashboard.css, /ui/favicon.svg | none | its script, style and icon |
//! | GET | /ui/results | user | `[{"name", "files"}]`: the experiment runs of `--results DIR` |
//! | GET | /ui/results/{run}/{file} | user | one of a run's files, read-only |
//!
//! These routes are the dashboard's, not the API's: they are not in the OpenAPI
//! document, and nothing under `/v1` changes for them.

use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use crate::api::bearer;
use crate::{Broker, Problem};

const INDEX: &str = include_str!("../dashboard/index.html");
const SCRIPT: &str = include_str!("../dashboard/dashboard.js");
const STYLE: &str = include_str!("../dashboard/dashboard.css");
const ICON: &str = include_str!("../dashboard/favicon.svg");

/// What the page may load: only itself. No inline script or style, so an injected
/// string in a workload's name or a message cannot run (the script also writes text,
/// never HTML); `blob:` images are Fig. 3, fetched with the token.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; \
                   connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'";

/// The files of a run the dashboard shows; nothing else in the results directory is served.
pub const RESULT_FILES: [(&str, &str); 5] = [
    ("report.md", "text/markdown; charset=utf-8"),
    ("README.md", "text/markdown; charset=utf-8"),
    ("results.csv", "text/csv; charset=utf-8"),
    ("fig3.svg", "image/svg+xml"),
    ("fig3.png", "image/png"),
];

/// The dashboard's routes, merged into the API router (which adds its state and fallback).
pub fn routes() -> Router<Arc<Broker>> {
    Router::new()
        .route("/", get(|| async { asset(INDEX, "text/html; charset=utf-8") }))
        .route("/ui/dashboard.js", get(|| async { asset(SCRIPT, "text/javascript; charset=utf-8") }))
        .route("/ui/dashboard.css", get(|| async { asset(STYLE, "text/css; charset=utf-8") }))
        .route("/ui/favicon.svg", get(|| async { asset(ICON, "image/svg+xml") }))
        .route("/ui/results", get(list_runs))
        .route("/ui/results/{run}/{file}", get(run_file))
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut resp = ([(header::CONTENT_TYPE, content_type)], body).into_response();
    harden(resp.headers_mut());
    resp
}

fn harden(h: &mut HeaderMap) {
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
}

#[derive(Debug, Serialize, PartialEq)]
struct Run {
    name: String,
    files: Vec<&'static str>,
}

fn results_dir(b: &Broker) -> Result<PathBuf, Problem> {
    b.config.results_dir.clone().ok_or_else(|| {
        Problem::not_found("this broker shows no experiment results: start it with --results DIR (e.g. docs/results)")
    })
}

/// A run is one directory right under the results directory, named plainly: the name
/// goes into a path, so nothing that could leave the directory gets through.
fn valid_run(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 100
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

async fn list_runs(State(b): State<Arc<Broker>>, headers: HeaderMap) -> Result<Response, Problem> {
    b.check_user(bearer(&headers))?;
    let dir = results_dir(&b)?;
    let runs = tokio::task::spawn_blocking(move || scan(&dir))
        .await
        .map_err(|e| Problem::internal(format!("results task failed: {e}")))??;
    Ok(Json(runs).into_response())
}

/// The runs under `dir` that have at least one file the dashboard shows, newest name first.
fn scan(dir: &std::path::Path) -> Result<Vec<Run>, Problem> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| Problem::internal(format!("cannot read the results directory {}: {e}", dir.display())))?;
    let mut runs: Vec<Run> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok().filter(|n| valid_run(n))?;
            let files: Vec<&str> =
                RESULT_FILES.iter().map(|(f, _)| *f).filter(|f| e.path().join(f).is_file()).collect();
            (!files.is_empty()).then_some(Run { name, files })
        })
        .collect();
    runs.sort_by(|a, b| b.name.cmp(&a.name));
    Ok(runs)
}

async fn run_file(
    State(b): State<Arc<Broker>>,
    headers: HeaderMap,
    Path((run, file)): Path<(String, String)>,
) -> Result<Response, Problem> {
    b.check_user(bearer(&headers))?;
    let dir = results_dir(&b)?;
    if !valid_run(&run) {
        return Err(Problem::invalid(format!("run {run:?}: letters, digits, '-', '_' and '.' only")).field("run"));
    }
    let Some((name, content_type)) = RESULT_FILES.iter().find(|(f, _)| *f == file) else {
        let known: Vec<&str> = RESULT_FILES.iter().map(|(f, _)| *f).collect();
        return Err(Problem::not_found(format!("{file:?} is not shown: one of {}", known.join(", "))).field("file"));
    };
    let path = dir.join(&run).join(name);
    let body = tokio::fs::read(&path).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Problem::not_found(format!("no {name} in run {run}")),
        _ => Problem::internal(format!("cannot read {}: {e}", path.display())),
    })?;
    let mut resp = ([(header::CONTENT_TYPE, *content_type)], body).into_response();
    harden(resp.headers_mut());
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_names_cannot_leave_the_results_directory() {
        for bad in ["", "..", ".", ".hidden", "a/b", "a\\b", "../etc", "a b", "ä"] {
            assert!(!valid_run(bad), "{bad:?}");
        }
        for good in ["2026-11-26-comparison", "run_1", "v1.2"] {
            assert!(valid_run(good), "{good:?}");
        }
    }

    #[test]
    fn scan_lists_runs_with_shown_files_only() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("2026-01-01-a")).unwrap();
        std::fs::write(dir.path().join("2026-01-01-a/report.md"), "# r").unwrap();
        std::fs::write(dir.path().join("2026-01-01-a/logs.tar.xz"), "x").unwrap();
        std::fs::create_dir(dir.path().join("2026-01-02-b")).unwrap();
        std::fs::write(dir.path().join("2026-01-02-b/fig3.svg"), "<svg/>").unwrap();
        std::fs::create_dir(dir.path().join("empty")).unwrap();
        std::fs::create_dir(dir.path().join(".git")).unwrap();
        std::fs::write(dir.path().join(".git/report.md"), "x").unwrap();
        let runs = scan(dir.path()).unwrap();
        assert_eq!(
            runs,
            [
                Run { name: "2026-01-02-b".into(), files: vec!["fig3.svg"] },
                Run { name: "2026-01-01-a".into(), files: vec!["report.md"] },
            ]
        );
    }

    #[test]
    fn the_page_loads_only_its_own_assets() {
        let icon = ICON.replace(r#"xmlns="http://www.w3.org/2000/svg""#, "");
        let assets =
            [("index.html", INDEX), ("dashboard.js", SCRIPT), ("dashboard.css", STYLE), ("favicon.svg", &icon)];
        for (name, text) in assets {
            for url in ["http://", "https://", "url(", "@import"] {
                assert!(!text.contains(url), "{name} refers to {url}: nothing may be fetched from elsewhere");
            }
        }
        assert!(!INDEX.contains("<script>") && !INDEX.contains("style="), "no inline script or style (CSP)");
        assert!(INDEX.contains("src=\"/ui/dashboard.js\""));
    }

    #[test]
    fn the_page_is_small() {
        let total = INDEX.len() + SCRIPT.len() + STYLE.len() + ICON.len();
        assert!(total < 200 * 1024, "{total} bytes: the page weight target is 200 KiB");
    }
}
