//! One WebSocket connection's task, from the 101 answer to the socket's close.
//!
//! The task waits for two things at once: bytes from its socket, and frames
//! queued in its outbox by its user's manager. Bytes are read into the
//! shard's scratch buffer and decoded there, so an idle connection owns no
//! read buffer; the outbox is written with one system call per wake-up. The
//! task touches only its own socket, its outbox, and (through the shard) its
//! own user's manager.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::io;
use std::ops::ControlFlow;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::panic::AssertUnwindSafe;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Instant;

use super::Shard;
use super::message::Endpoint;
use super::outbox::{ConnectionHandle, Outbox};
use super::readiness;
use crate::ws::codec::{Inbound, MessageDecoder, OpCode};

/// What woke the task.
enum IoEvent {
    Read(usize),
    /// Everything queued has been written (only reported when asked for).
    Flushed,
    CloseRequested(u16, &'static str),
    /// Drop the socket now (dead peer, or shutdown's last resort).
    Abort,
    Eof,
    Failed(io::Error),
}

/// How the open phase ended.
pub enum Ending {
    /// The peer went away (EOF or socket error): nothing more to send.
    Gone,
    /// The peer sent Close: echo it, then drop the socket.
    PeerClosed(Option<u16>),
    /// The server closes: send Close, wait for the peer's, drop the socket.
    Close(u16, &'static str),
}

/// Per-connection state owned by the task.
pub struct Connection {
    shard: Rc<Shard>,
    handle: Rc<ConnectionHandle>,
    endpoint: Endpoint,
    decoder: MessageDecoder,
    /// Accept time, until the 101 has been written.
    accepted_at: Cell<Option<Instant>>,
    /// False once decoding stopped mid-input (a violation, or a frame that
    /// ended the connection): the byte stream can no longer be followed.
    in_sync: bool,
    /// Pongs queued since the outbox was last empty (see `answer_ping`).
    pongs_queued: Cell<usize>,
    /// The payload of the latest ping not answered yet because
    /// `PONGS_QUEUED_MAX` pongs were waiting; `None` when there is none.
    late_pong: RefCell<Option<Vec<u8>>>,
}

/// Pongs one connection may have queued and unwritten. Pings beyond them
/// are answered, once the socket has taken the queued ones, by a single
/// pong for the latest (RFC 6455 §5.5.3 allows that), so a ping flood from
/// a client that never reads cannot fill the outbox.
const PONGS_QUEUED_MAX: usize = 16;

impl Connection {
    pub fn new(
        shard: Rc<Shard>,
        handle: Rc<ConnectionHandle>,
        endpoint: Endpoint,
        accepted_at: Instant,
    ) -> Self {
        Connection {
            shard,
            handle,
            endpoint,
            decoder: MessageDecoder::new(),
            accepted_at: Cell::new(Some(accepted_at)),
            in_sync: true,
            pongs_queued: Cell::new(0),
            late_pong: RefCell::new(None),
        }
    }

    /// Runs the connection to its end. The 101 answer is already queued.
    pub async fn run(mut self, socket: OwnedFd, mut early_bytes: Vec<u8>) {
        let mut ending = None;
        if !early_bytes.is_empty()
            && let ControlFlow::Break(end) = self.on_bytes(&mut early_bytes)
        {
            ending = Some(end);
        }
        drop(early_bytes);

        let ending = match ending {
            Some(end) => end,
            None => self.open_phase(&socket).await,
        };

        // From here on the connection receives nothing more from its user,
        // and nothing but the Close follows what is queued.
        self.shard.forget(&self.handle);
        self.late_pong.get_mut().take();
        match ending {
            Ending::Gone => {}
            Ending::PeerClosed(code) => {
                // RFC 6455 §5.5.1: answer a Close with a Close, echoing the
                // status code, then close the TCP connection (§7.1.1).
                self.queue_close(code.unwrap_or(1000), "");
                self.closing_phase(&socket, false).await;
            }
            Ending::Close(code, reason) => {
                // RFC 6455 §7.1.2: send Close, then wait for the peer's
                // Close (or its FIN) before dropping the socket, so that
                // unread input cannot turn our close into a reset that
                // destroys the Close frame in flight.
                self.queue_close(code, reason);
                self.closing_phase(&socket, true).await;
            }
        }
        self.shard.connection_closed(&self.handle, &socket);
    }

    async fn open_phase(&mut self, socket: &OwnedFd) -> Ending {
        loop {
            let event = poll_fn(|cx| self.poll_io(cx, socket, true, false, true)).await;
            match event {
                IoEvent::Read(n) => {
                    let step = {
                        let shard = self.shard.clone();
                        let mut scratch = shard.read_buf.borrow_mut();
                        self.on_bytes(&mut scratch[..n])
                    };
                    if let ControlFlow::Break(end) = step {
                        return end;
                    }
                    // Nothing of the shard is borrowed here.
                    self.shard.serve_waiting_mail();
                    yield_after_full_read(n).await;
                }
                IoEvent::CloseRequested(code, reason) => return Ending::Close(code, reason),
                IoEvent::Eof | IoEvent::Flushed | IoEvent::Abort => return Ending::Gone,
                IoEvent::Failed(err) => {
                    tracing::debug!(conn = self.handle.id, cause = %err, "socket error");
                    return Ending::Gone;
                }
            }
        }
    }

    /// Writes what is queued (the Close last), shuts down the write side and,
    /// when `await_peer`, reads until the peer's Close or FIN, all within the
    /// close timeout.
    async fn closing_phase(&mut self, socket: &OwnedFd, await_peer: bool) {
        let limit = self.shard.config.limits.close_timeout;
        let deadline = Instant::now() + limit;
        let mut flushed = false;
        let work = async {
            loop {
                let read = await_peer && flushed;
                let stop_when_flushed = !flushed;
                let event =
                    poll_fn(|cx| self.poll_io(cx, socket, read, stop_when_flushed, false)).await;
                match event {
                    IoEvent::Flushed => {
                        flushed = true;
                        // SAFETY: shutdown on the descriptor we own and keep
                        // open; it only ends our sending side.
                        unsafe { libc::shutdown(socket.as_raw_fd(), libc::SHUT_WR) };
                        if !await_peer {
                            return;
                        }
                    }
                    IoEvent::Read(n) => {
                        let peer_closed = {
                            let shard = self.shard.clone();
                            let mut scratch = shard.read_buf.borrow_mut();
                            self.drain_until_close(&mut scratch[..n])
                        };
                        if peer_closed {
                            return;
                        }
                        yield_after_full_read(n).await;
                    }
                    IoEvent::CloseRequested(..) => {}
                    IoEvent::Eof | IoEvent::Failed(_) | IoEvent::Abort => return,
                }
            }
        };
        let timer = async {
            glommio::timer::Timer::new(deadline.saturating_duration_since(Instant::now())).await;
        };
        futures_lite::future::or(work, timer).await;
    }

    /// Waits for the next I/O event. Writes everything queued first.
    ///
    /// A read that fills the scratch buffer means more bytes are waiting;
    /// the caller then yields (see `yield_after_full_read`).
    fn poll_io(
        &mut self,
        cx: &mut Context<'_>,
        socket: &OwnedFd,
        read: bool,
        report_flushed: bool,
        watch_close: bool,
    ) -> Poll<IoEvent> {
        let mut outbox = self.handle.outbox.borrow_mut();
        if outbox.abort {
            return Poll::Ready(IoEvent::Abort);
        }

        let fd = socket.as_raw_fd();
        if let Err(event) = self.write_queued(&mut outbox, fd) {
            return Poll::Ready(event);
        }
        if report_flushed && outbox.buf.is_empty() {
            return Poll::Ready(IoEvent::Flushed);
        }
        if watch_close {
            // The request stays set, so that later frames are still refused.
            if let Some(request) = outbox.close {
                return Poll::Ready(IoEvent::CloseRequested(request.code, request.reason));
            }
        }
        let waker_is_current = outbox
            .waker
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()));
        if !waker_is_current {
            outbox.waker = Some(cx.waker().clone());
        }
        drop(outbox);

        if read && let Some(event) = self.read_ready(fd) {
            return Poll::Ready(event);
        }
        Poll::Pending
    }

    /// Writes what the outbox holds, one send() for everything queued since
    /// the last one, as far as the socket takes it; then, once it is all
    /// out, the pong kept for the latest ping (see `answer_ping`). Fails
    /// with the event that ends the connection.
    fn write_queued(&self, outbox: &mut Outbox, fd: RawFd) -> Result<(), IoEvent> {
        let ready = &self.handle.ready;
        loop {
            while !outbox.buf.is_empty() && ready.writable.get() {
                match readiness::send(fd, &outbox.buf) {
                    Ok(Some(0)) => return Err(IoEvent::Eof),
                    Ok(Some(n)) => {
                        outbox.consume(n);
                        if let Some(accepted_at) = self.accepted_at.take() {
                            self.shard.record_handoff_latency(accepted_at.elapsed());
                        }
                    }
                    // Full: the poller says when there is room again.
                    Ok(None) => ready.writable.set(false),
                    Err(err) => return Err(IoEvent::Failed(err)),
                }
            }
            if !outbox.buf.is_empty() {
                return Ok(());
            }
            self.pongs_queued.set(0);
            // A refused push means a close was requested, and nothing but
            // the Close may follow.
            let Some(payload) = self.late_pong.borrow_mut().take() else {
                return Ok(());
            };
            if outbox
                .push(OpCode::Pong, &payload, self.shard.outbox_limits())
                .is_err()
            {
                return Ok(());
            }
            self.pongs_queued.set(1);
        }
    }

    /// Reads into the shard's scratch buffer if the socket may have input.
    ///
    /// The flag is cleared first: input that arrives from now on raises a
    /// new event. A read that fills the buffer leaves more behind, and so
    /// does one after a hang-up (the end is still to be read), so the flag
    /// goes back up; otherwise a shorter read emptied the socket.
    fn read_ready(&self, fd: RawFd) -> Option<IoEvent> {
        let ready = &self.handle.ready;
        if !ready.readable.replace(false) {
            return None;
        }
        let mut scratch = self.shard.read_buf.borrow_mut();
        match readiness::recv(fd, &mut scratch[..]) {
            Ok(Some(0)) => Some(IoEvent::Eof),
            Ok(Some(n)) => {
                if n == scratch.len() || ready.hung_up.get() {
                    ready.readable.set(true);
                }
                Some(IoEvent::Read(n))
            }
            Ok(None) => None,
            Err(err) => Some(IoEvent::Failed(err)),
        }
    }

    /// Decodes and handles bytes from the peer. Breaks with how the
    /// connection must end. A panic in here closes this connection (1011)
    /// and, if it interrupted a change to the user's manager, that user's
    /// other connections; the shard and its other users go on.
    fn on_bytes(&mut self, input: &mut [u8]) -> ControlFlow<Ending> {
        // Any frame from the peer shows it is alive.
        self.handle.last_seen_ms.set(self.shard.now_ms());
        self.handle.ping_sent_ms.set(None);

        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| self.decode(input)));
        match outcome {
            Ok(step) => step,
            Err(_) => {
                self.in_sync = false;
                self.shard.recover_from_panic(&self.handle);
                ControlFlow::Break(Ending::Close(1011, "internal error"))
            }
        }
    }

    fn decode(&mut self, input: &mut [u8]) -> ControlFlow<Ending> {
        let shard = &self.shard;
        let handle = &self.handle;
        let endpoint = self.endpoint;
        let pongs_queued = &self.pongs_queued;
        let late_pong = &self.late_pong;
        let limits = shard.message_limits();
        let mut ending = None;

        let decoded = self.decoder.feed(input, &limits, |inbound| {
            let step = match (inbound, endpoint) {
                (Inbound::Text(text), Endpoint::Protocol) => shard.on_text(handle, text),
                (Inbound::Binary(_), Endpoint::Protocol) => shard.on_binary(handle),
                (Inbound::Text(text), Endpoint::Echo) => {
                    shard.on_echo(handle, OpCode::Text, text.as_bytes())
                }
                (Inbound::Binary(bytes), Endpoint::Echo) => {
                    shard.on_echo(handle, OpCode::Binary, bytes)
                }
                (Inbound::Ping(payload), _) => {
                    answer_ping(shard, handle, pongs_queued, late_pong, payload)
                }
                (Inbound::Pong(_), _) => ControlFlow::Continue(()),
                (Inbound::Close(code, _reason), _) => ControlFlow::Break(Ending::PeerClosed(code)),
            };
            match step {
                ControlFlow::Continue(()) => ControlFlow::Continue(()),
                ControlFlow::Break(end) => {
                    ending = Some(end);
                    ControlFlow::Break(())
                }
            }
        });

        if let Err(err) = decoded {
            super::bump(&shard.counters.protocol_errors, 1);
            tracing::debug!(
                conn = handle.id,
                user = %handle.user,
                reason = err.reason(),
                "protocol violation; closing"
            );
            self.in_sync = false;
            return ControlFlow::Break(Ending::Close(err.close_code(), err.reason()));
        }
        match ending {
            Some(end) => {
                self.in_sync = false;
                ControlFlow::Break(end)
            }
            None => ControlFlow::Continue(()),
        }
    }

    /// While closing: true once the peer's Close (or garbage) has arrived.
    /// When the stream is out of sync, input is discarded until FIN.
    fn drain_until_close(&mut self, input: &mut [u8]) -> bool {
        if !self.in_sync {
            return false;
        }
        let limits = self.shard.message_limits();
        let mut closed = false;
        let decoded = self.decoder.feed(input, &limits, |inbound| {
            if let Inbound::Close(..) = inbound {
                closed = true;
                return ControlFlow::Break(());
            }
            ControlFlow::Continue(())
        });
        if decoded.is_err() {
            self.in_sync = false;
        }
        closed
    }

    fn queue_close(&self, code: u16, reason: &str) {
        self.handle.outbox.borrow_mut().push_close(code, reason);
    }
}

/// Queues the pong for a ping, or, with `PONGS_QUEUED_MAX` pongs already
/// waiting for the socket, keeps the ping's payload as the latest one to
/// answer when they have been written (replacing an earlier one).
fn answer_ping(
    shard: &Shard,
    handle: &ConnectionHandle,
    pongs_queued: &Cell<usize>,
    late_pong: &RefCell<Option<Vec<u8>>>,
    payload: &[u8],
) -> ControlFlow<Ending> {
    if pongs_queued.get() < PONGS_QUEUED_MAX {
        pongs_queued.set(pongs_queued.get() + 1);
        return shard.reply_frame(handle, OpCode::Pong, payload);
    }
    let mut late = late_pong.borrow_mut();
    let kept = late.get_or_insert_with(Vec::new);
    kept.clear();
    kept.extend_from_slice(payload);
    ControlFlow::Continue(())
}

/// Lets the shard's other connections run after a read that filled the
/// scratch buffer. glommio switches tasks only when one returns `Pending`,
/// and a socket that always has data never does: without this, one client
/// that keeps its socket full would hold the whole shard (measured: other
/// users' p99 delivery latency rose to 55 ms during such a flood).
async fn yield_after_full_read(n: usize) {
    if n >= super::READ_BUFFER {
        futures_lite::future::yield_now().await;
    }
}
