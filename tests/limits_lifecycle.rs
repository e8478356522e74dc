//! The life of a connection at its limits, over real loopback sockets:
//!
//! - heartbeats: a client that reads (and so answers the server's pings) or
//!   that keeps writing stays open well past the pong timeout; a peer that
//!   completes the upgrade and then goes silent is dropped without a close
//!   frame, and leaves no connection, user or presence behind;
//! - the close handshake: a client's Close is answered at once and the TCP
//!   connection ends; a client that never answers the server's Close is torn
//!   down after `--close-timeout-ms`, not before;
//! - token expiry is per connection: the expiring one closes with 4001, its
//!   sibling (another token) goes on in the same epoch;
//! - the per-shard connection cap answers 503 with `Retry-After` for that
//!   shard only, and frees up when a connection closes;
//! - fault injection (module gated on `--features fault-injection`, so the
//!   rest of the file runs in any build): a panic while handling a frame
//!   closes only that connection (1011); a panic in the middle of a user's
//!   fan-out, from a client `send` or an API publish, closes all of that
//!   user's connections (1011) and the next connection starts a new epoch;
//!   other users of the shard are untouched and
//!   `shardgate_shard_panics_total` counts every panic.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use tungstenite::Message;

fn shard_series(name: &str, shard: u64) -> String {
    format!("{name}{{shard=\"{shard}\"}}")
}

/// Polls `/metrics` until `series` equals `value`; how long it took.
fn wait_metric(server: &Server, series: &str, value: f64, timeout: Duration) -> Duration {
    let started = Instant::now();
    let mut last = None;
    let reached = poll(timeout, || {
        last = metric(server.addr(), series);
        last == Some(value)
    });
    assert!(reached, "{series} stayed {last:?}, wanted {value}");
    started.elapsed()
}

#[test]
fn heartbeats_keep_live_peers_and_drop_a_silent_one() {
    let server = Server::builder()
        .shards(2)
        .args(["--ping-interval-ms", "200", "--pong-timeout-ms", "400"])
        .start();
    let reader_user = user_on_shard(&server, "beat", 0, &[]);
    let writer_user = user_on_shard(&server, "beat", 0, &[&reader_user]);
    let silent_user = user_on_shard(&server, "beat", 0, &[&reader_user, &writer_user]);
    let connections = shard_series("shardgate_shard_connections", 0);
    let users = shard_series("shardgate_shard_users", 0);
    let timeouts = shard_series("shardgate_shard_pong_timeouts_total", 0);

    // A reader: tungstenite answers each ping when it next reads.
    let (mut reader, _) = connect_user(&server, &reader_user);
    // A writer that never reads: its frames alone prove it is alive.
    let mut writer = RawWs::connect_user(&server, &writer_user);
    // A silent peer: upgrade, welcome, then nothing at all.
    let mut silent = RawWs::connect_user(&server, &silent_user);
    let silent_since = Instant::now();

    let started = Instant::now();
    let mut pings = 0;
    let mut writes = 0;
    let mut silent_dropped = None;
    while started.elapsed() < Duration::from_secs(2) {
        // What the silent peer sees: pings at most, then the end of the
        // socket, no close frame.
        while silent_dropped.is_none() {
            match silent.next_event(Duration::from_millis(1)) {
                RawEvent::Frame(f) if f.opcode == OP_PING => {}
                RawEvent::Closed => silent_dropped = Some(silent_since.elapsed()),
                RawEvent::TimedOut => break,
                RawEvent::Frame(f) => panic!("a dead peer got {f:?}"),
            }
        }
        match reader.try_recv(Duration::from_millis(100)) {
            Ok(Some(Message::Ping(_))) => pings += 1,
            Ok(None) => {}
            Ok(Some(other)) => panic!("reader got {other:?}"),
            Err(err) => panic!("reader connection failed: {err}"),
        }
        if writes * 50 < started.elapsed().as_millis() {
            let ping = json!({ "type": "ping", "id": writes }).to_string();
            writer.send_bytes(&frame(true, OP_TEXT, ping.as_bytes()));
            writes += 1;
        }
    }
    println!("the reader answered {pings} server pings in 2 s");
    assert!(pings >= 3, "the server pinged a quiet reader {pings} times");

    // The silent one is gone: no connection, no user, no presence.
    wait_metric(&server, &connections, 2.0, Duration::from_secs(3));
    assert_eq!(presence(&server, &silent_user).0, 0);
    assert_eq!(metric(server.addr(), &users), Some(2.0));
    assert_eq!(metric(server.addr(), &timeouts), Some(1.0));
    let dropped_after = silent_dropped.expect("the silent peer's socket was never closed");
    println!("the silent peer was dropped {dropped_after:?} after its welcome");
    // Ping after 200 ms of silence, drop 400 ms later (50 ms sweeps).
    assert!(
        dropped_after >= Duration::from_millis(550) && dropped_after < Duration::from_secs(3),
        "dropped after {dropped_after:?}"
    );

    // The live ones are still open and served.
    reader.ping_pong(1);
    assert_eq!(presence(&server, &reader_user).0, 1);
    assert_eq!(presence(&server, &writer_user).0, 1);
    // Its answers, in order (a loaded machine may have delayed a write
    // enough for the server to ping it too).
    let mut id = 0;
    while id < writes {
        let f = writer.recv_frame();
        if f.opcode == OP_PING {
            continue;
        }
        assert_eq!(f.opcode, OP_TEXT, "{f:?}");
        let value: serde_json::Value = serde_json::from_slice(&f.payload).unwrap();
        assert_eq!(value, json!({ "type": "pong", "id": id }));
        id += 1;
    }
    writer.expect_alive();
}

#[test]
fn a_clients_close_is_answered_at_once_and_the_connection_ends() {
    // A long close timeout: ending the connection must not wait for it.
    let server = Server::builder()
        .shards(2)
        .args(["--close-timeout-ms", "10000"])
        .start();
    let mut ws = RawWs::connect_user(&server, "prompt-closer");

    let started = Instant::now();
    let mut reason = 4321u16.to_be_bytes().to_vec();
    reason.extend_from_slice(b"done here");
    ws.send_bytes(&frame(true, OP_CLOSE, &reason));
    let answer = match ws.next_event(Duration::from_secs(2)) {
        RawEvent::Frame(f) => f,
        other => panic!("no close answer: {other:?}"),
    };
    assert_eq!(answer.close_code(), 4321, "the code is echoed");
    let answered = started.elapsed();
    assert!(
        matches!(ws.next_event(Duration::from_secs(2)), RawEvent::Closed),
        "the server kept the TCP connection"
    );
    let ended = started.elapsed();
    println!("close answered after {answered:?}, TCP ended after {ended:?}");
    assert!(ended < Duration::from_secs(1), "took {ended:?}");
    wait_metric(
        &server,
        &shard_series(
            "shardgate_shard_connections",
            presence(&server, "prompt-closer").1,
        ),
        0.0,
        POLL_TIMEOUT,
    );
}

#[test]
fn a_peer_that_never_answers_the_servers_close_is_torn_down_after_the_timeout() {
    let server = Server::builder()
        .shards(2)
        .args(["--close-timeout-ms", "500", "--max-message-size", "1024"])
        .start();
    let user = user_on_shard(&server, "mute", 0, &[]);
    let neighbour = user_on_shard(&server, "mute", 0, &[&user]);
    let (mut neighbours, _) = connect_many(&server, &neighbour, 1);
    let connections = shard_series("shardgate_shard_connections", 0);
    let mut ws = RawWs::connect_user(&server, &user);

    // An oversized message makes the server close with 1009; this client
    // then neither reads further nor writes.
    ws.send_bytes(&frame(true, OP_TEXT, &[b' '; 2000]));
    let close = match ws.next_event(IO_TIMEOUT) {
        RawEvent::Frame(f) => f,
        other => panic!("expected close 1009, got {other:?}"),
    };
    assert_eq!(close.close_code(), 1009);
    let closed_at = Instant::now();

    // Within the timeout the server still holds the socket, waiting.
    let early = metric(server.addr(), &connections);
    let asked_within = closed_at.elapsed();
    if asked_within < Duration::from_millis(400) {
        assert_eq!(early, Some(2.0), "dropped before the close timeout");
    } else {
        println!("(metrics too slow to observe the wait: {asked_within:?})");
    }
    // Then it lets go.
    let gone = wait_metric(&server, &connections, 1.0, Duration::from_secs(5)) + asked_within;
    println!("an unanswered close was torn down {gone:?} after it was received");
    assert!(gone < Duration::from_secs(5), "took {gone:?}");
    assert_eq!(presence(&server, &user).0, 0);
    neighbours[0].ping_pong(1);

    // The server ended the TCP connection.
    assert!(matches!(ws.next_event(IO_TIMEOUT), RawEvent::Closed));
}

#[test]
fn token_expiry_closes_only_the_expiring_connection_with_4001() {
    let server = Server::builder()
        .shards(2)
        .args(["--jwt-leeway", "0"])
        .start();
    let user = "two-tokens";
    let (mut long_lived, welcome) = connect_user(&server, user);
    let epoch = welcome["epoch"].clone();
    let start = now();
    let short = token_with(
        &json!({ "sub": user, "iat": start, "exp": start + 2 }),
        jsonwebtoken::Algorithm::HS256,
        &hs_key(),
    );
    let mut expiring = ws_connect(&server, &short);
    assert_eq!(expiring.recv_type("welcome")["epoch"], epoch);
    let (_, shard) = presence(&server, user);

    expiring.expect_close_within(4001, Duration::from_secs(8));
    assert_eq!(presence(&server, user).0, 1);

    // The other connection goes on, in the same epoch.
    long_lived.send_data(&json!(1), &json!("still mine"));
    assert_eq!(
        long_lived.recv_json(),
        json!({ "type": "ack", "id": 1, "epoch": epoch, "seq": 1 })
    );
    assert_eq!(
        metric(
            server.addr(),
            &shard_series("shardgate_shard_expired_total", shard)
        ),
        Some(1.0)
    );
}

#[test]
fn the_per_shard_cap_is_503_with_retry_after_for_that_shard_only() {
    let server = Server::builder()
        .shards(2)
        .args(["--max-connections-per-shard", "2"])
        .start();
    let a = user_on_shard(&server, "full", 0, &[]);
    let b = user_on_shard(&server, "full", 0, &[&a]);
    let c = user_on_shard(&server, "full", 0, &[&a, &b]);
    let other = user_on_shard(&server, "full", 1, &[]);

    let (mut a_client, _) = connect_user(&server, &a);
    let (mut b_client, _) = connect_user(&server, &b);

    // Shard 0 is full, for a new user and for a connected one alike.
    for user in [&c, &a] {
        let refused = upgrade_with(&server, "/ws", Carrier::Header, &token(user));
        assert_eq!(refused.status, 503, "{user}: {}", refused.text());
        let retry = refused.header("Retry-After").expect("Retry-After");
        assert!(retry.trim().parse::<u64>().is_ok_and(|s| s >= 1), "{retry}");
    }
    // Shard 1 is not.
    let (mut other_client, _) = connect_many(&server, &other, 2);
    other_client[0].ping_pong(1);
    // Shard 0's connections are served.
    a_client.ping_pong(1);
    b_client.ping_pong(1);
    assert_eq!(
        metric(
            server.addr(),
            &shard_series("shardgate_shard_refused_shard_cap_total", 0)
        ),
        Some(2.0)
    );

    // One leaves: the next one gets in.
    assert_eq!(b_client.close(1000), 1000);
    wait_metric(
        &server,
        &shard_series("shardgate_shard_connections", 0),
        1.0,
        POLL_TIMEOUT,
    );
    let (mut c_client, _) = connect_user(&server, &c);
    c_client.ping_pong(2);
}

#[cfg(feature = "fault-injection")]
mod fault_injection {
    use super::*;

    const IN_CONNECTION: &str = "__shardgate_fault_in_connection__";
    const IN_DELIVERY: &str = "__shardgate_fault_in_delivery__";

    fn panics(server: &Server) -> Option<f64> {
        metric(
            server.addr(),
            &shard_series("shardgate_shard_panics_total", 0),
        )
    }

    #[test]
    fn a_panic_handling_a_frame_closes_only_that_connection() {
        let server = Server::builder().shards(2).start();
        let user = user_on_shard(&server, "fault-conn", 0, &[]);
        let neighbour = user_on_shard(&server, "fault-conn", 0, &[&user]);
        let (mut clients, epoch) = connect_many(&server, &user, 2);
        let (mut neighbours, n_epoch) = connect_many(&server, &neighbour, 2);
        assert_eq!(panics(&server), Some(0.0));

        clients[0].send_data(&json!(1), &json!(IN_CONNECTION));
        clients[0].expect_close(1011);
        assert_eq!(panics(&server), Some(1.0));
        wait_presence(&server, &user, 1);

        // The sibling keeps its manager: same epoch, and the failed frame
        // used no number.
        clients[1].send_data(&json!(2), &json!("after the fault"));
        assert_eq!(
            clients[1].recv_json(),
            json!({ "type": "ack", "id": 2, "epoch": epoch, "seq": 1 })
        );
        let (mut late, welcome) = connect_user(&server, &user);
        assert_eq!(welcome["epoch"], epoch);
        assert_eq!(welcome["seq"], 1);
        late.ping_pong(3);

        // The neighbour on the shard saw nothing of it.
        neighbours[0].send_data(&json!(1), &json!("unaffected"));
        assert_eq!(
            neighbours[0].recv_json(),
            json!({ "type": "ack", "id": 1, "epoch": n_epoch, "seq": 1 })
        );
        assert_eq!(neighbours[1].recv_json()["data"], "unaffected");
    }

    #[test]
    fn a_panic_mid_fan_out_closes_the_users_connections_and_starts_a_new_epoch() {
        let server = Server::builder().shards(2).start();
        let user = user_on_shard(&server, "fault-fan", 0, &[]);
        let neighbour = user_on_shard(&server, "fault-fan", 0, &[&user]);
        let (mut clients, epoch) = connect_many(&server, &user, 3);
        let (mut neighbours, n_epoch) = connect_many(&server, &neighbour, 2);
        clients[0].send_data(&json!(1), &json!("before"));
        clients[0].recv_type("ack");
        for client in &mut clients[1..] {
            assert_eq!(client.recv_json()["seq"], 1);
        }

        clients[2].send_data(&json!(2), &json!(IN_DELIVERY));
        // Every connection of the user closes with 1011: nothing of the
        // interrupted delivery arrives first.
        for client in &mut clients {
            client.expect_close(1011);
        }
        wait_presence(&server, &user, 0);
        assert_eq!(panics(&server), Some(1.0));

        // A new connection gets a new manager: new epoch, numbering afresh.
        let (mut fresh, welcome) = connect_user(&server, &user);
        assert_ne!(welcome["epoch"], epoch, "the suspect manager was kept");
        assert_eq!(welcome["seq"], 0);
        fresh.send_data(&json!(3), &json!("rebuilt"));
        assert_eq!(fresh.recv_type("ack")["seq"], 1);

        // The neighbour keeps its manager, epoch and numbers.
        neighbours[0].send_data(&json!(1), &json!("unaffected"));
        assert_eq!(
            neighbours[0].recv_json(),
            json!({ "type": "ack", "id": 1, "epoch": n_epoch, "seq": 1 })
        );
        assert_eq!(neighbours[1].recv_json()["data"], "unaffected");

        // The fault is repeatable and counted each time.
        let (mut again, _) = connect_many(&server, &user, 1);
        again[0].send_data(&json!(4), &json!(IN_DELIVERY));
        again[0].expect_close(1011);
        fresh.expect_close(1011);
        assert_eq!(panics(&server), Some(2.0));
        neighbours[1].ping_pong(5);
    }

    #[test]
    fn a_panic_mid_fan_out_of_an_api_publish_also_rebuilds_the_manager() {
        let server = Server::builder().shards(2).start();
        let user = user_on_shard(&server, "fault-pub", 0, &[]);
        let neighbour = user_on_shard(&server, "fault-pub", 0, &[&user]);
        let (mut clients, epoch) = connect_many(&server, &user, 2);
        let (mut neighbours, _) = connect_many(&server, &neighbour, 1);

        let api_addr = server.api_addr();
        let body = json!({ "user": user, "data": IN_DELIVERY });
        let publisher = std::thread::spawn(move || {
            let started = Instant::now();
            let mut conn = HttpConn::open(api_addr);
            let answer = api_on(&mut conn, "/api/v1/publish", &body, Some(API_KEY));
            (answer, started.elapsed())
        });

        // As for a client send: the user's connections learn that numbers
        // were lost (1011), and the next connection starts a new epoch.
        for client in &mut clients {
            client.expect_close_within(1011, Duration::from_secs(2));
        }
        let ((status, answer), took) = publisher.join().expect("publisher");
        println!("publish answered {status} {answer} after {took:?}");
        assert!(status >= 500, "{status} {answer}");
        let (_, welcome) = connect_user(&server, &user);
        assert_ne!(welcome["epoch"], epoch);
        neighbours[0].ping_pong(1);
    }
}
