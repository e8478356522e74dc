//! HTTP/1.1 request heads and plain answers, for the router.
//!
//! Reading a head is linear in the bytes received: each read scans only the
//! new bytes (and the three before them) for the blank line, and the head is
//! parsed once, when complete. The whole head must arrive before a deadline
//! fixed at accept time. This module never sees WebSocket frames.

use std::future::Future;
use std::io;
use std::time::Instant;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use glommio::timer::Timer;

/// A parsed request head. Header names are lower-cased; values are raw bytes.
#[derive(Debug)]
pub struct RequestHead {
    pub method: String,
    /// The path without the query.
    pub path: String,
    /// The raw query string after `?`, if any.
    pub query: Option<String>,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor_version: u8,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl RequestHead {
    /// The first value of header `name` (lower-case).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }

    /// Every value of header `name` (lower-case), in order.
    pub fn all(&self, name: &str) -> Vec<&[u8]> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
            .collect()
    }

    /// Whether any value of the comma-separated header `name` holds `token`,
    /// compared without regard to ASCII case (RFC 9110 §5.6.1 lists).
    pub fn has_token(&self, name: &str, token: &str) -> bool {
        self.all(name).iter().any(|value| {
            value
                .split(|&b| b == b',')
                .any(|item| item.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
        })
    }

    /// Whether the connection stays open after the answer (RFC 9112 §9.3).
    pub fn keep_alive(&self) -> bool {
        if self.has_token("connection", "close") {
            return false;
        }
        self.minor_version >= 1 || self.has_token("connection", "keep-alive")
    }
}

/// Why a request head could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    #[error("request head larger than the limit")]
    TooLarge,
    #[error("too many header lines")]
    TooManyHeaders,
    #[error("malformed request head")]
    Malformed,
    #[error("deadline passed before the request was complete")]
    TimedOut,
    #[error("peer closed the connection")]
    Closed,
    #[error("socket error: {0}")]
    Io(#[from] io::Error),
}

impl HeadError {
    /// The status to answer with, if the peer can still be answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            HeadError::TooLarge | HeadError::TooManyHeaders => Some(431),
            HeadError::Malformed => Some(400),
            HeadError::TimedOut => Some(408),
            HeadError::Closed | HeadError::Io(_) => None,
        }
    }

    /// Short stable reason for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            HeadError::TooLarge => "head_too_large",
            HeadError::TooManyHeaders => "too_many_headers",
            HeadError::Malformed => "malformed_head",
            HeadError::TimedOut => "handshake_timeout",
            HeadError::Closed => "peer_closed",
            HeadError::Io(_) => "socket_error",
        }
    }
}

/// Index just past the blank line ending a head, searching from `from`.
pub fn find_head_end(buf: &[u8], from: usize) -> Option<usize> {
    let start = from.saturating_sub(3);
    buf.get(start..)?
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| start + i + 4)
}

/// Parses a complete head (ending with the blank line).
pub fn parse_head(bytes: &[u8], max_headers: usize) -> Result<RequestHead, HeadError> {
    let mut slots = vec![httparse::EMPTY_HEADER; max_headers];
    let mut request = httparse::Request::new(&mut slots);
    match request.parse(bytes) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(HeadError::Malformed),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooManyHeaders),
        Err(_) => return Err(HeadError::Malformed),
    }

    let (Some(method), Some(target), Some(minor_version)) =
        (request.method, request.path, request.version)
    else {
        return Err(HeadError::Malformed);
    };
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path.to_owned(), Some(query.to_owned())),
        None => (target.to_owned(), None),
    };
    let headers = request
        .headers
        .iter()
        .map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec()))
        .collect();

    Ok(RequestHead {
        method: method.to_owned(),
        path,
        query,
        minor_version,
        headers,
    })
}

/// Runs `io` until `deadline`; past it, `HeadError::TimedOut`.
pub async fn before<T>(
    deadline: Instant,
    io: impl Future<Output = Result<T, HeadError>>,
) -> Result<T, HeadError> {
    let remaining = deadline.saturating_duration_since(Instant::now());
    let timer = async {
        Timer::new(remaining).await;
        Err(HeadError::TimedOut)
    };
    futures_lite::future::or(io, timer).await
}

/// Reads until `buf` holds a complete head, then parses it. Returns the head
/// and its length in `buf`; bytes after it (a pipelined body or early
/// WebSocket frames) stay in `buf`.
pub async fn read_head(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    max_head: usize,
    max_headers: usize,
) -> Result<(RequestHead, usize), HeadError> {
    let mut scanned = 0;
    loop {
        if let Some(end) = find_head_end(buf, scanned) {
            if end > max_head {
                return Err(HeadError::TooLarge);
            }
            return Ok((parse_head(&buf[..end], max_headers)?, end));
        }
        if buf.len() >= max_head {
            return Err(HeadError::TooLarge);
        }
        scanned = buf.len();

        // Read at most one byte past the cap, so that an over-long head is
        // detected without buffering more of it.
        let old_len = buf.len();
        let want = (max_head + 1 - old_len).min(4096);
        if append(stream, buf, want).await? == 0 {
            return Err(if old_len == 0 {
                HeadError::Closed
            } else {
                HeadError::Malformed
            });
        }
    }
}

/// Longest PROXY protocol v1 line, terminator included.
const MAX_PROXY_LINE: usize = 107;

/// Reads a PROXY protocol v1 line (`PROXY TCP4 <src> <dst> <sport> <dport>`)
/// if the connection starts with one, removing it from `buf`. Returns the
/// client address it names; `None` when there is no such line or it says
/// `UNKNOWN`. Only called for connections from trusted proxies.
pub async fn read_proxy_line(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> Result<Option<std::net::SocketAddr>, HeadError> {
    const SIGNATURE: &[u8] = b"PROXY ";
    loop {
        let prefix = buf.len().min(SIGNATURE.len());
        if buf[..prefix] != SIGNATURE[..prefix] {
            return Ok(None);
        }
        if let Some(end) = buf.windows(2).position(|w| w == b"\r\n") {
            let address = parse_proxy_line(&buf[..end])?;
            buf.drain(..end + 2);
            return Ok(address);
        }
        if buf.len() >= MAX_PROXY_LINE {
            return Err(HeadError::Malformed);
        }

        if append(stream, buf, MAX_PROXY_LINE - buf.len()).await? == 0 {
            return Err(HeadError::Closed);
        }
    }
}

/// Parses the fields of a PROXY v1 line (without its CRLF).
pub fn parse_proxy_line(line: &[u8]) -> Result<Option<std::net::SocketAddr>, HeadError> {
    let text = std::str::from_utf8(line).map_err(|_| HeadError::Malformed)?;
    let fields: Vec<&str> = text.split(' ').collect();
    match fields.as_slice() {
        ["PROXY", "UNKNOWN", ..] => Ok(None),
        [
            "PROXY",
            "TCP4" | "TCP6",
            source,
            _destination,
            source_port,
            _destination_port,
        ] => {
            let ip: std::net::IpAddr = source.parse().map_err(|_| HeadError::Malformed)?;
            let port: u16 = source_port.parse().map_err(|_| HeadError::Malformed)?;
            Ok(Some(std::net::SocketAddr::new(ip, port)))
        }
        _ => Err(HeadError::Malformed),
    }
}

/// Reads once, appending what arrives to `buf` (an idle keep-alive
/// connection waiting for its next request).
pub async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<(), HeadError> {
    if append(stream, buf, 4096).await? == 0 {
        return Err(HeadError::Closed);
    }
    Ok(())
}

/// Reads until `buf` holds at least `total` bytes.
pub async fn read_to_len(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    total: usize,
) -> Result<(), HeadError> {
    while buf.len() < total {
        if append(stream, buf, total - buf.len()).await? == 0 {
            return Err(HeadError::Closed);
        }
    }
    Ok(())
}

/// Reads once, at most `want` bytes, onto the end of `buf`; returns how
/// many arrived (0: the peer closed).
async fn append(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    want: usize,
) -> Result<usize, HeadError> {
    let old_len = buf.len();
    buf.resize(old_len + want, 0);
    let read = stream.read(&mut buf[old_len..]).await;
    let n = *read.as_ref().unwrap_or(&0);
    buf.truncate(old_len + n);
    Ok(read?)
}

/// Writes all of `bytes`.
pub async fn write_all(stream: &mut TcpStream, bytes: &[u8]) -> io::Result<()> {
    stream.write_all(bytes).await
}

/// The reason phrase of the statuses this server sends.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// Appends a complete answer with a body to `out`.
pub fn write_response(
    out: &mut Vec<u8>,
    status: u16,
    extra_headers: &[(&str, &str)],
    content_type: &str,
    body: &[u8],
    keep_alive: bool,
) {
    use std::io::Write;

    // Writing into a Vec cannot fail.
    let _ = write!(
        out,
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n",
        reason_phrase(status),
        body.len()
    );
    for (name, value) in extra_headers {
        let _ = write!(out, "{name}: {value}\r\n");
    }
    if !keep_alive {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
}

/// A JSON error body: `{"error":"<code>","detail":"<detail>"}`. Both are
/// fixed strings of the server, never echoed input.
pub fn error_body(code: &str, detail: &str) -> Vec<u8> {
    serde_json::json!({ "error": code, "detail": detail })
        .to_string()
        .into_bytes()
}

/// Compares two secrets in time that depends only on their lengths, not on
/// where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= usize::from(x ^ y);
    }
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_end_found_across_reads() {
        let buf = b"GET / HTTP/1.1\r\nHost: x\r\n\r\nrest";
        assert_eq!(find_head_end(buf, 0), Some(27));
        // Searching from the middle of the terminator still finds it.
        assert_eq!(find_head_end(buf, 25), Some(27));
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\n", 0), None);
    }

    #[test]
    fn parses_path_query_and_headers() {
        let head = parse_head(
            b"GET /ws?token=abc HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, Upgrade\r\n\r\n",
            8,
        )
        .unwrap();
        assert_eq!(head.method, "GET");
        assert_eq!(head.path, "/ws");
        assert_eq!(head.query.as_deref(), Some("token=abc"));
        assert!(head.has_token("connection", "upgrade"));
        assert!(head.keep_alive());
        assert_eq!(head.header("host"), Some(&b"x"[..]));
    }

    #[test]
    fn too_many_headers_and_garbage() {
        let many = format!("GET / HTTP/1.1\r\n{}\r\n", "A: b\r\n".repeat(10));
        assert!(matches!(
            parse_head(many.as_bytes(), 4),
            Err(HeadError::TooManyHeaders)
        ));
        assert!(matches!(
            parse_head(b"\x00\x01 nonsense\r\n\r\n", 4),
            Err(HeadError::Malformed)
        ));
    }

    #[test]
    fn http10_closes_unless_asked() {
        let head = parse_head(b"GET / HTTP/1.0\r\n\r\n", 4).unwrap();
        assert!(!head.keep_alive());
        let head = parse_head(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n", 4).unwrap();
        assert!(!head.keep_alive());
    }

    #[test]
    fn proxy_v1_lines() {
        let addr = parse_proxy_line(b"PROXY TCP4 1.2.3.4 10.0.0.1 5555 80").unwrap();
        assert_eq!(addr, Some("1.2.3.4:5555".parse().unwrap()));
        let addr = parse_proxy_line(b"PROXY TCP6 ::2 ::1 1 2").unwrap();
        assert_eq!(addr, Some("[::2]:1".parse().unwrap()));
        assert_eq!(parse_proxy_line(b"PROXY UNKNOWN").unwrap(), None);
        assert!(parse_proxy_line(b"PROXY TCP4 nope 1.1.1.1 1 2").is_err());
        assert!(parse_proxy_line(b"PROXY TCP4 1.1.1.1").is_err());
    }

    #[test]
    fn constant_time_eq_agrees_with_eq() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(!constant_time_eq(b"", b"a"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn response_layout() {
        let mut out = Vec::new();
        write_response(&mut out, 404, &[("X-A", "1")], "text/plain", b"no", false);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 404 Not Found\r\n"));
        assert!(text.contains("Content-Length: 2\r\n"));
        assert!(text.contains("Connection: close\r\n"));
        assert!(text.ends_with("\r\n\r\nno"));
    }
}
