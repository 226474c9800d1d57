//! Predicted moves: the broker asks the workload's source agent to measure the
//! workload and the link to the target and to predict the move
//! (`POST /v1/workloads/{name}/plan` on the agent, with the cluster token, as for logs),
//! then decides with `away_predict`: the mode a request's `optimize` asks for, and a
//! refusal when the prediction cannot meet the request's `deadline_s` or
//! `max_downtime_ms`.

use std::time::Duration;

use std::sync::Arc;

use away_model::{ApiError, MigrationRequest, MovePlan, Optimize};
use serde_json::json;

use crate::broker::{Broker, MoveChoice};

/// How long the source agent may take to measure and answer (it bounds its own work
/// at 30 s).
const PLAN_ANSWER_TIMEOUT: Duration = Duration::from_secs(40);

/// Does `req` want a prediction (a dry run always does)?
pub fn wanted(req: &MigrationRequest) -> bool {
    req.deadline_s.is_some() || req.max_downtime_ms.is_some() || req.optimize.is_some()
}

/// Ask `choice.source`'s agent for the plan of the move; the error says why there is none.
pub async fn ask_source(broker: &Broker, choice: &MoveChoice, req: &MigrationRequest) -> Result<MovePlan, String> {
    if !choice.source_online {
        return Err(format!("its source {} is offline: nothing to measure", choice.source));
    }
    let (base, http) = broker
        .node_http(&choice.source, &choice.source_api, Duration::from_secs(3))
        .await
        .map_err(|e| format!("reaching {}: {e}", choice.source))?;
    let url = format!("{base}/v1/workloads/{}/plan", req.workload);
    // a mode the user named is kept; otherwise the prediction chooses for `optimize`
    let optimize = if req.mode.is_none() { req.optimize } else { None };
    // the source dials the target by name over mutual TLS when it has an identity
    let body =
        json!({"target_api": choice.target_api, "target_node": choice.target, "mode": req.mode, "optimize": optimize});
    let resp = http
        .post(&url)
        .bearer_auth(broker.cluster_token())
        .json(&body)
        .timeout(PLAN_ANSWER_TIMEOUT)
        .send()
        .await
        .map_err(|e| format!("asking {} to measure the move: {}", choice.source, away_model::error_chain(&e)))?;
    if !resp.status().is_success() {
        let status = resp.status();
        let why = resp.json::<ApiError>().await.map(|e| e.message).unwrap_or_else(|_| status.to_string());
        return Err(format!("{} could not measure the move: {why}", choice.source));
    }
    resp.json::<MovePlan>().await.map_err(|e| format!("{}'s plan is not readable: {e}", choice.source))
}

/// Predict the move to `choice.target` and, when the broker chose it and the request
/// optimizes, to each of `choice.others` too, and keep the target whose chosen way is
/// predicted best (its `why` says so, with the others' figures).
pub async fn best_target(
    broker: &Arc<Broker>,
    choice: MoveChoice,
    req: &MigrationRequest,
) -> (MoveChoice, Result<MovePlan, String>) {
    let first = ask_source(broker, &choice, req).await;
    let Some(optimize) = req.optimize.filter(|_| req.to.is_none() && !choice.others.is_empty()) else {
        return (choice, first);
    };
    let measure = |p: &MovePlan| {
        p.chosen_prediction().filter(|x| x.converges).map(|x| {
            if optimize == Optimize::Total {
                x.total_ms
            } else {
                x.downtime_ms
            }
        })
    };
    let mut seen = Vec::new();
    let mut best: (MoveChoice, Result<MovePlan, String>) = (choice.clone(), first);
    if let Ok(p) = &best.1 {
        seen.push(format!("{} {}", choice.target, figure(measure(p))));
    }
    for other in &choice.others {
        let alt = MigrationRequest { to: Some(other.clone()), ..req.clone() };
        let Ok(mut c) = ({
            let b = broker.clone();
            tokio::task::spawn_blocking(move || b.choose_move(&alt))
                .await
                .unwrap_or_else(|e| Err(crate::Problem::internal(e.to_string())))
        }) else {
            continue;
        };
        let plan = ask_source(broker, &c, req).await;
        let Ok(p) = plan else { continue };
        let m = measure(&p);
        seen.push(format!("{other} {}", figure(m)));
        let better = match (&best.1, m) {
            (Ok(bp), Some(m)) => measure(bp).is_none_or(|b| m < b),
            (Err(_), Some(_)) => true,
            _ => false,
        };
        if better {
            c.chosen_by = "broker".into();
            best = (c, Ok(p));
        }
    }
    let what = if optimize == Optimize::Total { "total time" } else { "downtime" };
    best.0.why = format!(
        "{}: the least predicted {what} of {} compatible node(s) ({})",
        best.0.target,
        seen.len(),
        seen.join(", ")
    );
    best
}

fn figure(ms: Option<u64>) -> String {
    ms.map(|m| format!("{:.2} s", m as f64 / 1e3)).unwrap_or_else(|| "does not finish".into())
}

/// Why the plan's chosen way cannot meet what `req` asked for (None: it can, or there
/// is nothing to check).
pub fn refusal(plan: &MovePlan, req: &MigrationRequest) -> Option<String> {
    if req.deadline_s.is_none() && req.max_downtime_ms.is_none() {
        return None;
    }
    let p = plan.chosen_prediction()?;
    away_predict::refusal(p, req.deadline_s, req.max_downtime_ms)
}
