//! Draining on SIGTERM with messages still queued in the server, over real
//! loopback sockets (tests/shutdown.rs has the idle case):
//!
//! - a slow reader (tiny `SO_RCVBUF`, paused) first receives every message
//!   queued for it, in order, then Close 1001, and nothing after;
//! - during the drain `/readyz` on the private `--api-listen` address is 503,
//!   the API refuses new work, a `send` is refused and delivered nowhere, and
//!   new upgrades on the public address are refused; a connection on another
//!   shard is closed with 1001 at once, without waiting for the slow reader;
//! - a reader that never resumes cannot hold the process: it exits with
//!   status 0 within the drain and close timeouts;
//! - `/metrics` on the private address answers promptly while a shard is
//!   still draining;
//! - a client that keeps sending while it reads slowly gets what was queued
//!   at the signal, its refusals, and Close 1001 long before the drain
//!   timeout: replies to frames sent after the signal do not stretch it;
//! - the exit status is 0.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

fn queued_series(shard: u64) -> String {
    format!("shardgate_shard_queued_messages{{shard=\"{shard}\"}}")
}

/// Sends 16 KiB messages from `sender` (acks read) until at least `frames`
/// frames sit in shard `shard`'s outboxes, past what the kernel buffers for
/// the stalled sibling. Returns how many were sent (at most 400).
fn fill_queue(server: &Server, sender: &mut Client, shard: u64, frames: f64) -> u64 {
    let data = json!("q".repeat(16 * 1024));
    for id in 1..=400u64 {
        sender.send_data(&json!(id), &data);
        assert_eq!(sender.recv_type("ack")["seq"], id);
        if id % 8 == 0 && metric(server.api_addr(), &queued_series(shard)) >= Some(frames) {
            return id;
        }
    }
    panic!("400 messages of 16 KiB never queued {frames} frames in the server");
}

/// Whether a new upgrade on `addr` is refused: no connection, a 503, or the
/// connection ended without an answer. False for a 101.
fn upgrade_refused(addr: SocketAddr, user: &str) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return true;
    };
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let request = upgrade_request(
        "/ws",
        &[("Authorization", &format!("Bearer {}", token(user)))],
    );
    if stream.write_all(&request).is_err() {
        return true;
    }
    let mut answer = Vec::new();
    let mut chunk = [0u8; 1024];
    while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&chunk[..n]),
        }
    }
    let text = String::from_utf8_lossy(&answer);
    assert!(
        !text.starts_with("HTTP/1.1 101"),
        "an upgrade was accepted during the drain"
    );
    text.is_empty() || text.starts_with("HTTP/1.1 503")
}

/// Reads `ws` to its end: consecutive messages from seq 1, then how it
/// ended (the close code, or `None` when the socket just closed).
fn read_to_end(ws: &mut RawWs, data: &Value) -> (u64, Option<u16>) {
    let mut last = 0;
    loop {
        match ws.next_event(IO_TIMEOUT) {
            RawEvent::Frame(f) if f.opcode == OP_TEXT => {
                let value: Value = serde_json::from_slice(&f.payload).unwrap();
                assert_eq!(value["type"], "message", "{value}");
                assert_eq!(value["seq"], last + 1, "out of order or a gap");
                assert_eq!(&value["data"], data);
                last += 1;
            }
            RawEvent::Frame(f) if f.opcode == OP_CLOSE => return (last, Some(f.close_code())),
            RawEvent::Closed => return (last, None),
            other => panic!("after {last} messages: {other:?}"),
        }
    }
}

#[test]
fn sigterm_delivers_everything_queued_to_a_slow_reader_then_1001() {
    let mut server = Server::builder()
        .shards(2)
        .args([
            "--api-listen",
            "127.0.0.1:0",
            "--drain-timeout-ms",
            "2000",
            "--close-timeout-ms",
            "2000",
            "--outbound-queue-bytes",
            "8388608",
            "--rate-limit",
            "0",
        ])
        .start();
    let private = server.private_addr().expect("private address");
    let user = user_on_shard(&server, "drain", 0, &[]);
    let elsewhere = user_on_shard(&server, "drain", 1, &[]);

    let stream = tcp_connect_from(server.addr(), None, Some(4096));
    let mut reader = RawWs::upgrade_on(stream, "/ws", &token(&user));
    assert_eq!(reader.recv_json()["type"], "welcome");
    let (mut sender, _) = connect_user(&server, &user);
    let (mut other_shard, _) = connect_user(&server, &elsewhere);

    let sent = fill_queue(&server, &mut sender, 0, 8.0);
    let data = json!("q".repeat(16 * 1024));
    assert_eq!(http_get(private, "/readyz").status, 200);

    let term = Instant::now();
    server.signal(libc::SIGTERM);

    // Another shard has nothing queued: its connections close at once.
    other_shard.expect_close_within(1001, Duration::from_secs(2));
    let other_closed = term.elapsed();

    // Draining: not ready, no new work, no new upgrades.
    let not_ready = poll(Duration::from_secs(2), || {
        http_get(private, "/readyz").status == 503
    });
    assert!(not_ready, "/readyz stayed 200 during the drain");
    let (status, answer) = api(
        &server,
        "/api/v1/publish",
        &json!({ "user": user, "data": "late" }),
        Some(API_KEY),
    );
    assert_eq!(status, 503, "publish during the drain: {answer}");
    sender.send_data(&json!("late"), &json!("during the drain"));
    let refusal = sender.recv_json();
    assert_eq!(refusal["type"], "error", "{refusal}");
    assert_eq!(refusal["id"], "late", "{refusal}");
    println!("a send during the drain is refused with {refusal}");
    let refused = poll(Duration::from_secs(2), || {
        upgrade_refused(server.addr(), "newcomer")
    });
    assert!(refused, "new upgrades were still accepted during the drain");
    // Still paused: the messages wait in the server (at least 8 frames were
    // queued before SIGTERM), and nobody on this shard is closed yet.
    sender.expect_silence(Duration::from_millis(300));
    // (Nothing more can be asked of /metrics here: see the ignored test
    // below.)
    std::thread::sleep(Duration::from_millis(500).saturating_sub(term.elapsed()));
    let paused = term.elapsed();
    assert!(
        paused < Duration::from_millis(1800),
        "the checks outlasted the drain timeout ({paused:?}); the test proves nothing"
    );

    // The reader resumes: everything, in order, then 1001, then nothing.
    let (received, ending) = read_to_end(&mut reader, &data);
    assert_eq!(received, sent, "queued messages were lost");
    assert_eq!(ending, Some(1001), "the drain must end with close 1001");
    let _ = reader.try_send_bytes(&frame_close(1001));
    assert!(
        matches!(reader.next_event(IO_TIMEOUT), RawEvent::Closed),
        "something came after the close"
    );
    sender.expect_close(1001);

    let status = server
        .wait_exit(Duration::from_secs(10))
        .expect("the server should exit after draining");
    println!(
        "{sent} messages of 16 KiB queued; other shard closed {other_closed:?} after SIGTERM; \
         reader paused {paused:?}, got all {received}; exit after {:?}",
        term.elapsed()
    );
    assert!(status.success(), "exit status {status:?}");
    assert!(server.log().contains("shutdown complete"));
}

#[test]
fn a_reader_that_never_resumes_cannot_hold_the_shutdown() {
    let drain = Duration::from_millis(1000);
    let close = Duration::from_millis(1000);
    let mut server = Server::builder()
        .shards(2)
        .args([
            "--drain-timeout-ms",
            "1000",
            "--close-timeout-ms",
            "1000",
            "--outbound-queue-bytes",
            "8388608",
            "--rate-limit",
            "0",
        ])
        .start();
    let user = user_on_shard(&server, "stuck", 0, &[]);
    let same_shard = user_on_shard(&server, "stuck", 0, &[&user]);
    let other_shard = user_on_shard(&server, "stuck", 1, &[]);

    let stream = tcp_connect_from(server.addr(), None, Some(4096));
    let mut stuck = RawWs::upgrade_on(stream, "/ws", &token(&user));
    assert_eq!(stuck.recv_json()["type"], "welcome");
    let (mut sender, _) = connect_user(&server, &user);
    let (mut neighbour, _) = connect_user(&server, &same_shard);
    let (mut far, _) = connect_user(&server, &other_shard);
    fill_queue(&server, &mut sender, 0, 8.0);

    let term = Instant::now();
    server.signal(libc::SIGTERM);
    far.expect_close_within(1001, Duration::from_secs(2));
    let far_closed = term.elapsed();
    neighbour.expect_close_within(1001, drain + Duration::from_secs(2));
    let neighbour_closed = term.elapsed();

    let status = server
        .wait_exit(drain + close + Duration::from_secs(3))
        .expect("a stuck reader held the shutdown");
    let exited = term.elapsed();
    println!(
        "stuck reader: other shard closed after {far_closed:?}, same shard after \
         {neighbour_closed:?}, exit after {exited:?}"
    );
    assert!(status.success(), "exit status {status:?}");
    assert!(
        far_closed < drain,
        "another shard waited for the stuck reader"
    );

    // The stuck reader got a prefix of its messages, in order, and then a
    // close 1001 or the end of the socket; nothing else.
    let data = json!("q".repeat(16 * 1024));
    let (received, ending) = read_to_end(&mut stuck, &data);
    println!("the stuck reader later read {received} messages, then {ending:?}");
    if let Some(code) = ending {
        assert_eq!(code, 1001);
    }
}

#[test]
fn metrics_answer_promptly_while_one_shard_still_drains() {
    let mut server = Server::builder()
        .shards(2)
        .args([
            "--api-listen",
            "127.0.0.1:0",
            "--drain-timeout-ms",
            "3000",
            "--close-timeout-ms",
            "1000",
            "--outbound-queue-bytes",
            "8388608",
            "--rate-limit",
            "0",
        ])
        .start();
    let private = server.private_addr().expect("private address");
    let user = user_on_shard(&server, "scrape", 0, &[]);
    let done_first = user_on_shard(&server, "scrape", 1, &[]);

    // Shard 0 will drain for a while: a stalled reader with a queue.
    let stream = tcp_connect_from(server.addr(), None, Some(4096));
    let mut stuck = RawWs::upgrade_on(stream, "/ws", &token(&user));
    assert_eq!(stuck.recv_json()["type"], "welcome");
    let (mut sender, _) = connect_user(&server, &user);
    fill_queue(&server, &mut sender, 0, 8.0);
    // Shard 1 finishes its drain at once.
    let (mut quick, _) = connect_user(&server, &done_first);

    server.signal(libc::SIGTERM);
    quick.expect_close(1001);
    assert!(server.wait_for_log("shard stopped shard=1", Duration::from_secs(2)));

    // An operator watches the drain.
    let asked = Instant::now();
    let mut conn = HttpConn::open(private);
    conn.write(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    let ended = conn.closed_within(Duration::from_millis(1500));
    let waited = asked.elapsed();
    assert!(
        ended,
        "no answer to /metrics within {waited:?} during the drain"
    );
    let response = conn.read_response();
    assert_eq!(response.status, 200, "{}", response.text());
    assert!(
        response
            .text()
            .contains("shardgate_shard_queued_messages{shard=\"0\"}"),
        "the draining shard is missing from /metrics"
    );
    assert!(
        server.wait_exit(Duration::from_secs(10)).is_some(),
        "the server did not exit"
    );
    drop(stuck);
}

#[test]
fn a_client_that_keeps_sending_cannot_stretch_the_drain() {
    let drain = Duration::from_secs(20);
    let mut server = Server::builder()
        .shards(2)
        .args([
            "--drain-timeout-ms",
            "20000",
            "--rate-limit",
            "0",
            "--outbound-queue-messages",
            "1000000",
            "--outbound-queue-bytes",
            "268435456",
        ])
        .start();
    let user = user_on_shard(&server, "chatty", 0, &[]);
    let bystander = user_on_shard(&server, "chatty", 0, &[&user]);
    let (mut bystander, _) = connect_user(&server, &bystander);
    let stream = tcp_connect_from(server.addr(), None, Some(4096));
    let mut chatty = RawWs::upgrade_on(stream, "/ws", &token(&user));
    assert_eq!(chatty.recv_json()["type"], "welcome");
    let socket = chatty.stream().try_clone().expect("clone the socket");

    // A writer that never stops on its own: 64 sends every 5 ms, each with
    // a long id that every reply repeats, until the socket is shut down
    // (or 60 s, so the test cannot hang on it).
    let mut writer = chatty.stream().try_clone().expect("clone the socket");
    let id = "i".repeat(250);
    let send = json!({ "type": "send", "id": id, "data": "chatter" }).to_string();
    let batch = frame(true, OP_TEXT, send.as_bytes()).repeat(64);
    let flood = std::thread::spawn(move || {
        let started = Instant::now();
        let mut sent = 0u64;
        while started.elapsed() < Duration::from_secs(60) {
            if writer.write_all(&batch).is_err() {
                break;
            }
            sent += 64;
            std::thread::sleep(Duration::from_millis(5));
        }
        sent
    });

    // Nothing read until replies wait in the server itself, past the
    // kernel's buffers (more than the 64 a batch leaves there for a
    // moment); then the signal.
    let backed_up = poll(Duration::from_secs(20), || {
        metric(server.api_addr(), &queued_series(0)) >= Some(500.0)
    });
    assert!(backed_up, "replies never backed up in the server");
    let term = Instant::now();
    server.signal(libc::SIGTERM);

    // Then a reader slower than the writer (a frame per 200 us at most), so
    // `unavailable` replies pile up behind what was queued at the signal:
    // the outbox is never empty again. Once the drain has ended it reads
    // at full speed, to the Close.
    let hurry = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hurried = hurry.clone();
    let reader = std::thread::spawn(move || {
        let mut replies = [0u64; 2];
        loop {
            let mut head = [0u8; 2];
            if chatty.stream().read_exact(&mut head).is_err() || head[0] & 0x0f == OP_CLOSE {
                return replies;
            }
            let frame = {
                // Short frames only (acks and errors), so the length fits
                // in the 16-bit form.
                let mut len = [0u8; 2];
                if head[1] & 0x7f == 126 && chatty.stream().read_exact(&mut len).is_err() {
                    return replies;
                }
                let n = match head[1] & 0x7f {
                    126 => u16::from_be_bytes(len) as usize,
                    n => n as usize,
                };
                let mut payload = vec![0u8; n];
                if chatty.stream().read_exact(&mut payload).is_err() {
                    return replies;
                }
                payload
            };
            let reply: Value = serde_json::from_slice(&frame).expect("JSON reply");
            match reply["code"].as_str() {
                None => replies[0] += 1,
                Some(code) => {
                    assert_eq!(code, "unavailable", "{reply}");
                    replies[1] += 1;
                }
            }
            if !hurried.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    });

    // The drain ends when what was queued at the signal has been written;
    // every connection of the shard is closed then.
    bystander.expect_close_within(1001, drain);
    let drained = term.elapsed();
    hurry.store(true, std::sync::atomic::Ordering::Relaxed);
    let replies = reader.join().expect("reader thread");
    let _ = socket.shutdown(std::net::Shutdown::Both);
    let sent = flood.join().expect("writer thread");
    println!(
        "chatty client: {sent} sends, {} acks and {} refusals read; the drain ended \
         {drained:?} after SIGTERM",
        replies[0], replies[1]
    );
    assert!(replies[1] > 0, "no send was refused during the drain");
    assert!(
        drained < drain / 2,
        "the drain lasted {drained:?}: replies to frames sent after the signal kept it going"
    );
    let status = server
        .wait_exit(Duration::from_secs(15))
        .expect("the server should exit after draining");
    assert!(status.success(), "exit status {status:?}");
}
