//! Hand-off latency: from the client's connect() to the 101 answer, through
//! the router and the owning shard, with the shard idle and with the shard
//! saturated by other users' traffic.
//!
//! Run with `cargo bench --bench handoff`. The server runs as a child process
//! with one shard pinned to CPU 0; the load threads and the probe share the
//! other CPU. Figures are printed, never asserted.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use jsonwebtoken::{Algorithm, EncodingKey, Header};

const SECRET: &str = "bench-secret-bench-secret-bench-secret-0123";
const PROBES: usize = 2000;
const LOAD_CONNECTIONS: usize = 8;
const PIPELINE: usize = 32;

fn token(sub: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = serde_json::json!({ "sub": sub, "exp": now + 3600, "iat": now });
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()).unwrap(),
    )
    .unwrap()
}

struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_server() -> Server {
    let child = Command::new(env!("CARGO_BIN_EXE_shardgate"))
        .args(["serve", "--listen", "127.0.0.1:0", "--shards", "1"])
        .env("SHARDGATE_JWT_SECRET", SECRET)
        .env("RUST_LOG", "warn")
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

/// Opens a WebSocket by hand; returns the stream and the time to the 101.
fn upgrade(addr: SocketAddr, token: &str) -> (TcpStream, Duration) {
    let request = format!(
        "GET /ws HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Authorization: Bearer {token}\r\n\r\n"
    );
    let start = Instant::now();
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_nodelay(true).unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "closed during handshake");
        head.extend_from_slice(&buf[..n]);
    }
    let elapsed = start.elapsed();
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    (stream, elapsed)
}

/// A masked client text frame.
fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0x81];
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    let mask = [1u8, 2, 3, 4];
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// Counts complete server frames in `buf`, keeping a partial tail.
fn count_frames(buf: &mut Vec<u8>) -> usize {
    let mut count = 0;
    let mut at = 0;
    loop {
        let rest = &buf[at..];
        if rest.len() < 2 {
            break;
        }
        let (header, len) = match rest[1] & 0x7f {
            126 if rest.len() >= 4 => (4, u16::from_be_bytes([rest[2], rest[3]]) as usize),
            126 => break,
            127 => panic!("unexpected large frame"),
            n => (2, n as usize),
        };
        if rest.len() < header + len {
            break;
        }
        at += header + len;
        count += 1;
    }
    buf.drain(..at);
    count
}

/// Keeps the shard busy: each connection pipelines `send`s and reads acks.
fn load(addr: SocketAddr, index: usize, stop: Arc<AtomicBool>, done: Arc<AtomicU64>) {
    let (mut stream, _) = upgrade(addr, &token(&format!("load-{index}")));
    let message = frame(br#"{"type":"send","id":1,"data":"0123456789abcdef"}"#);
    let batch: Vec<u8> = (0..PIPELINE).flat_map(|_| message.clone()).collect();
    let mut pending = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    // The welcome frame.
    let mut outstanding: isize = -1;
    while !stop.load(Ordering::Relaxed) {
        stream.write_all(&batch).unwrap();
        outstanding += PIPELINE as isize;
        while outstanding > 0 {
            let n = stream.read(&mut buf).unwrap();
            assert!(n > 0);
            pending.extend_from_slice(&buf[..n]);
            let frames = count_frames(&mut pending);
            outstanding -= frames as isize;
        }
        done.fetch_add(PIPELINE as u64, Ordering::Relaxed);
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank]
}

fn probe(addr: SocketAddr, label: &str) -> Vec<Duration> {
    let mut samples = Vec::with_capacity(PROBES);
    for i in 0..PROBES {
        let (stream, elapsed) = upgrade(addr, &token(&format!("probe-{label}-{i}")));
        samples.push(elapsed);
        drop(stream);
    }
    samples.sort();
    samples
}

fn report(label: &str, samples: &[Duration], extra: &str) {
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "{label:<10} n={:<5} p50={:>7.0}us p99={:>7.0}us p99.9={:>7.0}us max={:>7.0}us {extra}",
        samples.len(),
        us(percentile(samples, 50.0)),
        us(percentile(samples, 99.0)),
        us(percentile(samples, 99.9)),
        us(*samples.last().unwrap()),
    );
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` would too, so
    // run only when asked for as a benchmark.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let server = start_server();
    println!("hand-off latency, client connect() to 101, one shard pinned to CPU 0");

    let idle = probe(server.addr, "idle");
    report("idle", &idle, "");

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..LOAD_CONNECTIONS)
        .map(|i| {
            let (stop, done) = (stop.clone(), done.clone());
            let addr = server.addr;
            std::thread::spawn(move || load(addr, i, stop, done))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let before = done.load(Ordering::Relaxed);
    let started = Instant::now();
    let busy = probe(server.addr, "busy");
    let rate = (done.load(Ordering::Relaxed) - before) as f64 / started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        let _ = worker.join();
    }
    report(
        "saturated",
        &busy,
        &format!("(load: {rate:.0} sends/s acked meanwhile)"),
    );
}
