//! The RFC 6455 message layer: client frames in, messages out, and server
//! frames back.
//!
//! This module owns the wire format of a connection after the handshake:
//! frame headers (§5.2), client masking (§5.1, §5.3), fragmentation (§5.4),
//! control frames (§5.5), UTF-8 text (§5.6, §8.1) and close codes (§5.5.1,
//! §7.4). No extension is negotiated, so every RSV bit must be clear. It
//! does no I/O: the shard reads into its own scratch buffer and hands the
//! bytes to [`MessageDecoder::feed`], and sends what the `encode_*`
//! functions append to its output buffer.
//!
//! Memory is the design constraint. An idle decoder holds no heap at all.
//! A frame that is complete in the input is unmasked in place and handed out
//! as a borrow of that input. Only the tail of a frame cut off by a read and
//! the fragments of an unfinished message are copied into the decoder, and
//! each buffer is released as soon as it empties.

use std::ops::ControlFlow;

/// Largest payload a control frame may carry (§5.5).
const MAX_CONTROL_PAYLOAD: usize = 125;

/// Close codes the server itself sends (§7.4.1).
pub mod close_code {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const INVALID_PAYLOAD: u16 = 1007;
    pub const POLICY_VIOLATION: u16 = 1008;
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    pub const INTERNAL_ERROR: u16 = 1011;
}

/// Inbound limits for one connection.
#[derive(Debug, Clone, Copy)]
pub struct MessageLimits {
    /// Largest message (sum of fragment payloads) accepted, bytes. A frame
    /// whose declared length alone exceeds it is refused from its header,
    /// before its payload is buffered. Control frames are bounded by §5.5
    /// instead and do not count.
    pub max_message_size: usize,
    /// Most frames one fragmented data message may span (first frame +
    /// continuations). An unfragmented message is one frame, so values
    /// below 1 act as 1.
    pub max_fragments: usize,
}

/// One thing the peer sent, handed out in order.
#[derive(Debug, PartialEq)]
pub enum Inbound<'a> {
    /// A complete message, validated as UTF-8.
    Text(&'a str),
    Binary(&'a [u8]),
    Ping(&'a [u8]),
    Pong(&'a [u8]),
    /// The close code (validated per §7.4) and UTF-8 reason; the code is
    /// None when the close frame had an empty body.
    Close(Option<u16>, &'a str),
}

/// A violation of RFC 6455 by the peer; the connection must be closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("reserved bits set but no extension negotiated")]
    ReservedBits,
    #[error("reserved opcode {0:#x}")]
    UnknownOpcode(u8),
    #[error("client frame is not masked")]
    Unmasked,
    #[error("control frame without FIN")]
    FragmentedControl,
    #[error("control frame payload longer than 125 bytes")]
    ControlTooLong,
    #[error("continuation frame with no message in progress")]
    UnexpectedContinuation,
    #[error("new data frame while a fragmented message is in progress")]
    ExpectedContinuation,
    #[error("64-bit payload length with the most significant bit set")]
    LengthOverflow,
    #[error("message larger than the size limit")]
    MessageTooLarge,
    #[error("message spans more frames than the fragment limit")]
    TooManyFragments,
    #[error("text message is not valid UTF-8")]
    InvalidUtf8,
    #[error("close frame body of one byte")]
    CloseBodyOneByte,
    #[error("close code {0} may not be received")]
    InvalidCloseCode(u16),
    #[error("close reason is not valid UTF-8")]
    InvalidCloseReason,
}

impl ProtocolError {
    /// The close code the server sends for this violation: 1002 protocol
    /// error, 1007 invalid UTF-8 (also in a close reason), 1009 message too
    /// big (size and fragment caps).
    pub fn close_code(&self) -> u16 {
        match self {
            Self::MessageTooLarge | Self::TooManyFragments => close_code::MESSAGE_TOO_BIG,
            Self::InvalidUtf8 | Self::InvalidCloseReason => close_code::INVALID_PAYLOAD,
            Self::ReservedBits
            | Self::UnknownOpcode(_)
            | Self::Unmasked
            | Self::FragmentedControl
            | Self::ControlTooLong
            | Self::UnexpectedContinuation
            | Self::ExpectedContinuation
            | Self::LengthOverflow
            | Self::CloseBodyOneByte
            | Self::InvalidCloseCode(_) => close_code::PROTOCOL_ERROR,
        }
    }

    /// Short stable reason string for logs and metrics, e.g. "reserved_bits".
    pub fn reason(&self) -> &'static str {
        match self {
            Self::ReservedBits => "reserved_bits",
            Self::UnknownOpcode(_) => "unknown_opcode",
            Self::Unmasked => "unmasked_frame",
            Self::FragmentedControl => "fragmented_control",
            Self::ControlTooLong => "control_too_long",
            Self::UnexpectedContinuation => "unexpected_continuation",
            Self::ExpectedContinuation => "expected_continuation",
            Self::LengthOverflow => "length_overflow",
            Self::MessageTooLarge => "message_too_large",
            Self::TooManyFragments => "too_many_fragments",
            Self::InvalidUtf8 => "invalid_utf8",
            Self::CloseBodyOneByte => "close_body_one_byte",
            Self::InvalidCloseCode(_) => "invalid_close_code",
            Self::InvalidCloseReason => "invalid_close_reason",
        }
    }
}

/// RFC 6455 §5.2 opcodes for encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpCode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

impl OpCode {
    /// The opcode for the low four bits of a frame's first byte; None for
    /// the reserved values 0x3-0x7 and 0xB-0xF.
    fn from_bits(bits: u8) -> Option<Self> {
        match bits {
            0x0 => Some(Self::Continuation),
            0x1 => Some(Self::Text),
            0x2 => Some(Self::Binary),
            0x8 => Some(Self::Close),
            0x9 => Some(Self::Ping),
            0xA => Some(Self::Pong),
            _ => None,
        }
    }

    fn bits(self) -> u8 {
        match self {
            Self::Continuation => 0x0,
            Self::Text => 0x1,
            Self::Binary => 0x2,
            Self::Close => 0x8,
            Self::Ping => 0x9,
            Self::Pong => 0xA,
        }
    }

    /// Close, Ping and Pong (opcodes with the high bit set, §5.5).
    pub fn is_control(self) -> bool {
        self.bits() & 0x8 != 0
    }
}

/// Kind of the fragmented data message in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DataKind {
    Text,
    Binary,
}

/// A frame header that passed every check.
#[derive(Debug, Clone, Copy)]
struct FrameHeader {
    fin: bool,
    opcode: OpCode,
    mask: [u8; 4],
    header_len: usize,
    /// Header plus payload.
    frame_len: usize,
}

/// Why feeding stopped for good.
#[derive(Debug, Default)]
enum Halt {
    #[default]
    Running,
    /// The handler returned Break.
    Stopped,
    /// The peer violated the protocol; repeated on every later feed.
    Failed(ProtocolError),
}

/// The handler `feed` calls, as a trait object so the decoding code is not
/// compiled once per closure type.
type Handler<'h> = dyn FnMut(Inbound<'_>) -> ControlFlow<()> + 'h;

/// Incremental decoder of client-to-server frames (RFC 6455 §5.2, §5.4,
/// §5.5).
#[derive(Debug, Default)]
pub struct MessageDecoder {
    /// A frame cut off at the end of the last input, still masked. Its
    /// header (as far as it got) has already been checked.
    partial: Vec<u8>,
    /// Unmasked payload of the fragmented message in progress.
    message: Vec<u8>,
    /// Kind of the fragmented message in progress; None between messages.
    in_progress: Option<DataKind>,
    /// Frames the message in progress has spanned so far.
    fragments: usize,
    /// Length of the prefix of `message` known to be valid UTF-8; it always
    /// ends on a char boundary.
    utf8_valid_up_to: usize,
    halt: Halt,
}

impl MessageDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Decodes everything complete in `input` (bytes just read from the
    /// socket), calling `handle` for each message or control frame in order.
    /// Control frames may arrive between fragments of a data message (§5.4)
    /// and are handed out at once. When `handle` returns Break, decoding
    /// stops and the rest of the input is dropped (the caller is closing).
    /// Incomplete trailing bytes are kept for the next call. The first
    /// violation returns Err and the decoder must not be fed again.
    ///
    /// Complete frames are unmasked in place, so `input` is modified. After
    /// a Break, later calls decode nothing and return Ok; after an Err, they
    /// return the same Err. Either way the decoder's buffers are released.
    pub fn feed(
        &mut self,
        input: &mut [u8],
        limits: &MessageLimits,
        mut handle: impl FnMut(Inbound<'_>) -> ControlFlow<()>,
    ) -> Result<(), ProtocolError> {
        match &self.halt {
            Halt::Running => {}
            Halt::Stopped => return Ok(()),
            Halt::Failed(error) => return Err(error.clone()),
        }

        match self.decode(input, limits, &mut handle) {
            Ok(ControlFlow::Continue(())) => Ok(()),
            Ok(ControlFlow::Break(())) => {
                self.halt(Halt::Stopped);
                Ok(())
            }
            Err(error) => {
                self.halt(Halt::Failed(error.clone()));
                Err(error)
            }
        }
    }

    /// Bytes of heap this decoder holds now (capacity of its Vecs): 0 for
    /// an idle connection.
    pub fn heap_bytes(&self) -> usize {
        self.partial.capacity() + self.message.capacity()
    }

    /// Ends decoding for good, dropping all buffered bytes and their memory.
    fn halt(&mut self, halt: Halt) {
        *self = Self {
            halt,
            ..Self::default()
        };
    }

    fn decode(
        &mut self,
        input: &mut [u8],
        limits: &MessageLimits,
        handle: &mut Handler<'_>,
    ) -> Result<ControlFlow<()>, ProtocolError> {
        // A frame cut off by the last read is completed from the front of
        // this input and then handled from the decoder's own buffer.
        let mut rest = input;
        if !self.partial.is_empty() {
            let (used, header) = self.fill_partial(rest, limits)?;
            let Some(header) = header else {
                return Ok(ControlFlow::Continue(()));
            };
            rest = std::mem::take(&mut rest)
                .get_mut(used..)
                .unwrap_or_default();

            let mut frame = std::mem::take(&mut self.partial);
            let payload = frame.get_mut(header.header_len..).unwrap_or_default();
            let flow = self.handle_frame(&header, payload, limits, handle)?;
            if flow.is_break() {
                return Ok(flow);
            }
        }

        // Frames complete in the input are handled where they lie.
        while let Some(header) = self.parse_header(rest, limits)? {
            if rest.len() < header.frame_len {
                break;
            }
            let (frame, tail) = std::mem::take(&mut rest).split_at_mut(header.frame_len);
            let payload = frame.get_mut(header.header_len..).unwrap_or_default();
            let flow = self.handle_frame(&header, payload, limits, handle)?;
            if flow.is_break() {
                return Ok(flow);
            }
            rest = tail;
        }

        // What is left is the start of a frame whose header, as far as it
        // got, has been checked.
        self.partial.extend_from_slice(rest);
        Ok(ControlFlow::Continue(()))
    }

    /// Moves bytes from the front of `input` into `partial` until it holds a
    /// whole frame. Returns how many bytes were taken, and the frame's
    /// header once the frame is complete.
    fn fill_partial(
        &mut self,
        input: &[u8],
        limits: &MessageLimits,
    ) -> Result<(usize, Option<FrameHeader>), ProtocolError> {
        let mut used = 0;

        // A header is at most 14 bytes, so it is completed a byte at a time,
        // and each byte is checked as soon as it arrives.
        let header = loop {
            if let Some(header) = self.parse_header(&self.partial, limits)? {
                break header;
            }
            let Some(&byte) = input.get(used) else {
                return Ok((used, None));
            };
            self.partial.push(byte);
            used += 1;
        };

        let missing = header.frame_len.saturating_sub(self.partial.len());
        let available = input.get(used..).unwrap_or_default();
        let taken = available.get(..missing).unwrap_or(available);
        reserve_within(&mut self.partial, taken.len(), header.frame_len);
        self.partial.extend_from_slice(taken);
        used += taken.len();

        let complete = self.partial.len() >= header.frame_len;
        Ok((used, complete.then_some(header)))
    }

    /// Checks the frame header at the start of `bytes`, as much of it as is
    /// there. Returns None when more bytes are needed to finish it.
    fn parse_header(
        &self,
        bytes: &[u8],
        limits: &MessageLimits,
    ) -> Result<Option<FrameHeader>, ProtocolError> {
        let Some(&first) = bytes.first() else {
            return Ok(None);
        };

        // §5.2: RSV1-3 MUST be 0 unless an extension defines them.
        if first & 0x70 != 0 {
            return Err(ProtocolError::ReservedBits);
        }

        // §5.2: opcodes 0x3-0x7 and 0xB-0xF are reserved.
        let bits = first & 0x0F;
        let opcode = OpCode::from_bits(bits).ok_or(ProtocolError::UnknownOpcode(bits))?;
        let fin = first & 0x80 != 0;
        self.check_sequence(fin, opcode)?;

        let Some(&second) = bytes.get(1) else {
            return Ok(None);
        };

        // §5.1: the server MUST close the connection on an unmasked frame.
        if second & 0x80 == 0 {
            return Err(ProtocolError::Unmasked);
        }

        // §5.2: 126 and 127 announce a 16-bit or a 64-bit length after the
        // second byte; the 4-byte masking key follows.
        let short_len = second & 0x7F;
        let extended_len = match short_len {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let header_len = 2 + extended_len + 4;
        let Some((extended, mask)) = bytes
            .get(2..header_len)
            .and_then(|rest| rest.split_last_chunk::<4>())
        else {
            return Ok(None);
        };

        // Non-minimal encodings are tolerated: the value is what counts.
        let declared = if extended.is_empty() {
            u64::from(short_len)
        } else {
            extended
                .iter()
                .fold(0, |len, &byte| len << 8 | u64::from(byte))
        };

        // §5.2: the most significant bit of a 64-bit length MUST be 0.
        if declared >> 63 != 0 {
            return Err(ProtocolError::LengthOverflow);
        }

        if opcode.is_control() {
            // §5.5: control frames carry at most 125 bytes of payload.
            if declared > MAX_CONTROL_PAYLOAD as u64 {
                return Err(ProtocolError::ControlTooLong);
            }
        } else {
            self.check_limits(opcode, declared, limits)?;
        }

        // Both bounds above keep the length within usize.
        let payload_len = usize::try_from(declared).map_err(|_| ProtocolError::MessageTooLarge)?;
        let frame_len = header_len
            .checked_add(payload_len)
            .ok_or(ProtocolError::MessageTooLarge)?;
        Ok(Some(FrameHeader {
            fin,
            opcode,
            mask: *mask,
            header_len,
            frame_len,
        }))
    }

    /// Checks that a frame may come next given the message in progress.
    fn check_sequence(&self, fin: bool, opcode: OpCode) -> Result<(), ProtocolError> {
        // §5.5: control frames MUST NOT be fragmented. They may come between
        // the fragments of a message (§5.4).
        if opcode.is_control() {
            return if fin {
                Ok(())
            } else {
                Err(ProtocolError::FragmentedControl)
            };
        }

        // §5.4: fragments of one message are not interleaved with another,
        // and a continuation only follows an unfinished data frame.
        match (opcode, self.in_progress) {
            (OpCode::Continuation, None) => Err(ProtocolError::UnexpectedContinuation),
            (OpCode::Text | OpCode::Binary, Some(_)) => Err(ProtocolError::ExpectedContinuation),
            _ => Ok(()),
        }
    }

    /// Applies the size and fragment caps to a data frame from its header.
    fn check_limits(
        &self,
        opcode: OpCode,
        declared: u64,
        limits: &MessageLimits,
    ) -> Result<(), ProtocolError> {
        // A continuation adds to the message in progress; any other data
        // frame starts a new one.
        let (held, frames) = if opcode == OpCode::Continuation {
            (self.message.len(), self.fragments.saturating_add(1))
        } else {
            (0, 1)
        };

        if frames > limits.max_fragments.max(1) {
            return Err(ProtocolError::TooManyFragments);
        }

        let total = u64::try_from(held)
            .unwrap_or(u64::MAX)
            .saturating_add(declared);
        let max = u64::try_from(limits.max_message_size).unwrap_or(u64::MAX);
        if total > max {
            return Err(ProtocolError::MessageTooLarge);
        }
        Ok(())
    }

    /// Unmasks one complete frame's payload in place and hands out what it
    /// completes.
    fn handle_frame(
        &mut self,
        header: &FrameHeader,
        payload: &mut [u8],
        limits: &MessageLimits,
        handle: &mut Handler<'_>,
    ) -> Result<ControlFlow<()>, ProtocolError> {
        // §5.3: every payload byte was XORed with the client's masking key.
        unmask(payload, header.mask);

        let kind = match header.opcode {
            OpCode::Ping => return Ok(handle(Inbound::Ping(payload))),
            OpCode::Pong => return Ok(handle(Inbound::Pong(payload))),
            OpCode::Close => {
                let (code, reason) = parse_close_body(payload)?;
                return Ok(handle(Inbound::Close(code, reason)));
            }
            OpCode::Text => DataKind::Text,
            OpCode::Binary => DataKind::Binary,
            OpCode::Continuation => {
                return self.continue_message(header.fin, payload, limits, handle);
            }
        };

        // An unfragmented message goes out straight from the input.
        if header.fin {
            return match kind {
                DataKind::Binary => Ok(handle(Inbound::Binary(payload))),
                DataKind::Text => {
                    // §8.1: text MUST be valid UTF-8.
                    let text =
                        std::str::from_utf8(payload).map_err(|_| ProtocolError::InvalidUtf8)?;
                    Ok(handle(Inbound::Text(text)))
                }
            };
        }

        self.in_progress = Some(kind);
        self.fragments = 0;
        self.utf8_valid_up_to = 0;
        self.continue_message(false, payload, limits, handle)
    }

    /// Appends one fragment to the message in progress, handing the message
    /// out when `fin` ends it.
    fn continue_message(
        &mut self,
        fin: bool,
        payload: &[u8],
        limits: &MessageLimits,
        handle: &mut Handler<'_>,
    ) -> Result<ControlFlow<()>, ProtocolError> {
        self.fragments = self.fragments.saturating_add(1);
        reserve_within(&mut self.message, payload.len(), limits.max_message_size);
        self.message.extend_from_slice(payload);

        if !fin {
            if self.in_progress == Some(DataKind::Text) {
                self.check_utf8_progress()?;
            }
            return Ok(ControlFlow::Continue(()));
        }

        // The message leaves the decoder, and its memory with it.
        let message = std::mem::take(&mut self.message);
        let kind = self.in_progress.take();
        self.fragments = 0;
        self.utf8_valid_up_to = 0;

        match kind {
            Some(DataKind::Text) => {
                // §8.1: validated whole, since a &str needs proof without
                // unsafe; this also catches a sequence left open at the end.
                let text = std::str::from_utf8(&message).map_err(|_| ProtocolError::InvalidUtf8)?;
                Ok(handle(Inbound::Text(text)))
            }
            Some(DataKind::Binary) | None => Ok(handle(Inbound::Binary(&message))),
        }
    }

    /// Validates the bytes appended to a fragmented text message since the
    /// last check (§5.6, §8.1), so an invalid sequence fails at once instead
    /// of at FIN. A sequence cut off at the end may be finished by the next
    /// fragment.
    fn check_utf8_progress(&mut self) -> Result<(), ProtocolError> {
        let fresh = self
            .message
            .get(self.utf8_valid_up_to..)
            .unwrap_or_default();
        match std::str::from_utf8(fresh) {
            Ok(_) => self.utf8_valid_up_to = self.message.len(),
            Err(error) if error.error_len().is_none() => {
                self.utf8_valid_up_to += error.valid_up_to();
            }
            Err(_) => return Err(ProtocolError::InvalidUtf8),
        }
        Ok(())
    }
}

/// Splits an unmasked close frame body into code and reason (§5.5.1).
fn parse_close_body(body: &[u8]) -> Result<(Option<u16>, &str), ProtocolError> {
    match body {
        [] => Ok((None, "")),

        // §5.5.1: a body, if present, starts with a two-byte code.
        [_] => Err(ProtocolError::CloseBodyOneByte),

        [high, low, reason @ ..] => {
            // §7.4: some codes may never appear on the wire.
            let code = u16::from_be_bytes([*high, *low]);
            if !is_valid_received_close_code(code) {
                return Err(ProtocolError::InvalidCloseCode(code));
            }

            // §5.5.1: the reason is UTF-8.
            let reason =
                std::str::from_utf8(reason).map_err(|_| ProtocolError::InvalidCloseReason)?;
            Ok((Some(code), reason))
        }
    }
}

/// XORs `payload` with the repeating masking key (§5.3), eight bytes at a
/// time. The payload starts at key offset 0, and so does every 8-byte chunk.
fn unmask(payload: &mut [u8], key: [u8; 4]) {
    let [k0, k1, k2, k3] = key;
    let wide_key = u64::from_ne_bytes([k0, k1, k2, k3, k0, k1, k2, k3]);

    let mut chunks = payload.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut word = [0; 8];
        word.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u64::from_ne_bytes(word) ^ wide_key).to_ne_bytes());
    }
    for (byte, k) in chunks.into_remainder().iter_mut().zip(key.iter().cycle()) {
        *byte ^= k;
    }
}

/// Makes room for `additional` more bytes, doubling as `Vec` does but never
/// past `ceiling`, the most `buf` can come to hold, so a buffer that reaches
/// its final size does not carry up to twice the memory it needs.
fn reserve_within(buf: &mut Vec<u8>, additional: usize, ceiling: usize) {
    let needed = buf.len().saturating_add(additional);
    if needed <= buf.capacity() {
        return;
    }
    let target = buf
        .capacity()
        .saturating_mul(2)
        .clamp(needed, ceiling.max(needed));
    buf.reserve_exact(target - buf.len());
}

/// Appends one unmasked, final server frame (header + payload) to `out`
/// (servers never mask, §5.1).
pub fn encode_frame(out: &mut Vec<u8>, opcode: OpCode, payload: &[u8]) {
    out.reserve(10 + payload.len());
    encode_header(out, opcode, payload.len());
    out.extend_from_slice(payload);
}

/// Appends only the header of a final unmasked frame of `len` payload bytes,
/// so a caller can then write the payload in pieces straight into `out`
/// without an intermediate buffer.
pub fn encode_header(out: &mut Vec<u8>, opcode: OpCode, len: usize) {
    encode_fragment_header(out, true, opcode, len);
}

/// Like [`encode_header`], for any frame of a fragmented message (§5.4): the
/// first carries Text or Binary, the rest Continuation, and only the last
/// has `fin` set.
pub fn encode_fragment_header(out: &mut Vec<u8>, fin: bool, opcode: OpCode, len: usize) {
    debug_assert!(
        !opcode.is_control() || (fin && len <= MAX_CONTROL_PAYLOAD),
        "control frames are final and at most 125 bytes (§5.5)",
    );

    out.push(u8::from(fin) << 7 | opcode.bits());

    // §5.2: the minimal length encoding; the mask bit stays clear (§5.1).
    match len {
        0..=125 => out.push(len as u8),
        126..=0xFFFF => {
            out.push(126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            out.push(127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
}

/// Appends a Close frame with `code` and `reason` (reason truncated on a char
/// boundary so the body stays <= 125 bytes).
pub fn encode_close(out: &mut Vec<u8>, code: u16, reason: &str) {
    // §5.5: the two code bytes and the reason share the 125 bytes.
    let mut end = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let reason = reason.get(..end).unwrap_or_default();

    encode_header(out, OpCode::Close, 2 + reason.len());
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(reason.as_bytes());
}

/// Whether a close code received from a peer is allowed (§7.4.1/§7.4.2):
/// 1000-1003, 1007-1011 (plus 1012-1014 as registered), 3000-4999; never
/// 1004, 1005, 1006, 1015 or <1000 or >=5000.
pub fn is_valid_received_close_code(code: u16) -> bool {
    // 1004 is reserved; 1005, 1006 and 1015 stand for "no code", "abnormal
    // closure" and "TLS failure" and never appear in a frame; the rest of
    // 1000-2999 is unassigned.
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

#[cfg(test)]
#[path = "codec_tests.rs"]
mod tests;
