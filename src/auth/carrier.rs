//! Token carriers: finding the one bearer token of an upgrade request in the
//! `Authorization` header, the `token` query parameter or a `bearer.<jwt>`
//! subprotocol entry ([`extract_token`]), and the subprotocol to select.

use std::fmt;

/// The application subprotocol that the server selects in its 101 response.
pub const SUBPROTOCOL: &str = "shardgate.v1";

/// The prefix of a `Sec-WebSocket-Protocol` entry that carries a token.
pub const BEARER_PROTOCOL_PREFIX: &str = "bearer.";

/// The query parameter that carries a token (for browsers).
pub const TOKEN_QUERY_PARAM: &str = "token";

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
#[path = "carrier_tests.rs"]
mod tests;
