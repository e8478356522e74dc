//! The router's half of a WebSocket upgrade: check the request, verify the
//! token, pick the shard, hand the socket over.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Instant;

use crossbeam_channel::TrySendError;
use glommio::net::TcpStream;

use super::Router;
use crate::auth::{self, CarrierError};
use crate::http::{self, RequestHead};
use crate::placement;
use crate::shard::message::{Endpoint, Handoff, ShardMessage};
use crate::ws::handshake::{self, UpgradeError};

/// An upgrade request as read by the router.
pub struct Upgrade {
    pub head: RequestHead,
    /// Bytes after the head: frames the client sent before the 101.
    pub early: Vec<u8>,
    pub peer: SocketAddr,
    pub accepted_at: Instant,
    pub deadline: Instant,
    pub endpoint: Endpoint,
}

impl Router {
    /// Hands the socket to its shard or answers the refusal. Either way the
    /// router is done with the connection afterwards.
    pub(super) async fn upgrade(&self, stream: &mut TcpStream, request: Upgrade) {
        let head = &request.head;
        let peer = request.peer;

        // RFC 6455 §4.2.1: the handshake fields.
        let accept_key = match handshake::check_upgrade(head) {
            Ok(key) => key,
            Err(err) => {
                self.counters.refuse(err.reason());
                tracing::debug!(peer = %peer, reason = err.reason(), "bad upgrade request");
                let mut extra = Vec::new();
                if err == UpgradeError::BadVersion {
                    // §4.4: tell the client which version we speak.
                    extra.push(("Sec-WebSocket-Version", "13"));
                }
                return answer(stream, 400, &extra, &err.to_string()).await;
            }
        };

        // Cross-site WebSocket hijacking: a browser always sends Origin, so a
        // listed set of origins keeps other sites' pages out.
        if let Some(allowed) = &self.config.allowed_origins
            && let Some(origin) = head.header("origin")
            && !allowed
                .iter()
                .any(|a| a.as_bytes().eq_ignore_ascii_case(origin.trim_ascii()))
        {
            self.counters.refuse("origin_not_allowed");
            crate::audit!(
                event = "origin_refused",
                peer = %peer,
                origin = %String::from_utf8_lossy(origin),
                "upgrade from an origin not allowed; answered 403"
            );
            return answer(stream, 403, &[], "origin not allowed").await;
        }

        // The token, from exactly one carrier (design: header, query, or
        // a subprotocol entry offered with shardgate.v1).
        let authorization = head.all("authorization");
        let protocols = head.all("sec-websocket-protocol");
        let presented = match auth::extract_token(&authorization, &protocols, head.query.as_deref())
        {
            Ok(presented) => presented,
            Err(err) => {
                self.counters.refuse(err.reason());
                crate::audit!(
                event = "upgrade_refused",
                    reason = err.reason(),
                    peer = %peer,
                    "no usable token carrier"
                );
                return match err {
                    // RFC 6750 §3.1: no error attribute when no token was
                    // presented.
                    CarrierError::NoToken => {
                        answer(
                            stream,
                            401,
                            &[("WWW-Authenticate", "Bearer")],
                            "token required",
                        )
                        .await
                    }
                    _ => answer(stream, 400, &[], &err.to_string()).await,
                };
            }
        };
        // An address that keeps presenting bad tokens is refused before its
        // signature is checked, so it cannot monopolise the router.
        if !self.peers.may_verify(peer.ip(), &self.config.limits) {
            self.counters.refuse("refusal_budget_spent");
            crate::audit!(
                event = "refusal_budget_spent",
                peer = %peer,
                "too many refused tokens from this address; answered 503 unverified"
            );
            return answer(
                stream,
                503,
                &[("Retry-After", "1")],
                "too many refused tokens",
            )
            .await;
        }
        let claims = match self.verifier.verify(&presented.token) {
            Ok(claims) => claims,
            Err(err) => {
                self.peers.refused(peer.ip(), &self.config.limits);
                self.counters.refuse(err.reason());
                crate::audit!(
                event = "token_refused",
                    reason = err.reason(),
                    carrier = ?presented.carrier,
                    peer = %peer,
                    "upgrade refused"
                );
                let challenge = "Bearer error=\"invalid_token\"";
                return answer(
                    stream,
                    401,
                    &[("WWW-Authenticate", challenge)],
                    "invalid token",
                )
                .await;
            }
        };

        // Hand a duplicate of the descriptor to the shard: dropping the
        // router's glommio stream closes the original.
        let Some(socket) = duplicate(stream) else {
            self.counters.refuse("dup_failed");
            return answer(stream, 503, &[("Retry-After", "1")], "overloaded").await;
        };
        let shard = placement::shard_for(&claims.sub, self.shards.len());
        let handoff = Handoff {
            socket,
            peer,
            endpoint: request.endpoint,
            accept_key,
            subprotocol: auth::selected_subprotocol(&protocols),
            claims,
            early_bytes: request.early,
            accepted_at: request.accepted_at,
            deadline: request.deadline,
        };
        match self.shards[shard].try_send(ShardMessage::Upgrade(Box::new(handoff))) {
            Ok(()) => {
                self.counters
                    .handed_off
                    .set(self.counters.handed_off.get() + 1);
            }
            Err(TrySendError::Full(message)) | Err(TrySendError::Disconnected(message)) => {
                // Close the duplicate before answering on the original.
                drop(message);
                self.counters.refuse("shard_mailbox_full");
                tracing::warn!(shard, peer = %peer, "shard mailbox full; answered 503");
                answer(stream, 503, &[("Retry-After", "1")], "overloaded").await;
            }
        }
    }
}

/// Writes a refusal and lets the caller close the connection.
async fn answer(stream: &mut TcpStream, status: u16, headers: &[(&str, &str)], body: &str) {
    let mut out = Vec::new();
    let mut body = body.to_owned();
    body.push('\n');
    http::write_response(
        &mut out,
        status,
        headers,
        "text/plain",
        body.as_bytes(),
        false,
    );
    let _ = http::write_all(stream, &out).await;
}

/// A new descriptor for the same socket, close-on-exec.
fn duplicate(stream: &TcpStream) -> Option<OwnedFd> {
    // SAFETY: fcntl(F_DUPFD_CLOEXEC) on a descriptor the stream keeps open
    // returns a fresh descriptor (or -1) that nobody else owns.
    let fd = unsafe { libc::fcntl(stream.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` was just created above and is owned by nothing else.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}
