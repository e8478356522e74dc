//! The shard's answers to the router: backend commands and counters.

use super::message::{Command, CommandReply, ShardStats};
use super::user::UserManager;
use super::{LATENCY_BUCKETS_US, Revocation, Shard, bump};
use crate::auth;

impl Shard {
    /// A backend command for one user of this shard.
    pub(super) fn command(&self, command: Command) -> CommandReply {
        if self.draining.get() {
            return CommandReply::Unavailable;
        }
        let mut users = self.users.borrow_mut();
        match command {
            Command::Publish { user, data } => {
                let Some(manager) = users.get_mut(user.as_str()) else {
                    return CommandReply::Published {
                        delivered: 0,
                        sequence: None,
                    };
                };
                let mut encode = self.encode_buf.borrow_mut();
                let delivery = manager.publish(&data, self.outbox_limits(), &mut encode);
                bump(&self.counters.messages_delivered, delivery.delivered as u64);
                bump(
                    &self.counters.slow_consumers,
                    delivery.slow_consumers as u64,
                );
                CommandReply::Published {
                    delivered: delivery.delivered,
                    sequence: Some((delivery.epoch, delivery.seq)),
                }
            }
            Command::Presence { user } => CommandReply::Presence {
                connections: users.get(user.as_str()).map_or(0, UserManager::len),
            },
            Command::Disconnect { user } => {
                let closed = match users.remove(user.as_str()) {
                    Some(mut manager) => manager.close_all(4003, "disconnected by the server"),
                    None => 0,
                };
                if closed > 0 {
                    tracing::info!(
                        shard = self.index,
                        user,
                        closed,
                        "user disconnected by the API"
                    );
                }
                CommandReply::Disconnected { closed }
            }
            Command::Revoke {
                user,
                issued_before,
            } => {
                drop(users);
                let closed = self.revoke(&user, issued_before);
                CommandReply::Revoked { closed }
            }
        }
    }

    /// Records a revocation and closes the user's connections it covers.
    fn revoke(&self, user: &str, issued_before: u64) -> usize {
        let retention = self.config.limits.revocation_retention.as_secs();
        let keep_until = auth::now_secs().saturating_add(retention);
        {
            let mut revocations = self.revocations.borrow_mut();
            let entry = revocations.entry(user.into()).or_insert(Revocation {
                issued_before,
                keep_until,
            });
            entry.issued_before = entry.issued_before.max(issued_before);
            entry.keep_until = entry.keep_until.max(keep_until);
        }

        let mut users = self.users.borrow_mut();
        let Some(manager) = users.get_mut(user) else {
            return 0;
        };
        let covered: Vec<_> = manager
            .connections()
            .iter()
            .filter(|conn| conn.issued_at.get().unwrap_or(0) < issued_before)
            .cloned()
            .collect();
        for conn in &covered {
            if manager.detach(conn).is_ok() {
                conn.request_close(4003, "token revoked");
            }
        }
        if manager.is_empty() {
            users.remove(user);
        }
        crate::audit!(
            event = "revocation",
            shard = self.index,
            user,
            issued_before,
            closed = covered.len(),
            "tokens revoked by the API"
        );
        covered.len()
    }

    /// Whether a token of `user` issued at `issued_at` has been revoked. A
    /// token without `iat` counts as issued before any revocation.
    pub(super) fn is_revoked(&self, user: &str, issued_at: Option<u64>) -> bool {
        self.revocations
            .borrow()
            .get(user)
            .is_some_and(|r| issued_at.unwrap_or(0) < r.issued_before)
    }

    pub(super) fn stats(&self) -> ShardStats {
        let users = self.users.borrow();
        let counters = &self.counters;
        let mut cumulative = 0;
        let handoff_latency_us = LATENCY_BUCKETS_US
            .iter()
            .zip(&counters.handoff_latency)
            .map(|(&bound, count)| {
                cumulative += count.get();
                (bound, cumulative)
            })
            .collect();
        let queued_messages = self
            .connections
            .borrow()
            .values()
            .map(|conn| conn.outbox.borrow().frames)
            .sum();
        ShardStats {
            shard: self.index,
            users: users.len(),
            connections: self.protocol_connections.get(),
            echo_connections: self.echo_connections.get(),
            queued_messages,
            handoffs: counters.handoffs.get(),
            messages_received: counters.messages_received.get(),
            messages_delivered: counters.messages_delivered.get(),
            refused_user_cap: counters.refused_user_cap.get(),
            refused_shard_cap: counters.refused_shard_cap.get(),
            refused_late: counters.refused_late.get(),
            refused_revoked: counters.refused_revoked.get(),
            refused_draining: counters.refused_draining.get(),
            protocol_errors: counters.protocol_errors.get(),
            bad_messages: counters.bad_messages.get(),
            forbidden: counters.forbidden.get(),
            rate_limited: counters.rate_limited.get(),
            abuse_closes: counters.abuse_closes.get(),
            slow_consumers: counters.slow_consumers.get(),
            pong_timeouts: counters.pong_timeouts.get(),
            expired: counters.expired.get(),
            panics: counters.panics.get(),
            isolation_violations: counters.isolation_violations.get(),
            handoff_latency_us,
            handoff_latency_sum_us: counters.handoff_latency_sum_us.get(),
        }
    }
}
