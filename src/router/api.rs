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

#[derive(Clone, Copy)]
enum Operation {
    Publish,
    Presence,
    Disconnect,
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
            tracing::warn!(
                target: "audit",
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
        let Some(length) = head.header("content-length") else {
            return ApiAnswer::error(411, "length_required", "Content-Length is required");
        };
        let length = match std::str::from_utf8(length)
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
        {
            Some(length) => length,
            None => return ApiAnswer::error(400, "bad_request", "invalid Content-Length"),
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
        let wait = async { replies.recv().await.ok_or(HeadError::Closed) };
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
            CommandReply::Disconnected { closed } => serde_json::json!({ "closed": closed }),
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

    #[test]
    fn bearer_credentials() {
        assert_eq!(bearer(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer(b"bearer  abc "), Some(&b"abc"[..]));
        assert_eq!(bearer(b"Basic abc"), None);
        assert_eq!(bearer(b"Bearer"), None);
    }
}
