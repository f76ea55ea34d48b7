//! Waiting for a submitted batch to become durable: the future inside a [`super::Durable`]
//! that `SledStore::submit` returns.
//!
//! **Owns**: the committing side of "spin, then sleep". Under light load (the writer's recent
//! rounds carried about one commit each: about one request in flight, where latency is all
//! that counts), while a batch is the only commit in flight, its waiter busy-polls for up to
//! `spin` instead of letting its runtime thread park. The
//! journal writer's answer then finds a thread awake, instead of costing a wake-up of a
//! parked one (tens of microseconds on a VM, a large share of a ~150 µs commit). With other
//! commits in flight the waiter never spins: their own answers keep the runtime busy, and
//! spinning would take CPU from them. The journal writer spins on its side after a light
//! round (`writer`); together the two remove both thread wake-ups from a lone commit.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, Semaphore};

use super::StoreError;

/// Resolves with the journal writer's answer to one submission.
pub(crate) struct CommitWait {
    answer: oneshot::Receiver<Result<(), StoreError>>,
    /// Whether the load is light (`Shared::light_load`).
    light_load: Arc<AtomicBool>,
    /// The store's commit permits: how many commits are in flight.
    permits: Arc<Semaphore>,
    /// All permits, so `pending_max - available` is the number in flight.
    pending_max: usize,
    /// Busy-poll until then while alone; `None` once the spin is over (for good).
    spin_until: Option<Instant>,
}

impl CommitWait {
    /// Waits for `answer`, busy-polling for up to `spin` while the load is light and the
    /// batch (which holds one of `permits`) is the only commit in flight. Under load (the
    /// usual case on the hot path) it decides at once and never reads the clock.
    pub(crate) fn new(
        answer: oneshot::Receiver<Result<(), StoreError>>,
        light_load: Arc<AtomicBool>,
        permits: Arc<Semaphore>,
        pending_max: usize,
        spin: Duration,
    ) -> CommitWait {
        let spin_until =
            (!spin.is_zero() && light_load.load(Ordering::Relaxed)).then(|| Instant::now() + spin);
        CommitWait {
            answer,
            light_load,
            permits,
            pending_max,
            spin_until,
        }
    }

    /// Whether the load is light and this batch is the only commit in flight.
    fn alone(&self) -> bool {
        self.light_load.load(Ordering::Relaxed)
            && self
                .pending_max
                .saturating_sub(self.permits.available_permits())
                <= 1
    }
}

impl Future for CommitWait {
    type Output = Result<(), StoreError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match Pin::new(&mut self.answer).poll(cx) {
            Poll::Ready(Ok(outcome)) => Poll::Ready(outcome),
            Poll::Ready(Err(_)) => Poll::Ready(Err(StoreError::JournalFailed(
                "the journal writer thread stopped before answering".into(),
            ))),
            Poll::Pending => {
                if let Some(until) = self.spin_until {
                    if self.alone() && Instant::now() < until {
                        // Polled again as soon as the runtime has run what else is ready:
                        // the thread stays awake for the answer.
                        cx.waker().wake_by_ref();
                    } else {
                        self.spin_until = None;
                    }
                }
                Poll::Pending
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts the polls of the future inside.
    struct Polls<F> {
        inner: F,
        count: usize,
    }

    impl<F: Future + Unpin> Future for Polls<F> {
        type Output = (F::Output, usize);

        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
            self.count += 1;
            let count = self.count;
            Pin::new(&mut self.inner).poll(cx).map(|out| (out, count))
        }
    }

    async fn answered_after(
        delay: Duration,
        light: bool,
        in_flight: usize,
        spin: Duration,
    ) -> (Result<(), StoreError>, usize) {
        let permits = Arc::new(Semaphore::new(8));
        let held = permits.clone().acquire_many_owned(in_flight as u32).await;
        let (done, answer) = oneshot::channel();
        let light_load = Arc::new(AtomicBool::new(light));
        let wait = CommitWait::new(answer, light_load, permits, 8, spin);
        std::thread::spawn(move || {
            std::thread::sleep(delay);
            let _ = done.send(Ok(()));
        });
        let outcome = Polls {
            inner: wait,
            count: 0,
        }
        .await;
        drop(held);
        outcome
    }

    #[tokio::test]
    async fn alone_under_light_load_it_spins_and_else_it_sleeps() {
        let delay = Duration::from_millis(20);
        let spin = Duration::from_secs(5);
        let (outcome, spinning_polls) = answered_after(delay, true, 1, spin).await;
        assert!(outcome.is_ok());
        // Spinning through 20 ms is thousands of polls; sleeping is one, plus the odd spurious
        // wake-up a future must tolerate.
        assert!(spinning_polls > 100, "{spinning_polls} polls while alone");

        let (outcome, polls) = answered_after(delay, true, 2, spin).await;
        assert!(outcome.is_ok());
        assert!(polls < 10, "{polls} polls with another commit in flight");

        let (outcome, polls) = answered_after(delay, false, 1, spin).await;
        assert!(outcome.is_ok());
        assert!(polls < 10, "{polls} polls when the load is not light");

        let (outcome, polls) = answered_after(delay, true, 1, Duration::ZERO).await;
        assert!(outcome.is_ok());
        assert!(polls < 10, "{polls} polls without a spin");
    }

    #[tokio::test]
    async fn the_spin_ends_and_the_waiter_sleeps_until_the_answer() {
        let (outcome, polls) = answered_after(
            Duration::from_millis(300),
            true,
            1,
            Duration::from_millis(5),
        )
        .await;
        assert!(outcome.is_ok());
        // Spinning for all of 300 ms would be hundreds of thousands of polls.
        assert!(polls < 100_000, "{polls} polls");
    }

    #[tokio::test]
    async fn a_writer_gone_without_answering_is_a_journal_failure() {
        let permits = Arc::new(Semaphore::new(8));
        let (done, answer) = oneshot::channel::<Result<(), StoreError>>();
        drop(done);
        let light_load = Arc::new(AtomicBool::new(true));
        let outcome =
            CommitWait::new(answer, light_load, permits, 8, Duration::from_millis(1)).await;
        assert!(
            matches!(outcome, Err(StoreError::JournalFailed(_))),
            "{outcome:?}"
        );
    }
}
