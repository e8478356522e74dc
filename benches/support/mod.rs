//! What the latency benches share: starting the server binary, minting
//! tokens, opening a WebSocket by hand, and percentiles.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use jsonwebtoken::{Algorithm, EncodingKey, Header};

pub const SECRET: &str = "bench-secret-bench-secret-bench-secret-0123";

/// Whether the binary was started by `cargo bench` (and not by `cargo test
/// --benches`, which only checks that it runs).
pub fn asked_to_run() -> bool {
    std::env::args().any(|a| a == "--bench")
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// An HS256 token for `sub` with the bench secret.
pub fn token(sub: &str) -> String {
    token_with(
        sub,
        Algorithm::HS256,
        &EncodingKey::from_secret(SECRET.as_bytes()).unwrap(),
    )
}

pub fn token_with(sub: &str, algorithm: Algorithm, key: &EncodingKey) -> String {
    let now = now_secs();
    let claims = serde_json::json!({ "sub": sub, "exp": now + 3600, "iat": now });
    jsonwebtoken::encode(&Header::new(algorithm), &claims, key).unwrap()
}

/// A shardgate child process, killed when dropped.
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// Starts `shardgate serve --listen 127.0.0.1:0 <args>` and waits until it
/// listens.
pub fn start_server(args: &[&str]) -> Server {
    start(args, None)
}

/// As `start_server`, with the whole server process (router and shards)
/// confined to `cpu`.
pub fn start_server_pinned(args: &[&str], cpu: usize) -> Server {
    start(args, Some(cpu))
}

/// Confines the calling thread to `cpu`.
pub fn pin_thread(cpu: usize) {
    // SAFETY: cpu_set_t is plain data, zeroed is an empty set; the calls
    // read it only.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Lowers the calling thread's scheduling priority (nice 19), so that load
/// threads yield the CPU to measuring threads.
pub fn lower_priority() {
    // SAFETY: setpriority on the calling thread's id; no memory involved.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 19);
    }
}

fn start(args: &[&str], cpu: Option<usize>) -> Server {
    use std::os::unix::process::CommandExt;
    let mut command = Command::new(env!("CARGO_BIN_EXE_shardgate"));
    if let Some(cpu) = cpu {
        // SAFETY: the hook runs in the forked child before exec and only
        // calls sched_setaffinity, which is async-signal-safe.
        unsafe {
            command.pre_exec(move || {
                pin_thread(cpu);
                Ok(())
            });
        }
    }
    let child = command
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(args)
        .env("SHARDGATE_JWT_SECRET", SECRET)
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start shardgate");
    // Owned by a Server from here on, so the child is killed on every path.
    let mut server = Server {
        child,
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
    };
    let mut stdout = server.child.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        let n = stdout.read(&mut byte).unwrap();
        assert!(n == 1, "server exited before listening");
        seen.push(byte[0]);
        if byte[0] == b'\n' {
            let line = String::from_utf8_lossy(&seen).to_string();
            if let Some(addr) = line.trim().strip_prefix("shardgate listening on http://") {
                server.addr = addr.parse().unwrap();
                // Keep draining stdout so the child never blocks on it.
                std::thread::spawn(move || {
                    let mut sink = Vec::new();
                    let _ = stdout.read_to_end(&mut sink);
                });
                return server;
            }
            seen.clear();
        }
    }
}

/// Opens a WebSocket by hand from `source` (any loopback address); returns
/// the stream, the status line's code and the time to the answer.
pub fn upgrade_from(
    source: Option<std::net::IpAddr>,
    addr: SocketAddr,
    token: &str,
) -> (TcpStream, u16, Duration) {
    let (stream, status, elapsed, _) = upgrade_keeping(source, addr, token);
    (stream, status, elapsed)
}

/// As `upgrade_from`, also returning bytes read past the answer's head
/// (the first frames).
pub fn upgrade_keeping(
    source: Option<std::net::IpAddr>,
    addr: SocketAddr,
    token: &str,
) -> (TcpStream, u16, Duration, Vec<u8>) {
    let request = format!(
        "GET /ws HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Authorization: Bearer {token}\r\n\r\n"
    );
    let start = Instant::now();
    let mut stream = match source {
        Some(ip) => connect_from(ip, addr),
        None => TcpStream::connect(addr).unwrap(),
    };
    stream.set_nodelay(true).unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).unwrap_or(0);
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let elapsed = start.elapsed();
    let status = std::str::from_utf8(head.get(9..12).unwrap_or(b"000"))
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let end = head
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(head.len(), |i| i + 4);
    let rest = head.split_off(end);
    (stream, status, elapsed, rest)
}

/// A client connection that keeps bytes read ahead.
pub struct Client {
    pub stream: TcpStream,
    pending: Vec<u8>,
}

impl Client {
    /// Upgrades with `token`; panics unless the answer is 101.
    pub fn connect(addr: SocketAddr, token: &str) -> Client {
        let (stream, status, _, pending) = upgrade_keeping(None, addr, token);
        assert_eq!(status, 101, "upgrade refused");
        Client { stream, pending }
    }

    pub fn send_text(&mut self, text: &str) -> std::io::Result<()> {
        self.stream.write_all(&client_frame(1, text.as_bytes()))
    }

    fn fill(&mut self, want: usize) -> Option<()> {
        let mut buf = [0u8; 4096];
        while self.pending.len() < want {
            let n = self.stream.read(&mut buf).ok()?;
            if n == 0 {
                return None;
            }
            self.pending.extend_from_slice(&buf[..n]);
        }
        Some(())
    }

    /// One server frame: opcode and payload; `None` when the stream ends.
    pub fn read_frame(&mut self) -> Option<(u8, Vec<u8>)> {
        self.fill(2)?;
        let (header, len) = match self.pending[1] & 0x7f {
            126 => {
                self.fill(4)?;
                (
                    4,
                    u64::from(u16::from_be_bytes([self.pending[2], self.pending[3]])),
                )
            }
            127 => {
                self.fill(10)?;
                let mut ext = [0u8; 8];
                ext.copy_from_slice(&self.pending[2..10]);
                (10, u64::from_be_bytes(ext))
            }
            n => (2, u64::from(n)),
        };
        let total = header + len as usize;
        self.fill(total)?;
        let opcode = self.pending[0] & 0x0f;
        let payload = self.pending[header..total].to_vec();
        self.pending.drain(..total);
        Some((opcode, payload))
    }

    /// Reads frames until a text frame containing `needle`; `None` at a
    /// Close or the end of the stream. Server pings are answered, as any
    /// live client must (the server drops peers that stay silent).
    pub fn read_until(&mut self, needle: &str) -> Option<Vec<u8>> {
        loop {
            let (opcode, payload) = self.read_frame()?;
            if opcode == 9 {
                self.stream.write_all(&client_frame(10, &payload)).ok()?;
                continue;
            }
            if opcode == 1
                && payload
                    .windows(needle.len())
                    .any(|w| w == needle.as_bytes())
            {
                return Some(payload);
            }
            if opcode == 8 {
                return None;
            }
        }
    }
}

pub fn upgrade(addr: SocketAddr, token: &str) -> (TcpStream, Duration) {
    let (stream, status, elapsed) = upgrade_from(None, addr, token);
    assert_eq!(status, 101, "upgrade refused");
    (stream, elapsed)
}

/// A TCP connection from a chosen loopback source address.
fn connect_from(source: std::net::IpAddr, addr: SocketAddr) -> TcpStream {
    use std::os::fd::FromRawFd;
    let std::net::IpAddr::V4(source) = source else {
        panic!("IPv4 loopback sources only");
    };
    let std::net::IpAddr::V4(target) = addr.ip() else {
        panic!("IPv4 targets only");
    };
    // SAFETY: plain socket calls on a descriptor created here and handed to
    // a TcpStream that owns it from then on; the sockaddr structs are fully
    // initialised and outlive the calls.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0);
        let stream = TcpStream::from_raw_fd(fd);
        let mut local: libc::sockaddr_in = std::mem::zeroed();
        local.sin_family = libc::AF_INET as u16;
        local.sin_addr.s_addr = u32::from(source).to_be();
        let len = std::mem::size_of::<libc::sockaddr_in>() as u32;
        assert_eq!(
            libc::bind(fd, (&local as *const libc::sockaddr_in).cast(), len),
            0
        );
        let mut remote: libc::sockaddr_in = std::mem::zeroed();
        remote.sin_family = libc::AF_INET as u16;
        remote.sin_port = addr.port().to_be();
        remote.sin_addr.s_addr = u32::from(target).to_be();
        assert_eq!(
            libc::connect(fd, (&remote as *const libc::sockaddr_in).cast(), len),
            0
        );
        stream
    }
}

pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank]
}

/// One line of figures for sorted samples.
pub fn report(label: &str, samples: &[Duration], extra: &str) {
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "{label:<28} n={:<5} p50={:>7.0}us p99={:>7.0}us p99.9={:>7.0}us max={:>7.0}us {extra}",
        samples.len(),
        us(percentile(samples, 50.0)),
        us(percentile(samples, 99.0)),
        us(percentile(samples, 99.9)),
        us(*samples.last().unwrap()),
    );
}

/// A masked client frame with `opcode` (RFC 6455 §5.2).
pub fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= 0xffff => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    let mask = [0x37u8, 0xfa, 0x21, 0x3d];
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// Resident memory of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}
