//! A shard: one single-threaded glommio executor, pinned to a core, that owns
//! every user hashed to it and every socket of those users.
//!
//! The shard's only door is its mailbox. Through it come hand-offs (a socket
//! whose token the router verified), backend commands, and requests for
//! counters. Nothing the shard owns is reachable from another thread: the
//! user map, the managers, the sockets and the scratch buffers live in `Rc`
//! and `RefCell` on the shard's own thread. A shard never reads another
//! shard's users.

pub mod connection;
pub mod message;
pub mod outbox;
pub mod protocol;
pub mod user;

use std::cell::{Cell, RefCell};
use std::ops::ControlFlow;
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd};
use std::os::unix::io::FromRawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ahash::AHashMap;
use glommio::net::TcpStream;
use glommio::{Latency, LocalExecutorBuilder, Placement, Shares, TaskQueueHandle};
use serde_json::value::RawValue;

use crate::auth::{self, Verifier};
use crate::config::Config;
use crate::mailbox::MailboxReceiver;
use crate::ws::codec::{MessageLimits, OpCode};
use connection::{Connection, Ending};
use message::{Command, CommandReply, Endpoint, Handoff, ShardMessage, ShardStats};
use outbox::{ConnectionHandle, OutboxLimits};
use user::UserManager;

/// Size of the shard's read buffer, shared by all its connections.
const READ_BUFFER: usize = 64 * 1024;

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
    pub protocol_errors: Cell<u64>,
    pub slow_consumers: Cell<u64>,
    pub isolation_violations: Cell<u64>,
    pub handoff_latency: [Cell<u64>; LATENCY_BUCKETS_US.len()],
    pub handoff_latency_sum_us: Cell<u64>,
}

fn bump(counter: &Cell<u64>, by: u64) {
    counter.set(counter.get() + by);
}

/// The state of one shard, owned by its thread.
pub struct Shard {
    pub index: usize,
    pub shard_count: usize,
    pub config: Arc<Config>,
    pub verifier: Arc<Verifier>,
    users: RefCell<AHashMap<Rc<str>, UserManager>>,
    connections: Cell<usize>,
    echo_connections: Cell<usize>,
    next_conn: Cell<u64>,
    pub counters: Counters,
    /// Where every connection's bytes are read and decoded.
    read_buf: RefCell<Vec<u8>>,
    /// Where a delivered message is encoded once before being copied.
    encode_buf: RefCell<Vec<u8>>,
    /// Where replies (ack, pong, error) are built.
    reply_buf: RefCell<Vec<u8>>,
    connection_queue: TaskQueueHandle,
}

/// Starts shard `index` on its own thread, pinned to `cpu` when given.
pub fn spawn(
    index: usize,
    cpu: Option<usize>,
    config: Arc<Config>,
    verifier: Arc<Verifier>,
    inbox: MailboxReceiver<ShardMessage>,
) -> glommio::Result<glommio::ExecutorJoinHandle<()>, ()> {
    let placement = match cpu {
        Some(cpu) => Placement::Fixed(cpu),
        None => Placement::Unbound,
    };
    LocalExecutorBuilder::new(placement)
        .name(&format!("shard-{index}"))
        // Registered I/O memory serves file I/O only; sockets do not use it.
        .io_memory(0)
        .spawn(move || run(index, config, verifier, inbox))
}

async fn run(
    index: usize,
    config: Arc<Config>,
    verifier: Arc<Verifier>,
    inbox: MailboxReceiver<ShardMessage>,
) {
    let executor = glommio::executor();
    let connection_queue =
        executor.create_task_queue(Shares::default(), Latency::NotImportant, "connections");
    // The mailbox task sits in a latency-sensitive queue: a wake from the
    // router then preempts a busy shard at its next task boundary.
    let mailbox_queue = executor.create_task_queue(
        Shares::default(),
        Latency::Matters(config.limits.handoff_latency),
        "mailbox",
    );

    let shard = Rc::new(Shard {
        index,
        shard_count: config.shards,
        verifier,
        users: RefCell::new(AHashMap::new()),
        connections: Cell::new(0),
        echo_connections: Cell::new(0),
        next_conn: Cell::new(0),
        counters: Counters::default(),
        read_buf: RefCell::new(vec![0; READ_BUFFER]),
        encode_buf: RefCell::new(Vec::new()),
        reply_buf: RefCell::new(Vec::new()),
        connection_queue,
        config,
    });
    tracing::info!(
        shard = index,
        executor = glommio::executor().id(),
        "shard started"
    );

    let sweeper = shard.clone();
    let housekeeping = glommio::spawn_local_into(
        async move { sweeper.housekeeping().await },
        connection_queue,
    );
    if let Ok(task) = housekeeping {
        task.detach();
    }

    let receiver = shard.clone();
    let mailbox = glommio::spawn_local_into(
        async move {
            while let Some(message) = inbox.recv().await {
                receiver.handle(message);
            }
        },
        mailbox_queue,
    );
    match mailbox {
        Ok(task) => task.await,
        Err(err) => tracing::error!(shard = index, cause = %err, "cannot start mailbox task"),
    }
    tracing::info!(shard = index, "shard stopped");
}

impl Shard {
    fn handle(self: &Rc<Self>, message: ShardMessage) {
        match message {
            ShardMessage::Upgrade(handoff) => self.adopt(*handoff),
            ShardMessage::Command { command, reply } => {
                let answer = self.command(command);
                // The router may have given up waiting; nothing to do then.
                let _ = reply.try_send(answer);
            }
            ShardMessage::Stats { reply } => {
                let _ = reply.try_send(self.stats());
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

    /// Finishes a hand-off: refuses it (late, shard full, user full) or
    /// answers 101 and starts the connection's task.
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
        let open = self.connections.get() + self.echo_connections.get();
        if open >= limits.max_connections_per_shard {
            bump(&self.counters.refused_shard_cap, 1);
            tracing::warn!(
                target: "audit",
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
            tracing::warn!(
                target: "audit",
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

        // Adopt the socket into this executor.
        // SAFETY: the descriptor comes from an OwnedFd that is consumed here,
        // so this stream becomes its only owner.
        let stream = unsafe { TcpStream::from_raw_fd(handoff.socket.into_raw_fd()) };
        let id = self.next_conn.get() * self.shard_count as u64 + self.index as u64;
        self.next_conn.set(self.next_conn.get() + 1);
        let handle = ConnectionHandle::new(id, user, handoff.claims.exp, handoff.claims.iat);

        // The 101 answer, then (on /ws) the welcome frame, leave together.
        let mut head = Vec::with_capacity(160);
        crate::ws::handshake::write_switching_protocols(
            &mut head,
            &handoff.accept_key,
            handoff.subprotocol,
        );
        handle.outbox.borrow_mut().push_raw(&head);
        match handoff.endpoint {
            Endpoint::Protocol => {
                if let Err(err) = self.attach(&handle) {
                    tracing::error!(shard = self.index, cause = %err, "attach refused");
                    return;
                }
                self.connections.set(self.connections.get() + 1);
            }
            Endpoint::Echo => self.echo_connections.set(self.echo_connections.get() + 1),
        }
        tracing::debug!(shard = self.index, user, conn = id, endpoint = ?handoff.endpoint, "connection open");

        let connection =
            Connection::new(self.clone(), handle, handoff.endpoint, handoff.accepted_at);
        let task = glommio::spawn_local_into(
            connection.run(stream, handoff.early_bytes),
            self.connection_queue,
        );
        match task {
            Ok(task) => {
                task.detach();
            }
            Err(err) => {
                tracing::error!(shard = self.index, cause = %err, "cannot spawn connection")
            }
        };
    }

    /// Adds a connection to its user's manager, creating the manager (and a
    /// new epoch) for a user's first connection, and queues the welcome.
    fn attach(&self, handle: &Rc<ConnectionHandle>) -> Result<(), user::IsolationViolation> {
        let mut users = self.users.borrow_mut();
        let manager = match users.get_mut(&*handle.user) {
            Some(manager) => manager,
            None => {
                let manager = UserManager::new(&handle.user);
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

    /// Called by a connection's task as it ends.
    pub fn connection_closed(&self, endpoint: Endpoint) {
        match endpoint {
            Endpoint::Protocol => self.connections.set(self.connections.get() - 1),
            Endpoint::Echo => self.echo_connections.set(self.echo_connections.get() - 1),
        }
    }

    /// Queues one frame for the connection itself. A full outbox means the
    /// client does not read its replies: it is a slow consumer.
    pub fn reply_frame(
        &self,
        handle: &ConnectionHandle,
        opcode: OpCode,
        payload: &[u8],
    ) -> ControlFlow<Ending> {
        let pushed = handle
            .outbox
            .borrow_mut()
            .push(opcode, payload, self.outbox_limits());
        if pushed.is_err() {
            bump(&self.counters.slow_consumers, 1);
            tracing::warn!(
                target: "audit",
                event = "slow_consumer",
                user = %handle.user,
                conn = handle.id,
                "replies not read; closing with 4008"
            );
            return ControlFlow::Break(Ending::Close(4008, "slow consumer"));
        }
        ControlFlow::Continue(())
    }

    /// Queues an `error` frame for the connection itself.
    pub fn reply_error(
        &self,
        handle: &ConnectionHandle,
        code: &str,
        id: Option<&RawValue>,
        detail: &str,
    ) -> ControlFlow<Ending> {
        let mut reply = self.reply_buf.borrow_mut();
        reply.clear();
        protocol::write_error(&mut reply, code, id, detail);
        self.reply_frame(handle, OpCode::Text, &reply)
    }

    /// A client `send`: deliver to the user's other connections, ack.
    pub fn client_send(
        &self,
        handle: &ConnectionHandle,
        id: &RawValue,
        data: &RawValue,
    ) -> ControlFlow<Ending> {
        let delivery = {
            let mut users = self.users.borrow_mut();
            let Some(manager) = users.get_mut(&*handle.user) else {
                // Only a connection already on its way out has no manager.
                return ControlFlow::Continue(());
            };
            let mut encode = self.encode_buf.borrow_mut();
            manager.send_from(handle, data, self.outbox_limits(), &mut encode)
        };
        let delivery = match delivery {
            Ok(delivery) => delivery,
            Err(_) => {
                bump(&self.counters.isolation_violations, 1);
                return ControlFlow::Break(Ending::Close(1011, "internal error"));
            }
        };
        bump(&self.counters.messages_delivered, delivery.delivered as u64);
        bump(
            &self.counters.slow_consumers,
            delivery.slow_consumers as u64,
        );

        let mut reply = self.reply_buf.borrow_mut();
        reply.clear();
        protocol::write_ack(&mut reply, id, delivery.epoch, delivery.seq);
        self.reply_frame(handle, OpCode::Text, &reply)
    }

    /// A backend command for one user of this shard.
    fn command(&self, command: Command) -> CommandReply {
        let mut users = self.users.borrow_mut();
        match command {
            Command::Publish { user, data } => {
                let Some(manager) = users.get_mut(user.as_str()) else {
                    return CommandReply::Published {
                        delivered: 0,
                        sequence: None,
                    };
                };
                let mut encode = self.encode_buf.borrow_mut();
                let delivery = manager.publish(&data, self.outbox_limits(), &mut encode);
                bump(&self.counters.messages_delivered, delivery.delivered as u64);
                bump(
                    &self.counters.slow_consumers,
                    delivery.slow_consumers as u64,
                );
                CommandReply::Published {
                    delivered: delivery.delivered,
                    sequence: Some((delivery.epoch, delivery.seq)),
                }
            }
            Command::Presence { user } => CommandReply::Presence {
                connections: users.get(user.as_str()).map_or(0, UserManager::len),
            },
            Command::Disconnect { user } => {
                let closed = match users.remove(user.as_str()) {
                    Some(mut manager) => manager.close_all(4003, "disconnected by the server"),
                    None => 0,
                };
                if closed > 0 {
                    tracing::info!(
                        shard = self.index,
                        user,
                        closed,
                        "user disconnected by the API"
                    );
                }
                CommandReply::Disconnected { closed }
            }
        }
    }

    fn stats(&self) -> ShardStats {
        let users = self.users.borrow();
        let counters = &self.counters;
        let mut cumulative = 0;
        let handoff_latency_us = LATENCY_BUCKETS_US
            .iter()
            .zip(&counters.handoff_latency)
            .map(|(&bound, count)| {
                cumulative += count.get();
                (bound, cumulative)
            })
            .collect();
        ShardStats {
            shard: self.index,
            users: users.len(),
            connections: self.connections.get(),
            echo_connections: self.echo_connections.get(),
            queued_messages: users.values().map(UserManager::queued_frames).sum(),
            handoffs: counters.handoffs.get(),
            messages_received: counters.messages_received.get(),
            messages_delivered: counters.messages_delivered.get(),
            refused_user_cap: counters.refused_user_cap.get(),
            refused_shard_cap: counters.refused_shard_cap.get(),
            refused_late: counters.refused_late.get(),
            protocol_errors: counters.protocol_errors.get(),
            slow_consumers: counters.slow_consumers.get(),
            isolation_violations: counters.isolation_violations.get(),
            handoff_latency_us,
            handoff_latency_sum_us: counters.handoff_latency_sum_us.get(),
        }
    }

    /// Records the time from accept to the 101 leaving the shard.
    pub fn record_handoff_latency(&self, elapsed: Duration) {
        let micros = elapsed.as_micros().min(u128::from(u64::MAX)) as u64;
        let bucket = LATENCY_BUCKETS_US
            .iter()
            .position(|&bound| micros <= bound)
            .unwrap_or(LATENCY_BUCKETS_US.len() - 1);
        bump(&self.counters.handoff_latency[bucket], 1);
        bump(&self.counters.handoff_latency_sum_us, micros);
    }

    /// Once a second: closes connections whose token has expired (4001).
    async fn housekeeping(self: Rc<Self>) {
        let leeway = self.config.limits.jwt_leeway_secs;
        loop {
            glommio::timer::sleep(Duration::from_secs(1)).await;
            let now = auth::now_secs();
            let mut expired = Vec::new();
            {
                let users = self.users.borrow();
                for manager in users.values() {
                    for conn in manager.connections() {
                        if conn.expires_at.get().saturating_add(leeway) < now {
                            expired.push(conn.clone());
                        }
                    }
                }
            }
            for conn in expired {
                tracing::debug!(
                    user = %conn.user,
                    conn = conn.id,
                    "token expired on an open connection; closing with 4001"
                );
                conn.request_close(4001, "token expired");
            }
        }
    }
}

/// Answers a refused hand-off with a plain HTTP status and closes the socket.
/// The socket is fresh, so its send buffer has room for these few bytes; a
/// non-blocking send that fails only means the client left already.
fn refuse(socket: OwnedFd, status: u16, headers: &[(&str, &str)]) {
    let mut answer = Vec::with_capacity(160);
    crate::http::write_response(&mut answer, status, headers, "text/plain", b"", false);
    // SAFETY: the descriptor is owned by `socket` for the whole call and the
    // buffer is valid for `answer.len()` bytes.
    unsafe {
        libc::send(
            socket.as_raw_fd(),
            answer.as_ptr().cast(),
            answer.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        );
        libc::shutdown(socket.as_raw_fd(), libc::SHUT_WR);
    }
}
