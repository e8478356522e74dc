//! Cross-thread message passing between the router and the shards.
//!
//! A mailbox is a bounded crossbeam channel plus a waker slot. The sender
//! pushes a message and wakes whichever task last waited on the receiver;
//! glommio turns that foreign wake into an eventfd write when the receiving
//! executor sleeps, or hands it over at the receiver's next look at its rings
//! when it is busy (at most the shard's preempt timer, 1 ms, later); a busy
//! shard's other tasks can take waiting messages sooner through a
//! [`MailboxPeek`]. The channel and the waker slot are the only things
//! shared; the messages themselves move.
//!
//! glommio 0.9 can lose a foreign wake-up in rare races (seen here about once
//! in several thousand idle hand-offs, as a request answered only at the next
//! unrelated timer, or never). [`MailboxReceiver::recv_rechecking`] therefore
//! also looks at the channel on a slow timer, so a lost wake-up costs at most
//! that interval instead of a stuck client.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use atomic_waker::AtomicWaker;
use crossbeam_channel::{Receiver, Sender, TryRecvError, TrySendError};

/// Creates a mailbox holding at most `capacity` messages.
pub fn mailbox<T>(capacity: usize) -> (MailboxSender<T>, MailboxReceiver<T>) {
    let (tx, rx) = crossbeam_channel::bounded(capacity);
    let waker = Arc::new(AtomicWaker::new());
    (
        MailboxSender {
            tx,
            waker: waker.clone(),
        },
        MailboxReceiver { rx, waker },
    )
}

/// The sending half; cheap to clone, usable from any thread.
pub struct MailboxSender<T> {
    tx: Sender<T>,
    waker: Arc<AtomicWaker>,
}

impl<T> Clone for MailboxSender<T> {
    fn clone(&self) -> Self {
        MailboxSender {
            tx: self.tx.clone(),
            waker: self.waker.clone(),
        }
    }
}

impl<T> MailboxSender<T> {
    /// Queues `message` without blocking; a full or closed mailbox gives it
    /// back.
    pub fn try_send(&self, message: T) -> Result<(), TrySendError<T>> {
        self.tx.try_send(message)?;
        self.waker.wake();
        Ok(())
    }
}

/// The receiving half, owned by exactly one task.
pub struct MailboxReceiver<T> {
    rx: Receiver<T>,
    waker: Arc<AtomicWaker>,
}

/// Takes messages that are already waiting in a mailbox, from another task
/// on the receiver's thread; it never waits and never registers a waker.
/// The mailbox stays open for senders while one exists.
pub struct MailboxPeek<T> {
    rx: Receiver<T>,
}

impl<T> MailboxPeek<T> {
    /// The next waiting message, if there is one.
    pub fn try_recv(&self) -> Option<T> {
        self.rx.try_recv().ok()
    }
}

impl<T> MailboxReceiver<T> {
    /// A [`MailboxPeek`] on this mailbox.
    pub fn peek(&self) -> MailboxPeek<T> {
        MailboxPeek {
            rx: self.rx.clone(),
        }
    }

    /// Waits for the next message; `None` once every sender is gone and the
    /// mailbox is empty.
    pub fn recv(&self) -> Recv<'_, T> {
        Recv { receiver: self }
    }

    /// Waits for the next message like [`recv`](Self::recv), and also looks
    /// at the channel every `every`, in case a wake-up was lost. Must run on
    /// a glommio executor.
    pub async fn recv_rechecking(&self, every: Duration) -> Option<T> {
        loop {
            let woken = async { Some(self.recv().await) };
            let recheck = async {
                glommio::timer::sleep(every).await;
                None
            };
            if let Some(message) = futures_lite::future::or(woken, recheck).await {
                return message;
            }
        }
    }
}

/// Future returned by [`MailboxReceiver::recv`].
pub struct Recv<'a, T> {
    receiver: &'a MailboxReceiver<T>,
}

impl<T> Future for Recv<'_, T> {
    type Output = Option<T>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let receiver = self.receiver;
        match receiver.rx.try_recv() {
            Ok(message) => return Poll::Ready(Some(message)),
            Err(TryRecvError::Disconnected) => return Poll::Ready(None),
            Err(TryRecvError::Empty) => {}
        }

        // Register, then look again: a message sent between the first look
        // and the registration would otherwise wait for the next one.
        receiver.waker.register(cx.waker());
        match receiver.rx.try_recv() {
            Ok(message) => Poll::Ready(Some(message)),
            Err(TryRecvError::Disconnected) => Poll::Ready(None),
            Err(TryRecvError::Empty) => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_crosses_threads_and_wakes_the_receiver() {
        let (tx, rx) = mailbox::<u32>(4);
        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            tx.try_send(7).map_err(|_| "send failed")
        });
        let got = futures_lite::future::block_on(rx.recv());
        assert_eq!(got, Some(7));
        assert!(sender.join().unwrap().is_ok());
        // Every sender is gone now.
        assert_eq!(futures_lite::future::block_on(rx.recv()), None);
    }

    #[test]
    fn full_mailbox_returns_the_message() {
        let (tx, _rx) = mailbox::<u32>(1);
        assert!(tx.try_send(1).is_ok());
        match tx.try_send(2) {
            Err(TrySendError::Full(2)) => {}
            other => panic!("expected Full(2), got {other:?}"),
        }
    }

    #[test]
    fn a_peek_takes_waiting_messages_in_order_and_keeps_the_mailbox_open() {
        let (tx, rx) = mailbox::<u32>(4);
        let peek = rx.peek();
        assert_eq!(peek.try_recv(), None);
        for n in 1..=3 {
            assert!(tx.try_send(n).is_ok());
        }
        assert_eq!(peek.try_recv(), Some(1));
        assert_eq!(peek.try_recv(), Some(2));
        // The receiver goes on where the peek stopped.
        assert_eq!(futures_lite::future::block_on(rx.recv()), Some(3));
        drop(rx);
        assert!(
            tx.try_send(4).is_ok(),
            "a peek alone keeps the mailbox open"
        );
        drop(peek);
        assert!(tx.try_send(5).is_err(), "closed once the peek is gone too");
    }
}
