//! Group commit: requests that arrive while one SQLite transaction is being made
//! durable wait and go together in the next one, so that a burst of N submissions
//! costs one fsync instead of N (the broker's store runs `synchronous=FULL`, where the
//! fsync, not placement, bounds how many submissions a second one transaction each
//! allows).
//!
//! When no batch is running, a caller takes the lead: it takes every queued request,
//! runs the batch outside the lock and posts each answer; the others wait on a condition
//! variable for theirs (or for the lead to be free again). Nothing here knows what a
//! request is; the broker passes the batch. (Written by hand: the pattern is a few lines
//! over std's Mutex and Condvar, and the crates that offer it are async or tied to one
//! database.)

use std::collections::HashMap;
use std::sync::{Condvar, Mutex, MutexGuard};

pub struct GroupCommit<Q, A> {
    state: Mutex<State<Q, A>>,
    /// Signalled when a batch's answers are in (or its leader gave up the lead).
    answered: Condvar,
}

struct State<Q, A> {
    /// Requests not yet taken by a batch, with their tickets.
    queue: Vec<(u64, Q)>,
    /// Answers not yet picked up, by ticket.
    answers: HashMap<u64, A>,
    next_ticket: u64,
    /// A caller is running a batch (outside the lock).
    leading: bool,
    /// Tickets of a batch that panicked: they will never be answered.
    lost: Vec<u64>,
}

impl<Q, A> Default for GroupCommit<Q, A> {
    fn default() -> Self {
        let state =
            State { queue: Vec::new(), answers: HashMap::new(), next_ticket: 0, leading: false, lost: Vec::new() };
        GroupCommit { state: Mutex::new(state), answered: Condvar::new() }
    }
}

/// The lead, given up even when the batch panics (its tickets, still held then, are
/// marked lost so that their callers fail instead of waiting forever).
struct Lead<'a, Q, A> {
    of: &'a GroupCommit<Q, A>,
    tickets: Vec<u64>,
}

impl<Q, A> Drop for Lead<'_, Q, A> {
    fn drop(&mut self) {
        let mut state = self.of.lock();
        state.leading = false;
        state.lost.append(&mut self.tickets);
        drop(state);
        self.of.answered.notify_all();
    }
}

impl<Q, A> GroupCommit<Q, A> {
    /// A poisoned lock only means a batch panicked while answering: the state is still
    /// a well-formed queue and map.
    fn lock(&self) -> MutexGuard<'_, State<Q, A>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queue `request` and return its answer. `batch` gets every request queued when
    /// this caller leads (its own among them, in arrival order) and must answer each,
    /// in the same order.
    ///
    /// # Panics
    /// If `batch` answers fewer requests than it was given, or if it panics: in the
    /// caller that led it and in every caller whose request was in that batch.
    pub fn submit(&self, request: Q, batch: impl FnOnce(Vec<Q>) -> Vec<A>) -> A {
        // a caller leads at most once: its own request is in the batch it runs
        let mut batch = Some(batch);
        let mut state = self.lock();
        let ticket = state.next_ticket;
        state.next_ticket += 1;
        state.queue.push((ticket, request));
        loop {
            if let Some(answer) = state.answers.remove(&ticket) {
                return answer;
            }
            if let Some(i) = state.lost.iter().position(|t| *t == ticket) {
                state.lost.swap_remove(i);
                drop(state);
                panic!("the batch that took this request panicked before answering it");
            }
            if state.leading {
                state = self.answered.wait(state).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            // lead: take everything queued, run it outside the lock
            state.leading = true;
            let (tickets, requests): (Vec<u64>, Vec<Q>) = std::mem::take(&mut state.queue).into_iter().unzip();
            drop(state);
            let mut lead = Lead { of: self, tickets };
            let run = batch.take().expect("a caller leads once: its own request is in the batch it runs");
            let answers = run(requests);
            assert_eq!(answers.len(), lead.tickets.len(), "a batch answers every request it was given");
            let tickets = std::mem::take(&mut lead.tickets);
            self.lock().answers.extend(tickets.into_iter().zip(answers));
            drop(lead);
            state = self.lock();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

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
    fn a_batch_that_panics_fails_its_callers_and_the_next_batch_runs() {
        let gc: Arc<GroupCommit<u32, u32>> = Arc::default();
        let gate = Arc::new(std::sync::Barrier::new(2));
        let (g, b) = (gc.clone(), gate.clone());
        // the leader waits until a second request is queued, then panics
        let leader = std::thread::spawn(move || {
            g.submit(1, |_| {
                b.wait();
                std::thread::sleep(std::time::Duration::from_millis(50));
                panic!("batch bug")
            })
        });
        gate.wait();
        // queued while the panicking batch runs: it goes in the next batch
        assert_eq!(gc.submit(2, |qs| qs), 2);
        assert!(leader.join().is_err());
        assert_eq!(gc.submit(3, |qs| qs), 3);
    }

    #[test]
    fn a_lone_request_is_its_own_batch() {
        let gc: GroupCommit<&str, String> = GroupCommit::default();
        assert_eq!(gc.submit("a", |qs| qs.iter().map(|q| q.to_uppercase()).collect()), "A");
        assert_eq!(gc.submit("b", |qs| qs.iter().map(|q| q.to_uppercase()).collect()), "B");
    }
}
