//! Running out of file descriptors: when the process hits RLIMIT_NOFILE,
//! the router backs off instead of spinning on `accept`, connections that
//! are already open keep working, and accepting resumes by itself once
//! descriptors are free again.

mod common;

use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{Carrier, Server, connect_user, poll, token, try_ws_connect};
use serde_json::json;

/// CPU time (user + system) the process has used, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses).
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0);
    let stime: u64 = fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    utime + stime
}

fn open_descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |dir| dir.count())
}

#[test]
fn out_of_descriptors_backs_off_keeps_serving_and_recovers() {
    // One shard and the router: the server keeps a reserve of 96
    // descriptors and needs 112 to start, so 160 leaves a few dozen for
    // connections. The shard cap is set high so that accept, not the cap,
    // is what runs out.
    let server = Server::builder()
        .shards(1)
        .descriptor_limit(160)
        .args([
            "--max-connections-per-shard",
            "1000",
            "--max-handshakes-per-peer",
            "1000",
        ])
        .start();
    let pid = server.pid();

    // A user whose connection must keep working throughout.
    let (mut keeper, welcome) = connect_user(&server, "keeper");
    assert_eq!(welcome["type"], "welcome");

    // Fill the descriptor table with idle upgraded connections.
    let mut fillers = Vec::new();
    for i in 0..400 {
        let filler = token(&format!("filler-{i}"));
        match try_ws_connect(server.addr(), "/ws", Carrier::Header, &filler) {
            Ok(client) => fillers.push(client),
            Err(_) => break,
        }
    }
    assert!(fillers.len() > 10, "some connections fit below the limit");
    assert!(
        fillers.len() < 160,
        "the limit must be reached, got {}",
        fillers.len()
    );

    // More clients connect: the kernel completes their TCP handshakes, but
    // the router cannot accept them. They wait in the backlog.
    let waiting: Vec<TcpStream> = (0..8)
        .filter_map(|_| TcpStream::connect(server.addr()).ok())
        .collect();
    assert!(!waiting.is_empty());
    assert!(poll(Duration::from_secs(5), || server
        .log()
        .contains("accept failed")));

    // Backing off, not spinning: over a second the server uses a small
    // fraction of a core (ticks are 1/100 s on Linux).
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu_ticks(pid) - before;
    assert!(
        used < 30,
        "the server spun on accept: {used} ticks in one second"
    );

    // The open connection still works.
    keeper.send_data(&json!(1), &json!("still here"));
    let ack = keeper.recv_type("ack");
    assert_eq!(ack["id"], 1);

    // Free descriptors: accepting resumes by itself and a new user gets in.
    drop(waiting);
    let freed = fillers.len() / 2;
    for mut client in fillers.drain(..freed) {
        client.close(1000);
    }
    let started = Instant::now();
    assert!(
        poll(Duration::from_secs(10), || {
            try_ws_connect(server.addr(), "/ws", Carrier::Header, &token("late")).is_ok()
        }),
        "accepting did not resume"
    );
    println!(
        "resumed {:?} after freeing {freed} descriptors; {} open",
        started.elapsed(),
        open_descriptors(pid)
    );
}
