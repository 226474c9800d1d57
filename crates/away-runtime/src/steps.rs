//! The steps inside one runtime call, timed for the migration report: a migration
//! runs a checkpoint or restore inside [`collect`], and the backend marks each step it
//! takes with [`record`] (Docker: the engine's checkpoint, the rootfs diff, the
//! container's creation, its start from the checkpoint, …). Outside a `collect` scope
//! a step is only logged. A task-local keeps the [`crate::Runtime`] trait as it is.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use away_model::MigrationPhase;

tokio::task_local! {
    static STEPS: Arc<Mutex<Vec<MigrationPhase>>>;
}

/// Run `f`, returning what it returned and the steps it recorded, in order.
pub async fn collect<F: Future>(f: F) -> (F::Output, Vec<MigrationPhase>) {
    let steps = Arc::new(Mutex::new(Vec::new()));
    let out = STEPS.scope(steps.clone(), f).await;
    let steps = std::mem::take(&mut *steps.lock().unwrap_or_else(|p| p.into_inner()));
    (out, steps)
}

/// Record step `name`, which took `took`.
pub fn record(name: &str, took: Duration) {
    let millis = took.as_millis() as u64;
    tracing::debug!(step = name, millis, "runtime step");
    let _ = STEPS.try_with(|s| s.lock().unwrap_or_else(|p| p.into_inner()).push(MigrationPhase::new(name, millis)));
}

/// Record step `name`, begun at `since`, and return now (the start of the next one).
pub fn lap(name: &str, since: Instant) -> Instant {
    record(name, since.elapsed());
    Instant::now()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn steps_are_collected_in_order_inside_a_scope_only() {
        record("outside", Duration::from_millis(1));
        let (out, steps) = collect(async {
            record("a", Duration::from_millis(5));
            tokio::task::yield_now().await;
            record("b", Duration::from_millis(7));
            42
        })
        .await;
        assert_eq!(out, 42);
        assert_eq!(steps, vec![MigrationPhase::new("a", 5), MigrationPhase::new("b", 7)]);
    }
}
