//! The agent's HTTP JSON API (`/v1`) and its transfer receiver.
//!
//! | method | path | answer |
//! | --- | --- | --- |
//! | GET | /v1/node | `{node: NodeInfo, transfer_addr}` |
//! | GET | /v1/images?reference=R | `{reference, present}` |
//! | GET | /v1/workloads | `[WorkloadStatus]` |
//! | GET | /v1/workloads/{name} | `WorkloadStatus`, 404 |
//! | POST | /v1/transfers | `{transfer_id, workload, source}`: announce an incoming move; `{secret}` (its one-time secret, for the transfer's hello); 409 when announced by another source or when this agent takes no migrations |
//! | POST | /v1/transfers/{id}/commit | `MoveRecord` (committed); idempotent; 409 when the move was aborted (lease ran out); 404 when unknown |
//! | GET | /v1/transfers/{id} | `MoveRecord`: what became of the move (prepared, committed, aborted); 404 when unknown |
//! | DELETE | /v1/transfers/{id} | remove a provisional copy now (lazy move failed, answer lost); 204 once it is gone and the move aborted; 404 when not held; 500 when it would not go |
//! | POST | /v1/images | body: an image tar; `{references}` |
//! | POST | /v1/vm-migrations | `{spec, image, options}`: start a VM destination; `{uri}`; 409 when this agent takes no migrations |
//! | POST | /v1/vm-migrations/{name}/resumed?limit_ms=N | wait for its RESUME; `{resumed_at_ms}` |
//! | POST | /v1/vm-migrations/{name}/confirm | 204: the VM stays |
//! | DELETE | /v1/vm-migrations/{name} | 204: the destination is removed |
//!
//! Errors are `away_model::ApiError` bodies with the matching status code.

use std::sync::Arc;

use away_migrate::container::{restore_received, verdict_for, Manifest};
use away_migrate::target::{MoveRecord, MoveState, TargetInfo};
use away_migrate::transfer::{self, ReceivedPayload, Verdict};
use away_model::{error_chain, ApiError, ErrorChain, ErrorCode};
use away_runtime::RuntimeError;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;

use crate::{Agent, Provisional};

/// An `ApiError` as an HTTP answer.
pub struct Problem(pub ApiError);

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(self.0)).into_response()
    }
}

impl From<RuntimeError> for Problem {
    fn from(e: RuntimeError) -> Self {
        let code = match &e {
            RuntimeError::NotFound { .. } | RuntimeError::NoSuchWorkload { .. } => ErrorCode::NotFound,
            RuntimeError::AlreadyExists { .. } => ErrorCode::Conflict,
            RuntimeError::Invalid { .. } | RuntimeError::Image { .. } => ErrorCode::InvalidInput,
            RuntimeError::Unavailable { .. } => ErrorCode::Unavailable,
            RuntimeError::NoRuntime(_) | RuntimeError::Unsupported { .. } => ErrorCode::Incompatible,
            _ => ErrorCode::Internal,
        };
        Problem(ApiError::new(code, error_chain(&e)))
    }
}

/// Every call needs the cluster token once the agent has one (standalone agents: their
/// `--token`, if any): an agent takes work only from its broker and the broker's other
/// agents.
async fn require_token(
    State(agent): State<Arc<Agent>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Result<Response, Problem> {
    let expected = agent.cluster_token.read().await.clone();
    if let Some(expected) = expected {
        let given = req
            .headers()
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        // compare without an early exit on the first differing byte
        let ok = given.is_some_and(|g| {
            g.len() == expected.len() && g.bytes().zip(expected.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
        });
        if !ok {
            return Err(Problem(ApiError::new(
                ErrorCode::Unauthorized,
                "missing or wrong bearer token (the cluster's)",
            )));
        }
    }
    Ok(next.run(req).await)
}

pub fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/v1/node", get(node))
        .route("/v1/images", get(image))
        .route("/v1/workloads", get(workloads))
        .route("/v1/workloads/{name}", get(workload))
        .route("/v1/transfers", post(announce))
        .route("/v1/transfers/{id}/commit", post(commit))
        .route("/v1/transfers/{id}", get(move_state).delete(abort_transfer))
        .route("/v1/images", post(upload_image).layer(axum::extract::DefaultBodyLimit::max(2 << 30)))
        .route("/v1/vm-migrations", post(vm_prepare))
        .route("/v1/vm-migrations/{name}/resumed", post(vm_resumed))
        .route("/v1/vm-migrations/{name}/confirm", post(vm_confirm))
        .route("/v1/vm-migrations/{name}", axum::routing::delete(vm_abort))
        .route("/v1/workloads/{name}/logs", get(logs))
        .route_layer(axum::middleware::from_fn_with_state(agent.clone(), require_token))
        .with_state(agent)
}

async fn node(State(agent): State<Arc<Agent>>) -> Json<TargetInfo> {
    Json(TargetInfo { node: agent.node_info().await, transfer_addr: agent.transfer_addr() })
}

/// The workload's output so far, as plain text, streamed as the runtime reads it (a
/// long log is never held whole). An error before the first chunk is an error answer;
/// one later ends the body early.
async fn logs(State(agent): State<Arc<Agent>>, Path(name): Path<String>) -> Result<Response, Problem> {
    use futures_util::StreamExt;
    let (rt, _) = agent.node.get(&name).await?;
    let mut stream = rt.logs(&name, false).await?;
    let first = stream.next().await.transpose()?;
    let body = futures_util::stream::iter(first.map(Ok)).chain(stream.inspect(|chunk| {
        if let Err(e) = chunk {
            tracing::warn!("log stream ended early: {e}", e = ErrorChain(e));
        }
    }));
    let content_type = [(axum::http::header::CONTENT_TYPE, "text/plain; charset=utf-8")];
    Ok((content_type, axum::body::Body::from_stream(body)).into_response())
}

#[derive(Deserialize)]
struct ImageQuery {
    reference: String,
}

async fn image(State(agent): State<Arc<Agent>>, Query(q): Query<ImageQuery>) -> Json<serde_json::Value> {
    let present = agent.node.store.resolve(&q.reference).is_ok();
    Json(serde_json::json!({"reference": q.reference, "present": present}))
}

async fn workloads(State(agent): State<Arc<Agent>>) -> Json<Vec<away_model::WorkloadStatus>> {
    Json(agent.node.list().await.0)
}

async fn workload(
    State(agent): State<Arc<Agent>>,
    Path(name): Path<String>,
) -> Result<Json<away_model::WorkloadStatus>, Problem> {
    Ok(Json(agent.node.get(&name).await?.1))
}

/// What a source sends to announce a move.
#[derive(serde::Serialize, Deserialize)]
pub struct Announce {
    pub transfer_id: String,
    pub workload: String,
    /// The source node's name: under TLS its certificate must carry it.
    pub source: String,
}

async fn announce(
    State(agent): State<Arc<Agent>>,
    Json(req): Json<Announce>,
) -> Result<Json<serde_json::Value>, Problem> {
    let valid =
        |s: &str| !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    for (field, value) in [("transfer_id", &req.transfer_id), ("workload", &req.workload), ("source", &req.source)] {
        if !valid(value) {
            return Err(Problem(ApiError::new(
                ErrorCode::InvalidInput,
                format!("{field} {value:?} must be 1-64 characters of [A-Za-z0-9_.-]"),
            )));
        }
    }
    let a = agent
        .announce(&req.transfer_id, &req.workload, &req.source)
        .map_err(|why| Problem(ApiError::new(ErrorCode::Conflict, why)))?;
    tracing::info!(transfer = %req.transfer_id, workload = %req.workload, source = %req.source, "move announced");
    Ok(Json(serde_json::json!({"secret": a.secret.expose()})))
}

fn state_problem(e: crate::state::StateError) -> Problem {
    Problem(ApiError::new(ErrorCode::Internal, error_chain(&e)))
}

fn unknown_move(id: &str) -> Problem {
    Problem(ApiError::new(
        ErrorCode::NotFound,
        format!("no move {id:?} here (never received, or ended over a week ago)"),
    ))
}

/// Commit a prepared move; asked again, the same answer. An aborted move is a 409 (an
/// older source took any 2xx for "committed").
async fn commit(State(agent): State<Arc<Agent>>, Path(id): Path<String>) -> Result<Json<MoveRecord>, Problem> {
    #[cfg(feature = "fault-injection")]
    commit_fault("die-before");
    let record = agent.commit(&id).await.map_err(state_problem)?.ok_or_else(|| unknown_move(&id))?;
    #[cfg(feature = "fault-injection")]
    commit_fault("die-after");
    match record.state {
        MoveState::Committed => {
            tracing::info!(transfer = %id, workload = %record.workload, "migration committed by its source");
            Ok(Json(record))
        }
        MoveState::Aborted => Err(Problem(ApiError::new(
            ErrorCode::Conflict,
            format!("move {id} of {} was aborted: {}", record.workload, record.reason),
        ))),
        // journaled, its restore not answered yet: the source has no answer to commit
        MoveState::Prepared => Err(Problem(ApiError::new(
            ErrorCode::Conflict,
            format!("move {id} of {} is still being restored: nothing to commit yet", record.workload),
        ))),
    }
}

/// Fault injection for the end-to-end tests (`AWAY_FAULT_COMMIT_TARGET=die-before` or
/// `die-after`): the agent dies when a commit arrives, before or after the commit is on
/// disk (the source's request then gets no answer).
#[cfg(feature = "fault-injection")]
fn commit_fault(when: &str) {
    if std::env::var("AWAY_FAULT_COMMIT_TARGET").as_deref() == Ok(when) {
        tracing::error!("AWAY_FAULT_COMMIT_TARGET={when}: the agent dies at the commit");
        std::process::abort();
    }
}

/// What became of a move: the question a source asks after a lost answer.
async fn move_state(State(agent): State<Arc<Agent>>, Path(id): Path<String>) -> Result<Json<MoveRecord>, Problem> {
    agent.move_record(&id).map_err(state_problem)?.map(Json).ok_or_else(|| unknown_move(&id))
}

async fn abort_transfer(State(agent): State<Arc<Agent>>, Path(id): Path<String>) -> Result<StatusCode, Problem> {
    match agent.abort(&id).await {
        Some(true) => {
            tracing::warn!(transfer = %id, "migration aborted by its source: provisional copy removed");
            Ok(StatusCode::NO_CONTENT)
        }
        Some(false) => Err(Problem(ApiError::new(
            ErrorCode::Internal,
            format!("the copy of transfer {id:?} could not be removed; its move stays prepared"),
        ))),
        None => Err(Problem(ApiError::new(
            ErrorCode::NotFound,
            format!(
                "no provisional workload for transfer {id:?} (unknown, being restored, committed, or already removed)"
            ),
        ))),
    }
}

/// Receive transfers until `stop`; each complete payload is restored on this node.
/// Returns how many connections were still busy (restoring) when it gave up waiting.
pub async fn serve_transfers(
    agent: Arc<Agent>,
    listener: tokio::net::TcpListener,
    stop: impl std::future::Future<Output = ()> + Send,
) -> usize {
    let spool = agent.config.spool_dir();
    let options = agent.config.transfers.clone();
    // no channels: every hello is refused by the check below, in plaintext
    let channels = agent.config.channels.clone().unwrap_or_else(away_migrate::channel::Channels::plaintext);
    let checker = agent.clone();
    let authorize: transfer::Authorize = Arc::new(move |claim| checker.authorize(claim));
    let handler = move |payload: ReceivedPayload| {
        let agent = agent.clone();
        async move { handle_payload(agent, payload).await }
    };
    let receiver = transfer::Receiver::from_listener(listener, spool)
        .with_options(options)
        .with_channels(channels)
        .with_authorizer(authorize);
    match receiver.serve_until(handler, stop).await {
        Ok(busy) => busy,
        Err(e) => {
            tracing::error!("transfer receiver stopped: {e}", e = ErrorChain(&e));
            0
        }
    }
}

async fn handle_payload(agent: Arc<Agent>, payload: ReceivedPayload) -> Verdict {
    // the spec checked like any other (a bad one fails the restore below, field named)
    let manifest: Option<Manifest> = Manifest::of_payload(&payload).ok();
    tracing::info!(transfer = %payload.transfer_id, workload = ?manifest.as_ref().map(|m| &m.spec.name), bytes = payload.bytes_raw, "payload received, restoring");
    // fault injection for the end-to-end tests: the restore "crashes"
    #[cfg(feature = "fault-injection")]
    if std::env::var("AWAY_FAULT_RESTORE").as_deref() == Ok("fail") {
        return Verdict::failed("restore killed (AWAY_FAULT_RESTORE=fail)");
    }
    let settle = std::time::Duration::from_millis(500);
    let id = &payload.transfer_id;
    if let Some(m) = &manifest {
        agent.journal(id, &Provisional { workload: m.spec.name.clone(), runtime: m.runtime });
    }
    // the page link's peer: the node the move was announced from (the receiver checked
    // the sender is that node)
    let pages = away_migrate::lazy::PageLink {
        channels: agent.config.channels.clone().unwrap_or_else(away_migrate::channel::Channels::plaintext),
        peer_node: agent.announced_source(id).unwrap_or_default(),
    };
    let mut result = restore_received(&agent.node, &payload, settle, &pages).await;
    let mut verdict = verdict_for(&result, settle);
    let Some(m) = manifest else { return verdict };
    match &mut result {
        Ok(restored) => {
            let p = Provisional { workload: restored.status.name.clone(), runtime: m.runtime };
            match restored.lazy.take() {
                // the source's process is gone: no lease may remove the only copy
                None if restored.released => {
                    agent.end_move_logged(id, MoveState::Committed, "every page arrived and the source let go");
                    tracing::info!(workload = %p.workload, transfer = %payload.transfer_id, "every page is in and the source let go: the copy is final");
                }
                None => {
                    // held before the answer leaves: the commit can come at once
                    agent.arm_lease(payload.transfer_id.clone(), p).await;
                    if let Some(d) = verdict.detail.as_object_mut() {
                        d.insert("lease_ms".into(), (agent.lease_promise().as_millis() as u64).into());
                    }
                }
                Some(daemon) => agent.watch_lazy(payload.transfer_id.clone(), p, daemon).await,
            }
        }
        Err(failed) => {
            let why = format!("the restore failed: {}", failed.message);
            // a copy that would not go at once goes in the background: the source
            // resumes its own as soon as it hears the verdict
            match failed.leftover.take() {
                Some(workload) => {
                    let (agent, id) = (agent.clone(), id.clone());
                    tokio::spawn(async move {
                        agent.abort_copy(&id, &Provisional { workload, runtime: m.runtime }, &why).await
                    });
                }
                None => agent.end_move_logged(id, MoveState::Aborted, &why),
            }
        }
    }
    verdict
}

async fn upload_image(
    State(agent): State<Arc<Agent>>,
    body: axum::body::Bytes,
) -> Result<Json<serde_json::Value>, Problem> {
    let dir = agent.config.node.paths.state_dir.join("uploads");
    std::fs::create_dir_all(&dir)
        .map_err(|e| Problem(ApiError::new(ErrorCode::Internal, format!("create {}: {e}", dir.display()))))?;
    let tmp = dir.join(format!("upload-{}.tar", std::process::id()));
    std::fs::write(&tmp, &body).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        let full = if e.raw_os_error() == Some(28) { "target disk full: " } else { "" };
        Problem(ApiError::new(ErrorCode::Internal, format!("{full}write {}: {e}", tmp.display())))
    })?;
    let stored = agent.node.store.add(&tmp, None);
    let _ = std::fs::remove_file(&tmp);
    Ok(Json(serde_json::json!({"references": stored?})))
}

/// What a source sends to start a VM destination here.
#[derive(serde::Serialize, Deserialize)]
pub struct VmPrepare {
    pub spec: away_model::WorkloadSpec,
    pub image: String,
    pub multifd: Option<u32>,
    /// multifd's compression (older sources send none: uncompressed).
    #[serde(default)]
    pub multifd_compression: Option<away_migrate::transfer::Compression>,
    pub postcopy: bool,
}

fn vm_problem(e: away_migrate::vm::VmMigrateError) -> Problem {
    Problem(ApiError::new(ErrorCode::Internal, error_chain(&e)))
}

async fn vm_prepare(
    State(agent): State<Arc<Agent>>,
    Json(req): Json<VmPrepare>,
) -> Result<Json<serde_json::Value>, Problem> {
    // an agent without channels takes part in no migration (QEMU's own stream is not
    // on away's channels yet: docs/security.md)
    agent.channels().map_err(|why| Problem(ApiError::new(ErrorCode::Conflict, why)))?;
    let image = agent.node.store.resolve(&req.image)?;
    let port = std::net::TcpListener::bind((agent.config.listen.ip(), 0))
        .and_then(|l| l.local_addr())
        .map_err(|e| Problem(ApiError::new(ErrorCode::Internal, format!("no free port: {e}"))))?
        .port();
    let host = agent.config.listen.ip().to_string();
    let opts = away_migrate::vm::VmMigrationOptions {
        multifd: req.multifd,
        multifd_compression: req.multifd_compression,
        postcopy: req.postcopy,
        listen_host: host.clone(),
        ..Default::default()
    };
    let dest = away_migrate::vm::prepare_destination(agent.node.qemu(), &req.spec, &image, port, &opts)
        .await
        .map_err(vm_problem)?;
    // a prepared move: a confirm makes it committed, and a confirm asked again gets the
    // same answer; an agent that dies before the confirm removes the destination when it
    // starts again (the source resumes its own)
    let p = Provisional { workload: req.spec.name.clone(), runtime: away_model::RuntimeKind::Qemu };
    agent.journal(&vm_move_id(&req.spec.name), &p);
    agent.vm_destinations.lock().await.insert(req.spec.name.clone(), dest);
    Ok(Json(serde_json::json!({"uri": format!("tcp:{host}:{port}")})))
}

#[derive(Deserialize)]
struct ResumedQuery {
    limit_ms: u64,
}

async fn vm_resumed(
    State(agent): State<Arc<Agent>>,
    Path(name): Path<String>,
    Query(q): Query<ResumedQuery>,
) -> Result<Json<serde_json::Value>, Problem> {
    // out of the map while waiting (up to limit_ms): other VM moves must not wait on the lock
    let mut dest = agent
        .vm_destinations
        .lock()
        .await
        .remove(&name)
        .ok_or_else(|| Problem(ApiError::new(ErrorCode::NotFound, format!("no vm destination for {name:?}"))))?;
    let waited = dest.wait_resumed(std::time::Duration::from_millis(q.limit_ms)).await;
    // back in, resumed or not: confirm or abort comes next
    agent.vm_destinations.lock().await.insert(name, dest);
    let at = waited.map_err(vm_problem)?;
    let ms = at.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    Ok(Json(serde_json::json!({"resumed_at_ms": ms})))
}

/// The move id of VM `name`'s incoming migration in the agent's `moves` table.
fn vm_move_id(name: &str) -> String {
    format!("vm-{name}")
}

/// The destination stays: idempotent, a confirm asked again (its answer lost) gets the
/// same answer.
async fn vm_confirm(
    State(agent): State<Arc<Agent>>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, Problem> {
    let id = vm_move_id(&name);
    let mut destinations = agent.vm_destinations.lock().await;
    let Some(dest) = destinations.remove(&name) else {
        drop(destinations);
        return match agent.move_record(&id).map_err(state_problem)? {
            Some(r) if r.state == MoveState::Committed => {
                Ok(Json(serde_json::json!({"node": agent.config.name, "dir": "", "again": true})))
            }
            _ => Err(Problem(ApiError::new(ErrorCode::NotFound, format!("no vm destination for {name:?}")))),
        };
    };
    if let Err(e) = agent.end_move(&id, MoveState::Committed, "confirmed by its source") {
        destinations.insert(name, dest);
        return Err(state_problem(e));
    }
    drop(destinations);
    let files = dest.confirm();
    Ok(Json(serde_json::json!({"node": agent.config.name, "dir": files.dir})))
}

async fn vm_abort(State(agent): State<Arc<Agent>>, Path(name): Path<String>) -> Result<StatusCode, Problem> {
    if let Some(dest) = agent.vm_destinations.lock().await.remove(&name) {
        dest.abort().await.map_err(vm_problem)?;
        agent.end_move_logged(&vm_move_id(&name), MoveState::Aborted, "aborted by its source");
    }
    Ok(StatusCode::NO_CONTENT)
}
