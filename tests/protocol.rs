//! Wire protocol v1 and the plain HTTP endpoints against the real binary:
//! JSON and WebSocket pings; strict envelopes (`bad_message` with a null id
//! when unparsable, and the connection keeps working); the message size cap
//! (close 1009, while another user of the same shard keeps being served);
//! clean closes; refresh (same sub: `refreshed`; anything else: 4001; an
//! earlier `exp` shortens the connection's life); `/healthz`, `/readyz`,
//! `/metrics`, unknown paths and oversized heads; and the echo endpoint.

mod common;

use std::time::Duration;

use common::*;
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::json;
use tungstenite::Message;

#[test]
fn a_json_ping_gets_a_pong_with_the_same_id() {
    let server = Server::builder().shards(2).start();
    let (mut client, _) = connect_user(&server, "pinger");

    client.send_json(&json!({ "type": "ping", "id": 1 }));
    assert_eq!(client.recv_json(), json!({ "type": "pong", "id": 1 }));
    client.send_json(&json!({ "type": "ping", "id": "abc" }));
    assert_eq!(client.recv_json(), json!({ "type": "pong", "id": "abc" }));
}

#[test]
fn a_websocket_ping_gets_a_pong() {
    let server = Server::builder().shards(2).start();
    let (mut client, _) = connect_user(&server, "ws-pinger");

    client.send(Message::Ping(b"are you there".to_vec().into()));
    match client.recv() {
        Message::Pong(payload) => assert_eq!(&payload[..], b"are you there"),
        other => panic!("expected a pong, got {other:?}"),
    }
    client.ping_pong(2);
}

#[test]
fn malformed_frames_get_bad_message_and_the_connection_keeps_working() {
    let server = Server::builder().shards(2).start();
    let user = "sloppy";
    let (mut clients, epoch) = connect_many(&server, user, 2);
    let marker = "MARKER-7f3a";

    let cases: Vec<(Message, serde_json::Value)> = vec![
        (Message::text(format!("{marker} not json")), json!(null)),
        (Message::text(format!("[\"{marker}\"]")), json!(null)),
        (Message::text(""), json!(null)),
        (
            Message::text(format!(
                "{{\"type\":\"send\",\"id\":1,\"data\":\"{marker}\""
            )),
            json!(null),
        ),
        (
            Message::text(json!({ "type": "nope", "id": 7, "data": marker }).to_string()),
            json!(7),
        ),
        (
            Message::text(json!({ "type": "ping", "id": 8, marker: 1 }).to_string()),
            json!(8),
        ),
        (
            Message::text(
                json!({ "type": "send", "id": 9, "data": 1, "extra": marker }).to_string(),
            ),
            json!(9),
        ),
        (
            Message::text(json!({ "type": "send", "id": 10 }).to_string()),
            json!(10),
        ),
        (
            Message::text(json!({ "type": "ping" }).to_string()),
            json!(null),
        ),
        (Message::binary(marker.as_bytes().to_vec()), json!(null)),
        (
            Message::binary(json!({ "type": "ping", "id": 11 }).to_string().into_bytes()),
            json!(null),
        ),
    ];
    for (i, (frame, id)) in cases.into_iter().enumerate() {
        let shown = format!("{frame:?}");
        clients[0].send(frame);
        let error = clients[0].recv_json();
        assert_eq!(error["type"], "error", "case {i} {shown}: {error}");
        assert_eq!(error["code"], "bad_message", "case {i} {shown}: {error}");
        assert_eq!(error["id"], id, "case {i} {shown}: {error}");
        let detail = error["detail"].as_str().expect("detail");
        assert!(!detail.contains(marker), "detail echoes input: {detail}");
        clients[0].ping_pong(100 + i as u64);
    }

    // Nothing reached the sibling and no number was used.
    clients[0].send_data(&json!("good"), &json!("finally"));
    assert_eq!(
        clients[0].recv_json(),
        json!({ "type": "ack", "id": "good", "epoch": epoch, "seq": 1 })
    );
    assert_eq!(clients[1].recv_json()["data"], "finally");
}

#[test]
fn an_oversized_message_closes_1009_and_the_shard_keeps_serving() {
    let server = Server::builder()
        .shards(2)
        .args(["--max-message-size", "1024"])
        .start();
    let big = user_on_shard(&server, "size", 0, &[]);
    let neighbour = user_on_shard(&server, "size", 0, &[&big]);
    let (mut big_clients, _) = connect_many(&server, &big, 1);
    let (mut neighbours, n_epoch) = connect_many(&server, &neighbour, 2);

    // A message of exactly the cap is accepted.
    let skeleton = json!({ "type": "send", "id": 1, "data": "" }).to_string();
    let at_cap = json!({ "type": "send", "id": 1, "data": "x".repeat(1024 - skeleton.len()) });
    assert_eq!(at_cap.to_string().len(), 1024);
    big_clients[0].send_json(&at_cap);
    big_clients[0].recv_type("ack");

    // One byte more closes the connection with 1009.
    let over = json!({ "type": "send", "id": 2, "data": "x".repeat(1025 - skeleton.len()) });
    assert_eq!(over.to_string().len(), 1025);
    big_clients[0].send_json(&over);
    big_clients[0].expect_close(1009);
    wait_presence(&server, &big, 0);

    // The other user of the same shard is still served.
    neighbours[0].send_data(&json!(1), &json!("after the big one"));
    assert_eq!(
        neighbours[0].recv_json(),
        json!({ "type": "ack", "id": 1, "epoch": n_epoch, "seq": 1 })
    );
    assert_eq!(neighbours[1].recv_json()["data"], "after the big one");
    let (mut late, _) = connect_user(&server, &neighbour);
    late.ping_pong(3);
}

#[test]
fn a_binary_message_over_the_cap_also_closes_1009() {
    let server = Server::builder()
        .shards(2)
        .args(["--max-message-size", "1024"])
        .start();
    let (mut client, _) = connect_user(&server, "big-binary");
    client.send(Message::binary(vec![0u8; 4096]));
    client.expect_close(1009);
}

#[test]
fn a_client_close_is_answered_cleanly() {
    let server = Server::builder().shards(2).start();
    let (mut client, _) = connect_user(&server, "leaver");
    let (mut stays, _) = connect_user(&server, "leaver");

    assert_eq!(
        client.close(1000),
        1000,
        "the server echoes the status code"
    );
    wait_presence(&server, "leaver", 1);
    stays.ping_pong(1);

    assert_eq!(stays.close(4321), 4321);
    wait_presence(&server, "leaver", 0);
}

#[test]
fn health_endpoints_and_unknown_paths() {
    let server = Server::builder().shards(2).start();

    assert_eq!(http_get(server.addr(), "/healthz").status, 200);
    assert_eq!(http_get(server.addr(), "/readyz").status, 200);
    assert_eq!(http_get(server.addr(), "/nope").status, 404);
    assert_eq!(http_get(server.addr(), "/ws/nope").status, 404);

    // A plain GET of /ws (no upgrade) is a bad request, not a 101.
    let mut conn = HttpConn::open(server.addr());
    let auth = format!("Bearer {}", token("plain"));
    let response = conn.request("GET", "/ws", &[("Authorization", &auth)], b"");
    assert_eq!(response.status, 400, "{}", response.text());
}

#[test]
fn an_oversized_request_head_is_431() {
    let server = Server::builder().shards(2).start();
    let filler = "f".repeat(20 * 1024);
    let request = upgrade_request("/ws", &[("X-Filler", &filler)]);
    assert_eq!(upgrade_raw(&server, &request).status, 431);

    let many: Vec<(String, String)> = (0..100)
        .map(|i| (format!("X-Header-{i}"), "v".to_owned()))
        .collect();
    let many: Vec<(&str, &str)> = many.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
    assert_eq!(
        upgrade_raw(&server, &upgrade_request("/ws", &many)).status,
        431
    );

    assert_eq!(http_get(server.addr(), "/healthz").status, 200);
}

#[test]
fn a_request_head_that_never_completes_is_cut_off() {
    let server = Server::builder()
        .shards(2)
        .args(["--handshake-timeout-ms", "300"])
        .start();
    let mut conn = HttpConn::open(server.addr());
    conn.write(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n");
    assert!(
        conn.closed_within(Duration::from_secs(3)),
        "a half-sent head must not hold the connection"
    );
    assert_eq!(http_get(server.addr(), "/healthz").status, 200);
}

#[test]
fn metrics_reflect_open_connections() {
    let server = Server::builder().shards(2).start();
    let series = |shard: u64| format!("shardgate_shard_connections{{shard=\"{shard}\"}}");

    let text = http_get(server.addr(), "/metrics").text();
    assert!(text.contains(&series(0)), "{text}");
    assert!(text.contains(&series(1)), "{text}");
    assert_eq!(metric(server.addr(), &series(0)), Some(0.0));
    assert_eq!(metric(server.addr(), &series(1)), Some(0.0));

    let user = user_on_shard(&server, "metered", 1, &[]);
    let (mut clients, _) = connect_many(&server, &user, 2);
    let counted = poll(POLL_TIMEOUT, || {
        metric(server.addr(), &series(1)) == Some(2.0)
            && metric(server.addr(), &series(0)) == Some(0.0)
    });
    assert!(
        counted,
        "metrics: {}",
        http_get(server.addr(), "/metrics").text()
    );

    for client in &mut clients {
        assert_eq!(client.close(1000), 1000);
    }
    let drained = poll(POLL_TIMEOUT, || {
        metric(server.addr(), &series(1)) == Some(0.0)
    });
    assert!(
        drained,
        "metrics: {}",
        http_get(server.addr(), "/metrics").text()
    );
}

#[test]
fn refresh_with_a_valid_same_sub_token_is_refreshed() {
    let server = Server::builder().shards(2).start();
    let user = "refresher";
    let (mut clients, epoch) = connect_many(&server, user, 2);

    let exp = now() + 7200;
    let fresh = token_with(
        &json!({ "sub": user, "iat": now(), "exp": exp }),
        Algorithm::HS256,
        &hs_key(),
    );
    clients[0].send_json(&json!({ "type": "refresh", "id": 3, "token": fresh }));
    assert_eq!(
        clients[0].recv_json(),
        json!({ "type": "refreshed", "id": 3, "exp": exp })
    );

    // Still the same connection, serving as before.
    clients[0].send_data(&json!(4), &json!("after refresh"));
    assert_eq!(
        clients[0].recv_json(),
        json!({ "type": "ack", "id": 4, "epoch": epoch, "seq": 1 })
    );
    assert_eq!(clients[1].recv_json()["data"], "after refresh");
}

#[test]
fn refresh_with_another_users_token_closes_4001() {
    let server = Server::builder().shards(2).start();
    let (mut victim, _) = connect_user(&server, "victim");
    let (mut mallory, _) = connect_user(&server, "mallory");

    let stolen = token("victim");
    mallory.send_json(&json!({ "type": "refresh", "id": 1, "token": stolen }));
    mallory.expect_close(4001);
    wait_presence(&server, "mallory", 0);

    // The victim is untouched, and nothing reached it.
    assert_eq!(presence(&server, "victim").0, 1);
    victim.ping_pong(2);
}

#[test]
fn refresh_with_a_bad_or_expired_token_closes_4001() {
    let server = Server::builder().shards(2).start();
    let user = "bad-refresher";
    let now = now();
    let other_key = EncodingKey::from_secret(b"some-other-secret-that-is-32-bytes!").unwrap();
    let tokens = [
        token_with(
            &json!({ "sub": user, "iat": now - 7200, "exp": now - 3600 }),
            Algorithm::HS256,
            &hs_key(),
        ),
        token_with(&claims(user), Algorithm::HS256, &other_key),
        token_with(&claims(user), Algorithm::HS384, &hs_key()),
        unsigned_token(&claims(user)),
        "garbage".to_owned(),
    ];
    for (i, bad) in tokens.iter().enumerate() {
        let (mut client, _) = connect_user(&server, user);
        client.send_json(&json!({ "type": "refresh", "id": i, "token": bad }));
        client.expect_close(4001);
    }
    wait_presence(&server, user, 0);
}

#[test]
fn refresh_to_an_earlier_exp_shortens_the_connection() {
    let server = Server::builder()
        .shards(2)
        .args(["--jwt-leeway", "0"])
        .start();
    let user = "shortened";
    let (mut client, _) = connect_user(&server, user);

    let exp = now() + 2;
    let short = token_with(
        &json!({ "sub": user, "iat": now(), "exp": exp }),
        Algorithm::HS256,
        &hs_key(),
    );
    client.send_json(&json!({ "type": "refresh", "id": 1, "token": short }));
    assert_eq!(
        client.recv_json(),
        json!({ "type": "refreshed", "id": 1, "exp": exp })
    );
    client.expect_close_within(4001, Duration::from_secs(8));
}

#[test]
fn refresh_to_a_later_exp_extends_the_connection() {
    let server = Server::builder()
        .shards(2)
        .args(["--jwt-leeway", "0"])
        .start();
    let user = "extended";
    let start = now();
    let short = token_with(
        &json!({ "sub": user, "iat": start, "exp": start + 2 }),
        Algorithm::HS256,
        &hs_key(),
    );
    let mut client = ws_connect(&server, &short);
    client.recv_type("welcome");

    let exp = start + 3600;
    let long = token_with(
        &json!({ "sub": user, "iat": start, "exp": exp }),
        Algorithm::HS256,
        &hs_key(),
    );
    client.send_json(&json!({ "type": "refresh", "id": 1, "token": long }));
    assert_eq!(
        client.recv_json(),
        json!({ "type": "refreshed", "id": 1, "exp": exp })
    );

    // Past the first token's expiry (and the once-a-second sweep), the
    // connection is still open and served.
    client.expect_silence(Duration::from_millis(4500));
    client.ping_pong(2);
}

#[test]
fn malformed_upgrades_are_400() {
    let server = Server::builder().shards(2).start();
    let auth = format!("Bearer {}", token("upgrader"));

    let old_version = request_bytes(
        "GET",
        "/ws",
        &[
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("Sec-WebSocket-Version", "8"),
            ("Authorization", &auth),
        ],
        b"",
    );
    let response = upgrade_raw(&server, &old_version);
    assert_eq!(response.status, 400);
    assert_eq!(response.header("Sec-WebSocket-Version"), Some("13"));

    let bad_key = request_bytes(
        "GET",
        "/ws",
        &[
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", "short"),
            ("Sec-WebSocket-Version", "13"),
            ("Authorization", &auth),
        ],
        b"",
    );
    assert_eq!(upgrade_raw(&server, &bad_key).status, 400);

    let mut post = upgrade_request("/ws", &[("Authorization", &auth)]);
    post.splice(..3, *b"POST");
    assert_eq!(upgrade_raw(&server, &post).status, 400);
}

#[test]
fn the_echo_endpoint_echoes_text_and_binary_unchanged() {
    let server = Server::builder().shards(2).arg("--enable-echo").start();
    let mut client = ws_connect_via(&server, "/ws/echo", Carrier::Header, &token("echoer"));

    // No welcome on echo: the first frame is the echo itself, and text need
    // not be JSON.
    let text = "h\u{e9}llo {not json} \u{1f600}";
    client.send_text(text);
    match client.recv_data() {
        Message::Text(echo) => assert_eq!(echo.as_str(), text),
        other => panic!("expected text, got {other:?}"),
    }
    let bytes: Vec<u8> = (0..=255u8).chain([0, 0xff, 0x80]).collect();
    client.send(Message::binary(bytes.clone()));
    match client.recv_data() {
        Message::Binary(echo) => assert_eq!(&echo[..], &bytes[..]),
        other => panic!("expected binary, got {other:?}"),
    }
    let large = "z".repeat(60_000);
    client.send_text(&large);
    match client.recv_data() {
        Message::Text(echo) => assert_eq!(echo.as_str(), large),
        other => panic!("expected text, got {other:?}"),
    }

    // Echo is authenticated like /ws.
    let refused = upgrade_with(&server, "/ws/echo", Carrier::Header, "abc.def.ghi");
    assert_eq!(refused.status, 401);
    let refused = upgrade_raw(&server, &upgrade_request("/ws/echo", &[]));
    assert_eq!(refused.status, 401);
}

#[test]
fn the_echo_endpoint_is_404_without_the_flag() {
    let server = Server::builder().shards(2).start();
    let response = upgrade_with(&server, "/ws/echo", Carrier::Header, &token("no-echo"));
    assert_eq!(response.status, 404, "{}", response.text());
}
