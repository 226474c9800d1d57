//! The broker's HTTP JSON API. `openapi.json` beside this crate documents every route
//! with its status codes (a test keeps the two in step).
//!
//! | method | path | auth | answer |
//! | --- | --- | --- | --- |
//! | GET | /v1/nodes | user | `[NodeView]` |
//! | GET | /v1/nodes/{name} | user | `NodeView`, 404 |
//! | POST | /v1/nodes/{name}/drain | user | `NodeView`: nothing new is placed there |
//! | DELETE | /v1/nodes/{name}/drain | user | `NodeView`: takes new work again |
//! | POST | /v1/workloads[?dry_run=true] | user | 201 `{workload, placement}`; dry run: 200 `{placement}`; 400, 409, 422 |
//! | GET | /v1/workloads | user | `[WorkloadView]` |
//! | GET | /v1/workloads/{name} | user | `WorkloadView` with its placement, 404 |
//! | DELETE | /v1/workloads/{name} | user | 202 `WorkloadView` (removing), 404, 409 |
//! | GET | /v1/workloads/{name}/logs | user | the agent's answer, proxied; 503 when the node is unreachable |
//! | POST | /v1/migrations | user | 202 `{migration}`; 404, 409, 422 with the reason |
//! | GET | /v1/migrations | user | `[Migration]` |
//! | GET | /v1/migrations/{id} | user | `Migration`, 404 |
//! | POST | /v1/agents/register | join token | `RegisterResponse` |
//! | POST | /v1/agents/{name}/heartbeat | agent token | `HeartbeatResponse` |
//! | GET | /v1/events | user | Server-Sent Events, JSON `BrokerEvent` in `data:` |
//! | GET | /v1/openapi.json | none | this API's OpenAPI 3 document |
//! | GET | /metrics | none | Prometheus text |
//!
//! Every error is an `ApiError` JSON body; malformed input is a 400 naming the field.
//! Handlers run the (short, SQLite-writing) state operations on the blocking pool.

use std::convert::Infallible;
use std::sync::Arc;

use away_model::{ErrorCode, Heartbeat, RegisterRequest, SpecFormat, WorkloadSpec};
use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::json;

use crate::broker::{Broker, MigrationRequest};
use crate::error::Problem;

/// The OpenAPI document served at `/v1/openapi.json`.
pub const OPENAPI: &str = include_str!("../openapi.json");

pub fn router(broker: Arc<Broker>) -> Router {
    Router::new()
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/nodes/{name}", get(get_node))
        .route("/v1/nodes/{name}/drain", post(drain_node).delete(undrain_node))
        .route("/v1/workloads", post(submit_workload).get(list_workloads))
        .route("/v1/workloads/{name}", get(get_workload).delete(delete_workload))
        .route("/v1/workloads/{name}/logs", get(workload_logs))
        .route("/v1/migrations", post(request_migration).get(list_migrations))
        .route("/v1/migrations/{id}", get(get_migration))
        .route("/v1/agents/register", post(register_agent))
        .route("/v1/agents/{name}/heartbeat", post(heartbeat))
        .route("/v1/events", get(events))
        .route("/v1/openapi.json", get(openapi))
        .route("/metrics", get(metrics))
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(axum::middleware::from_fn_with_state(broker.clone(), count_requests))
        .with_state(broker)
}

type Shared = State<Arc<Broker>>;
type Answer = Result<Response, Problem>;

async fn count_requests(State(broker): Shared, req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    broker.metrics.request(resp.status().as_u16());
    resp
}

async fn no_route() -> Problem {
    Problem::not_found("no such endpoint; see GET /v1/openapi.json")
}

async fn wrong_method() -> Response {
    let p = Problem::invalid("method not allowed on this endpoint; see GET /v1/openapi.json");
    let mut resp = p.into_response();
    *resp.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
    resp
}

/// The bearer token of a request, if any.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token.trim()).filter(|t| !t.is_empty())
}

/// Run a state operation on the blocking pool (it may wait on SQLite).
async fn blocking<T: Send + 'static>(
    broker: &Arc<Broker>,
    op: impl FnOnce(&Broker) -> Result<T, Problem> + Send + 'static,
) -> Result<T, Problem> {
    let broker = broker.clone();
    tokio::task::spawn_blocking(move || op(&broker))
        .await
        .map_err(|e| Problem::internal(format!("broker task failed: {e}")))?
}

/// Parse a JSON body, naming the offending field (axum's own rejection is plain text).
fn parse_json<T: DeserializeOwned>(body: &Bytes) -> Result<T, Problem> {
    if body.is_empty() {
        return Err(Problem::invalid("the request needs a JSON body"));
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let mut message = e.inner().to_string();
        if let Some(at) = message.rfind(" at line ") {
            message.truncate(at);
        }
        let p = Problem::invalid(format!("invalid request body: {message}"));
        if path == "." {
            p
        } else {
            p.field(path)
        }
    })
}

fn ok(status: StatusCode, value: impl serde::Serialize) -> Answer {
    Ok((status, Json(value)).into_response())
}

async fn list_nodes(State(b): Shared, headers: HeaderMap) -> Answer {
    b.check_user(bearer(&headers))?;
    ok(StatusCode::OK, b.nodes())
}

async fn get_node(State(b): Shared, headers: HeaderMap, Path(name): Path<String>) -> Answer {
    b.check_user(bearer(&headers))?;
    ok(StatusCode::OK, b.node(&name)?)
}

async fn drain_node(State(b): Shared, headers: HeaderMap, Path(name): Path<String>) -> Answer {
    b.check_user(bearer(&headers))?;
    ok(StatusCode::OK, blocking(&b, move |b| b.drain(&name, true)).await?)
}

async fn undrain_node(State(b): Shared, headers: HeaderMap, Path(name): Path<String>) -> Answer {
    b.check_user(bearer(&headers))?;
    ok(StatusCode::OK, blocking(&b, move |b| b.drain(&name, false)).await?)
}

#[derive(Deserialize)]
struct SubmitQuery {
    #[serde(default)]
    dry_run: Option<String>,
}

fn flag(value: Option<&str>, name: &str) -> Result<bool, Problem> {
    match value {
        None | Some("false") | Some("0") => Ok(false),
        Some("") | Some("true") | Some("1") => Ok(true),
        Some(other) => Err(Problem::invalid(format!("{name}={other:?}: use true or false")).field(name)),
    }
}

async fn submit_workload(
    State(b): Shared,
    headers: HeaderMap,
    query: Result<axum::extract::Query<SubmitQuery>, axum::extract::rejection::QueryRejection>,
    body: Bytes,
) -> Answer {
    b.check_user(bearer(&headers))?;
    let query = query.map_err(|e| Problem::invalid(format!("bad query string: {e}")))?;
    let dry_run = flag(query.dry_run.as_deref(), "dry_run")?;
    let text = std::str::from_utf8(&body).map_err(|_| Problem::invalid("the spec must be UTF-8 text"))?;
    if text.trim().is_empty() {
        return Err(Problem::invalid("the request needs a workload spec (JSON) as its body"));
    }
    // JSON as documented; YAML is accepted too (the same parser as `away run`)
    let spec = WorkloadSpec::parse(text, SpecFormat::detect(None, text), "<request body>")
        .map_err(|e| Problem::from(away_model::ApiError::from(e)))?;
    let (workload, placement) = blocking(&b, move |b| b.submit(spec, dry_run)).await?;
    match workload {
        Some(w) => ok(StatusCode::CREATED, json!({"workload": w, "placement": placement})),
        None => ok(StatusCode::OK, json!({"placement": placement})),
    }
}

async fn list_workloads(State(b): Shared, headers: HeaderMap) -> Answer {
    b.check_user(bearer(&headers))?;
    ok(StatusCode::OK, b.workloads())
}

async fn get_workload(State(b): Shared, headers: HeaderMap, Path(name): Path<String>) -> Answer {
    b.check_user(bearer(&headers))?;
    ok(StatusCode::OK, b.workload(&name)?)
}

async fn delete_workload(State(b): Shared, headers: HeaderMap, Path(name): Path<String>) -> Answer {
    b.check_user(bearer(&headers))?;
    ok(StatusCode::ACCEPTED, blocking(&b, move |b| b.delete(&name)).await?)
}

async fn workload_logs(State(b): Shared, headers: HeaderMap, Path(name): Path<String>, uri: axum::http::Uri) -> Answer {
    b.check_user(bearer(&headers))?;
    let src = b.log_source(&name)?;
    let mut url = format!("http://{}/v1/workloads/{name}/logs", src.api_addr);
    if let Some(q) = uri.query() {
        url = format!("{url}?{q}");
    }
    let unreachable = |why: String| {
        let state = if src.online { "online" } else { "offline" };
        Problem::new(
            ErrorCode::Unavailable,
            format!("node {} ({state}) is unreachable for logs of {name}: {why}", src.node),
        )
    };
    let resp = b.http.get(&url).bearer_auth(b.cluster_token()).send().await.map_err(|e| unreachable(e.to_string()))?;
    let status = StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let content_type = resp
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("text/plain; charset=utf-8")
        .to_string();
    let body = resp.bytes().await.map_err(|e| unreachable(e.to_string()))?;
    Ok((status, [(header::CONTENT_TYPE, content_type)], body).into_response())
}

async fn request_migration(State(b): Shared, headers: HeaderMap, body: Bytes) -> Answer {
    b.check_user(bearer(&headers))?;
    let req: MigrationRequest = parse_json(&body)?;
    let m = blocking(&b, move |b| b.migrate(req)).await?;
    ok(StatusCode::ACCEPTED, json!({"migration": m}))
}

async fn list_migrations(State(b): Shared, headers: HeaderMap) -> Answer {
    b.check_user(bearer(&headers))?;
    ok(StatusCode::OK, b.migrations())
}

async fn get_migration(State(b): Shared, headers: HeaderMap, Path(id): Path<String>) -> Answer {
    b.check_user(bearer(&headers))?;
    ok(StatusCode::OK, b.migration(&id)?)
}

async fn register_agent(State(b): Shared, headers: HeaderMap, body: Bytes) -> Answer {
    let token = bearer(&headers).map(str::to_string);
    if token.is_none() {
        return Err(Problem::unauthorized("missing bearer token: send Authorization: Bearer <join token>"));
    }
    let req: RegisterRequest = parse_json(&body)?;
    ok(StatusCode::OK, blocking(&b, move |b| b.register(token.as_deref(), req)).await?)
}

async fn heartbeat(State(b): Shared, headers: HeaderMap, Path(name): Path<String>, body: Bytes) -> Answer {
    let token = bearer(&headers).map(str::to_string);
    if token.is_none() {
        return Err(Problem::unauthorized("missing bearer token: send Authorization: Bearer <agent token>"));
    }
    let hb: Heartbeat = parse_json(&body)?;
    ok(StatusCode::OK, blocking(&b, move |b| b.heartbeat(&name, token.as_deref(), hb)).await?)
}

async fn events(State(b): Shared, headers: HeaderMap) -> Result<Response, Problem> {
    b.check_user(bearer(&headers))?;
    let rx = b.subscribe();
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        use tokio::sync::broadcast::error::RecvError;
        let event = match rx.recv().await {
            Ok(e) => Event::default()
                .event(e.kind.clone())
                .id(e.seq.to_string())
                .data(serde_json::to_string(&e).unwrap_or_default()),
            Err(RecvError::Lagged(n)) => Event::default()
                .event("lagged")
                .data(json!({"kind": "lagged", "missed": n, "message": format!("{n} events were dropped: this client was too slow")}).to_string()),
            Err(RecvError::Closed) => return None,
        };
        Some((Ok::<_, Infallible>(event), rx))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()).into_response())
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn metrics(State(b): Shared) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], b.metrics_text()).into_response()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    /// (method, path) of every `.route(...)` in this file's router.
    fn routes_in_source() -> BTreeSet<(String, String)> {
        let source = include_str!("api.rs");
        let router = source.split("pub fn router").nth(1).and_then(|s| s.split("\n}\n").next()).unwrap_or_default();
        let mut out = BTreeSet::new();
        for line in router.lines().filter(|l| l.trim_start().starts_with(".route(\"")) {
            let rest = line.trim_start().trim_start_matches(".route(\"");
            let Some((path, handlers)) = rest.split_once('"') else { continue };
            for method in ["get", "post", "put", "patch", "delete"] {
                let needle = format!("{method}(");
                let mut from = 0;
                while let Some(at) = handlers[from..].find(&needle) {
                    let pos = from + at;
                    let before = handlers[..pos].chars().last();
                    if !before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                        out.insert((method.to_string(), path.to_string()));
                    }
                    from = pos + needle.len();
                }
            }
        }
        out
    }

    fn routes_in_openapi() -> BTreeSet<(String, String)> {
        let doc: serde_json::Value = serde_json::from_str(super::OPENAPI).expect("openapi.json is JSON");
        let mut out = BTreeSet::new();
        for (path, ops) in doc["paths"].as_object().expect("paths") {
            for method in ops.as_object().expect("operations").keys() {
                out.insert((method.clone(), path.clone()));
            }
        }
        out
    }

    #[test]
    fn openapi_documents_exactly_the_served_routes() {
        let served = routes_in_source();
        assert!(served.len() >= 17, "router parse found only {served:?}");
        let documented = routes_in_openapi();
        let undocumented: Vec<_> = served.difference(&documented).collect();
        let unserved: Vec<_> = documented.difference(&served).collect();
        assert!(undocumented.is_empty(), "served but not in openapi.json: {undocumented:?}");
        assert!(unserved.is_empty(), "in openapi.json but not served: {unserved:?}");
    }

    #[test]
    fn openapi_lists_status_codes_and_resolves_refs() {
        let doc: serde_json::Value = serde_json::from_str(super::OPENAPI).unwrap();
        assert_eq!(doc["openapi"].as_str().map(|v| v.starts_with("3.")), Some(true));
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        let text = super::OPENAPI;
        for piece in text.split("\"#/components/schemas/").skip(1) {
            let name = piece.split('"').next().unwrap();
            assert!(schemas.contains_key(name), "dangling $ref {name}");
        }
        for (path, ops) in doc["paths"].as_object().unwrap() {
            for (method, op) in ops.as_object().unwrap() {
                let codes = op["responses"].as_object().unwrap();
                assert!(!codes.is_empty(), "{method} {path} documents no status code");
                let secured = op.get("security").and_then(|s| s.as_array()).is_none_or(|s| !s.is_empty());
                if secured {
                    assert!(codes.contains_key("401"), "{method} {path} needs a token but documents no 401");
                }
            }
        }
    }

    #[test]
    fn bearer_tokens_are_read_case_insensitively() {
        let mut h = axum::http::HeaderMap::new();
        assert_eq!(super::bearer(&h), None);
        h.insert("authorization", "bearer abc".parse().unwrap());
        assert_eq!(super::bearer(&h), Some("abc"));
        h.insert("authorization", "Basic abc".parse().unwrap());
        assert_eq!(super::bearer(&h), None);
        h.insert("authorization", "Bearer ".parse().unwrap());
        assert_eq!(super::bearer(&h), None);
    }

    #[test]
    fn json_errors_name_the_field() {
        let body = axum::body::Bytes::from_static(b"{\"workload\": \"w\", \"too\": \"x\"}");
        let e = super::parse_json::<crate::MigrationRequest>(&body).unwrap_err();
        assert_eq!(e.error.code, away_model::ErrorCode::InvalidInput);
        assert!(e.error.message.contains("unknown field `too`"), "{}", e.error.message);
        let e =
            super::parse_json::<crate::MigrationRequest>(&axum::body::Bytes::from_static(b"{not json")).unwrap_err();
        assert!(e.error.message.starts_with("invalid request body"), "{}", e.error.message);
    }
}
