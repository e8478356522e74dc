//! What a connection's peer sends, handled on the shard: protocol v1 frames
//! on `/ws`, echoes on `/ws/echo`, the rate limit, and the connection's own
//! replies.

use std::ops::ControlFlow;
use std::time::Instant;

use serde_json::value::RawValue;

use super::connection::Ending;
use super::outbox::ConnectionHandle;
use super::protocol::{self, ClientFrame, Refusal};
use super::{Shard, bump};
use crate::ws::codec::OpCode;

impl Shard {
    /// One text message on `/ws`.
    pub fn on_text(&self, handle: &ConnectionHandle, text: &str) -> ControlFlow<Ending> {
        bump(&self.counters.messages_received, 1);
        if !self.charge(handle, Some(text))? {
            return ControlFlow::Continue(());
        }

        match protocol::parse(text, &handle.user, self.config.limits.max_json_depth) {
            Ok(ClientFrame::Send { id, data }) => {
                #[cfg(feature = "fault-injection")]
                if data.get() == super::FAULT_IN_CONNECTION {
                    panic!("injected fault while handling a frame");
                }
                self.client_send(handle, id, data)
            }
            Ok(ClientFrame::Ping { id }) => {
                let mut reply = self.reply_buf.borrow_mut();
                reply.clear();
                protocol::write_pong(&mut reply, id);
                self.reply_frame(handle, OpCode::Text, &reply)
            }
            Ok(ClientFrame::Refresh { id, token }) => self.refresh(handle, id, &token),
            Err(Refusal::BadMessage { id, detail }) => {
                bump(&self.counters.bad_messages, 1);
                self.reply_error(handle, "bad_message", id, detail)
            }
            Err(Refusal::Forbidden { id }) => {
                bump(&self.counters.forbidden, 1);
                crate::audit!(
                    event = "forbidden_user_id",
                    user = %handle.user,
                    conn = handle.id,
                    shard = self.index,
                    "frame named another user; refused"
                );
                self.reply_error(
                    handle,
                    "forbidden",
                    id,
                    "user_id does not match the connection",
                )
            }
        }
    }

    /// One binary message on `/ws`: not part of protocol v1.
    pub fn on_binary(&self, handle: &ConnectionHandle) -> ControlFlow<Ending> {
        bump(&self.counters.messages_received, 1);
        if !self.charge(handle, None)? {
            return ControlFlow::Continue(());
        }
        bump(&self.counters.bad_messages, 1);
        self.reply_error(
            handle,
            "bad_message",
            None,
            "binary frames are not accepted",
        )
    }

    /// One data message on `/ws/echo`: sent back unchanged.
    pub fn on_echo(
        &self,
        handle: &ConnectionHandle,
        opcode: OpCode,
        payload: &[u8],
    ) -> ControlFlow<Ending> {
        if !self.charge(handle, None)? {
            return ControlFlow::Continue(());
        }
        self.reply_frame(handle, opcode, payload)
    }

    /// Charges one message to the rate limit. `Continue(true)`: handle it;
    /// `Continue(false)`: dropped (the first drop in a window is answered
    /// with `rate_limited`); `Break`: the client ignores the limit (more
    /// than `abuse_limit` refusals without a second of calm), close with
    /// 1008.
    fn charge(&self, handle: &ConnectionHandle, text: Option<&str>) -> ControlFlow<Ending, bool> {
        if self.config.limits.rate_per_sec == 0 {
            return ControlFlow::Continue(true);
        }
        let now = Instant::now();
        let charged = if handle.echo {
            match handle.bucket.borrow_mut().as_mut() {
                Some(bucket) => bucket.take(now).map_err(|ms| (ms, false)),
                None => Ok(()),
            }
        } else {
            let mut users = self.users.borrow_mut();
            match users.get_mut(&*handle.user) {
                Some(manager) => manager
                    .charge(now)
                    .map_err(|limited| (limited.retry_after_ms, limited.notify)),
                None => Ok(()),
            }
        };
        // A client that keeps to the limit for a second is forgiven; one
        // that keeps pushing is counted even though each refill lets a
        // message through.
        let now_ms = self.now_ms();
        let (retry_after_ms, notify) = match charged {
            Ok(()) => {
                if now_ms.saturating_sub(handle.limited_at_ms.get()) >= 1000 {
                    handle.limited_streak.set(0);
                }
                return ControlFlow::Continue(true);
            }
            Err(limited) => limited,
        };

        bump(&self.counters.rate_limited, 1);
        let streak = handle.limited_streak.get() + 1;
        handle.limited_streak.set(streak);
        handle.limited_at_ms.set(now_ms);
        if streak > self.config.limits.abuse_limit {
            bump(&self.counters.abuse_closes, 1);
            crate::audit!(
                event = "rate_abuse",
                user = %handle.user,
                conn = handle.id,
                shard = self.index,
                refused_in_a_row = streak,
                "client ignores rate_limited; closing with 1008"
            );
            return ControlFlow::Break(Ending::Close(1008, "message rate limit exceeded"));
        }
        if notify {
            crate::audit!(
                event = "rate_limited",
                user = %handle.user,
                conn = handle.id,
                shard = self.index,
                retry_after_ms,
                "message rate limit reached"
            );
            let id = text.and_then(protocol::peek_id);
            let mut reply = self.reply_buf.borrow_mut();
            reply.clear();
            protocol::write_rate_limited(&mut reply, id, retry_after_ms);
            self.reply_frame(handle, OpCode::Text, &reply)?;
        }
        ControlFlow::Continue(false)
    }

    /// Queues one frame for the connection itself. A full outbox means the
    /// client does not read its replies: it is a slow consumer.
    pub fn reply_frame(
        &self,
        handle: &ConnectionHandle,
        opcode: OpCode,
        payload: &[u8],
    ) -> ControlFlow<Ending> {
        let pushed = handle
            .outbox
            .borrow_mut()
            .push(opcode, payload, self.outbox_limits());
        if pushed.is_err() {
            bump(&self.counters.slow_consumers, 1);
            crate::audit!(
                event = "slow_consumer",
                user = %handle.user,
                conn = handle.id,
                shard = self.index,
                "replies not read; closing with 4008"
            );
            return ControlFlow::Break(Ending::Close(4008, "slow consumer"));
        }
        ControlFlow::Continue(())
    }

    /// Queues an `error` frame for the connection itself.
    pub fn reply_error(
        &self,
        handle: &ConnectionHandle,
        code: &str,
        id: Option<&RawValue>,
        detail: &str,
    ) -> ControlFlow<Ending> {
        let mut reply = self.reply_buf.borrow_mut();
        reply.clear();
        protocol::write_error(&mut reply, code, id, detail);
        self.reply_frame(handle, OpCode::Text, &reply)
    }

    /// A client `send`: deliver to the user's other connections, ack.
    fn client_send(
        &self,
        handle: &ConnectionHandle,
        id: &RawValue,
        data: &RawValue,
    ) -> ControlFlow<Ending> {
        if self.draining.get() {
            return self.reply_error(handle, "unavailable", Some(id), "server shutting down");
        }
        let delivery = {
            let mut users = self.users.borrow_mut();
            let Some(manager) = users.get_mut(&*handle.user) else {
                // Only a connection already on its way out has no manager.
                return ControlFlow::Continue(());
            };
            let mut encode = self.encode_buf.borrow_mut();
            manager.send_from(handle, data, self.outbox_limits(), &mut encode)
        };
        let Ok(delivery) = delivery else {
            bump(&self.counters.isolation_violations, 1);
            return ControlFlow::Break(Ending::Close(1011, "internal error"));
        };
        bump(&self.counters.messages_delivered, delivery.delivered as u64);
        bump(
            &self.counters.slow_consumers,
            delivery.slow_consumers as u64,
        );

        let mut reply = self.reply_buf.borrow_mut();
        reply.clear();
        protocol::write_ack(&mut reply, id, delivery.epoch, delivery.seq);
        self.reply_frame(handle, OpCode::Text, &reply)
    }

    /// `refresh`: a valid, unrevoked token for the same user replaces the
    /// expiry; anything else closes the connection with 4001.
    fn refresh(
        &self,
        handle: &ConnectionHandle,
        id: &RawValue,
        token: &str,
    ) -> ControlFlow<Ending> {
        let claims = match self.verifier.verify(token) {
            Ok(claims) => claims,
            Err(err) => {
                crate::audit!(
                    event = "refresh_refused",
                    reason = err.reason(),
                    user = %handle.user,
                    conn = handle.id,
                    "refresh token refused; closing with 4001"
                );
                return ControlFlow::Break(Ending::Close(4001, "refresh refused"));
            }
        };
        if claims.sub.as_bytes() != handle.user.as_bytes() {
            crate::audit!(
                event = "identity_mismatch",
                user = %handle.user,
                token_user = %claims.sub,
                conn = handle.id,
                "refresh token names another user; closing with 4001"
            );
            return ControlFlow::Break(Ending::Close(4001, "refresh refused"));
        }
        if self.is_revoked(&handle.user, claims.iat) {
            crate::audit!(
                event = "refresh_revoked",
                user = %handle.user,
                conn = handle.id,
                "refresh with a revoked token; closing with 4001"
            );
            return ControlFlow::Break(Ending::Close(4001, "refresh refused"));
        }

        handle.expires_at.set(claims.exp);
        handle.issued_at.set(claims.iat);
        let mut reply = self.reply_buf.borrow_mut();
        reply.clear();
        protocol::write_refreshed(&mut reply, id, claims.exp);
        self.reply_frame(handle, OpCode::Text, &reply)
    }
}
