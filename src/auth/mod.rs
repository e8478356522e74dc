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
//!
//! # Layout
//!
//! This file holds the configuration types, the errors and the [`Verifier`]
//! with its claim checks; `keys` parses key material, checks the crypto
//! provider and mints tokens; `carrier` finds the token in a request. Every
//! public item is re-exported here, so callers name it `auth::X`.

mod carrier;
mod keys;

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{DecodingKey, Validation};
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::Value;

pub use jsonwebtoken::Algorithm;

pub use carrier::{
    BEARER_PROTOCOL_PREFIX, Carrier, CarrierError, Presented, SUBPROTOCOL, TOKEN_QUERY_PARAM,
    extract_token, selected_subprotocol,
};
pub use keys::{check_crypto_provider, mint};

use keys::{decoding_key, provider};

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

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

#[cfg(test)]
mod tests;
