//! Tests for the RFC 6455 message layer in `codec.rs`.

use super::*;

/// Any key will do; this one makes every masked byte differ from the plain one.
const KEY: [u8; 4] = [0x37, 0xFA, 0x21, 0x3D];

const LIMITS: MessageLimits = MessageLimits {
    max_message_size: 1 << 20,
    max_fragments: 16,
};

const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const CONTINUATION: u8 = 0x0;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;
const PONG: u8 = 0xA;
const FIN: u8 = 0x80;

/// How a test frame encodes its payload length.
#[derive(Debug, Clone, Copy)]
enum Len {
    Minimal,
    Ext16,
    Ext64,
}

/// A masked client frame with the given first byte (FIN, RSV bits, opcode).
fn raw_frame(first: u8, len: Len, payload: &[u8]) -> Vec<u8> {
    let n = payload.len();
    let mut out = vec![first];
    match len {
        Len::Minimal if n < 126 => out.push(0x80 | n as u8),
        Len::Minimal | Len::Ext16 if n <= 0xFFFF => {
            out.push(0x80 | 126);
            out.extend((n as u16).to_be_bytes());
        }
        _ => {
            out.push(0x80 | 127);
            out.extend((n as u64).to_be_bytes());
        }
    }
    out.extend(KEY);
    out.extend(payload.iter().zip(KEY.iter().cycle()).map(|(b, k)| b ^ k));
    out
}

/// A masked client frame with the minimal length encoding.
fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    raw_frame(
        if fin { FIN | opcode } else { opcode },
        Len::Minimal,
        payload,
    )
}

/// Only the header of a masked frame claiming `len` bytes (64-bit form).
fn header_only(first: u8, len: u64) -> Vec<u8> {
    let mut out = vec![first, 0x80 | 127];
    out.extend(len.to_be_bytes());
    out.extend(KEY);
    out
}

fn close_body(code: u16, reason: &[u8]) -> Vec<u8> {
    [&code.to_be_bytes()[..], reason].concat()
}

/// An owned copy of what the decoder handed out.
#[derive(Debug, Clone, PartialEq)]
enum Got {
    Text(String),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(Option<u16>, String),
}

impl From<Inbound<'_>> for Got {
    fn from(inbound: Inbound<'_>) -> Self {
        match inbound {
            Inbound::Text(text) => Got::Text(text.to_owned()),
            Inbound::Binary(data) => Got::Binary(data.to_vec()),
            Inbound::Ping(data) => Got::Ping(data.to_vec()),
            Inbound::Pong(data) => Got::Pong(data.to_vec()),
            Inbound::Close(code, reason) => Got::Close(code, reason.to_owned()),
        }
    }
}

fn text(s: &str) -> Got {
    Got::Text(s.to_owned())
}

type Outcome = (Vec<Got>, Result<(), ProtocolError>);

/// Feeds `pieces` to one decoder in order, collecting messages up to the
/// first error.
fn decode_pieces(pieces: Vec<Vec<u8>>, limits: &MessageLimits) -> Outcome {
    let mut decoder = MessageDecoder::new();
    let mut got = Vec::new();
    for mut piece in pieces {
        let result = decoder.feed(&mut piece, limits, |inbound| {
            got.push(Got::from(inbound));
            ControlFlow::Continue(())
        });
        if let Err(error) = result {
            return (got, Err(error));
        }
    }
    (got, Ok(()))
}

fn decode(bytes: &[u8]) -> Outcome {
    decode_pieces(vec![bytes.to_vec()], &LIMITS)
}

/// Cuts `bytes` into pieces of the given sizes, cycling through them.
fn cut(bytes: &[u8], sizes: &[usize]) -> Vec<Vec<u8>> {
    let mut pieces = Vec::new();
    let mut rest = bytes;
    for &size in sizes.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let (piece, tail) = rest.split_at(size.clamp(1, rest.len()));
        pieces.push(piece.to_vec());
        rest = tail;
    }
    pieces
}

/// Deterministic "random" piece sizes from 1 to `max` (xorshift).
fn random_sizes(mut seed: u32, count: usize, max: usize) -> Vec<usize> {
    (0..count)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            1 + seed as usize % max
        })
        .collect()
}

/// A mixed stream touching every opcode, with a ping inside a fragmented text
/// message and a '€' split across fragments, and what it decodes to.
fn conversation() -> (Vec<u8>, Vec<Got>) {
    let bytes = [
        frame(true, TEXT, b"hello"),
        frame(false, TEXT, b"frag"),
        frame(true, PING, b"are you there"),
        frame(false, CONTINUATION, &[b'-', 0xE2, 0x82]),
        frame(false, CONTINUATION, b""),
        frame(true, CONTINUATION, &[0xAC, b'!']),
        frame(true, BINARY, &[7; 300]),
        frame(true, BINARY, b""),
        frame(true, PONG, b"pong"),
        frame(true, CLOSE, &close_body(1000, b"bye")),
    ]
    .concat();
    let expected = vec![
        text("hello"),
        Got::Ping(b"are you there".to_vec()),
        text("frag-€!"),
        Got::Binary(vec![7; 300]),
        Got::Binary(vec![]),
        Got::Pong(b"pong".to_vec()),
        Got::Close(Some(1000), "bye".to_owned()),
    ];
    (bytes, expected)
}

#[test]
fn decodes_each_opcode() {
    let cases: Vec<(Vec<u8>, Got)> = vec![
        (frame(true, TEXT, b"hi"), text("hi")),
        (
            frame(true, BINARY, &[0, 1, 255]),
            Got::Binary(vec![0, 1, 255]),
        ),
        (frame(true, PING, b"p"), Got::Ping(b"p".to_vec())),
        (frame(true, PONG, b"q"), Got::Pong(b"q".to_vec())),
        (frame(true, CLOSE, b""), Got::Close(None, String::new())),
        (
            frame(true, CLOSE, &close_body(1001, b"")),
            Got::Close(Some(1001), String::new()),
        ),
        (
            frame(true, CLOSE, &close_body(4000, "ciao ☃".as_bytes())),
            Got::Close(Some(4000), "ciao ☃".to_owned()),
        ),
        (
            [frame(false, BINARY, b"a"), frame(true, CONTINUATION, b"b")].concat(),
            Got::Binary(b"ab".to_vec()),
        ),
    ];
    for (bytes, expected) in cases {
        assert_eq!(decode(&bytes), (vec![expected], Ok(())));
    }
}

#[test]
fn decodes_every_length_encoding() {
    let cases = [
        (0, Len::Minimal),
        (125, Len::Minimal),
        (126, Len::Minimal),
        (65535, Len::Minimal),
        (65536, Len::Minimal),
        // Non-minimal encodings are tolerated.
        (5, Len::Ext16),
        (5, Len::Ext64),
        (300, Len::Ext64),
    ];
    for (n, len) in cases {
        let payload: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
        let bytes = raw_frame(FIN | BINARY, len, &payload);
        assert_eq!(
            decode(&bytes),
            (vec![Got::Binary(payload)], Ok(())),
            "{n} {len:?}"
        );
    }

    let ping = raw_frame(FIN | PING, Len::Ext16, b"long form");
    assert_eq!(
        decode(&ping),
        (vec![Got::Ping(b"long form".to_vec())], Ok(()))
    );
}

#[test]
fn several_frames_in_one_input() {
    let (bytes, expected) = conversation();
    assert_eq!(decode(&bytes), (expected, Ok(())));
}

#[test]
fn any_split_decodes_the_same() {
    let (bytes, expected) = conversation();

    for at in 0..=bytes.len() {
        let pieces = vec![bytes[..at].to_vec(), bytes[at..].to_vec()];
        assert_eq!(
            decode_pieces(pieces, &LIMITS),
            (expected.clone(), Ok(())),
            "split at {at}"
        );
    }

    let one_byte_at_a_time = cut(&bytes, &[1]);
    assert_eq!(
        decode_pieces(one_byte_at_a_time, &LIMITS),
        (expected.clone(), Ok(()))
    );

    for seed in 1..20 {
        let pieces = cut(&bytes, &random_sizes(seed, 64, 40));
        assert_eq!(
            decode_pieces(pieces, &LIMITS),
            (expected.clone(), Ok(())),
            "seed {seed}"
        );
    }
}

#[test]
fn large_frames_survive_any_chunking() {
    let big: Vec<u8> = (0..70_000).map(|i| (i % 253) as u8).collect();
    let bytes = [
        frame(true, BINARY, &big),
        frame(false, BINARY, &big[..40_000]),
        frame(true, PING, b""),
        frame(true, CONTINUATION, &big[40_000..]),
    ]
    .concat();
    let expected = vec![
        Got::Binary(big.clone()),
        Got::Ping(vec![]),
        Got::Binary(big),
    ];

    let mut chunkings = vec![vec![1], vec![4096], vec![65_536]];
    chunkings.extend((1..5).map(|seed| random_sizes(seed, 100, 9000)));
    for sizes in chunkings {
        let outcome = decode_pieces(cut(&bytes, &sizes), &LIMITS);
        assert_eq!(
            outcome,
            (expected.clone(), Ok(())),
            "sizes {:?}",
            &sizes[..1]
        );
    }
}

#[test]
fn complete_frames_are_unmasked_in_place() {
    let mut input = frame(true, BINARY, b"no copy");
    let input_range = input.as_ptr_range();

    let mut decoder = MessageDecoder::new();
    let mut borrowed_input = false;
    let result = decoder.feed(&mut input, &LIMITS, |inbound| {
        if let Inbound::Binary(data) = inbound {
            borrowed_input = input_range.contains(&data.as_ptr());
        }
        ControlFlow::Continue(())
    });

    assert_eq!(result, Ok(()));
    assert!(borrowed_input);
    assert_eq!(&input[6..], b"no copy");
    assert_eq!(decoder.heap_bytes(), 0);
}

#[test]
fn zero_length_frames_and_fragments() {
    let cases: Vec<(Vec<u8>, Got)> = vec![
        (frame(true, TEXT, b""), text("")),
        (frame(true, BINARY, b""), Got::Binary(vec![])),
        (frame(true, PING, b""), Got::Ping(vec![])),
        (frame(true, PONG, b""), Got::Pong(vec![])),
        (
            [
                frame(false, TEXT, b""),
                frame(false, CONTINUATION, b""),
                frame(true, CONTINUATION, b""),
            ]
            .concat(),
            text(""),
        ),
        (
            [frame(false, TEXT, b""), frame(true, CONTINUATION, b"ab")].concat(),
            text("ab"),
        ),
    ];
    for (bytes, expected) in cases {
        assert_eq!(decode(&bytes), (vec![expected], Ok(())));
    }
}

#[test]
fn utf8_split_across_fragments_is_valid() {
    // '€' is E2 82 AC and '𝄞' is F0 9D 84 9E.
    let bytes = [
        frame(false, TEXT, &[0xE2]),
        frame(false, CONTINUATION, &[0x82]),
        frame(false, CONTINUATION, &[0xAC, 0xF0, 0x9D]),
        frame(true, CONTINUATION, &[0x84, 0x9E]),
    ]
    .concat();
    assert_eq!(decode(&bytes), (vec![text("€𝄞")], Ok(())));
}

#[test]
fn invalid_utf8_fails_before_fin() {
    let first_fragments: [&[u8]; 5] = [
        &[b'a', 0xFF],       // never valid
        &[0xC0],             // overlong lead byte
        &[0xE2, 0x28],       // bad continuation byte
        &[0xED, 0xA0, 0x80], // surrogate
        &[0xF5],             // beyond U+10FFFF
    ];
    for payload in first_fragments {
        let bytes = frame(false, TEXT, payload);
        let expected = (vec![], Err(ProtocolError::InvalidUtf8));
        assert_eq!(decode(&bytes), expected, "{payload:x?}");
        assert_eq!(
            decode_pieces(cut(&bytes, &[1]), &LIMITS),
            expected,
            "{payload:x?}"
        );
    }

    // Invalid only once the next fragment arrives.
    let bytes = [
        frame(false, TEXT, &[0xE2]),
        frame(false, CONTINUATION, b"x"),
    ]
    .concat();
    assert_eq!(decode(&bytes), (vec![], Err(ProtocolError::InvalidUtf8)));
}

#[test]
fn incomplete_utf8_at_fin_fails() {
    let cases = [
        frame(true, TEXT, &[b'a', 0xE2, 0x82]),
        [
            frame(false, TEXT, &[0xE2, 0x82]),
            frame(true, CONTINUATION, b""),
        ]
        .concat(),
    ];
    for bytes in cases {
        assert_eq!(decode(&bytes), (vec![], Err(ProtocolError::InvalidUtf8)));
    }
}

#[test]
fn each_violation_fails_with_its_close_code() {
    use ProtocolError::*;

    let unmasked = vec![FIN | BINARY, 0x01, 0xAA];
    let mut msb_set = header_only(FIN | BINARY, 0);
    msb_set[2] = 0x80;
    let seventeen_fragments = std::iter::once(frame(false, TEXT, b"a"))
        .chain(std::iter::repeat_n(frame(false, CONTINUATION, b"a"), 15))
        .chain(std::iter::once(frame(true, CONTINUATION, b"a")))
        .collect::<Vec<_>>()
        .concat();

    let cases: Vec<(&str, Vec<u8>, ProtocolError, u16)> = vec![
        ("rsv1", frame(true, 0x40 | TEXT, b"x"), ReservedBits, 1002),
        ("rsv2", frame(true, 0x20 | TEXT, b"x"), ReservedBits, 1002),
        ("rsv3", frame(true, 0x10 | PING, b""), ReservedBits, 1002),
        ("opcode 3", frame(true, 0x3, b""), UnknownOpcode(0x3), 1002),
        ("opcode 7", frame(true, 0x7, b""), UnknownOpcode(0x7), 1002),
        ("opcode B", frame(true, 0xB, b""), UnknownOpcode(0xB), 1002),
        ("opcode F", frame(true, 0xF, b""), UnknownOpcode(0xF), 1002),
        ("unmasked", unmasked, Unmasked, 1002),
        (
            "ping without fin",
            frame(false, PING, b""),
            FragmentedControl,
            1002,
        ),
        (
            "close without fin",
            frame(false, CLOSE, b""),
            FragmentedControl,
            1002,
        ),
        (
            "ping of 126",
            frame(true, PING, &[0; 126]),
            ControlTooLong,
            1002,
        ),
        (
            "pong of 126",
            frame(true, PONG, &[0; 126]),
            ControlTooLong,
            1002,
        ),
        (
            "lone continuation",
            frame(true, CONTINUATION, b"x"),
            UnexpectedContinuation,
            1002,
        ),
        (
            "text inside text",
            [frame(false, TEXT, b"a"), frame(true, TEXT, b"b")].concat(),
            ExpectedContinuation,
            1002,
        ),
        (
            "binary inside text",
            [frame(false, TEXT, b"a"), frame(false, BINARY, b"b")].concat(),
            ExpectedContinuation,
            1002,
        ),
        ("length msb", msb_set, LengthOverflow, 1002),
        (
            "too large",
            header_only(FIN | BINARY, 1 << 20 | 1),
            MessageTooLarge,
            1009,
        ),
        (
            "too many fragments",
            seventeen_fragments,
            TooManyFragments,
            1009,
        ),
        (
            "invalid text",
            frame(true, TEXT, &[0xFF]),
            InvalidUtf8,
            1007,
        ),
        (
            "close of 1 byte",
            frame(true, CLOSE, &[0x03]),
            CloseBodyOneByte,
            1002,
        ),
        (
            "close 1005",
            frame(true, CLOSE, &close_body(1005, b"")),
            InvalidCloseCode(1005),
            1002,
        ),
        (
            "close 999",
            frame(true, CLOSE, &close_body(999, b"")),
            InvalidCloseCode(999),
            1002,
        ),
        (
            "close reason",
            frame(true, CLOSE, &close_body(1000, &[0xC3])),
            InvalidCloseReason,
            1007,
        ),
    ];

    for (name, bytes, error, code) in cases {
        assert_eq!(decode(&bytes).1, Err(error.clone()), "{name}");
        let one_byte_at_a_time = decode_pieces(cut(&bytes, &[1]), &LIMITS);
        assert_eq!(
            one_byte_at_a_time.1,
            Err(error.clone()),
            "{name}, byte by byte"
        );
        assert_eq!(error.close_code(), code, "{name}");
    }
}

#[test]
fn reasons_are_distinct_snake_case() {
    use ProtocolError::*;

    let all = [
        ReservedBits,
        UnknownOpcode(3),
        Unmasked,
        FragmentedControl,
        ControlTooLong,
        UnexpectedContinuation,
        ExpectedContinuation,
        LengthOverflow,
        MessageTooLarge,
        TooManyFragments,
        InvalidUtf8,
        CloseBodyOneByte,
        InvalidCloseCode(1005),
        InvalidCloseReason,
    ];
    let mut reasons: Vec<&str> = all.iter().map(ProtocolError::reason).collect();
    assert!(reasons.iter().all(|r| {
        r.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    }));
    reasons.sort_unstable();
    reasons.dedup();
    assert_eq!(reasons.len(), all.len());
}

#[test]
fn violations_are_caught_as_soon_as_their_byte_arrives() {
    // Each case: bytes fed one at a time, and how many it takes to fail.
    let cases: Vec<(Vec<u8>, usize)> = vec![
        (frame(true, 0x40 | TEXT, b"payload"), 1),
        (frame(true, PING, &[0; 126]), 8),
        (vec![FIN | BINARY, 0x05, 1, 2, 3, 4, 5], 2),
        // The whole 64-bit header is needed to see the size.
        (header_only(FIN | BINARY, 1 << 21), 14),
    ];
    for (bytes, fails_at) in cases {
        let mut decoder = MessageDecoder::new();
        let fed = bytes
            .iter()
            .position(|&byte| {
                decoder
                    .feed(&mut [byte], &LIMITS, |_| ControlFlow::Continue(()))
                    .is_err()
            })
            .map(|at| at + 1);
        assert_eq!(fed, Some(fails_at), "{bytes:x?}");
    }
}

#[test]
fn size_cap_is_checked_from_the_header() {
    let limits = MessageLimits {
        max_message_size: 10,
        max_fragments: 16,
    };

    // Headers alone: nothing of the payload has been sent.
    let cases = [
        (header_only(FIN | BINARY, 10), Ok(())),
        (
            header_only(FIN | BINARY, 11),
            Err(ProtocolError::MessageTooLarge),
        ),
        (
            header_only(FIN | BINARY, u64::MAX >> 1),
            Err(ProtocolError::MessageTooLarge),
        ),
        (
            [frame(false, TEXT, b"123456"), header_only(CONTINUATION, 4)].concat(),
            Ok(()),
        ),
        (
            [frame(false, TEXT, b"123456"), header_only(CONTINUATION, 5)].concat(),
            Err(ProtocolError::MessageTooLarge),
        ),
    ];
    for (bytes, result) in cases {
        assert_eq!(decode_pieces(vec![bytes], &limits), (vec![], result));
    }

    // Control frames are bounded by §5.5, not by the message cap.
    let ping = frame(true, PING, &[1; 100]);
    assert_eq!(
        decode_pieces(vec![ping], &limits),
        (vec![Got::Ping(vec![1; 100])], Ok(()))
    );
}

#[test]
fn fragment_cap() {
    let limits = MessageLimits {
        max_message_size: 100,
        max_fragments: 3,
    };
    let fragments = |n: usize| -> Vec<u8> {
        let mut bytes = frame(false, BINARY, b"a");
        for i in 1..n {
            bytes.extend(frame(i == n - 1, CONTINUATION, b"a"));
        }
        bytes
    };

    assert_eq!(
        decode_pieces(vec![fragments(3)], &limits),
        (vec![Got::Binary(b"aaa".to_vec())], Ok(()))
    );
    assert_eq!(
        decode_pieces(vec![fragments(4)], &limits),
        (vec![], Err(ProtocolError::TooManyFragments))
    );

    // The count starts over with each message.
    let twice = [fragments(3), fragments(3)].concat();
    assert_eq!(decode_pieces(vec![twice], &limits).0.len(), 2);
}

#[test]
fn break_stops_decoding() {
    let mut input = [
        frame(true, TEXT, b"first"),
        frame(false, TEXT, b"partial"),
        frame(true, TEXT, b"never seen"),
    ]
    .concat();
    input.extend(&frame(true, BINARY, b"cut off")[..5]);

    let mut decoder = MessageDecoder::new();
    let mut got = Vec::new();
    let result = decoder.feed(&mut input, &LIMITS, |inbound| {
        got.push(Got::from(inbound));
        ControlFlow::Break(())
    });
    assert_eq!((got, result), (vec![text("first")], Ok(())));
    assert_eq!(decoder.heap_bytes(), 0);

    // The decoder is done: later input is ignored.
    let mut later = frame(true, TEXT, b"later");
    let mut called = false;
    let result = decoder.feed(&mut later, &LIMITS, |_| {
        called = true;
        ControlFlow::Continue(())
    });
    assert_eq!(result, Ok(()));
    assert!(!called);
}

#[test]
fn break_inside_a_fragmented_message_releases_it() {
    let mut input = [frame(false, BINARY, b"held"), frame(true, PING, b"")].concat();
    let mut decoder = MessageDecoder::new();
    let result = decoder.feed(&mut input, &LIMITS, |_| ControlFlow::Break(()));
    assert_eq!(result, Ok(()));
    assert_eq!(decoder.heap_bytes(), 0);
}

#[test]
fn an_error_is_final() {
    let mut decoder = MessageDecoder::new();
    let mut bad = frame(false, TEXT, b"half");
    bad[0] |= 0x40;
    let result = decoder.feed(&mut bad, &LIMITS, |_| ControlFlow::Continue(()));
    assert_eq!(result, Err(ProtocolError::ReservedBits));
    assert_eq!(decoder.heap_bytes(), 0);

    let mut good = frame(true, TEXT, b"fine");
    let mut called = false;
    let result = decoder.feed(&mut good, &LIMITS, |_| {
        called = true;
        ControlFlow::Continue(())
    });
    assert_eq!(result, Err(ProtocolError::ReservedBits));
    assert!(!called);
}

#[test]
fn heap_is_released_once_messages_complete() {
    let mut decoder = MessageDecoder::new();
    let mut feed = |bytes: &[u8]| {
        let mut input = bytes.to_vec();
        decoder
            .feed(&mut input, &LIMITS, |_| ControlFlow::Continue(()))
            .map(|()| decoder.heap_bytes())
    };

    let split_frame = frame(true, BINARY, &[1; 500]);
    let steps: Vec<(&str, Vec<u8>, bool)> = vec![
        ("complete messages", conversation().0, false),
        ("first fragment", frame(false, TEXT, b"hello "), true),
        ("ping in between", frame(true, PING, b""), true),
        ("last fragment", frame(true, CONTINUATION, b"world"), false),
        ("half a frame", split_frame[..200].to_vec(), true),
        ("its other half", split_frame[200..].to_vec(), false),
        (
            "a cut-off header",
            frame(true, TEXT, b"x")[..3].to_vec(),
            true,
        ),
        ("the rest", frame(true, TEXT, b"x")[3..].to_vec(), false),
    ];
    for (name, bytes, holds_heap) in steps {
        let heap = feed(&bytes).expect(name);
        assert_eq!(heap > 0, holds_heap, "{name}: {heap} bytes");
    }
}

#[test]
fn buffers_grow_no_larger_than_what_they_hold() {
    let payload = vec![9; 50_000];
    let bytes = [
        frame(false, BINARY, &payload),
        frame(true, CONTINUATION, &payload),
    ]
    .concat();

    let mut decoder = MessageDecoder::new();
    let mut peak = 0;
    for mut piece in cut(&bytes, &[1000]) {
        let result = decoder.feed(&mut piece, &LIMITS, |_| ControlFlow::Continue(()));
        assert_eq!(result, Ok(()));
        peak = peak.max(decoder.heap_bytes());
    }

    // At most the frame being completed plus the message so far.
    assert!(peak <= 50_008 + 50_000, "peak {peak}");
    assert_eq!(decoder.heap_bytes(), 0);
}

/// Turns a server frame into the client frame a peer would send: sets the
/// mask bit, inserts the key and masks the payload.
fn as_client_frame(server_frame: &[u8]) -> Vec<u8> {
    let header_len = match server_frame[1] {
        126 => 4,
        127 => 10,
        _ => 2,
    };
    let (header, payload) = server_frame.split_at(header_len);
    let mut out = header.to_vec();
    out[1] |= 0x80;
    out.extend(KEY);
    out.extend(payload.iter().zip(KEY.iter().cycle()).map(|(b, k)| b ^ k));
    out
}

#[test]
fn encode_frame_lengths() {
    let cases: [(usize, &[u8]); 5] = [
        (0, &[0x82, 0]),
        (125, &[0x82, 125]),
        (126, &[0x82, 126, 0, 126]),
        (65535, &[0x82, 126, 0xFF, 0xFF]),
        (65536, &[0x82, 127, 0, 0, 0, 0, 0, 1, 0, 0]),
    ];
    for (n, header) in cases {
        let payload = vec![0x5A; n];
        let mut out = b"earlier".to_vec();
        encode_frame(&mut out, OpCode::Binary, &payload);
        assert_eq!(out, [&b"earlier"[..], header, &payload].concat(), "{n}");

        let client = as_client_frame(&out[7..]);
        assert_eq!(decode(&client), (vec![Got::Binary(payload)], Ok(())));
    }
}

#[test]
fn encode_opcodes_and_headers() {
    let cases = [
        (OpCode::Continuation, 0x80),
        (OpCode::Text, 0x81),
        (OpCode::Binary, 0x82),
        (OpCode::Close, 0x88),
        (OpCode::Ping, 0x89),
        (OpCode::Pong, 0x8A),
    ];
    for (opcode, first) in cases {
        let mut out = Vec::new();
        encode_frame(&mut out, opcode, b"");
        assert_eq!(out, [first, 0]);
    }

    // A header then the payload in pieces equals one encoded frame.
    let mut pieces = Vec::new();
    encode_header(&mut pieces, OpCode::Text, 11);
    pieces.extend_from_slice(b"hello");
    pieces.extend_from_slice(b" world");
    let mut whole = Vec::new();
    encode_frame(&mut whole, OpCode::Text, b"hello world");
    assert_eq!(pieces, whole);

    let mut out = Vec::new();
    encode_fragment_header(&mut out, false, OpCode::Text, 3);
    encode_fragment_header(&mut out, true, OpCode::Continuation, 300);
    assert_eq!(out, [0x01, 3, 0x80, 126, 1, 44]);
}

#[test]
fn encode_close_truncates_on_a_char_boundary() {
    let ascii = "a".repeat(200);
    let two_byte = "é".repeat(100);
    let three_byte = "€".repeat(50);
    let cases: [(u16, &str, &str); 6] = [
        (1000, "", ""),
        (1001, "bye", "bye"),
        (1011, &ascii[..123], &ascii[..123]),
        (1011, &ascii, &ascii[..123]),
        (1009, &two_byte, &two_byte[..122]),
        (1008, &three_byte, &three_byte[..123]),
    ];
    for (code, reason, sent) in cases {
        let mut out = Vec::new();
        encode_close(&mut out, code, reason);
        let mut expected = vec![0x88, 2 + sent.len() as u8];
        expected.extend(code.to_be_bytes());
        expected.extend(sent.as_bytes());
        assert_eq!(out, expected, "{code}");

        let client = as_client_frame(&out);
        assert_eq!(
            decode(&client),
            (vec![Got::Close(Some(code), sent.to_owned())], Ok(()))
        );
    }
}

#[test]
fn received_close_codes() {
    let valid = [
        1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 4999,
    ];
    let invalid = [
        0,
        999,
        1004,
        1005,
        1006,
        1015,
        1016,
        2000,
        2999,
        5000,
        u16::MAX,
    ];
    for code in valid {
        assert!(is_valid_received_close_code(code), "{code}");
    }
    for code in invalid {
        assert!(!is_valid_received_close_code(code), "{code}");
    }
}

#[test]
fn arbitrary_input_never_panics() {
    let (valid, _) = conversation();
    let all_limits = [
        LIMITS,
        MessageLimits {
            max_message_size: 0,
            max_fragments: 0,
        },
        MessageLimits {
            max_message_size: usize::MAX,
            max_fragments: usize::MAX,
        },
    ];

    for seed in 1..300 {
        // A valid stream with a few bytes changed, and pure noise.
        let mut corrupted = valid.clone();
        let positions = random_sizes(seed, 3, corrupted.len());
        let values = random_sizes(seed + 1000, 3, 256);
        for (at, value) in positions.into_iter().zip(values) {
            corrupted[at - 1] = (value - 1) as u8;
        }
        let noise: Vec<u8> = random_sizes(seed, 300, 256)
            .iter()
            .map(|&v| (v - 1) as u8)
            .collect();

        for limits in &all_limits {
            for bytes in [&corrupted, &noise] {
                let _ = decode_pieces(cut(bytes, &random_sizes(seed, 50, 30)), limits);
            }
        }
    }
}
