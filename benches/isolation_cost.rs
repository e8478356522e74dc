//! The cost of isolation: the same traffic carried by N users (one manager
//! each, spread over the shards) versus by one user.
//!
//! * isolated: N users with k connections each; every user's first
//!   connection sends M messages (at most W unacknowledged), each delivered
//!   to the user's k-1 other connections.
//! * one user: a single user with k connections; its first connection sends
//!   N x M messages with N x W in flight: the same sends, deliveries and
//!   messages in flight, through one manager.
//!
//! Printed per row (the median of three runs by send rate): messages sent
//! per second, deliveries per second, and the p50/p99 round trip from a
//! client `send` to its `ack`, with the isolated rate relative to the one
//! user's. Every delivery is
//! counted and checked to belong to its user; nothing is asserted on time.
//!
//! Run with `cargo bench --bench isolation_cost`; scale with
//! `ISOLATION_BENCH_MESSAGES` (total sends per row, default 20,000). The
//! server is the release binary with 2 shards, not pinned.

// Until this file is registered with `harness = false`, Cargo builds it
// with the libtest harness, which has its own `main`.
#![cfg_attr(test, allow(dead_code))]

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::Server;
use common::model::{Got, Ws, env_usize};
use serde_json::json;

/// Unacknowledged sends per sending connection in the isolated rows.
const WINDOW: usize = 8;
/// Connections per user.
const CONNS: usize = 4;
/// Runs of each row; the median is printed.
const RUNS: usize = 3;

struct Row {
    label: String,
    users: usize,
    conns: usize,
    sent: usize,
    delivered: usize,
    elapsed: Duration,
    rtts: Vec<Duration>,
}

/// One sending user: its first connection sends `messages` with `window`
/// in flight; the others read every delivery. Returns the round trips and
/// the deliveries counted.
fn drive_user(
    addr: SocketAddr,
    user: &str,
    messages: usize,
    window: usize,
) -> (Vec<Duration>, usize) {
    let mut conns: Vec<Ws> = (0..CONNS)
        .map(|_| {
            let (ws, welcome) = Ws::connect_user(addr, user).expect("connect");
            assert_eq!(welcome["user"], user);
            ws
        })
        .collect();
    let mut sent_at = Vec::with_capacity(messages);
    let mut rtts = Vec::with_capacity(messages);
    let mut delivered = 0;
    let mut acked = 0;
    let mut drained = 0;
    while acked < messages {
        while sent_at.len() < messages && sent_at.len() - acked < window {
            let n = sent_at.len();
            let frame = json!({ "type": "send", "id": n, "data": { "u": user, "n": n } });
            conns[0].queue_json(&frame).expect("queue");
            sent_at.push(Instant::now());
        }
        conns[0].flush().expect("flush");
        match conns[0].read(Duration::from_secs(10)) {
            Got::Frame(ack) => {
                assert_eq!(ack["type"], "ack", "{ack}");
                let id = ack["id"].as_u64().expect("id") as usize;
                assert_eq!(id, acked, "acks in order");
                rtts.push(sent_at[id].elapsed());
                acked += 1;
            }
            other => panic!("{user}: no ack: {other:?}"),
        }
        // Keep the siblings' queues short: read what was acknowledged.
        if acked - drained >= window || acked == messages {
            for sibling in conns.iter_mut().skip(1) {
                for _ in drained..acked {
                    match sibling.read(Duration::from_secs(10)) {
                        Got::Frame(frame) => {
                            assert_eq!(frame["data"]["u"], user, "another user's data: {frame}");
                            delivered += 1;
                        }
                        other => panic!("{user}: missing delivery: {other:?}"),
                    }
                }
            }
            drained = acked;
        }
    }
    for mut ws in conns {
        let _ = ws.close(1000);
    }
    (rtts, delivered)
}

fn isolated(server: &Server, users: usize, total: usize) -> Row {
    let per_user = total / users;
    let addr = server.addr();
    let started = Instant::now();
    let results: Vec<(Vec<Duration>, usize)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..users)
            .map(|u| {
                scope.spawn(move || drive_user(addr, &format!("iso-{users}-{u}"), per_user, WINDOW))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("user thread"))
            .collect()
    });
    let elapsed = started.elapsed();
    let mut rtts = Vec::new();
    let mut delivered = 0;
    for (r, d) in results {
        rtts.extend(r);
        delivered += d;
    }
    Row {
        label: "isolated".into(),
        users,
        conns: CONNS,
        sent: per_user * users,
        delivered,
        elapsed,
        rtts,
    }
}

fn one_user(server: &Server, users: usize, total: usize) -> Row {
    let per_user = total / users;
    let started = Instant::now();
    let (rtts, delivered) = drive_user(
        server.addr(),
        &format!("one-{users}"),
        per_user * users,
        WINDOW * users,
    );
    Row {
        label: format!("one user, window {}", WINDOW * users),
        users: 1,
        conns: CONNS,
        sent: per_user * users,
        delivered,
        elapsed: started.elapsed(),
        rtts,
    }
}

/// The run with the median send rate.
fn median(mut rows: Vec<Row>) -> Row {
    rows.sort_by(|a, b| {
        let rate = |r: &Row| r.sent as f64 / r.elapsed.as_secs_f64();
        rate(a).total_cmp(&rate(b))
    });
    rows.swap_remove(rows.len() / 2)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn print_row(row: &mut Row, baseline: Option<f64>) -> f64 {
    row.rtts.sort();
    let secs = row.elapsed.as_secs_f64();
    let rate = row.sent as f64 / secs;
    let versus = baseline.map_or(String::from("-"), |b| format!("{:.2}x", rate / b));
    println!(
        "| {:<22} | {:>5} | {:>5} | {:>8} | {:>10.0} | {:>12.0} | {:>9.3} | {:>9.3} | {:>9} |",
        row.label,
        row.users,
        row.conns,
        row.sent,
        rate,
        row.delivered as f64 / secs,
        percentile(&row.rtts, 0.50).as_secs_f64() * 1e3,
        percentile(&row.rtts, 0.99).as_secs_f64() * 1e3,
        versus,
    );
    rate
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let total = env_usize("ISOLATION_BENCH_MESSAGES", 20_000);
    let server = Server::builder()
        .shards(2)
        .args([
            "--rate-limit",
            "0",
            "--outbound-queue-messages",
            "8192",
            "--max-connections-per-user",
            "64",
        ])
        .env("RUST_LOG", "warn")
        .start();

    // Warm-up: the server's allocators and the loopback path settle.
    let _ = isolated(&server, 4, 2_000);

    println!();
    println!(
        "cost of isolation: {total} sends per row, {CONNS} connections per user, \
         window {WINDOW} per sending connection, 2 shards, median of {RUNS} runs"
    );
    println!(
        "| {:<22} | {:>5} | {:>5} | {:>8} | {:>10} | {:>12} | {:>9} | {:>9} | {:>9} |",
        "traffic",
        "users",
        "conns",
        "sent",
        "sent/s",
        "delivered/s",
        "p50 ms",
        "p99 ms",
        "vs 1 user"
    );
    println!("|{}|", ["-"; 9].map(|_| "---").join("|"));
    for users in [1usize, 8, 64] {
        // Three runs of each, interleaved; the median by rate is printed.
        let mut singles = Vec::new();
        let mut spreads = Vec::new();
        for _ in 0..RUNS {
            singles.push(one_user(&server, users, total));
            spreads.push(isolated(&server, users, total));
        }
        let mut single = median(singles);
        let base = print_row(&mut single, None);
        let mut spread = median(spreads);
        print_row(&mut spread, Some(base));
    }
}
