//! Unit tests of token carriers: `Authorization`, the `token` query
//! parameter and the `bearer.` subprotocol, and their combinations.

use super::*;
use crate::auth::tests::{SECRET, hs_verifier};
use crate::auth::{Algorithm, mint};

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
