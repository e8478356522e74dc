//! Unit tests of the authentication module's verifier: valid tokens, time
//! claims, `sub`, `aud` and `iss`, malformed tokens, errors and redaction.
//! Also the shared test helpers of `keys_tests.rs` and `carrier_tests.rs`.

use std::sync::Arc;

use jsonwebtoken::{EncodingKey, Header};
use serde_json::{Value, json};

use super::*;

/// 64 bytes: long enough for HS512 (RFC 7518 §3.2).
pub(super) const SECRET: &[u8] =
    b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

// ---- helpers (the `pub(super)` ones also serve keys_tests.rs and carrier_tests.rs)

pub(super) fn b64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
        }
    }
    out
}

pub(super) fn hmac_config(algorithm: Algorithm) -> AuthConfig {
    AuthConfig::hmac(algorithm, SECRET)
}

pub(super) fn verifier(config: &AuthConfig) -> Verifier {
    Verifier::new(config).expect("test configuration is valid")
}

pub(super) fn hs_verifier() -> Verifier {
    verifier(&hmac_config(Algorithm::HS256))
}

pub(super) fn sign(algorithm: Algorithm, key: &EncodingKey, claims: &Value) -> String {
    jsonwebtoken::encode(&Header::new(algorithm), claims, key).expect("test token signs")
}

pub(super) fn hs256(claims: &Value) -> String {
    let key = EncodingKey::from_secret(SECRET).expect("secret");
    sign(Algorithm::HS256, &key, claims)
}

/// Signs an arbitrary header and payload text with HS256 and SECRET.
fn hs256_raw(header: &str, payload: &str) -> String {
    let message = format!(
        "{}.{}",
        b64url(header.as_bytes()),
        b64url(payload.as_bytes())
    );
    let key = EncodingKey::from_secret(SECRET).expect("secret");
    let signature =
        jsonwebtoken::crypto::sign(message.as_bytes(), &key, Algorithm::HS256).expect("signs");
    format!("{message}.{signature}")
}

pub(super) fn valid_claims() -> Value {
    let now = now_secs();
    json!({ "sub": "alice", "exp": now + 600, "iat": now })
}

pub(super) fn claims_with(key: &str, value: Value) -> Value {
    let mut claims = valid_claims();
    claims[key] = value;
    claims
}

fn claims_without(key: &str) -> Value {
    let mut claims = valid_claims();
    if let Some(map) = claims.as_object_mut() {
        map.remove(key);
    }
    claims
}

fn hs_verify(claims: &Value) -> Result<Claims, AuthError> {
    hs_verifier().verify(&hs256(claims))
}

// ---- valid tokens -----------------------------------------------------------

#[test]
fn each_hmac_algorithm_accepts_its_own_tokens() {
    for algorithm in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
        let key = EncodingKey::from_secret(SECRET).expect("secret");
        let claims = valid_claims();
        let token = sign(algorithm, &key, &claims);

        let verified = verifier(&hmac_config(algorithm)).verify(&token);

        let expected = Claims {
            sub: "alice".into(),
            exp: claims["exp"].as_u64().expect("exp"),
            iat: claims["iat"].as_u64(),
        };
        assert_eq!(verified, Ok(expected), "{algorithm:?}");
    }
}

#[test]
fn float_and_integer_numeric_dates_are_accepted() {
    let now = now_secs();
    let claims = json!({ "sub": "alice", "exp": (now + 600) as f64 + 0.4, "iat": now });
    assert_eq!(hs_verify(&claims).map(|c| c.exp), Ok(now + 600));
}

#[test]
fn iat_is_optional_and_kept_when_present() {
    assert_eq!(hs_verify(&claims_without("iat")).map(|c| c.iat), Ok(None));
    let now = now_secs();
    assert_eq!(
        hs_verify(&claims_with("iat", json!(now - 5))).map(|c| c.iat),
        Ok(Some(now - 5))
    );
}

// ---- time claims ------------------------------------------------------------

#[test]
fn expiry_beyond_the_leeway_is_refused() {
    let exp = now_secs() - DEFAULT_LEEWAY_SECS - 100;
    assert_eq!(
        hs_verify(&claims_with("exp", json!(exp))),
        Err(AuthError::Expired)
    );
}

#[test]
fn expiry_within_the_leeway_is_accepted() {
    let exp = now_secs() - 10;
    assert_eq!(
        hs_verify(&claims_with("exp", json!(exp))).map(|c| c.exp),
        Ok(exp)
    );
}

#[test]
fn expiry_exactly_at_the_leeway_is_refused() {
    // RFC 7519 §4.1.4: the current time must be before exp (+ leeway).
    let exp = now_secs() - DEFAULT_LEEWAY_SECS;
    assert_eq!(
        hs_verify(&claims_with("exp", json!(exp))),
        Err(AuthError::Expired)
    );
}

#[test]
fn configured_leeway_is_applied() {
    let mut config = hmac_config(Algorithm::HS256);
    config.leeway_secs = 0;
    let token = hs256(&claims_with("exp", json!(now_secs() - 10)));
    assert_eq!(verifier(&config).verify(&token), Err(AuthError::Expired));

    config.leeway_secs = 120;
    let token = hs256(&claims_with("exp", json!(now_secs() - 100)));
    assert!(verifier(&config).verify(&token).is_ok());
}

#[test]
fn nbf_in_the_future_is_refused_and_within_leeway_accepted() {
    let now = now_secs();
    assert_eq!(
        hs_verify(&claims_with("nbf", json!(now + 3600))),
        Err(AuthError::NotYetValid)
    );
    assert!(hs_verify(&claims_with("nbf", json!(now + 10))).is_ok());
    assert!(hs_verify(&claims_with("nbf", json!(now - 10))).is_ok());
}

#[test]
fn iat_in_the_future_is_refused() {
    let iat = now_secs() + 3600;
    assert_eq!(
        hs_verify(&claims_with("iat", json!(iat))),
        Err(AuthError::IssuedInFuture)
    );
}

#[test]
fn missing_exp_is_refused() {
    assert_eq!(
        hs_verify(&claims_without("exp")),
        Err(AuthError::MissingExp)
    );
}

#[test]
fn time_claims_of_the_wrong_type_are_refused() {
    for claim in ["exp", "nbf", "iat"] {
        for bad in [json!("soon"), json!(-5), json!(true), json!(1e300)] {
            let result = hs_verify(&claims_with(claim, bad.clone()));
            assert_eq!(result, Err(AuthError::InvalidTimeClaim), "{claim} = {bad}");
        }
    }
    // jsonwebtoken's own claim parser gives up on compound values in exp/nbf.
    for claim in ["exp", "nbf"] {
        for bad in [json!([1]), json!({ "t": 1 })] {
            let result = hs_verify(&claims_with(claim, bad.clone()));
            assert_eq!(result, Err(AuthError::Malformed), "{claim} = {bad}");
        }
    }
}

// ---- sub --------------------------------------------------------------------

#[test]
fn missing_or_null_sub_is_refused() {
    assert_eq!(
        hs_verify(&claims_without("sub")),
        Err(AuthError::MissingSub)
    );
    assert_eq!(
        hs_verify(&claims_with("sub", Value::Null)),
        Err(AuthError::MissingSub)
    );
}

#[test]
fn empty_long_or_control_character_sub_is_refused() {
    for sub in [
        String::new(),
        "a".repeat(300),
        "ali\nce".to_owned(),
        "bob\u{7f}".to_owned(),
    ] {
        let result = hs_verify(&claims_with("sub", json!(sub)));
        assert_eq!(result, Err(AuthError::InvalidSub), "{sub:?}");
    }
}

#[test]
fn sub_of_exactly_the_maximum_length_is_accepted() {
    let sub = "é".repeat(MAX_SUB_LEN / 2);
    assert_eq!(sub.len(), MAX_SUB_LEN);
    assert_eq!(
        hs_verify(&claims_with("sub", json!(sub))).map(|c| c.sub),
        Ok(sub.into())
    );
}

#[test]
fn non_string_sub_is_refused() {
    for sub in [json!(42), json!(1.5), json!(true)] {
        assert_eq!(
            hs_verify(&claims_with("sub", sub.clone())),
            Err(AuthError::InvalidSub),
            "{sub}"
        );
    }
    // jsonwebtoken's own claim parser gives up on compound values.
    for sub in [json!(["alice"]), json!({ "id": "alice" })] {
        assert_eq!(
            hs_verify(&claims_with("sub", sub.clone())),
            Err(AuthError::Malformed),
            "{sub}"
        );
    }
}

#[test]
fn duplicate_sub_is_malformed() {
    let exp = now_secs() + 600;
    let payload = format!(r#"{{"sub":"alice","sub":"root","exp":{exp}}}"#);
    let token = hs256_raw(r#"{"alg":"HS256","typ":"JWT"}"#, &payload);
    assert_eq!(hs_verifier().verify(&token), Err(AuthError::Malformed));
}

// ---- aud and iss ------------------------------------------------------------

#[test]
fn aud_is_refused_when_no_audience_is_configured() {
    // jsonwebtoken's validate_aud default: RFC 7519 §4.1.3.
    for aud in [
        json!("shardgate"),
        json!(["shardgate", "other"]),
        json!([]),
        json!(7),
    ] {
        let result = hs_verify(&claims_with("aud", aud.clone()));
        assert_eq!(result, Err(AuthError::UnexpectedAudience), "{aud}");
    }
}

fn audience_verifier() -> Verifier {
    let mut config = hmac_config(Algorithm::HS256);
    config.audience = Some(vec!["shardgate".to_owned(), "shardgate-eu".to_owned()]);
    config.issuer = Some(vec!["https://issuer.example".to_owned()]);
    verifier(&config)
}

fn with_aud_iss(aud: Value, iss: Value) -> Value {
    claims_with("iss", iss)
        .as_object()
        .cloned()
        .map_or(Value::Null, |mut map| {
            map.insert("aud".to_owned(), aud);
            Value::Object(map)
        })
}

#[test]
fn configured_audience_and_issuer_accept_the_right_values() {
    let verifier = audience_verifier();
    let iss = json!("https://issuer.example");
    for aud in [
        json!("shardgate"),
        json!("shardgate-eu"),
        json!(["other", "shardgate"]),
    ] {
        let token = hs256(&with_aud_iss(aud.clone(), iss.clone()));
        assert!(verifier.verify(&token).is_ok(), "{aud}");
    }
}

#[test]
fn configured_audience_refuses_wrong_or_missing_aud() {
    let verifier = audience_verifier();
    let iss = json!("https://issuer.example");
    for aud in [
        json!("other"),
        json!(["other", "more"]),
        json!([]),
        json!(7),
    ] {
        let token = hs256(&with_aud_iss(aud.clone(), iss.clone()));
        assert_eq!(
            verifier.verify(&token),
            Err(AuthError::WrongAudience),
            "{aud}"
        );
    }

    let token = hs256(&claims_with("iss", iss.clone()));
    assert_eq!(verifier.verify(&token), Err(AuthError::MissingAudience));
    let token = hs256(&with_aud_iss(Value::Null, iss));
    assert_eq!(verifier.verify(&token), Err(AuthError::MissingAudience));
}

#[test]
fn configured_issuer_refuses_wrong_or_missing_iss() {
    let verifier = audience_verifier();
    for iss in [json!("https://evil.example"), json!(12)] {
        let token = hs256(&with_aud_iss(json!("shardgate"), iss.clone()));
        assert_eq!(
            verifier.verify(&token),
            Err(AuthError::WrongIssuer),
            "{iss}"
        );
    }

    let token = hs256(&claims_with("aud", json!("shardgate")));
    assert_eq!(verifier.verify(&token), Err(AuthError::MissingIssuer));
}

#[test]
fn iss_is_ignored_when_no_issuer_is_configured() {
    assert!(hs_verify(&claims_with("iss", json!("anyone"))).is_ok());
}

// ---- malformed tokens -------------------------------------------------------

#[test]
fn truncated_tokens_are_refused() {
    let token = hs256(&valid_claims());

    let half = &token[..token.len() / 2];
    assert_eq!(hs_verifier().verify(half), Err(AuthError::Malformed));

    let (unsigned, _) = token.rsplit_once('.').expect("three segments");
    assert_eq!(hs_verifier().verify(unsigned), Err(AuthError::Malformed));

    let short = &token[..token.len() - 1];
    let result = hs_verifier().verify(short);
    assert!(
        matches!(result, Err(AuthError::Malformed | AuthError::BadSignature)),
        "{result:?}"
    );

    let empty_signature = format!("{unsigned}.");
    assert_eq!(
        hs_verifier().verify(&empty_signature),
        Err(AuthError::BadSignature)
    );
}

#[test]
fn invalid_base64_and_bad_shapes_are_malformed() {
    let token = hs256(&valid_claims());
    let (head, signature) = token.rsplit_once('.').expect("three segments");
    let cases = [
        String::new(),
        "..".to_owned(),
        "abc".to_owned(),
        "a.b".to_owned(),
        "a.b.c.d".to_owned(),
        format!("{token}.extra"),
        format!("!!!.{head}"),
        format!("{head}.{signature}=="),
        format!("{head}.+/+/"),
        format!(" {token}"),
        format!("{token}\n"),
        token.replacen('.', ".%", 1),
        format!("{}.{}.{}", b64url(b"not json"), b64url(b"{}"), signature),
    ];
    for case in cases {
        assert_eq!(
            hs_verifier().verify(&case),
            Err(AuthError::Malformed),
            "{case:?}"
        );
    }
}

#[test]
fn payload_that_is_not_an_object_is_malformed() {
    let token = hs256_raw(r#"{"alg":"HS256"}"#, r#"["sub","alice"]"#);
    assert_eq!(hs_verifier().verify(&token), Err(AuthError::Malformed));
}

#[test]
fn unknown_critical_header_is_malformed() {
    let exp = now_secs() + 600;
    let payload = format!(r#"{{"sub":"alice","exp":{exp}}}"#);
    let token = hs256_raw(r#"{"alg":"HS256","crit":["exp"],"exp":1}"#, &payload);
    assert_eq!(hs_verifier().verify(&token), Err(AuthError::Malformed));
}

#[test]
fn oversized_tokens_are_refused_up_front() {
    let big = claims_with("pad", json!("x".repeat(MAX_TOKEN_LEN)));
    assert_eq!(hs_verify(&big), Err(AuthError::Malformed));
}

// ---- redaction --------------------------------------------------------------

#[test]
fn debug_of_key_material_and_config_hides_the_secret() {
    let secret = b"a-very-secret-value-that-must-not-leak!!".to_vec();
    let config = AuthConfig::hmac(Algorithm::HS256, secret.clone());
    let numbers = format!("{:?}", &secret[..4])
        .trim_end_matches(']')
        .to_owned();

    for text in [
        format!("{:?}", config.key),
        format!("{config:?}"),
        format!("{config:#?}"),
    ] {
        assert!(!text.contains("a-very-secret"), "{text}");
        assert!(!text.contains(&numbers), "{text}");
    }

    let verifier_text = format!("{:?}", verifier(&config));
    assert!(!verifier_text.contains("a-very-secret"), "{verifier_text}");
    assert!(!verifier_text.contains(&numbers), "{verifier_text}");
}

#[test]
fn errors_never_show_the_token() {
    let token = hs256(&valid_claims());
    let segments: Vec<&str> = token.split('.').collect();
    for error in AuthError::ALL {
        for text in [
            error.to_string(),
            format!("{error:?}"),
            error.reason().to_owned(),
        ] {
            assert!(
                segments.iter().all(|segment| !text.contains(segment)),
                "{text}"
            );
        }
    }
    for error in CarrierError::ALL {
        assert!(!error.to_string().contains(&token));
    }

    let presented = extract_token(&[format!("Bearer {token}").as_bytes()], &[], None);
    let text = format!("{presented:?}");
    assert!(
        segments.iter().all(|segment| !text.contains(segment)),
        "{text}"
    );
}

#[test]
fn reasons_are_distinct_and_snake_case() {
    let reasons: Vec<&str> = AuthError::ALL
        .iter()
        .map(AuthError::reason)
        .chain(CarrierError::ALL.iter().map(CarrierError::reason))
        .collect();
    let unique: std::collections::HashSet<&str> = reasons.iter().copied().collect();
    assert_eq!(unique.len(), reasons.len());
    for reason in reasons {
        assert!(
            reason.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
            "{reason}"
        );
    }
}

#[test]
fn statuses_and_challenges_follow_rfc_6750() {
    assert_eq!(CarrierError::NoToken.status(), 401);
    assert_eq!(CarrierError::NoToken.www_authenticate(), "Bearer");
    for error in &CarrierError::ALL[1..] {
        assert_eq!(error.status(), 400);
        assert_eq!(error.www_authenticate(), "Bearer error=\"invalid_request\"");
    }
    assert_eq!(AuthError::Expired.status(), 401);
    assert_eq!(
        AuthError::Expired.www_authenticate(),
        Some("Bearer error=\"invalid_token\"")
    );
    assert_eq!(AuthError::Internal.status(), 500);
}

#[test]
fn now_secs_is_after_2024() {
    assert!(now_secs() > 1_700_000_000);
}

#[test]
fn verifier_is_shared_across_threads() {
    let verifier = Arc::new(hs_verifier());
    let token = Arc::new(hs256(&valid_claims()));
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let verifier = Arc::clone(&verifier);
            let token = Arc::clone(&token);
            std::thread::spawn(move || verifier.verify(&token).map(|claims| claims.sub))
        })
        .collect();
    for handle in handles {
        assert_eq!(handle.join().expect("thread"), Ok("alice".into()));
    }
}
