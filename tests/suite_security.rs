//! Isolation suite, category 2 — security: forged, stolen, expired or
//! misdirected credentials and frames never cross users.
//!
//! * A table of hostile tokens (wrong key, `alg` none in three spellings,
//!   HS256 signed with the RS256 server's public key, `kid`/`jku`/`jwk`
//!   tricks, bad or missing `sub`, 10 KiB `sub`, expired, not yet valid,
//!   wrong audience or issuer, truncated, over-long, bad base64, the API key,
//!   stolen signatures...) on HS256, audience/issuer and RS256 servers: each
//!   gets exactly the refusal of the design (401 with
//!   `WWW-Authenticate: Bearer error="invalid_token"` and a plain
//!   `invalid token` body, or 400 for a carrier outside RFC 6750 syntax),
//!   counted under the expected refusal reason in `/metrics`; every forged
//!   token names the victim, whose connections receive nothing (sentinel
//!   barrier) and whose presence never grows; and the server's TRACE log
//!   contains no token, signature or payload segment.
//! * A connection of user A cannot name user B in any frame (`forbidden`,
//!   counted on A's shard only), nor refresh into B's token (closed 4001).
//! * The API key and user tokens are not interchangeable.
//! * Revoking one user's tokens touches no other user.
//! * Misdirected API bodies (duplicate or typed `user`, wildcards, extra
//!   routing fields) reach nobody.

mod common;

use std::collections::BTreeMap;

use common::model::*;
use common::probe::*;
use common::*;
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{Value, json};

/// The user every forged token tries to become.
const VICTIM: &str = "victim";
const AUDIENCE: &str = "shardgate-app";
const ISSUER: &str = "https://issuer.example";
/// A key an attacker controls (long enough for HS256).
const ATTACKER_KEY: &[u8] = b"attacker-controlled-key-0123456789abcdef";

/// What the design says about a refused upgrade.
#[derive(Debug, Clone, Copy)]
enum Want {
    /// 401, `WWW-Authenticate: Bearer error="invalid_token"`, body
    /// `invalid token`, counted under this refusal reason.
    Invalid(&'static str),
    /// The same, counted under one of these reasons (which one depends on
    /// bytes that change with the token's times).
    InvalidAs(&'static [&'static str]),
    /// 400: the carrier itself is malformed (RFC 6750 §3.1
    /// `invalid_request`), counted under this reason.
    BadRequest(&'static str),
}

struct Case {
    name: &'static str,
    token: String,
    want: Want,
}

fn case(name: &'static str, token: String, want: Want) -> Case {
    Case { name, token, want }
}

/// `header.payload.signature` from raw JSON texts, signed with `key` for
/// `alg` (the header text is used as given, so it may lie about `alg`).
fn raw_token(header: &str, payload: &str, alg: Algorithm, key: &EncodingKey) -> String {
    let message = format!(
        "{}.{}",
        b64url(header.as_bytes()),
        b64url(payload.as_bytes())
    );
    let signature =
        jsonwebtoken::crypto::sign(message.as_bytes(), key, alg).expect("sign a raw token");
    format!("{message}.{signature}")
}

/// An unsigned token with `alg` spelled as given.
fn unsigned(alg: &str, claims: &Value) -> String {
    let header = json!({ "alg": alg, "typ": "JWT" }).to_string();
    format!(
        "{}.{}.",
        b64url(header.as_bytes()),
        b64url(claims.to_string().as_bytes())
    )
}

/// `base` with fields replaced (`null` removes one).
fn merge(mut base: Value, extra: &Value) -> Value {
    let map = base.as_object_mut().expect("object");
    for (name, value) in extra.as_object().expect("object") {
        if value.is_null() {
            map.remove(name);
        } else {
            map.insert(name.clone(), value.clone());
        }
    }
    base
}

/// Standard claims of `sub` with fields replaced (`null` removes one).
fn claims_with(sub: &str, extra: &Value) -> Value {
    merge(claims(sub), extra)
}

fn hs256(claims: &Value) -> String {
    token_with(claims, Algorithm::HS256, &hs_key())
}

fn attacker_key() -> EncodingKey {
    EncodingKey::from_secret(ATTACKER_KEY).expect("key")
}

fn rsa_key() -> EncodingKey {
    fixture_key(Algorithm::RS256, "rsa_private.pem")
}

fn rs256(claims: &Value) -> String {
    token_with(claims, Algorithm::RS256, &rsa_key())
}

/// Claims accepted by the audience and issuer server.
fn aud_claims(sub: &str) -> Value {
    claims_with(sub, &json!({ "aud": AUDIENCE, "iss": ISSUER }))
}

/// A token whose signature is another token's (a real, stolen signature).
fn with_stolen_signature(target: &str, stolen_from: &str) -> String {
    let mut parts: Vec<&str> = target.split('.').collect();
    parts[2] = stolen_from.rsplit('.').next().unwrap();
    parts.join(".")
}

fn is_base64url_token(token: &str) -> bool {
    token
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// A server of the table, logging at TRACE, with no refusal budget (every
/// token is verified) and the victim connected twice with `victim_token`.
struct Target {
    server: Server,
    victim: Vec<Ws>,
    epoch: u64,
}

fn target(args: &[&str], victim_token: &str) -> Target {
    let server = Server::builder()
        .shards(2)
        .args(["--refusals-per-peer", "0"])
        .args(args)
        .env("RUST_LOG", "trace")
        .start();
    let mut victim = Vec::new();
    let mut epoch = None;
    for _ in 0..2 {
        let mut ws = Ws::connect(server.addr(), "/ws", victim_token).expect("victim connects");
        let welcome = match ws.read(IO_TIMEOUT) {
            Got::Frame(welcome) => welcome,
            other => panic!("victim welcome: {other:?}"),
        };
        assert_eq!(welcome["user"], VICTIM);
        let e = welcome["epoch"].as_u64().expect("epoch");
        assert_eq!(*epoch.get_or_insert(e), e);
        victim.push(ws);
    }
    Target {
        server,
        victim,
        epoch: epoch.unwrap(),
    }
}

/// Presents every token of `cases` on every carrier it fits, checks each
/// refusal, the refusal counters, the victim's silence and the log.
fn refuse_all(mut target: Target, cases: &[Case]) {
    let server = &target.server;
    for case in cases {
        let carriers: &[Carrier] = if is_base64url_token(&case.token) {
            &CARRIERS
        } else {
            &[Carrier::Header]
        };
        let before = scrape(server.addr());
        for &carrier in carriers {
            let what = format!("{} via {carrier:?}", case.name);
            let response = upgrade_with(server, "/ws", carrier, &case.token);
            match case.want {
                Want::Invalid(_) | Want::InvalidAs(_) => {
                    assert_eq!(response.status, 401, "{what}: {}", response.text());
                    assert_eq!(
                        response.header("WWW-Authenticate"),
                        Some(r#"Bearer error="invalid_token""#),
                        "{what}"
                    );
                    assert_eq!(response.text(), "invalid token\n", "{what}");
                }
                Want::BadRequest(_) => {
                    assert_eq!(response.status, 400, "{what}: {}", response.text());
                    assert_eq!(response.header("WWW-Authenticate"), None, "{what}");
                }
            }
            assert!(
                response
                    .header("Content-Type")
                    .is_some_and(|t| t.starts_with("text/plain")),
                "{what}: {:?}",
                response.headers
            );
        }
        // Counted under its refusal class, and under no other.
        let after = scrape(server.addr());
        let allowed: &[&str] = match &case.want {
            Want::Invalid(reason) | Want::BadRequest(reason) => std::slice::from_ref(reason),
            Want::InvalidAs(reasons) => reasons,
        };
        let refused = |s: &Scrape| -> BTreeMap<String, f64> {
            s.text
                .lines()
                .filter_map(|l| l.strip_prefix("shardgate_router_refused_total{reason=\""))
                .filter_map(|l| l.split_once("\"} "))
                .map(|(r, v)| (r.to_owned(), v.trim().parse().unwrap_or(0.0)))
                .collect()
        };
        let (was, now) = (refused(&before), refused(&after));
        let grown: Vec<(&String, f64)> = now
            .iter()
            .map(|(r, v)| (r, v - was.get(r).copied().unwrap_or(0.0)))
            .filter(|(_, d)| *d != 0.0)
            .collect();
        assert!(
            grown.len() == 1
                && allowed.contains(&grown[0].0.as_str())
                && grown[0].1 == carriers.len() as f64,
            "{}: refusal classes counted {grown:?}, expected {} under one of {allowed:?}",
            case.name,
            carriers.len()
        );
    }

    // No forged token became the victim; the victim received nothing.
    assert_eq!(
        presence(server, VICTIM).0,
        2,
        "the victim gained a connection"
    );
    let data = json!({ "sentinel": VICTIM });
    let reply = publish(server, VICTIM, &data);
    assert_eq!(
        reply,
        json!({ "delivered": 2, "epoch": target.epoch, "seq": 1 })
    );
    for ws in &mut target.victim {
        match ws.read(IO_TIMEOUT) {
            Got::Frame(frame) => assert_eq!(frame["data"], data, "before the sentinel: {frame}"),
            other => panic!("victim: {other:?}"),
        }
    }

    // The TRACE log holds no token, signature or payload.
    let log = target.server.stop();
    assert!(
        log.contains("TRACE") || log.contains("DEBUG"),
        "not a verbose log"
    );
    for case in cases {
        assert!(
            !log.contains(&case.token),
            "{}: the token is in the log",
            case.name
        );
        for (i, segment) in case.token.split('.').enumerate() {
            // The header segments of unrelated tokens are often identical
            // and public; payloads and signatures are the secrets.
            if i > 0 && segment.len() >= 16 {
                assert!(
                    !log.contains(segment),
                    "{}: segment {i} of the token is in the log",
                    case.name
                );
            }
        }
    }
    assert!(!log.contains(API_KEY), "the API key is in the log");
    assert!(!log.contains(SECRET), "the JWT secret is in the log");
}

#[test]
fn hostile_tokens_are_refused_exactly_and_reach_no_victim() {
    let target = target(&[], &token(VICTIM));
    let now = now();
    let victim = claims(VICTIM);
    let valid = token(VICTIM);
    let attacker = token("attacker");
    let nul_key = EncodingKey::from_secret(b"\0").expect("key");
    let header = |extra: Value| {
        let mut h = json!({ "alg": "HS256", "typ": "JWT" });
        for (k, v) in extra.as_object().unwrap() {
            h[k] = v.clone();
        }
        h.to_string()
    };
    let payload = victim.to_string();
    let exp = now + 3600;

    let cases = vec![
        case(
            "signed with another key",
            token_with(&victim, Algorithm::HS256, &attacker_key()),
            Want::Invalid("bad_signature"),
        ),
        case(
            "alg none",
            unsigned("none", &victim),
            Want::Invalid("malformed"),
        ),
        case(
            "alg None",
            unsigned("None", &victim),
            Want::Invalid("malformed"),
        ),
        case(
            "alg NONE",
            unsigned("NONE", &victim),
            Want::Invalid("malformed"),
        ),
        case(
            "alg none carrying a real signature",
            with_stolen_signature(&unsigned("none", &victim), &valid),
            Want::Invalid("malformed"),
        ),
        case(
            "kid path to /dev/null, signed with the empty key",
            raw_token(
                &header(json!({ "kid": "../../../../../../dev/null" })),
                &payload,
                Algorithm::HS256,
                &nul_key,
            ),
            Want::Invalid("bad_signature"),
        ),
        case(
            "kid SQL injection selecting the attacker's key",
            raw_token(
                &header(json!({
                    "kid": "x' UNION SELECT 'attacker-controlled-key-0123456789abcdef' --"
                })),
                &payload,
                Algorithm::HS256,
                &attacker_key(),
            ),
            Want::Invalid("bad_signature"),
        ),
        case(
            "jku pointing at the attacker's key set",
            raw_token(
                &header(json!({ "jku": "http://127.0.0.1:9/keys.json", "kid": "1" })),
                &payload,
                Algorithm::HS256,
                &attacker_key(),
            ),
            Want::Invalid("bad_signature"),
        ),
        case(
            "embedded jwk holding the attacker's key",
            raw_token(
                &header(json!({ "jwk": { "kty": "oct", "k": b64url(ATTACKER_KEY) } })),
                &payload,
                Algorithm::HS256,
                &attacker_key(),
            ),
            Want::Invalid("bad_signature"),
        ),
        case(
            "the attacker's valid signature on the victim's payload",
            with_stolen_signature(
                &token_with(&victim, Algorithm::HS256, &attacker_key()),
                &attacker,
            ),
            Want::Invalid("bad_signature"),
        ),
        case(
            "the victim's payload under the attacker's header and signature",
            {
                let parts: Vec<&str> = attacker.split('.').collect();
                let forged_payload = b64url(payload.as_bytes());
                format!("{}.{forged_payload}.{}", parts[0], parts[2])
            },
            Want::Invalid("bad_signature"),
        ),
        case(
            "missing sub",
            hs256(&claims_with(VICTIM, &json!({ "sub": null }))),
            Want::Invalid("missing_sub"),
        ),
        case(
            "numeric sub",
            hs256(&claims_with(VICTIM, &json!({ "sub": 7 }))),
            Want::Invalid("invalid_sub"),
        ),
        case(
            "array sub naming the victim",
            hs256(&claims_with(VICTIM, &json!({ "sub": [VICTIM] }))),
            Want::Invalid("malformed"),
        ),
        case(
            "object sub naming the victim",
            hs256(&claims_with(VICTIM, &json!({ "sub": { "id": VICTIM } }))),
            Want::Invalid("malformed"),
        ),
        case(
            "sub of 10 KiB starting with the victim's id",
            hs256(&claims_with(
                VICTIM,
                &json!({ "sub": format!("{VICTIM}{}", "v".repeat(10 * 1024)) }),
            )),
            Want::Invalid("malformed"),
        ),
        case(
            "sub of the victim plus a NUL",
            hs256(&claims_with(
                VICTIM,
                &json!({ "sub": format!("{VICTIM}\u{0}") }),
            )),
            Want::Invalid("invalid_sub"),
        ),
        case(
            "two sub claims, the victim's last",
            raw_token(
                &header(json!({})),
                &format!(r#"{{"sub":"attacker","sub":"{VICTIM}","iat":{now},"exp":{exp}}}"#),
                Algorithm::HS256,
                &hs_key(),
            ),
            Want::Invalid("malformed"),
        ),
        case(
            "expired an hour ago",
            hs256(&json!({ "sub": VICTIM, "iat": now - 7200, "exp": now - 3600 })),
            Want::Invalid("expired"),
        ),
        case(
            "exp as a string",
            hs256(&claims_with(
                VICTIM,
                &json!({ "exp": (now + 3600).to_string() }),
            )),
            Want::Invalid("invalid_time_claim"),
        ),
        case(
            "no exp",
            hs256(&claims_with(VICTIM, &json!({ "exp": null }))),
            Want::Invalid("missing_exp"),
        ),
        case(
            "not valid for another hour (nbf)",
            hs256(&claims_with(VICTIM, &json!({ "nbf": now + 3600 }))),
            Want::Invalid("not_yet_valid"),
        ),
        case(
            "issued in the future (iat)",
            hs256(&claims_with(VICTIM, &json!({ "iat": now + 3600 }))),
            Want::Invalid("issued_in_future"),
        ),
        case(
            "an audience while none is configured",
            hs256(&claims_with(VICTIM, &json!({ "aud": AUDIENCE }))),
            Want::Invalid("unexpected_audience"),
        ),
        case(
            "HS512 with the right secret",
            token_with(&victim, Algorithm::HS512, &hs_key()),
            Want::Invalid("algorithm_not_allowed"),
        ),
        case(
            "RS256 to an HS256 server",
            rs256(&victim),
            Want::Invalid("algorithm_not_allowed"),
        ),
        // Cut by one character, the signature decodes (to the wrong
        // bytes) or not, depending on the padding bits of the new last
        // character.
        case(
            "truncated by one character",
            valid[..valid.len() - 1].to_owned(),
            Want::InvalidAs(&["malformed", "bad_signature"]),
        ),
        case(
            "the signature's last character changed",
            {
                let flipped = if valid.ends_with('A') { 'Q' } else { 'A' };
                format!("{}{flipped}", &valid[..valid.len() - 1])
            },
            Want::Invalid("bad_signature"),
        ),
        case(
            "truncated to header and payload",
            valid[..valid.rfind('.').unwrap()].to_owned(),
            Want::Invalid("malformed"),
        ),
        case(
            "truncated to the header",
            valid[..valid.find('.').unwrap()].to_owned(),
            Want::Invalid("malformed"),
        ),
        case(
            "a validly signed token over 8 KiB",
            hs256(&claims_with(
                VICTIM,
                &json!({ "pad": "p".repeat(9 * 1024) }),
            )),
            Want::Invalid("malformed"),
        ),
        case(
            "a fourth segment appended",
            format!("{valid}.{}", b64url(b"extra")),
            Want::Invalid("malformed"),
        ),
        case(
            "standard base64 (+ and /) instead of base64url",
            valid.replace('-', "+").replace('_', "/") + "+/",
            Want::Invalid("malformed"),
        ),
        case(
            "base64 padding in the middle",
            valid.replacen('.', "==.", 1),
            Want::BadRequest("malformed_carrier"),
        ),
        case(
            "characters outside RFC 6750 b64token",
            format!("{valid}!*"),
            Want::BadRequest("malformed_carrier"),
        ),
        case(
            "empty segments",
            "..".to_owned(),
            Want::Invalid("malformed"),
        ),
        case(
            "the API key as a user token",
            API_KEY.to_owned(),
            Want::Invalid("malformed"),
        ),
    ];
    assert!(cases.len() >= 30, "{} cases", cases.len());
    refuse_all(target, &cases);
}

#[test]
fn audience_and_issuer_mismatches_are_refused_and_reach_no_victim() {
    let args = ["--jwt-audience", AUDIENCE, "--jwt-issuer", ISSUER];
    let target = target(&args, &hs256(&aud_claims(VICTIM)));
    // The correct audience in a list is accepted.
    let listed = hs256(&claims_with(
        VICTIM,
        &json!({ "aud": ["other", AUDIENCE], "iss": ISSUER }),
    ));
    let mut accepted = Ws::connect(target.server.addr(), "/ws", &listed).expect("listed audience");
    assert!(matches!(accepted.read(IO_TIMEOUT), Got::Frame(w) if w["user"] == VICTIM));
    accepted.close(1000).expect("close");
    wait_presence(&target.server, VICTIM, 2);

    let with = |extra: Value| hs256(&merge(aud_claims(VICTIM), &extra));
    let cases = vec![
        case(
            "another audience",
            with(json!({ "aud": "other-app" })),
            Want::Invalid("wrong_audience"),
        ),
        case(
            "no audience",
            with(json!({ "aud": null })),
            Want::Invalid("missing_audience"),
        ),
        case(
            "an audience list without ours",
            with(json!({ "aud": ["other-app", "third"] })),
            Want::Invalid("wrong_audience"),
        ),
        case(
            "our audience with a trailing slash",
            with(json!({ "aud": format!("{AUDIENCE}/") })),
            Want::Invalid("wrong_audience"),
        ),
        case(
            "our audience in upper case",
            with(json!({ "aud": AUDIENCE.to_uppercase() })),
            Want::Invalid("wrong_audience"),
        ),
        case(
            "another issuer",
            with(json!({ "iss": "https://evil.example" })),
            Want::Invalid("wrong_issuer"),
        ),
        case(
            "no issuer",
            with(json!({ "iss": null })),
            Want::Invalid("missing_issuer"),
        ),
        case(
            "our issuer in upper case",
            with(json!({ "iss": ISSUER.to_uppercase() })),
            Want::Invalid("wrong_issuer"),
        ),
        case(
            "right audience and issuer, wrong key",
            token_with(&aud_claims(VICTIM), Algorithm::HS256, &attacker_key()),
            Want::Invalid("bad_signature"),
        ),
    ];
    refuse_all(target, &cases);
}

#[test]
fn an_rs256_server_refuses_its_public_key_used_as_an_hmac_secret() {
    let key_path = fixture("rsa_public.pem");
    let key_arg = key_path.to_str().expect("utf-8 path");
    let target = target(
        &["--jwt-public-key", key_arg, "--jwt-alg", "RS256"],
        &rs256(&claims(VICTIM)),
    );
    let pem = std::fs::read(&key_path).expect("read the public key");
    let pem_trimmed = String::from_utf8(pem.clone())
        .unwrap()
        .trim_end()
        .as_bytes()
        .to_vec();
    let victim = claims(VICTIM);
    let valid = rs256(&victim);
    let cases = vec![
        case(
            "HS256 signed with the public key PEM as secret",
            token_with(
                &victim,
                Algorithm::HS256,
                &EncodingKey::from_secret(&pem).unwrap(),
            ),
            Want::Invalid("algorithm_not_allowed"),
        ),
        case(
            "HS256 signed with the PEM without its final newline",
            token_with(
                &victim,
                Algorithm::HS256,
                &EncodingKey::from_secret(&pem_trimmed).unwrap(),
            ),
            Want::Invalid("algorithm_not_allowed"),
        ),
        case(
            "HS256 with the PEM, header claiming RS256",
            raw_token(
                &json!({ "alg": "RS256", "typ": "JWT" }).to_string(),
                &victim.to_string(),
                Algorithm::HS256,
                &EncodingKey::from_secret(&pem).unwrap(),
            ),
            Want::Invalid("bad_signature"),
        ),
        case(
            "alg none",
            unsigned("none", &victim),
            Want::Invalid("malformed"),
        ),
        case(
            "ES256 from another key",
            token_with(
                &victim,
                Algorithm::ES256,
                &fixture_key(Algorithm::ES256, "ec_private.pem"),
            ),
            Want::Invalid("algorithm_not_allowed"),
        ),
        case(
            "a real RS256 signature over another payload",
            with_stolen_signature(
                &format!(
                    "{}.{}.x",
                    valid.split('.').next().unwrap(),
                    b64url(
                        claims_with(VICTIM, &json!({ "exp": now() + 90_000 }))
                            .to_string()
                            .as_bytes()
                    )
                ),
                &rs256(&claims("attacker")),
            ),
            Want::Invalid("bad_signature"),
        ),
        case(
            "expired, correctly signed",
            rs256(&json!({ "sub": VICTIM, "iat": now() - 7200, "exp": now() - 3600 })),
            Want::Invalid("expired"),
        ),
        case(
            "the HS256 secret of the other servers",
            token(VICTIM),
            Want::Invalid("algorithm_not_allowed"),
        ),
    ];
    refuse_all(target, &cases);
}

/// Sends `frame` and expects `forbidden` with `id`.
fn assert_forbidden(ws: &mut Ws, frame: &str, id: Value) {
    ws.send_text(frame).expect("send");
    match ws.read(IO_TIMEOUT) {
        Got::Frame(error) => {
            assert_eq!(error["type"], "error", "{frame}: {error}");
            assert_eq!(error["code"], "forbidden", "{frame}: {error}");
            assert_eq!(error["id"], id, "{frame}: {error}");
        }
        other => panic!("{frame}: {other:?}"),
    }
}

#[test]
fn a_connection_cannot_name_another_user_in_any_frame() {
    let server = Server::builder().shards(2).start();
    let a = user_on_shard(&server, "frames", 0, &[]);
    let b = user_on_shard(&server, "frames", 1, &[]);
    let c = user_on_shard(&server, "frames", 0, &[&a]);
    let (mut a1, wa) = Ws::connect_user(server.addr(), &a).unwrap();
    let (mut a2, _) = Ws::connect_user(server.addr(), &a).unwrap();
    let (mut b1, wb) = Ws::connect_user(server.addr(), &b).unwrap();
    let (mut c1, wc) = Ws::connect_user(server.addr(), &c).unwrap();
    let before = scrape(server.addr());

    let bj = json!(b).to_string();
    let aj = json!(a).to_string();
    let frames: Vec<(String, Value)> = vec![
        (
            format!(r#"{{"type":"send","id":1,"data":{{"u":{aj}}},"user_id":{bj}}}"#),
            json!(1),
        ),
        (
            format!(r#"{{"type":"ping","id":2,"user_id":{bj}}}"#),
            json!(2),
        ),
        (
            format!(
                r#"{{"type":"refresh","id":3,"token":"{}","user_id":{bj}}}"#,
                token(&b)
            ),
            json!(3),
        ),
        (
            format!(
                r#"{{"type":"send","id":4,"data":1,"user_id":{}}}"#,
                escaped_json_string(&b)
            ),
            json!(4),
        ),
        (
            format!(r#"{{"type":"send","id":5,"data":1,"user_id":[{bj}]}}"#),
            json!(5),
        ),
        (
            format!(r#"{{"type":"send","id":6,"data":1,"user_id":{{"id":{bj}}}}}"#),
            json!(6),
        ),
        (
            r#"{"type":"send","id":7,"data":1,"user_id":0}"#.to_owned(),
            json!(7),
        ),
        (
            r#"{"type":"send","id":8,"data":1,"user_id":null}"#.to_owned(),
            json!(8),
        ),
        (
            r#"{"type":"send","id":9,"data":1,"user_id":""}"#.to_owned(),
            json!(9),
        ),
        (
            format!(r#"{{"type":"send","id":10,"data":1,"user_id":{aj},"user_id":{bj}}}"#),
            json!(10),
        ),
        (
            format!(
                r#"{{"type":"send","id":11,"data":1,"user_id":{}}}"#,
                json!(c)
            ),
            json!(11),
        ),
        (
            format!(r#"{{"type":"nonsense","id":12,"user_id":{bj},"x":1}}"#),
            json!(12),
        ),
        (format!(r#"{{"id":[1,2],"user_id":{bj}}}"#), Value::Null),
    ];
    for (frame, id) in &frames {
        assert_forbidden(&mut a1, frame, id.clone());
    }

    // Each refusal is counted on A's shard, none on B's.
    let after = scrape(server.addr());
    let forbidden = "shardgate_shard_forbidden_total";
    assert_eq!(
        after.shard_counter(forbidden, 0) - before.shard_counter(forbidden, 0),
        frames.len() as f64
    );
    assert_eq!(
        after.shard_counter(forbidden, 1),
        before.shard_counter(forbidden, 1)
    );

    // Refreshing into B's (valid) token closes A's connection, which stays
    // A's to the end.
    a1.send_json(&json!({ "type": "refresh", "id": 13, "token": token(&b) }))
        .unwrap();
    assert!(matches!(a1.read(IO_TIMEOUT), Got::Frame(f) if f == json!({ "close": 4001 })));
    wait_presence(&server, &a, 1);
    assert_eq!(presence(&server, &b).0, 1);

    // Nothing reached anyone: each sentinel is its user's first number.
    for (user, ws, welcome) in [(&a, &mut a2, &wa), (&b, &mut b1, &wb), (&c, &mut c1, &wc)] {
        let data = json!({ "sentinel": user });
        let reply = publish(&server, user, &data);
        assert_eq!(
            reply,
            json!({ "delivered": 1, "epoch": welcome["epoch"], "seq": 1 })
        );
        assert!(matches!(ws.read(IO_TIMEOUT), Got::Frame(f) if f["data"] == data && f["seq"] == 1));
    }
}

#[test]
fn the_api_key_and_user_tokens_are_not_interchangeable() {
    let server = Server::builder().shards(2).env("RUST_LOG", "trace").start();
    let (mut victim, welcome) = Ws::connect_user(server.addr(), VICTIM).unwrap();
    let epoch = welcome["epoch"].as_u64().unwrap();
    let victim_token = token(VICTIM);

    // The API key opens no WebSocket, on any carrier.
    for carrier in CARRIERS {
        let response = upgrade_with(&server, "/ws", carrier, API_KEY);
        assert_eq!(response.status, 401, "{carrier:?}: {}", response.text());
        assert_eq!(
            response.header("WWW-Authenticate"),
            Some(r#"Bearer error="invalid_token""#)
        );
    }

    // No user token, lookalike of the key or other secret opens the API.
    let body = json!({ "user": VICTIM, "data": { "u": "attacker" } });
    let wrong_keys = [
        victim_token.clone(),
        API_KEY.to_uppercase(),
        format!("{API_KEY}x"),
        API_KEY[..API_KEY.len() - 1].to_owned(),
        SECRET.to_owned(),
    ];
    for key in &wrong_keys {
        for path in ["/api/v1/publish", "/api/v1/presence", "/api/v1/disconnect"] {
            let (status, answer) = api(&server, path, &body, Some(key));
            assert_eq!(status, 401, "{path} with {key:?}: {answer}");
            assert_eq!(answer["error"], "unauthorized", "{answer}");
        }
    }
    // A refused request ends its connection (its body was not read).
    let raw = body.to_string();
    for (name, value) in [
        ("Authorization", format!("Basic {API_KEY}")),
        ("Authorization", API_KEY.to_owned()),
        ("X-Api-Key", API_KEY.to_owned()),
        ("Cookie", format!("token={API_KEY}")),
    ] {
        let mut conn = HttpConn::open(server.api_addr());
        let response = conn.request("POST", "/api/v1/publish", &[(name, &value)], raw.as_bytes());
        assert_eq!(response.status, 401, "{name}: {value}");
        assert_eq!(
            response.header("WWW-Authenticate"),
            Some("Bearer"),
            "{name}"
        );
    }
    let mut conn = HttpConn::open(server.api_addr());
    let response = conn.request(
        "POST",
        &format!("/api/v1/publish?token={API_KEY}"),
        &[],
        raw.as_bytes(),
    );
    assert_eq!(response.status, 401, "the key in the query string");

    // The victim got nothing and kept its connection.
    let data = json!({ "sentinel": VICTIM });
    assert_eq!(
        publish(&server, VICTIM, &data),
        json!({ "delivered": 1, "epoch": epoch, "seq": 1 })
    );
    assert!(matches!(victim.read(IO_TIMEOUT), Got::Frame(f) if f["data"] == data));

    let log = server.stop();
    assert!(!log.contains(API_KEY), "the API key is in the log");
    let signature = victim_token.rsplit('.').next().unwrap();
    assert!(!log.contains(signature), "a user token is in the log");
    assert!(!log.contains(SECRET));
}

#[test]
fn revoking_one_users_tokens_touches_no_other_user() {
    let server = Server::builder().shards(2).start();
    let a = user_on_shard(&server, "revoke", 0, &[]);
    let twin = format!("{a} ");
    let b = user_on_shard(&server, "revoke", 0, &[&a]);
    let c = user_on_shard(&server, "revoke", 1, &[]);
    let now = now();
    // Tokens issued two minutes ago, for everyone.
    let old = |user: &str| hs256(&json!({ "sub": user, "iat": now - 120, "exp": now + 3600 }));
    let mut conns = BTreeMap::new();
    for user in [&a, &twin, &b, &c] {
        let mut mine = Vec::new();
        for _ in 0..2 {
            let mut ws = Ws::connect(server.addr(), "/ws", &old(user)).expect("connect");
            assert!(matches!(ws.read(IO_TIMEOUT), Got::Frame(w) if w["user"] == *user));
            mine.push(ws);
        }
        conns.insert(user.clone(), mine);
    }

    let answer = api_ok(
        &server,
        "/api/v1/revoke",
        &json!({ "user": a, "issued_before": now - 60 }),
    );
    assert_eq!(answer, json!({ "closed": 2 }));
    for ws in conns.get_mut(&a).unwrap() {
        assert!(matches!(ws.read(IO_TIMEOUT), Got::Frame(f) if f == json!({ "close": 4003 })));
    }
    // A's old token is refused, a fresh one is not.
    let refused = upgrade_with(&server, "/ws", Carrier::Header, &old(&a));
    assert_eq!(refused.status, 401, "{}", refused.text());
    let (_fresh, welcome) = Ws::connect_user(server.addr(), &a).expect("fresh token");
    assert_eq!(welcome["seq"], 0, "a new manager after the revocation");

    // The twin, the neighbour and the other shard's user keep everything:
    // their connections, their old tokens, and their own numbering.
    for user in [&twin, &b, &c] {
        let mut again =
            Ws::connect(server.addr(), "/ws", &old(user)).expect("old token still valid");
        assert!(
            matches!(again.read(IO_TIMEOUT), Got::Frame(w) if w["user"] == *user && w["seq"] == 0)
        );
        let mine = conns.get_mut(user).unwrap();
        mine.push(again);
        let data = json!({ "sentinel": user });
        let reply = publish(&server, user, &data);
        assert_eq!(reply["delivered"], 3, "{user:?}: {reply}");
        assert_eq!(reply["seq"], 1, "{user:?}: {reply}");
        for ws in mine {
            assert!(matches!(ws.read(IO_TIMEOUT), Got::Frame(f) if f["data"] == data));
        }
    }
}

#[test]
fn misdirected_api_bodies_reach_nobody() {
    let server = Server::builder().shards(2).start();
    let a = user_on_shard(&server, "body", 0, &[]);
    let b = user_on_shard(&server, "body", 1, &[]);
    let (mut a_ws, wa) = Ws::connect_user(server.addr(), &a).unwrap();
    let (mut b_ws, wb) = Ws::connect_user(server.addr(), &b).unwrap();
    let (aj, bj) = (json!(a), json!(b));

    let refused = [
        format!(r#"{{"user":{aj},"user":{bj},"data":1}}"#),
        format!(r#"{{"user":[{aj},{bj}],"data":1}}"#),
        format!(r#"{{"user":{{"id":{bj}}},"data":1}}"#),
        format!(r#"{{"user":{aj},"data":1,"to":{bj}}}"#),
        format!(r#"{{"user":{aj},"data":1,"user_id":{bj}}}"#),
        format!(r#"{{"users":[{aj},{bj}],"data":1}}"#),
        r#"{"user":null,"data":1}"#.to_owned(),
        r#"{"user":7,"data":1}"#.to_owned(),
        format!(r#"{{"user":{aj}}}"#),
        format!(r#"[{{"user":{aj},"data":1}}]"#),
        format!(r#"{{"user":{aj},"data":1}}{{"user":{bj},"data":1}}"#),
    ];
    let auth = format!("Bearer {API_KEY}");
    for body in &refused {
        let mut conn = HttpConn::open(server.api_addr());
        let response = conn.request(
            "POST",
            "/api/v1/publish",
            &[("Authorization", auth.as_str())],
            body.as_bytes(),
        );
        assert_eq!(response.status, 400, "{body}: {}", response.text());
        assert_eq!(response.json()["error"], "bad_request", "{body}");
    }
    // Patterns are literal ids of nobody.
    for user in ["*", "%", ".*", "body-*", "", "\u{0}"] {
        let (status, answer) = api(
            &server,
            "/api/v1/publish",
            &json!({ "user": user, "data": { "u": user } }),
            Some(API_KEY),
        );
        match status {
            200 => assert_eq!(answer, json!({ "delivered": 0 }), "{user:?}"),
            400 => assert!(
                user.is_empty() || user.contains('\u{0}'),
                "{user:?}: {answer}"
            ),
            other => panic!("{user:?}: {other} {answer}"),
        }
    }
    // Another route shape naming B in the path or query goes nowhere.
    for path in [
        format!("/api/v1/publish/{b}"),
        format!("/api/v1/{b}/publish"),
    ] {
        let mut conn = HttpConn::open(server.api_addr());
        let body = json!({ "user": a, "data": { "u": a } }).to_string();
        let response = conn.request(
            "POST",
            &path,
            &[("Authorization", auth.as_str())],
            body.as_bytes(),
        );
        assert_eq!(response.status, 404, "{path}: {}", response.text());
    }

    for (user, ws, welcome) in [(&a, &mut a_ws, &wa), (&b, &mut b_ws, &wb)] {
        let data = json!({ "sentinel": user });
        let reply = publish(&server, user, &data);
        assert_eq!(
            reply,
            json!({ "delivered": 1, "epoch": welcome["epoch"], "seq": 1 })
        );
        assert!(matches!(ws.read(IO_TIMEOUT), Got::Frame(f) if f["data"] == data));
    }
}
