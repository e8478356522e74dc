//! What crosses from the router to a shard, and back.
//!
//! Everything here is moved, never shared: a socket descriptor with the bytes
//! already read and the verified claims, or a backend command with a mailbox
//! for the answer.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::time::Instant;

use serde_json::value::RawValue;

use crate::auth::Claims;
use crate::mailbox::MailboxSender;

/// A message for one shard.
pub enum ShardMessage {
    /// A verified WebSocket upgrade to finish and run.
    Upgrade(Box<Handoff>),
    /// A backend API command about one user of this shard.
    Command {
        command: Command,
        reply: MailboxSender<CommandReply>,
    },
    /// A request for this shard's counters, for `/metrics`.
    Stats { reply: MailboxSender<ShardStats> },
    /// Drain queued messages, close every connection with 1001, stop.
    Shutdown,
}

/// Which WebSocket endpoint the client asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/ws`: the shardgate protocol.
    Protocol,
    /// `/ws/echo`: every data message goes back unchanged.
    Echo,
}

/// A socket whose upgrade request the router has read and whose token it has
/// verified. The shard writes the 101 answer (or a refusal) itself.
pub struct Handoff {
    /// The client socket. Dropping the hand-off closes it.
    pub socket: OwnedFd,
    pub peer: SocketAddr,
    pub endpoint: Endpoint,
    /// Claims of the verified token; `sub` is the user id.
    pub claims: Claims,
    /// `Sec-WebSocket-Accept` value for the 101 answer (RFC 6455 §4.2.2).
    pub accept_key: String,
    /// Subprotocol the 101 selects, if the client offered ours.
    pub subprotocol: Option<&'static str>,
    /// Bytes the client sent after its request head (early frames).
    pub early_bytes: Vec<u8>,
    /// When the router accepted the socket.
    pub accepted_at: Instant,
    /// When the handshake must be done; queueing counts against it.
    pub deadline: Instant,
}

/// A backend command, already validated by the router.
pub enum Command {
    Publish {
        user: String,
        data: Box<RawValue>,
    },
    Presence {
        user: String,
    },
    Disconnect {
        user: String,
    },
    /// Close the user's connections whose token has `iat` before
    /// `issued_before` and refuse such tokens from then on.
    Revoke {
        user: String,
        issued_before: u64,
    },
}

/// A shard's answer to a [`Command`].
#[derive(Debug, PartialEq, Eq)]
pub enum CommandReply {
    /// `sequence` is `(epoch, seq)`, absent when the user had no connection.
    Published {
        delivered: usize,
        sequence: Option<(u64, u64)>,
    },
    Presence {
        connections: usize,
    },
    Disconnected {
        closed: usize,
    },
    Revoked {
        closed: usize,
    },
    /// The shard is shutting down and takes no new work.
    Unavailable,
    /// Handling the command failed (a panic, caught); nothing is known to
    /// have been delivered.
    Failed,
}

/// Counters of one shard, gathered for `/metrics`.
#[derive(Debug, Default, Clone)]
pub struct ShardStats {
    pub shard: usize,
    pub users: usize,
    pub connections: usize,
    pub echo_connections: usize,
    /// Messages queued in outboxes and not yet written.
    pub queued_messages: usize,
    pub handoffs: u64,
    pub messages_received: u64,
    pub messages_delivered: u64,
    pub refused_user_cap: u64,
    pub refused_shard_cap: u64,
    pub refused_late: u64,
    pub refused_revoked: u64,
    pub refused_draining: u64,
    pub bad_messages: u64,
    pub forbidden: u64,
    pub rate_limited: u64,
    pub abuse_closes: u64,
    pub pong_timeouts: u64,
    pub expired: u64,
    pub panics: u64,
    pub protocol_errors: u64,
    pub slow_consumers: u64,
    pub isolation_violations: u64,
    /// Accept-to-101 latency histogram: bucket upper bounds in µs, counts.
    pub handoff_latency_us: Vec<(u64, u64)>,
    pub handoff_latency_sum_us: u64,
}
