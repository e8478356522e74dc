//! Authentication of WebSocket upgrades, end to end against the real binary:
//! a valid token is accepted on each of the three carriers; a missing token
//! is a bare `401 Bearer` challenge; every class of bad token is a 401 with
//! `error="invalid_token"` on every carrier; audience, issuer and algorithm
//! settings (HMAC and public-key servers) are enforced; an open connection
//! whose token expires is closed with 4001; and no presented token ever
//! appears in the server's log.

mod common;

use std::time::Duration;

use common::*;
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{Value, json};

/// A server logging at debug level, so that the log check sees the most.
fn debug_server() -> ServerBuilder {
    Server::builder().shards(2).env("RUST_LOG", "debug")
}

/// Asserts that an upgrade with `token` in `carrier` is refused with 401 and
/// an `invalid_token` challenge.
fn assert_invalid_token(server: &Server, carrier: Carrier, token: &str, what: &str) {
    let response = upgrade_with(server, "/ws", carrier, token);
    assert_eq!(
        response.status,
        401,
        "{what} via {carrier:?}: {}",
        response.text()
    );
    let challenge = response
        .header("WWW-Authenticate")
        .unwrap_or_else(|| panic!("{what} via {carrier:?}: no WWW-Authenticate"));
    assert!(
        challenge.starts_with("Bearer") && challenge.contains(r#"error="invalid_token""#),
        "{what} via {carrier:?}: challenge {challenge:?}"
    );
}

/// Asserts that `token` in `carrier` is accepted as `user`.
fn assert_accepted(server: &Server, carrier: Carrier, token: &str, user: &str) {
    let mut client = ws_connect_via(server, "/ws", carrier, token);
    let welcome = client.recv_type("welcome");
    assert_eq!(welcome["user"], user, "via {carrier:?}");
}

/// Asserts that no token (nor its signature) appears in `log`.
fn assert_log_free_of(log: &str, tokens: &[String]) {
    assert!(!log.is_empty(), "the server logged nothing at all");
    for token in tokens {
        assert!(!log.contains(token.as_str()), "token {token} in the log");
        let signature = token.rsplit('.').next().unwrap_or_default();
        if signature.len() >= 16 {
            assert!(!log.contains(signature), "signature of {token} in the log");
        }
        let payload = token.split('.').nth(1).unwrap_or_default();
        assert!(!log.contains(payload), "payload of {token} in the log");
    }
}

/// Claims for `sub` with extra fields merged in (a `null` value removes a
/// claim).
fn claims_with(sub: &str, extra: &Value) -> Value {
    let mut claims = claims(sub);
    let map = claims.as_object_mut().expect("object");
    for (name, value) in extra.as_object().expect("object") {
        if value.is_null() {
            map.remove(name);
        } else {
            map.insert(name.clone(), value.clone());
        }
    }
    claims
}

fn hs256(claims: &Value) -> String {
    token_with(claims, Algorithm::HS256, &hs_key())
}

#[test]
fn a_valid_token_is_accepted_on_each_carrier() {
    let server = debug_server().start();
    let mut presented = Vec::new();

    for (i, carrier) in CARRIERS.into_iter().enumerate() {
        let user = format!("carrier-user-{i}");
        let token = token(&user);
        assert_accepted(&server, carrier, &token, &user);
        presented.push(token);
    }

    assert_log_free_of(&server.stop(), &presented);
}

#[test]
fn the_subprotocol_carrier_selects_shardgate_v1() {
    let server = debug_server().start();
    let token = token("subprotocol-user");

    let mut client = ws_connect_via(&server, "/ws", Carrier::Subprotocol, &token);
    let selected = client
        .response
        .headers()
        .get_all("Sec-WebSocket-Protocol")
        .iter()
        .map(|v| v.to_str().expect("ASCII").to_owned())
        .collect::<Vec<_>>();
    assert_eq!(
        selected,
        ["shardgate.v1"],
        "the 101 must select shardgate.v1 only"
    );
    assert_eq!(client.recv_type("welcome")["user"], "subprotocol-user");

    // Raw check: the 101 carries exactly one protocol, never the token.
    let raw = upgrade_with(&server, "/ws", Carrier::Subprotocol, &token);
    assert_eq!(raw.status, 101);
    assert_eq!(raw.header("Sec-WebSocket-Protocol"), Some("shardgate.v1"));

    assert_log_free_of(&server.stop(), &[token]);
}

#[test]
fn a_bearer_subprotocol_without_shardgate_v1_is_400() {
    let server = debug_server().start();
    let token = token("lonely-bearer");

    let request = upgrade_request(
        "/ws",
        &[("Sec-WebSocket-Protocol", &format!("bearer.{token}"))],
    );
    let response = upgrade_raw(&server, &request);
    assert_eq!(response.status, 400, "{}", response.text());

    let request = upgrade_request(
        "/ws",
        &[(
            "Sec-WebSocket-Protocol",
            &format!("chat.v2, bearer.{token}"),
        )],
    );
    assert_eq!(upgrade_raw(&server, &request).status, 400);

    assert_log_free_of(&server.stop(), &[token]);
}

#[test]
fn no_token_is_401_with_a_bare_bearer_challenge() {
    let server = debug_server().start();

    let requests = [
        upgrade_request("/ws", &[]),
        // Another scheme presents no bearer token either (RFC 6750 §3.1).
        upgrade_request("/ws", &[("Authorization", "Basic YWxpY2U6cGFzcw==")]),
        // shardgate.v1 alone carries no token.
        upgrade_request("/ws", &[("Sec-WebSocket-Protocol", "shardgate.v1")]),
        // Another query parameter is not the token.
        upgrade_request("/ws?access=abc", &[]),
    ];
    for request in requests {
        let response = upgrade_raw(&server, &request);
        let shown = String::from_utf8_lossy(&request).into_owned();
        assert_eq!(response.status, 401, "{shown}");
        let challenge = response
            .header("WWW-Authenticate")
            .unwrap_or_else(|| panic!("no challenge for {shown}"));
        assert_eq!(challenge.trim(), "Bearer", "{shown}");
        assert!(!challenge.contains("error="), "{shown}");
    }
}

#[test]
fn a_token_in_two_carriers_is_refused() {
    let server = debug_server().start();
    let token = token("two-carriers");

    let request = upgrade_request(
        &format!("/ws?token={token}"),
        &[("Authorization", &format!("Bearer {token}"))],
    );
    let response = upgrade_raw(&server, &request);
    assert_eq!(response.status, 400, "{}", response.text());

    assert_log_free_of(&server.stop(), &[token]);
}

#[test]
fn every_refusal_class_is_401_invalid_token_on_every_carrier() {
    let server = debug_server().start();
    let now = now();
    let other_secret = EncodingKey::from_secret(b"another-secret-of-at-least-32-bytes!!").unwrap();
    let sub = "refused-user";

    // A valid token with its payload swapped for another user's: the
    // signature no longer matches.
    let forged = {
        let good = token(sub);
        let mut parts: Vec<&str> = good.split('.').collect();
        let other = b64url(claims("victim").to_string().as_bytes());
        parts[1] = &other;
        parts.join(".")
    };

    let cases: Vec<(&str, String)> = vec![
        (
            "bad signature (other secret)",
            token_with(&claims(sub), Algorithm::HS256, &other_secret),
        ),
        ("payload swapped under a valid signature", forged),
        ("alg none", unsigned_token(&claims(sub))),
        (
            "HS384 to an HS256 server",
            token_with(&claims(sub), Algorithm::HS384, &hs_key()),
        ),
        (
            "expired beyond the leeway",
            hs256(&json!({ "sub": sub, "iat": now - 7200, "exp": now - 3600 })),
        ),
        (
            "nbf in the future",
            hs256(&claims_with(sub, &json!({ "nbf": now + 3600 }))),
        ),
        (
            "missing sub",
            hs256(&claims_with(sub, &json!({ "sub": null }))),
        ),
        ("empty sub", hs256(&claims_with(sub, &json!({ "sub": "" })))),
        (
            "numeric sub",
            hs256(&claims_with(sub, &json!({ "sub": 42 }))),
        ),
        (
            "sub longer than 256 bytes",
            hs256(&claims_with(sub, &json!({ "sub": "s".repeat(257) }))),
        ),
        (
            "sub with a control character",
            hs256(&claims_with(sub, &json!({ "sub": "eve\nadmin" }))),
        ),
        (
            "iat in the future",
            hs256(&claims_with(sub, &json!({ "iat": now + 3600 }))),
        ),
        (
            "missing exp",
            hs256(&claims_with(sub, &json!({ "exp": null }))),
        ),
        (
            "aud while no audience is configured",
            hs256(&claims_with(sub, &json!({ "aud": "shardgate" }))),
        ),
        ("not a JWT", "abc.def.ghi".to_owned()),
    ];

    for (what, token) in &cases {
        for carrier in CARRIERS {
            assert_invalid_token(&server, carrier, token, what);
        }
    }

    // The server still serves a valid token afterwards.
    assert_accepted(&server, Carrier::Header, &token(sub), sub);

    let presented: Vec<String> = cases.into_iter().map(|(_, token)| token).collect();
    assert_log_free_of(&server.stop(), &presented);
}

#[test]
fn audience_and_issuer_are_enforced_when_configured() {
    let server = debug_server()
        .args(["--jwt-audience", "chat", "--jwt-audience", "agents"])
        .args(["--jwt-issuer", "https://issuer.test"])
        .start();
    let sub = "aud-user";
    let iss = "https://issuer.test";
    let with = |extra: Value| hs256(&claims_with(sub, &extra));

    // Positive controls: one accepted audience, or a list naming one.
    assert_accepted(
        &server,
        Carrier::Header,
        &with(json!({ "aud": "chat", "iss": iss })),
        sub,
    );
    assert_accepted(
        &server,
        Carrier::Query,
        &with(json!({ "aud": ["elsewhere", "agents"], "iss": iss })),
        sub,
    );

    let refused = [
        ("wrong aud", with(json!({ "aud": "billing", "iss": iss }))),
        (
            "aud list without us",
            with(json!({ "aud": ["a", "b"], "iss": iss })),
        ),
        ("missing aud", with(json!({ "iss": iss }))),
        (
            "wrong iss",
            with(json!({ "aud": "chat", "iss": "https://evil.test" })),
        ),
        ("missing iss", with(json!({ "aud": "chat" }))),
        (
            "iss differing in case",
            with(json!({ "aud": "chat", "iss": "https://ISSUER.test" })),
        ),
    ];
    for (what, token) in &refused {
        assert_invalid_token(&server, Carrier::Header, token, what);
    }
}

#[test]
fn an_rs256_server_accepts_rs256_and_refuses_hs256() {
    let public_key = fixture("rsa_public.pem");
    let server = debug_server()
        .arg("--jwt-public-key")
        .arg(&public_key)
        .args(["--jwt-alg", "RS256"])
        .start();
    let sub = "rsa-user";
    let rsa = fixture_key(Algorithm::RS256, "rsa_private.pem");

    let good = token_with(&claims(sub), Algorithm::RS256, &rsa);
    for carrier in CARRIERS {
        assert_accepted(&server, carrier, &good, sub);
    }

    // HS256 with the test secret, and the classic confusion: HS256 keyed
    // with the server's own public key file.
    let pem = std::fs::read(&public_key).expect("public key");
    let confused = EncodingKey::from_secret(&pem).unwrap();
    let refused = [
        ("HS256 with a secret", token(sub)),
        (
            "HS256 keyed with the public key",
            token_with(&claims(sub), Algorithm::HS256, &confused),
        ),
        (
            "RS384 with the right key",
            token_with(&claims(sub), Algorithm::RS384, &rsa),
        ),
        ("alg none", unsigned_token(&claims(sub))),
    ];
    for (what, token) in &refused {
        assert_invalid_token(&server, Carrier::Header, token, what);
    }

    let mut presented: Vec<String> = refused.into_iter().map(|(_, t)| t).collect();
    presented.push(good);
    assert_log_free_of(&server.stop(), &presented);
}

#[test]
fn es256_and_eddsa_servers_accept_only_their_algorithm() {
    let rsa = fixture_key(Algorithm::RS256, "rsa_private.pem");
    for (alg, name, public, private) in [
        (Algorithm::ES256, "ES256", "ec_public.pem", "ec_private.pem"),
        (
            Algorithm::EdDSA,
            "EdDSA",
            "ed25519_public.pem",
            "ed25519_private.pem",
        ),
    ] {
        let server = debug_server()
            .arg("--jwt-public-key")
            .arg(fixture(public))
            .args(["--jwt-alg", name])
            .start();
        let sub = format!("{name}-user");
        let key = fixture_key(alg, private);

        assert_accepted(
            &server,
            Carrier::Header,
            &token_with(&claims(&sub), alg, &key),
            &sub,
        );
        let wrong = token_with(&claims(&sub), Algorithm::RS256, &rsa);
        assert_invalid_token(&server, Carrier::Header, &wrong, name);
        assert_invalid_token(&server, Carrier::Header, &token(&sub), name);
    }
}

#[test]
fn an_open_connection_is_closed_with_4001_when_its_token_expires() {
    let server = debug_server().args(["--jwt-leeway", "0"]).start();
    let sub = "short-lived";
    let now = now();
    let short = hs256(&json!({ "sub": sub, "iat": now, "exp": now + 2 }));

    let mut client = ws_connect(&server, &short);
    client.recv_type("welcome");
    // Expiry at now + 2 s, checked once a second: allow a generous margin.
    client.expect_close_within(4001, Duration::from_secs(8));
    wait_presence(&server, sub, 0);

    // The same token is now refused at the door.
    assert_invalid_token(&server, Carrier::Header, &short, "expired");
}

#[test]
fn the_log_never_contains_a_presented_token() {
    let server = Server::builder().shards(2).env("RUST_LOG", "trace").start();
    let now = now();
    let mut presented = Vec::new();

    // Accepted on every carrier, then refreshed with good and bad tokens.
    for carrier in CARRIERS {
        let first = token("log-user");
        let mut client = ws_connect_via(&server, "/ws", carrier, &first);
        client.recv_type("welcome");
        presented.push(first);

        let fresh = hs256(&json!({ "sub": "log-user", "iat": now, "exp": now + 7200 }));
        client.send_json(&json!({ "type": "refresh", "id": 1, "token": fresh }));
        client.recv_type("refreshed");
        presented.push(fresh);

        let foreign = token("someone-else");
        client.send_json(&json!({ "type": "refresh", "id": 2, "token": foreign }));
        client.expect_close(4001);
        presented.push(foreign);
    }

    // Refused on every carrier.
    let forged = token_with(
        &claims("log-user"),
        Algorithm::HS256,
        &EncodingKey::from_secret(b"not-the-server-secret-but-32-bytes-long").unwrap(),
    );
    for carrier in CARRIERS {
        assert_invalid_token(&server, carrier, &forged, "forged");
    }
    presented.push(forged);

    assert_log_free_of(&server.stop(), &presented);
}
