//! A wake-up list that costs one word until somebody waits on it.
//!
//! **Owns**: [`LazyNotify`], a `tokio::sync::Notify` allocated by the first waiter. Every
//! active entity has two places where waiting is rare (`Get` waiting for durability, senders
//! waiting for mailbox room): inline, each `Notify` would cost 32 bytes a million times over.
//!
//! Ordering is the caller's: a waiter registers (`notified` + `enable`) before it checks its
//! condition, and a notifier changes the condition before it looks for the list. Either a
//! lock both take orders the two, or both sides put a `SeqCst` fence between their write and
//! their read.

use once_cell::race::OnceBox;
use tokio::sync::Notify;

#[derive(Default)]
pub(super) struct LazyNotify {
    list: OnceBox<Notify>,
}

impl LazyNotify {
    /// The list, created if nobody waited before: for waiters.
    pub fn get_or_init(&self) -> &Notify {
        self.list.get_or_init(|| Box::new(Notify::new()))
    }

    /// Wakes one waiter (or leaves a permit), if anybody ever waited.
    pub fn notify_one(&self) {
        if let Some(list) = self.list.get() {
            list.notify_one();
        }
    }

    /// Wakes every registered waiter, if anybody ever waited.
    pub fn notify_waiters(&self) {
        if let Some(list) = self.list.get() {
            list.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_is_one_word_until_used() {
        assert_eq!(std::mem::size_of::<LazyNotify>(), 8);
        let lazy = LazyNotify::default();
        // Nobody waited: nothing to wake, nothing allocated.
        lazy.notify_one();
        lazy.notify_waiters();
        assert!(lazy.list.get().is_none());
    }

    #[tokio::test]
    async fn a_registered_waiter_is_woken() {
        let lazy = LazyNotify::default();
        let notified = lazy.get_or_init().notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        lazy.notify_waiters();
        notified.await;
    }
}
