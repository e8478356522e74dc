//! The router's limits on request heads, attacked over real loopback sockets:
//! the head-size and header-count caps at their exact boundaries (16 KiB and
//! 64 lines pass, one byte or one line more is 431); malformed request lines
//! are 400 and the router keeps serving; a head dripped one byte at a time is
//! cut off by the handshake deadline counted from accept (not reset by each
//! byte), also when a keep-alive request came first; the per-peer and
//! overall handshake caps answer 503 with `Retry-After` while other peers
//! (bound to 127.0.0.2 and 127.0.0.3) and open connections keep being
//! served, and a released slot is usable again; the public handshake cap
//! does not starve the private API listener; `--allowed-origin` refuses
//! unlisted origins with 403 and lets listed and absent ones upgrade; and a
//! token in the query string never reaches the log, whichever refusal (or
//! acceptance) the request met.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const PEER_2: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const PEER_3: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);

/// `GET path` from the local address `from`.
fn get_from(addr: SocketAddr, from: Ipv4Addr, path: &str) -> HttpResponse {
    let mut conn = HttpConn::from_stream(tcp_connect_from(addr, Some(from), None));
    conn.request("GET", path, &[("Connection", "close")], b"")
}

/// A Prometheus sample read from `/metrics`, asked from the address `from`.
fn metric_from(addr: SocketAddr, from: Ipv4Addr, series: &str) -> Option<f64> {
    let response = get_from(addr, from, "/metrics");
    assert_eq!(response.status, 200, "/metrics: {}", response.text());
    response.text().lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        Some(value.trim().parse().expect("numeric sample"))
    })
}

/// An upgrade of `/ws` for `user`, with `extra` headers after the token.
fn upgrade_for(user: &str, extra: &[(&str, &str)]) -> Vec<u8> {
    let auth = format!("Bearer {}", token(user));
    let mut headers = vec![("Authorization", auth.as_str())];
    headers.extend_from_slice(extra);
    upgrade_request("/ws", &headers)
}

/// Sends `request` on a fresh connection and returns the answer, after
/// checking that a refusal also ends the connection.
fn answer_to(server: &Server, request: &[u8]) -> HttpResponse {
    let mut conn = HttpConn::open(server.addr());
    conn.write(request);
    let response = conn.read_response();
    if response.status != 101 {
        assert!(
            conn.closed_within(IO_TIMEOUT),
            "the server kept a refused connection ({}) open",
            response.status
        );
    }
    response
}

/// A connection holding a handshake slot: a keep-alive `GET /healthz` is
/// answered first (proof that the router's task for it runs and, waiting
/// for the next head, holds a slot), then half of an upgrade head is sent.
fn half_sent_from(addr: SocketAddr, from: Ipv4Addr) -> HttpConn {
    let mut conn = HttpConn::from_stream(tcp_connect_from(addr, Some(from), None));
    let response = conn.request("GET", "/healthz", &[], b"");
    assert_eq!(response.status, 200, "{}", response.text());
    conn.write(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n");
    conn
}

/// Connects from `from` and reads without sending: a connection over a
/// handshake cap is answered 503 at once, before anything is read.
fn refused_busy_from(addr: SocketAddr, from: Ipv4Addr) -> HttpResponse {
    let mut conn = HttpConn::from_stream(tcp_connect_from(addr, Some(from), None));
    conn.read_response()
}

/// Whether a fresh connection from `from` gets a handshake slot: a refused
/// connection is answered 503 and closed at once, before anything is read
/// (so the probe waits before writing); one that stays open has a slot, and
/// must then upgrade.
fn upgrades_from(server: &Server, from: Ipv4Addr, user: &str) -> bool {
    let mut conn = HttpConn::from_stream(tcp_connect_from(server.addr(), Some(from), None));
    if conn.closed_within(Duration::from_millis(150)) {
        return false;
    }
    conn.write(&upgrade_for(user, &[]));
    let response = conn.read_response();
    match response.status {
        101 => true,
        503 => false,
        other => panic!("upgrade from {from}: {other} {}", response.text()),
    }
}

fn assert_busy(response: &HttpResponse, what: &str) {
    assert_eq!(response.status, 503, "{what}: {}", response.text());
    let retry = response
        .header("Retry-After")
        .unwrap_or_else(|| panic!("{what}: 503 without Retry-After"));
    assert!(
        retry.trim().parse::<u64>().is_ok_and(|s| s >= 1),
        "{what}: Retry-After {retry:?}"
    );
}

#[test]
fn a_head_of_exactly_16_kib_upgrades_and_one_byte_more_is_431() {
    let server = Server::builder().shards(2).start();
    let base = upgrade_for("big-head", &[("X-Filler", "")]).len();
    let sized = |total: usize| {
        let filler = "f".repeat(total - base);
        let request = upgrade_for("big-head", &[("X-Filler", &filler)]);
        assert_eq!(request.len(), total);
        request
    };

    let at_cap = answer_to(&server, &sized(16 * 1024));
    assert_eq!(at_cap.status, 101, "a 16 KiB head: {}", at_cap.text());

    let over = answer_to(&server, &sized(16 * 1024 + 1));
    assert_eq!(over.status, 431, "{}", over.text());

    // A head with no end at all is refused once the cap is passed, without
    // waiting for the deadline.
    let started = Instant::now();
    let mut endless = b"GET /ws HTTP/1.1\r\nX-Endless: ".to_vec();
    endless.resize(16 * 1024 + 100, b'e');
    let response = answer_to(&server, &endless);
    assert_eq!(response.status, 431, "{}", response.text());
    assert!(started.elapsed() < Duration::from_secs(3));

    assert_eq!(http_get(server.addr(), "/healthz").status, 200);
}

#[test]
fn exactly_64_header_lines_upgrade_and_65_are_431() {
    let server = Server::builder().shards(2).start();
    // The upgrade carries Host, Upgrade, Connection, Sec-WebSocket-Key,
    // Sec-WebSocket-Version and Authorization: six lines.
    let with_lines = |total: usize| {
        let names: Vec<String> = (6..total).map(|i| format!("X-Line-{i}")).collect();
        let extra: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "v")).collect();
        let request = upgrade_for("many-lines", &extra);
        let text = String::from_utf8(request.clone()).unwrap();
        assert_eq!(
            text.matches("\r\n").count(),
            total + 2,
            "request line + blank"
        );
        request
    };

    let at_cap = answer_to(&server, &with_lines(64));
    assert_eq!(at_cap.status, 101, "64 lines: {}", at_cap.text());
    let over = answer_to(&server, &with_lines(65));
    assert_eq!(over.status, 431, "65 lines: {}", over.text());
}

#[test]
fn malformed_request_heads_are_400_and_the_router_goes_on() {
    let server = Server::builder().shards(2).start();
    let auth = format!("Bearer {}", token("malformed"));
    let rest = format!(
        "Host: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Authorization: {auth}\r\n\r\n"
    );
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("no version", format!("GET /ws\r\n{rest}").into_bytes()),
        (
            "unknown version",
            format!("GET /ws HTTP/7.1\r\n{rest}").into_bytes(),
        ),
        (
            "extra token",
            format!("GET /ws HTTP/1.1 please\r\n{rest}").into_bytes(),
        ),
        (
            "space in the target",
            format!("GET /w s HTTP/1.1\r\n{rest}").into_bytes(),
        ),
        (
            "control byte in the method",
            format!("G\u{1}T /ws HTTP/1.1\r\n{rest}").into_bytes(),
        ),
        (
            "header line without a colon",
            format!("GET /ws HTTP/1.1\r\nno colon here\r\n{rest}").into_bytes(),
        ),
        ("binary garbage", {
            let mut bytes = vec![0x16, 0x03, 0x01, 0x00, 0xff, 0x00];
            bytes.extend_from_slice(b"\r\n\r\n");
            bytes
        }),
    ];
    for (what, request) in &cases {
        let response = answer_to(&server, request);
        assert_eq!(response.status, 400, "{what}: {}", response.text());
    }

    assert_eq!(http_get(server.addr(), "/healthz").status, 200);
    let (mut client, _) = connect_user(&server, "malformed");
    client.ping_pong(1);
}

#[test]
fn a_head_dripped_byte_by_byte_is_cut_off_at_the_handshake_deadline() {
    let server = Server::builder()
        .shards(2)
        .args(["--handshake-timeout-ms", "1000"])
        .start();
    let request = upgrade_for("dripper", &[]);
    assert!(request.len() > 40, "the drip must outlast the deadline");

    let started = Instant::now();
    let mut conn = HttpConn::open(server.addr());
    let mut sent = 0;
    let mut checked_others = false;
    let closed_after = loop {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "a dripping client held its connection for 5 s ({sent} bytes sent)"
        );
        if conn.try_write(&request[sent..=sent]).is_err() {
            break started.elapsed();
        }
        sent += 1;
        assert!(sent < request.len(), "the whole head went through");
        // Waiting here is the 100 ms between two bytes.
        if conn.closed_within(Duration::from_millis(100)) {
            break started.elapsed();
        }
        // Meanwhile, others are served.
        if !checked_others && sent == 3 {
            let (mut other, _) = connect_user(&server, "not-dripping");
            other.ping_pong(1);
            checked_others = true;
        }
    };
    println!("dripped {sent} bytes; connection closed after {closed_after:?}");
    assert!(
        closed_after >= Duration::from_millis(900),
        "closed too early: {closed_after:?}"
    );
    assert!(
        closed_after < Duration::from_secs(2),
        "the deadline was not enforced from accept: closed after {closed_after:?}"
    );
}

#[test]
fn a_head_dripped_after_a_keep_alive_request_is_also_cut_off() {
    let server = Server::builder()
        .shards(2)
        .args(["--handshake-timeout-ms", "1000"])
        .start();
    let mut conn = HttpConn::open(server.addr());
    let health = conn.request("GET", "/healthz", &[], b"");
    assert_eq!(health.status, 200);

    // The same connection now drips an upgrade head.
    let request = upgrade_for("keep-alive-dripper", &[]);
    let started = Instant::now();
    let mut sent = 0;
    let closed_after = loop {
        if started.elapsed() > Duration::from_secs(3) {
            break None;
        }
        if conn.try_write(&request[sent..=sent]).is_err() {
            break Some(started.elapsed());
        }
        sent += 1;
        if conn.closed_within(Duration::from_millis(100)) {
            break Some(started.elapsed());
        }
    };
    let closed_after = closed_after.unwrap_or_else(|| {
        panic!("a head dripped after a keep-alive request was still open after 3 s ({sent} bytes)")
    });
    assert!(
        closed_after < Duration::from_secs(2),
        "closed only after {closed_after:?}"
    );
}

#[test]
fn the_per_peer_handshake_cap_refuses_only_that_peer() {
    let server = Server::builder()
        .shards(2)
        .args(["--max-handshakes-per-peer", "4"])
        .start();
    let addr = server.addr();
    let (mut established, _) = connect_user(&server, "already-open");

    let mut idle: Vec<HttpConn> = (0..4)
        .map(|_| half_sent_from(addr, Ipv4Addr::LOCALHOST))
        .collect();

    // The fifth from 127.0.0.1 is refused at once.
    let refused = refused_busy_from(addr, Ipv4Addr::LOCALHOST);
    assert_busy(&refused, "fifth handshake from 127.0.0.1");

    // Another address still upgrades and is served.
    let stream = tcp_connect_from(addr, Some(PEER_2), None);
    let mut other = RawWs::upgrade_on(stream, "/ws", &token("other-peer"));
    assert_eq!(other.recv_json()["type"], "welcome");
    other.expect_alive();

    // Open connections are not handshakes: still served.
    established.ping_pong(1);
    let refused_count = metric_from(
        addr,
        PEER_3,
        "shardgate_router_refused_total{reason=\"handshake_cap\"}",
    );
    assert!(refused_count >= Some(1.0), "refusals: {refused_count:?}");

    // A released slot is usable again by the same peer.
    drop(idle.pop());
    let again = poll(POLL_TIMEOUT, || {
        upgrades_from(&server, Ipv4Addr::LOCALHOST, "back-again")
    });
    assert!(again, "127.0.0.1 never got a slot back");
    drop(idle);
}

#[test]
fn the_overall_handshake_cap_refuses_everyone_and_recovers() {
    let server = Server::builder()
        .shards(2)
        .args(["--max-handshakes", "4", "--max-handshakes-per-peer", "64"])
        .start();
    let addr = server.addr();
    let (mut established, _) = connect_user(&server, "open-before");

    let mut idle = vec![
        half_sent_from(addr, Ipv4Addr::LOCALHOST),
        half_sent_from(addr, Ipv4Addr::LOCALHOST),
        half_sent_from(addr, PEER_2),
        half_sent_from(addr, PEER_2),
    ];

    // Every peer, even one with no handshake of its own, is refused.
    for from in [Ipv4Addr::LOCALHOST, PEER_2, PEER_3] {
        assert_busy(&refused_busy_from(addr, from), &format!("from {from}"));
    }
    // Established connections keep being served meanwhile.
    established.ping_pong(1);
    established.send_data(&json!(2), &json!("still here"));
    assert_eq!(established.recv_json()["type"], "ack");

    // One slot released: the next upgrade goes through.
    drop(idle.pop());
    let again = poll(POLL_TIMEOUT, || upgrades_from(&server, PEER_3, "recovered"));
    assert!(again, "no slot came back after one was released");
    drop(idle);
    let refused = metric(
        addr,
        "shardgate_router_refused_total{reason=\"handshake_cap\"}",
    );
    assert!(refused >= Some(3.0), "refusals: {refused:?}");
}

#[test]
fn the_public_handshake_cap_does_not_starve_the_private_listener() {
    let server = Server::builder()
        .shards(2)
        .args([
            "--api-listen",
            "127.0.0.1:0",
            "--max-handshakes",
            "4",
            "--max-handshakes-per-peer",
            "64",
        ])
        .start();
    let private = server.private_addr().expect("private address");

    // An attacker fills the public cap from two addresses.
    let idle = [
        half_sent_from(server.addr(), PEER_2),
        half_sent_from(server.addr(), PEER_2),
        half_sent_from(server.addr(), PEER_3),
        half_sent_from(server.addr(), PEER_3),
    ];
    assert_busy(
        &refused_busy_from(server.addr(), PEER_3),
        "public listener over the cap",
    );

    // The operator's and the backends' listener must still answer.
    let health = http_get(private, "/healthz");
    assert_eq!(health.status, 200, "private /healthz: {}", health.text());
    assert_eq!(http_get(private, "/readyz").status, 200, "private /readyz");
    let (connections, _) = presence(&server, "anyone");
    assert_eq!(connections, 0);
    drop(idle);
}

#[test]
fn unlisted_origins_are_403_and_listed_or_absent_ones_upgrade() {
    let server = Server::builder()
        .shards(2)
        .args([
            "--allowed-origin",
            "https://app.example.com",
            "--allowed-origin",
            "https://admin.example.com",
        ])
        .start();
    let user = "browser-user";

    for origin in [
        "https://evil.example",
        "null",
        "http://app.example.com",
        "https://app.example.com.evil.net",
        "https://app.example.com:8443",
        "https://sub.app.example.com",
        "",
    ] {
        let response = answer_to(&server, &upgrade_for(user, &[("Origin", origin)]));
        assert_eq!(
            response.status,
            403,
            "Origin {origin:?}: {}",
            response.text()
        );
    }
    for origin in [
        "https://app.example.com",
        "https://admin.example.com",
        "HTTPS://APP.EXAMPLE.COM",
    ] {
        let response = answer_to(&server, &upgrade_for(user, &[("Origin", origin)]));
        assert_eq!(
            response.status,
            101,
            "Origin {origin:?}: {}",
            response.text()
        );
    }
    let response = answer_to(&server, &upgrade_for(user, &[]));
    assert_eq!(response.status, 101, "no Origin: {}", response.text());

    let refused = metric(
        server.addr(),
        "shardgate_router_refused_total{reason=\"origin_not_allowed\"}",
    );
    assert_eq!(refused, Some(7.0));
    assert!(server.wait_for_log("origin_refused", POLL_TIMEOUT));
}

#[test]
fn a_query_token_never_reaches_the_log_whatever_the_answer() {
    let server = Server::builder()
        .shards(2)
        .env("RUST_LOG", "trace")
        .args([
            "--allowed-origin",
            "https://app.example.com",
            "--max-connections-per-user",
            "1",
        ])
        .start();
    // A distinct token per case, so that each one is looked for.
    let mint = |sub: &str| {
        let now = now();
        token_with(
            &json!({ "sub": sub, "iat": now, "exp": now + 3600 }),
            jsonwebtoken::Algorithm::HS256,
            &hs_key(),
        )
    };
    let mut presented = Vec::new();
    let query = |token: &str| format!("/ws?token={token}");

    // Refused for its origin (checked before the token).
    let t = mint("q-origin");
    let request = upgrade_request(&query(&t), &[("Origin", "https://evil.example")]);
    assert_eq!(answer_to(&server, &request).status, 403);
    presented.push(t);

    // Refused for its handshake fields.
    let t = mint("q-version");
    let mut request = String::from_utf8(upgrade_request(&query(&t), &[])).unwrap();
    request = request.replace("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8");
    assert_eq!(answer_to(&server, request.as_bytes()).status, 400);
    presented.push(t);

    // Refused for its head (too many lines).
    let t = mint("q-lines");
    let names: Vec<String> = (0..70).map(|i| format!("X-L{i}")).collect();
    let extra: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "v")).collect();
    assert_eq!(
        answer_to(&server, &upgrade_request(&query(&t), &extra)).status,
        431
    );
    presented.push(t);

    // Refused for two carriers.
    let t = mint("q-two");
    let auth = format!("Bearer {}", mint("q-two-header"));
    let request = upgrade_request(&query(&t), &[("Authorization", &auth)]);
    assert_eq!(answer_to(&server, &request).status, 400);
    presented.push(t);
    presented.push(auth.trim_start_matches("Bearer ").to_owned());

    // Refused for its signature.
    let forged = {
        let t = mint("q-forged");
        let (rest, _) = t.rsplit_once('.').unwrap();
        format!(
            "{rest}.{}",
            b64url(b"not the signature of this token at all")
        )
    };
    assert_eq!(
        answer_to(&server, &upgrade_request(&query(&forged), &[])).status,
        401
    );
    presented.push(forged);

    // Accepted, then a second connection refused by the user cap (429).
    let t = mint("q-accepted");
    let mut first = ws_connect_via(&server, "/ws", Carrier::Query, &t);
    first.recv_type("welcome");
    let second = answer_to(&server, &upgrade_request(&query(&t), &[]));
    assert_eq!(second.status, 429, "{}", second.text());
    first.ping_pong(1);
    presented.push(t);

    assert!(server.wait_for_log("origin_refused", POLL_TIMEOUT));
    let log = server.stop();
    assert!(
        log.contains("TRACE") || log.contains("DEBUG"),
        "verbose log"
    );
    for token in &presented {
        let signature = token.rsplit('.').next().unwrap();
        assert!(!log.contains(token.as_str()), "a token is in the log");
        assert!(
            !log.contains(signature),
            "a token's signature is in the log"
        );
        assert!(!log.contains(&format!("token={}", &token[..16])));
    }
}
