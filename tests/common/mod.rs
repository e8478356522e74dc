//! Shared harness of the integration tests: starts the real `shardgate`
//! binary on loopback port 0 and talks to it over real sockets, with
//! tungstenite WebSocket clients and a small hand-written HTTP/1.1 client.
//!
//! Every blocking read has a timeout, every wait polls under a deadline, and
//! the child process is killed and reaped when its [`Server`] is dropped.

#![allow(dead_code)]

use std::ffi::OsString;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tungstenite::client::IntoClientRequest;
use tungstenite::handshake::client::Response;
use tungstenite::http::HeaderValue;
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Message, WebSocket};

/// The HS256 secret every test server gets (at least 32 bytes).
pub const SECRET: &str = "shardgate-integration-tests-hs256-secret-0123456789";
/// The API key every test server gets unless the test removes it.
pub const API_KEY: &str = "integration-test-api-key-4f9c2a71";
/// Read and write timeout of every socket the tests open.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a server may take to print its listening line.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a poll for some state (presence, metrics, log) may take.
pub const POLL_TIMEOUT: Duration = Duration::from_secs(5);

/// A well-formed `Sec-WebSocket-Key` (the RFC 6455 sample nonce).
const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

// ---------------------------------------------------------------------------
// The server process
// ---------------------------------------------------------------------------

/// How to start a server; see [`Server::builder`].
pub struct ServerBuilder {
    shards: u16,
    args: Vec<OsString>,
    env: Vec<(String, Option<String>)>,
    pinned: bool,
    descriptor_limit: Option<u64>,
}

impl ServerBuilder {
    /// Starts the child with RLIMIT_NOFILE (soft and hard) set to `limit`,
    /// to drive it out of file descriptors.
    pub fn descriptor_limit(mut self, limit: u64) -> Self {
        self.descriptor_limit = Some(limit);
        self
    }

    /// Shard count (`--shards`); 2 unless set.
    pub fn shards(mut self, shards: u16) -> Self {
        self.shards = shards;
        self
    }

    /// One more command-line argument after `serve`.
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Several more command-line arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets an environment variable of the child (overrides the defaults).
    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.to_owned(), Some(value.to_owned())));
        self
    }

    /// Removes an environment variable from the child, e.g. the API key.
    pub fn env_remove(mut self, name: &str) -> Self {
        self.env.push((name.to_owned(), None));
        self
    }

    /// Keeps the shards pinned to CPUs. By default the tests pass `--no-pin`,
    /// so that the servers of tests running in parallel share the cores.
    pub fn pinned(mut self) -> Self {
        self.pinned = true;
        self
    }

    /// Spawns the binary and waits (bounded) until it listens.
    pub fn start(self) -> Server {
        let expects_api_line = self.args.iter().any(|a| a == "--api-listen");

        let mut command = Command::new(env!("CARGO_BIN_EXE_shardgate"));
        command
            .arg("serve")
            .args(["--listen", "127.0.0.1:0", "--shards"])
            .arg(self.shards.to_string());
        if !self.pinned {
            command.arg("--no-pin");
        }
        command
            .args(&self.args)
            .env("SHARDGATE_JWT_SECRET", SECRET)
            .env("SHARDGATE_API_KEY", API_KEY)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (name, value) in &self.env {
            match value {
                Some(value) => command.env(name, value),
                None => command.env_remove(name),
            };
        }

        if let Some(limit) = self.descriptor_limit {
            use std::os::unix::process::CommandExt;
            // SAFETY: the hook runs in the forked child before exec and only
            // calls setrlimit, which is async-signal-safe.
            unsafe {
                command.pre_exec(move || {
                    let rlimit = libc::rlimit {
                        rlim_cur: limit,
                        rlim_max: limit,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &rlimit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = command.spawn().expect("cannot spawn the shardgate binary");
        let stdout_pipe = child.stdout.take().expect("piped stdout");
        let stderr_pipe = child.stderr.take().expect("piped stderr");
        let mut server = Server {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            api_addr: None,
            stdout: Arc::new(Mutex::new(String::new())),
            stderr: Arc::new(Mutex::new(Vec::new())),
            readers: Vec::new(),
            stopped: false,
        };

        // Drain both pipes for the child's whole life, so that it never
        // blocks on a full pipe; stdout lines also go to the start-up wait.
        let (lines_tx, lines_rx) = mpsc::channel::<String>();
        let stdout = server.stdout.clone();
        server.readers.push(std::thread::spawn(move || {
            for line in BufReader::new(stdout_pipe).lines() {
                let Ok(line) = line else { break };
                let mut all = stdout.lock().unwrap_or_else(|e| e.into_inner());
                all.push_str(&line);
                all.push('\n');
                drop(all);
                let _ = lines_tx.send(line);
            }
        }));
        let stderr = server.stderr.clone();
        server.readers.push(std::thread::spawn(move || {
            let mut pipe = stderr_pipe;
            let mut chunk = [0u8; 8192];
            loop {
                match pipe.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => stderr
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .extend_from_slice(&chunk[..n]),
                }
            }
        }));

        let deadline = Instant::now() + START_TIMEOUT;
        let mut listen = None;
        let mut api = None;
        while listen.is_none() || (expects_api_line && api.is_none()) {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match lines_rx.recv_timeout(left) {
                Ok(line) => line,
                Err(err) => panic!(
                    "server did not report its address ({err}); stderr:\n{}",
                    server.log()
                ),
            };
            if let Some(rest) = line.strip_prefix("shardgate listening on http://") {
                listen = Some(rest.trim().parse().expect("listen address"));
            } else if let Some(rest) = line.strip_prefix("shardgate api listening on http://") {
                api = Some(rest.trim().parse().expect("api address"));
            }
        }
        server.addr = listen.expect("listen address");
        server.api_addr = api;
        server
    }
}

/// A running `shardgate serve` child process.
pub struct Server {
    child: Child,
    addr: SocketAddr,
    api_addr: Option<SocketAddr>,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    readers: Vec<JoinHandle<()>>,
    stopped: bool,
}

impl Server {
    /// A builder with 2 shards, the test secret and the test API key.
    pub fn builder() -> ServerBuilder {
        ServerBuilder {
            shards: 2,
            args: Vec::new(),
            env: Vec::new(),
            pinned: false,
            descriptor_limit: None,
        }
    }

    /// The public address (WebSocket upgrades, health, and the API unless
    /// `--api-listen` was given).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address serving the API: the private one when configured.
    pub fn api_addr(&self) -> SocketAddr {
        self.api_addr.unwrap_or(self.addr)
    }

    /// The private API address, if `--api-listen` was given.
    pub fn private_addr(&self) -> Option<SocketAddr> {
        self.api_addr
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the server wrote to stderr (its log) so far.
    pub fn log(&self) -> String {
        let bytes = self.stderr.lock().unwrap_or_else(|e| e.into_inner());
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Everything the server wrote to stdout so far.
    pub fn stdout(&self) -> String {
        self.stdout
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Polls the log until it contains `needle`; false at the deadline.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        poll(timeout, || self.log().contains(needle))
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) to this child, by its pid.
    pub fn signal(&self, signal: i32) {
        let pid = i32::try_from(self.child.id()).expect("pid fits in pid_t");
        // SAFETY: kill(2) on the pid of a child we spawned and have not
        // reaped yet, so the pid cannot have been reused.
        let result = unsafe { libc::kill(pid, signal) };
        assert_eq!(result, 0, "kill({pid}, {signal}) failed");
    }

    /// Polls until the child exits; its status, or `None` at the deadline.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let mut status = None;
        poll(timeout, || {
            status = self.child.try_wait().expect("try_wait");
            status.is_some()
        });
        status
    }

    /// Kills the server, waits for it and for the pipe readers, and returns
    /// its complete log.
    pub fn stop(mut self) -> String {
        self.shutdown();
        self.log()
    }

    fn shutdown(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        // Child::kill signals exactly this child's pid.
        let _ = self.child.kill();
        let _ = self.child.wait();
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown();
        if std::thread::panicking() {
            // A failing test shows what the server saw; the tail is enough
            // and keeps the CI output readable.
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
            eprintln!(
                "--- last {} lines of the server's log (pid {}) ---\n{}\n--- end of log ---",
                tail.len(),
                self.child.id(),
                tail.join("\n")
            );
        }
    }
}

/// How many lines of the server's log a failing test prints.
const LOG_TAIL_LINES: usize = 60;

/// Calls `check` until it returns true or `timeout` passes (10 ms apart).
pub fn poll(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------------------
// Tokens
// ---------------------------------------------------------------------------

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// Standard claims for `sub`: issued now, valid for an hour.
pub fn claims(sub: &str) -> Value {
    let now = now();
    json!({ "sub": sub, "iat": now, "exp": now + 3600 })
}

/// The HS256 key of the test secret.
pub fn hs_key() -> EncodingKey {
    EncodingKey::from_secret(SECRET.as_bytes()).expect("HMAC key")
}

/// A valid HS256 token for `sub`, signed with the test secret.
pub fn token(sub: &str) -> String {
    token_with(&claims(sub), Algorithm::HS256, &hs_key())
}

/// A token with exactly these claims, signed with `alg` and `key`.
pub fn token_with(claims: &Value, alg: Algorithm, key: &EncodingKey) -> String {
    jsonwebtoken::encode(&Header::new(alg), claims, key).expect("sign a token")
}

/// An unsigned token (`alg` none), built by hand since no library signs it.
pub fn unsigned_token(claims: &Value) -> String {
    let header = b64url(br#"{"alg":"none","typ":"JWT"}"#);
    let payload = b64url(claims.to_string().as_bytes());
    format!("{header}.{payload}.")
}

/// Unpadded base64url (RFC 4648 §5).
pub fn b64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let chars = chunk.len() + 1;
        for i in 0..chars {
            out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

/// The path of a file in `tests/fixtures`.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
        .join(name)
}

/// The signing key of a fixture private key (PKCS#8 PEM) for `alg`.
pub fn fixture_key(alg: Algorithm, name: &str) -> EncodingKey {
    let pem = std::fs::read(fixture(name)).expect("read a fixture key");
    let key = match alg {
        Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512 => EncodingKey::from_rsa_pem(&pem),
        Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(&pem),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem),
        other => panic!("no fixture key for {other:?}"),
    };
    key.expect("parse a fixture key")
}

// ---------------------------------------------------------------------------
// WebSocket clients
// ---------------------------------------------------------------------------

/// Where a client puts its token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carrier {
    /// `Authorization: Bearer <jwt>`.
    Header,
    /// `?token=<jwt>`.
    Query,
    /// `Sec-WebSocket-Protocol: shardgate.v1, bearer.<jwt>`.
    Subprotocol,
}

pub const CARRIERS: [Carrier; 3] = [Carrier::Header, Carrier::Query, Carrier::Subprotocol];

/// A connected WebSocket client with bounded reads.
pub struct Client {
    ws: WebSocket<TcpStream>,
    /// The server's 101 answer.
    pub response: Response,
}

/// Connects to `/ws` with `token` in the `Authorization` header.
pub fn ws_connect(server: &Server, token: &str) -> Client {
    ws_connect_via(server, "/ws", Carrier::Header, token)
}

/// Connects to `path` with `token` in `carrier`; panics if refused.
pub fn ws_connect_via(server: &Server, path: &str, carrier: Carrier, token: &str) -> Client {
    try_ws_connect(server.addr(), path, carrier, token)
        .unwrap_or_else(|err| panic!("WebSocket upgrade to {path} via {carrier:?} failed: {err}"))
}

/// Connects a new `/ws` client of `user` and returns it with its welcome.
pub fn connect_user(server: &Server, user: &str) -> (Client, Value) {
    let mut client = ws_connect(server, &token(user));
    let welcome = client.recv_json();
    assert_eq!(welcome["type"], "welcome", "first frame: {welcome}");
    assert_eq!(welcome["user"], user, "welcome: {welcome}");
    (client, welcome)
}

/// Connects `count` clients of `user` and returns them (welcomes consumed)
/// with the epoch they all reported.
pub fn connect_many(server: &Server, user: &str, count: usize) -> (Vec<Client>, u64) {
    let mut clients = Vec::with_capacity(count);
    let mut epoch = None;
    for _ in 0..count {
        let (client, welcome) = connect_user(server, user);
        let this = welcome["epoch"].as_u64().expect("numeric epoch");
        assert_eq!(*epoch.get_or_insert(this), this, "one epoch per user");
        clients.push(client);
    }
    (clients, epoch.expect("at least one client"))
}

/// Attempts an upgrade; the error describes the refusal.
pub fn try_ws_connect(
    addr: SocketAddr,
    path: &str,
    carrier: Carrier,
    token: &str,
) -> Result<Client, String> {
    let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT).map_err(|e| e.to_string())?;
    stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    stream.set_write_timeout(Some(IO_TIMEOUT)).expect("timeout");
    stream.set_nodelay(true).expect("nodelay");

    let uri = match carrier {
        Carrier::Query => {
            let sep = if path.contains('?') { '&' } else { '?' };
            format!("ws://{addr}{path}{sep}token={token}")
        }
        _ => format!("ws://{addr}{path}"),
    };
    let mut request = uri.into_client_request().map_err(|e| e.to_string())?;
    let headers = request.headers_mut();
    match carrier {
        Carrier::Header => {
            let value = HeaderValue::from_str(&format!("Bearer {token}")).expect("header");
            headers.insert("Authorization", value);
        }
        Carrier::Subprotocol => {
            let value =
                HeaderValue::from_str(&format!("shardgate.v1, bearer.{token}")).expect("header");
            headers.insert("Sec-WebSocket-Protocol", value);
        }
        Carrier::Query => {}
    }

    match tungstenite::client::client(request, stream) {
        Ok((ws, response)) => Ok(Client { ws, response }),
        Err(tungstenite::HandshakeError::Failure(err)) => Err(describe_ws_error(&err)),
        Err(tungstenite::HandshakeError::Interrupted(_)) => Err("handshake timed out".to_owned()),
    }
}

fn describe_ws_error(err: &tungstenite::Error) -> String {
    match err {
        tungstenite::Error::Http(response) => format!(
            "HTTP {} {:?}",
            response.status(),
            response
                .body()
                .as_deref()
                .map(String::from_utf8_lossy)
                .unwrap_or_default()
        ),
        other => other.to_string(),
    }
}

fn is_timeout(err: &tungstenite::Error) -> bool {
    matches!(
        err,
        tungstenite::Error::Io(e)
            if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
    )
}

impl Client {
    /// The next message of any kind, or `None` when nothing arrives within
    /// `timeout`. Errors other than a timeout are returned.
    pub fn try_recv(&mut self, timeout: Duration) -> Result<Option<Message>, tungstenite::Error> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            self.ws
                .get_mut()
                .set_read_timeout(Some(left))
                .expect("set timeout");
            match self.ws.read() {
                Ok(message) => return Ok(Some(message)),
                Err(err) if is_timeout(&err) => continue,
                Err(err) => return Err(err),
            }
        }
    }

    /// The next message of any kind; fails the test after [`IO_TIMEOUT`].
    pub fn recv(&mut self) -> Message {
        match self.try_recv(IO_TIMEOUT) {
            Ok(Some(message)) => message,
            Ok(None) => panic!("no message within {IO_TIMEOUT:?}"),
            Err(err) => panic!("read failed: {}", describe_ws_error(&err)),
        }
    }

    /// The next data message, skipping pings and pongs; panics on a close.
    pub fn recv_data(&mut self) -> Message {
        let deadline = Instant::now() + IO_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.try_recv(left) {
                Ok(Some(Message::Ping(_) | Message::Pong(_))) => continue,
                Ok(Some(Message::Close(frame))) => panic!("expected data, got close {frame:?}"),
                Ok(Some(message)) => return message,
                Ok(None) => panic!("no data message within {IO_TIMEOUT:?}"),
                Err(err) => panic!("read failed: {}", describe_ws_error(&err)),
            }
        }
    }

    /// The next text message as JSON; fails the test on timeout, close,
    /// binary data or text that is not JSON.
    pub fn recv_json(&mut self) -> Value {
        match self.recv_data() {
            Message::Text(text) => serde_json::from_str(text.as_str())
                .unwrap_or_else(|e| panic!("server sent invalid JSON {text:?}: {e}")),
            other => panic!("expected a text frame, got {other:?}"),
        }
    }

    /// The next JSON frame, which must have `"type": kind`.
    pub fn recv_type(&mut self, kind: &str) -> Value {
        let frame = self.recv_json();
        assert_eq!(frame["type"], kind, "unexpected frame: {frame}");
        frame
    }

    pub fn send(&mut self, message: Message) {
        self.ws.send(message).expect("WebSocket send");
    }

    pub fn send_text(&mut self, text: &str) {
        self.send(Message::text(text));
    }

    pub fn send_json(&mut self, value: &Value) {
        self.send_text(&value.to_string());
    }

    /// Sends `{"type":"send","id":id,"data":data}`.
    pub fn send_data(&mut self, id: &Value, data: &Value) {
        self.send_json(&json!({ "type": "send", "id": id, "data": data }));
    }

    /// Sends a JSON ping and checks the exact pong: proves the connection
    /// is open and served, and that nothing was queued before the pong.
    pub fn ping_pong(&mut self, id: u64) {
        self.send_json(&json!({ "type": "ping", "id": id }));
        assert_eq!(self.recv_json(), json!({ "type": "pong", "id": id }));
    }

    /// Asserts that no data frame arrives within `quiet` (keep it short).
    pub fn expect_silence(&mut self, quiet: Duration) {
        let deadline = Instant::now() + quiet;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.try_recv(left) {
                Ok(None) => return,
                Ok(Some(Message::Ping(_) | Message::Pong(_))) => continue,
                Ok(Some(message)) => panic!("expected silence, got {message:?}"),
                Err(err) => panic!("expected silence, got {}", describe_ws_error(&err)),
            }
        }
    }

    /// Waits for the server's Close frame, asserts its code, then waits for
    /// the end of the TCP connection (tungstenite answers the Close).
    /// Returns the reason. Data frames before the Close fail the test.
    pub fn expect_close(&mut self, code: u16) -> String {
        self.expect_close_within(code, IO_TIMEOUT)
    }

    /// [`Client::expect_close`] with a custom wait.
    pub fn expect_close_within(&mut self, code: u16, wait: Duration) -> String {
        let deadline = Instant::now() + wait;
        let reason = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.try_recv(left) {
                Ok(Some(Message::Close(Some(frame)))) => {
                    assert_eq!(u16::from(frame.code), code, "close frame {frame:?}");
                    break frame.reason.as_str().to_owned();
                }
                Ok(Some(Message::Close(None))) => panic!("close without a code, wanted {code}"),
                Ok(Some(Message::Ping(_) | Message::Pong(_))) => continue,
                Ok(Some(message)) => panic!("expected close {code}, got {message:?}"),
                Ok(None) => panic!("no close {code} within {wait:?}"),
                Err(err) => panic!("expected close {code}, got {}", describe_ws_error(&err)),
            }
        };
        self.await_end();
        reason
    }

    /// Sends a Close with `code` and returns the code of the server's
    /// answering Close, once the TCP connection has ended.
    pub fn close(&mut self, code: u16) -> u16 {
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: "bye".into(),
        };
        self.ws.close(Some(frame)).expect("send close");
        let deadline = Instant::now() + IO_TIMEOUT;
        let answer = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.try_recv(left) {
                Ok(Some(Message::Close(frame))) => break frame.map_or(1005, |f| f.code.into()),
                Ok(Some(_)) => continue,
                Ok(None) => panic!("no close answer within {IO_TIMEOUT:?}"),
                Err(err) => panic!("no close answer: {}", describe_ws_error(&err)),
            }
        };
        self.await_end();
        answer
    }

    /// Reads until the connection ends (bounded): flushes our Close reply.
    fn await_end(&mut self) {
        let deadline = Instant::now() + IO_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.try_recv(left) {
                Ok(None) => panic!("connection not closed within {IO_TIMEOUT:?}"),
                Ok(Some(_)) => continue,
                Err(_) => return,
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Raw HTTP
// ---------------------------------------------------------------------------

/// A parsed HTTP response.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON (`null` when empty, a string when not JSON).
    pub fn json(&self) -> Value {
        if self.body.is_empty() {
            return Value::Null;
        }
        serde_json::from_slice(&self.body).unwrap_or_else(|_| Value::String(self.text()))
    }
}

/// One HTTP/1.1 client connection (keep-alive capable).
pub struct HttpConn {
    stream: TcpStream,
    /// Bytes read and not yet consumed by a response.
    buf: Vec<u8>,
}

impl HttpConn {
    pub fn open(addr: SocketAddr) -> HttpConn {
        let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT).expect("connect");
        stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
        stream.set_write_timeout(Some(IO_TIMEOUT)).expect("timeout");
        stream.set_nodelay(true).expect("nodelay");
        HttpConn {
            stream,
            buf: Vec::new(),
        }
    }

    /// Writes raw bytes.
    pub fn write(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write request");
    }

    /// Writes a request with `Host` and `Content-Length` (when there is a
    /// body or the method is POST) and reads the answer.
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> HttpResponse {
        self.write(&request_bytes(method, path, headers, body));
        self.read_response()
    }

    /// Reads one response: the head, then `Content-Length` bytes, or up to
    /// the end of the connection when there is no length (101: no body).
    pub fn read_response(&mut self) -> HttpResponse {
        let deadline = Instant::now() + IO_TIMEOUT;
        loop {
            if let Some(response) = self.parse_buffered() {
                return response;
            }
            assert!(
                Instant::now() < deadline,
                "incomplete HTTP response: {:?}",
                String::from_utf8_lossy(&self.buf)
            );
            let got = self.read_some();
            assert!(
                got > 0,
                "connection closed before a complete response: {:?}",
                String::from_utf8_lossy(&self.buf)
            );
        }
    }

    /// True when the peer ends the connection within `wait` (EOF or reset);
    /// false when it stays open that long.
    pub fn closed_within(&mut self, wait: Duration) -> bool {
        self.stream
            .set_read_timeout(Some(wait))
            .expect("set timeout");
        let mut chunk = [0u8; 4096];
        let closed = loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => break true,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    break false;
                }
                Err(_) => break true,
            }
        };
        self.stream
            .set_read_timeout(Some(IO_TIMEOUT))
            .expect("set timeout");
        closed
    }

    /// Takes exactly `n` bytes, reading more as needed (bounded).
    pub fn take(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            let got = self.read_some();
            assert!(
                got > 0,
                "connection closed with {} of {n} bytes",
                self.buf.len()
            );
        }
        self.buf.drain(..n).collect()
    }

    fn read_some(&mut self) -> usize {
        let mut chunk = [0u8; 16384];
        match self.stream.read(&mut chunk) {
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                n
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                panic!(
                    "no complete HTTP response within {IO_TIMEOUT:?}: {:?}",
                    String::from_utf8_lossy(&self.buf)
                )
            }
            // A reset after the answer counts as the end of the stream.
            Err(_) => 0,
        }
    }

    /// A complete response at the front of the buffer, removed from it.
    fn parse_buffered(&mut self) -> Option<HttpResponse> {
        let mut slots = [httparse::EMPTY_HEADER; 64];
        let mut parsed = httparse::Response::new(&mut slots);
        let head_len = match parsed.parse(&self.buf).expect("valid HTTP response head") {
            httparse::Status::Complete(len) => len,
            httparse::Status::Partial => return None,
        };
        let status = parsed.code.expect("status code");
        let headers: Vec<(String, String)> = parsed
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_owned(),
                    String::from_utf8_lossy(h.value).into_owned(),
                )
            })
            .collect();
        let length = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .map(|(_, v)| v.trim().parse::<usize>().expect("numeric Content-Length"));
        let body_len = match (status, length) {
            (101, _) => 0,
            (_, Some(length)) => length,
            (_, None) => {
                // No length: the body runs to the end of the connection.
                while self.read_some() > 0 {}
                self.buf.len() - head_len
            }
        };
        if self.buf.len() < head_len + body_len {
            return None;
        }
        let body = self.buf[head_len..head_len + body_len].to_vec();
        self.buf.drain(..head_len + body_len);
        Some(HttpResponse {
            status,
            headers,
            body,
        })
    }
}

/// The bytes of a request with `Host`, and `Content-Length` when there is a
/// body or the method is POST.
pub fn request_bytes(method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut out = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    for (name, value) in headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        out.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// A WebSocket upgrade request for `path` with the handshake fields and
/// `headers` (e.g. the token carrier).
pub fn upgrade_request(path: &str, headers: &[(&str, &str)]) -> Vec<u8> {
    let mut all = vec![
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", WS_KEY),
        ("Sec-WebSocket-Version", "13"),
    ];
    all.extend_from_slice(headers);
    request_bytes("GET", path, &all, b"")
}

/// Sends raw request bytes on a fresh connection to the public address and
/// reads the answer (for refused upgrades).
pub fn upgrade_raw(server: &Server, request: &[u8]) -> HttpResponse {
    let mut conn = HttpConn::open(server.addr());
    conn.write(request);
    conn.read_response()
}

/// An upgrade of `/ws` carrying `token` in `carrier`, read as raw HTTP.
pub fn upgrade_with(server: &Server, path: &str, carrier: Carrier, token: &str) -> HttpResponse {
    let request = match carrier {
        Carrier::Header => upgrade_request(path, &[("Authorization", &format!("Bearer {token}"))]),
        Carrier::Query => upgrade_request(&format!("{path}?token={token}"), &[]),
        Carrier::Subprotocol => upgrade_request(
            path,
            &[(
                "Sec-WebSocket-Protocol",
                &format!("shardgate.v1, bearer.{token}"),
            )],
        ),
    };
    upgrade_raw(server, &request)
}

/// `GET path` on a fresh connection to `addr`.
pub fn http_get(addr: SocketAddr, path: &str) -> HttpResponse {
    HttpConn::open(addr).request("GET", path, &[("Connection", "close")], b"")
}

/// One API request on an open connection: `POST path` with a JSON body and
/// the key (if any) as a bearer credential. Returns the status and the JSON
/// answer.
pub fn api_on(conn: &mut HttpConn, path: &str, body: &Value, key: Option<&str>) -> (u16, Value) {
    let auth = key.map(|key| format!("Bearer {key}"));
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(auth) = &auth {
        headers.push(("Authorization", auth.as_str()));
    }
    let response = conn.request("POST", path, &headers, body.to_string().as_bytes());
    (response.status, response.json())
}

/// One API request on a fresh connection to the server's API address.
pub fn api(server: &Server, path: &str, body: &Value, key: Option<&str>) -> (u16, Value) {
    api_on(&mut HttpConn::open(server.api_addr()), path, body, key)
}

/// An API request with the right key that must succeed; returns the answer.
pub fn api_ok(server: &Server, path: &str, body: &Value) -> Value {
    let (status, answer) = api(server, path, body, Some(API_KEY));
    assert_eq!(status, 200, "{path} {body}: {answer}");
    answer
}

/// `POST /api/v1/publish` with the right key.
pub fn publish(server: &Server, user: &str, data: &Value) -> Value {
    api_ok(
        server,
        "/api/v1/publish",
        &json!({ "user": user, "data": data }),
    )
}

/// `(connections, shard)` of `user` from `/api/v1/presence`.
pub fn presence(server: &Server, user: &str) -> (u64, u64) {
    let answer = api_ok(server, "/api/v1/presence", &json!({ "user": user }));
    assert_eq!(answer["user"], user, "presence answer: {answer}");
    let connections = answer["connections"].as_u64().expect("connections");
    let shard = answer["shard"].as_u64().expect("shard");
    (connections, shard)
}

/// Polls presence until `user` has exactly `connections` connections.
pub fn wait_presence(server: &Server, user: &str, connections: u64) {
    let mut last = None;
    let reached = poll(POLL_TIMEOUT, || {
        let (now, _) = presence(server, user);
        last = Some(now);
        now == connections
    });
    assert!(
        reached,
        "{user} should have {connections} connections, presence says {last:?}"
    );
}

/// A user id `{prefix}-{i}` that the server places on `shard`, other than
/// those in `exclude` (asks `/api/v1/presence`; never assumes the hash).
pub fn user_on_shard(server: &Server, prefix: &str, shard: u64, exclude: &[&str]) -> String {
    for i in 0..256 {
        let user = format!("{prefix}-{i}");
        if exclude.contains(&user.as_str()) {
            continue;
        }
        if presence(server, &user).1 == shard {
            return user;
        }
    }
    panic!("no user id with prefix {prefix} lands on shard {shard}");
}

/// The value of one Prometheus sample, e.g.
/// `shardgate_shard_connections{shard="0"}`, from `/metrics` at `addr`.
pub fn metric(addr: SocketAddr, series: &str) -> Option<f64> {
    let response = http_get(addr, "/metrics");
    assert_eq!(response.status, 200, "/metrics: {}", response.text());
    response.text().lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        Some(value.trim().parse().expect("numeric sample"))
    })
}

// ---------------------------------------------------------------------------
// Hand-built WebSocket frames
// ---------------------------------------------------------------------------

pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xa;

/// The mask every hand-built client frame uses.
pub const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// One frame: `first` is the first header byte (FIN, RSV bits, opcode),
/// masked with [`MASK`] when `masked`.
pub fn encode_frame(first: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mut out = vec![first];
    let mask_bit = if masked { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(mask_bit | n as u8),
        n if n <= 0xffff => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if masked {
        out.extend_from_slice(&MASK);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

/// A masked frame with FIN set when `fin`.
pub fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    encode_frame(if fin { 0x80 } else { 0 } | opcode, payload, true)
}

/// A frame as the server sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame {
    pub fin: bool,
    pub opcode: u8,
    pub payload: Vec<u8>,
}

impl RawFrame {
    /// The close code of a Close frame (1005 when it has no body).
    pub fn close_code(&self) -> u16 {
        assert_eq!(self.opcode, OP_CLOSE, "not a close frame: {self:?}");
        match self.payload.get(..2) {
            Some(code) => u16::from_be_bytes([code[0], code[1]]),
            None => 1005,
        }
    }
}

/// A WebSocket connection driven byte by byte, for what a library client
/// cannot send (unmasked, fragmented or invalid frames).
pub struct RawWs {
    conn: HttpConn,
}

impl RawWs {
    /// Upgrades `path` with `token` in the header, sending `early` bytes in
    /// the same write as the request; asserts the 101.
    pub fn connect(server: &Server, path: &str, token: &str, early: &[u8]) -> RawWs {
        let mut conn = HttpConn::open(server.addr());
        let mut bytes = upgrade_request(path, &[("Authorization", &format!("Bearer {token}"))]);
        bytes.extend_from_slice(early);
        conn.write(&bytes);
        let response = conn.read_response();
        assert_eq!(response.status, 101, "upgrade refused: {}", response.text());
        RawWs { conn }
    }

    /// Connects to `/ws` as `user` and consumes the welcome.
    pub fn connect_user(server: &Server, user: &str) -> RawWs {
        let mut ws = RawWs::connect(server, "/ws", &token(user), b"");
        assert_eq!(ws.recv_json()["type"], "welcome");
        ws
    }

    pub fn send_bytes(&mut self, bytes: &[u8]) {
        self.conn.write(bytes);
    }

    /// The next frame from the server (which must not mask).
    pub fn recv_frame(&mut self) -> RawFrame {
        let head = self.conn.take(2);
        assert_eq!(head[1] & 0x80, 0, "server frames must not be masked");
        let len = match head[1] & 0x7f {
            126 => u16::from_be_bytes(self.conn.take(2).try_into().unwrap()) as usize,
            127 => u64::from_be_bytes(self.conn.take(8).try_into().unwrap()) as usize,
            n => n as usize,
        };
        assert_eq!(head[0] & 0x70, 0, "server frames carry no RSV bits");
        RawFrame {
            fin: head[0] & 0x80 != 0,
            opcode: head[0] & 0x0f,
            payload: self.conn.take(len),
        }
    }

    /// The next frame, which must be a complete text frame holding JSON.
    pub fn recv_json(&mut self) -> Value {
        let frame = self.recv_frame();
        assert!(
            frame.fin && frame.opcode == OP_TEXT,
            "expected text: {frame:?}"
        );
        serde_json::from_slice(&frame.payload).expect("JSON text frame")
    }

    /// Sends a JSON ping and expects the pong as the next frame.
    pub fn expect_alive(&mut self) {
        let ping = json!({ "type": "ping", "id": "alive" }).to_string();
        self.send_bytes(&frame(true, OP_TEXT, ping.as_bytes()));
        assert_eq!(self.recv_json(), json!({ "type": "pong", "id": "alive" }));
    }

    /// Expects a Close with `code` as the next frame, answers it, and
    /// expects the server to end the TCP connection.
    pub fn expect_close(&mut self, code: u16) {
        let frame = self.recv_frame();
        assert_eq!(frame.opcode, OP_CLOSE, "expected close {code}: {frame:?}");
        assert_eq!(frame.close_code(), code, "close frame {frame:?}");
        // Answering may fail if the server already dropped the socket.
        let _ = self.conn.stream.write_all(&frame_close(code));
        assert!(
            self.conn.closed_within(IO_TIMEOUT),
            "server kept the connection open after its close"
        );
    }
}

/// A masked Close frame with `code`.
pub fn frame_close(code: u16) -> Vec<u8> {
    frame(true, OP_CLOSE, &code.to_be_bytes())
}

// ---------------------------------------------------------------------------
// Sockets shaped before connect, and non-panicking raw reads (limits tests)
// ---------------------------------------------------------------------------

/// A TCP connection to `addr`, bound first to the local address `from` when
/// given (e.g. 127.0.0.2, to be another peer on loopback) and with
/// `SO_RCVBUF` set to `rcvbuf` bytes before connecting when given (set
/// before connect so that the advertised window stays small; the kernel
/// doubles the value and applies its minimum). Read and write timeouts are
/// [`IO_TIMEOUT`], Nagle is off.
pub fn tcp_connect_from(
    addr: SocketAddr,
    from: Option<std::net::Ipv4Addr>,
    rcvbuf: Option<usize>,
) -> TcpStream {
    use std::os::fd::FromRawFd;

    let SocketAddr::V4(target) = addr else {
        panic!("tcp_connect_from supports IPv4 only, got {addr}");
    };
    let sockaddr = |ip: std::net::Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: socket(2) creates a descriptor that nothing else owns; it is
    // either closed below on error or moved into the TcpStream.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "socket: {}", io::Error::last_os_error());
    let fail = |what: &str| -> ! {
        let err = io::Error::last_os_error();
        // SAFETY: `fd` is ours and not yet owned by anything else.
        unsafe { libc::close(fd) };
        panic!("{what}: {err}");
    };
    if let Some(bytes) = rcvbuf {
        let value = libc::c_int::try_from(bytes).expect("SO_RCVBUF fits in an int");
        // SAFETY: setsockopt reads one c_int from a valid pointer.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            fail("setsockopt(SO_RCVBUF)");
        }
    }
    if let Some(ip) = from {
        let local = sockaddr(ip, 0);
        // SAFETY: bind reads a sockaddr_in of `len` bytes.
        let rc = unsafe { libc::bind(fd, (&local as *const libc::sockaddr_in).cast(), len) };
        if rc != 0 {
            fail(&format!("bind({ip})"));
        }
    }
    let remote = sockaddr(*target.ip(), target.port());
    // SAFETY: connect reads a sockaddr_in of `len` bytes; a blocking connect
    // on loopback completes or fails at once.
    let rc = unsafe { libc::connect(fd, (&remote as *const libc::sockaddr_in).cast(), len) };
    if rc != 0 {
        fail(&format!("connect({addr})"));
    }
    // SAFETY: `fd` is a connected socket owned by nothing else.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    stream.set_write_timeout(Some(IO_TIMEOUT)).expect("timeout");
    stream.set_nodelay(true).expect("nodelay");
    stream
}

/// What a bounded raw read saw.
#[derive(Debug)]
pub enum RawEvent {
    /// A complete frame.
    Frame(RawFrame),
    /// The server ended the connection (EOF or reset) before a complete
    /// frame.
    Closed,
    /// Nothing complete within the wait.
    TimedOut,
}

/// A complete server frame at the front of `buf`, with its length.
fn parse_raw_frame(buf: &[u8]) -> Option<(RawFrame, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let (len, at) = match buf[1] & 0x7f {
        126 => (
            u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?) as usize,
            4,
        ),
        127 => (
            u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?) as usize,
            10,
        ),
        n => (n as usize, 2),
    };
    let masked = buf[1] & 0x80 != 0;
    assert!(!masked, "server frames must not be masked");
    let payload = buf.get(at..at + len)?.to_vec();
    let frame = RawFrame {
        fin: buf[0] & 0x80 != 0,
        opcode: buf[0] & 0x0f,
        payload,
    };
    Some((frame, at + len))
}

impl HttpConn {
    /// Wraps a stream connected elsewhere (e.g. by [`tcp_connect_from`]).
    pub fn from_stream(stream: TcpStream) -> HttpConn {
        HttpConn {
            stream,
            buf: Vec::new(),
        }
    }

    /// Writes raw bytes; the error instead of a panic (the server may have
    /// closed the connection already).
    pub fn try_write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }
}

impl RawWs {
    /// Upgrades `path` on an already connected `stream` with `token` in the
    /// header; asserts the 101. The welcome (on `/ws`) is left unread.
    pub fn upgrade_on(stream: TcpStream, path: &str, token: &str) -> RawWs {
        let mut conn = HttpConn::from_stream(stream);
        conn.write(&upgrade_request(
            path,
            &[("Authorization", &format!("Bearer {token}"))],
        ));
        let response = conn.read_response();
        assert_eq!(response.status, 101, "upgrade refused: {}", response.text());
        RawWs { conn }
    }

    /// The socket, for socket-level control (timeouts, shutdown).
    pub fn stream(&self) -> &TcpStream {
        &self.conn.stream
    }

    /// Writes raw bytes; the error instead of a panic.
    pub fn try_send_bytes(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.conn.stream.write_all(bytes)
    }

    /// The next frame, the end of the connection, or a timeout after `wait`,
    /// without panicking on any of them.
    pub fn next_event(&mut self, wait: Duration) -> RawEvent {
        let deadline = Instant::now() + wait;
        let mut chunk = [0u8; 16384];
        let event = loop {
            if let Some((frame, used)) = parse_raw_frame(&self.conn.buf) {
                self.conn.buf.drain(..used);
                break RawEvent::Frame(frame);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break RawEvent::TimedOut;
            }
            self.conn
                .stream
                .set_read_timeout(Some(left))
                .expect("set timeout");
            match self.conn.stream.read(&mut chunk) {
                Ok(0) => break RawEvent::Closed,
                Ok(n) => self.conn.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break RawEvent::Closed,
            }
        };
        self.conn
            .stream
            .set_read_timeout(Some(IO_TIMEOUT))
            .expect("set timeout");
        event
    }
}

// ---------------------------------------------------------------------------
// Isolation suite support (tests/suite_*.rs): the reference model, its
// checker and randomized driver, and outside introspection of a server.
// ---------------------------------------------------------------------------

pub mod model;
pub mod probe;
