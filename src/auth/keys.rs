//! Key material: decoding keys from configuration (PEM label and RSA size
//! checks), the jsonwebtoken crypto provider check and self-test, and
//! [`mint`].

use std::panic;

use jsonwebtoken::crypto::CryptoProvider;
use jsonwebtoken::{DecodingKey, EncodingKey, Header};
use serde::Serialize;

use super::{
    Algorithm, AuthConfig, AuthError, KeyError, KeyMaterial, MIN_RSA_BITS, Verifier, now_secs,
    subject_is_acceptable,
};

/// The key kind an algorithm needs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    Hmac { min_secret: usize },
    Rsa,
    Ec,
    Ed,
}

/// The algorithms of the contract and the key each needs. Others (RS384,
/// PS256, ES384, ...) are refused: `Algorithm` is non-exhaustive, and every
/// accepted algorithm has tests.
fn key_kind(algorithm: Algorithm) -> Result<KeyKind, KeyError> {
    // RFC 7518 §3.2 (and RFC 8725 §3.5): an HMAC key at least as long as
    // the hash output.
    match algorithm {
        Algorithm::HS256 => Ok(KeyKind::Hmac { min_secret: 32 }),
        Algorithm::HS384 => Ok(KeyKind::Hmac { min_secret: 48 }),
        Algorithm::HS512 => Ok(KeyKind::Hmac { min_secret: 64 }),
        Algorithm::RS256 => Ok(KeyKind::Rsa),
        Algorithm::ES256 => Ok(KeyKind::Ec),
        Algorithm::EdDSA => Ok(KeyKind::Ed),
        other => Err(KeyError::UnsupportedAlgorithm(other)),
    }
}

/// Checks an HMAC secret's length for `algorithm`.
fn check_secret(algorithm: Algorithm, secret: &[u8], min: usize) -> Result<(), KeyError> {
    if secret.is_empty() {
        return Err(KeyError::EmptySecret);
    }
    if secret.len() < min {
        return Err(KeyError::SecretTooShort {
            algorithm,
            min,
            actual: secret.len(),
        });
    }
    Ok(())
}

/// The process-wide jsonwebtoken provider, or an error instead of the panic
/// that jsonwebtoken would raise on first use.
pub(super) fn provider() -> Result<&'static CryptoProvider, KeyError> {
    CryptoProvider::try_get_default().ok_or(KeyError::NoCryptoProvider)
}

/// Builds the decoding key for `algorithm` and proves the backend can use it.
pub(super) fn decoding_key(
    provider: &'static CryptoProvider,
    algorithm: Algorithm,
    key: &KeyMaterial,
) -> Result<DecodingKey, KeyError> {
    let kind = key_kind(algorithm)?;
    let invalid = |detail: String| KeyError::InvalidPublicKey { algorithm, detail };

    // RFC 8725 §3.1: the key decides the algorithm family, never the token;
    // a secret is never used as a public key, nor a PEM as a secret.
    let decoding = match (kind, key) {
        (KeyKind::Hmac { min_secret }, KeyMaterial::Secret(secret)) => {
            check_secret(algorithm, secret, min_secret)?;
            DecodingKey::from_secret(secret).map_err(|_| KeyError::EmptySecret)?
        }
        (KeyKind::Hmac { .. }, KeyMaterial::PublicKeyPem(_)) => {
            return Err(KeyError::WrongKeyKind {
                algorithm,
                expected: "a shared secret",
            });
        }
        (_, KeyMaterial::Secret(_)) => {
            return Err(KeyError::WrongKeyKind {
                algorithm,
                expected: "a PEM public key",
            });
        }
        (KeyKind::Rsa, KeyMaterial::PublicKeyPem(pem)) => {
            check_pem_label(algorithm, pem, true)?;
            let decoding =
                DecodingKey::from_rsa_pem(pem).map_err(|err| invalid(err.to_string()))?;
            check_rsa_size(provider, algorithm, &decoding)?;
            decoding
        }
        (KeyKind::Ec, KeyMaterial::PublicKeyPem(pem)) => {
            check_pem_label(algorithm, pem, false)?;
            DecodingKey::from_ec_pem(pem).map_err(|err| invalid(err.to_string()))?
        }
        (KeyKind::Ed, KeyMaterial::PublicKeyPem(pem)) => {
            check_pem_label(algorithm, pem, false)?;
            let decoding = DecodingKey::from_ed_pem(pem).map_err(|err| invalid(err.to_string()))?;
            // The backend slices the first 32 bytes: guard its panic here.
            match decoding.try_get_as_bytes() {
                Ok(bytes) if bytes.len() == 32 => {}
                _ => return Err(invalid("not a 32-byte Ed25519 public key".to_owned())),
            }
            decoding
        }
    };

    // Build a verifier once: the EC and Ed backends parse the key here, so a
    // point not on the curve (or a P-384 key for ES256) fails at start-up.
    (provider.verifier_factory)(&algorithm, &decoding).map_err(|err| invalid(err.to_string()))?;
    Ok(decoding)
}

/// Refuses PEM input that holds a private key anywhere, and accepts only the
/// public-key labels (`PUBLIC KEY`; also `RSA PUBLIC KEY` for RSA).
fn check_pem_label(algorithm: Algorithm, pem: &[u8], rsa: bool) -> Result<(), KeyError> {
    if contains(pem, b"PRIVATE KEY-----") {
        return Err(KeyError::PrivateKey);
    }

    const BEGIN: &[u8] = b"-----BEGIN ";
    let label = find(pem, BEGIN)
        .map(|at| &pem[at + BEGIN.len()..])
        .and_then(|rest| find(rest, b"-----").map(|end| &rest[..end]));
    match label {
        Some(b"PUBLIC KEY") => Ok(()),
        Some(b"RSA PUBLIC KEY") if rsa => Ok(()),
        Some(other) => Err(KeyError::InvalidPublicKey {
            algorithm,
            detail: format!(
                "expected a PEM block labelled PUBLIC KEY, found {:?}",
                String::from_utf8_lossy(&other[..other.len().min(40)])
            ),
        }),
        None => Err(KeyError::InvalidPublicKey {
            algorithm,
            detail: "no PEM block found".to_owned(),
        }),
    }
}

/// RFC 7518 §3.3: RSA keys of 2048 bits or more.
fn check_rsa_size(
    provider: &CryptoProvider,
    algorithm: Algorithm,
    key: &DecodingKey,
) -> Result<(), KeyError> {
    let invalid = |detail: String| KeyError::InvalidPublicKey { algorithm, detail };
    let der = key
        .try_get_as_bytes()
        .map_err(|err| invalid(err.to_string()))?;
    let (modulus, _exponent) = (provider.key_utils.rsa_pub_components_from_public_key)(der)
        .map_err(|err| invalid(err.to_string()))?;

    let significant = modulus
        .iter()
        .skip_while(|byte| **byte == 0)
        .collect::<Vec<_>>();
    let bits = match significant.first() {
        Some(first) => significant.len() * 8 - first.leading_zeros() as usize,
        None => 0,
    };
    if bits < MIN_RSA_BITS {
        return Err(KeyError::RsaKeyTooSmall { bits });
    }
    Ok(())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    find(haystack, needle).is_some()
}

/// Checks that exactly one jsonwebtoken crypto provider is active and works:
/// it signs a throwaway HS256 token, verifies it, and checks that a tampered
/// copy is refused. Call it once at start-up.
///
/// The self-test runs under `catch_unwind`, so a panic of the backend
/// becomes [`KeyError::ProviderBroken`] (after the panic's own message on
/// stderr, which only a broken build ever prints). This relies on
/// `panic = "unwind"`.
pub fn check_crypto_provider() -> Result<(), KeyError> {
    provider()?;

    let outcome = panic::catch_unwind(provider_self_test);

    match outcome {
        Ok(result) => result,
        Err(_) => Err(KeyError::ProviderBroken("the self-test panicked")),
    }
}

fn provider_self_test() -> Result<(), KeyError> {
    const SECRET: &[u8] = b"shardgate provider self-test key";
    const SUB: &str = "self-test";

    let token = mint(SECRET, Algorithm::HS256, SUB, 60)?;
    let verifier = Verifier::new(&AuthConfig::hmac(Algorithm::HS256, SECRET))?;
    match verifier.verify(&token) {
        Ok(claims) if &*claims.sub == SUB => {}
        _ => {
            return Err(KeyError::ProviderBroken(
                "a freshly signed token did not verify",
            ));
        }
    }

    // A provider that accepts anything is worse than none: change the first
    // signature character and expect a bad signature.
    let Some(dot) = token.rfind('.') else {
        return Err(KeyError::ProviderBroken(
            "the signed token has no signature",
        ));
    };
    let mut tampered = token.clone();
    let replacement = if token[dot + 1..].starts_with('A') {
        "B"
    } else {
        "A"
    };
    tampered.replace_range(dot + 1..dot + 2, replacement);
    match verifier.verify(&tampered) {
        Err(AuthError::BadSignature) => Ok(()),
        _ => Err(KeyError::ProviderBroken("a tampered token was not refused")),
    }
}

#[derive(Serialize)]
struct MintedClaims<'a> {
    sub: &'a str,
    iat: u64,
    exp: u64,
}

/// Mints an HS* token (for `shardgate token` and demo mode) for `sub`, valid
/// for `ttl_secs` from now, with `iat` set. Fails for non-HMAC algorithms.
pub fn mint(
    secret: &[u8],
    algorithm: Algorithm,
    sub: &str,
    ttl_secs: u64,
) -> Result<String, KeyError> {
    provider()?;

    let KeyKind::Hmac { min_secret } = key_kind(algorithm)? else {
        return Err(KeyError::NotHmac(algorithm));
    };
    check_secret(algorithm, secret, min_secret)?;
    if !subject_is_acceptable(sub) {
        return Err(KeyError::InvalidSubject);
    }

    let now = now_secs();
    let claims = MintedClaims {
        sub,
        iat: now,
        exp: now.saturating_add(ttl_secs),
    };
    let key = EncodingKey::from_secret(secret).map_err(|_| KeyError::EmptySecret)?;
    jsonwebtoken::encode(&Header::new(algorithm), &claims, &key)
        .map_err(|err| KeyError::Signing(err.to_string()))
}

#[cfg(test)]
#[path = "keys_tests.rs"]
mod tests;
