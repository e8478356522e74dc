//! The backend HTTP API against the real binary: publish reaches exactly
//! one user's connections, presence counts and places users, disconnect
//! closes one user's connections with 4003 and nobody else's; the key,
//! method, body size, chunked and malformed bodies are refused with the
//! documented statuses; requests share a keep-alive connection; the API is
//! off without a key and private with `--api-listen`; and revoke (part of
//! the public contract) closes and refuses tokens issued before a cut-off.

mod common;

use std::time::Duration;

use common::*;
use jsonwebtoken::Algorithm;
use serde_json::{Value, json};

/// Three users: `a` and `c` on the same shard, `b` on the other one.
fn three_users(server: &Server, prefix: &str) -> (String, String, String) {
    let a = user_on_shard(server, prefix, 0, &[]);
    let b = user_on_shard(server, prefix, 1, &[]);
    let c = user_on_shard(server, prefix, 0, &[&a]);
    (a, b, c)
}

/// Publishes a sentinel and checks it is the next frame on each client.
fn assert_next_is_sentinel(server: &Server, user: &str, clients: &mut [Client], seq: u64) {
    let data = json!({ "sentinel": user });
    let reply = publish(server, user, &data);
    assert_eq!(reply["delivered"], clients.len(), "{reply}");
    assert_eq!(reply["seq"], seq, "{reply}");
    for client in clients.iter_mut() {
        let frame = client.recv_json();
        assert_eq!(frame["data"], data, "{user}: {frame}");
        assert_eq!(frame["seq"], seq, "{user}: {frame}");
    }
}

#[test]
fn publish_reaches_exactly_one_users_connections() {
    let server = Server::builder().shards(2).start();
    let (a, b, c) = three_users(&server, "pub");
    let (mut a_clients, a_epoch) = connect_many(&server, &a, 2);
    let (mut b_clients, _) = connect_many(&server, &b, 1);
    let (mut c_clients, _) = connect_many(&server, &c, 1);

    let data = json!({ "text": "h\u{e9}llo \"agent\"", "n": [1, 2.5, -3], "nested": {} });
    let reply = publish(&server, &a, &data);
    assert_eq!(reply, json!({ "delivered": 2, "epoch": a_epoch, "seq": 1 }));
    let expected = json!({
        "type": "message", "epoch": a_epoch, "seq": 1, "source": "server", "data": data,
    });
    for client in &mut a_clients {
        assert_eq!(client.recv_json(), expected);
    }

    // Publish and client sends share one sequence per user.
    a_clients[0].send_data(&json!(9), &json!("after"));
    assert_eq!(
        a_clients[0].recv_json(),
        json!({ "type": "ack", "id": 9, "epoch": a_epoch, "seq": 2 })
    );
    assert_eq!(a_clients[1].recv_json()["seq"], 2);

    // b and c received nothing: their first frame is their own sentinel.
    assert_next_is_sentinel(&server, &b, &mut b_clients, 1);
    assert_next_is_sentinel(&server, &c, &mut c_clients, 1);
    a_clients[0].expect_silence(Duration::from_millis(100));
}

#[test]
fn publish_to_a_user_without_connections_delivers_nothing() {
    let server = Server::builder().shards(2).start();
    let (_other, _) = connect_user(&server, "someone-online");

    assert_eq!(
        publish(&server, "nobody-home", &json!("x")),
        json!({ "delivered": 0 })
    );
}

#[test]
fn presence_counts_connections_and_reports_the_shard() {
    let server = Server::builder().shards(3).start();

    // Users on each of the three shards: the field is not a constant.
    let users: Vec<String> = (0..3)
        .map(|shard| user_on_shard(&server, "where", shard, &[]))
        .collect();
    for (shard, user) in users.iter().enumerate() {
        let answer = api_ok(&server, "/api/v1/presence", &json!({ "user": user }));
        assert_eq!(
            answer,
            json!({ "user": user, "connections": 0, "shard": shard })
        );
    }

    let user = &users[1];
    let mut clients = Vec::new();
    for expected in 1..=3 {
        clients.push(connect_user(&server, user).0);
        assert_eq!(presence(&server, user), (expected, 1));
    }
    assert_eq!(presence(&server, &users[0]).0, 0);

    // A closed connection leaves the count.
    assert_eq!(clients.pop().unwrap().close(1000), 1000);
    wait_presence(&server, user, 2);
}

#[test]
fn disconnect_closes_every_connection_of_one_user_with_4003() {
    let server = Server::builder().shards(2).start();
    let (a, b, c) = three_users(&server, "disc");
    let (mut a_clients, a_epoch) = connect_many(&server, &a, 3);
    let (mut b_clients, _) = connect_many(&server, &b, 1);
    let (mut c_clients, _) = connect_many(&server, &c, 2);

    let reply = api_ok(&server, "/api/v1/disconnect", &json!({ "user": a }));
    assert_eq!(reply, json!({ "closed": 3 }));
    for client in &mut a_clients {
        client.expect_close(4003);
    }
    assert_eq!(presence(&server, &a).0, 0);

    // Others are untouched and still served.
    b_clients[0].ping_pong(1);
    c_clients[0].send_data(&json!(1), &json!("still here"));
    c_clients[0].recv_type("ack");
    assert_eq!(c_clients[1].recv_json()["data"], "still here");
    assert_eq!(presence(&server, &c).0, 2);

    // Nothing left to close; a reconnect starts a new epoch.
    let reply = api_ok(&server, "/api/v1/disconnect", &json!({ "user": a }));
    assert_eq!(reply, json!({ "closed": 0 }));
    let (_back, welcome) = connect_user(&server, &a);
    assert_ne!(welcome["epoch"], a_epoch);
}

#[test]
fn a_wrong_or_missing_key_is_401() {
    let server = Server::builder().shards(2).start();
    let body = json!({ "user": "u" });
    let prefix = &API_KEY[..API_KEY.len() - 1];
    let longer = format!("{API_KEY}x");

    for key in [
        "wrong-key",
        prefix,
        longer.as_str(),
        &API_KEY.to_uppercase(),
    ] {
        let mut conn = HttpConn::open(server.addr());
        let auth = format!("Bearer {key}");
        let response = conn.request(
            "POST",
            "/api/v1/presence",
            &[("Authorization", &auth)],
            body.to_string().as_bytes(),
        );
        assert_eq!(response.status, 401, "key {key:?}: {}", response.text());
        let challenge = response.header("WWW-Authenticate").unwrap_or_default();
        assert!(
            challenge.contains(r#"error="invalid_token""#),
            "{challenge:?}"
        );
    }

    let (status, answer) = api(&server, "/api/v1/presence", &body, None);
    assert_eq!(status, 401, "{answer}");

    // Another scheme is no key either.
    let response = HttpConn::open(server.addr()).request(
        "POST",
        "/api/v1/publish",
        &[("Authorization", &format!("Basic {API_KEY}"))],
        json!({ "user": "u", "data": 1 }).to_string().as_bytes(),
    );
    assert_eq!(response.status, 401);
}

#[test]
fn a_wrong_method_is_405() {
    let server = Server::builder().shards(2).start();
    let auth = format!("Bearer {API_KEY}");
    for method in ["GET", "PUT", "DELETE"] {
        let response = HttpConn::open(server.addr()).request(
            method,
            "/api/v1/presence",
            &[("Authorization", &auth)],
            b"",
        );
        assert_eq!(response.status, 405, "{method}: {}", response.text());
        assert_eq!(response.header("Allow"), Some("POST"), "{method}");
    }
}

#[test]
fn a_body_over_one_mebibyte_is_413_and_one_at_the_cap_is_served() {
    let server = Server::builder().shards(2).start();
    let auth = format!("Bearer {API_KEY}");

    // Only the head is sent: the server must refuse on the declared length.
    let mut conn = HttpConn::open(server.addr());
    let length = (1024 * 1024 + 1).to_string();
    let head = format!(
        "POST /api/v1/publish HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {auth}\r\n\
         Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    );
    conn.write(head.as_bytes());
    let response = conn.read_response();
    assert_eq!(response.status, 413, "{}", response.text());

    // A body of exactly 1 MiB is accepted.
    let skeleton = json!({ "user": "big", "data": "" }).to_string();
    let padding = "p".repeat(1024 * 1024 - skeleton.len());
    let body = json!({ "user": "big", "data": padding }).to_string();
    assert_eq!(body.len(), 1024 * 1024);
    let response = HttpConn::open(server.addr()).request(
        "POST",
        "/api/v1/publish",
        &[("Authorization", &auth)],
        body.as_bytes(),
    );
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.json(), json!({ "delivered": 0 }));
}

#[test]
fn a_chunked_body_is_411() {
    let server = Server::builder().shards(2).start();
    let body = json!({ "user": "u" }).to_string();
    let request = format!(
        "POST /api/v1/presence HTTP/1.1\r\nHost: 127.0.0.1\r\n\
         Authorization: Bearer {API_KEY}\r\nTransfer-Encoding: chunked\r\n\r\n\
         {:x}\r\n{body}\r\n0\r\n\r\n",
        body.len()
    );
    let mut conn = HttpConn::open(server.addr());
    conn.write(request.as_bytes());
    let response = conn.read_response();
    assert_eq!(response.status, 411, "{}", response.text());
}

#[test]
fn a_malformed_body_is_400() {
    let server = Server::builder().shards(2).start();
    let auth = format!("Bearer {API_KEY}");
    let long_user = "u".repeat(257);
    let bodies: Vec<(&str, String)> = vec![
        ("/api/v1/publish", "not json".into()),
        ("/api/v1/publish", "".into()),
        ("/api/v1/publish", json!({ "user": "u" }).to_string()),
        ("/api/v1/publish", json!({ "data": 1 }).to_string()),
        (
            "/api/v1/publish",
            json!({ "user": 5, "data": 1 }).to_string(),
        ),
        (
            "/api/v1/publish",
            json!({ "user": "u", "data": 1, "x": 2 }).to_string(),
        ),
        (
            "/api/v1/publish",
            json!({ "user": "", "data": 1 }).to_string(),
        ),
        ("/api/v1/presence", json!([1, 2]).to_string()),
        ("/api/v1/presence", json!({ "user": long_user }).to_string()),
        ("/api/v1/presence", json!({ "user": "a\nb" }).to_string()),
        (
            "/api/v1/disconnect",
            json!({ "user": "u", "extra": true }).to_string(),
        ),
        ("/api/v1/disconnect", "{\"user\":".into()),
    ];
    for (path, body) in &bodies {
        let response = HttpConn::open(server.addr()).request(
            "POST",
            path,
            &[("Authorization", &auth)],
            body.as_bytes(),
        );
        assert_eq!(response.status, 400, "{path} {body:?}: {}", response.text());
    }
}

#[test]
fn an_invalid_or_conflicting_content_length_is_400() {
    let server = Server::builder().shards(2).start();
    let body = json!({ "user": "u" }).to_string();
    let auth = format!("Bearer {API_KEY}");
    let length = body.len().to_string();
    let plus = format!("+{length}");
    let longer = (body.len() + 10).to_string();

    // RFC 9112 §6.3: differing lengths, or a value that is not 1*DIGIT,
    // are unrecoverable framing errors (400, then close): a proxy reading
    // the other value would see a different request boundary.
    let heads: [&[(&str, &str)]; 3] = [
        &[("Content-Length", &length), ("Content-Length", &longer)],
        &[("Content-Length", &longer), ("Content-Length", &length)],
        &[("Content-Length", &plus)],
    ];
    for headers in heads {
        let mut request = format!(
            "POST /api/v1/presence HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {auth}\r\n"
        );
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        request.push_str(&body);
        let mut conn = HttpConn::open(server.addr());
        conn.write(request.as_bytes());
        let response = conn.read_response();
        assert_eq!(response.status, 400, "{headers:?}: {}", response.text());
    }
}

#[test]
fn keep_alive_serves_several_requests_on_one_connection() {
    let server = Server::builder().shards(2).start();
    let (mut client, epoch) = connect_many(&server, "kept", 1);
    let key = Some(API_KEY);
    let mut conn = HttpConn::open(server.addr());

    let (status, answer) = api_on(
        &mut conn,
        "/api/v1/presence",
        &json!({ "user": "kept" }),
        key,
    );
    assert_eq!((status, answer["connections"].clone()), (200, json!(1)));
    for n in 1..=3u64 {
        let body = json!({ "user": "kept", "data": n });
        let (status, answer) = api_on(&mut conn, "/api/v1/publish", &body, key);
        assert_eq!(status, 200);
        assert_eq!(answer, json!({ "delivered": 1, "epoch": epoch, "seq": n }));
        assert_eq!(client[0].recv_json()["data"], n);
    }

    // A refused body that was read completely keeps the connection usable.
    let (status, _) = api_on(&mut conn, "/api/v1/presence", &json!({ "nope": 1 }), key);
    assert_eq!(status, 400);

    // Two pipelined requests, answered in order.
    let mut both = Vec::new();
    for user in ["kept", "absent"] {
        let body = json!({ "user": user }).to_string();
        both.extend(request_bytes(
            "POST",
            "/api/v1/presence",
            &[("Authorization", &format!("Bearer {API_KEY}"))],
            body.as_bytes(),
        ));
    }
    conn.write(&both);
    assert_eq!(conn.read_response().json()["connections"], 1);
    assert_eq!(conn.read_response().json()["user"], "absent");

    let (status, answer) = api_on(
        &mut conn,
        "/api/v1/disconnect",
        &json!({ "user": "kept" }),
        key,
    );
    assert_eq!((status, answer), (200, json!({ "closed": 1 })));
    client[0].expect_close(4003);
    assert!(
        !conn.closed_within(Duration::from_millis(50)),
        "keep-alive closed"
    );
}

#[test]
fn the_api_is_off_without_a_key() {
    let server = Server::builder()
        .shards(2)
        .env_remove("SHARDGATE_API_KEY")
        .start();

    for key in [Some(API_KEY), None] {
        let (status, _) = api(&server, "/api/v1/presence", &json!({ "user": "u" }), key);
        assert_eq!(status, 404, "key {key:?}");
    }
    let (status, _) = api(
        &server,
        "/api/v1/publish",
        &json!({ "user": "u", "data": 1 }),
        Some(""),
    );
    assert_eq!(status, 404);

    // WebSockets still work.
    let mut client = ws_connect(&server, &token("no-api"));
    client.recv_type("welcome");
}

#[test]
fn api_listen_serves_the_api_on_the_private_address_only() {
    let server = Server::builder()
        .shards(2)
        .args(["--api-listen", "127.0.0.1:0"])
        .start();
    let private = server.private_addr().expect("api listening line");
    assert_ne!(private, server.addr());
    let (_client, _) = connect_user(&server, "private-api");

    let body = json!({ "user": "private-api" });
    let mut conn = HttpConn::open(private);
    assert_eq!(
        api_on(&mut conn, "/api/v1/presence", &body, Some(API_KEY)).1["connections"],
        1
    );

    // The public address serves neither the API nor metrics.
    let mut public = HttpConn::open(server.addr());
    let (status, _) = api_on(&mut public, "/api/v1/presence", &body, Some(API_KEY));
    assert_eq!(status, 404);
    let (status, _) = api_on(
        &mut HttpConn::open(server.addr()),
        "/api/v1/disconnect",
        &body,
        Some(API_KEY),
    );
    assert_eq!(status, 404);
    assert_eq!(
        presence(&server, "private-api").0,
        1,
        "nothing was disconnected"
    );
    assert_eq!(http_get(server.addr(), "/metrics").status, 404);
    assert_eq!(http_get(private, "/metrics").status, 200);

    // Health on both; WebSocket upgrades on the public one only.
    assert_eq!(http_get(server.addr(), "/healthz").status, 200);
    assert_eq!(http_get(private, "/healthz").status, 200);
    let upgrade = upgrade_request(
        "/ws",
        &[("Authorization", &format!("Bearer {}", token("x")))],
    );
    let mut conn = HttpConn::open(private);
    conn.write(&upgrade);
    assert_eq!(conn.read_response().status, 404);
}

#[test]
fn revoke_closes_and_refuses_tokens_issued_before_the_cut_off() {
    let server = Server::builder().shards(2).start();
    let user = "revoked-user";
    let now = now();
    let old = token_with(
        &json!({ "sub": user, "iat": now - 600, "exp": now + 3600 }),
        Algorithm::HS256,
        &hs_key(),
    );
    let fresh = token_with(
        &json!({ "sub": user, "iat": now, "exp": now + 3600 }),
        Algorithm::HS256,
        &hs_key(),
    );
    let mut old_client = ws_connect(&server, &old);
    old_client.recv_type("welcome");
    let mut fresh_client = ws_connect(&server, &fresh);
    fresh_client.recv_type("welcome");

    let body = json!({ "user": user, "issued_before": now - 60 });
    let (status, answer) = api(&server, "/api/v1/revoke", &body, Some(API_KEY));
    assert_eq!(
        (status, answer.clone()),
        (200, json!({ "closed": 1 })),
        "{answer}"
    );
    old_client.expect_close(4003);
    fresh_client.ping_pong(1);

    // From then on the old token is refused at the door.
    let refused = upgrade_with(&server, "/ws", Carrier::Header, &old);
    assert_eq!(refused.status, 401);
    let mut again = ws_connect(&server, &fresh);
    again.recv_type("welcome");
}

#[test]
fn unknown_api_routes_are_404() {
    let server = Server::builder().shards(2).start();
    let (status, answer) = api(
        &server,
        "/api/v1/nope",
        &json!({ "user": "u" }),
        Some(API_KEY),
    );
    assert_eq!(status, 404, "{answer}");
    let (status, _) = api(&server, "/api/v2/publish", &json!({}), Some(API_KEY));
    assert_eq!(status, 404);
    // The answer is JSON.
    assert!(matches!(answer, Value::Object(_)), "{answer}");
}
