//! The per-connection output queue and the handle a user's manager holds.
//!
//! A [`ConnectionHandle`] is created by the shard when it adopts a socket and
//! is shared (inside the shard's thread only) between the connection's task
//! and its user's manager. The manager appends frames to the outbox and wakes
//! the task; the task writes everything queued in one system call the next
//! time it runs, so all frames queued for a socket during one executor turn
//! leave together ("corking").

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::task::Waker;

use super::readiness::SocketReady;
use crate::ws::codec::{self, OpCode};

/// The identity and output side of one open WebSocket connection.
pub struct ConnectionHandle {
    /// Server-wide unique connection number.
    pub id: u64,
    /// The user, from this connection's own verified token `sub`. It is a
    /// separate allocation from the manager's key, so that the manager's
    /// check compares two independent copies.
    pub user: Rc<str>,
    /// `exp` of the token now in force (seconds since the epoch).
    pub expires_at: Cell<u64>,
    /// `iat` of the token now in force, when it had one.
    pub issued_at: Cell<Option<u64>>,
    /// Whether the user's manager lists this connection.
    pub attached: Cell<bool>,
    /// An `/ws/echo` connection (not in any manager).
    pub echo: bool,
    /// Shard clock (ms) when the peer last sent anything.
    pub last_seen_ms: Cell<u64>,
    /// Shard clock (ms) when the server's unanswered ping was queued.
    pub ping_sent_ms: Cell<Option<u64>>,
    /// Messages refused by the rate limit since the client last kept to it
    /// for a whole second.
    pub limited_streak: Cell<u32>,
    /// Shard clock (ms) of the last refusal by the rate limit.
    pub limited_at_ms: Cell<u64>,
    /// The message budget of an echo connection (protocol connections use
    /// their user's manager).
    pub bucket: RefCell<Option<super::rate::TokenBucket>>,
    pub outbox: RefCell<Outbox>,
    /// Whether the socket may be read or written now, kept by the shard's
    /// poller; the task waits on the outbox's waker for both.
    pub ready: SocketReady,
}

impl ConnectionHandle {
    pub fn new(id: u64, user: &str, expires_at: u64, issued_at: Option<u64>) -> Rc<Self> {
        Self::with_kind(id, user, expires_at, issued_at, false, 0)
    }

    pub fn with_kind(
        id: u64,
        user: &str,
        expires_at: u64,
        issued_at: Option<u64>,
        echo: bool,
        now_ms: u64,
    ) -> Rc<Self> {
        Rc::new(ConnectionHandle {
            id,
            user: Rc::from(user),
            expires_at: Cell::new(expires_at),
            issued_at: Cell::new(issued_at),
            attached: Cell::new(false),
            echo,
            last_seen_ms: Cell::new(now_ms),
            ping_sent_ms: Cell::new(None),
            limited_streak: Cell::new(0),
            limited_at_ms: Cell::new(0),
            bucket: RefCell::new(None),
            outbox: RefCell::new(Outbox::default()),
            ready: SocketReady::default(),
        })
    }

    /// Asks the connection's task to drop the socket at once, without a
    /// close handshake (the peer is gone or unresponsive).
    pub fn abort(&self) {
        let mut outbox = self.outbox.borrow_mut();
        outbox.abort = true;
        outbox.wake();
    }

    /// Asks the connection's task to close with `code`; the first request
    /// wins. Frames queued after it are dropped.
    pub fn request_close(&self, code: u16, reason: &'static str) {
        let mut outbox = self.outbox.borrow_mut();
        if outbox.close.is_none() {
            outbox.close = Some(CloseRequest { code, reason });
        }
        outbox.wake();
    }
}

/// A close asked for by someone other than the connection's task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseRequest {
    pub code: u16,
    pub reason: &'static str,
}

/// Bounds on one outbox.
#[derive(Debug, Clone, Copy)]
pub struct OutboxLimits {
    pub max_messages: usize,
    pub max_bytes: usize,
}

/// The outbox refused a frame: the consumer is too slow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overflow;

/// Encoded frames waiting to be written to one socket.
#[derive(Default)]
pub struct Outbox {
    /// Bytes not yet written, starting with the unwritten rest of a frame.
    pub buf: Vec<u8>,
    /// Frames queued since the buffer was last empty.
    pub frames: usize,
    /// The connection task's waker, set while it waits.
    pub waker: Option<Waker>,
    pub close: Option<CloseRequest>,
    /// Drop the socket without a close handshake.
    pub abort: bool,
    /// Bytes the socket has taken from this outbox so far.
    pub written: u64,
}

/// Capacity kept after the buffer drains; larger buffers are released so an
/// idle connection holds little memory.
const KEEP_CAPACITY: usize = 1024;

impl Outbox {
    /// Queues one frame. Fails when the outbox is full or closing; the
    /// caller decides what a refusal means.
    pub fn push(
        &mut self,
        opcode: OpCode,
        payload: &[u8],
        limits: OutboxLimits,
    ) -> Result<(), Overflow> {
        if self.close.is_some() {
            return Err(Overflow);
        }
        if self.frames >= limits.max_messages || self.buf.len() + payload.len() > limits.max_bytes {
            return Err(Overflow);
        }
        codec::encode_frame(&mut self.buf, opcode, payload);
        self.frames += 1;
        Ok(())
    }

    /// Queues raw bytes (the 101 answer) with no bound.
    pub fn push_raw(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Queues a Close frame, even past the bounds: it is the last frame.
    pub fn push_close(&mut self, code: u16, reason: &str) {
        codec::encode_close(&mut self.buf, code, reason);
        self.frames += 1;
    }

    /// Drops `n` written bytes from the front.
    pub fn consume(&mut self, n: usize) {
        self.written += n.min(self.buf.len()) as u64;
        if n >= self.buf.len() {
            self.buf.clear();
            self.frames = 0;
            if self.buf.capacity() > KEEP_CAPACITY {
                self.buf = Vec::new();
            }
        } else {
            self.buf.drain(..n);
        }
    }

    /// Wakes the connection's task, if it waits.
    pub fn wake(&mut self) {
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }

    /// Heap bytes held, for memory accounting.
    pub fn heap_bytes(&self) -> usize {
        self.buf.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: OutboxLimits = OutboxLimits {
        max_messages: 2,
        max_bytes: 100,
    };

    #[test]
    fn bounded_by_messages_and_bytes() {
        let mut outbox = Outbox::default();
        assert!(outbox.push(OpCode::Text, b"a", LIMITS).is_ok());
        assert!(outbox.push(OpCode::Text, b"b", LIMITS).is_ok());
        assert_eq!(outbox.push(OpCode::Text, b"c", LIMITS), Err(Overflow));

        let mut outbox = Outbox::default();
        assert_eq!(outbox.push(OpCode::Text, &[0; 101], LIMITS), Err(Overflow));
    }

    #[test]
    fn draining_releases_large_buffers_and_resets_counts() {
        let mut outbox = Outbox::default();
        let big = OutboxLimits {
            max_messages: 10,
            max_bytes: 1 << 20,
        };
        outbox.push(OpCode::Binary, &[7; 5000], big).unwrap();
        let len = outbox.buf.len();
        outbox.consume(10);
        assert_eq!(outbox.buf.len(), len - 10);
        assert_eq!(outbox.frames, 1);
        outbox.consume(len);
        assert_eq!(outbox.frames, 0);
        assert_eq!(outbox.heap_bytes(), 0);
    }

    #[test]
    fn closing_outbox_refuses_frames() {
        let handle = ConnectionHandle::new(1, "alice", 0, None);
        handle.request_close(4003, "disconnected");
        handle.request_close(4008, "later request loses");
        let outbox = handle.outbox.borrow();
        assert_eq!(outbox.close.map(|c| c.code), Some(4003));
        drop(outbox);
        let pushed = handle.outbox.borrow_mut().push(OpCode::Text, b"x", LIMITS);
        assert_eq!(pushed, Err(Overflow));
    }
}
