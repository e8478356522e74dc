//! The backend HTTP API: `POST /api/v1/{publish,presence,disconnect}`.
//!
//! The router authenticates the request, validates its body, and forwards a
//! command to the shard that owns the user; the shard's reply becomes the
//! answer. The router itself keeps nothing about users.

use std::time::Instant;

use glommio::net::TcpStream;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::Router;
use crate::config::check_user_id;
use crate::http::{self, HeadError, RequestHead};
use crate::mailbox;
use crate::placement;
use crate::shard::message::{Command, CommandReply, ShardMessage};

/// An API answer, ready to write.
pub(super) struct ApiAnswer {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
    /// Close the connection afterwards (the body was not read).
    pub close: bool,
    /// Bytes of `buf` this request used (head and body).
    pub consumed: usize,
}

impl ApiAnswer {
    fn error(status: u16, code: &str, detail: &str) -> Self {
        ApiAnswer {
            status,
            headers: Vec::new(),
            body: http::error_body(code, detail),
            close: false,
            consumed: 0,
        }
    }

    fn closing(mut self) -> Self {
        self.close = true;
        self
    }

    fn with_header(mut self, name: &'static str, value: &str) -> Self {
        self.headers.push((name, value.to_owned()));
        self
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishBody {
    user: String,
    data: Box<RawValue>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UserBody {
    user: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeBody {
    user: String,
    issued_before: u64,
}

#[derive(Clone, Copy)]
enum Operation {
    Publish,
    Presence,
    Disconnect,
    Revoke,
}

impl Router {
    pub(super) async fn api(
        &self,
        stream: &mut TcpStream,
        head: &RequestHead,
        buf: &mut Vec<u8>,
        head_len: usize,
        deadline: Instant,
    ) -> ApiAnswer {
        let mut answer = self.api_inner(stream, head, buf, head_len, deadline).await;
        if answer.consumed == 0 {
            // The body (if any) was not read: the connection cannot go on.
            answer.close = true;
        }
        answer
    }

    async fn api_inner(
        &self,
        stream: &mut TcpStream,
        head: &RequestHead,
        buf: &mut Vec<u8>,
        head_len: usize,
        deadline: Instant,
    ) -> ApiAnswer {
        let Some(api_key) = self.config.api_key.as_deref() else {
            return ApiAnswer::error(404, "not_found", "the API is not enabled");
        };
        let operation = match head.path.as_str() {
            "/api/v1/publish" => Operation::Publish,
            "/api/v1/presence" => Operation::Presence,
            "/api/v1/disconnect" => Operation::Disconnect,
            "/api/v1/revoke" => Operation::Revoke,
            _ => return ApiAnswer::error(404, "not_found", "no such API route"),
        };
        if head.method != "POST" {
            return ApiAnswer::error(405, "method_not_allowed", "use POST")
                .with_header("Allow", "POST");
        }

        // The key, compared in constant time.
        let presented = head.header("authorization").and_then(bearer);
        let authorized =
            presented.is_some_and(|key| http::constant_time_eq(key, api_key.as_bytes()));
        if !authorized {
            self.counters.refuse("api_key_refused");
            crate::audit!(
                event = "api_key_refused",
                presented = presented.is_some(),
                "API request with a missing or wrong key"
            );
            let challenge = if presented.is_some() {
                "Bearer error=\"invalid_token\""
            } else {
                "Bearer"
            };
            return ApiAnswer::error(401, "unauthorized", "missing or wrong API key")
                .with_header("WWW-Authenticate", challenge);
        }

        // The body: Content-Length only, bounded.
        if head.header("transfer-encoding").is_some() {
            return ApiAnswer::error(411, "length_required", "chunked bodies are not accepted")
                .closing();
        }
        let length = match content_length(head) {
            Ok(Some(length)) => length,
            Ok(None) => {
                return ApiAnswer::error(411, "length_required", "Content-Length is required");
            }
            Err(()) => {
                // RFC 9112 §6.3: an invalid or conflicting length makes the
                // message boundary unknowable; answer 400 and close.
                return ApiAnswer::error(400, "bad_request", "invalid Content-Length").closing();
            }
        };
        if length > self.config.limits.max_api_body {
            self.counters.refuse("api_body_too_large");
            return ApiAnswer::error(413, "too_large", "request body larger than the limit");
        }
        let total = head_len + length;
        let read = http::before(
            deadline.max(Instant::now() + self.config.limits.handshake_timeout),
            http::read_to_len(stream, buf, total),
        )
        .await;
        if read.is_err() {
            return ApiAnswer::error(400, "bad_request", "request body incomplete");
        }
        let body = &buf[head_len..total];

        let mut answer = self.api_command(operation, body).await;
        answer.consumed = total;
        answer
    }

    async fn api_command(&self, operation: Operation, body: &[u8]) -> ApiAnswer {
        let (user, command) = match operation {
            Operation::Publish => match serde_json::from_slice::<PublishBody>(body) {
                Ok(PublishBody { user, data }) => (user.clone(), Command::Publish { user, data }),
                Err(_) => return bad_body("expected {\"user\":string,\"data\":any}"),
            },
            Operation::Revoke => match serde_json::from_slice::<RevokeBody>(body) {
                Ok(RevokeBody {
                    user,
                    issued_before,
                }) => (
                    user.clone(),
                    Command::Revoke {
                        user,
                        issued_before,
                    },
                ),
                Err(_) => return bad_body("expected {\"user\":string,\"issued_before\":seconds}"),
            },
            Operation::Presence | Operation::Disconnect => {
                let Ok(UserBody { user }) = serde_json::from_slice::<UserBody>(body) else {
                    return bad_body("expected {\"user\":string}");
                };
                let command = match operation {
                    Operation::Presence => Command::Presence { user: user.clone() },
                    _ => Command::Disconnect { user: user.clone() },
                };
                (user, command)
            }
        };
        if let Err(detail) = check_user_id(&user) {
            return bad_body(detail);
        }

        if self.draining.load(std::sync::atomic::Ordering::Relaxed) {
            return ApiAnswer::error(503, "unavailable", "server shutting down")
                .with_header("Retry-After", "5");
        }

        // Forward to the owning shard and wait for its reply.
        let shard = placement::shard_for(&user, self.shards.len());
        let (reply, replies) = mailbox::mailbox(1);
        if self.shards[shard]
            .try_send(ShardMessage::Command { command, reply })
            .is_err()
        {
            return ApiAnswer::error(503, "overloaded", "shard busy; retry")
                .with_header("Retry-After", "1");
        }
        let deadline = Instant::now() + self.config.limits.shard_reply_timeout;
        let recheck = self.config.limits.mailbox_recheck;
        let wait = async {
            replies
                .recv_rechecking(recheck)
                .await
                .ok_or(HeadError::Closed)
        };
        let reply = match http::before(deadline, wait).await {
            Ok(reply) => reply,
            Err(_) => {
                return ApiAnswer::error(503, "overloaded", "shard did not answer in time")
                    .with_header("Retry-After", "1");
            }
        };

        let body = match reply {
            CommandReply::Published {
                delivered,
                sequence: Some((epoch, seq)),
            } => {
                serde_json::json!({ "delivered": delivered, "epoch": epoch, "seq": seq })
            }
            CommandReply::Published {
                delivered,
                sequence: None,
            } => {
                serde_json::json!({ "delivered": delivered })
            }
            CommandReply::Presence { connections } => {
                serde_json::json!({ "user": user, "connections": connections, "shard": shard })
            }
            CommandReply::Disconnected { closed } | CommandReply::Revoked { closed } => {
                serde_json::json!({ "closed": closed })
            }
            CommandReply::Failed => {
                return ApiAnswer::error(500, "internal", "the command failed on its shard");
            }
            CommandReply::Unavailable => {
                return ApiAnswer::error(503, "unavailable", "server shutting down")
                    .with_header("Retry-After", "5");
            }
        };
        ApiAnswer {
            status: 200,
            headers: Vec::new(),
            body: body.to_string().into_bytes(),
            close: false,
            consumed: 0,
        }
    }
}

/// The body length: every `Content-Length` value must be digits only and
/// all must agree (RFC 9112 §6.3). `Ok(None)` when there is none.
fn content_length(head: &RequestHead) -> Result<Option<usize>, ()> {
    let mut length = None;
    for value in head.all("content-length") {
        for item in value.split(|&b| b == b',') {
            let item = item.trim_ascii();
            if item.is_empty() || !item.iter().all(u8::is_ascii_digit) {
                return Err(());
            }
            let parsed: usize = std::str::from_utf8(item)
                .ok()
                .and_then(|text| text.parse().ok())
                .ok_or(())?;
            if length.is_some_and(|known| known != parsed) {
                return Err(());
            }
            length = Some(parsed);
        }
    }
    Ok(length)
}

fn bad_body(detail: &str) -> ApiAnswer {
    ApiAnswer::error(400, "bad_request", detail)
}

/// The credentials of an `Authorization: Bearer <x>` header (RFC 6750 §2.1).
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let value = value.trim_ascii();
    let (scheme, rest) = value.split_at(value.iter().position(|&b| b == b' ')?);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    Some(rest.trim_ascii())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> RequestHead {
        crate::http::parse_head(text.as_bytes(), 16).unwrap()
    }

    #[test]
    fn content_length_must_be_one_plain_number() {
        let ok = head("POST / HTTP/1.1\r\nContent-Length: 12\r\n\r\n");
        assert_eq!(content_length(&ok), Ok(Some(12)));
        let same = head("POST / HTTP/1.1\r\nContent-Length: 12\r\nContent-Length: 12, 12\r\n\r\n");
        assert_eq!(content_length(&same), Ok(Some(12)));
        for bad in ["+12", "12, 22", "0x1", "", "1 2", "99999999999999999999999"] {
            let text = format!("POST / HTTP/1.1\r\nContent-Length: {bad}\r\n\r\n");
            assert_eq!(content_length(&head(&text)), Err(()), "{bad}");
        }
        let none = head("POST / HTTP/1.1\r\n\r\n");
        assert_eq!(content_length(&none), Ok(None));
    }

    #[test]
    fn bearer_credentials() {
        assert_eq!(bearer(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer(b"bearer  abc "), Some(&b"abc"[..]));
        assert_eq!(bearer(b"Basic abc"), None);
        assert_eq!(bearer(b"Bearer"), None);
    }
}
