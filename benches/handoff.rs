//! Hand-off latency: from the client's connect() to the 101 answer, through
//! the router and the owning shard, with the shard idle and with the shard
//! saturated by other users' traffic.
//!
//! Run with `cargo bench --bench handoff`. The server runs as a child process
//! with one shard pinned to CPU 0; the load threads and the probe share the
//! other CPU. Figures are printed, never asserted.

mod support;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use support::{client_frame, report, start_server, token, upgrade};

const PROBES: usize = 2000;
const LOAD_CONNECTIONS: usize = 8;
const PIPELINE: usize = 32;

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
    let message = client_frame(1, br#"{"type":"send","id":1,"data":"0123456789abcdef"}"#);
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

/// The server's own accept-to-101 histogram: (upper bound in µs, count).
fn server_histogram(addr: SocketAddr) -> Vec<(f64, u64)> {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text);
    text.lines()
        .filter(|l| l.starts_with("shardgate_shard_handoff_latency_seconds_bucket"))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse::<f64>().ok()? * 1e6
            };
            let count = l.rsplit(' ').next()?.parse().ok()?;
            Some((bound, count))
        })
        .collect()
}

/// The bucket bound under which `p` percent of the samples between two
/// scrapes fell.
fn server_percentile(before: &[(f64, u64)], after: &[(f64, u64)], p: f64) -> String {
    let total = after.last().map_or(0, |b| b.1) - before.last().map_or(0, |b| b.1);
    for ((bound, a), (_, b)) in after.iter().zip(before) {
        if (a - b) as f64 >= total as f64 * p / 100.0 {
            return if bound.is_finite() {
                format!("<={bound:.0}us")
            } else {
                ">100ms".into()
            };
        }
    }
    "-".into()
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` would too, so
    // run only when asked for as a benchmark.
    if !support::asked_to_run() {
        return;
    }
    let preempt = std::env::var("SHARDGATE_PREEMPT_US").unwrap_or_else(|_| "1000".into());
    let server = start_server(&[
        "--shards",
        "1",
        "--rate-limit",
        "0",
        "--preempt-timer-us",
        &preempt,
    ]);
    println!("server preempt timer: {preempt} us");
    println!("hand-off latency, client connect() to 101, one shard pinned to CPU 0");

    let start = server_histogram(server.addr);
    let idle = probe(server.addr, "idle");
    let after_idle = server_histogram(server.addr);
    report("idle", &idle, "");
    println!(
        "  server side (accept to 101 written): p50 {} p99 {}",
        server_percentile(&start, &after_idle, 50.0),
        server_percentile(&start, &after_idle, 99.0)
    );

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
    let before_busy = server_histogram(server.addr);
    let busy = probe(server.addr, "busy");
    let after_busy = server_histogram(server.addr);
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
    println!(
        "  server side (accept to 101 written): p50 {} p99 {}",
        server_percentile(&before_busy, &after_busy, 50.0),
        server_percentile(&before_busy, &after_busy, 99.0)
    );
}
