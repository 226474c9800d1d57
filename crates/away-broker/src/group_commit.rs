//! Group commit: requests that arrive while one SQLite transaction is being made
//! durable wait and go together in the next one, so that a burst of N submissions
//! costs one fsync instead of N (the broker's store runs `synchronous=FULL`, where the
//! fsync, not placement, bounds how many submissions a second one transaction each
//! allows).
//!
//! The first waiter to get the leader's lock takes every queued request, runs the batch
//! and hands each request its answer; the others find theirs already there when they
//! get the lock. Nothing here knows what a request is; the broker passes the batch.
//! (Written by hand: the pattern is twenty lines over std's Mutex, and the crates that
//! offer it are async or tied to one database.)

use std::sync::{Arc, Mutex, MutexGuard};

/// A request's answer, filled in by whichever caller led its batch.
type Slot<A> = Arc<Mutex<Option<A>>>;

pub struct GroupCommit<Q, A> {
    queue: Mutex<Vec<(Q, Slot<A>)>>,
    leader: Mutex<()>,
}

/// A poisoned lock here only means a batch panicked: the queue and the slots are still
/// well-formed vectors and options.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<Q, A> Default for GroupCommit<Q, A> {
    fn default() -> Self {
        GroupCommit { queue: Mutex::new(Vec::new()), leader: Mutex::new(()) }
    }
}

impl<Q, A> GroupCommit<Q, A> {
    /// Queue `request` and return its answer. `batch` gets every request queued when
    /// this caller leads (its own among them, in arrival order) and must answer each,
    /// in the same order.
    ///
    /// # Panics
    /// If `batch` answers fewer requests than it was given, or a batch that took this
    /// request panicked.
    pub fn submit(&self, request: Q, batch: impl FnOnce(Vec<Q>) -> Vec<A>) -> A {
        let slot: Slot<A> = Arc::default();
        lock(&self.queue).push((request, slot.clone()));
        let _leading = lock(&self.leader);
        // a leader before us may have taken our request with its batch
        if let Some(answer) = lock(&slot).take() {
            return answer;
        }
        let (requests, slots): (Vec<Q>, Vec<Slot<A>>) = std::mem::take(&mut *lock(&self.queue)).into_iter().unzip();
        let answers = batch(requests);
        assert_eq!(answers.len(), slots.len(), "a batch answers every request it was given");
        for (s, a) in slots.iter().zip(answers) {
            *lock(s) = Some(a);
        }
        let answer = lock(&slot).take();
        answer.expect("our request was queued before we led, so our batch answered it")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn every_request_gets_its_own_answer_and_bursts_share_batches() {
        let gc: Arc<GroupCommit<usize, usize>> = Arc::default();
        let batches = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..64)
            .map(|i| {
                let (gc, batches) = (gc.clone(), batches.clone());
                std::thread::spawn(move || {
                    gc.submit(i, |qs| {
                        batches.fetch_add(1, Ordering::Relaxed);
                        // the slow part a batch shares (an fsync)
                        std::thread::sleep(std::time::Duration::from_millis(20));
                        qs.into_iter().map(|q| q * 10).collect()
                    })
                })
            })
            .collect();
        for (i, t) in threads.into_iter().enumerate() {
            assert_eq!(t.join().unwrap(), i * 10);
        }
        let n = batches.load(Ordering::Relaxed);
        assert!((1..64).contains(&n), "64 concurrent requests went in {n} batches");
    }

    #[test]
    fn a_lone_request_is_its_own_batch() {
        let gc: GroupCommit<&str, String> = GroupCommit::default();
        assert_eq!(gc.submit("a", |qs| qs.iter().map(|q| q.to_uppercase()).collect()), "A");
        assert_eq!(gc.submit("b", |qs| qs.iter().map(|q| q.to_uppercase()).collect()), "B");
    }
}
