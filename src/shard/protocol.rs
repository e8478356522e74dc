//! Wire protocol v1: the JSON envelopes of `/ws`.
//!
//! Parsing is strict (unknown `type`, unknown or misplaced fields and bad
//! JSON are `bad_message`), except for one rule that comes first: a frame
//! carrying a `user_id` other than the connection's own user is `forbidden`,
//! whatever else is wrong with it. Writers build the server's frames straight
//! into a byte buffer; `data` is copied through as raw JSON, never re-encoded.
//! Error details are fixed strings and never echo input.

use std::fmt;
use std::io::Write;

use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;

/// Longest `id` accepted, in bytes of JSON.
pub const MAX_ID_BYTES: usize = 256;

/// A valid client frame.
#[derive(Debug)]
pub enum ClientFrame<'a> {
    Send {
        id: &'a RawValue,
        data: &'a RawValue,
    },
    Ping {
        id: &'a RawValue,
    },
    Refresh {
        id: &'a RawValue,
        token: String,
    },
}

/// Why a client frame is refused. `id` is the frame's id when it had a
/// usable one.
#[derive(Debug)]
pub enum Refusal<'a> {
    BadMessage {
        id: Option<&'a RawValue>,
        detail: &'static str,
    },
    Forbidden {
        id: Option<&'a RawValue>,
    },
}

/// The fields of an envelope, each kept as raw JSON until validated.
#[derive(Default)]
struct Envelope<'a> {
    kind: Option<&'a RawValue>,
    id: Option<&'a RawValue>,
    data: Option<&'a RawValue>,
    token: Option<&'a RawValue>,
    /// Every `user_id` given: a frame repeating the field must not hide a
    /// foreign id behind its own.
    user_ids: Vec<&'a RawValue>,
    unknown_field: bool,
    duplicate_field: bool,
}

enum Key {
    Type,
    Id,
    Data,
    Token,
    UserId,
    Other,
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E: de::Error>(self, name: &str) -> Result<Key, E> {
                Ok(match name {
                    "type" => Key::Type,
                    "id" => Key::Id,
                    "data" => Key::Data,
                    "token" => Key::Token,
                    "user_id" => Key::UserId,
                    _ => Key::Other,
                })
            }
        }
        deserializer.deserialize_identifier(KeyVisitor)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Envelope<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct EnvelopeVisitor;
        impl<'de> Visitor<'de> for EnvelopeVisitor {
            type Value = Envelope<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Envelope<'de>, M::Error> {
                let mut envelope = Envelope::default();
                while let Some(key) = map.next_key::<Key>()? {
                    let slot = match key {
                        Key::Type => &mut envelope.kind,
                        Key::Id => &mut envelope.id,
                        Key::Data => &mut envelope.data,
                        Key::Token => &mut envelope.token,
                        Key::UserId => {
                            envelope.user_ids.push(map.next_value()?);
                            continue;
                        }
                        Key::Other => {
                            envelope.unknown_field = true;
                            map.next_value::<IgnoredAny>()?;
                            continue;
                        }
                    };
                    let value: &'de RawValue = map.next_value()?;
                    if slot.replace(value).is_some() {
                        envelope.duplicate_field = true;
                    }
                }
                Ok(envelope)
            }
        }
        deserializer.deserialize_map(EnvelopeVisitor)
    }
}

/// Whether `text` nests arrays and objects deeper than `max`. One linear
/// pass that skips strings, so a hostile document costs no more than its
/// length (the parser would otherwise recurse into it).
///
/// The pass looks at eight bytes at a time and stops only at bytes that can
/// change its state: a quote or backslash inside a string, a quote or
/// bracket outside one. Large string payloads, the common case, are crossed
/// at word speed instead of one branch per byte.
pub fn nesting_exceeds(text: &str, max: usize) -> bool {
    let bytes = text.as_bytes();
    let mut depth = 0usize;
    let mut in_string = false;
    let mut at = 0;
    while at < bytes.len() {
        at += if in_string {
            skip_plain(&bytes[at..], string_specials)
        } else {
            skip_plain(&bytes[at..], structure_specials)
        };
        let Some(&byte) = bytes.get(at) else {
            break;
        };
        if in_string {
            match byte {
                // The escaped byte cannot end the string or open a bracket.
                b'\\' => at += 1,
                b'"' => in_string = false,
                _ => {}
            }
        } else {
            match byte {
                b'"' => in_string = true,
                b'[' | b'{' => {
                    depth += 1;
                    if depth > max {
                        return true;
                    }
                }
                b']' | b'}' => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
        at += 1;
    }
    false
}

const LOW_BITS: u64 = u64::from_ne_bytes([0x01; 8]);
const HIGH_BITS: u64 = u64::from_ne_bytes([0x80; 8]);

/// Sets the high bit of the lowest byte of `word` that is zero. Bytes above
/// it may be flagged falsely (a borrow runs upward), bytes below never are.
fn zero_bytes(word: u64) -> u64 {
    word.wrapping_sub(LOW_BITS) & !word & HIGH_BITS
}

fn repeat(byte: u8) -> u64 {
    LOW_BITS * u64::from(byte)
}

/// Flags the bytes of `word` (little-endian) that can matter inside a string.
fn string_specials(word: u64) -> u64 {
    zero_bytes(word ^ repeat(b'"')) | zero_bytes(word ^ repeat(b'\\'))
}

/// Flags the bytes that can matter outside strings: a quote or a bracket.
/// Setting bit 5 folds `[` onto `{` and `]` onto `}`; no other byte folds
/// onto either.
fn structure_specials(word: u64) -> u64 {
    let folded = word | repeat(0x20);
    zero_bytes(word ^ repeat(b'"'))
        | zero_bytes(folded ^ repeat(b'{'))
        | zero_bytes(folded ^ repeat(b'}'))
}

/// How many leading bytes of `bytes` are certainly not flagged by
/// `specials`: the offset of the first flagged byte, or of the last partial
/// word, which the caller then looks at one byte at a time.
fn skip_plain(bytes: &[u8], specials: fn(u64) -> u64) -> usize {
    let mut skipped = 0;
    for chunk in bytes.chunks_exact(8) {
        let mut word = [0; 8];
        word.copy_from_slice(chunk);
        let flags = specials(u64::from_le_bytes(word));
        if flags != 0 {
            return skipped + (flags.trailing_zeros() / 8) as usize;
        }
        skipped += 8;
    }
    skipped
}

/// Parses one text message of a connection owned by `user`, refusing
/// documents nested deeper than `max_depth`.
pub fn parse<'a>(
    text: &'a str,
    user: &str,
    max_depth: usize,
) -> Result<ClientFrame<'a>, Refusal<'a>> {
    if nesting_exceeds(text, max_depth) {
        return Err(Refusal::BadMessage {
            id: None,
            detail: "JSON nested too deeply",
        });
    }
    let Ok(envelope) = serde_json::from_str::<Envelope<'a>>(text) else {
        return Err(Refusal::BadMessage {
            id: None,
            detail: "not a JSON object",
        });
    };
    let id = envelope.id.filter(|raw| usable_id(raw));

    // The user_id rule comes before every other check.
    for claimed in &envelope.user_ids {
        let same_user = serde_json::from_str::<String>(claimed.get())
            .map(|claimed| claimed.as_bytes() == user.as_bytes())
            .unwrap_or(false);
        if !same_user {
            return Err(Refusal::Forbidden { id });
        }
    }
    if envelope.user_ids.len() > 1 {
        return bad_request(id, "duplicate field");
    }

    let bad = |detail| bad_request(id, detail);
    if envelope.duplicate_field {
        return bad("duplicate field");
    }
    if envelope.unknown_field {
        return bad("unknown field");
    }
    let Some(kind) = envelope.kind else {
        return bad("missing type");
    };
    let Some(id) = id else {
        return bad("missing or invalid id");
    };

    match json_str(kind).as_deref() {
        Some("send") => match (envelope.data, envelope.token) {
            (Some(data), None) => Ok(ClientFrame::Send { id, data }),
            (None, _) => bad("send needs data"),
            (Some(_), Some(_)) => bad("unknown field"),
        },
        Some("ping") => match (envelope.data, envelope.token) {
            (None, None) => Ok(ClientFrame::Ping { id }),
            _ => bad("unknown field"),
        },
        Some("refresh") => {
            if envelope.data.is_some() {
                return bad("unknown field");
            }
            let token = envelope
                .token
                .and_then(|raw| serde_json::from_str::<String>(raw.get()).ok());
            match token {
                Some(token) => Ok(ClientFrame::Refresh { id, token }),
                None => bad("refresh needs a token string"),
            }
        }
        _ => bad("unknown type"),
    }
}

fn bad_request<'a>(
    id: Option<&'a RawValue>,
    detail: &'static str,
) -> Result<ClientFrame<'a>, Refusal<'a>> {
    Err(Refusal::BadMessage { id, detail })
}

/// The string a raw JSON value holds, if it is a string; borrowed when it
/// has no escapes, which is the common case.
fn json_str(raw: &RawValue) -> Option<std::borrow::Cow<'_, str>> {
    let text = raw.get();
    let inner = text.strip_prefix('"')?.strip_suffix('"')?;
    if !inner.contains('\\') {
        return Some(std::borrow::Cow::Borrowed(inner));
    }
    serde_json::from_str::<String>(text)
        .ok()
        .map(std::borrow::Cow::Owned)
}

/// The usable `id` of a frame, if it has one, without validating the rest.
pub fn peek_id(text: &str) -> Option<&RawValue> {
    serde_json::from_str::<Envelope<'_>>(text)
        .ok()?
        .id
        .filter(|raw| usable_id(raw))
}

/// An id must be a JSON string or number of bounded size.
fn usable_id(raw: &RawValue) -> bool {
    let text = raw.get();
    text.len() <= MAX_ID_BYTES && matches!(text.as_bytes().first(), Some(b'"' | b'-' | b'0'..=b'9'))
}

fn write_json_str(out: &mut Vec<u8>, value: &str) {
    // Serialising a str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, value);
}

/// `{"type":"welcome","user":U,"conn":C,"epoch":E,"seq":S}`
pub fn write_welcome(out: &mut Vec<u8>, user: &str, conn: u64, epoch: u64, seq: u64) {
    out.extend_from_slice(br#"{"type":"welcome","user":"#);
    write_json_str(out, user);
    let _ = write!(out, r#","conn":{conn},"epoch":{epoch},"seq":{seq}}}"#);
}

/// `{"type":"message","epoch":E,"seq":S,"source":X,"data":D}`
pub fn write_message(out: &mut Vec<u8>, epoch: u64, seq: u64, source: &str, data: &RawValue) {
    let _ = write!(
        out,
        r#"{{"type":"message","epoch":{epoch},"seq":{seq},"source":"{source}","data":"#
    );
    out.extend_from_slice(data.get().as_bytes());
    out.push(b'}');
}

/// `{"type":"ack","id":I,"epoch":E,"seq":S}`
pub fn write_ack(out: &mut Vec<u8>, id: &RawValue, epoch: u64, seq: u64) {
    out.extend_from_slice(br#"{"type":"ack","id":"#);
    out.extend_from_slice(id.get().as_bytes());
    let _ = write!(out, r#","epoch":{epoch},"seq":{seq}}}"#);
}

/// `{"type":"pong","id":I}`
pub fn write_pong(out: &mut Vec<u8>, id: &RawValue) {
    out.extend_from_slice(br#"{"type":"pong","id":"#);
    out.extend_from_slice(id.get().as_bytes());
    out.push(b'}');
}

/// `{"type":"refreshed","id":I,"exp":X}`
pub fn write_refreshed(out: &mut Vec<u8>, id: &RawValue, exp: u64) {
    out.extend_from_slice(br#"{"type":"refreshed","id":"#);
    out.extend_from_slice(id.get().as_bytes());
    let _ = write!(out, r#","exp":{exp}}}"#);
}

/// `{"type":"error","code":K,"id":I,"detail":T}`; `id` is null when absent.
pub fn write_error(out: &mut Vec<u8>, code: &str, id: Option<&RawValue>, detail: &str) {
    out.extend_from_slice(br#"{"type":"error","code":"#);
    write_json_str(out, code);
    out.extend_from_slice(br#","id":"#);
    match id {
        Some(id) => out.extend_from_slice(id.get().as_bytes()),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(br#","detail":"#);
    write_json_str(out, detail);
    out.push(b'}');
}

/// `{"type":"error","code":"rate_limited","id":I,"detail":T,"retry_after_ms":N}`
pub fn write_rate_limited(out: &mut Vec<u8>, id: Option<&RawValue>, retry_after_ms: u64) {
    write_error(out, "rate_limited", id, "message rate limit exceeded");
    out.pop();
    let _ = write!(out, r#","retry_after_ms":{retry_after_ms}}}"#);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn parse<'a>(text: &'a str, user: &str) -> Result<ClientFrame<'a>, Refusal<'a>> {
        super::parse(text, user, 32)
    }

    fn bad_detail(text: &str) -> &'static str {
        match parse(text, "alice") {
            Err(Refusal::BadMessage { detail, .. }) => detail,
            other => panic!("expected bad_message for {text}, got {other:?}"),
        }
    }

    #[test]
    fn valid_frames() {
        match parse(r#"{"type":"send","id":1,"data":{"x":[1,2]}}"#, "alice") {
            Ok(ClientFrame::Send { id, data }) => {
                assert_eq!(id.get(), "1");
                assert_eq!(data.get(), r#"{"x":[1,2]}"#);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse(r#"{"type":"ping","id":"a"}"#, "alice"),
            Ok(ClientFrame::Ping { .. })
        ));
        match parse(r#"{"type":"refresh","id":2,"token":"t.t.t"}"#, "alice") {
            Ok(ClientFrame::Refresh { token, .. }) => assert_eq!(token, "t.t.t"),
            other => panic!("{other:?}"),
        }
        // A user_id equal to the connection's user is ignored, escapes included.
        assert!(matches!(
            parse(r#"{"type":"ping","id":1,"user_id":"\u0061lice"}"#, "alice"),
            Ok(ClientFrame::Ping { .. })
        ));
    }

    #[test]
    fn strictness() {
        assert_eq!(bad_detail("not json"), "not a JSON object");
        assert_eq!(bad_detail("[1]"), "not a JSON object");
        assert_eq!(bad_detail(r#"{"type":"send","id":1}"#), "send needs data");
        assert_eq!(bad_detail(r#"{"type":"nope","id":1}"#), "unknown type");
        assert_eq!(
            bad_detail(r#"{"type":"ping","id":1,"x":0}"#),
            "unknown field"
        );
        assert_eq!(
            bad_detail(r#"{"type":"ping","id":1,"data":0}"#),
            "unknown field"
        );
        assert_eq!(bad_detail(r#"{"type":"ping"}"#), "missing or invalid id");
        assert_eq!(
            bad_detail(r#"{"type":"ping","id":{}}"#),
            "missing or invalid id"
        );
        assert_eq!(
            bad_detail(r#"{"type":"ping","id":1,"id":2}"#),
            "duplicate field"
        );
        assert_eq!(bad_detail(r#"{"type":5,"id":1}"#), "unknown type");
        assert!(matches!(
            parse(r#"{"type":"p\u0069ng","id":1}"#, "alice"),
            Ok(ClientFrame::Ping { .. })
        ));
        assert_eq!(
            bad_detail(r#"{"type":"refresh","id":1,"token":5}"#),
            "refresh needs a token string"
        );
    }

    #[test]
    fn nesting_is_bounded_in_one_pass() {
        assert!(!nesting_exceeds(r#"{"a":[[1]]}"#, 3));
        assert!(nesting_exceeds(r#"{"a":[[[1]]]}"#, 3));
        // Brackets inside strings do not count, escaped quotes included.
        assert!(!nesting_exceeds(r#"{"a":"[[[[\"[[[["}"#, 1));
        let deep = "[".repeat(100_000);
        assert_eq!(bad_detail(&deep), "JSON nested too deeply");
    }

    /// The deepest nesting of `text`, one byte at a time: the plain reading
    /// of the rules that the word-at-a-time pass must agree with.
    fn deepest_bytewise(text: &str) -> usize {
        let (mut depth, mut deepest) = (0usize, 0);
        let (mut in_string, mut escaped) = (false, false);
        for &byte in text.as_bytes() {
            if in_string {
                match byte {
                    _ if escaped => escaped = false,
                    b'\\' => escaped = true,
                    b'"' => in_string = false,
                    _ => {}
                }
                continue;
            }
            match byte {
                b'"' => in_string = true,
                b'[' | b'{' => {
                    depth += 1;
                    deepest = deepest.max(depth);
                }
                b']' | b'}' => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
        deepest
    }

    #[test]
    fn word_pass_agrees_with_bytewise_reading() {
        // Mostly the bytes that matter, at every offset within a word, with
        // the bytes that fold or borrow like them (`;`, `=`, `!`, `#`, `[`
        // + 0x80) mixed in.
        const ALPHABET: &[u8] = b"\"\\[]{}[]{};=!#ax \xdb\xfb";
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..20_000 {
            let len = (next() % 48) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| ALPHABET[(next() % ALPHABET.len() as u64) as usize])
                .collect();
            // The high bytes are not UTF-8 on their own; map them to a
            // two-byte character whose bytes are also above 0x7f.
            let text = String::from_utf8_lossy(&bytes).into_owned();
            let deepest = deepest_bytewise(&text);
            for max in deepest.saturating_sub(1)..=deepest + 1 {
                assert_eq!(
                    nesting_exceeds(&text, max),
                    deepest > max,
                    "{text:?} with max {max}"
                );
            }
        }
    }

    #[test]
    fn long_strings_and_escapes_at_word_edges() {
        for pad in 0..17 {
            let filler = "x".repeat(pad);
            let text = format!(r#"{{"a":"{filler}\"[[[{filler}","b":[[{filler}]]}}"#);
            assert!(!nesting_exceeds(&text, 3), "{text}");
            assert!(nesting_exceeds(&text, 2), "{text}");
            let text = format!(r#"["{filler}\\",[[{filler}]]]"#);
            assert!(nesting_exceeds(&text, 2), "{text}");
            assert!(!nesting_exceeds(&text, 3), "{text}");
        }
    }

    #[test]
    fn rate_limited_frame_carries_retry_after() {
        let mut out = Vec::new();
        write_rate_limited(&mut out, None, 250);
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["code"], "rate_limited");
        assert_eq!(v["retry_after_ms"], 250);
        assert!(v["id"].is_null());
    }

    #[test]
    fn foreign_user_id_is_forbidden_before_anything_else() {
        for text in [
            r#"{"type":"send","id":1,"data":1,"user_id":"bob"}"#,
            r#"{"type":"nope","id":1,"user_id":"bob","extra":1}"#,
            r#"{"user_id":"Alice"}"#,
            r#"{"user_id":"alice ","type":"ping","id":1}"#,
            r#"{"user_id":7,"type":"ping","id":1}"#,
            r#"{"type":"ping","id":1,"user_id":"bob","user_id":"alice"}"#,
            r#"{"type":"ping","id":1,"user_id":"alice","user_id":"bob"}"#,
        ] {
            assert!(
                matches!(parse(text, "alice"), Err(Refusal::Forbidden { .. })),
                "{text}"
            );
        }
    }

    #[test]
    fn writers_produce_the_documented_json() {
        let id = RawValue::from_string("\"x\"".into()).unwrap();
        let data = RawValue::from_string(r#"{"k":"v"}"#.into()).unwrap();
        let mut out = Vec::new();

        write_welcome(&mut out, "al\"ice", 7, 9, 0);
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["user"], "al\"ice");
        assert_eq!(v["conn"], 7);

        out.clear();
        write_message(&mut out, 9, 3, "client", &data);
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["data"]["k"], "v");
        assert_eq!(v["source"], "client");

        out.clear();
        write_error(&mut out, "bad_message", None, "unknown type");
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert!(v["id"].is_null());

        for write in [
            |o: &mut Vec<u8>, id: &RawValue| write_ack(o, id, 1, 2),
            |o: &mut Vec<u8>, id: &RawValue| write_pong(o, id),
            |o: &mut Vec<u8>, id: &RawValue| write_refreshed(o, id, 5),
        ] {
            out.clear();
            write(&mut out, &id);
            let v: Value = serde_json::from_slice(&out).unwrap();
            assert_eq!(v["id"], "x");
        }
    }
}
