//! RFC 6455 framing on `/ws` with hand-built frames, which a library client
//! will not send: frames sent together with the upgrade request are served;
//! fragmented messages are reassembled (a ping may come in between, UTF-8
//! may be split across fragments); pings sent together get their pongs,
//! the latest always among them; and each violation closes with its code
//! (1002 protocol error, 1007 invalid UTF-8, 1009 too big or too many
//! fragments) while another user of the same shard keeps being served.

mod common;

use common::*;
use serde_json::json;

/// Sends `bytes` on a fresh connection of `user` and expects close `code`.
fn assert_closes(server: &Server, user: &str, bytes: &[u8], code: u16, what: &str) {
    let mut ws = RawWs::connect_user(server, user);
    ws.send_bytes(bytes);
    let frame = ws.recv_frame();
    assert_eq!(
        frame.opcode, OP_CLOSE,
        "{what}: expected close {code}, got {frame:?}"
    );
    assert_eq!(frame.close_code(), code, "{what}: {frame:?}");
}

#[test]
fn frames_sent_with_the_upgrade_request_are_served() {
    let server = Server::builder().shards(2).start();
    let ping = json!({ "type": "ping", "id": 42 }).to_string();
    let mut early = frame(true, OP_TEXT, ping.as_bytes());
    early.extend(frame(true, OP_PING, b"early"));

    let mut ws = RawWs::connect(&server, "/ws", &token("early-bird"), &early);
    assert_eq!(ws.recv_json()["type"], "welcome", "the welcome comes first");
    assert_eq!(ws.recv_json(), json!({ "type": "pong", "id": 42 }));
    let pong = ws.recv_frame();
    assert_eq!(
        (pong.opcode, pong.payload.as_slice()),
        (OP_PONG, &b"early"[..])
    );
}

#[test]
fn a_fragmented_message_is_reassembled_around_a_ping() {
    let server = Server::builder().shards(2).start();
    let (mut sibling, epoch) = connect_many(&server, "fragments", 1);
    let mut ws = RawWs::connect_user(&server, "fragments");

    // "é" (0xc3 0xa9) is split between two fragments: valid only joined.
    let text = json!({ "type": "send", "id": 5, "data": "caf\u{e9}!" }).to_string();
    let split = text.find('\u{e9}').unwrap() + 1;
    let (head, tail) = text.as_bytes().split_at(split);
    let (middle, tail) = tail.split_at(3);
    let mut bytes = frame(false, OP_TEXT, head);
    bytes.extend(frame(true, OP_PING, b"between"));
    bytes.extend(frame(false, OP_CONTINUATION, middle));
    bytes.extend(frame(true, OP_CONTINUATION, tail));
    ws.send_bytes(&bytes);

    let pong = ws.recv_frame();
    assert_eq!(
        (pong.opcode, pong.payload.as_slice()),
        (OP_PONG, &b"between"[..])
    );
    assert_eq!(
        ws.recv_json(),
        json!({ "type": "ack", "id": 5, "epoch": epoch, "seq": 1 })
    );
    assert_eq!(sibling[0].recv_json()["data"], "caf\u{e9}!");
}

#[test]
fn pings_written_together_get_their_pongs_and_the_latest_always_one() {
    let server = Server::builder().shards(2).start();
    let mut ws = RawWs::connect_user(&server, "pinger");

    // Ten pings in one write: each gets its own pong, in order.
    let mut ten = Vec::new();
    for i in 0..10 {
        ten.extend(frame(true, OP_PING, format!("ping-{i}").as_bytes()));
    }
    ws.send_bytes(&ten);
    for i in 0..10 {
        let pong = ws.recv_frame();
        assert_eq!(pong.opcode, OP_PONG, "pong {i}: {pong:?}");
        assert_eq!(pong.payload, format!("ping-{i}").into_bytes());
    }

    // Forty in one write, then a JSON ping: sixteen pongs wait for the
    // socket at most, and of the rest at least the latest is answered, in
    // the order sent (possibly after the reply to the JSON ping).
    let mut forty = Vec::new();
    for i in 0..40 {
        forty.extend(frame(true, OP_PING, format!("more-{i}").as_bytes()));
    }
    let done = json!({ "type": "ping", "id": "done" }).to_string();
    forty.extend(frame(true, OP_TEXT, done.as_bytes()));
    ws.send_bytes(&forty);
    let mut answered = Vec::new();
    let mut replied = false;
    while !(replied && answered.last() == Some(&39)) {
        let next = ws.recv_frame();
        if next.opcode == OP_TEXT {
            let value: serde_json::Value = serde_json::from_slice(&next.payload).unwrap();
            assert_eq!(value, json!({ "type": "pong", "id": "done" }));
            replied = true;
            continue;
        }
        assert_eq!(next.opcode, OP_PONG, "{next:?}");
        let text = String::from_utf8(next.payload).unwrap();
        let n: usize = text.strip_prefix("more-").unwrap().parse().unwrap();
        answered.push(n);
    }
    assert!(answered.windows(2).all(|w| w[0] < w[1]), "{answered:?}");
    assert!(
        answered.starts_with(&(0..16).collect::<Vec<_>>()),
        "{answered:?}"
    );
    assert!(answered.len() < 40, "every ping answered: {answered:?}");
    // Nothing else was pending: the next frame answers the next request.
    ws.expect_alive();
}

#[test]
fn protocol_violations_close_with_1002() {
    let server = Server::builder().shards(2).start();
    let ping = json!({ "type": "ping", "id": 1 }).to_string();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "unmasked frame",
            encode_frame(0x80 | OP_TEXT, ping.as_bytes(), false),
        ),
        (
            "RSV1 set",
            encode_frame(0x80 | 0x40 | OP_TEXT, ping.as_bytes(), true),
        ),
        ("reserved opcode 0x3", frame(true, 0x3, b"")),
        ("reserved control opcode 0xb", frame(true, 0xb, b"")),
        ("continuation first", frame(true, OP_CONTINUATION, b"x")),
        ("fragmented ping", frame(false, OP_PING, b"x")),
        ("ping longer than 125", frame(true, OP_PING, &[b'p'; 126])),
        ("close with a one-byte body", frame(true, OP_CLOSE, &[3])),
        ("close code 1005", frame_close(1005)),
        ("close code 999", frame_close(999)),
        ("new message inside a fragmented one", {
            let mut bytes = frame(false, OP_TEXT, b"{");
            bytes.extend(frame(true, OP_TEXT, b"{}"));
            bytes
        }),
    ];
    for (what, bytes) in &cases {
        assert_closes(&server, "violator", bytes, 1002, what);
    }
}

#[test]
fn invalid_utf8_closes_with_1007() {
    let server = Server::builder().shards(2).start();
    assert_closes(
        &server,
        "bad-utf8",
        &frame(true, OP_TEXT, b"{\"type\":\"ping\",\"id\":\xff}"),
        1007,
        "invalid text",
    );
    let mut split = frame(false, OP_TEXT, b"\"caf\xc3");
    split.extend(frame(true, OP_CONTINUATION, b"\x28\""));
    assert_closes(
        &server,
        "bad-utf8",
        &split,
        1007,
        "invalid across fragments",
    );

    let mut reason = 1000u16.to_be_bytes().to_vec();
    reason.extend_from_slice(b"bye \xfe");
    assert_closes(
        &server,
        "bad-utf8",
        &frame(true, OP_CLOSE, &reason),
        1007,
        "invalid close reason",
    );
}

#[test]
fn size_and_fragment_caps_close_with_1009_and_the_shard_keeps_serving() {
    let server = Server::builder()
        .shards(2)
        .args(["--max-message-size", "1024", "--max-fragments", "4"])
        .start();
    let user = user_on_shard(&server, "caps", 0, &[]);
    let neighbour = user_on_shard(&server, "caps", 0, &[&user]);
    let (mut neighbours, epoch) = connect_many(&server, &neighbour, 2);

    // Four fragments are fine.
    let mut ws = RawWs::connect_user(&server, &user);
    let mut bytes = frame(false, OP_TEXT, br#"{"type":"#);
    bytes.extend(frame(false, OP_CONTINUATION, br#""ping","#));
    bytes.extend(frame(false, OP_CONTINUATION, br#""id""#));
    bytes.extend(frame(true, OP_CONTINUATION, b":7}"));
    ws.send_bytes(&bytes);
    assert_eq!(ws.recv_json(), json!({ "type": "pong", "id": 7 }));

    // Five are one too many.
    let mut five = frame(false, OP_TEXT, b"\"a");
    for _ in 0..3 {
        five.extend(frame(false, OP_CONTINUATION, b"a"));
    }
    five.extend(frame(true, OP_CONTINUATION, b"\""));
    assert_closes(&server, &user, &five, 1009, "five fragments");

    // Small fragments adding up to more than the cap.
    let mut sum = frame(false, OP_TEXT, &[b' '; 600]);
    sum.extend(frame(true, OP_CONTINUATION, &[b' '; 600]));
    assert_closes(&server, &user, &sum, 1009, "fragments over the size cap");

    // A declared length over the cap is refused from the header alone.
    let mut header_only = vec![0x80 | OP_BINARY, 0x80 | 127];
    header_only.extend_from_slice(&(1u64 << 40).to_be_bytes());
    header_only.extend_from_slice(&MASK);
    assert_closes(&server, &user, &header_only, 1009, "declared 1 TiB");

    // The neighbour on the same shard was served all along.
    neighbours[0].send_data(&json!(1), &json!("fine"));
    assert_eq!(
        neighbours[0].recv_json(),
        json!({ "type": "ack", "id": 1, "epoch": epoch, "seq": 1 })
    );
    assert_eq!(neighbours[1].recv_json()["data"], "fine");

    // Only the connection that stayed within the caps is left.
    assert_eq!(presence(&server, &user).0, 1);
    ws.expect_alive();
    drop(ws);
    wait_presence(&server, &user, 0);
}

#[test]
fn the_server_closes_the_tcp_connection_after_a_close_exchange() {
    let server = Server::builder().shards(2).start();
    let mut ws = RawWs::connect_user(&server, "raw-closer");
    ws.send_bytes(&frame_close(1000));
    let answer = ws.recv_frame();
    assert_eq!(answer.close_code(), 1000);
    wait_presence(&server, "raw-closer", 0);

    // A violation: the server closes first and ends the TCP connection once
    // its close is answered.
    let mut ws = RawWs::connect_user(&server, "raw-closer");
    ws.send_bytes(&frame(true, 0x3, b""));
    ws.expect_close(1002);
}
