//! What hostile traffic on an open connection meets, over real loopback
//! sockets, with another user of the same shard (placement read from
//! `/api/v1/presence`) round-tripping all along:
//!
//! - the per-user rate limit: the burst is acked, the next frame gets one
//!   `rate_limited` with `retry_after_ms`, later frames in that window are
//!   dropped silently (no reply, no sequence number), and after
//!   `retry_after_ms` sends are acked again;
//! - a client that ignores `rate_limited` while flooding is closed with 1008,
//!   also when it paces its flood so that a frame gets through now and then;
//! - JSON nested 1000 deep (arrays, objects, unclosed) is `bad_message` and
//!   the connection lives on; the depth cap is exact and strings don't count;
//! - a flood of 10,000 WebSocket pings from a client that reads nothing
//!   leaves the server's outbox bounded: at most 17 pongs queued at a time,
//!   and far fewer than 10,000 in all;
//! - a connection that never reads (tiny `SO_RCVBUF`) is closed with 4008
//!   once its queue passes `--outbound-queue-bytes`, while its sibling's
//!   sends keep being acked.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};
use tungstenite::Message;

/// Two users on shard 0: the attacker and a neighbour.
fn attacker_and_neighbour(server: &Server, prefix: &str) -> (String, String) {
    let attacker = user_on_shard(server, prefix, 0, &[]);
    let neighbour = user_on_shard(server, prefix, 0, &[&attacker]);
    (attacker, neighbour)
}

/// Round-trip statistics of a neighbour.
struct RoundTrips {
    client: Client,
    times: Vec<Duration>,
}

impl RoundTrips {
    fn summary(&self) -> String {
        let mut sorted = self.times.clone();
        sorted.sort();
        let at = |q: f64| sorted[((sorted.len() - 1) as f64 * q) as usize];
        format!(
            "{} round trips, p50 {:?}, p99 {:?}, max {:?}",
            sorted.len(),
            at(0.5),
            at(0.99),
            at(1.0)
        )
    }

    fn max(&self) -> Duration {
        self.times.iter().copied().max().unwrap_or_default()
    }
}

/// One WebSocket ping and its pong: a round trip through the shard that
/// the message rate limit does not charge (the neighbour shares the limit's
/// settings with the flooder).
fn ws_round_trip(client: &mut Client, id: u64) {
    let payload = id.to_be_bytes().to_vec();
    client.send(Message::Ping(payload.clone().into()));
    loop {
        match client.recv() {
            Message::Pong(got) if got[..] == payload[..] => return,
            Message::Ping(_) => continue,
            other => panic!("expected pong {id}, got {other:?}"),
        }
    }
}

/// Round-trips WebSocket pings on `client` until `stop` is set (at most
/// 20,000 times and 20 s), in its own thread.
fn round_trip_until(mut client: Client, stop: Arc<AtomicBool>) -> JoinHandle<RoundTrips> {
    std::thread::spawn(move || {
        let started = Instant::now();
        let mut times = Vec::new();
        for id in 0..20_000u64 {
            if stop.load(Ordering::Relaxed) && !times.is_empty() {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(20), "bounded");
            let sent = Instant::now();
            ws_round_trip(&mut client, id);
            times.push(sent.elapsed());
        }
        RoundTrips { client, times }
    })
}

/// A JSON `send` frame, masked, as a raw client sends it.
fn send_frame(id: u64, data: &Value) -> Vec<u8> {
    let text = json!({ "type": "send", "id": id, "data": data }).to_string();
    frame(true, OP_TEXT, text.as_bytes())
}

fn shard_series(name: &str, shard: u64) -> String {
    format!("{name}{{shard=\"{shard}\"}}")
}

#[test]
fn the_rate_limit_answers_once_drops_silently_then_recovers() {
    let server = Server::builder()
        .shards(2)
        .args([
            "--rate-limit",
            "1",
            "--rate-burst",
            "5",
            "--abuse-limit",
            "1000",
        ])
        .start();
    let (user, neighbour) = attacker_and_neighbour(&server, "rate");
    let (mut clients, epoch) = connect_many(&server, &user, 2);
    let (mut neighbours, _) = connect_many(&server, &neighbour, 1);
    let limited = shard_series("shardgate_shard_rate_limited_total", 0);
    assert_eq!(metric(server.addr(), &limited), Some(0.0));

    // The burst goes through.
    for id in 1..=5u64 {
        clients[0].send_data(&json!(id), &json!(id));
        assert_eq!(
            clients[0].recv_json(),
            json!({ "type": "ack", "id": id, "epoch": epoch, "seq": id })
        );
    }

    // One more: one rate_limited, carrying the frame's id and the wait.
    clients[0].send_data(&json!(6), &json!(6));
    let refusal = clients[0].recv_json();
    assert_eq!(refusal["type"], "error", "{refusal}");
    assert_eq!(refusal["code"], "rate_limited", "{refusal}");
    assert_eq!(refusal["id"], 6, "{refusal}");
    let retry_after_ms = refusal["retry_after_ms"]
        .as_u64()
        .unwrap_or_else(|| panic!("retry_after_ms: {refusal}"));
    assert!(
        (1..=1000).contains(&retry_after_ms),
        "retry_after_ms {retry_after_ms} at 1 message/s"
    );
    let refused_at = Instant::now();

    // Within the window: dropped with no answer, from either connection (the
    // budget is the user's), and no other frame is answered either.
    for id in 7..=9u64 {
        clients[0].send_data(&json!(id), &json!(id));
    }
    clients[1].send_data(&json!(70), &json!(70));
    clients[1].send_json(&json!({ "type": "ping", "id": 71 }));

    // The neighbour on the same shard is not limited.
    neighbours[0].ping_pong(1);
    neighbours[0].send_data(&json!(1), &json!("neighbour"));
    assert_eq!(neighbours[0].recv_type("ack")["seq"], 1);
    assert!(
        refused_at.elapsed() < Duration::from_millis(retry_after_ms),
        "the silent-drop checks took longer than the window; rerun on a less loaded machine"
    );

    // After the wait, sends are acked again: the next frame on this
    // connection is that ack, with the very next number.
    std::thread::sleep(
        Duration::from_millis(retry_after_ms + 20).saturating_sub(refused_at.elapsed()),
    );
    clients[0].send_data(&json!(10), &json!(10));
    assert_eq!(
        clients[0].recv_json(),
        json!({ "type": "ack", "id": 10, "epoch": epoch, "seq": 6 })
    );

    // The next window gets its own single notice.
    clients[0].send_data(&json!(11), &json!(11));
    let again = clients[0].recv_json();
    assert_eq!(
        (again["code"].as_str(), again["id"].as_u64()),
        (Some("rate_limited"), Some(11)),
        "{again}"
    );

    // The sibling received exactly the six accepted messages, then the
    // sentinel (the API is not rate limited); its own refused frames got no
    // answer at all.
    for seq in 1..=6u64 {
        let frame = clients[1].recv_json();
        assert_eq!(frame["type"], "message", "{frame}");
        assert_eq!(frame["seq"], seq, "{frame}");
    }
    assert_eq!(publish(&server, &user, &json!("sentinel"))["seq"], 7);
    for client in &mut clients {
        assert_eq!(client.recv_json()["data"], "sentinel");
    }
    // Refused: 6, 7, 8, 9, 70, 71 and 11.
    assert_eq!(metric(server.addr(), &limited), Some(7.0));
    assert!(server.wait_for_log("rate_limited", POLL_TIMEOUT));
}

#[test]
fn a_client_ignoring_rate_limited_is_closed_1008_while_its_neighbour_is_served() {
    // One token a second: the server has a whole second to refuse the
    // abuse limit's worth of frames in a row, even on a loaded machine.
    let abuse_limit: u64 = 2000;
    let server = Server::builder()
        .shards(2)
        .args([
            "--rate-limit",
            "1",
            "--rate-burst",
            "10",
            "--abuse-limit",
            &abuse_limit.to_string(),
        ])
        .start();
    let (user, neighbour) = attacker_and_neighbour(&server, "abuse");
    let (neighbours, _) = connect_many(&server, &neighbour, 1);
    let mut flooder = RawWs::connect_user(&server, &user);

    let stop = Arc::new(AtomicBool::new(false));
    let watcher = round_trip_until(neighbours.into_iter().next().unwrap(), stop.clone());

    // Flood: 20,000 sends in writes of 500, never reading; a write error
    // means the server has given up on us.
    let started = Instant::now();
    let mut written = 0u64;
    'flood: for batch in 0..40u64 {
        let mut bytes = Vec::new();
        for i in 0..500 {
            bytes.extend(send_frame(batch * 500 + i, &json!("flood")));
        }
        if flooder.try_send_bytes(&bytes).is_err() {
            break 'flood;
        }
        written += 500;
        if started.elapsed() > Duration::from_secs(10) {
            break;
        }
    }
    let flood_time = started.elapsed();

    // What came back: acks while tokens lasted, rate_limited notices (one
    // per window), then close 1008.
    let (mut acks, mut notices) = (0u64, 0u64);
    let code = loop {
        match flooder.next_event(IO_TIMEOUT) {
            RawEvent::Frame(frame) if frame.opcode == OP_TEXT => {
                let value: Value = serde_json::from_slice(&frame.payload).unwrap();
                match (value["type"].as_str(), value["code"].as_str()) {
                    (Some("ack"), _) => acks += 1,
                    (Some("error"), Some("rate_limited")) => {
                        assert!(value["retry_after_ms"].as_u64().is_some(), "{value}");
                        notices += 1;
                    }
                    _ => panic!("unexpected frame {value}"),
                }
            }
            RawEvent::Frame(frame) if frame.opcode == OP_CLOSE => break frame.close_code(),
            other => panic!("expected close 1008, got {other:?}"),
        }
    };
    assert_eq!(code, 1008);
    stop.store(true, Ordering::Relaxed);
    let mut trips = watcher.join().expect("neighbour thread");
    println!(
        "flood: {written} sends written in {flood_time:?}; {acks} acked, {notices} \
         rate_limited notices; neighbour during the flood: {}",
        trips.summary()
    );
    assert!(acks >= 10, "the burst was acked: {acks}");
    assert!(notices >= 1);
    assert!(
        acks + notices + abuse_limit <= written,
        "closed before the abuse limit: {acks} acks, {notices} notices"
    );
    assert!(
        trips.max() < Duration::from_secs(2),
        "the neighbour stalled: {}",
        trips.summary()
    );

    wait_presence(&server, &user, 0);
    let closes = metric(
        server.addr(),
        &shard_series("shardgate_shard_abuse_closes_total", 0),
    );
    assert_eq!(closes, Some(1.0));
    ws_round_trip(&mut trips.client, u64::MAX);
    assert!(server.wait_for_log("rate_abuse", POLL_TIMEOUT));
}

#[test]
fn a_paced_flood_that_ignores_rate_limited_is_also_closed_1008() {
    let server = Server::builder()
        .shards(2)
        .args([
            "--rate-limit",
            "10",
            "--rate-burst",
            "10",
            "--abuse-limit",
            "50",
        ])
        .start();
    let (user, neighbour) = attacker_and_neighbour(&server, "paced");
    let (mut neighbours, _) = connect_many(&server, &neighbour, 1);
    let mut flooder = RawWs::connect_user(&server, &user);

    // 20 frames every 100 ms (the refill interval) for 2 s: 200 a second
    // against a limit of 10, every notice ignored.
    let started = Instant::now();
    let mut written = 0u64;
    for tick in 0..20u64 {
        let mut bytes = Vec::new();
        for i in 0..20 {
            bytes.extend(send_frame(tick * 20 + i, &json!("paced")));
        }
        if flooder.try_send_bytes(&bytes).is_err() {
            break;
        }
        written += 20;
        let next = Duration::from_millis(100 * (tick + 1));
        std::thread::sleep(next.saturating_sub(started.elapsed()));
    }

    let (mut acks, mut notices) = (0u64, 0u64);
    let code = loop {
        match flooder.next_event(Duration::from_millis(500)) {
            RawEvent::Frame(f) if f.opcode == OP_TEXT => {
                let value: Value = serde_json::from_slice(&f.payload).unwrap();
                match value["type"].as_str() {
                    Some("ack") => acks += 1,
                    _ => notices += 1,
                }
            }
            RawEvent::Frame(f) if f.opcode == OP_CLOSE => break Some(f.close_code()),
            RawEvent::Frame(_) => {}
            RawEvent::Closed | RawEvent::TimedOut => break None,
        }
    };
    let refused = written - acks;
    println!(
        "paced flood: {written} sends in {:?}, {acks} acked, {refused} refused \
         ({notices} notices), ending {code:?}",
        started.elapsed()
    );
    neighbours[0].ping_pong(1);
    assert!(refused * 10 >= written * 8, "the flood was mostly refused");
    assert_eq!(
        code,
        Some(1008),
        "{refused} of {written} frames refused, every notice ignored, and still open"
    );
}

#[test]
fn json_nested_1000_deep_is_bad_message_and_the_connection_lives() {
    let server = Server::builder().shards(2).start();
    let user = "deep-nester";
    let (mut clients, epoch) = connect_many(&server, user, 2);
    let envelope = |data: &str, id: u64| format!(r#"{{"type":"send","id":{id},"data":{data}}}"#);

    let deep_arrays = format!("{}{}", "[".repeat(1000), "]".repeat(1000));
    let deep_objects = format!("{}1{}", r#"{"a":"#.repeat(1000), "}".repeat(1000));
    let unclosed = "[".repeat(1000);
    for (what, text) in [
        ("arrays", envelope(&deep_arrays, 1)),
        ("objects", envelope(&deep_objects, 2)),
        ("unclosed", envelope(&unclosed, 3)),
        ("bare", deep_arrays.clone()),
    ] {
        clients[0].send_text(&text);
        let error = clients[0].recv_json();
        assert_eq!(error["type"], "error", "{what}: {error}");
        assert_eq!(error["code"], "bad_message", "{what}: {error}");
        clients[0].ping_pong(10);
    }

    // The cap (32) is exact: the envelope is the first level.
    let at_cap = format!("{}{}", "[".repeat(31), "]".repeat(31));
    clients[0].send_text(&envelope(&at_cap, 4));
    assert_eq!(
        clients[0].recv_json(),
        json!({ "type": "ack", "id": 4, "epoch": epoch, "seq": 1 })
    );
    let over = format!("{}{}", "[".repeat(32), "]".repeat(32));
    clients[0].send_text(&envelope(&over, 5));
    assert_eq!(clients[0].recv_json()["code"], "bad_message");

    // Brackets inside strings are not nesting, escaped quotes included.
    let in_string = json!(format!("\"{}", "[{".repeat(1000)));
    clients[0].send_data(&json!(6), &in_string);
    assert_eq!(
        clients[0].recv_json(),
        json!({ "type": "ack", "id": 6, "epoch": epoch, "seq": 2 })
    );

    // The sibling got exactly the two accepted ones.
    let first = clients[1].recv_json();
    assert_eq!(first["seq"], 1);
    assert_eq!(
        first["data"],
        serde_json::from_str::<Value>(&at_cap).unwrap()
    );
    let second = clients[1].recv_json();
    assert_eq!(
        (second["seq"].clone(), second["data"].clone()),
        (json!(2), in_string)
    );
    clients[1].expect_silence(Duration::from_millis(100));
}

#[test]
fn a_ping_flood_from_a_client_that_reads_nothing_leaves_the_outbox_bounded() {
    let server = Server::builder().shards(2).start();
    let (user, neighbour) = attacker_and_neighbour(&server, "pingflood");
    let (mut neighbours, _) = connect_many(&server, &neighbour, 1);
    let mut flooder = RawWs::connect_user(&server, &user);
    let queued = shard_series("shardgate_shard_queued_messages", 0);

    // 10,000 masked pings with a payload each, written without reading.
    let pings = 10_000;
    let payload = [b'p'; 16];
    let one = frame(true, OP_PING, &payload);
    let started = Instant::now();
    for _ in 0..10 {
        let batch: Vec<u8> = one.repeat(pings / 10);
        flooder.send_bytes(&batch);
    }
    let flood_time = started.elapsed();

    // Still not reading: the server holds at most the pongs it queues
    // before it answers only the latest ping, and that one.
    let mut peak = 0.0f64;
    for _ in 0..5 {
        let now = metric(server.addr(), &queued).expect("queued messages");
        peak = peak.max(now);
        neighbours[0].ping_pong(1);
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(peak <= 17.0, "queued messages on the shard reached {peak}");

    // Now read: pongs, then the answer to a JSON ping sent last.
    let done = json!({ "type": "ping", "id": "done" }).to_string();
    flooder.send_bytes(&frame(true, OP_TEXT, done.as_bytes()));
    let mut pongs = 0;
    loop {
        match flooder.next_event(IO_TIMEOUT) {
            RawEvent::Frame(f) if f.opcode == OP_PONG => {
                assert_eq!(f.payload, payload);
                pongs += 1;
            }
            RawEvent::Frame(f) if f.opcode == OP_TEXT => {
                let value: Value = serde_json::from_slice(&f.payload).unwrap();
                assert_eq!(value, json!({ "type": "pong", "id": "done" }));
                break;
            }
            other => panic!("unexpected {other:?} after {pongs} pongs"),
        }
    }
    println!(
        "ping flood: {pings} pings written in {flood_time:?}; {pongs} pongs came back; \
         peak queued messages on the shard {peak}"
    );
    // The latest ping's pong may follow the JSON pong.
    let alive = json!({ "type": "ping", "id": "alive" }).to_string();
    flooder.send_bytes(&frame(true, OP_TEXT, alive.as_bytes()));
    loop {
        let next = flooder.recv_frame();
        if next.opcode == OP_PONG {
            pongs += 1;
            continue;
        }
        let value: Value = serde_json::from_slice(&next.payload).unwrap();
        assert_eq!(value, json!({ "type": "pong", "id": "alive" }));
        break;
    }
    println!("ping flood: {pongs} pongs in all");
    assert!(pongs >= 1, "at least the last ping is answered");
    assert!(
        pongs <= pings / 10,
        "{pongs} pongs for {pings} unread pings"
    );
    neighbours[0].ping_pong(2);
}

#[test]
fn a_connection_that_never_reads_is_closed_4008_and_its_sibling_keeps_sending() {
    let server = Server::builder()
        .shards(2)
        .args(["--outbound-queue-bytes", "65536", "--rate-limit", "0"])
        .start();
    let (user, neighbour) = attacker_and_neighbour(&server, "stalled");
    let (mut neighbours, _) = connect_many(&server, &neighbour, 1);

    // The slow connection: a receive buffer of a few KiB, set before
    // connect, and nothing read after the welcome.
    let stream = tcp_connect_from(server.addr(), None, Some(4096));
    let mut slow = RawWs::upgrade_on(stream, "/ws", &token(&user));
    let welcome = slow.recv_json();
    assert_eq!(welcome["type"], "welcome");
    let epoch = welcome["epoch"].clone();
    let (mut sender, sender_welcome) = connect_user(&server, &user);
    assert_eq!(sender_welcome["epoch"], epoch);

    // 16 KiB messages until the slow one is cut off (bounded: 200 = 3 MiB).
    let data = json!("m".repeat(16 * 1024));
    let mut sent = 0;
    let mut neighbour_max = Duration::ZERO;
    for id in 1..=200u64 {
        sender.send_data(&json!(id), &data);
        let ack = sender.recv_json();
        assert_eq!(
            ack,
            json!({ "type": "ack", "id": id, "epoch": epoch, "seq": id })
        );
        sent = id;
        if id % 4 == 0 {
            let before = Instant::now();
            neighbours[0].ping_pong(id);
            neighbour_max = neighbour_max.max(before.elapsed());
            if presence(&server, &user).0 == 1 {
                break;
            }
        }
    }
    assert!(sent < 200, "the slow connection was never cut off");
    println!(
        "slow consumer cut off after {sent} messages of 16 KiB; \
         neighbour max round trip {neighbour_max:?}"
    );

    // The sender is served as before.
    for id in sent + 1..=sent + 5 {
        sender.send_data(&json!(id), &json!("after"));
        assert_eq!(sender.recv_json()["seq"], id);
    }
    assert_eq!(
        metric(
            server.addr(),
            &shard_series("shardgate_shard_slow_consumers_total", 0)
        ),
        Some(1.0)
    );

    // The slow one finally reads: consecutive messages from 1, then close
    // 4008 (or the end of the socket), and nothing sent after the cut.
    let mut last = 0;
    let ending = loop {
        match slow.next_event(IO_TIMEOUT) {
            RawEvent::Frame(f) if f.opcode == OP_TEXT => {
                let value: Value = serde_json::from_slice(&f.payload).unwrap();
                assert_eq!(value["type"], "message");
                assert_eq!(value["seq"], last + 1, "a gap before the close");
                assert_eq!(value["data"], data);
                last += 1;
            }
            RawEvent::Frame(f) if f.opcode == OP_CLOSE => break Some(f.close_code()),
            RawEvent::Frame(f) if f.opcode == OP_PING => {}
            RawEvent::Closed => break None,
            other => panic!("unexpected {other:?}"),
        }
    };
    println!("the slow connection read {last} messages, then {ending:?}");
    assert!(last < sent, "nothing was dropped?");
    if let Some(code) = ending {
        assert_eq!(code, 4008);
    }
    neighbours[0].ping_pong(1000);
    neighbours[0].expect_silence(Duration::from_millis(100));
}
