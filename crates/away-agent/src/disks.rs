//! The node's disk store over the agent API: whether a VM disk's base image is here,
//! and taking one from a source node before a VM with a disk moves here (docs/vm.md).
//!
//! | method | path | answer |
//! | --- | --- | --- |
//! | GET | /v1/disks?base=sha256:HEX | `{base, present}` |
//! | PUT | /v1/disks?base=sha256:HEX | body: the base image (qcow2 without a backing file, or raw), at most [`MAX_BASE_BYTES`]; `{base, format, virtual_size}`; 400 when the bytes hash to another digest or are no base image (nothing is stored then) |
//!
//! The body is streamed into a temporary file in the store's directory (never held in
//! memory), then imported with its digest checked on the copy into the store. Whatever
//! fails, the temporary file goes; a full disk is reported as `target disk full`.

use std::sync::Arc;

use away_model::{error_chain, ApiError, ErrorCode};
use axum::extract::{Query, State};
use axum::Json;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;

use crate::api::Problem;
use crate::Agent;

/// The largest base image a peer may send (a bound before anything is written).
pub const MAX_BASE_BYTES: u64 = 64 << 30;

#[derive(Deserialize)]
pub(crate) struct BaseQuery {
    base: String,
}

fn invalid(why: String) -> Problem {
    Problem(ApiError::new(ErrorCode::InvalidInput, why))
}

/// `GET /v1/disks?base=D`: whether this node's disk store holds base `D`.
pub(crate) async fn present(State(agent): State<Arc<Agent>>, Query(q): Query<BaseQuery>) -> Json<serde_json::Value> {
    let present = agent.node.qemu().disk_store().contains(&q.base);
    Json(serde_json::json!({"base": q.base, "present": present}))
}

/// `PUT /v1/disks?base=D`: take base image `D` into this node's disk store.
pub(crate) async fn receive(
    State(agent): State<Arc<Agent>>,
    Query(q): Query<BaseQuery>,
    body: axum::body::Body,
) -> Result<Json<serde_json::Value>, Problem> {
    use futures_util::StreamExt;
    let probe = away_model::DiskSpec { base: q.base.clone(), size: away_model::ByteSize(0), mount: None };
    if probe.base_hex().is_none() {
        return Err(invalid(format!("base {:?} is not a digest (sha256:<64 hex>)", q.base)));
    }
    let store = agent.node.qemu().disk_store().clone();
    if store.contains(&q.base) {
        let found = store.find(&q.base)?;
        return Ok(Json(answer(&found)));
    }
    let io_err = |what: String, e: std::io::Error| {
        let full = if e.raw_os_error() == Some(28) { "target disk full: " } else { "" };
        Problem(ApiError::new(ErrorCode::Internal, format!("{full}{what}: {e}")))
    };
    std::fs::create_dir_all(&store.dir).map_err(|e| io_err(format!("create {}", store.dir.display()), e))?;
    // removed when dropped: on every early return below, and after the import copied it
    let tmp = tempfile::Builder::new()
        .prefix(".receive-")
        .tempfile_in(&store.dir)
        .map_err(|e| io_err(format!("create a temp file in {}", store.dir.display()), e))?;
    let mut file = tokio::fs::File::from_std(
        tmp.as_file().try_clone().map_err(|e| io_err(format!("open {}", tmp.path().display()), e))?,
    );
    let mut stream = body.into_data_stream();
    let mut got = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| invalid(format!("base {} broke off after {got} bytes: {e}", q.base)))?;
        got += chunk.len() as u64;
        if got > MAX_BASE_BYTES {
            return Err(invalid(format!("base {} is larger than {MAX_BASE_BYTES} bytes", q.base)));
        }
        file.write_all(&chunk).await.map_err(|e| io_err(format!("write {}", tmp.path().display()), e))?;
    }
    file.flush().await.map_err(|e| io_err(format!("write {}", tmp.path().display()), e))?;
    drop(file);
    let base = q.base.clone();
    let imported = tokio::task::spawn_blocking(move || {
        let r = store.import_expecting(tmp.path(), &base);
        drop(tmp);
        r
    })
    .await
    .map_err(|e| Problem(ApiError::new(ErrorCode::Internal, format!("import of base {}: {e}", q.base))))?;
    let found = imported.map_err(|e| {
        let chain = error_chain(&e);
        let code = if matches!(e, away_runtime::RuntimeError::Invalid { .. }) {
            ErrorCode::InvalidInput
        } else {
            ErrorCode::Internal
        };
        let full = if chain.contains("No space left") { "target disk full: " } else { "" };
        Problem(ApiError::new(code, format!("{full}base {} ({got} bytes) not stored: {chain}", q.base)))
    })?;
    tracing::info!(base = %found.digest, bytes = got, "disk base received from a peer");
    Ok(Json(answer(&found)))
}

fn answer(b: &away_runtime::qemu::BaseImage) -> serde_json::Value {
    serde_json::json!({"base": b.digest, "format": b.format, "virtual_size": b.virtual_size})
}
