//! shardgate: a sharded, thread-per-core WebSocket server with per-user
//! isolation.
//!
//! A request travels through the crate in this order:
//!
//! - [`router`] accepts TCP connections, reads the HTTP request head under a
//!   deadline, answers plain HTTP (health, metrics, the backend API) and, for
//!   a WebSocket upgrade, verifies the JWT ([`auth`]) and hands the socket to
//!   the owning shard ([`placement`] picks it).
//! - [`shard`] runs one single-threaded glommio executor per core. It owns
//!   every user hashed to it, each in its own [`shard::user::UserManager`],
//!   and every socket of those users. Nothing a shard owns is reachable from
//!   another thread; the router talks to it only through [`mailbox`].
//! - [`ws`] is the RFC 6455 layer: the frame codec and the handshake answer.
//! - [`http`] parses request heads and writes plain HTTP answers.
//! - [`config`] holds every limit and timeout, read-only once the server runs.
//! - [`system`] checks and raises the process limits glommio needs.
//! - [`server`] wires the pieces together and runs until shutdown;
//!   [`executors`] starts the executor threads, tells it when each serves,
//!   and keeps them awake.

pub mod audit;
pub mod auth;
pub mod config;
pub mod executors;
pub mod http;
pub mod mailbox;
pub mod metrics;
pub mod placement;
pub mod router;
pub mod server;
pub mod shard;
pub mod system;
pub mod ws;
