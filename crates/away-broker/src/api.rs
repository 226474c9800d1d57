//! The broker's HTTP JSON API. Its OpenAPI document is derived from the handlers'
//! `#[utoipa::path]` and away-model's types ([`openapi_document`]); `openapi.json` beside
//! this crate is a committed copy (tests/openapi.rs keeps it current, a test below keeps
//! the router and the document in step).
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
//! | POST | /v1/migrations[?dry_run=true] | user | 202 `{migration}`; dry run: 200 `MigrationPlanAnswer` (the prediction); 404, 409, 422 with the reason (a deadline the prediction misses: `plan`) |
//! | GET | /v1/migrations | user | `[Migration]` |
//! | GET | /v1/migrations/{id} | user | `Migration`, 404 |
//! | DELETE | /v1/migrations/{id} | user | 200 `Migration` (cancelled), 202 (its online source is told to abort it), 404, 409 (ended) |
//! | POST | /v1/join-tokens | admin | 201 `JoinTokenCreated` (the secret, shown once); 400 |
//! | GET | /v1/join-tokens | admin | `[JoinTokenView]` (no secrets) |
//! | DELETE | /v1/join-tokens/{id} | admin | `JoinTokenView` (revoked), 404 |
//! | POST | /v1/user-tokens | admin | 201 `UserTokenCreated` (the secret, shown once); 400 |
//! | GET | /v1/user-tokens | admin | `[UserTokenView]` (no secrets) |
//! | DELETE | /v1/user-tokens/{id} | admin | `UserTokenView` (revoked), 404 |
//! | POST | /v1/agents/register | join token | `RegisterResponse`; 401 naming a revoked or expired token |
//! | POST | /v1/agents/{name}/heartbeat | agent token | `HeartbeatResponse` |
//! | GET | /v1/events | user | Server-Sent Events, JSON `BrokerEvent` in `data:` |
//! | GET | /v1/openapi.json | none | this API's OpenAPI 3 document |
//! | GET | /metrics | none | Prometheus text |
//!
//! `user`: a user token, an admin's (configured with `--user-token`) or a user's (made
//! with `POST /v1/user-tokens`; 401 naming why once it is revoked or expired). `admin`:
//! an admin's only; a user's token gets 403.
//!
//! Every error is an `ApiError` JSON body; malformed input is a 400 naming the field.
//! Handlers run the (short, SQLite-writing) state operations on the blocking pool.

use std::convert::Infallible;
use std::sync::Arc;

use std::sync::LazyLock;

use away_model::{
    ApiError, ErrorBody, ErrorCode, Heartbeat, HeartbeatResponse, JoinTokenCreated, JoinTokenRequest, JoinTokenView,
    MigrationAccepted, MigrationPlanAnswer, MigrationRecord, NodeView, RegisterRequest, RegisterResponse, SpecFormat,
    SubmitAnswer, UserTokenCreated, UserTokenRequest, UserTokenView, WorkloadSpec, WorkloadView,
};
use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::json;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::Object;
use utoipa::{IntoParams, OpenApi};

use crate::broker::{Broker, MigrationRequest};
use crate::error::Problem;
use crate::move_plan;

/// The OpenAPI document: every route of [`router`], its bodies from away-model's types.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "away broker",
        description = "Placement and state of away workloads across cloud, edge and client nodes. Every error is an ApiError body. Breaking changes (removing or renaming a path, field or enum value, or changing a status code) need a new /v2 path; adding optional fields and new endpoints is not breaking."
    ),
    paths(
        list_nodes, get_node, drain_node, undrain_node, revoke_node, submit_workload, list_workloads, get_workload,
        delete_workload, workload_logs, request_migration, list_migrations, get_migration, cancel_migration,
        create_join_token, list_join_tokens, revoke_join_token, create_user_token, list_user_tokens,
        revoke_user_token, register_agent,
        heartbeat, events, openapi, metrics
    ),
    // BrokerEvent travels in SSE data, PortMapping and VolumeSpec under hand-written
    // `ports` and `volumes` schemas
    components(schemas(away_model::BrokerEvent, away_model::PortMapping, away_model::VolumeSpec)),
    modifiers(&SecuritySchemes)
)]
struct ApiDoc;

struct SecuritySchemes;

impl utoipa::Modify for SecuritySchemes {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        for (name, description) in [
            (
                "userToken",
                "A user token: an admin's (from the broker's configuration) or a user's (made with POST /v1/user-tokens)",
            ),
            ("joinToken", "The broker's configured join token, or one made with POST /v1/join-tokens"),
            ("agentToken", "The agent token answered at registration"),
        ] {
            let mut http = Http::new(HttpAuthScheme::Bearer);
            http.description = Some(description.to_string());
            components.add_security_scheme(name, SecurityScheme::Http(http));
        }
        // rules across fields, which derive cannot write
        if let Some(spec) = components.schemas.remove("WorkloadSpec") {
            let rule = away_model::openapi::kind_runtime_rule();
            let disk = away_model::openapi::disk_kind_rule();
            let volumes = away_model::openapi::volumes_kind_rule();
            let all = utoipa::openapi::schema::AllOfBuilder::new().item(spec).item(rule).item(disk).item(volumes);
            components.schemas.insert("WorkloadSpec".to_string(), all.into());
        }
        // `security(())` renders `[{}]` ("anonymous allowed"); public routes say `[]`: no token at all
        for item in doc.paths.paths.values_mut() {
            for op in [&mut item.get, &mut item.post, &mut item.delete].into_iter().flatten() {
                if op.security.as_ref().is_some_and(|s| s.iter().all(|r| *r == Default::default())) {
                    op.security = Some(Vec::new());
                }
            }
        }
    }
}

/// The OpenAPI document as served at `/v1/openapi.json` and committed as `openapi.json`.
pub fn openapi_document() -> String {
    let mut text = ApiDoc::openapi().to_pretty_json().unwrap_or_default();
    text.push('\n');
    text
}

static GENERATED: LazyLock<String> = LazyLock::new(openapi_document);

/// The committed copy (`openapi.json`); tests/openapi.rs keeps it equal to [`openapi_document`].
pub const OPENAPI: &str = include_str!("../openapi.json");

pub fn router(broker: Arc<Broker>) -> Router {
    Router::new()
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/nodes/{name}", get(get_node))
        .route("/v1/nodes/{name}/drain", post(drain_node).delete(undrain_node))
        .route("/v1/nodes/{name}/revoke", post(revoke_node))
        .route("/v1/workloads", post(submit_workload).get(list_workloads))
        .route("/v1/workloads/{name}", get(get_workload).delete(delete_workload))
        .route("/v1/workloads/{name}/logs", get(workload_logs))
        .route("/v1/migrations", post(request_migration).get(list_migrations))
        .route("/v1/migrations/{id}", get(get_migration).delete(cancel_migration))
        .route("/v1/join-tokens", post(create_join_token).get(list_join_tokens))
        .route("/v1/join-tokens/{id}", delete(revoke_join_token))
        .route("/v1/user-tokens", post(create_user_token).get(list_user_tokens))
        .route("/v1/user-tokens/{id}", delete(revoke_user_token))
        .route("/v1/agents/register", post(register_agent))
        .route("/v1/agents/{name}/heartbeat", post(heartbeat))
        .route("/v1/events", get(events))
        .route("/v1/openapi.json", get(openapi))
        .route("/metrics", get(metrics))
        // the web page and its files: not API, not in the OpenAPI document (dashboard.rs)
        .merge(crate::dashboard::routes())
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
pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
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

/// [`parse_json`] of a body that must be a JSON object, as the schema says (serde would
/// also take a struct's fields as an array); `example` shows one in the error.
fn parse_json_object<T: DeserializeOwned>(body: &Bytes, example: &str) -> Result<T, Problem> {
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(Problem::invalid(format!("the request body must be a JSON object, e.g. {example}")));
    }
    parse_json(body)
}

fn ok(status: StatusCode, value: impl serde::Serialize) -> Answer {
    Ok((status, Json(value)).into_response())
}

#[utoipa::path(
    get,
    path = "/v1/nodes",
    operation_id = "listNodes",
    summary = "List nodes",
    security(("userToken" = [])),
    responses(
        (status = 200, description = "Nodes", body = Vec<NodeView>),
        (status = 401, description = "Missing or wrong bearer token", body = ApiError)
    )
)]
async fn list_nodes(State(b): Shared, headers: HeaderMap) -> Answer {
    b.check_user(bearer(&headers))?;
    ok(StatusCode::OK, b.nodes())
}

#[utoipa::path(
    get,
    path = "/v1/nodes/{name}",
    operation_id = "getNode",
    summary = "One node",
    security(("userToken" = [])),
    params(("name" = String, Path, description = "Node name")),
    responses(
        (status = 200, description = "The node", body = NodeView),
        (status = 401, description = "Missing or wrong bearer token", body = ApiError),
        (status = 404, description = "No such node", body = ApiError)
    )
)]
async fn get_node(State(b): Shared, headers: HeaderMap, Path(name): Path<String>) -> Answer {
    b.check_user(bearer(&headers))?;
    ok(StatusCode::OK, b.node(&name)?)
}

#[utoipa::path(
    post,
    path = "/v1/nodes/{name}/drain",
    operation_id = "drainNode",
    summary = "Drain a node: nothing new is placed there (its workloads stay)",
    security(("userToken" = [])),
    params(("name" = String, Path, description = "Node name")),
    responses(
        (status = 200, description = "The node, draining", body = NodeView),
        (status = 401, description = "Missing or wrong bearer token", body = ApiError),
        (status = 404, description = "No such node", body = ApiError),
        (status = 500, description = "A failure on the broker's side (its database)", body = ApiError)
    )
)]
async fn drain_node(State(b): Shared, headers: HeaderMap, Path(name): Path<String>) -> Answer {
    let by = b.check_user(bearer(&headers))?;
    ok(StatusCode::OK, blocking(&b, move |b| b.drain(&name, true, by.name())).await?)
}

#[utoipa::path(
    delete,
    path = "/v1/nodes/{name}/drain",
    operation_id = "undrainNode",
    summary = "Stop draining a node",
    security(("userToken" = [])),
    params(("name" = String, Path, description = "Node name")),
    responses(
        (status = 200, description = "The node, taking new work", body = NodeView),
        (status = 401, description = "Missing or wrong bearer token", body = ApiError),
        (status = 404, description = "No such node", body = ApiError),
        (status = 500, description = "A failure on the broker's side (its database)", body = ApiError)
    )
)]
async fn undrain_node(State(b): Shared, headers: HeaderMap, Path(name): Path<String>) -> Answer {
    let by = b.check_user(bearer(&headers))?;
    ok(StatusCode::OK, blocking(&b, move |b| b.drain(&name, false, by.name())).await?)
}

#[utoipa::path(
    post,
    path = "/v1/nodes/{name}/revoke",
    operation_id = "revokeNode",
    summary = "Revoke a node's certificate (a lost or stolen node key; admin token)",
    description = "Puts the node's certificates on the CA's revocation list: the broker refuses them at the TLS handshake at once, and every agent from its next heartbeat on (on its API, transfer port, page relays and its calls to other nodes). The node's agent token and key are forgotten and it counts as offline (nothing is placed there; its workloads stay, shown `node-offline`, until moved or removed). The same name may join again, with a join token and a new key (the revoked key is refused). Revoking a revoked node changes nothing.",
    security(("userToken" = [])),
    params(("name" = String, Path, description = "Node name")),
    responses(
        (status = 200, description = "The node, revoked (`revoked_ms` set)", body = NodeView),
        (status = 401, description = "Missing or wrong bearer token, or a user token that is revoked or expired", body = ApiError),
        (status = 403, description = "A user's token (made with POST /v1/user-tokens): revoking a node needs an admin token", body = ApiError),
        (status = 404, description = "No such node", body = ApiError),
        (status = 500, description = "A failure on the broker's side (its database)", body = ApiError)
    )
)]
async fn revoke_node(State(b): Shared, headers: HeaderMap, Path(name): Path<String>) -> Answer {
    b.check_admin(bearer(&headers), "revoking a node")?;
    ok(StatusCode::OK, blocking(&b, move |b| b.revoke_node(&name)).await?)
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct SubmitQuery {
    /// Only return the placement explanation; nothing is stored.
    #[serde(default)]
    #[param(schema_with = flag_schema)]
    dry_run: Option<String>,
}

/// The values [`flag`] takes (a bare `?dry_run` is true).
fn flag_schema() -> Object {
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::String)
        .enum_values(Some(["true", "false", "1", "0", ""]))
        .build()
}

fn flag(value: Option<&str>, name: &str) -> Result<bool, Problem> {
    match value {
        None | Some("false") | Some("0") => Ok(false),
        Some("") | Some("true") | Some("1") => Ok(true),
        Some(other) => Err(Problem::invalid(format!("{name}={other:?}: use true or false")).field(name)),
    }
}

#[utoipa::path(
    post,
    path = "/v1/workloads",
    operation_id = "submitWorkload",
    summary = "Place a workload (or, with dry_run, only explain where it would go)",
    security(("userToken" = [])),
    params(SubmitQuery),
    request_body(description = "The workload spec as JSON (YAML is read too, as by `away run`, but only JSON is this contract)", content = WorkloadSpec),
    responses(
        (status = 201, description = "Placed: the stored workload and the placement explanation", body = SubmitAnswer),
        (status = 200, description = "Dry run: the placement explanation only; nothing is stored", body = SubmitAnswer),
        (status = 400, description = "Malformed JSON or YAML, or an invalid spec; `field` names the offending field", body = ApiError),
        (status = 401, description = "Missing or wrong bearer token", body = ApiError),
        (status = 409, description = "A workload of that name exists already", body = ErrorBody),
        (status = 422, description = "No feasible node; `placement` carries the full explanation", body = ErrorBody),
        (status = 500, description = "A failure on the broker's side (its database)", body = ApiError)
    )
)]
async fn submit_workload(
    State(b): Shared,
    headers: HeaderMap,
    query: Result<axum::extract::Query<SubmitQuery>, axum::extract::rejection::QueryRejection>,
    body: Bytes,
) -> Answer {
    let by = b.check_user(bearer(&headers))?;
    let query = query.map_err(|e| Problem::invalid(format!("bad query string: {e}")))?;
    let dry_run = flag(query.dry_run.as_deref(), "dry_run")?;
    let text = std::str::from_utf8(&body).map_err(|_| Problem::invalid("the spec must be UTF-8 text"))?;
    if text.trim().is_empty() {
        return Err(Problem::invalid("the request needs a workload spec (JSON) as its body"));
    }
    // JSON as documented; YAML is accepted too (the same parser as `away run`)
    let spec = WorkloadSpec::parse(text, SpecFormat::detect(None, text), "<request body>")
        .map_err(|e| Problem::from(away_model::ApiError::from(e)))?;
    let (workload, placement) = blocking(&b, move |b| b.submit(spec, dry_run, by.name())).await?;
    let status = if workload.is_some() { StatusCode::CREATED } else { StatusCode::OK };
    ok(status, SubmitAnswer { workload, placement })
}

#[utoipa::path(
    get,
    path = "/v1/workloads",
    operation_id = "listWorkloads",
    summary = "List workloads",
    security(("userToken" = [])),
    responses(
        (status = 200, description = "Workloads", body = Vec<WorkloadView>),
        (status = 401, description = "Missing or wrong bearer token", body = ApiError)
    )
)]
async fn list_workloads(State(b): Shared, headers: HeaderMap) -> Answer {
    b.check_user(bearer(&headers))?;
    ok(StatusCode::OK, b.workloads())
}

#[utoipa::path(
    get,
    path = "/v1/workloads/{name}",
    operation_id = "getWorkload",
    summary = "One workload: spec, home node, last reported status, runtime decision, placement",
    security(("userToken" = [])),
    params(("name" = String, Path, description = "Workload name")),
    responses(
        (status = 200, description = "The workload", body = WorkloadView),
        (status = 401, description = "Missing or wrong bearer token", body = ApiError),
        (status = 404, description = "No such workload", body = ApiError)
    )
)]
async fn get_workload(State(b): Shared, headers: HeaderMap, Path(name): Path<String>) -> Answer {
    b.check_user(bearer(&headers))?;
    ok(StatusCode::OK, b.workload(&name)?)
}

#[utoipa::path(
    delete,
    path = "/v1/workloads/{name}",
    operation_id = "deleteWorkload",
    summary = "Remove a workload: desired Removed, forgotten once its node reports it gone",
    security(("userToken" = [])),
    params(("name" = String, Path, description = "Workload name")),
    responses(
        (status = 202, description = "Removing", body = WorkloadView),
        (status = 401, description = "Missing or wrong bearer token", body = ApiError),
        (status = 404, description = "No such workload", body = ApiError),
        (status = 409, description = "It is being migrated", body = ErrorBody),
        (status = 500, description = "A failure on the broker's side (its database)", body = ApiError)
    )
)]
async fn delete_workload(State(b): Shared, headers: HeaderMap, Path(name): Path<String>) -> Answer {
    let by = b.check_user(bearer(&headers))?;
    ok(StatusCode::ACCEPTED, blocking(&b, move |b| b.delete(&name, by.name())).await?)
}

#[utoipa::path(
    get,
    path = "/v1/workloads/{name}/logs",
    operation_id = "workloadLogs",
    summary = "The workload's logs, proxied from its node's agent (query parameters are passed on)",
    security(("userToken" = [])),
    params(("name" = String, Path, description = "Workload name")),
    responses(
        (status = 200, description = "The agent's answer, as it sent it", content_type = "text/plain", body = String),
        (status = 401, description = "Missing or wrong bearer token", body = ApiError),
        (status = 404, description = "No such workload", body = ApiError),
        (status = 503, description = "Its node is unreachable", body = ApiError)
    )
)]
async fn workload_logs(State(b): Shared, headers: HeaderMap, Path(name): Path<String>, uri: axum::http::Uri) -> Answer {
    b.check_user(bearer(&headers))?;
    let src = b.log_source(&name)?;
    let unreachable = |why: String| {
        let state = if src.online { "online" } else { "offline" };
        Problem::new(
            ErrorCode::Unavailable,
            format!("node {} ({state}) is unreachable for logs of {name}: {why}", src.node),
        )
    };
    let (base, http) =
        b.node_http(&src.node, &src.api_addr, std::time::Duration::from_secs(3)).await.map_err(unreachable)?;
    let mut url = format!("{base}/v1/workloads/{name}/logs");
    if let Some(q) = uri.query() {
        url = format!("{url}?{q}");
    }
    let resp = http
        .get(&url)
        .bearer_auth(b.cluster_token())
        // the body streams for as long as the log is: only connecting is bounded as usual
        .timeout(LOGS_TIMEOUT)
        .send()
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let status = StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let content_type = resp
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("text/plain; charset=utf-8")
        .to_string();
    // passed on chunk by chunk as the agent sends them, never held whole
    let body = axum::body::Body::from_stream(resp.bytes_stream());
    Ok((status, [(header::CONTENT_TYPE, content_type)], body).into_response())
}

/// The longest a proxied log may take to stream.
const LOGS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct MigrateQuery {
    /// Only say where and how the move would go and what it is predicted to cost (the
    /// source agent measures the workload and the link); nothing is recorded.
    #[serde(default)]
    #[param(schema_with = flag_schema)]
    dry_run: Option<String>,
}

#[utoipa::path(
    post,
    path = "/v1/migrations",
    operation_id = "requestMigration",
    summary = "Move a workload: to a named node, or to the best-scoring compatible node; checked for compatibility first, and against its prediction when the request gives deadline_s, max_downtime_ms or optimize (or with dry_run, only predicted)",
    security(("userToken" = [])),
    params(MigrateQuery),
    request_body(content = MigrationRequest),
    responses(
        (status = 202, description = "Accepted: the source agent receives the order with its next heartbeat", body = MigrationAccepted),
        (status = 200, description = "Dry run: where and how it would move, with the prediction and the inputs it used; nothing is recorded", body = MigrationPlanAnswer),
        (status = 400, description = "Malformed JSON or an invalid field; `field` names it", body = ApiError),
        (status = 401, description = "Missing or wrong bearer token", body = ApiError),
        (status = 404, description = "No such workload or target node", body = ApiError),
        (status = 409, description = "The workload is being removed or migrated already (`migration` names that one)", body = ErrorBody),
        (status = 422, description = "The move is impossible; `compatibility` or `placement` carries the full explanation; or it is predicted to miss the `deadline_s` or `max_downtime_ms` asked for, and `plan` carries the prediction", body = ErrorBody),
        (status = 500, description = "A failure on the broker's side (its database)", body = ApiError)
    )
)]
async fn request_migration(
    State(b): Shared,
    headers: HeaderMap,
    query: Result<axum::extract::Query<MigrateQuery>, axum::extract::rejection::QueryRejection>,
    body: Bytes,
) -> Answer {
    let by = b.check_user(bearer(&headers))?;
    let query = query.map_err(|e| Problem::invalid(format!("bad query string: {e}")))?;
    let dry_run = flag(query.dry_run.as_deref(), "dry_run")?;
    let mut req: MigrationRequest = parse_json(&body)?;
    if !dry_run && !move_plan::wanted(&req) {
        let m = blocking(&b, move |b| b.migrate(req, by.name())).await?;
        return ok(StatusCode::ACCEPTED, MigrationAccepted { migration: m });
    }
    let choice = {
        let req = req.clone();
        blocking(&b, move |b| b.choose_move(&req)).await?
    };
    let (choice, plan) = move_plan::best_target(&b, choice, &req).await;
    let refused = plan.as_ref().ok().and_then(|p| move_plan::refusal(p, &req));
    // the mode the prediction chose for `optimize`, when the user named none
    let mode = match (&req.mode, &plan) {
        (None, Ok(p)) if req.optimize.is_some() => p.chosen.and_then(|k| k.container_mode()).map(str::to_string),
        _ => req.mode.clone(),
    };
    let why = match &plan {
        Ok(p) if !p.why.is_empty() => format!("{}; predicted: {}", choice.why, p.why),
        Ok(_) => choice.why.clone(),
        Err(e) => format!("{}; no prediction: {e}", choice.why),
    };
    if dry_run {
        let (plan, plan_error) = match plan {
            Ok(p) => (Some(p), None),
            Err(e) => (None, Some(e)),
        };
        return ok(
            StatusCode::OK,
            MigrationPlanAnswer {
                workload: req.workload.clone(),
                source: choice.source,
                target: choice.target,
                chosen_by: choice.chosen_by,
                why,
                compatibility: choice.compatibility,
                mode,
                plan,
                plan_error,
                refused,
            },
        );
    }
    if let Some(why) = refused {
        let plan = plan.ok();
        return Err(Problem::new(
            ErrorCode::Incompatible,
            format!("{} cannot move from {} to {} as asked: {why}", req.workload, choice.source, choice.target),
        )
        .detail("plan", plan));
    }
    let predicted = plan.as_ref().ok().and_then(|p| p.chosen_prediction().cloned());
    req.to = Some(choice.target.clone());
    req.mode = mode;
    let chosen = Some((choice.chosen_by.clone(), why));
    let m = blocking(&b, move |b| b.migrate_as(req, chosen, predicted, by.name())).await?;
    ok(StatusCode::ACCEPTED, MigrationAccepted { migration: m })
}

#[utoipa::path(
    get,
    path = "/v1/migrations",
    operation_id = "listMigrations",
    summary = "List migrations",
    security(("userToken" = [])),
    responses(
        (status = 200, description = "Migrations", body = Vec<MigrationRecord>),
        (status = 401, description = "Missing or wrong bearer token", body = ApiError)
    )
)]
async fn list_migrations(State(b): Shared, headers: HeaderMap) -> Answer {
    b.check_user(bearer(&headers))?;
    ok(StatusCode::OK, b.migrations())
}

#[utoipa::path(
    get,
    path = "/v1/migrations/{id}",
    operation_id = "getMigration",
    summary = "One migration with its state and report",
    security(("userToken" = [])),
    params(("id" = String, Path, description = "Migration id")),
    responses(
        (status = 200, description = "The migration", body = MigrationRecord),
        (status = 401, description = "Missing or wrong bearer token", body = ApiError),
        (status = 404, description = "No such migration", body = ApiError)
    )
)]
async fn get_migration(State(b): Shared, headers: HeaderMap, Path(id): Path<String>) -> Answer {
    b.check_user(bearer(&headers))?;
    ok(StatusCode::OK, b.migration(&id)?)
}

#[utoipa::path(
    delete,
    path = "/v1/migrations/{id}",
    operation_id = "cancelMigration",
    summary = "Cancel a migration: one its source has not started (pending) or whose source node is offline ends at once (200); one its online source is moving is aborted by the source before its commit point (202: `cancel_requested_ms` set, it ends `cancelled` when the source reports, or `succeeded` if it had committed); the workload stays where its source reports it",
    security(("userToken" = [])),
    params(("id" = String, Path, description = "Migration id")),
    responses(
        (status = 200, description = "Cancelled: the migration, in state `cancelled`, with the reason in `error`", body = MigrationRecord),
        (status = 202, description = "Its online source is told to abort the move: the migration, still `running`, with `cancel_requested_ms`", body = MigrationRecord),
        (status = 401, description = "Missing or wrong bearer token", body = ApiError),
        (status = 404, description = "No such migration", body = ApiError),
        (status = 409, description = "It has ended; `migration` carries it", body = ErrorBody),
        (status = 500, description = "A failure on the broker's side (its database)", body = ApiError)
    )
)]
async fn cancel_migration(State(b): Shared, headers: HeaderMap, Path(id): Path<String>) -> Answer {
    let by = b.check_user(bearer(&headers))?;
    let m = blocking(&b, move |b| b.cancel_migration(&id, by.name())).await?;
    let status = if m.state.is_active() { StatusCode::ACCEPTED } else { StatusCode::OK };
    ok(status, m)
}

#[utoipa::path(
    post,
    path = "/v1/join-tokens",
    operation_id = "createJoinToken",
    summary = "Make a join token for registering nodes (admin token); its secret is in this answer only (the broker keeps its SHA-256)",
    security(("userToken" = [])),
    request_body(content = JoinTokenRequest, description = "Optional expiry and label; an empty object is fine"),
    responses(
        (status = 201, description = "Made: its id, the secret, and when it expires", body = JoinTokenCreated),
        (status = 400, description = "Malformed JSON or an invalid field; `field` names it", body = ApiError),
        (status = 401, description = "Missing or wrong bearer token, or a user token that is revoked or expired", body = ApiError),
        (status = 403, description = "A user's token (made with POST /v1/user-tokens): managing tokens needs an admin token", body = ApiError),
        (status = 500, description = "A failure on the broker's side (its database)", body = ApiError)
    )
)]
async fn create_join_token(State(b): Shared, headers: HeaderMap, body: Bytes) -> Answer {
    b.check_admin(bearer(&headers), "making a join token")?;
    // `{}` for a token that never expires
    let req: JoinTokenRequest = parse_json_object(&body, "{} or {\"expires_in_s\": 3600}")?;
    ok(StatusCode::CREATED, blocking(&b, move |b| b.create_join_token(req)).await?)
}

#[utoipa::path(
    get,
    path = "/v1/join-tokens",
    operation_id = "listJoinTokens",
    summary = "The join tokens made over the API (not the configured one), oldest first, without their secrets (admin token)",
    security(("userToken" = [])),
    responses(
        (status = 200, description = "Join tokens", body = Vec<JoinTokenView>),
        (status = 401, description = "Missing or wrong bearer token, or a user token that is revoked or expired", body = ApiError),
        (status = 403, description = "A user's token: managing tokens needs an admin token", body = ApiError)
    )
)]
async fn list_join_tokens(State(b): Shared, headers: HeaderMap) -> Answer {
    b.check_admin(bearer(&headers), "listing join tokens")?;
    ok(StatusCode::OK, b.join_tokens())
}

#[utoipa::path(
    delete,
    path = "/v1/join-tokens/{id}",
    operation_id = "revokeJoinToken",
    summary = "Revoke a join token (admin token): no node registers with it any more; nodes that joined with it keep working (they use their certificates)",
    security(("userToken" = [])),
    params(("id" = String, Path, description = "Join token id")),
    responses(
        (status = 200, description = "Revoked (or revoked already): the token, without its secret", body = JoinTokenView),
        (status = 401, description = "Missing or wrong bearer token, or a user token that is revoked or expired", body = ApiError),
        (status = 403, description = "A user's token: managing tokens needs an admin token", body = ApiError),
        (status = 404, description = "No such join token", body = ApiError),
        (status = 500, description = "A failure on the broker's side (its database)", body = ApiError)
    )
)]
async fn revoke_join_token(State(b): Shared, headers: HeaderMap, Path(id): Path<String>) -> Answer {
    b.check_admin(bearer(&headers), "revoking a join token")?;
    ok(StatusCode::OK, blocking(&b, move |b| b.revoke_join_token(&id)).await?)
}

#[utoipa::path(
    post,
    path = "/v1/user-tokens",
    operation_id = "createUserToken",
    summary = "Make a token for a user (admin token): it may use the whole user API but not manage tokens; its secret is in this answer only (the broker keeps its SHA-256)",
    security(("userToken" = [])),
    request_body(content = UserTokenRequest, description = "The user's name; optional expiry and label"),
    responses(
        (status = 201, description = "Made: its id, user, the secret, and when it expires", body = UserTokenCreated),
        (status = 400, description = "Malformed JSON or an invalid field (a user name that is not like a DNS label); `field` names it", body = ApiError),
        (status = 401, description = "Missing or wrong bearer token, or a user token that is revoked or expired", body = ApiError),
        (status = 403, description = "A user's token: managing tokens needs an admin token", body = ApiError),
        (status = 500, description = "A failure on the broker's side (its database)", body = ApiError)
    )
)]
async fn create_user_token(State(b): Shared, headers: HeaderMap, body: Bytes) -> Answer {
    b.check_admin(bearer(&headers), "making a user token")?;
    let req: UserTokenRequest = parse_json_object(&body, "{\"user\": \"anna\", \"expires_in_s\": 2592000}")?;
    ok(StatusCode::CREATED, blocking(&b, move |b| b.create_user_token(req)).await?)
}

#[utoipa::path(
    get,
    path = "/v1/user-tokens",
    operation_id = "listUserTokens",
    summary = "The user tokens made over the API (not the configured admin tokens), oldest first, without their secrets (admin token)",
    security(("userToken" = [])),
    responses(
        (status = 200, description = "User tokens", body = Vec<UserTokenView>),
        (status = 401, description = "Missing or wrong bearer token, or a user token that is revoked or expired", body = ApiError),
        (status = 403, description = "A user's token: managing tokens needs an admin token", body = ApiError)
    )
)]
async fn list_user_tokens(State(b): Shared, headers: HeaderMap) -> Answer {
    b.check_admin(bearer(&headers), "listing user tokens")?;
    ok(StatusCode::OK, b.user_tokens())
}

#[utoipa::path(
    delete,
    path = "/v1/user-tokens/{id}",
    operation_id = "revokeUserToken",
    summary = "Revoke a user token (admin token): its next request is refused with 401 naming why (an event stream it opened stays open)",
    security(("userToken" = [])),
    params(("id" = String, Path, description = "User token id")),
    responses(
        (status = 200, description = "Revoked (or revoked already): the token, without its secret", body = UserTokenView),
        (status = 401, description = "Missing or wrong bearer token, or a user token that is revoked or expired", body = ApiError),
        (status = 403, description = "A user's token: managing tokens needs an admin token", body = ApiError),
        (status = 404, description = "No such user token", body = ApiError),
        (status = 500, description = "A failure on the broker's side (its database)", body = ApiError)
    )
)]
async fn revoke_user_token(State(b): Shared, headers: HeaderMap, Path(id): Path<String>) -> Answer {
    b.check_admin(bearer(&headers), "revoking a user token")?;
    ok(StatusCode::OK, blocking(&b, move |b| b.revoke_user_token(&id)).await?)
}

#[utoipa::path(
    post,
    path = "/v1/agents/register",
    operation_id = "registerAgent",
    summary = "An agent joins (Bearer join token); answers fresh tokens",
    security(("joinToken" = [])),
    request_body(content = RegisterRequest),
    responses(
        (status = 200, description = "Registered", body = RegisterResponse),
        (status = 400, description = "Malformed JSON or an invalid field; `field` names it", body = ApiError),
        (status = 401, description = "Missing or wrong bearer token, or a join token that is revoked or expired (the message says which)", body = ApiError),
        (status = 409, description = "The node name is registered with another key", body = ApiError),
        (status = 500, description = "A failure on the broker's side (its database)", body = ApiError)
    )
)]
async fn register_agent(State(b): Shared, headers: HeaderMap, body: Bytes) -> Answer {
    let token = bearer(&headers).map(str::to_string);
    if token.is_none() {
        return Err(Problem::unauthorized("missing bearer token: send Authorization: Bearer <join token>"));
    }
    let req: RegisterRequest = parse_json(&body)?;
    ok(StatusCode::OK, blocking(&b, move |b| b.register(token.as_deref(), req)).await?)
}

#[utoipa::path(
    post,
    path = "/v1/agents/{name}/heartbeat",
    operation_id = "heartbeat",
    summary = "An agent reports (Bearer agent token) and receives its complete desired set and migration orders",
    security(("agentToken" = [])),
    params(("name" = String, Path, description = "Node name")),
    request_body(content = Heartbeat),
    responses(
        (status = 200, description = "The desired set", body = HeartbeatResponse),
        (status = 400, description = "Malformed JSON or an invalid field; `field` names it", body = ApiError),
        (status = 401, description = "Missing or wrong bearer token", body = ApiError),
        (status = 404, description = "No such node", body = ApiError),
        (status = 500, description = "A failure on the broker's side (its database)", body = ApiError)
    )
)]
async fn heartbeat(
    State(b): Shared,
    peer: Option<axum::Extension<axum::extract::ConnectInfo<away_identity::serve::TlsPeer>>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: Bytes,
) -> Answer {
    // a broker with a CA hears a node only from that node's certificate
    if let Some(tls) = &b.config.tls {
        // a connection opened before the certificate was revoked (keep-alive)
        if peer
            .as_ref()
            .and_then(|p| p.0 .0.serial.as_deref())
            .is_some_and(|s| tls.identity.revocations().is_revoked(s))
        {
            return Err(Problem::unauthorized(format!("node {name}'s certificate is revoked")));
        }
        match peer.as_ref().and_then(|p| p.0 .0.node.as_deref()) {
            Some(n) if n == name => {}
            Some(n) => {
                return Err(Problem::unauthorized(format!("a heartbeat for node {name} from node {n}'s certificate")))
            }
            None => {
                return Err(Problem::unauthorized(format!(
                    "node {name}'s heartbeat needs its certificate (TLS client certificate from this broker's CA)"
                )))
            }
        }
    }
    let token = bearer(&headers).map(str::to_string);
    if token.is_none() {
        return Err(Problem::unauthorized("missing bearer token: send Authorization: Bearer <agent token>"));
    }
    let hb: Heartbeat = parse_json(&body)?;
    ok(StatusCode::OK, blocking(&b, move |b| b.heartbeat(&name, token.as_deref(), hb)).await?)
}

#[utoipa::path(
    get,
    path = "/v1/events",
    operation_id = "events",
    summary = "Server-Sent Events of the cluster; each `data:` is a BrokerEvent as JSON, the SSE event name is its kind",
    security(("userToken" = [])),
    responses(
        (status = 200, description = "An endless event stream", content_type = "text/event-stream", body = String),
        (status = 401, description = "Missing or wrong bearer token", body = ApiError)
    )
)]
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

#[utoipa::path(
    get,
    path = "/v1/openapi.json",
    operation_id = "openapi",
    summary = "This document",
    security(()),
    responses(
        (status = 200, description = "OpenAPI 3.1", content_type = "application/json", body = Object)
    )
)]
async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], GENERATED.as_str()).into_response()
}

#[utoipa::path(
    get,
    path = "/metrics",
    operation_id = "metrics",
    summary = "Prometheus text exposition: nodes, workloads and migrations by state; placements, heartbeats and requests",
    security(()),
    responses(
        (status = 200, description = "Metrics", content_type = "text/plain", body = String)
    )
)]
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
        let doc: serde_json::Value = serde_json::from_str(&super::GENERATED).expect("openapi.json is JSON");
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
        let doc: serde_json::Value = serde_json::from_str(&super::GENERATED).unwrap();
        assert_eq!(doc["openapi"].as_str().map(|v| v.starts_with("3.")), Some(true));
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        let text = super::GENERATED.as_str();
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
    fn documented_migration_modes_are_the_ones_the_broker_parses() {
        let doc: serde_json::Value = serde_json::from_str(&super::GENERATED).unwrap();
        let modes = doc["components"]["schemas"]["MigrationRequest"]["properties"]["mode"]["enum"].as_array().unwrap();
        for mode in modes.iter().filter_map(|m| m.as_str()) {
            assert!(mode.parse::<away_policy::mode::ContainerMode>().is_ok(), "{mode} is documented but refused");
        }
        assert!("".parse::<away_policy::mode::ContainerMode>().is_err());
    }

    #[test]
    fn documented_user_name_rule_is_the_one_the_broker_checks() {
        let doc: serde_json::Value = serde_json::from_str(&super::GENERATED).unwrap();
        let user = &doc["components"]["schemas"]["UserTokenRequest"]["properties"]["user"];
        assert_eq!(user["pattern"], away_model::USER_NAME_PATTERN, "{user}");
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
