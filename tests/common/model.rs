//! The reference model of the isolation suite, its exact-delivery checker,
//! and the randomized driver that runs both against the real server.
//!
//! * [`Rng`] is a seeded SplitMix64 generator: one seed gives one operation
//!   list, on every machine.
//! * [`generate`] turns a seed into operations on users: connect, close,
//!   reset, reconnect, client `send` (plain, naming its own user, or with an
//!   escaped own user id), `send`/`ping` naming another user (forged),
//!   `ping`, API publish and API disconnect.
//! * [`run`] executes a list over real sockets with several worker threads;
//!   each user belongs to exactly one worker, which executes that user's
//!   operations one after the other (each one finished before the next:
//!   ack, API answer, welcome or close answer received), so the order of a
//!   user's messages is defined by the list while different users' operations
//!   overlap in time.
//! * The model predicts, for each connection, the exact frames it must
//!   receive: welcome, ack, message, error, pong and close, with epoch and
//!   sequence numbers it computes itself. The only thing it learns from the
//!   server is a user's epoch, from the welcome of the first connection the
//!   user opens while it had none (epochs are random); sequence numbers,
//!   recipients, delivery counts and order are never read from the server.
//! * [`check`] compares expected and received frames per connection and
//!   names every missing, extra, foreign (another user's) and reordered
//!   frame. It is pure, and tested on its own.
//! * The run ends with a barrier: a sentinel published through the API to
//!   every user with open connections must be the next frame on each of
//!   them; then every connection is closed.

use std::fmt;
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use tungstenite::client::IntoClientRequest;
use tungstenite::http::HeaderValue;
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{HandshakeError, Message, WebSocket};

use super::probe::set_linger_zero;
use super::{API_KEY, HttpConn, IO_TIMEOUT, Server, api_on, token};

// ---------------------------------------------------------------------------
// Seeds and the generator
// ---------------------------------------------------------------------------

/// SplitMix64 (Steele, Lea and Flood 2014): small, fast, and every seed
/// gives a full-period sequence.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n` > 0), without modulo bias worth the name.
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "below(0)");
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

/// The seed of a randomized test: `SHARDGATE_SEED` (decimal or `0x` hex)
/// when set, else a fresh one from the clock and the process id.
pub fn seed_from_env() -> u64 {
    match std::env::var("SHARDGATE_SEED") {
        Ok(text) => {
            let text = text.trim();
            let parsed = match text.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => text.parse(),
            };
            parsed.unwrap_or_else(|_| panic!("SHARDGATE_SEED={text:?} is not a u64"))
        }
        Err(_) => {
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            Rng::new(nanos ^ (u64::from(std::process::id()) << 32)).next_u64()
        }
    }
}

/// A numeric setting from the environment, or `default`.
pub fn env_usize(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(text) => text
            .trim()
            .replace('_', "")
            .parse()
            .unwrap_or_else(|_| panic!("{name}={text:?} is not a number")),
        Err(_) => default,
    }
}

/// What one operation does (before the model adapts it to the user's state,
/// see [`Op`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// Open a new `/ws` connection as the user.
    Connect,
    /// Close one connection with a Close handshake (code 1000).
    Close,
    /// Reset one connection (`SO_LINGER` 0, then close: a TCP RST).
    Reset,
    /// Close one connection and open a new one (a reloaded tab).
    Reconnect,
    /// Client `send` from one connection.
    Send,
    /// A frame naming another user in `user_id` (forged): `forbidden`.
    Forged,
    /// JSON `ping`: answered by a `pong`.
    Ping,
    /// `POST /api/v1/publish` to the user.
    Publish,
    /// `POST /api/v1/disconnect` of the user.
    Disconnect,
}

/// One generated operation. The model adapts it to the user's state, the
/// same way on every run: an operation on a connection of a user with none
/// opens one instead, and a connect beyond the model's per-user cap sends
/// instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Op {
    /// Index of the user in the run's user list.
    pub user: usize,
    pub kind: OpKind,
    /// Chooses the connection (modulo the open ones).
    pub slot: u32,
    /// Chooses the variant (frame shape, victim, padding).
    pub arg: u32,
}

/// Operation weights of the randomized churn test.
pub const CHURN: &[(OpKind, u32)] = &[
    (OpKind::Connect, 14),
    (OpKind::Close, 6),
    (OpKind::Reset, 4),
    (OpKind::Reconnect, 5),
    (OpKind::Send, 32),
    (OpKind::Forged, 8),
    (OpKind::Ping, 4),
    (OpKind::Publish, 24),
    (OpKind::Disconnect, 3),
];

/// Operation weights of steady traffic (no connection changes).
pub const TRAFFIC: &[(OpKind, u32)] = &[
    (OpKind::Send, 50),
    (OpKind::Publish, 35),
    (OpKind::Forged, 10),
    (OpKind::Ping, 5),
];

/// `count` operations on `users` users, drawn from `mix`.
pub fn generate(seed: u64, users: usize, count: usize, mix: &[(OpKind, u32)]) -> Vec<Op> {
    assert!(users > 1, "the forged operations need two users at least");
    let total: u32 = mix.iter().map(|(_, w)| w).sum();
    let mut rng = Rng::new(seed);
    (0..count)
        .map(|_| {
            let user = rng.below(users as u64) as usize;
            let mut pick = rng.below(u64::from(total)) as u32;
            let mut kind = mix[0].0;
            for &(k, weight) in mix {
                if pick < weight {
                    kind = k;
                    break;
                }
                pick -= weight;
            }
            Op {
                user,
                kind,
                slot: rng.next_u64() as u32,
                arg: rng.next_u64() as u32,
            }
        })
        .collect()
}

/// A load profile: every user connects `conns` times (users interleaved),
/// then `traffic` operations drawn from [`TRAFFIC`].
pub fn generate_load(seed: u64, users: usize, conns: usize, traffic: usize) -> Vec<Op> {
    let mut ops = Vec::with_capacity(users * conns + traffic);
    for _ in 0..conns {
        for user in 0..users {
            ops.push(Op {
                user,
                kind: OpKind::Connect,
                slot: 0,
                arg: 0,
            });
        }
    }
    ops.extend(generate(seed, users, traffic, TRAFFIC));
    ops
}

/// The user ids of a run: `prefix` followed by a number, in groups of five
/// lookalikes that are all different users because ids are exact bytes:
/// `p0`, `P0` (case), `p0 ` (trailing space), `p\u{e9}3` (NFC) and
/// `pe\u{301}3` (NFD).
pub fn user_names(prefix: &str, count: usize) -> Vec<String> {
    let upper = prefix.to_uppercase();
    assert_ne!(upper, prefix, "the prefix needs a lower-case letter");
    (0..count)
        .map(|i| match i % 5 {
            0 => format!("{prefix}{i}"),
            1 => format!("{upper}{}", i - 1),
            2 => format!("{prefix}{} ", i - 2),
            3 => format!("{prefix}\u{e9}{i}"),
            _ => format!("{prefix}e\u{301}{}", i - 1),
        })
        .collect()
}

// ---------------------------------------------------------------------------
// The checker
// ---------------------------------------------------------------------------

/// In an expected frame, a value that matches anything but `null` (the
/// `conn` of a welcome, the `detail` of an error: not predicted).
pub const ANY: &str = "\u{0}any";

/// The frames one connection (or one user's API answers) was expected to
/// get and actually got.
#[derive(Debug, Clone, Default)]
pub struct ConnLog {
    /// The user the connection belongs to.
    pub owner: String,
    /// A name for reports, e.g. `"u7"#3`.
    pub label: String,
    pub expected: Vec<Value>,
    pub actual: Vec<Value>,
    /// How many frames have been compared already (incremental checks).
    pub checked: usize,
}

impl ConnLog {
    pub fn new(owner: &str, label: String) -> ConnLog {
        ConnLog {
            owner: owner.to_owned(),
            label,
            ..ConnLog::default()
        }
    }

    /// Compares the frames not compared yet, in order; the first difference
    /// is described.
    pub fn verify_prefix(&mut self) -> Result<(), String> {
        let common = self.expected.len().min(self.actual.len());
        for i in self.checked..common {
            if !matches(&self.expected[i], &self.actual[i]) {
                return Err(format!(
                    "{} frame {i}: expected {} got {}",
                    self.label,
                    show(&self.expected[i]),
                    self.actual[i]
                ));
            }
        }
        self.checked = common;
        if self.actual.len() > self.expected.len() {
            return Err(format!(
                "{} frame {}: unexpected {}",
                self.label,
                self.expected.len(),
                self.actual[self.expected.len()]
            ));
        }
        Ok(())
    }
}

/// What is wrong with one frame of one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Problem {
    /// Expected and never received.
    Missing,
    /// Received, not expected, and of the connection's own user.
    Extra,
    /// Received and naming another user: a leak.
    Foreign,
    /// Received and expected, but after a frame that had to follow it.
    Reordered,
}

/// One finding of [`check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discrepancy {
    pub label: String,
    pub problem: Problem,
    pub detail: String,
}

impl fmt::Display for Discrepancy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} on {}: {}", self.problem, self.label, self.detail)
    }
}

/// Whether `actual` is the frame `expected` describes: equal JSON, with
/// [`ANY`] matching any non-null value.
pub fn matches(expected: &Value, actual: &Value) -> bool {
    match (expected, actual) {
        (Value::String(s), a) if s == ANY => !a.is_null(),
        (Value::Object(e), Value::Object(a)) => {
            e.len() == a.len()
                && e.iter()
                    .all(|(k, ev)| a.get(k).is_some_and(|av| matches(ev, av)))
        }
        (Value::Array(e), Value::Array(a)) => {
            e.len() == a.len() && e.iter().zip(a).all(|(ev, av)| matches(ev, av))
        }
        (e, a) => e == a,
    }
}

fn show(expected: &Value) -> String {
    expected.to_string().replace("\"\\u0000any\"", "*")
}

/// The user a frame names, if any: a welcome's `user`, or the `u` or
/// `sentinel` field of the data the model sends.
pub fn frame_user(frame: &Value) -> Option<&str> {
    if frame["type"] == "welcome" {
        return frame["user"].as_str();
    }
    let data = &frame["data"];
    data["u"].as_str().or_else(|| data["sentinel"].as_str())
}

/// Compares every log: nothing missing, nothing extra, nothing foreign,
/// order kept. Empty when all is exact.
pub fn check(logs: &[ConnLog]) -> Vec<Discrepancy> {
    logs.iter().flat_map(check_one).collect()
}

/// [`check`] for one connection.
pub fn check_one(log: &ConnLog) -> Vec<Discrepancy> {
    let mut found = Vec::new();
    let mut used = vec![false; log.expected.len()];
    // (index in actual, index in expected) of every matched frame.
    let mut pairs = Vec::new();
    for (ai, frame) in log.actual.iter().enumerate() {
        let hit =
            (0..log.expected.len()).find(|&ei| !used[ei] && matches(&log.expected[ei], frame));
        match hit {
            Some(ei) => {
                used[ei] = true;
                pairs.push((ai, ei));
            }
            None => {
                let foreign = frame_user(frame).filter(|u| *u != log.owner);
                let (problem, detail) = match foreign {
                    Some(other) => (
                        Problem::Foreign,
                        format!("frame {ai} belongs to user {other:?}: {frame}"),
                    ),
                    None => (Problem::Extra, format!("frame {ai} not expected: {frame}")),
                };
                found.push(Discrepancy {
                    label: log.label.clone(),
                    problem,
                    detail,
                });
            }
        }
    }
    for (ei, expected) in log.expected.iter().enumerate() {
        if !used[ei] {
            found.push(Discrepancy {
                label: log.label.clone(),
                problem: Problem::Missing,
                detail: format!("expected frame {ei} never arrived: {}", show(expected)),
            });
        }
    }
    let mut latest: Option<usize> = None;
    for &(ai, ei) in &pairs {
        match latest {
            Some(before) if ei < before => found.push(Discrepancy {
                label: log.label.clone(),
                problem: Problem::Reordered,
                detail: format!(
                    "frame {ai} ({}) arrived after expected frame {before}, which must follow it",
                    log.actual[ai]
                ),
            }),
            _ => latest = Some(ei),
        }
    }
    found
}

// ---------------------------------------------------------------------------
// A WebSocket client that reports instead of panicking
// ---------------------------------------------------------------------------

/// What [`Ws::read`] got.
#[derive(Debug)]
pub enum Got {
    /// A data or Close frame, as JSON: text frames parsed (or
    /// `{"invalid_json": text}`), binary as `{"binary": len}`, Close as
    /// `{"close": code}`.
    Frame(Value),
    /// Nothing within the wait.
    Quiet,
    /// The connection ended (EOF, reset, or an error).
    Ended(String),
}

/// A `/ws` client connection over blocking sockets with bounded reads.
pub struct Ws {
    ws: WebSocket<TcpStream>,
}

impl Ws {
    /// Upgrades `path` with `token` in the `Authorization` header.
    pub fn connect(addr: SocketAddr, path: &str, token: &str) -> Result<Ws, String> {
        let stream =
            TcpStream::connect_timeout(&addr, IO_TIMEOUT).map_err(|e| format!("connect: {e}"))?;
        stream
            .set_read_timeout(Some(IO_TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(IO_TIMEOUT)))
            .and_then(|()| stream.set_nodelay(true))
            .map_err(|e| format!("socket options: {e}"))?;
        let mut request = format!("ws://{addr}{path}")
            .into_client_request()
            .map_err(|e| format!("request: {e}"))?;
        let bearer = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|e| format!("header: {e}"))?;
        request.headers_mut().insert("Authorization", bearer);
        match tungstenite::client::client(request, stream) {
            Ok((ws, _)) => Ok(Ws { ws }),
            Err(HandshakeError::Failure(tungstenite::Error::Http(response))) => {
                Err(format!("upgrade refused with HTTP {}", response.status()))
            }
            Err(HandshakeError::Failure(err)) => Err(format!("upgrade failed: {err}")),
            Err(HandshakeError::Interrupted(_)) => Err("upgrade timed out".to_owned()),
        }
    }

    /// Connects as `user` and returns the first frame (the welcome).
    pub fn connect_user(addr: SocketAddr, user: &str) -> Result<(Ws, Value), String> {
        let mut ws = Ws::connect(addr, "/ws", &token(user))?;
        match ws.read(IO_TIMEOUT) {
            Got::Frame(welcome) => Ok((ws, welcome)),
            Got::Quiet => Err(format!("no welcome within {IO_TIMEOUT:?}")),
            Got::Ended(err) => Err(format!("ended before the welcome: {err}")),
        }
    }

    pub fn send_text(&mut self, text: &str) -> Result<(), String> {
        self.ws
            .send(Message::text(text))
            .map_err(|e| format!("send: {e}"))
    }

    pub fn send_json(&mut self, value: &Value) -> Result<(), String> {
        self.send_text(&value.to_string())
    }

    /// Queues a text frame without flushing (for pipelined senders); the
    /// next [`Ws::flush`], send or read writes it.
    pub fn queue_json(&mut self, value: &Value) -> Result<(), String> {
        self.ws
            .write(Message::text(value.to_string()))
            .map_err(|e| format!("write: {e}"))
    }

    pub fn flush(&mut self) -> Result<(), String> {
        self.ws.flush().map_err(|e| format!("flush: {e}"))
    }

    /// The next data or Close frame within `wait` (pings and pongs are
    /// skipped; tungstenite answers pings and Close frames itself).
    pub fn read(&mut self, wait: Duration) -> Got {
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Got::Quiet;
            }
            if let Err(err) = self.ws.get_mut().set_read_timeout(Some(left)) {
                return Got::Ended(format!("set timeout: {err}"));
            }
            match self.ws.read() {
                Ok(Message::Text(text)) => {
                    let value = serde_json::from_str(text.as_str())
                        .unwrap_or_else(|_| json!({ "invalid_json": text.as_str() }));
                    return Got::Frame(value);
                }
                Ok(Message::Binary(bytes)) => return Got::Frame(json!({ "binary": bytes.len() })),
                Ok(Message::Close(frame)) => {
                    let code = frame.map_or(1005, |f| u16::from(f.code));
                    // Sends tungstenite's answering Close.
                    let _ = self.ws.flush();
                    return Got::Frame(json!({ "close": code }));
                }
                Ok(_) => continue,
                Err(err) if is_timeout(&err) => continue,
                Err(err) => return Got::Ended(err.to_string()),
            }
        }
    }

    /// Every frame that arrives within `wait` of the previous one.
    pub fn drain(&mut self, wait: Duration) -> Vec<Value> {
        let mut frames = Vec::new();
        while let Got::Frame(frame) = self.read(wait) {
            frames.push(frame);
        }
        frames
    }

    /// Sends a Close with `code` and reads up to the server's answering
    /// Close: returns every frame read, the answer (`{"close": c}`) last.
    pub fn close(&mut self, code: u16) -> Result<Vec<Value>, String> {
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: "".into(),
        };
        self.ws
            .close(Some(frame))
            .map_err(|e| format!("send close: {e}"))?;
        let mut frames = Vec::new();
        loop {
            match self.read(IO_TIMEOUT) {
                Got::Frame(frame) => {
                    let done = frame.get("close").is_some();
                    frames.push(frame);
                    if done {
                        self.finish();
                        return Ok(frames);
                    }
                }
                Got::Quiet => return Err(format!("no close answer within {IO_TIMEOUT:?}")),
                Got::Ended(err) => return Err(format!("ended before the close answer: {err}")),
            }
        }
    }

    /// Reads until the server ends the TCP connection (bounded).
    pub fn finish(&mut self) {
        let deadline = Instant::now() + IO_TIMEOUT;
        while Instant::now() < deadline {
            if let Got::Ended(_) = self.read(Duration::from_millis(200)) {
                return;
            }
        }
    }

    /// Ends the connection with a TCP reset, as a crashed client would.
    pub fn reset(self) {
        set_linger_zero(self.ws.get_ref());
        drop(self);
    }

    /// The socket, e.g. for raw writes before a reset.
    pub fn stream(&mut self) -> &mut TcpStream {
        self.ws.get_mut()
    }
}

fn is_timeout(err: &tungstenite::Error) -> bool {
    matches!(
        err,
        tungstenite::Error::Io(e)
            if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)
    )
}

/// A JSON string literal of `text` with every character written as a
/// `\uXXXX` escape (surrogate pairs beyond the BMP): the same string for
/// any JSON parser, different bytes on the wire.
pub fn escaped_json_string(text: &str) -> String {
    let mut out = String::from("\"");
    for unit in text.encode_utf16() {
        out.push_str(&format!("\\u{unit:04x}"));
    }
    out.push('"');
    out
}

// ---------------------------------------------------------------------------
// The driver
// ---------------------------------------------------------------------------

/// Settings of one [`run`].
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Number of users (their ids come from [`user_names`]).
    pub users: usize,
    /// Worker threads; user `i` belongs to worker `i % workers`.
    pub workers: usize,
    /// Prefix of the user ids (needs a lower-case letter).
    pub prefix: String,
    /// Most connections the model opens per user (below the server's cap).
    pub max_conns_per_user: usize,
    /// How long an expected frame may take to arrive.
    pub frame_wait: Duration,
    /// The whole run must finish within this; beyond it, it fails.
    pub time_bound: Duration,
    /// Close every connection at the end (after the barrier).
    pub close_at_end: bool,
}

impl RunConfig {
    pub fn new(users: usize, workers: usize, prefix: &str) -> RunConfig {
        RunConfig {
            users,
            workers,
            prefix: prefix.to_owned(),
            max_conns_per_user: 4,
            frame_wait: Duration::from_secs(5),
            time_bound: Duration::from_secs(120),
            close_at_end: true,
        }
    }
}

/// Why a run failed.
#[derive(Debug, Clone)]
pub struct Failure {
    /// Index (in the operation list) of the operation that went wrong, when
    /// one did; `None` when the end-of-run check found the problem.
    pub op: Option<usize>,
    pub message: String,
    /// The run stopped at its time bound (no wrong frame was seen).
    pub timed_out: bool,
}

/// What a [`run`] did and found.
#[derive(Debug, Default)]
pub struct RunReport {
    /// Operations executed (barrier and closing not counted).
    pub ops_done: usize,
    /// Wall time from the start until the last worker finished its
    /// operations (barrier and closing not included).
    pub op_time: Duration,
    /// Frames compared, over every connection and API answer.
    pub frames_checked: usize,
    /// Connections opened.
    pub connections_opened: usize,
    /// The largest number of connections open at once (sampled).
    pub peak_open: usize,
    /// Every log, for the report.
    pub logs: Vec<ConnLog>,
    /// The first failure, if any.
    pub failure: Option<Failure>,
}

impl RunReport {
    pub fn ops_per_sec(&self) -> f64 {
        self.ops_done as f64 / self.op_time.as_secs_f64().max(1e-9)
    }
}

/// One user as the model sees it.
struct UserModel {
    /// The epoch while the user has connections.
    epoch: Option<u64>,
    /// The epoch before the current one, which a new manager must not reuse.
    last_epoch: Option<u64>,
    /// The last sequence number assigned in the current epoch.
    seq: u64,
    /// Open connections, oldest first.
    conns: Vec<OpenConn>,
    /// Index of the log of this user's API answers.
    api_log: usize,
    /// Connections opened so far (for labels).
    opened: usize,
}

struct OpenConn {
    ws: Ws,
    log: usize,
}

/// Counters shared by the workers.
struct Shared {
    stop: AtomicBool,
    open: AtomicUsize,
    peak: AtomicUsize,
}

impl Shared {
    fn opened(&self) {
        let now = self.open.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak.fetch_max(now, Ordering::Relaxed);
    }

    fn closed(&self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }
}

struct Worker {
    addr: SocketAddr,
    api: HttpConn,
    names: Arc<Vec<String>>,
    config: RunConfig,
    users: Vec<(usize, UserModel)>,
    logs: Vec<ConnLog>,
    shared: Arc<Shared>,
    opened: usize,
}

struct WorkerOut {
    logs: Vec<ConnLog>,
    ops_done: usize,
    /// When this worker finished its operations (before the barrier).
    ops_ended: Instant,
    opened: usize,
    failure: Option<Failure>,
}

impl Worker {
    fn user(&mut self, index: usize) -> &mut UserModel {
        let at = self
            .users
            .iter()
            .position(|(i, _)| *i == index)
            .expect("the user belongs to this worker");
        &mut self.users[at].1
    }

    /// The operation the model executes for `op` in the user's state.
    fn effective(&mut self, op: &Op) -> OpKind {
        let cap = self.config.max_conns_per_user;
        let open = self.user(op.user).conns.len();
        match op.kind {
            OpKind::Connect if open >= cap => OpKind::Send,
            OpKind::Close
            | OpKind::Reset
            | OpKind::Reconnect
            | OpKind::Send
            | OpKind::Forged
            | OpKind::Ping
                if open == 0 =>
            {
                OpKind::Connect
            }
            kind => kind,
        }
    }

    fn apply(&mut self, index: usize, op: &Op) -> Result<(), String> {
        let kind = self.effective(op);
        let result = match kind {
            OpKind::Connect => self.connect(op.user),
            OpKind::Close => self.close(op.user, op.slot),
            OpKind::Reset => self.reset(op.user, op.slot),
            OpKind::Reconnect => self
                .close(op.user, op.slot)
                .and_then(|()| self.connect(op.user)),
            OpKind::Send => self.send(index, op),
            OpKind::Forged => self.forged(index, op),
            OpKind::Ping => self.ping(index, op),
            OpKind::Publish => {
                self.publish(op.user, publish_data(&self.names[op.user], index, op.arg))
            }
            OpKind::Disconnect => self.disconnect(op.user),
        };
        result.map_err(|err| format!("op #{index} {kind:?} (generated as {op:?}): {err}"))
    }

    fn new_log(&mut self, owner: &str, label: String) -> usize {
        self.logs.push(ConnLog::new(owner, label));
        self.logs.len() - 1
    }

    fn connect(&mut self, user: usize) -> Result<(), String> {
        let addr = self.addr;
        let name = self.names[user].clone();
        let serial = {
            let model = self.user(user);
            model.opened += 1;
            model.opened
        };
        let log = self.new_log(&name, format!("{name:?}#{serial}"));
        let (ws, welcome) =
            Ws::connect_user(addr, &name).map_err(|e| format!("connect {name:?}: {e}"))?;
        self.shared.opened();
        self.opened += 1;
        self.logs[log].actual.push(welcome.clone());
        let model = self.user(user);
        let epoch = match model.epoch {
            Some(epoch) => epoch,
            None => {
                // The only value the model takes from the server: a new
                // manager's random epoch. It must be new, and valid.
                let learned = welcome["epoch"]
                    .as_u64()
                    .filter(|e| *e > 0 && *e < (1 << 53));
                match learned {
                    Some(epoch) if Some(epoch) != model.last_epoch => {
                        model.epoch = Some(epoch);
                        model.seq = 0;
                        epoch
                    }
                    _ => {
                        return Err(format!(
                            "the first connection of {name:?} after it had none must start \
                             a new epoch (previous {:?}): {welcome}",
                            model.last_epoch
                        ));
                    }
                }
            }
        };
        let expected = json!({
            "type": "welcome", "user": name, "conn": ANY, "epoch": epoch, "seq": model.seq,
        });
        model.conns.push(OpenConn { ws, log });
        self.logs[log].expected.push(expected);
        self.logs[log].verify_prefix()
    }

    /// Reads on every open connection of `user` until it has received as
    /// many frames as expected, then compares them.
    fn settle(&mut self, user: usize) -> Result<(), String> {
        let wait = self.config.frame_wait;
        let at = self
            .users
            .iter()
            .position(|(i, _)| *i == user)
            .expect("own user");
        let model = &mut self.users[at].1;
        for conn in &mut model.conns {
            let log = &mut self.logs[conn.log];
            while log.actual.len() < log.expected.len() {
                match conn.ws.read(wait) {
                    Got::Frame(frame) => log.actual.push(frame),
                    Got::Quiet => {
                        return Err(format!(
                            "{}: expected {} within {wait:?}, nothing arrived",
                            log.label,
                            show(&log.expected[log.actual.len()])
                        ));
                    }
                    Got::Ended(err) => {
                        return Err(format!(
                            "{}: connection ended while expecting {}: {err}",
                            log.label,
                            show(&log.expected[log.actual.len()])
                        ));
                    }
                }
            }
            log.verify_prefix()?;
        }
        Ok(())
    }

    fn close(&mut self, user: usize, slot: u32) -> Result<(), String> {
        let model = self.user(user);
        let at = slot as usize % model.conns.len();
        let mut conn = model.conns.remove(at);
        if model.conns.is_empty() {
            model.last_epoch = model.epoch.take();
        }
        let frames = conn.ws.close(1000);
        self.shared.closed();
        let log = &mut self.logs[conn.log];
        log.expected.push(json!({ "close": 1000 }));
        log.actual
            .extend(frames.map_err(|e| format!("{}: {e}", log.label))?);
        log.verify_prefix()
    }

    fn reset(&mut self, user: usize, slot: u32) -> Result<(), String> {
        let name = self.names[user].clone();
        let model = self.user(user);
        let at = slot as usize % model.conns.len();
        let conn = model.conns.remove(at);
        let remaining = model.conns.len() as u64;
        if model.conns.is_empty() {
            model.last_epoch = model.epoch.take();
        }
        conn.ws.reset();
        self.shared.closed();
        // A reset has no answer: wait until the server has let the
        // connection go, so that the user's next operations are ordered
        // after it (bounded).
        let deadline = Instant::now() + IO_TIMEOUT;
        loop {
            let (status, answer) = api_on(
                &mut self.api,
                "/api/v1/presence",
                &json!({ "user": name }),
                Some(API_KEY),
            );
            if status != 200 {
                return Err(format!("presence {status}: {answer}"));
            }
            if answer["connections"] == remaining {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "after a reset, {name:?} should have {remaining} connections; presence \
                     says {answer}"
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn send(&mut self, index: usize, op: &Op) -> Result<(), String> {
        let name = self.names[op.user].clone();
        let id = message_id(index);
        let pad = "\u{3b1}x".repeat(op.arg as usize % 40);
        let data = json!({ "u": name, "op": index, "k": "send", "pad": pad });
        let text = match op.arg % 3 {
            0 => json!({ "type": "send", "id": id, "data": data }).to_string(),
            // The own user id is ignored, also when escaped on the wire.
            1 => json!({ "type": "send", "id": id, "data": data, "user_id": name }).to_string(),
            _ => format!(
                r#"{{"user_id":{},"type":"send","id":{id},"data":{data}}}"#,
                escaped_json_string(&name)
            ),
        };
        let model = self.user(op.user);
        let sender = op.slot as usize % model.conns.len();
        model.seq += 1;
        let (epoch, seq) = (model.epoch.expect("open user"), model.seq);
        let targets: Vec<(usize, bool)> = model
            .conns
            .iter()
            .enumerate()
            .map(|(i, c)| (c.log, i == sender))
            .collect();
        for (log, is_sender) in targets {
            let frame = if is_sender {
                json!({ "type": "ack", "id": id, "epoch": epoch, "seq": seq })
            } else {
                json!({
                    "type": "message", "epoch": epoch, "seq": seq, "source": "client", "data": data,
                })
            };
            self.logs[log].expected.push(frame);
        }
        self.user(op.user).conns[sender].ws.send_text(&text)?;
        self.settle(op.user)
    }

    fn forged(&mut self, index: usize, op: &Op) -> Result<(), String> {
        let users = self.names.len();
        let victim_index = (op.user + 1 + op.arg as usize % (users - 1)) % users;
        let name = self.names[op.user].clone();
        let victim = self.names[victim_index].clone();
        let id = message_id(index);
        let data = json!({ "u": name, "op": index, "k": "forged", "victim": victim });
        let text = match op.arg % 4 {
            0 => json!({ "type": "send", "id": id, "data": data, "user_id": victim }).to_string(),
            1 => json!({ "type": "ping", "id": id, "user_id": victim }).to_string(),
            // The victim's id escaped on the wire is still the victim.
            2 => format!(
                r#"{{"type":"send","id":{id},"data":{data},"user_id":{}}}"#,
                escaped_json_string(&victim)
            ),
            // Own id first, the victim's hidden behind it.
            _ => format!(
                r#"{{"type":"send","id":{id},"data":{data},"user_id":{},"user_id":{}}}"#,
                json!(name),
                json!(victim)
            ),
        };
        let model = self.user(op.user);
        let sender = op.slot as usize % model.conns.len();
        let log = model.conns[sender].log;
        self.logs[log].expected.push(json!({
            "type": "error", "code": "forbidden", "id": id, "detail": ANY,
        }));
        self.user(op.user).conns[sender].ws.send_text(&text)?;
        self.settle(op.user)
    }

    fn ping(&mut self, index: usize, op: &Op) -> Result<(), String> {
        let id = message_id(index);
        let model = self.user(op.user);
        let at = op.slot as usize % model.conns.len();
        let log = model.conns[at].log;
        self.logs[log]
            .expected
            .push(json!({ "type": "pong", "id": id }));
        self.user(op.user).conns[at]
            .ws
            .send_json(&json!({ "type": "ping", "id": id }))?;
        self.settle(op.user)
    }

    fn publish(&mut self, user: usize, data: Value) -> Result<(), String> {
        let name = self.names[user].clone();
        let model = self.user(user);
        let open = model.conns.len();
        let reply = if open == 0 {
            json!({ "delivered": 0 })
        } else {
            model.seq += 1;
            json!({ "delivered": open, "epoch": model.epoch, "seq": model.seq })
        };
        let message = json!({
            "type": "message", "epoch": model.epoch, "seq": model.seq, "source": "server",
            "data": data,
        });
        let api_log = model.api_log;
        let logs: Vec<usize> = model.conns.iter().map(|c| c.log).collect();
        for log in logs {
            self.logs[log].expected.push(message.clone());
        }
        self.logs[api_log].expected.push(reply);
        let (status, answer) = api_on(
            &mut self.api,
            "/api/v1/publish",
            &json!({ "user": name, "data": data }),
            Some(API_KEY),
        );
        self.logs[api_log].actual.push(if status == 200 {
            answer
        } else {
            json!({ "status": status, "body": answer })
        });
        self.logs[api_log].verify_prefix()?;
        self.settle(user)
    }

    fn disconnect(&mut self, user: usize) -> Result<(), String> {
        let name = self.names[user].clone();
        let model = self.user(user);
        let open = model.conns.len();
        let api_log = model.api_log;
        let logs: Vec<usize> = model.conns.iter().map(|c| c.log).collect();
        for log in logs {
            self.logs[log].expected.push(json!({ "close": 4003 }));
        }
        self.logs[api_log].expected.push(json!({ "closed": open }));
        let (status, answer) = api_on(
            &mut self.api,
            "/api/v1/disconnect",
            &json!({ "user": name }),
            Some(API_KEY),
        );
        self.logs[api_log].actual.push(if status == 200 {
            answer
        } else {
            json!({ "status": status, "body": answer })
        });
        self.logs[api_log].verify_prefix()?;
        self.settle(user)?;
        let model = self.user(user);
        let conns: Vec<OpenConn> = model.conns.drain(..).collect();
        model.last_epoch = model.epoch.take();
        for mut conn in conns {
            conn.ws.finish();
            self.shared.closed();
        }
        Ok(())
    }

    /// The barrier: a sentinel to every user with open connections, which
    /// must be the next frame everywhere; then anything else that arrives
    /// at once is recorded too (and is an extra frame).
    fn barrier(&mut self, tag: &str) -> Result<(), String> {
        let open: Vec<usize> = self
            .users
            .iter()
            .filter(|(_, m)| !m.conns.is_empty())
            .map(|(i, _)| *i)
            .collect();
        for user in open {
            let data = json!({ "sentinel": self.names[user], "barrier": tag });
            self.publish(user, data)?;
            let at = self
                .users
                .iter()
                .position(|(i, _)| *i == user)
                .expect("own user");
            for conn in &mut self.users[at].1.conns {
                let extra = conn.ws.drain(Duration::from_millis(2));
                self.logs[conn.log].actual.extend(extra);
            }
            let logs: Vec<usize> = self.user(user).conns.iter().map(|c| c.log).collect();
            for log in logs {
                self.logs[log].verify_prefix()?;
            }
        }
        Ok(())
    }

    fn close_all(&mut self) -> Result<(), String> {
        let indices: Vec<usize> = self.users.iter().map(|(i, _)| *i).collect();
        for user in indices {
            while !self.user(user).conns.is_empty() {
                self.close(user, 0)?;
            }
        }
        Ok(())
    }

    fn run(mut self, ops: &[Op]) -> WorkerOut {
        let deadline = Instant::now() + self.config.time_bound;
        let mut ops_done = 0;
        let mut failure = None;
        let mine: Vec<usize> = (0..ops.len()).filter(|&i| self.owns(ops[i].user)).collect();
        for index in mine {
            if self.shared.stop.load(Ordering::Relaxed) {
                break;
            }
            if Instant::now() >= deadline {
                failure = Some(Failure {
                    op: Some(index),
                    message: format!(
                        "time bound of {:?} reached before op #{index}",
                        self.config.time_bound
                    ),
                    timed_out: true,
                });
                break;
            }
            if let Err(message) = self.apply(index, &ops[index]) {
                failure = Some(Failure {
                    op: Some(index),
                    message,
                    timed_out: false,
                });
                break;
            }
            ops_done += 1;
        }
        let ops_ended = Instant::now();
        if failure.is_none() && !self.shared.stop.load(Ordering::Relaxed) {
            if let Err(message) = self.barrier("end") {
                failure = Some(Failure {
                    op: None,
                    message: format!("barrier: {message}"),
                    timed_out: false,
                });
            } else if self.config.close_at_end
                && let Err(message) = self.close_all()
            {
                failure = Some(Failure {
                    op: None,
                    message: format!("closing: {message}"),
                    timed_out: false,
                });
            }
        }
        if failure.is_some() {
            self.shared.stop.store(true, Ordering::Relaxed);
        }
        WorkerOut {
            logs: self.logs,
            ops_done,
            ops_ended,
            opened: self.opened,
            failure,
        }
    }

    fn owns(&self, user: usize) -> bool {
        self.users.iter().any(|(i, _)| *i == user)
    }
}

fn message_id(index: usize) -> Value {
    if index.is_multiple_of(2) {
        json!(index)
    } else {
        json!(format!("m{index}"))
    }
}

fn publish_data(name: &str, index: usize, arg: u32) -> Value {
    let pad = "p\u{1f600}".repeat(arg as usize % 30);
    json!({ "u": name, "op": index, "k": "pub", "pad": pad })
}

/// Executes `ops` against `server` as described in the module
/// documentation, then checks every connection's frames.
pub fn run(server: &Server, ops: &[Op], config: &RunConfig) -> RunReport {
    let names = Arc::new(user_names(&config.prefix, config.users));
    assert!(
        ops.iter().all(|op| op.user < config.users),
        "operation on an unknown user"
    );
    let ops: Arc<Vec<Op>> = Arc::new(ops.to_vec());
    let shared = Arc::new(Shared {
        stop: AtomicBool::new(false),
        open: AtomicUsize::new(0),
        peak: AtomicUsize::new(0),
    });
    let started = Instant::now();
    let mut handles = Vec::new();
    for w in 0..config.workers {
        let mut logs = Vec::new();
        let users: Vec<(usize, UserModel)> = (0..config.users)
            .filter(|u| u % config.workers == w)
            .map(|u| {
                let name = names[u].clone();
                logs.push(ConnLog::new(&name, format!("{name:?} API answers")));
                let model = UserModel {
                    epoch: None,
                    last_epoch: None,
                    seq: 0,
                    conns: Vec::new(),
                    api_log: logs.len() - 1,
                    opened: 0,
                };
                (u, model)
            })
            .collect();
        let worker = Worker {
            addr: server.addr(),
            api: HttpConn::open(server.api_addr()),
            names: names.clone(),
            config: config.clone(),
            users,
            logs,
            shared: shared.clone(),
            opened: 0,
        };
        let ops = ops.clone();
        let handle = std::thread::Builder::new()
            .name(format!("model-worker-{w}"))
            .spawn(move || worker.run(&ops))
            .expect("spawn a worker");
        handles.push(handle);
    }

    let mut report = RunReport::default();
    let mut failures = Vec::new();
    let mut ops_ended = started;
    for (w, handle) in handles.into_iter().enumerate() {
        match handle.join() {
            Ok(out) => {
                report.ops_done += out.ops_done;
                ops_ended = ops_ended.max(out.ops_ended);
                report.connections_opened += out.opened;
                report.logs.extend(out.logs);
                if let Some(failure) = out.failure {
                    failures.push(failure);
                }
            }
            Err(panic) => {
                let text = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_default();
                shared.stop.store(true, Ordering::Relaxed);
                failures.push(Failure {
                    op: None,
                    message: format!("worker {w} panicked: {text}"),
                    timed_out: false,
                });
            }
        }
    }
    report.op_time = ops_ended - started;
    report.peak_open = shared.peak.load(Ordering::Relaxed);
    report.frames_checked = report.logs.iter().map(|l| l.actual.len()).sum();

    // The first failure in operation order is the one to shrink.
    failures.sort_by_key(|f| f.op.unwrap_or(usize::MAX));
    report.failure = failures.into_iter().next();
    if report.failure.is_none() {
        let found = check(&report.logs);
        if !found.is_empty() {
            let shown: Vec<String> = found.iter().take(20).map(ToString::to_string).collect();
            report.failure = Some(Failure {
                op: None,
                message: format!(
                    "{} discrepancies, first ones:\n  {}",
                    found.len(),
                    shown.join("\n  ")
                ),
                timed_out: false,
            });
        }
    }
    report
}

/// Looks for the shortest prefix of `ops` that still fails, by bisection
/// between 0 and the first failing operation (each try on a fresh server
/// from `start`), within `max_runs` runs and `budget` (each try is bounded
/// by what is left of it). Returns the prefix length and its failure, or
/// `None` when the failure did not reproduce in time.
pub fn shrink(
    start: &dyn Fn() -> Server,
    ops: &[Op],
    config: &RunConfig,
    failing: usize,
    max_runs: usize,
    budget: Duration,
) -> Option<(usize, Failure)> {
    let began = Instant::now();
    // `Some(Some(f))`: failed; `Some(None)`: passed; `None`: out of time.
    let attempt = |len: usize| -> Option<Option<Failure>> {
        let left = budget.saturating_sub(began.elapsed());
        if left.is_zero() {
            return None;
        }
        let mut bounded = config.clone();
        bounded.time_bound = bounded.time_bound.min(left);
        let server = start();
        match run(&server, &ops[..len], &bounded).failure {
            Some(failure) if failure.timed_out => None,
            outcome => Some(outcome),
        }
    };
    let mut hi = failing.clamp(1, ops.len());
    let mut best = (hi, attempt(hi)??);
    let mut lo = 0;
    let mut runs = 1;
    while hi - lo > 1 && runs < max_runs {
        let mid = lo + (hi - lo) / 2;
        runs += 1;
        match attempt(mid) {
            Some(Some(failure)) => {
                hi = mid;
                best = (mid, failure);
            }
            Some(None) => lo = mid,
            None => break,
        }
    }
    Some(best)
}
