//! Unit tests of the authentication module.

use std::sync::Arc;

use jsonwebtoken::{EncodingKey, Header};
use serde_json::{Value, json};

use super::*;

const RSA_PRIVATE: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/rsa_private.pem"
));
const RSA_PUBLIC: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/rsa_public.pem"
));
const EC_PRIVATE: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/ec_private.pem"
));
const EC_PUBLIC: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/ec_public.pem"
));
const ED_PRIVATE: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/ed25519_private.pem"
));
const ED_PUBLIC: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/ed25519_public.pem"
));

/// 64 bytes: long enough for HS512 (RFC 7518 §3.2).
const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const OTHER_SECRET: &[u8] = b"fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210";

// ---- helpers ----------------------------------------------------------------

fn b64url(bytes: &[u8]) -> String {
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

fn hmac_config(algorithm: Algorithm) -> AuthConfig {
    AuthConfig::hmac(algorithm, SECRET)
}

fn verifier(config: &AuthConfig) -> Verifier {
    Verifier::new(config).expect("test configuration is valid")
}

fn hs_verifier() -> Verifier {
    verifier(&hmac_config(Algorithm::HS256))
}

fn sign(algorithm: Algorithm, key: &EncodingKey, claims: &Value) -> String {
    jsonwebtoken::encode(&Header::new(algorithm), claims, key).expect("test token signs")
}

fn hs256(claims: &Value) -> String {
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

fn valid_claims() -> Value {
    let now = now_secs();
    json!({ "sub": "alice", "exp": now + 600, "iat": now })
}

fn claims_with(key: &str, value: Value) -> Value {
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
fn rs256_es256_and_eddsa_accept_tokens_of_the_fixture_keys() {
    let cases = [
        (
            Algorithm::RS256,
            EncodingKey::from_rsa_pem(RSA_PRIVATE),
            RSA_PUBLIC,
        ),
        (
            Algorithm::ES256,
            EncodingKey::from_ec_pem(EC_PRIVATE),
            EC_PUBLIC,
        ),
        (
            Algorithm::EdDSA,
            EncodingKey::from_ed_pem(ED_PRIVATE),
            ED_PUBLIC,
        ),
    ];
    for (algorithm, private, public) in cases {
        let token = sign(
            algorithm,
            &private.expect("private fixture"),
            &valid_claims(),
        );
        let verifier = verifier(&AuthConfig::public_key(algorithm, public));

        assert_eq!(verifier.algorithm(), algorithm);
        let claims = verifier.verify(&token).expect("fixture token verifies");
        assert_eq!(&*claims.sub, "alice", "{algorithm:?}");
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

// ---- keys and algorithms ----------------------------------------------------

#[test]
fn a_token_signed_with_another_secret_is_refused() {
    let key = EncodingKey::from_secret(OTHER_SECRET).expect("secret");
    let token = sign(Algorithm::HS256, &key, &valid_claims());
    assert_eq!(hs_verifier().verify(&token), Err(AuthError::BadSignature));
}

#[test]
fn asymmetric_signatures_over_another_payload_are_refused() {
    let cases = [
        (
            Algorithm::RS256,
            EncodingKey::from_rsa_pem(RSA_PRIVATE),
            RSA_PUBLIC,
        ),
        (
            Algorithm::ES256,
            EncodingKey::from_ec_pem(EC_PRIVATE),
            EC_PUBLIC,
        ),
        (
            Algorithm::EdDSA,
            EncodingKey::from_ed_pem(ED_PRIVATE),
            ED_PUBLIC,
        ),
    ];
    for (algorithm, private, public) in cases {
        let private = private.expect("private fixture");
        let alice = sign(algorithm, &private, &valid_claims());
        let mallory = sign(algorithm, &private, &claims_with("sub", json!("mallory")));

        // Mallory's header and payload with Alice's signature.
        let (head, _) = mallory.rsplit_once('.').expect("three segments");
        let (_, signature) = alice.rsplit_once('.').expect("three segments");
        let forged = format!("{head}.{signature}");

        let verifier = verifier(&AuthConfig::public_key(algorithm, public));
        assert_eq!(
            verifier.verify(&forged),
            Err(AuthError::BadSignature),
            "{algorithm:?}"
        );
    }
}

#[test]
fn alg_none_in_any_case_is_malformed() {
    for alg in ["none", "None", "NONE"] {
        let header = b64url(format!(r#"{{"alg":"{alg}","typ":"JWT"}}"#).as_bytes());
        let payload = b64url(valid_claims().to_string().as_bytes());
        let token = format!("{header}.{payload}.");
        assert_eq!(
            hs_verifier().verify(&token),
            Err(AuthError::Malformed),
            "{alg}"
        );
    }
}

#[test]
fn hs256_tokens_are_refused_when_rs256_is_configured() {
    let rs = verifier(&AuthConfig::public_key(Algorithm::RS256, RSA_PUBLIC));

    // The classic key-confusion attack: the public key PEM used as HMAC secret.
    let confused = EncodingKey::from_secret(RSA_PUBLIC).expect("secret");
    let token = sign(Algorithm::HS256, &confused, &valid_claims());
    assert_eq!(rs.verify(&token), Err(AuthError::AlgorithmNotAllowed));

    assert_eq!(
        rs.verify(&hs256(&valid_claims())),
        Err(AuthError::AlgorithmNotAllowed)
    );
}

#[test]
fn only_the_configured_algorithm_is_accepted() {
    let hs384 = EncodingKey::from_secret(SECRET).expect("secret");
    let token = sign(Algorithm::HS384, &hs384, &valid_claims());
    assert_eq!(
        hs_verifier().verify(&token),
        Err(AuthError::AlgorithmNotAllowed)
    );

    let rsa = EncodingKey::from_rsa_pem(RSA_PRIVATE).expect("private fixture");
    let token = sign(Algorithm::RS256, &rsa, &valid_claims());
    assert_eq!(
        hs_verifier().verify(&token),
        Err(AuthError::AlgorithmNotAllowed)
    );

    let ec = EncodingKey::from_ec_pem(EC_PRIVATE).expect("private fixture");
    let token = sign(Algorithm::ES256, &ec, &valid_claims());
    let ed = verifier(&AuthConfig::public_key(Algorithm::EdDSA, ED_PUBLIC));
    assert_eq!(ed.verify(&token), Err(AuthError::AlgorithmNotAllowed));
}

#[test]
fn signature_is_checked_before_claims() {
    let key = EncodingKey::from_secret(OTHER_SECRET).expect("secret");
    let expired = claims_with("exp", json!(now_secs() - 10_000));
    let token = sign(Algorithm::HS256, &key, &expired);
    assert_eq!(hs_verifier().verify(&token), Err(AuthError::BadSignature));
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

// ---- configuration ----------------------------------------------------------

fn key_error(config: &AuthConfig) -> KeyError {
    match Verifier::new(config) {
        Ok(_) => panic!("configuration {config:?} was accepted"),
        Err(err) => err,
    }
}

#[test]
fn bad_secrets_are_configuration_errors() {
    assert_eq!(
        key_error(&AuthConfig::hmac(Algorithm::HS256, Vec::new())),
        KeyError::EmptySecret
    );

    let short = key_error(&AuthConfig::hmac(Algorithm::HS256, &SECRET[..31]));
    assert!(
        matches!(
            short,
            KeyError::SecretTooShort {
                min: 32,
                actual: 31,
                ..
            }
        ),
        "{short:?}"
    );
    let short = key_error(&AuthConfig::hmac(Algorithm::HS512, &SECRET[..48]));
    assert!(
        matches!(
            short,
            KeyError::SecretTooShort {
                min: 64,
                actual: 48,
                ..
            }
        ),
        "{short:?}"
    );
}

#[test]
fn wrong_key_kinds_are_configuration_errors() {
    let pem_for_hmac = key_error(&AuthConfig::public_key(Algorithm::HS256, RSA_PUBLIC));
    assert!(
        matches!(pem_for_hmac, KeyError::WrongKeyKind { .. }),
        "{pem_for_hmac:?}"
    );

    let secret_for_rsa = key_error(&AuthConfig::hmac(Algorithm::RS256, SECRET));
    assert!(
        matches!(secret_for_rsa, KeyError::WrongKeyKind { .. }),
        "{secret_for_rsa:?}"
    );

    let mismatches = [
        (Algorithm::RS256, EC_PUBLIC),
        (Algorithm::RS256, ED_PUBLIC),
        (Algorithm::ES256, RSA_PUBLIC),
        (Algorithm::ES256, ED_PUBLIC),
        (Algorithm::EdDSA, RSA_PUBLIC),
        (Algorithm::EdDSA, EC_PUBLIC),
    ];
    for (algorithm, pem) in mismatches {
        let err = key_error(&AuthConfig::public_key(algorithm, pem));
        assert!(
            matches!(err, KeyError::InvalidPublicKey { .. }),
            "{algorithm:?}: {err:?}"
        );
    }
}

#[test]
fn private_keys_and_garbage_pem_are_configuration_errors() {
    for (algorithm, private) in [
        (Algorithm::RS256, RSA_PRIVATE),
        (Algorithm::ES256, EC_PRIVATE),
        (Algorithm::EdDSA, ED_PRIVATE),
    ] {
        let err = key_error(&AuthConfig::public_key(algorithm, private));
        assert_eq!(err, KeyError::PrivateKey, "{algorithm:?}");
    }

    let garbage = b"-----BEGIN PUBLIC KEY-----\nbm90IGEga2V5\n-----END PUBLIC KEY-----\n";
    let err = key_error(&AuthConfig::public_key(
        Algorithm::RS256,
        garbage.as_slice(),
    ));
    assert!(matches!(err, KeyError::InvalidPublicKey { .. }), "{err:?}");

    let err = key_error(&AuthConfig::public_key(
        Algorithm::ES256,
        b"not pem at all".as_slice(),
    ));
    assert!(matches!(err, KeyError::InvalidPublicKey { .. }), "{err:?}");

    let cert = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
    let err = key_error(&AuthConfig::public_key(Algorithm::EdDSA, cert.as_slice()));
    assert!(matches!(err, KeyError::InvalidPublicKey { .. }), "{err:?}");
}

#[test]
fn unsupported_algorithms_leeway_and_empty_lists_are_configuration_errors() {
    for algorithm in [Algorithm::RS384, Algorithm::PS256, Algorithm::ES384] {
        let err = key_error(&AuthConfig::public_key(algorithm, RSA_PUBLIC));
        assert_eq!(err, KeyError::UnsupportedAlgorithm(algorithm));
    }

    let mut config = hmac_config(Algorithm::HS256);
    config.leeway_secs = MAX_LEEWAY_SECS + 1;
    assert_eq!(
        key_error(&config),
        KeyError::LeewayTooLarge(MAX_LEEWAY_SECS + 1)
    );

    let mut config = hmac_config(Algorithm::HS256);
    config.audience = Some(Vec::new());
    assert_eq!(key_error(&config), KeyError::EmptyAudience);

    let mut config = hmac_config(Algorithm::HS256);
    config.issuer = Some(vec![String::new()]);
    assert_eq!(key_error(&config), KeyError::EmptyIssuer);
}

#[test]
fn pkcs1_rsa_public_key_pem_is_accepted() {
    // The same key as rsa_public.pem, re-wrapped as PKCS#1 from its SPKI DER.
    let spki = pem_body(RSA_PUBLIC);
    // SPKI = SEQ { SEQ { oid, null }, BIT STRING { 0x00, RSAPublicKey } }:
    // the RSAPublicKey starts after the 24-byte prefix of a 2048-bit key.
    let pkcs1 = &spki[24..];
    assert_eq!(pkcs1[0], 0x30, "RSAPublicKey is a SEQUENCE");
    let pem = format!(
        "-----BEGIN RSA PUBLIC KEY-----\n{}\n-----END RSA PUBLIC KEY-----\n",
        b64(pkcs1)
    );
    let verifier = verifier(&AuthConfig::public_key(Algorithm::RS256, pem.into_bytes()));
    let key = EncodingKey::from_rsa_pem(RSA_PRIVATE).expect("private fixture");
    assert!(
        verifier
            .verify(&sign(Algorithm::RS256, &key, &valid_claims()))
            .is_ok()
    );
}

/// Decodes the base64 body of a one-block PEM (test helper, no padding tricks).
fn pem_body(pem: &[u8]) -> Vec<u8> {
    let text = std::str::from_utf8(pem).expect("PEM is text");
    let body: String = text
        .lines()
        .filter(|line| !line.starts_with("-----"))
        .collect();
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut bits = 0u32;
    let mut count = 0;
    let mut out = Vec::new();
    for byte in body.bytes().filter(|b| *b != b'=') {
        let value = alphabet
            .iter()
            .position(|a| *a == byte)
            .expect("base64 digit") as u32;
        bits = bits << 6 | value;
        count += 6;
        if count >= 8 {
            count -= 8;
            out.push((bits >> count) as u8);
        }
    }
    out
}

/// Standard base64 with padding (test helper).
fn b64(bytes: &[u8]) -> String {
    let mut out = b64url(bytes).replace('-', "+").replace('_', "/");
    while !out.len().is_multiple_of(4) {
        out.push('=');
    }
    out
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

// ---- minting and provider ---------------------------------------------------

#[test]
fn mint_then_verify_round_trips() {
    for algorithm in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
        let before = now_secs();
        let token = mint(SECRET, algorithm, "alice@example", 300).expect("mints");
        let claims = verifier(&hmac_config(algorithm))
            .verify(&token)
            .expect("verifies");
        assert_eq!(&*claims.sub, "alice@example");
        assert!(claims.exp >= before + 300 && claims.exp <= now_secs() + 300);
        assert!(claims.iat.is_some_and(|iat| iat >= before));
    }
}

#[test]
fn mint_refuses_what_verify_would_refuse() {
    assert_eq!(
        mint(SECRET, Algorithm::RS256, "alice", 60),
        Err(KeyError::NotHmac(Algorithm::RS256))
    );
    assert_eq!(
        mint(SECRET, Algorithm::EdDSA, "alice", 60),
        Err(KeyError::NotHmac(Algorithm::EdDSA))
    );
    assert_eq!(
        mint(b"", Algorithm::HS256, "alice", 60),
        Err(KeyError::EmptySecret)
    );
    assert!(matches!(
        mint(b"short", Algorithm::HS256, "alice", 60),
        Err(KeyError::SecretTooShort { .. })
    ));
    for sub in ["", "a\tb", &"x".repeat(MAX_SUB_LEN + 1)] {
        assert_eq!(
            mint(SECRET, Algorithm::HS256, sub, 60),
            Err(KeyError::InvalidSubject)
        );
    }
}

#[test]
fn mint_with_huge_ttl_saturates() {
    let token = mint(SECRET, Algorithm::HS256, "alice", u64::MAX).expect("mints");
    assert_eq!(hs_verifier().verify(&token).map(|c| c.exp), Ok(u64::MAX));
}

#[test]
fn crypto_provider_check_passes() {
    assert_eq!(check_crypto_provider(), Ok(()));
    // Twice, and the panic hook is back in place afterwards.
    assert_eq!(check_crypto_provider(), Ok(()));
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

// ---- carriers ---------------------------------------------------------------

const JWT: &str = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhIn0.c2ln";

fn presented(token: &str, carrier: Carrier) -> Result<Presented, CarrierError> {
    Ok(Presented {
        token: token.to_owned(),
        carrier,
    })
}

#[test]
fn authorization_bearer_is_found() {
    let header = format!("Bearer {JWT}");
    let result = extract_token(&[header.as_bytes()], &[], None);
    assert_eq!(result, presented(JWT, Carrier::AuthorizationHeader));
}

#[test]
fn bearer_scheme_is_case_insensitive_and_whitespace_tolerant() {
    for header in [
        format!("bearer {JWT}"),
        format!("BEARER   {JWT}"),
        format!("  Bearer\t{JWT} "),
    ] {
        let result = extract_token(&[header.as_bytes()], &[], None);
        assert_eq!(
            result,
            presented(JWT, Carrier::AuthorizationHeader),
            "{header:?}"
        );
    }
}

#[test]
fn non_bearer_schemes_count_as_no_token() {
    for header in [
        "Basic YWxpY2U6c2VjcmV0",
        "Digest username=\"a\"",
        "Bearerish abc",
        "Token abc",
    ] {
        let result = extract_token(&[header.as_bytes()], &[], None);
        assert_eq!(result, Err(CarrierError::NoToken), "{header}");
    }

    // ... so another carrier may still present the token.
    let query = format!("token={JWT}");
    let result = extract_token(&[b"Basic YWxpY2U6c2VjcmV0"], &[], Some(&query));
    assert_eq!(result, presented(JWT, Carrier::QueryParameter));
}

#[test]
fn malformed_bearer_credentials_are_bad_requests() {
    for header in [
        "Bearer",
        "Bearer ",
        "Bearer a b",
        "Bearer a=b",
        "Bearer \"abc\"",
        "Bearer ,",
    ] {
        let result = extract_token(&[header.as_bytes()], &[], None);
        assert_eq!(result, Err(CarrierError::MalformedCarrier), "{header}");
    }
    let result = extract_token(&[b"Bearer \xff\xfe"], &[], None);
    assert_eq!(result, Err(CarrierError::BadEncoding));
}

#[test]
fn b64token_padding_is_allowed_at_the_end_only() {
    let result = extract_token(&[b"Bearer abc+/~-._=="], &[], None);
    assert_eq!(
        result,
        presented("abc+/~-._==", Carrier::AuthorizationHeader)
    );
}

#[test]
fn repeated_authorization_headers_are_ambiguous() {
    let header = format!("Bearer {JWT}");
    let result = extract_token(&[header.as_bytes(), header.as_bytes()], &[], None);
    assert_eq!(result, Err(CarrierError::Ambiguous));
}

#[test]
fn query_parameter_is_found_and_percent_decoded() {
    let query = format!("a=1&token={JWT}&b=%20");
    assert_eq!(
        extract_token(&[], &[], Some(&query)),
        presented(JWT, Carrier::QueryParameter)
    );

    let encoded = JWT.replace('.', "%2E").replacen('e', "%65", 1);
    let query = format!("tok%65n={encoded}");
    assert_eq!(
        extract_token(&[], &[], Some(&query)),
        presented(JWT, Carrier::QueryParameter)
    );

    let query = "token=abc%2Bdef%2f";
    assert_eq!(
        extract_token(&[], &[], Some(query)),
        presented("abc+def/", Carrier::QueryParameter)
    );
}

#[test]
fn query_without_token_presents_none() {
    for query in ["", "a=1&b=2", "tokens=abc", "Token=abc", "x=%zz"] {
        assert_eq!(
            extract_token(&[], &[], Some(query)),
            Err(CarrierError::NoToken),
            "{query}"
        );
    }
    assert_eq!(extract_token(&[], &[], None), Err(CarrierError::NoToken));
}

#[test]
fn bad_query_tokens_are_bad_requests() {
    for query in ["token=abc%zz", "token=abc%2", "token=%ff%fe", "token=%"] {
        let result = extract_token(&[], &[], Some(query));
        assert_eq!(result, Err(CarrierError::BadEncoding), "{query}");
    }
    for query in ["token=", "token", "token=a+b", "token=a%20b", "token=a%3Db"] {
        let result = extract_token(&[], &[], Some(query));
        assert_eq!(result, Err(CarrierError::MalformedCarrier), "{query}");
    }
}

#[test]
fn repeated_token_parameter_is_ambiguous() {
    let query = format!("token={JWT}&token={JWT}");
    assert_eq!(
        extract_token(&[], &[], Some(&query)),
        Err(CarrierError::Ambiguous)
    );
}

#[test]
fn subprotocol_bearer_is_found_with_shardgate_v1() {
    let value = format!("shardgate.v1, bearer.{JWT}");
    let protocols: [&[u8]; 1] = [value.as_bytes()];
    assert_eq!(
        extract_token(&[], &protocols, None),
        presented(JWT, Carrier::Subprotocol)
    );
    assert_eq!(selected_subprotocol(&protocols), Some("shardgate.v1"));
}

#[test]
fn subprotocol_lists_may_span_headers_and_carry_whitespace() {
    let bearer = format!(" ,\tbearer.{JWT} ,, ");
    let protocols: [&[u8]; 3] = [b"chat, other ", bearer.as_bytes(), b"\tshardgate.v1"];
    assert_eq!(
        extract_token(&[], &protocols, None),
        presented(JWT, Carrier::Subprotocol)
    );
    assert_eq!(selected_subprotocol(&protocols), Some(SUBPROTOCOL));
}

#[test]
fn bearer_subprotocol_without_shardgate_v1_is_a_bad_request() {
    let value = format!("chat, bearer.{JWT}");
    let protocols: [&[u8]; 1] = [value.as_bytes()];
    assert_eq!(
        extract_token(&[], &protocols, None),
        Err(CarrierError::BearerWithoutProtocol)
    );
    assert_eq!(selected_subprotocol(&protocols), None);

    let almost = format!("shardgate.v2, Shardgate.v1, bearer.{JWT}");
    let protocols: [&[u8]; 1] = [almost.as_bytes()];
    assert_eq!(
        extract_token(&[], &protocols, None),
        Err(CarrierError::BearerWithoutProtocol)
    );
}

#[test]
fn subprotocol_problems_are_bad_requests() {
    let twice = format!("shardgate.v1, bearer.{JWT}, bearer.{JWT}");
    let protocols: [&[u8]; 1] = [twice.as_bytes()];
    assert_eq!(
        extract_token(&[], &protocols, None),
        Err(CarrierError::Ambiguous)
    );

    let protocols: [&[u8]; 1] = [b"shardgate.v1, bearer."];
    assert_eq!(
        extract_token(&[], &protocols, None),
        Err(CarrierError::MalformedCarrier)
    );

    let protocols: [&[u8]; 1] = [b"shardgate.v1, bearer.\xff"];
    assert_eq!(
        extract_token(&[], &protocols, None),
        Err(CarrierError::BadEncoding)
    );
}

#[test]
fn shardgate_v1_alone_presents_no_token_but_is_selected() {
    let protocols: [&[u8]; 1] = [b"shardgate.v1"];
    assert_eq!(
        extract_token(&[], &protocols, None),
        Err(CarrierError::NoToken)
    );
    assert_eq!(selected_subprotocol(&protocols), Some(SUBPROTOCOL));
    assert_eq!(selected_subprotocol(&[b"chat"]), None);
    assert_eq!(selected_subprotocol(&[]), None);
}

#[test]
fn two_carriers_at_once_are_ambiguous() {
    let header = format!("Bearer {JWT}");
    let query = format!("token={JWT}");
    let protocol = format!("shardgate.v1, bearer.{JWT}");
    let auth: [&[u8]; 1] = [header.as_bytes()];
    let protocols: [&[u8]; 1] = [protocol.as_bytes()];

    assert_eq!(
        extract_token(&auth, &[], Some(&query)),
        Err(CarrierError::Ambiguous)
    );
    assert_eq!(
        extract_token(&auth, &protocols, None),
        Err(CarrierError::Ambiguous)
    );
    assert_eq!(
        extract_token(&[], &protocols, Some(&query)),
        Err(CarrierError::Ambiguous)
    );
    assert_eq!(
        extract_token(&auth, &protocols, Some(&query)),
        Err(CarrierError::Ambiguous)
    );
}

#[test]
fn extracted_tokens_verify_end_to_end() {
    let token = mint(SECRET, Algorithm::HS256, "alice", 60).expect("mints");
    let query = format!("x=1&token={}", token.replace('.', "%2E"));
    let presented = extract_token(&[], &[], Some(&query)).expect("found");
    assert_eq!(presented.carrier, Carrier::QueryParameter);
    assert_eq!(
        hs_verifier().verify(&presented.token).map(|c| c.sub),
        Ok("alice".into())
    );
}
