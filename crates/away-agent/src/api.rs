//! The agent's HTTP JSON API (`/v1`) and its transfer receiver.
//!
//! | method | path | answer |
//! | --- | --- | --- |
//! | GET | /v1/node | `{node: NodeInfo, transfer_addr}` |
//! | GET | /v1/images?reference=R | `{reference, present}` |
//! | GET | /v1/workloads | `[WorkloadStatus]` |
//! | GET | /v1/workloads/{name} | `WorkloadStatus`, 404 |
//! | POST | /v1/workloads/{name}/plan | `{target_api, target_node?, mode?, optimize?}`: measure and predict a move of it there (`target_node` needed once this node has an identity: the target is called by name over mutual TLS); `MovePlan` |
//! | POST | /v1/probe | body: up to 16 MiB of filler; `{bytes, second_half_ms}` (the link probe of a plan) |
//! | POST | /v1/transfers | `{transfer_id, workload, source, prepare?: {reference, runtime}}`: announce an incoming move (with `prepare`, the agent imports that image of its store into that runtime in the background); `{secret}` (its one-time secret, for the transfer's hello); 403 when the caller's certificate does not name `source` (mutual TLS); 409 when announced by another source or when this agent takes no migrations |
//! | POST | /v1/transfers/{id}/commit | `MoveRecord` (committed); idempotent; 409 when the move was aborted (lease ran out); 404 when unknown |
//! | GET | /v1/transfers/{id} | `MoveRecord`: what became of the move (prepared, committed, aborted); 404 when unknown |
//! | DELETE | /v1/transfers/{id} | remove a provisional copy now (lazy move failed, answer lost), and the move's volume pre-copy if one waits here; 204 once the copy is gone and the move aborted; 404 when no copy is held; 500 when it would not go |
//! | POST | /v1/images | body: an image tar; `{references}` |
//! | GET, PUT | /v1/disks?base=D | a VM disk's base image in this node's disk store: present?, or take it (crate::disks) |
//! | POST | /v1/vm-migrations | `{spec, image, options}`: start a VM destination; `{uri, tls, disk?}` (`tls`: QEMU's port takes only the caller's node certificate, under mutual TLS; `disk: {host, port}`: for a VM with a disk, its empty overlay's NBD export, with the same TLS and peer check); 409 when this agent takes no migrations |
//! | POST | /v1/vm-migrations/{name}/resumed?limit_ms=N | wait until the VM is here (held paused for the commit, or running after post-copy); `{resumed_at_ms, held, lease_ms}` |
//! | POST | /v1/vm-migrations/{name}/confirm | commit: the held VM starts and stays; `MoveRecord` + `{node, dir, resumed_at_ms}`; idempotent; 409 when aborted (lease ran out) or not complete yet; 404 when unknown |
//! | DELETE | /v1/vm-migrations/{name} | 204: the destination is removed; 409 when its move is committed |
//!
//! Errors are `away_model::ApiError` bodies with the matching status code.

use std::sync::Arc;

use away_migrate::container::{restore_received, verdict_for, Manifest};
use away_migrate::estimate::ProbeAnswer;
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

impl Problem {
    fn from_runtime_code(e: &RuntimeError) -> ErrorCode {
        match e {
            RuntimeError::NotFound { .. } | RuntimeError::NoSuchWorkload { .. } => ErrorCode::NotFound,
            RuntimeError::AlreadyExists { .. } => ErrorCode::Conflict,
            RuntimeError::Invalid { .. } | RuntimeError::Image { .. } => ErrorCode::InvalidInput,
            RuntimeError::Unavailable { .. } => ErrorCode::Unavailable,
            RuntimeError::NoRuntime(_) | RuntimeError::Unsupported { .. } => ErrorCode::Incompatible,
            _ => ErrorCode::Internal,
        }
    }
}

impl From<RuntimeError> for Problem {
    fn from(e: RuntimeError) -> Self {
        Problem(ApiError::new(Problem::from_runtime_code(&e), error_chain(&e)))
    }
}

/// Who may call, failing closed:
/// * an agent with a node identity (it joined a broker with a CA) serves mutual TLS
///   only: the caller's certificate chains to the CA (the broker or another node of the
///   cluster), checked in the handshake; a plain connection is refused;
/// * otherwise every call needs the bearer token the agent has: the cluster token of a
///   broker without a CA (`--insecure-loopback`), or a standalone agent's `--token`;
/// * an agent with neither answers only `GET /v1/node` and refuses everything else.
async fn require_token(
    State(agent): State<Arc<Agent>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Result<Response, Problem> {
    let peer = req.extensions().get::<axum::extract::ConnectInfo<away_identity::serve::TlsPeer>>().map(|c| &c.0);
    if let Some(peer) = peer.filter(|p| p.tls) {
        // the handshake required a certificate of the CA; one revoked since is refused on
        // a connection opened before (keep-alive)
        let revoked = peer.serial.as_deref().is_some_and(|serial| {
            agent
                .identity
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .is_some_and(|i| i.revocations().is_revoked(serial))
        });
        if revoked {
            return Err(Problem(ApiError::new(ErrorCode::Unauthorized, "the client certificate is revoked")));
        }
        return match &peer.node {
            Some(_) => Ok(next.run(req).await),
            None => Err(Problem(ApiError::new(
                ErrorCode::Unauthorized,
                "the client certificate names no node of this cluster",
            ))),
        };
    }
    if agent.identity.read().unwrap_or_else(|e| e.into_inner()).is_some() {
        // before its identity came, a plain connection may have been opened
        return Err(Problem(ApiError::new(
            ErrorCode::Unauthorized,
            "this agent serves mutual TLS only: call it with a certificate of its cluster's CA",
        )));
    }
    // who the node is (its fingerprint) is no secret: asked before a move, and by
    // whoever checks the agent is up
    if req.method() == axum::http::Method::GET && req.uri().path() == "/v1/node" {
        return Ok(next.run(req).await);
    }
    let expected = agent.cluster_token.read().await.clone();
    let Some(expected) = expected else {
        return Err(Problem(ApiError::new(
            ErrorCode::Unauthorized,
            "this agent has no credential to check callers against (no identity from a broker, no --token): \
             it refuses every call but GET /v1/node; start it with --broker, or with AWAY_AGENT_TOKEN",
        )));
    };
    {
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
        .route(
            "/v1/disks",
            get(crate::disks::present).put(crate::disks::receive).layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .route("/v1/vm-migrations", post(vm_prepare))
        .route("/v1/vm-migrations/{name}/resumed", post(vm_resumed))
        .route("/v1/vm-migrations/{name}/confirm", post(vm_confirm))
        .route("/v1/vm-migrations/{name}", axum::routing::delete(vm_abort))
        .route("/v1/workloads/{name}/logs", get(logs))
        .route("/v1/workloads/{name}/plan", post(plan))
        .route("/v1/probe", post(probe).layer(axum::extract::DefaultBodyLimit::max(MAX_PROBE)))
        .route_layer(axum::middleware::from_fn_with_state(agent.clone(), require_token))
        .with_state(agent)
}

/// The largest link probe accepted.
const MAX_PROBE: usize = 16 << 20;

/// Read a probe's body and time its second half (the first runs in TCP's slow start).
async fn probe(headers: axum::http::HeaderMap, body: axum::body::Body) -> Result<Json<ProbeAnswer>, Problem> {
    use futures_util::StreamExt;
    let expected = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|n| *n >= 2 && *n <= MAX_PROBE as u64)
        .ok_or_else(|| {
            Problem(ApiError::new(
                ErrorCode::InvalidInput,
                format!("a probe needs a Content-Length of 2 to {MAX_PROBE} bytes"),
            ))
        })?;
    let mut stream = body.into_data_stream();
    let (mut got, mut half) = (0u64, None);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| Problem(ApiError::new(ErrorCode::InvalidInput, format!("probe body: {e}"))))?;
        got += chunk.len() as u64;
        if half.is_none() && got >= expected / 2 {
            half = Some(std::time::Instant::now());
        }
    }
    let second_half_ms = half.map_or(0.0, |h| h.elapsed().as_secs_f64() * 1e3);
    Ok(Json(ProbeAnswer { bytes: got, second_half_ms }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanRequest {
    /// The target agent's API address.
    target_api: String,
    /// The target's node name (needed when this node calls others over mutual TLS).
    #[serde(default)]
    target_node: Option<String>,
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    optimize: Option<away_model::Optimize>,
}

/// Measure a workload and the link to a target, and predict its move there.
async fn plan(
    State(agent): State<Arc<Agent>>,
    Path(name): Path<String>,
    Json(req): Json<PlanRequest>,
) -> Result<Json<away_model::MovePlan>, Problem> {
    let mode = match req.mode.as_deref() {
        Some(m) => m.parse().map_err(|e: String| Problem(ApiError::new(ErrorCode::InvalidInput, e)))?,
        None => Default::default(),
    };
    let target = crate::client::AgentClient::from_agent(&agent, req.target_node.as_deref(), &req.target_api)
        .await
        .map_err(|e| Problem(ApiError::new(ErrorCode::Unavailable, e)))?;
    let on_vm = matches!(agent.node.find(&name).await, Ok(Some((away_model::RuntimeKind::Qemu, _))));
    let planning = async {
        if on_vm {
            // the way a broker-ordered VM move takes: pre-copy with QEMU's defaults
            let opts = away_migrate::vm::VmMigrationOptions::default();
            away_migrate::estimate::plan_vm(&agent.node, &agent.config.name, &name, &target, &opts, None).await
        } else {
            away_migrate::estimate::plan_container(&agent.node, &agent.config.name, &name, &target, mode, req.optimize)
                .await
                .map(|(plan, _, _)| plan)
        }
    };
    let plan = tokio::time::timeout(away_migrate::estimate::PLAN_TIMEOUT, planning)
        .await
        .map_err(|_| {
            Problem(ApiError::new(
                ErrorCode::Unavailable,
                format!("measuring {name} took over {:?}", away_migrate::estimate::PLAN_TIMEOUT),
            ))
        })?
        .map_err(|e| {
            let code = match &e {
                away_migrate::MigrateError::Runtime(r) => Problem::from_runtime_code(r),
                away_migrate::MigrateError::Invalid(_) => ErrorCode::InvalidInput,
                _ => ErrorCode::Unavailable,
            };
            Problem(ApiError::new(code, error_chain(&e)))
        })?;
    Ok(Json(plan))
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
    let present = agent.node.store.resolve_stored(&q.reference).is_ok();
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
    /// The image the move restores from, for this agent to import into its runtime
    /// while the source checkpoints (absent from older sources: nothing is prepared).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prepare: Option<away_migrate::target::PrepareImage>,
}

async fn announce(
    State(agent): State<Arc<Agent>>,
    peer: Option<axum::Extension<axum::extract::ConnectInfo<away_identity::serve::TlsPeer>>>,
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
    // under mutual TLS a node announces moves from itself only: the one node whose
    // certificate the transfer will then be taken from is the caller's
    if let Some(peer) = peer.as_ref().map(|p| &p.0 .0).filter(|p| p.tls) {
        if peer.node.as_deref() != Some(req.source.as_str()) {
            return Err(Problem(ApiError::new(
                ErrorCode::Forbidden,
                format!(
                    "source {:?}: the caller's certificate names node {:?}; a node announces moves from itself only",
                    req.source,
                    peer.node.as_deref().unwrap_or("none")
                ),
            )));
        }
    }
    let a = agent
        .announce(&req.transfer_id, &req.workload, &req.source)
        .map_err(|why| Problem(ApiError::new(ErrorCode::Conflict, why)))?;
    tracing::info!(transfer = %req.transfer_id, workload = %req.workload, source = %req.source, "move announced");
    let mut page_link = false;
    if let Some(prepare) = req.prepare {
        if let Some(relay) = prepare.page_relay {
            page_link = agent.open_page_link(&req.transfer_id, relay, &req.source);
        }
        agent.prepare_image(prepare);
    }
    Ok(Json(serde_json::json!({"secret": a.secret.expose(), "page_link": page_link})))
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
    // mutual TLS once the node has its identity (it may come while this runs: each
    // connection takes what the node has when it is accepted); no channels at all:
    // every hello is refused by the check below, in plaintext
    let channels = agent.watch_channels();
    let checker = agent.clone();
    let authorize: transfer::Authorize = Arc::new(move |claim| checker.authorize(claim));
    let handler = move |payload: ReceivedPayload| {
        let agent = agent.clone();
        async move { handle_payload(agent, payload).await }
    };
    let receiver = transfer::Receiver::from_listener(listener, spool)
        .with_options(options)
        .with_channels_from(channels)
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
    if let Some(move_id) = away_migrate::container::precopy_of(&payload.meta) {
        return agent.keep_precopy(&payload, move_id).await;
    }
    // the move's volume pre-copy, if it sent one, serves this restore only: gone after it
    let staged = agent.precopy_dir(&payload.transfer_id);
    let verdict = restore_payload(&agent, payload, staged.as_deref()).await;
    if let Some(dir) = staged {
        agent.drop_precopy_dir(&dir);
    }
    verdict
}

async fn restore_payload(agent: &Arc<Agent>, payload: ReceivedPayload, volumes: Option<&std::path::Path>) -> Verdict {
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
        channels: agent.watch_channels().borrow().clone(),
        peer_node: agent.announced_source(id).unwrap_or_default(),
    };
    let early_pages = agent.take_page_link(id);
    let mut result = restore_received(&agent.node, &payload, settle, &pages, early_pages, volumes).await;
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
    peer: Option<axum::Extension<axum::extract::ConnectInfo<away_identity::serve::TlsPeer>>>,
    Json(req): Json<VmPrepare>,
) -> Result<Json<serde_json::Value>, Problem> {
    // an agent without channels takes part in no migration; with mutual TLS channels
    // QEMU's stream is TLS too, and the destination takes it only from the caller (the
    // node its certificate names: the source)
    let channels = agent.channels().map_err(|why| Problem(ApiError::new(ErrorCode::Conflict, why)))?;
    let tls = if channels.is_tls() {
        {
            let caller = peer.as_ref().map(|p| &p.0 .0).filter(|p| p.tls).and_then(|p| p.node.clone());
            let Some(caller) = caller else {
                return Err(Problem(ApiError::new(
                    ErrorCode::Unauthorized,
                    "a vm move to this node comes from a node: call with its certificate (mutual TLS)",
                )));
            };
            Some(away_migrate::vm::VmTls::from_channels(&channels, &caller).map_err(vm_problem)?.ok_or_else(|| {
                Problem(ApiError::new(ErrorCode::Internal, "mutual TLS channels without an identity"))
            })?)
        }
    } else {
        None
    };
    let image = agent.node.store.resolve(&req.image)?;
    // the stream's port, and a VM with a disk its export's: both bound at once, so the
    // kernel cannot name one port twice
    let free = |n: usize| -> std::io::Result<Vec<u16>> {
        let held: Vec<std::net::TcpListener> =
            (0..n).map(|_| std::net::TcpListener::bind((agent.config.listen.ip(), 0))).collect::<Result<_, _>>()?;
        held.iter().map(|l| l.local_addr().map(|a| a.port())).collect()
    };
    let ports = free(if req.spec.disk.is_some() { 2 } else { 1 })
        .map_err(|e| Problem(ApiError::new(ErrorCode::Internal, format!("no free port: {e}"))))?;
    let port = ports[0];
    let host = agent.config.listen.ip().to_string();
    let opts = away_migrate::vm::VmMigrationOptions {
        multifd: req.multifd,
        multifd_compression: req.multifd_compression,
        postcopy: req.postcopy,
        listen_host: host.clone(),
        disk_port: ports.get(1).copied().unwrap_or(0),
        ..Default::default()
    };
    let dest = away_migrate::vm::prepare_destination(agent.node.qemu(), &req.spec, &image, port, &opts, tls.as_ref())
        .await
        .map_err(vm_problem)?;
    // a prepared move: a confirm makes it committed, and a confirm asked again gets the
    // same answer; an agent that dies before the confirm removes the destination when it
    // starts again (the source resumes its own)
    let p = Provisional { workload: req.spec.name.clone(), runtime: away_model::RuntimeKind::Qemu };
    agent.journal(&vm_move_id(&req.spec.name), &p);
    let disk_port = dest.disk_port();
    agent.vm_destinations.lock().await.insert(req.spec.name.clone(), dest);
    agent.watch_vm_lease(req.spec.name.clone());
    let mut answer = serde_json::json!({"uri": format!("tcp:{host}:{port}"), "tls": tls.is_some()});
    if let Some(disk_port) = disk_port {
        answer["disk"] = serde_json::json!({"host": host, "port": disk_port});
    }
    Ok(Json(answer))
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
    let taken = agent.vm_destinations.lock().await.remove(&name);
    let Some(mut dest) = taken else {
        // a post-copy destination let go after its lease: committed, it runs here
        let lease_ms = agent.lease_promise().as_millis() as u64;
        return match agent.move_record(&vm_move_id(&name)).map_err(state_problem)? {
            Some(r) if r.state == MoveState::Committed => {
                let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
                Ok(Json(
                    serde_json::json!({"resumed_at_ms": now.as_millis() as u64, "held": false, "lease_ms": lease_ms}),
                ))
            }
            _ => Err(Problem(ApiError::new(ErrorCode::NotFound, format!("no vm destination for {name:?}")))),
        };
    };
    let waited = dest.wait_resumed(std::time::Duration::from_millis(q.limit_ms)).await;
    let held = dest.held();
    // back in, resumed or not: confirm or abort comes next
    agent.vm_destinations.lock().await.insert(name.clone(), dest);
    let at = waited.map_err(vm_problem)?;
    if !held {
        // post-copy: the guest runs here and the source no longer has all of it; final
        // before the source hears it (a restart must not remove it)
        agent.end_move_logged(
            &vm_move_id(&name),
            MoveState::Committed,
            "post-copy: the vm runs here since the switchover",
        );
    }
    let ms = at.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    // a held VM waits for the confirm under the lease (watch_vm_lease), counted from
    // before this answer leaves
    let lease_ms = agent.lease_promise().as_millis() as u64;
    Ok(Json(serde_json::json!({"resumed_at_ms": ms, "held": held, "lease_ms": lease_ms})))
}

/// The move id of VM `name`'s incoming migration in the agent's `moves` table.
pub(crate) fn vm_move_id(name: &str) -> String {
    format!("vm-{name}")
}

/// The commit of a VM move: the held VM starts (`cont`) and stays. Idempotent: a
/// confirm asked again (its answer lost) gets the same answer; an aborted move (lease ran
/// out, agent restarted) is a 409, like a container move's commit. The VM starts before
/// the commit is on disk: an agent killed in between leaves the move prepared and its
/// next start removes the VM, while the source, paused, still waits for an answer; so
/// the guest never runs on both nodes.
async fn vm_confirm(
    State(agent): State<Arc<Agent>>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, Problem> {
    #[cfg(feature = "fault-injection")]
    commit_fault("die-before");
    let id = vm_move_id(&name);
    let mut destinations = agent.vm_destinations.lock().await;
    let Some(mut dest) = destinations.remove(&name) else {
        drop(destinations);
        let record = agent.move_record(&id).map_err(state_problem)?.ok_or_else(|| unknown_move(&id))?;
        return match record.state {
            MoveState::Committed => {
                let mut v = serde_json::to_value(&record).unwrap_or_default();
                v["node"] = agent.config.name.clone().into();
                v["again"] = true.into();
                Ok(Json(v))
            }
            MoveState::Aborted => Err(Problem(ApiError::new(
                ErrorCode::Conflict,
                format!("move {id} of {name} was aborted: {}", record.reason),
            ))),
            MoveState::Prepared => Err(Problem(ApiError::new(
                ErrorCode::Conflict,
                format!("move {id} of {name} is not complete here yet (or being removed): nothing to commit"),
            ))),
        };
    };
    if dest.held() && dest.ready_at().is_none() {
        destinations.insert(name.clone(), dest);
        return Err(Problem(ApiError::new(
            ErrorCode::Conflict,
            format!("move {id} of {name}: the vm has not arrived whole yet: nothing to commit"),
        )));
    }
    let resumed_at = match dest.release().await {
        Ok(at) => at,
        Err(e) => {
            drop(destinations);
            let why = format!("the vm would not start: {}", error_chain(&e));
            if let Err(cleanup) = dest.abort().await {
                tracing::error!(workload = %name, "cannot remove a vm destination: {}", error_chain(&cleanup));
                return Err(vm_problem(e));
            }
            agent.end_move_logged(&id, MoveState::Aborted, &why);
            return Err(Problem(ApiError::new(ErrorCode::Conflict, format!("move {id} of {name} was aborted: {why}"))));
        }
    };
    if let Err(e) = agent.end_move(&id, MoveState::Committed, "confirmed by its source") {
        // runs but not committed: the lease removes it unless a confirm asked again commits
        destinations.insert(name, dest);
        return Err(state_problem(e));
    }
    drop(destinations);
    #[cfg(feature = "fault-injection")]
    commit_fault("die-after");
    tracing::info!(workload = %name, "vm migration committed by its source: the vm runs here");
    let files = dest.confirm();
    let record = agent.move_record(&id).map_err(state_problem)?.ok_or_else(|| unknown_move(&id))?;
    let mut v = serde_json::to_value(&record).unwrap_or_default();
    v["node"] = agent.config.name.clone().into();
    v["dir"] = files.dir.display().to_string().into();
    if let Some(at) = resumed_at.and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()) {
        v["resumed_at_ms"] = (at.as_millis() as u64).into();
    }
    Ok(Json(v))
}

async fn vm_abort(State(agent): State<Arc<Agent>>, Path(name): Path<String>) -> Result<StatusCode, Problem> {
    let id = vm_move_id(&name);
    if let Some(r) = agent.move_record(&id).map_err(state_problem)?.filter(|r| r.state == MoveState::Committed) {
        // post-copy commits at its switchover: the vm lives here now
        return Err(Problem(ApiError::new(
            ErrorCode::Conflict,
            format!("move {id} of {name} is committed ({}): the vm stays", r.reason),
        )));
    }
    if let Some(dest) = agent.vm_destinations.lock().await.remove(&name) {
        dest.abort().await.map_err(vm_problem)?;
        agent.end_move_logged(&vm_move_id(&name), MoveState::Aborted, "aborted by its source");
    }
    Ok(StatusCode::NO_CONTENT)
}
