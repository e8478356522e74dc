//! A shard: one single-threaded glommio executor, pinned to a core, that owns
//! every user hashed to it and every socket of those users.
//!
//! The shard's only door is its mailbox. Through it come hand-offs (a socket
//! whose token the router verified), backend commands, requests for counters
//! and the shutdown order. Nothing the shard owns is reachable from another
//! thread: the user map, the managers, the sockets and the scratch buffers
//! live in `Rc` and `RefCell` on the shard's own thread. A shard never reads
//! another shard's users.
//!
//! The shard's work is split by concern: this file starts the shard and
//! adopts connections; `commands` answers the router; `lifecycle` runs the
//! periodic sweep (expiry, heartbeats, revocations), shutdown, and recovery
//! from panics; `traffic` handles what connections send.

mod commands;
pub mod connection;
mod lifecycle;
pub mod message;
pub mod outbox;
pub mod protocol;
pub mod rate;
mod readiness;
mod traffic;
pub mod user;

use std::cell::{Cell, RefCell};
use std::os::fd::{AsRawFd, OwnedFd};
use std::panic::AssertUnwindSafe;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use ahash::AHashMap;
use glommio::{Latency, Placement, Shares, TaskQueueHandle};

use crate::auth::Verifier;
use crate::config::Config;
use crate::executors::{ExecutorThread, Reporter};
use crate::mailbox::{MailboxPeek, MailboxReceiver};
use crate::ws::codec::{MessageLimits, OpCode};
use connection::Connection;
use message::{CommandReply, Endpoint, Handoff, ShardMessage};
use outbox::{ConnectionHandle, OutboxLimits};
use readiness::Poller;
use user::UserManager;

/// Test builds only: `data` values that make a shard panic on purpose, in
/// the middle of a fan-out or while handling a frame.
#[cfg(feature = "fault-injection")]
pub const FAULT_IN_DELIVERY: &str = "\"__shardgate_fault_in_delivery__\"";
#[cfg(feature = "fault-injection")]
pub const FAULT_IN_CONNECTION: &str = "\"__shardgate_fault_in_connection__\"";

/// Size of the shard's read buffer, shared by all its connections.
pub(crate) const READ_BUFFER: usize = 64 * 1024;

/// Most mailbox messages a connection task serves after one read.
const MAIL_PER_READ: usize = 16;

/// Upper bounds (µs) of the hand-off latency histogram buckets.
pub const LATENCY_BUCKETS_US: [u64; 12] = [
    50,
    100,
    200,
    300,
    500,
    750,
    1_000,
    2_000,
    5_000,
    10_000,
    100_000,
    u64::MAX,
];

/// Running totals of one shard, read by `/metrics`.
#[derive(Default)]
pub struct Counters {
    pub handoffs: Cell<u64>,
    pub messages_received: Cell<u64>,
    pub messages_delivered: Cell<u64>,
    pub refused_user_cap: Cell<u64>,
    pub refused_shard_cap: Cell<u64>,
    pub refused_late: Cell<u64>,
    pub refused_revoked: Cell<u64>,
    pub refused_draining: Cell<u64>,
    pub protocol_errors: Cell<u64>,
    pub bad_messages: Cell<u64>,
    pub forbidden: Cell<u64>,
    pub rate_limited: Cell<u64>,
    pub abuse_closes: Cell<u64>,
    pub slow_consumers: Cell<u64>,
    pub pong_timeouts: Cell<u64>,
    pub expired: Cell<u64>,
    pub panics: Cell<u64>,
    pub isolation_violations: Cell<u64>,
    pub handoff_latency: [Cell<u64>; LATENCY_BUCKETS_US.len()],
    pub handoff_latency_sum_us: Cell<u64>,
}

pub(crate) fn bump(counter: &Cell<u64>, by: u64) {
    counter.set(counter.get() + by);
}

/// A revocation kept by the user's shard: tokens issued before
/// `issued_before` are refused until `keep_until` (seconds since the epoch).
struct Revocation {
    issued_before: u64,
    keep_until: u64,
}

/// The state of one shard, owned by its thread.
pub struct Shard {
    pub index: usize,
    pub shard_count: usize,
    pub config: Arc<Config>,
    pub verifier: Arc<Verifier>,
    users: RefCell<AHashMap<Rc<str>, UserManager>>,
    /// Every open connection (both endpoints), by id.
    connections: RefCell<AHashMap<u64, Rc<ConnectionHandle>>>,
    protocol_connections: Cell<usize>,
    echo_connections: Cell<usize>,
    revocations: RefCell<AHashMap<Box<str>, Revocation>>,
    next_conn: Cell<u64>,
    started: Instant,
    /// Set by the shutdown order: no new connections, sends or publishes.
    draining: Cell<bool>,
    pub counters: Counters,
    /// Where every connection's bytes are read and decoded.
    read_buf: RefCell<Vec<u8>>,
    /// Where a delivered message is encoded once before being copied.
    encode_buf: RefCell<Vec<u8>>,
    /// Where replies (ack, pong, error) are built.
    reply_buf: RefCell<Vec<u8>>,
    connection_queue: TaskQueueHandle,
    /// Tells connection tasks when their sockets can be read or written.
    poller: Poller,
    /// Told when shutdown is complete, so the executor can end.
    finished: RefCell<Option<glommio::channels::local_channel::LocalSender<()>>>,
    /// Mail already waiting, for connection tasks to serve between reads
    /// (see `serve_waiting_mail`); gone once the mailbox task has ended.
    waiting_mail: RefCell<Option<MailboxPeek<ShardMessage>>>,
}

/// Starts shard `index` on its own thread, pinned to `cpu` when given.
pub fn spawn(
    index: usize,
    cpu: Option<usize>,
    config: Arc<Config>,
    verifier: Arc<Verifier>,
    inbox: MailboxReceiver<ShardMessage>,
    reporter: Reporter,
) -> std::io::Result<ExecutorThread> {
    let placement = match cpu {
        Some(cpu) => Placement::Fixed(cpu),
        None => Placement::Unbound,
    };
    ExecutorThread::spawn(
        &format!("shard-{index}"),
        placement,
        config.limits.preempt_timer,
        move || run(index, config, verifier, inbox, reporter),
    )
}

async fn run(
    index: usize,
    config: Arc<Config>,
    verifier: Arc<Verifier>,
    inbox: MailboxReceiver<ShardMessage>,
    reporter: Reporter,
) {
    crate::audit::set_rate(config.limits.audit_per_sec);
    let executor = glommio::executor();
    let connection_queue =
        executor.create_task_queue(Shares::default(), Latency::NotImportant, "connections");
    // The mailbox task has a queue of its own, so the scheduler gives it its
    // share as soon as it is woken, however busy the connections are. Both
    // queues are NotImportant on purpose: glommio 0.9 puts the I/O of
    // latency-sensitive queues on its latency ring, where wake-ups were seen
    // to get lost (sockets adopted by the mailbox task stalled).
    let mailbox_queue =
        executor.create_task_queue(Shares::default(), Latency::NotImportant, "mailbox");
    let recheck = config.limits.mailbox_recheck;
    let (finished, wait_finished) = glommio::channels::local_channel::new_bounded(1);
    let poller = match Poller::new() {
        Ok(poller) => poller,
        Err(err) => {
            tracing::error!(shard = index, cause = %err, "cannot create the epoll instance");
            return;
        }
    };

    let shard = Rc::new(Shard {
        index,
        shard_count: config.shards,
        verifier,
        users: RefCell::new(AHashMap::new()),
        connections: RefCell::new(AHashMap::new()),
        protocol_connections: Cell::new(0),
        echo_connections: Cell::new(0),
        revocations: RefCell::new(AHashMap::new()),
        next_conn: Cell::new(0),
        started: Instant::now(),
        draining: Cell::new(false),
        counters: Counters::default(),
        read_buf: RefCell::new(vec![0; READ_BUFFER]),
        encode_buf: RefCell::new(Vec::new()),
        reply_buf: RefCell::new(Vec::new()),
        connection_queue,
        poller,
        finished: RefCell::new(Some(finished)),
        waiting_mail: RefCell::new(Some(inbox.peek())),
        config,
    });
    tracing::info!(shard = index, executor = executor.id(), "shard started");

    let sweeper = shard.clone();
    if let Ok(task) = glommio::spawn_local_into(
        async move { sweeper.housekeeping().await },
        connection_queue,
    ) {
        task.detach();
    }

    if let Ok(task) = glommio::spawn_local_into(Poller::drive(shard.clone()), connection_queue) {
        task.detach();
    }

    // The mailbox task ends when shutdown completes; dropping the inbox
    // then makes later messages fail at the sender instead of waiting for
    // an answer that would never come.
    let receiver = shard.clone();
    let mailbox = glommio::spawn_local_into(
        async move {
            loop {
                let message = inbox.recv_rechecking(recheck);
                let next = futures_lite::future::or(async { Some(message.await) }, async {
                    let _ = wait_finished.recv().await;
                    None
                });
                match next.await {
                    Some(Some(message)) => receiver.handle(message),
                    Some(None) | None => break,
                }
            }
            receiver.waiting_mail.borrow_mut().take();
        },
        mailbox_queue,
    );
    match mailbox {
        Ok(task) => {
            reporter.ready();
            task.await;
        }
        Err(err) => {
            tracing::error!(shard = index, cause = %err, "cannot start mailbox task");
            return;
        }
    };
    tracing::info!(shard = index, "shard stopped");
}

impl Shard {
    /// One mailbox message. A panic while handling it is caught: the
    /// router still gets an answer, and a user manager left half-changed is
    /// rebuilt; the shard goes on.
    fn handle(self: &Rc<Self>, message: ShardMessage) {
        match message {
            ShardMessage::Upgrade(handoff) => {
                self.guarded("hand-off", || self.adopt(*handoff));
            }
            ShardMessage::Command { command, reply } => {
                let answer = self
                    .guarded("command", || self.command(command))
                    .unwrap_or(CommandReply::Failed);
                // The router may have given up waiting; nothing to do then.
                let _ = reply.try_send(answer);
            }
            ShardMessage::Stats { reply } => {
                if let Some(stats) = self.guarded("stats", || self.stats()) {
                    let _ = reply.try_send(stats);
                }
            }
            ShardMessage::Shutdown => self.begin_shutdown(),
        }
    }

    /// Handles mailbox messages that are already waiting; connection tasks
    /// call it between reads. On a busy shard the mailbox task is woken only
    /// when the executor next looks at its rings, up to a preempt timer
    /// later, and that wait was most of a hand-off's latency under load.
    /// Callers must hold no borrow of shard state: a message may touch any
    /// user or connection, the caller's included.
    pub fn serve_waiting_mail(self: &Rc<Self>) {
        for _ in 0..MAIL_PER_READ {
            let message = match self.waiting_mail.borrow().as_ref() {
                Some(mail) => mail.try_recv(),
                None => return,
            };
            match message {
                Some(message) => self.handle(message),
                None => return,
            }
        }
    }

    /// Runs `work`, turning a panic into `None` after recovery.
    fn guarded<T>(&self, what: &'static str, work: impl FnOnce() -> T) -> Option<T> {
        match std::panic::catch_unwind(AssertUnwindSafe(work)) {
            Ok(value) => Some(value),
            Err(_) => {
                bump(&self.counters.panics, 1);
                tracing::error!(
                    shard = self.index,
                    what,
                    "panic while handling a mailbox message"
                );
                self.rebuild_suspect_managers();
                None
            }
        }
    }

    pub fn message_limits(&self) -> MessageLimits {
        MessageLimits {
            max_message_size: self.config.limits.max_message_size,
            max_fragments: self.config.limits.max_fragments,
        }
    }

    pub fn outbox_limits(&self) -> OutboxLimits {
        OutboxLimits {
            max_messages: self.config.limits.outbound_queue_messages,
            max_bytes: self.config.limits.outbound_queue_bytes,
        }
    }

    /// Milliseconds since the shard started: the clock of heartbeats.
    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Finishes a hand-off: refuses it (late, draining, revoked, shard or
    /// user full) or answers 101 and starts the connection's task.
    fn adopt(self: &Rc<Self>, handoff: Handoff) {
        bump(&self.counters.handoffs, 1);
        let limits = &self.config.limits;
        let user: &str = &handoff.claims.sub;

        if Instant::now() > handoff.deadline {
            bump(&self.counters.refused_late, 1);
            tracing::debug!(
                shard = self.index,
                user,
                "hand-off arrived after its deadline"
            );
            refuse(handoff.socket, 503, &[("Retry-After", "1")]);
            return;
        }
        if self.draining.get() {
            bump(&self.counters.refused_draining, 1);
            refuse(handoff.socket, 503, &[("Retry-After", "5")]);
            return;
        }
        if self.is_revoked(user, handoff.claims.iat) {
            bump(&self.counters.refused_revoked, 1);
            crate::audit!(
                event = "token_revoked",
                shard = self.index,
                user,
                peer = %handoff.peer,
                "upgrade with a revoked token; answered 401"
            );
            let challenge = ("WWW-Authenticate", "Bearer error=\"invalid_token\"");
            refuse(handoff.socket, 401, &[challenge]);
            return;
        }
        let open = self.protocol_connections.get() + self.echo_connections.get();
        if open >= limits.max_connections_per_shard {
            bump(&self.counters.refused_shard_cap, 1);
            crate::audit!(
                event = "shard_full",
                shard = self.index,
                user,
                peer = %handoff.peer,
                limit = limits.max_connections_per_shard,
                "shard connection cap reached; answered 503"
            );
            refuse(handoff.socket, 503, &[("Retry-After", "1")]);
            return;
        }
        let user_connections = self.users.borrow().get(user).map_or(0, UserManager::len);
        if handoff.endpoint == Endpoint::Protocol
            && user_connections >= limits.max_connections_per_user
        {
            bump(&self.counters.refused_user_cap, 1);
            crate::audit!(
                event = "user_connection_cap",
                shard = self.index,
                user,
                peer = %handoff.peer,
                limit = limits.max_connections_per_user,
                "per-user connection cap reached; answered 429"
            );
            refuse(handoff.socket, 429, &[]);
            return;
        }

        let id = self.next_conn.get() * self.shard_count as u64 + self.index as u64;
        if let Err(err) = self.poller.register(handoff.socket.as_raw_fd(), id) {
            tracing::error!(shard = self.index, cause = %err, "cannot watch the socket");
            refuse(handoff.socket, 503, &[]);
            return;
        }
        self.next_conn.set(self.next_conn.get() + 1);
        let echo = handoff.endpoint == Endpoint::Echo;
        let claims = &handoff.claims;
        let handle =
            ConnectionHandle::with_kind(id, user, claims.exp, claims.iat, echo, self.now_ms());
        if echo && limits.rate_per_sec > 0 {
            *handle.bucket.borrow_mut() = Some(rate::TokenBucket::new(
                limits.rate_per_sec,
                limits.rate_burst,
                Instant::now(),
            ));
        }

        // The 101 answer, then (on /ws) the welcome frame, leave together.
        let mut head = Vec::with_capacity(160);
        crate::ws::handshake::write_switching_protocols(
            &mut head,
            &handoff.accept_key,
            handoff.subprotocol,
        );
        handle.outbox.borrow_mut().push_raw(&head);
        if echo {
            self.echo_connections.set(self.echo_connections.get() + 1);
        } else {
            if let Err(err) = self.attach(&handle) {
                tracing::error!(shard = self.index, cause = %err, "attach refused");
                return;
            }
            self.protocol_connections
                .set(self.protocol_connections.get() + 1);
        }
        self.connections.borrow_mut().insert(id, handle.clone());
        tracing::debug!(shard = self.index, user, conn = id, echo, "connection open");

        let connection =
            Connection::new(self.clone(), handle, handoff.endpoint, handoff.accepted_at);
        let task = glommio::spawn_local_into(
            connection.run(handoff.socket, handoff.early_bytes),
            self.connection_queue,
        );
        if let Err(err) = task.map(|task| task.detach()) {
            tracing::error!(shard = self.index, cause = %err, "cannot spawn connection");
        }
    }

    /// Adds a connection to its user's manager, creating the manager (and a
    /// new epoch) for a user's first connection, and queues the welcome.
    fn attach(&self, handle: &Rc<ConnectionHandle>) -> Result<(), user::IsolationViolation> {
        let limits = &self.config.limits;
        let mut users = self.users.borrow_mut();
        let manager = match users.get_mut(&*handle.user) {
            Some(manager) => manager,
            None => {
                let manager =
                    UserManager::with_rate(&handle.user, limits.rate_per_sec, limits.rate_burst);
                let key = manager.user().clone();
                users.entry(key).or_insert(manager)
            }
        };
        if let Err(err) = manager.attach(handle.clone()) {
            bump(&self.counters.isolation_violations, 1);
            return Err(err);
        }

        let mut reply = self.reply_buf.borrow_mut();
        reply.clear();
        protocol::write_welcome(
            &mut reply,
            &handle.user,
            handle.id,
            manager.epoch(),
            manager.seq(),
        );
        let mut outbox = handle.outbox.borrow_mut();
        // The outbox is new and empty, so the welcome always fits.
        let _ = outbox.push(OpCode::Text, &reply, self.outbox_limits());
        Ok(())
    }

    /// Removes a connection from its user's manager, dropping the manager
    /// with its last connection. Safe to call more than once.
    pub fn forget(&self, handle: &ConnectionHandle) {
        if !handle.attached.get() {
            return;
        }
        let mut users = self.users.borrow_mut();
        let Some(manager) = users.get_mut(&*handle.user) else {
            handle.attached.set(false);
            return;
        };
        if manager.detach(handle).is_err() {
            bump(&self.counters.isolation_violations, 1);
            return;
        }
        if manager.is_empty() {
            users.remove(&*handle.user);
        }
    }

    /// Called by a connection's task as it ends, before its socket closes.
    pub fn connection_closed(&self, handle: &ConnectionHandle, socket: &OwnedFd) {
        self.poller.deregister(socket.as_raw_fd());
        self.connections.borrow_mut().remove(&handle.id);
        let count = if handle.echo {
            &self.echo_connections
        } else {
            &self.protocol_connections
        };
        count.set(count.get().saturating_sub(1));
    }

    /// The poller saw `events` on connection `id`'s socket: marks what it
    /// can do now and wakes its task when that is news.
    fn socket_ready(&self, id: u64, events: u32) {
        let connections = self.connections.borrow();
        let Some(handle) = connections.get(&id) else {
            // Closed meanwhile, or not adopted yet (its flags start set).
            return;
        };
        let ready = &handle.ready;
        let failed = (libc::EPOLLHUP | libc::EPOLLERR) as u32;
        let mut news = false;
        if events & (libc::EPOLLRDHUP as u32 | failed) != 0 {
            ready.hung_up.set(true);
        }
        if events & ((libc::EPOLLIN | libc::EPOLLRDHUP) as u32 | failed) != 0 {
            news |= !ready.readable.replace(true);
        }
        if events & (libc::EPOLLOUT as u32 | failed) != 0 {
            news |= !ready.writable.replace(true);
        }
        if news {
            handle.outbox.borrow_mut().wake();
        }
    }

    /// Records the time from accept to the 101 leaving the shard.
    pub fn record_handoff_latency(&self, elapsed: std::time::Duration) {
        let micros = elapsed.as_micros().min(u128::from(u64::MAX)) as u64;
        let bucket = LATENCY_BUCKETS_US
            .iter()
            .position(|&bound| micros <= bound)
            .unwrap_or(LATENCY_BUCKETS_US.len() - 1);
        bump(&self.counters.handoff_latency[bucket], 1);
        bump(&self.counters.handoff_latency_sum_us, micros);
    }
}

/// Answers a refused hand-off with a plain HTTP status and closes the socket.
/// The socket is fresh, so its send buffer has room for these few bytes; a
/// non-blocking send that fails only means the client left already.
fn refuse(socket: OwnedFd, status: u16, headers: &[(&str, &str)]) {
    let mut answer = Vec::with_capacity(160);
    crate::http::write_response(&mut answer, status, headers, "text/plain", b"", false);
    let _ = readiness::send(socket.as_raw_fd(), &answer);
    // SAFETY: the descriptor is owned by `socket` for the whole call.
    unsafe { libc::shutdown(socket.as_raw_fd(), libc::SHUT_WR) };
}
