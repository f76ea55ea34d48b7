//! An entity's mailbox: a bounded FIFO of envelopes with one receiver (the entity's task) and
//! any number of senders (the shard's handles).
//!
//! **Owns**: queueing, back-pressure (a full mailbox refuses at once, or `send` waits for
//! room), and closing. tokio's `mpsc` channel does the same, but its cache-padded state and
//! 32-slot blocks cost ~0.7 KiB per channel, which a million active entities pay a million
//! times; this one is a mutex around a `VecDeque` and the receiver's waker, with a `Notify`
//! for senders waiting for room allocated only once one waits (96 bytes in all, the Arc's
//! counts included), and its queue is freed whenever it is empty.
//!
//! Semantics (as tokio's): messages come out in the order they went in; `recv` answers `None`
//! once the mailbox is closed (or every sender is gone) and empty; after `close` or the
//! receiver's drop, sends fail with the message handed back; dropping the receiver drops what
//! is still queued (its callers then see their reply channels close).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use parking_lot::Mutex;
use tokio::sync::mpsc::error::{SendError, TryRecvError, TrySendError};

use super::lazy_notify::LazyNotify;

/// Creates a mailbox holding at most `capacity` (at least 1) messages.
pub fn mailbox<T>(capacity: usize) -> (MailboxSender<T>, MailboxReceiver<T>) {
    let shared = Arc::new(Shared {
        queue: Mutex::new(Queue {
            items: VecDeque::new(),
            closed: false,
            receiver: None,
        }),
        // Beyond any mailbox that fits in memory.
        capacity: u32::try_from(capacity.max(1)).unwrap_or(u32::MAX),
        senders: AtomicU32::new(1),
        room: LazyNotify::default(),
    });
    (
        MailboxSender {
            shared: shared.clone(),
        },
        MailboxReceiver { shared },
    )
}

struct Shared<T> {
    queue: Mutex<Queue<T>>,
    capacity: u32,
    senders: AtomicU32,
    /// Wakes senders waiting for room, or for the mailbox to close; created by the first
    /// sender that waits. A sender registers in it before it looks at the queue, and the
    /// receiver looks for it after it changed the queue, each under the queue's lock: the
    /// lock orders the two, so a waiting sender is always seen.
    room: LazyNotify,
}

struct Queue<T> {
    items: VecDeque<T>,
    closed: bool,
    /// The receiver's waker while it waits (a waker, not a `Notify`: the waiting future is a
    /// few bytes instead of ~0.1 KiB in every idle entity's task).
    receiver: Option<Waker>,
}

impl<T> Queue<T> {
    /// The waiting receiver's waker, to wake once the lock is released.
    fn take_receiver(&mut self) -> Option<Waker> {
        self.receiver.take()
    }
}

/// The sending side; clone it for more senders.
pub struct MailboxSender<T> {
    shared: Arc<Shared<T>>,
}

/// The receiving side, owned by the entity's task.
pub struct MailboxReceiver<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Clone for MailboxSender<T> {
    fn clone(&self) -> Self {
        self.shared.senders.fetch_add(1, Ordering::Relaxed);
        MailboxSender {
            shared: self.shared.clone(),
        }
    }
}

impl<T> Drop for MailboxSender<T> {
    fn drop(&mut self) {
        if self.shared.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            let receiver = self.shared.queue.lock().take_receiver();
            if let Some(waker) = receiver {
                waker.wake();
            }
        }
    }
}

impl<T> MailboxSender<T> {
    /// Queues `message` without waiting; a full or closed mailbox hands it back.
    pub fn try_send(&self, message: T) -> Result<(), TrySendError<T>> {
        let receiver = {
            let mut queue = self.shared.queue.lock();
            if queue.closed {
                return Err(TrySendError::Closed(message));
            }
            if queue.items.len() >= self.shared.capacity as usize {
                return Err(TrySendError::Full(message));
            }
            queue.items.push_back(message);
            queue.take_receiver()
        };
        if let Some(waker) = receiver {
            waker.wake();
        }
        Ok(())
    }

    /// Queues `message`, waiting for room; a closed mailbox hands it back.
    pub async fn send(&self, mut message: T) -> Result<(), SendError<T>> {
        let room = self.shared.room.get_or_init();
        loop {
            let room = room.notified();
            tokio::pin!(room);
            // Registered before trying, so room freed in between is not missed.
            room.as_mut().enable();
            match self.try_send(message) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Closed(returned)) => return Err(SendError(returned)),
                Err(TrySendError::Full(returned)) => message = returned,
            }
            room.await;
        }
    }

    /// Messages waiting.
    pub fn len(&self) -> usize {
        self.shared.queue.lock().items.len()
    }
}

impl<T> MailboxReceiver<T> {
    /// The next message; `None` once the mailbox is closed, or every sender is gone, and
    /// nothing is left.
    pub async fn recv(&mut self) -> Option<T> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// Polls for the next message, registering the task to be woken when one arrives.
    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        match self.take(Some(cx)) {
            Ok(message) => Poll::Ready(Some(message)),
            Err(TryRecvError::Disconnected) => Poll::Ready(None),
            Err(TryRecvError::Empty) => Poll::Pending,
        }
    }

    /// The next message if there is one.
    pub fn try_recv(&mut self) -> Result<T, TryRecvError> {
        self.take(None)
    }

    /// Takes the next message; when there is none and `cx` is given, registers its waker
    /// under the lock, so a later send or the last sender's drop finds it.
    fn take(&mut self, cx: Option<&mut Context<'_>>) -> Result<T, TryRecvError> {
        let message = {
            let mut queue = self.shared.queue.lock();
            match queue.items.pop_front() {
                Some(message) => {
                    if queue.items.is_empty() {
                        // An idle mailbox keeps no buffer.
                        queue.items = VecDeque::new();
                    }
                    message
                }
                None if queue.closed || self.shared.senders.load(Ordering::Acquire) == 0 => {
                    return Err(TryRecvError::Disconnected)
                }
                None => {
                    if let Some(cx) = cx {
                        match &queue.receiver {
                            Some(waker) if waker.will_wake(cx.waker()) => {}
                            _ => queue.receiver = Some(cx.waker().clone()),
                        }
                    }
                    return Err(TryRecvError::Empty);
                }
            }
        };
        self.shared.room.notify_one();
        Ok(message)
    }

    /// Leaves `waker` to be woken by the next message (or the mailbox closing, or the last
    /// sender going) instead of a receiving task, if nothing is waiting and the mailbox is
    /// open: true. False, registering nothing, if a message is waiting or the mailbox closed.
    pub fn park(&mut self, waker: Waker) -> bool {
        let mut queue = self.shared.queue.lock();
        if !queue.items.is_empty()
            || queue.closed
            || self.shared.senders.load(Ordering::Acquire) == 0
        {
            return false;
        }
        queue.receiver = Some(waker);
        true
    }

    /// Whether no message is waiting.
    pub fn is_empty(&self) -> bool {
        self.shared.queue.lock().items.is_empty()
    }

    /// Refuses every later send; what is queued can still be received.
    pub fn close(&mut self) {
        self.shared.queue.lock().closed = true;
        self.shared.room.notify_waiters();
    }
}

impl<T> Drop for MailboxReceiver<T> {
    fn drop(&mut self) {
        let dropped = {
            let mut queue = self.shared.queue.lock();
            queue.closed = true;
            // A parked receiver's waker goes too: nothing is left to wake.
            (std::mem::take(&mut queue.items), queue.receiver.take())
        };
        self.shared.room.notify_waiters();
        // Dropped outside the lock: a message's (or a waker's) drop may run arbitrary code.
        drop(dropped);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn messages_come_out_in_order_and_a_full_mailbox_refuses() {
        let (tx, mut rx) = mailbox(2);
        tx.try_send(1).unwrap();
        tx.try_send(2).unwrap();
        assert!(matches!(tx.try_send(3), Err(TrySendError::Full(3))));
        assert_eq!(tx.len(), 2);
        assert_eq!(rx.recv().await, Some(1));
        tx.try_send(3).unwrap();
        assert_eq!(rx.recv().await, Some(2));
        assert_eq!(rx.recv().await, Some(3));
        assert!(rx.is_empty());
        assert!(matches!(rx.try_recv(), Err(TryRecvError::Empty)));
    }

    #[tokio::test]
    async fn recv_waits_for_a_message_and_ends_when_every_sender_is_gone() {
        let (tx, mut rx) = mailbox(4);
        let second = tx.clone();
        let receiver = tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(n) = rx.recv().await {
                got.push(n);
            }
            got
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        tx.try_send(1).unwrap();
        second.try_send(2).unwrap();
        drop(tx);
        drop(second);
        assert_eq!(receiver.await.unwrap(), vec![1, 2]);
    }

    #[tokio::test]
    async fn send_waits_for_room() {
        let (tx, mut rx) = mailbox(1);
        tx.try_send(1).unwrap();
        let sender = tokio::spawn(async move { tx.send(2).await.map_err(|_| ()) });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(
            !sender.is_finished(),
            "send returned while the mailbox was full"
        );
        assert_eq!(rx.recv().await, Some(1));
        sender.await.unwrap().unwrap();
        assert_eq!(rx.recv().await, Some(2));
    }

    #[tokio::test]
    async fn close_refuses_sends_but_delivers_what_is_queued() {
        let (tx, mut rx) = mailbox(4);
        tx.try_send(1).unwrap();
        rx.close();
        assert!(matches!(tx.try_send(2), Err(TrySendError::Closed(2))));
        assert!(matches!(tx.send(3).await, Err(SendError(3))));
        assert_eq!(rx.try_recv().ok(), Some(1));
        assert!(matches!(rx.try_recv(), Err(TryRecvError::Disconnected)));
        assert_eq!(rx.recv().await, None);
    }

    #[tokio::test]
    async fn a_waiting_sender_is_released_when_the_receiver_goes() {
        let (tx, rx) = mailbox(1);
        tx.try_send(Arc::new(())).unwrap();
        let queued = Arc::new(());
        let watch = Arc::downgrade(&queued);
        let tx2 = tx.clone();
        let sender = tokio::spawn(async move { tx2.send(queued).await.is_err() });
        tokio::time::sleep(Duration::from_millis(10)).await;
        drop(rx);
        assert!(
            sender.await.unwrap(),
            "send must fail once the receiver is gone"
        );
        assert!(
            watch.upgrade().is_none(),
            "the refused message was handed back and dropped"
        );
        assert!(matches!(
            tx.try_send(Arc::new(())),
            Err(TrySendError::Closed(_))
        ));
    }

    #[tokio::test]
    async fn dropping_the_receiver_drops_what_is_queued() {
        let (tx, rx) = mailbox(4);
        let message = Arc::new(());
        let watch = Arc::downgrade(&message);
        tx.try_send(message).unwrap();
        drop(rx);
        assert!(watch.upgrade().is_none());
    }

    #[test]
    fn a_mailbox_is_one_small_allocation() {
        // With the Arc's two counts: 96 bytes, a jemalloc size class.
        let shared = std::mem::size_of::<Shared<Box<u64>>>();
        assert!(shared + 16 <= 96, "the mailbox is {shared} bytes");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_waiting_sender_is_never_missed() {
        // The room's wake-up list is created by the first sender that waits, racing with the
        // receiver that makes room.
        for round in 0..200 {
            let (tx, mut rx) = mailbox(1);
            tx.try_send(0).unwrap();
            let sender = tokio::spawn(async move { tx.send(1).await.is_ok() });
            tokio::task::yield_now().await;
            assert_eq!(rx.recv().await, Some(0));
            let sent = tokio::time::timeout(Duration::from_secs(10), sender)
                .await
                .unwrap_or_else(|_| panic!("round {round}: the sender was never woken"));
            assert!(sent.unwrap());
            assert_eq!(rx.recv().await, Some(1));
        }
    }
}
