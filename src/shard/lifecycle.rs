//! The shard's own clockwork: the periodic sweep (token expiry, heartbeats,
//! old revocations), shutdown, and recovery after a panic.

use std::rc::Rc;
use std::time::{Duration, Instant};

use super::outbox::ConnectionHandle;
use super::{Shard, bump};
use crate::auth;
use crate::ws::codec::OpCode;

impl Shard {
    /// How often the sweep runs: often enough for the heartbeat settings,
    /// at most once a second.
    fn sweep_interval(&self) -> Duration {
        let limits = &self.config.limits;
        let quarter = limits.ping_interval.min(limits.pong_timeout) / 4;
        quarter.clamp(Duration::from_millis(10), Duration::from_secs(1))
    }

    /// Runs the sweep forever.
    pub(super) async fn housekeeping(self: Rc<Self>) {
        let interval = self.sweep_interval();
        loop {
            glommio::timer::sleep(interval).await;
            let swept = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.sweep()));
            if swept.is_err() {
                bump(&self.counters.panics, 1);
                tracing::error!(shard = self.index, "panic in the periodic sweep");
            }
        }
    }

    /// Closes connections whose token expired (4001), pings quiet ones,
    /// drops those whose ping went unanswered, and forgets old revocations.
    fn sweep(&self) {
        let limits = &self.config.limits;
        let now_secs = auth::now_secs();
        let now_ms = self.now_ms();
        let ping_after = limits.ping_interval.as_millis() as u64;
        let dead_after = limits.pong_timeout.as_millis() as u64;

        let connections: Vec<Rc<ConnectionHandle>> =
            self.connections.borrow().values().cloned().collect();
        for conn in connections {
            if !conn.echo && conn.expires_at.get().saturating_add(limits.jwt_leeway_secs) < now_secs
            {
                bump(&self.counters.expired, 1);
                tracing::debug!(
                    user = %conn.user,
                    conn = conn.id,
                    "token expired; closing with 4001"
                );
                self.forget(&conn);
                conn.request_close(4001, "token expired");
                continue;
            }
            match conn.ping_sent_ms.get() {
                Some(sent) if now_ms.saturating_sub(sent) > dead_after => {
                    bump(&self.counters.pong_timeouts, 1);
                    tracing::debug!(user = %conn.user, conn = conn.id, "no pong; dropping");
                    self.forget(&conn);
                    conn.abort();
                }
                Some(_) => {}
                None if now_ms.saturating_sub(conn.last_seen_ms.get()) >= ping_after => {
                    conn.ping_sent_ms.set(Some(now_ms));
                    let mut outbox = conn.outbox.borrow_mut();
                    // A full outbox means a slow consumer, which its own
                    // rule closes; the missing pong then drops it anyway.
                    if outbox.push(OpCode::Ping, b"", self.outbox_limits()).is_ok() {
                        outbox.wake();
                    }
                }
                None => {}
            }
        }

        self.revocations
            .borrow_mut()
            .retain(|_, revocation| revocation.keep_until > now_secs);
    }

    /// Starts the shutdown sequence once.
    pub(super) fn begin_shutdown(self: &Rc<Self>) {
        if self.draining.replace(true) {
            return;
        }
        tracing::info!(shard = self.index, "draining");
        let shard = self.clone();
        let task = glommio::spawn_local_into(shard.shutdown(), self.connection_queue);
        if let Err(err) = task.map(|task| task.detach()) {
            tracing::error!(shard = self.index, cause = %err, "cannot start shutdown");
        }
    }

    /// Lets queued messages drain up to the drain timeout, closes every
    /// connection with 1001 (RFC 6455 §7.4.1: going away), waits out the
    /// close timeout, then lets the executor end.
    async fn shutdown(self: Rc<Self>) {
        let limits = &self.config.limits;
        let step = Duration::from_millis(10);

        // What is queued now is what the drain owes: replies to frames that
        // keep arriving (refused sends, pongs) do not stretch it.
        let owed: Vec<(Rc<ConnectionHandle>, u64)> = self
            .connections
            .borrow()
            .values()
            .map(|conn| {
                let outbox = conn.outbox.borrow();
                (conn.clone(), outbox.written + outbox.buf.len() as u64)
            })
            .collect();
        let drain_deadline = Instant::now() + limits.drain_timeout;
        while Instant::now() < drain_deadline && self.still_owed(&owed) {
            glommio::timer::sleep(step).await;
        }
        drop(owed);

        let connections: Vec<Rc<ConnectionHandle>> =
            self.connections.borrow().values().cloned().collect();
        for conn in &connections {
            self.forget(conn);
            conn.request_close(1001, "server shutting down");
        }

        let close_deadline = Instant::now() + limits.close_timeout + Duration::from_millis(200);
        while Instant::now() < close_deadline && !self.connections.borrow().is_empty() {
            glommio::timer::sleep(step).await;
        }
        let stragglers: Vec<Rc<ConnectionHandle>> =
            self.connections.borrow().values().cloned().collect();
        for conn in &stragglers {
            conn.abort();
        }
        if !stragglers.is_empty() {
            glommio::timer::sleep(step).await;
        }

        tracing::info!(shard = self.index, "all connections closed");
        let finished = self.finished.borrow_mut().take();
        if let Some(finished) = finished {
            let _ = finished.try_send(());
        }
    }

    /// Whether a connection still open has not yet written all it owes.
    fn still_owed(&self, owed: &[(Rc<ConnectionHandle>, u64)]) -> bool {
        let open = self.connections.borrow();
        owed.iter()
            .any(|(conn, upto)| open.contains_key(&conn.id) && conn.outbox.borrow().written < *upto)
    }

    /// After a panic while handling `handle`'s input: if the user's manager
    /// was half-way through a change, close all of the user's connections
    /// (1011) and drop the manager, so the next connection starts afresh.
    pub(super) fn recover_from_panic(&self, handle: &ConnectionHandle) {
        bump(&self.counters.panics, 1);
        tracing::error!(
            shard = self.index,
            user = %handle.user,
            conn = handle.id,
            "panic while handling a connection; closing it with 1011"
        );
        self.rebuild_suspect_managers();
    }

    /// Closes every connection (1011) of each user whose manager a panic left
    /// half-way through a change, and drops those managers, so the next
    /// connection of such a user starts a new epoch instead of inheriting a
    /// sequence with a hole in it.
    pub(super) fn rebuild_suspect_managers(&self) {
        let Ok(mut users) = self.users.try_borrow_mut() else {
            return;
        };
        let suspects: Vec<_> = users
            .iter()
            .filter(|(_, manager)| manager.is_suspect())
            .map(|(user, _)| user.clone())
            .collect();
        for user in suspects {
            if let Some(mut manager) = users.remove(&user) {
                let closed = manager.close_all(1011, "internal error");
                tracing::error!(
                    shard = self.index,
                    user = %user,
                    closed,
                    "user manager interrupted mid-change; its connections were closed"
                );
            }
        }
    }
}
