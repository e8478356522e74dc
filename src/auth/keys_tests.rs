//! Unit tests of key material: each key type and algorithm pinning,
//! configuration errors, minting and the crypto provider check.

use jsonwebtoken::EncodingKey;
use serde_json::json;

use super::*;
use crate::auth::tests::{
    SECRET, b64url, claims_with, hmac_config, hs_verifier, hs256, sign, valid_claims, verifier,
};
use crate::auth::{MAX_LEEWAY_SECS, MAX_SUB_LEN};

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

const OTHER_SECRET: &[u8] = b"fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210";

// ---- each key type ----------------------------------------------------------

/// Each asymmetric algorithm with its fixture signing key and public key.
fn asymmetric_fixtures() -> [(Algorithm, EncodingKey, &'static [u8]); 3] {
    let key = |parsed: Result<EncodingKey, _>| parsed.expect("private fixture");
    [
        (
            Algorithm::RS256,
            key(EncodingKey::from_rsa_pem(RSA_PRIVATE)),
            RSA_PUBLIC,
        ),
        (
            Algorithm::ES256,
            key(EncodingKey::from_ec_pem(EC_PRIVATE)),
            EC_PUBLIC,
        ),
        (
            Algorithm::EdDSA,
            key(EncodingKey::from_ed_pem(ED_PRIVATE)),
            ED_PUBLIC,
        ),
    ]
}

#[test]
fn rs256_es256_and_eddsa_accept_tokens_of_the_fixture_keys() {
    for (algorithm, private, public) in asymmetric_fixtures() {
        let token = sign(algorithm, &private, &valid_claims());
        let verifier = verifier(&AuthConfig::public_key(algorithm, public));

        assert_eq!(verifier.algorithm(), algorithm);
        let claims = verifier.verify(&token).expect("fixture token verifies");
        assert_eq!(&*claims.sub, "alice", "{algorithm:?}");
    }
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
    for (algorithm, private, public) in asymmetric_fixtures() {
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
    // It can run more than once.
    assert_eq!(check_crypto_provider(), Ok(()));
}
