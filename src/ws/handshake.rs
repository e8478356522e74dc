//! The server side of the opening handshake (RFC 6455 §4.2).
//!
//! The router checks the client's request with [`check_upgrade`]; the owning
//! shard writes the 101 answer with [`write_switching_protocols`], so that a
//! refusal decided on the shard (user or shard full) can still be an HTTP
//! status.

use crate::http::RequestHead;

/// Why an upgrade request is malformed (answered 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UpgradeError {
    #[error("upgrade must be a GET over HTTP/1.1")]
    NotGet,
    #[error("missing Host header")]
    NoHost,
    #[error("Upgrade header does not name websocket")]
    NoUpgrade,
    #[error("Connection header does not name upgrade")]
    NoConnectionUpgrade,
    #[error("unsupported Sec-WebSocket-Version")]
    BadVersion,
    #[error("missing or malformed Sec-WebSocket-Key")]
    BadKey,
}

impl UpgradeError {
    pub fn reason(&self) -> &'static str {
        match self {
            UpgradeError::NotGet => "not_get",
            UpgradeError::NoHost => "no_host",
            UpgradeError::NoUpgrade => "no_upgrade_header",
            UpgradeError::NoConnectionUpgrade => "no_connection_upgrade",
            UpgradeError::BadVersion => "bad_version",
            UpgradeError::BadKey => "bad_key",
        }
    }
}

/// Checks the handshake fields of an upgrade request and returns the value of
/// `Sec-WebSocket-Accept` for the answer.
pub fn check_upgrade(head: &RequestHead) -> Result<String, UpgradeError> {
    // §4.2.1 item 1: a GET over HTTP/1.1 or higher.
    if head.method != "GET" || head.minor_version < 1 {
        return Err(UpgradeError::NotGet);
    }
    // §4.2.1 item 2: a Host header.
    if head.header("host").is_none() {
        return Err(UpgradeError::NoHost);
    }
    // §4.2.1 items 3 and 4: Upgrade: websocket, Connection: Upgrade (tokens,
    // case-insensitive).
    if !head.has_token("upgrade", "websocket") {
        return Err(UpgradeError::NoUpgrade);
    }
    if !head.has_token("connection", "upgrade") {
        return Err(UpgradeError::NoConnectionUpgrade);
    }
    // §4.2.1 item 6: version 13; §4.4 says to answer with the versions we
    // speak, which the router adds to the 400.
    if head.header("sec-websocket-version").map(<[u8]>::trim_ascii) != Some(b"13") {
        return Err(UpgradeError::BadVersion);
    }
    // §4.2.1 item 5: a key that base64-decodes to 16 bytes, i.e. 22
    // base64 characters and "==".
    let key = head
        .header("sec-websocket-key")
        .map(<[u8]>::trim_ascii)
        .ok_or(UpgradeError::BadKey)?;
    if !is_nonce(key) {
        return Err(UpgradeError::BadKey);
    }
    Ok(tungstenite::handshake::derive_accept_key(key))
}

fn is_nonce(key: &[u8]) -> bool {
    key.len() == 24
        && key.ends_with(b"==")
        && key[..22]
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
}

/// Appends the 101 answer (§4.2.2 item 5).
pub fn write_switching_protocols(out: &mut Vec<u8>, accept_key: &str, subprotocol: Option<&str>) {
    out.extend_from_slice(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n",
    );
    out.extend_from_slice(b"Sec-WebSocket-Accept: ");
    out.extend_from_slice(accept_key.as_bytes());
    out.extend_from_slice(b"\r\n");
    if let Some(protocol) = subprotocol {
        out.extend_from_slice(b"Sec-WebSocket-Protocol: ");
        out.extend_from_slice(protocol.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::parse_head;

    fn head(extra: &str) -> RequestHead {
        let text = format!("GET /ws HTTP/1.1\r\nHost: x\r\n{extra}\r\n");
        parse_head(text.as_bytes(), 32).unwrap()
    }

    const GOOD: &str = "Upgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\
        Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";

    #[test]
    fn rfc_example_key() {
        // The example of RFC 6455 §1.3.
        assert_eq!(
            check_upgrade(&head(GOOD)).unwrap(),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn refusals() {
        let cases = [
            (GOOD.replace("websocket", "h2c"), UpgradeError::NoUpgrade),
            (
                GOOD.replace("keep-alive, Upgrade", "keep-alive"),
                UpgradeError::NoConnectionUpgrade,
            ),
            (
                GOOD.replace("Version: 13", "Version: 8"),
                UpgradeError::BadVersion,
            ),
            (
                GOOD.replace("dGhlIHNhbXBsZSBub25jZQ==", "short"),
                UpgradeError::BadKey,
            ),
        ];
        for (extra, expected) in cases {
            assert_eq!(check_upgrade(&head(&extra)), Err(expected));
        }
        let no_host = parse_head(format!("GET /ws HTTP/1.1\r\n{GOOD}\r\n").as_bytes(), 32);
        assert_eq!(check_upgrade(&no_host.unwrap()), Err(UpgradeError::NoHost));
    }

    #[test]
    fn answer_layout() {
        let mut out = Vec::new();
        write_switching_protocols(&mut out, "abc", Some("shardgate.v1"));
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 101 Switching Protocols\r\n"));
        assert!(text.contains("Sec-WebSocket-Protocol: shardgate.v1\r\n"));
        assert!(text.ends_with("\r\n\r\n"));
    }
}
