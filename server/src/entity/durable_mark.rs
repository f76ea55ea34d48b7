//! How far an activation's turns are durable, for readers that must not see state before it
//! is (`Get`).
//!
//! **Owns**: [`DurableMark`]: one word for the durable sequence number and the "activation
//! ended" flag, and a wake-up list allocated only once somebody waits. Every active entity
//! has one, so it is 16 bytes: a watch channel would cost ~0.4 KiB per entity, and an inline
//! `Notify` 32 bytes that hardly any entity ever uses.

use std::sync::atomic::{fence, AtomicU64, Ordering};

use super::lazy_notify::LazyNotify;

/// The top bit of the word: the activation ended. Sequence numbers stay below it.
const CLOSED: u64 = 1 << 63;

pub(super) struct DurableMark {
    /// The durable sequence number, with [`CLOSED`] set once the activation ended.
    word: AtomicU64,
    /// Waiters, created by the first one.
    changed: LazyNotify,
}

impl DurableMark {
    pub fn new() -> Self {
        DurableMark {
            word: AtomicU64::new(0),
            changed: LazyNotify::default(),
        }
    }

    /// Waits until `seq` is durable; false if the activation ended first.
    pub async fn wait_for(&self, seq: u64) -> bool {
        let changed = self.changed.get_or_init();
        loop {
            let notified = changed.notified();
            tokio::pin!(notified);
            // Registered before the checks, so a change between them is not missed.
            notified.as_mut().enable();
            // Pairs with the fence in `changed`: either this load sees the change, or the
            // changer sees the list this waiter registered in.
            fence(Ordering::SeqCst);
            let word = self.word.load(Ordering::Relaxed);
            if word & !CLOSED >= seq {
                return true;
            }
            if word & CLOSED != 0 {
                return false;
            }
            notified.await;
        }
    }

    /// The activation made everything up to `seq` durable.
    pub fn advance(&self, seq: u64) {
        debug_assert!(seq < CLOSED, "sequence number {seq} out of range");
        let before = self.word.fetch_max(seq, Ordering::Relaxed);
        // Once closed, the word exceeds every sequence number and nothing changes.
        if before < seq {
            self.changed();
        }
    }

    /// The activation ended.
    pub fn close(&self) {
        self.word.fetch_or(CLOSED, Ordering::Relaxed);
        self.changed();
    }

    /// Wakes the waiters, if anybody ever waited.
    fn changed(&self) {
        fence(Ordering::SeqCst);
        self.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    #[test]
    fn it_is_two_words() {
        assert_eq!(std::mem::size_of::<DurableMark>(), 16);
    }

    #[tokio::test]
    async fn a_reached_mark_answers_at_once_and_a_closed_one_refuses() {
        let mark = DurableMark::new();
        assert!(mark.wait_for(0).await);
        mark.advance(5);
        assert!(mark.wait_for(5).await);
        assert!(mark.wait_for(3).await);
        mark.advance(2); // never moves back
        assert!(mark.wait_for(5).await);
        mark.close();
        assert!(mark.wait_for(5).await, "reached before it closed");
        assert!(!mark.wait_for(6).await);
        mark.advance(9); // after the end, nothing becomes durable
        assert!(!mark.wait_for(6).await);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waiters_wake_when_their_seq_is_reached_or_the_mark_closes() {
        for round in 0..200 {
            let mark = Arc::new(DurableMark::new());
            let waiters: Vec<_> = (1..=4u64)
                .map(|seq| {
                    let mark = Arc::clone(&mark);
                    tokio::spawn(async move { (seq, mark.wait_for(seq).await) })
                })
                .collect();
            // Concurrently with the waiters registering: the race the fences are for.
            for seq in 1..=2 {
                mark.advance(seq);
                tokio::task::yield_now().await;
            }
            mark.close();
            for waiter in waiters {
                let (seq, reached) = tokio::time::timeout(Duration::from_secs(10), waiter)
                    .await
                    .unwrap_or_else(|_| panic!("round {round}: a waiter was never woken"))
                    .unwrap();
                assert_eq!(reached, seq <= 2, "round {round}: seq {seq}");
            }
        }
    }
}
