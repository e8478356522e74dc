//! Authentication of WebSocket upgrade requests.
//!
//! This module owns two steps of every `GET /ws` upgrade:
//!
//! 1. [`extract_token`] finds the bearer token among the request's carriers
//!    (the `Authorization` header, the `token` query parameter, or a
//!    `bearer.<jwt>` entry of `Sec-WebSocket-Protocol`) and refuses requests
//!    that carry none, several, or a malformed one ([`CarrierError`]);
//! 2. [`Verifier::verify`] checks the token as a JWT (RFC 7519) following the
//!    JWT best current practices (RFC 8725) and returns its [`Claims`], or an
//!    [`AuthError`] naming the refusal class.
//!
//! It also mints HMAC tokens for `shardgate token` and demo mode ([`mint`]),
//! and checks at start-up that the JWT crypto backend works
//! ([`check_crypto_provider`]).
//!
//! Secrets stay secret: this module never logs, and no error it returns
//! contains or displays a token or a key. [`AuthError`] and [`CarrierError`]
//! carry no data at all; their [`AuthError::reason`] / [`CarrierError::reason`]
//! strings are short, stable and meant for audit logs and metric labels. The
//! `Debug` output of [`KeyMaterial`] (and so of [`AuthConfig`]) is redacted.
//! Callers must keep the same discipline: a token in the query string is part
//! of the request target, which must therefore never be logged as it came
//! (RFC 6750 §2.3, §5.3).
//!
//! Keys come from configuration only: header parameters such as `kid`,
//! `jku`, `jwk` and `x5u` are ignored, never followed (RFC 8725 §3.10).
//!
//! # Crypto backend
//!
//! jsonwebtoken 12 takes its cryptography from a provider chosen by crate
//! feature: exactly one of `rust_crypto` and `aws_lc_rs` must be enabled; with
//! both or neither, the first encode or decode panics. Shardgate enables
//! `rust_crypto` (pure Rust): it builds on any host with no C toolchain or
//! cmake. The `rsa` crate's known timing side channel (the Marvin attack,
//! RUSTSEC-2023-0071) concerns private-key operations, decryption and
//! signing; this module only verifies RSA signatures with public keys, so it
//! does not apply here.
//! [`check_crypto_provider`] proves at start-up that the provider is present
//! and works, so that a misconfigured build fails there with a clear error
//! rather than panicking on the first upgrade request.

use std::fmt;
use std::panic;
use std::sync::{Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::crypto::CryptoProvider;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{DecodingKey, EncodingKey, Header, Validation};
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use jsonwebtoken::Algorithm;

/// Tokens longer than this are refused as [`AuthError::Malformed`] before any
/// decoding: a cheap guard against oversized input.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

/// The longest accepted `sub` claim, in bytes.
pub const MAX_SUB_LEN: usize = 256;

/// The clock-skew leeway applied to `exp`, `nbf` and `iat` unless configured.
pub const DEFAULT_LEEWAY_SECS: u64 = 30;

/// The largest leeway accepted in configuration. RFC 7519 §4.1.4 speaks of a
/// leeway of "usually no more than a few minutes".
pub const MAX_LEEWAY_SECS: u64 = 300;

/// The smallest accepted RSA modulus, in bits (RFC 7518 §3.3).
pub const MIN_RSA_BITS: usize = 2048;

/// The application subprotocol that the server selects in its 101 response.
pub const SUBPROTOCOL: &str = "shardgate.v1";

/// The prefix of a `Sec-WebSocket-Protocol` entry that carries a token.
pub const BEARER_PROTOCOL_PREFIX: &str = "bearer.";

/// The query parameter that carries a token (for browsers).
pub const TOKEN_QUERY_PARAM: &str = "token";

/// The key that verifies (and, for HMAC, signs) tokens.
#[derive(Clone)]
pub enum KeyMaterial {
    /// The shared secret of HS256, HS384 and HS512.
    Secret(Vec<u8>),
    /// A PEM public key (SPKI `PUBLIC KEY`; for RSA also PKCS#1
    /// `RSA PUBLIC KEY`) for RS256, ES256 and EdDSA.
    PublicKeyPem(Vec<u8>),
}

impl fmt::Debug for KeyMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print key bytes: a secret must not reach a log through Debug.
        match self {
            Self::Secret(_) => f.write_str("Secret(<redacted>)"),
            Self::PublicKeyPem(pem) => write!(f, "PublicKeyPem(<{} bytes>)", pem.len()),
        }
    }
}

/// What the verifier accepts.
#[derive(Clone, Debug)]
pub struct AuthConfig {
    /// The one accepted algorithm: a token's header `alg` must equal it.
    pub algorithm: Algorithm,
    /// The key for `algorithm`.
    pub key: KeyMaterial,
    /// When set, a token must carry an `aud` naming one of these.
    /// When unset, a token that carries `aud` at all is refused.
    pub audience: Option<Vec<String>>,
    /// When set, a token must carry an `iss` equal to one of these.
    pub issuer: Option<Vec<String>>,
    /// Clock-skew leeway for `exp`, `nbf` and `iat`, in seconds.
    pub leeway_secs: u64,
}

impl AuthConfig {
    /// An HMAC configuration with no audience or issuer and the default leeway.
    pub fn hmac(algorithm: Algorithm, secret: impl Into<Vec<u8>>) -> AuthConfig {
        AuthConfig::with_key(algorithm, KeyMaterial::Secret(secret.into()))
    }

    /// A public-key configuration with no audience or issuer and the default
    /// leeway.
    pub fn public_key(algorithm: Algorithm, pem: impl Into<Vec<u8>>) -> AuthConfig {
        AuthConfig::with_key(algorithm, KeyMaterial::PublicKeyPem(pem.into()))
    }

    fn with_key(algorithm: Algorithm, key: KeyMaterial) -> AuthConfig {
        AuthConfig {
            algorithm,
            key,
            audience: None,
            issuer: None,
            leeway_secs: DEFAULT_LEEWAY_SECS,
        }
    }
}

/// The claims of a verified token that the server uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// The subject: the user the connection belongs to.
    pub sub: Box<str>,
    /// Expiry, in seconds since the Unix epoch.
    pub exp: u64,
    /// Issue time, in seconds since the Unix epoch (used by revocation).
    pub iat: Option<u64>,
}

/// Why a token was refused. Each variant is one refusal class; none carries
/// data, so no token can leak through `Display` or `Debug`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum AuthError {
    /// Not three base64url segments, bad JSON, an unknown `alg` name such as
    /// `none`, an unsupported `crit` header, or longer than [`MAX_TOKEN_LEN`].
    #[error("the token is malformed")]
    Malformed,
    /// The header's `alg` is not the configured algorithm.
    #[error("the token's algorithm is not the accepted one")]
    AlgorithmNotAllowed,
    /// The signature does not verify with the configured key.
    #[error("the token's signature does not verify")]
    BadSignature,
    /// `exp` is past, beyond the leeway.
    #[error("the token has expired")]
    Expired,
    /// `nbf` is in the future, beyond the leeway.
    #[error("the token is not valid yet")]
    NotYetValid,
    /// `iat` is in the future, beyond the leeway.
    #[error("the token was issued in the future")]
    IssuedInFuture,
    /// There is no `sub` claim (or it is `null`).
    #[error("the token has no subject")]
    MissingSub,
    /// `sub` is not a string, or is empty, too long or has control characters.
    #[error("the token's subject is not acceptable")]
    InvalidSub,
    /// There is no `exp` claim.
    #[error("the token has no expiry")]
    MissingExp,
    /// `exp`, `nbf` or `iat` is not a non-negative NumericDate.
    #[error("a time claim of the token is not a valid date")]
    InvalidTimeClaim,
    /// The token carries `aud` but no audience is configured.
    #[error("the token names an audience but none is accepted")]
    UnexpectedAudience,
    /// An audience is configured but the token carries no `aud`.
    #[error("the token names no audience")]
    MissingAudience,
    /// The token's `aud` names none of the configured audiences.
    #[error("the token's audience is not accepted")]
    WrongAudience,
    /// An issuer is configured but the token carries no `iss`.
    #[error("the token names no issuer")]
    MissingIssuer,
    /// The token's `iss` is none of the configured issuers.
    #[error("the token's issuer is not accepted")]
    WrongIssuer,
    /// The token could not be checked at all: a server-side key or crypto
    /// provider problem (prevented by the checks in [`Verifier::new`]).
    #[error("the token could not be checked")]
    Internal,
}

impl AuthError {
    /// Every variant, e.g. to pre-register metric labels.
    pub const ALL: &'static [AuthError] = &[
        AuthError::Malformed,
        AuthError::AlgorithmNotAllowed,
        AuthError::BadSignature,
        AuthError::Expired,
        AuthError::NotYetValid,
        AuthError::IssuedInFuture,
        AuthError::MissingSub,
        AuthError::InvalidSub,
        AuthError::MissingExp,
        AuthError::InvalidTimeClaim,
        AuthError::UnexpectedAudience,
        AuthError::MissingAudience,
        AuthError::WrongAudience,
        AuthError::MissingIssuer,
        AuthError::WrongIssuer,
        AuthError::Internal,
    ];

    /// A short, stable reason for audit logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Malformed => "malformed",
            AuthError::AlgorithmNotAllowed => "algorithm_not_allowed",
            AuthError::BadSignature => "bad_signature",
            AuthError::Expired => "expired",
            AuthError::NotYetValid => "not_yet_valid",
            AuthError::IssuedInFuture => "issued_in_future",
            AuthError::MissingSub => "missing_sub",
            AuthError::InvalidSub => "invalid_sub",
            AuthError::MissingExp => "missing_exp",
            AuthError::InvalidTimeClaim => "invalid_time_claim",
            AuthError::UnexpectedAudience => "unexpected_audience",
            AuthError::MissingAudience => "missing_audience",
            AuthError::WrongAudience => "wrong_audience",
            AuthError::MissingIssuer => "missing_issuer",
            AuthError::WrongIssuer => "wrong_issuer",
            AuthError::Internal => "internal_error",
        }
    }

    /// The HTTP status of the refusal: 401 (RFC 6750 §3.1 `invalid_token`),
    /// or 500 for [`AuthError::Internal`].
    pub fn status(&self) -> u16 {
        match self {
            AuthError::Internal => 500,
            _ => 401,
        }
    }

    /// The `WWW-Authenticate` value to send with the refusal (RFC 6750 §3),
    /// if any. It deliberately names no reason: that goes to the audit log.
    pub fn www_authenticate(&self) -> Option<&'static str> {
        match self {
            AuthError::Internal => None,
            _ => Some("Bearer error=\"invalid_token\""),
        }
    }
}

/// Errors in configuration: bad PEM, wrong key kind for the algorithm, empty
/// or short secret, missing or broken crypto provider. None of them contains
/// key bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Both or neither of jsonwebtoken's backend features are enabled.
    #[error(
        "no jsonwebtoken crypto provider is active: exactly one of its features \
         `rust_crypto` and `aws_lc_rs` must be enabled"
    )]
    NoCryptoProvider,
    /// The provider is present but failed its self-test.
    #[error("the jsonwebtoken crypto provider failed its self-test: {0}")]
    ProviderBroken(&'static str),
    /// The algorithm is none of HS256, HS384, HS512, RS256, ES256 and EdDSA.
    #[error("algorithm {0:?} is not supported (use HS256, HS384, HS512, RS256, ES256 or EdDSA)")]
    UnsupportedAlgorithm(Algorithm),
    /// A secret was given for a public-key algorithm, or a PEM for HMAC.
    #[error("algorithm {algorithm:?} needs {expected}")]
    WrongKeyKind {
        /// The configured algorithm.
        algorithm: Algorithm,
        /// What it needs.
        expected: &'static str,
    },
    /// The HMAC secret is empty.
    #[error("the HMAC secret is empty")]
    EmptySecret,
    /// The HMAC secret is shorter than the hash output (RFC 7518 §3.2).
    #[error(
        "the HMAC secret has {actual} bytes but {algorithm:?} needs at least {min} \
         (RFC 7518 §3.2)"
    )]
    SecretTooShort {
        /// The algorithm.
        algorithm: Algorithm,
        /// Its minimum secret length in bytes.
        min: usize,
        /// The length given.
        actual: usize,
    },
    /// The PEM holds a private key where a public key is expected.
    #[error("the PEM holds a private key; configure the public key instead")]
    PrivateKey,
    /// The PEM cannot be read as a public key for the algorithm.
    #[error("the public key is not usable for {algorithm:?}: {detail}")]
    InvalidPublicKey {
        /// The configured algorithm.
        algorithm: Algorithm,
        /// What is wrong (never key bytes).
        detail: String,
    },
    /// The RSA modulus is too small (RFC 7518 §3.3).
    #[error("the RSA key has {bits} bits; at least {min} are required (RFC 7518 §3.3)",
        min = MIN_RSA_BITS)]
    RsaKeyTooSmall {
        /// The modulus size.
        bits: usize,
    },
    /// The audience list is empty or has an empty entry.
    #[error("the audience list is empty or has an empty entry; leave it unset instead")]
    EmptyAudience,
    /// The issuer list is empty or has an empty entry.
    #[error("the issuer list is empty or has an empty entry; leave it unset instead")]
    EmptyIssuer,
    /// The leeway exceeds [`MAX_LEEWAY_SECS`].
    #[error("a leeway of {0} s exceeds the maximum of {max} s", max = MAX_LEEWAY_SECS)]
    LeewayTooLarge(u64),
    /// [`mint`] was asked for a non-HMAC algorithm.
    #[error("minting needs an HMAC algorithm (HS256, HS384 or HS512), not {0:?}")]
    NotHmac(Algorithm),
    /// [`mint`] was given an unacceptable subject.
    #[error(
        "the subject must be a non-empty string of at most {max} bytes without control \
         characters",
        max = MAX_SUB_LEN
    )]
    InvalidSubject,
    /// Encoding the token failed.
    #[error("signing failed: {0}")]
    Signing(String),
}

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
fn provider() -> Result<&'static CryptoProvider, KeyError> {
    CryptoProvider::try_get_default().ok_or(KeyError::NoCryptoProvider)
}

/// Verifies tokens against one configuration.
///
/// Thread-safe (`Send + Sync`) and read-only after construction: build it
/// once and share it by the router and every shard behind an `Arc`.
pub struct Verifier {
    algorithm: Algorithm,
    key: DecodingKey,
    validation: Validation,
    audience_configured: bool,
    issuer_configured: bool,
    leeway_secs: u64,
}

// Compile-time proof of the promise above.
const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Verifier>();
};

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("algorithm", &self.algorithm)
            .field("key", &"<redacted>")
            .field("audience", &self.validation.aud)
            .field("issuer", &self.validation.iss)
            .field("leeway_secs", &self.leeway_secs)
            .finish()
    }
}

impl Verifier {
    /// Builds a verifier, checking the whole configuration now so that a bad
    /// key fails at start-up rather than on the first token.
    pub fn new(config: &AuthConfig) -> Result<Verifier, KeyError> {
        let provider = provider()?;

        if config.leeway_secs > MAX_LEEWAY_SECS {
            return Err(KeyError::LeewayTooLarge(config.leeway_secs));
        }

        let key = decoding_key(provider, config.algorithm, &config.key)?;

        // RFC 8725 §3.1: accept exactly one algorithm, the configured one.
        let mut validation = Validation::new(config.algorithm);
        validation.leeway = config.leeway_secs;
        validation.reject_tokens_expiring_in_less_than = 0;

        // RFC 7519 §4.1.4 exp and §4.1.5 nbf; jsonwebtoken skips nbf unless
        // asked. exp (and aud and iss when configured) are required, but
        // `verify` checks their presence itself after decoding, so that a
        // mistyped claim, which jsonwebtoken refuses, is told from a missing
        // one.
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.required_spec_claims.clear();

        // RFC 7519 §4.1.3: with no audience configured, jsonwebtoken refuses
        // any token that carries `aud`, as a principal that does not identify
        // itself with a value of a present `aud` must reject the JWT.
        // RFC 8725 §3.9: when audiences are in use, the token must name us.
        validation.validate_aud = true;
        if let Some(audience) = &config.audience {
            if audience.is_empty() || audience.iter().any(String::is_empty) {
                return Err(KeyError::EmptyAudience);
            }
            validation.set_audience(audience);
        }

        // RFC 7519 §4.1.1, RFC 8725 §3.8: a configured issuer is checked.
        if let Some(issuer) = &config.issuer {
            if issuer.is_empty() || issuer.iter().any(String::is_empty) {
                return Err(KeyError::EmptyIssuer);
            }
            validation.set_issuer(issuer);
        }

        Ok(Verifier {
            algorithm: config.algorithm,
            key,
            validation,
            audience_configured: config.audience.is_some(),
            issuer_configured: config.issuer.is_some(),
            leeway_secs: config.leeway_secs,
        })
    }

    /// The one algorithm this verifier accepts.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// Verifies `token` and returns its claims.
    ///
    /// The signature is checked before any claim is read, so an unsigned or
    /// forged token is refused as such, never as expired or the like.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        // RFC 7519 §7.2 steps 1-2, cheaply and before any allocation.
        check_shape(token)?;

        // RFC 7519 §7.2 and RFC 8725 §3.1: header, algorithm (must equal the
        // configured one), signature, then the registered claims.
        let data = jsonwebtoken::decode::<RawClaims>(token, &self.key, &self.validation)
            .map_err(|err| self.map_error(err.kind()))?;
        let raw = data.claims;
        let now = now_secs();

        // jsonwebtoken checked aud and iss when present; they must be.
        if self.audience_configured && raw.aud.is_none() {
            return Err(AuthError::MissingAudience);
        }
        if self.issuer_configured && raw.iss.is_none() {
            return Err(AuthError::MissingIssuer);
        }

        // RFC 7519 §4.1.4: the current time MUST be before exp (plus leeway).
        // jsonwebtoken also accepts exp == now - leeway; this is the exact rule.
        let exp = match raw.exp {
            None => return Err(AuthError::MissingExp),
            Some(value) => numeric_date(&value).ok_or(AuthError::InvalidTimeClaim)?,
        };
        if exp.saturating_add(self.leeway_secs) <= now {
            return Err(AuthError::Expired);
        }

        // RFC 7519 §4.1.6 iat: optional, but revocation compares it with a
        // cut-off time, so a date in the future would dodge revocation.
        let iat = match raw.iat {
            None => None,
            Some(value) => Some(numeric_date(&value).ok_or(AuthError::InvalidTimeClaim)?),
        };
        if iat.is_some_and(|iat| iat > now.saturating_add(self.leeway_secs)) {
            return Err(AuthError::IssuedInFuture);
        }

        // RFC 7519 §4.1.2 sub, RFC 8725 §3.8: a string, and one fit to name a
        // user in keys, logs and metrics.
        let sub = match raw.sub {
            None => return Err(AuthError::MissingSub),
            Some(Value::String(sub)) => sub,
            Some(_) => return Err(AuthError::InvalidSub),
        };
        if !subject_is_acceptable(&sub) {
            return Err(AuthError::InvalidSub);
        }

        Ok(Claims {
            sub: sub.into_boxed_str(),
            exp,
            iat,
        })
    }

    /// Maps a jsonwebtoken error to a refusal class.
    fn map_error(&self, kind: &ErrorKind) -> AuthError {
        match kind {
            ErrorKind::InvalidToken
            | ErrorKind::Base64(_)
            | ErrorKind::Json(_)
            | ErrorKind::Utf8(_)
            | ErrorKind::InvalidAlgorithmName => AuthError::Malformed,
            ErrorKind::InvalidAlgorithm => AuthError::AlgorithmNotAllowed,
            ErrorKind::InvalidSignature => AuthError::BadSignature,
            ErrorKind::ExpiredSignature => AuthError::Expired,
            ErrorKind::ImmatureSignature => AuthError::NotYetValid,
            ErrorKind::InvalidAudience => self.audience_refusal(),
            ErrorKind::InvalidIssuer => AuthError::WrongIssuer,
            ErrorKind::InvalidSubject => AuthError::InvalidSub,
            ErrorKind::MissingRequiredClaim(claim) => match claim.as_str() {
                "exp" => AuthError::MissingExp,
                "aud" => AuthError::MissingAudience,
                "iss" => AuthError::MissingIssuer,
                "sub" => AuthError::MissingSub,
                _ => AuthError::Malformed,
            },
            ErrorKind::InvalidClaimFormat(claim) => match claim.as_str() {
                "exp" | "nbf" | "iat" => AuthError::InvalidTimeClaim,
                "aud" => self.audience_refusal(),
                "iss" => AuthError::WrongIssuer,
                "sub" => AuthError::InvalidSub,
                _ => AuthError::Malformed,
            },
            // Key, provider and signing errors: the server's fault, not the
            // token's (Verifier::new checks the key, so these do not occur).
            _ => AuthError::Internal,
        }
    }

    fn audience_refusal(&self) -> AuthError {
        if self.audience_configured {
            AuthError::WrongAudience
        } else {
            AuthError::UnexpectedAudience
        }
    }
}

/// The claims read from the payload. Every field is a raw JSON value so that
/// a missing or mistyped claim gets its own refusal class rather than a
/// generic parse error; `null` counts as absent. Duplicate names of these
/// claims fail parsing (RFC 7519 §4 allows rejecting them).
///
/// jsonwebtoken parses `exp`, `nbf` and `sub` itself too, and its parser
/// gives up on an array or object there: such a token is refused as
/// [`AuthError::Malformed`] before this struct sees it.
#[derive(Deserialize)]
struct RawClaims {
    sub: Option<Value>,
    exp: Option<Value>,
    iat: Option<Value>,
    aud: Option<IgnoredAny>,
    iss: Option<IgnoredAny>,
}

/// Checks the compact serialisation's shape: at most [`MAX_TOKEN_LEN`] bytes
/// of exactly three base64url segments (RFC 7515 §7.1), header and payload
/// non-empty.
fn check_shape(token: &str) -> Result<(), AuthError> {
    if token.is_empty() || token.len() > MAX_TOKEN_LEN {
        return Err(AuthError::Malformed);
    }

    let mut segments = token.split('.');
    let (Some(header), Some(payload), Some(_signature), None) = (
        segments.next(),
        segments.next(),
        segments.next(),
        segments.next(),
    ) else {
        return Err(AuthError::Malformed);
    };
    if header.is_empty() || payload.is_empty() {
        return Err(AuthError::Malformed);
    }

    let base64url = |b: u8| b.is_ascii_alphanumeric() || b == b'-' || b == b'_';
    if !token.bytes().all(|b| b == b'.' || base64url(b)) {
        return Err(AuthError::Malformed);
    }
    Ok(())
}

/// Reads a NumericDate (RFC 7519 §2) as whole seconds, as jsonwebtoken does:
/// a non-negative integer, or a finite non-negative number rounded.
fn numeric_date(value: &Value) -> Option<u64> {
    if let Some(secs) = value.as_u64() {
        return Some(secs);
    }
    let secs = value.as_f64()?;
    if secs.is_finite() && secs >= 0.0 && secs < u64::MAX as f64 {
        // The range check above makes the conversion exact.
        Some(secs.round() as u64)
    } else {
        None
    }
}

/// A subject must be non-empty, at most [`MAX_SUB_LEN`] bytes, and free of
/// control characters (it names users in keys, logs and metrics).
fn subject_is_acceptable(sub: &str) -> bool {
    !sub.is_empty() && sub.len() <= MAX_SUB_LEN && !sub.chars().any(char::is_control)
}

/// Builds the decoding key for `algorithm` and proves the backend can use it.
fn decoding_key(
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

/// Serialises the panic-hook swap of [`check_crypto_provider`].
static PANIC_HOOK_LOCK: Mutex<()> = Mutex::new(());

/// Checks that exactly one jsonwebtoken crypto provider is active and works:
/// it signs a throwaway HS256 token, verifies it, and checks that a tampered
/// copy is refused. Call it once at start-up.
///
/// The self-test runs under `catch_unwind` with the panic hook silenced, so a
/// panic of the backend becomes [`KeyError::ProviderBroken`]. The hook is
/// process-wide: a panic on another thread during the few microseconds of the
/// test prints nothing. This relies on `panic = "unwind"`.
pub fn check_crypto_provider() -> Result<(), KeyError> {
    provider()?;

    let guard = PANIC_HOOK_LOCK
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    let previous = panic::take_hook();
    panic::set_hook(Box::new(|_| {}));
    let outcome = panic::catch_unwind(provider_self_test);
    panic::set_hook(previous);
    drop(guard);

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

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

/// Where the token of an upgrade request was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carrier {
    /// `Authorization: Bearer <jwt>` (RFC 6750 §2.1).
    AuthorizationHeader,
    /// The `token` query parameter (as RFC 6750 §2.3 `access_token`).
    QueryParameter,
    /// A `bearer.<jwt>` entry of `Sec-WebSocket-Protocol`.
    Subprotocol,
}

impl Carrier {
    /// A short, stable name for audit logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Carrier::AuthorizationHeader => "authorization_header",
            Carrier::QueryParameter => "query_parameter",
            Carrier::Subprotocol => "subprotocol",
        }
    }
}

/// A token found in a request, not yet verified.
#[derive(PartialEq, Eq)]
pub struct Presented {
    /// The token as presented.
    pub token: String,
    /// Where it was found.
    pub carrier: Carrier,
}

impl fmt::Debug for Presented {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A bearer token is a credential: Debug shows its size, never its text.
        f.debug_struct("Presented")
            .field("token", &format_args!("<{} bytes>", self.token.len()))
            .field("carrier", &self.carrier)
            .finish()
    }
}

/// Why no single token could be taken from a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum CarrierError {
    /// No carrier holds a token: 401 with `WWW-Authenticate: Bearer` and no
    /// error attribute (RFC 6750 §3.1).
    #[error("the request presents no bearer token")]
    NoToken,
    /// More than one token is present: 400.
    #[error("the request presents more than one token")]
    Ambiguous,
    /// A `bearer.<jwt>` subprotocol was offered without `shardgate.v1`: 400.
    #[error("a bearer subprotocol was offered without shardgate.v1")]
    BearerWithoutProtocol,
    /// Bad percent-encoding, or a header that is not UTF-8: 400.
    #[error("a token carrier is badly encoded")]
    BadEncoding,
    /// A carrier is present but its syntax is wrong, e.g. `Bearer` with no
    /// token or a token with characters outside b64token (RFC 6750 §2.1): 400.
    #[error("a token carrier is malformed")]
    MalformedCarrier,
}

impl CarrierError {
    /// Every variant, e.g. to pre-register metric labels.
    pub const ALL: &'static [CarrierError] = &[
        CarrierError::NoToken,
        CarrierError::Ambiguous,
        CarrierError::BearerWithoutProtocol,
        CarrierError::BadEncoding,
        CarrierError::MalformedCarrier,
    ];

    /// A short, stable reason for audit logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            CarrierError::NoToken => "no_token",
            CarrierError::Ambiguous => "ambiguous_carriers",
            CarrierError::BearerWithoutProtocol => "bearer_without_protocol",
            CarrierError::BadEncoding => "bad_encoding",
            CarrierError::MalformedCarrier => "malformed_carrier",
        }
    }

    /// The HTTP status: 401 for [`CarrierError::NoToken`], else 400
    /// (RFC 6750 §3.1 `invalid_request`).
    pub fn status(&self) -> u16 {
        match self {
            CarrierError::NoToken => 401,
            _ => 400,
        }
    }

    /// The `WWW-Authenticate` value to send (RFC 6750 §3): bare `Bearer` when
    /// no token was presented (§3.1: no error attribute), else
    /// `invalid_request`.
    pub fn www_authenticate(&self) -> &'static str {
        match self {
            CarrierError::NoToken => "Bearer",
            _ => "Bearer error=\"invalid_request\"",
        }
    }
}

/// Finds the token among the request's carriers.
///
/// `authorization`: the values of every `Authorization` header; `protocols`:
/// the values of every `Sec-WebSocket-Protocol` header (raw bytes); `query`:
/// the raw query string after `?`, if any.
///
/// Each carrier is read first (its own errors come first, in the order
/// header, query, subprotocol); then exactly one token must have been found.
pub fn extract_token(
    authorization: &[&[u8]],
    protocols: &[&[u8]],
    query: Option<&str>,
) -> Result<Presented, CarrierError> {
    let header = token_from_authorization(authorization)?;
    let query = token_from_query(query)?;
    let protocol = token_from_protocols(protocols)?;

    // RFC 6750 §2: clients MUST NOT use more than one method per request.
    let mut found = [
        header.map(|token| (token, Carrier::AuthorizationHeader)),
        query.map(|token| (token, Carrier::QueryParameter)),
        protocol.map(|token| (token, Carrier::Subprotocol)),
    ]
    .into_iter()
    .flatten();
    match (found.next(), found.next()) {
        (None, _) => Err(CarrierError::NoToken),
        (Some((token, carrier)), None) => Ok(Presented { token, carrier }),
        (Some(_), Some(_)) => Err(CarrierError::Ambiguous),
    }
}

/// The subprotocol the server must select in its 101: `shardgate.v1` when the
/// client offered it (with or without a bearer entry), else none.
pub fn selected_subprotocol(protocols: &[&[u8]]) -> Option<&'static str> {
    protocols
        .iter()
        .filter_map(|value| std::str::from_utf8(value).ok())
        .flat_map(list_entries)
        .any(|entry| entry == SUBPROTOCOL)
        .then_some(SUBPROTOCOL)
}

/// The non-empty entries of a comma-separated header list, without optional
/// whitespace (RFC 9110 §5.6.1).
fn list_entries(value: &str) -> impl Iterator<Item = &str> {
    value
        .split(',')
        .map(|entry| entry.trim_matches([' ', '\t']))
        .filter(|e| !e.is_empty())
}

/// The Bearer token of the `Authorization` header, if any.
fn token_from_authorization(values: &[&[u8]]) -> Result<Option<String>, CarrierError> {
    // RFC 9110 §11.6.2: one set of credentials; Authorization is no list, so
    // several header lines present several credentials.
    let value = match values {
        [] => return Ok(None),
        [value] => value.trim_ascii(),
        _ => return Err(CarrierError::Ambiguous),
    };

    // RFC 6750 §2.1: credentials = "Bearer" 1*SP b64token, the scheme being
    // case-insensitive (RFC 9110 §11.1). Another scheme presents no bearer
    // token: RFC 6750 §3.1 answers 401 without an error attribute.
    let split = value
        .iter()
        .position(|b| *b == b' ' || *b == b'\t')
        .unwrap_or(value.len());
    let (scheme, rest) = value.split_at(split);
    if !scheme.eq_ignore_ascii_case(b"Bearer") {
        return Ok(None);
    }

    let token = std::str::from_utf8(rest).map_err(|_| CarrierError::BadEncoding)?;
    b64token(token.trim_start_matches([' ', '\t'])).map(Some)
}

/// The `token` query parameter, percent-decoded, if any.
fn token_from_query(query: Option<&str>) -> Result<Option<String>, CarrierError> {
    let Some(query) = query else {
        return Ok(None);
    };

    // application/x-www-form-urlencoded, as browsers write it.
    let mut found = None;
    for pair in query.split('&').filter(|pair| !pair.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        // A name that does not decode is not "token": not our parameter.
        if form_decode(name).as_deref() != Some(TOKEN_QUERY_PARAM) {
            continue;
        }
        if found.is_some() {
            return Err(CarrierError::Ambiguous);
        }
        let value = form_decode(value).ok_or(CarrierError::BadEncoding)?;
        found = Some(b64token(&value)?);
    }
    Ok(found)
}

/// The `bearer.<jwt>` subprotocol entry, if any; it needs `shardgate.v1`.
fn token_from_protocols(values: &[&[u8]]) -> Result<Option<String>, CarrierError> {
    let mut offered = false;
    let mut found = None;

    // RFC 6455 §11.3.4: the header may be repeated; each value is a list.
    for value in values {
        let value = std::str::from_utf8(value).map_err(|_| CarrierError::BadEncoding)?;
        for entry in list_entries(value) {
            if entry == SUBPROTOCOL {
                offered = true;
            } else if let Some(token) = entry.strip_prefix(BEARER_PROTOCOL_PREFIX) {
                if found.is_some() {
                    return Err(CarrierError::Ambiguous);
                }
                found = Some(b64token(token)?);
            }
        }
    }

    if found.is_some() && !offered {
        return Err(CarrierError::BearerWithoutProtocol);
    }
    Ok(found)
}

/// Checks RFC 6750 §2.1 b64token syntax:
/// `1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="`.
fn b64token(token: &str) -> Result<String, CarrierError> {
    let body = token.trim_end_matches('=');
    let allowed = |b: u8| b.is_ascii_alphanumeric() || b"-._~+/".contains(&b);
    if body.is_empty() || !body.bytes().all(allowed) {
        return Err(CarrierError::MalformedCarrier);
    }
    Ok(token.to_owned())
}

/// Decodes application/x-www-form-urlencoded text: `+` is a space and `%XX`
/// a byte; `None` for a bad escape or bytes that are not UTF-8.
fn form_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let high = hex_value(*bytes.get(i + 1)?)?;
                let low = hex_value(*bytes.get(i + 2)?)?;
                out.push(high << 4 | low);
                i += 2;
            }
            other => out.push(other),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

fn hex_value(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
#[path = "auth_tests.rs"]
mod tests;
