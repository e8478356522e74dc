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
    let child = Command::new(env!("CARGO_BIN_EXE_shardgate"))
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
    (stream, status, elapsed)
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
