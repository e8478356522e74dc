//! The isolated per-user unit.
//!
//! A [`UserManager`] holds one user's connections, sequence counter and
//! epoch. It exists while the user has at least one open connection; a new
//! manager starts a new epoch. Every operation that names a connection first
//! checks that the connection's own user (from its verified token) equals the
//! manager's key, byte for byte. The shard's map lookup makes a mismatch
//! unreachable; the check is there so that a bug elsewhere is refused and
//! reported as a security event instead of leaking data.

use std::rc::Rc;
use std::time::{Duration, Instant};

use serde_json::value::RawValue;

use super::outbox::{ConnectionHandle, OutboxLimits};
use super::protocol;
use super::rate::TokenBucket;
use crate::ws::codec::OpCode;

/// A connection of another user reached this manager.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("connection {conn} does not belong to this user")]
pub struct IsolationViolation {
    pub conn: u64,
}

/// What a delivery did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    pub epoch: u64,
    pub seq: u64,
    /// Connections the message was queued on.
    pub delivered: usize,
    /// Connections found too slow and asked to close with 4008.
    pub slow_consumers: usize,
}

/// The user is over its message rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimited {
    /// Milliseconds until the next message is accepted.
    pub retry_after_ms: u64,
    /// Whether this refusal should be answered: only the first in a window.
    pub notify: bool,
}

/// One user's state on its shard.
pub struct UserManager {
    /// The user id, a copy owned by the manager.
    user: Rc<str>,
    epoch: u64,
    /// Last sequence number assigned in this epoch (0 before the first).
    seq: u64,
    connections: Vec<Rc<ConnectionHandle>>,
    /// The user's message budget; `None` when rates are not limited.
    bucket: Option<TokenBucket>,
    /// Until when a `rate_limited` answer has already been given.
    notified_until: Option<Instant>,
    /// Set while a delivery changes the manager. Still set after a panic, it
    /// marks the manager as suspect: the shard then closes the user's
    /// connections and drops the manager.
    busy: bool,
}

impl UserManager {
    /// A manager for `user` with a fresh random epoch and no rate limit.
    pub fn new(user: &str) -> Self {
        UserManager {
            user: Rc::from(user),
            epoch: new_epoch(),
            seq: 0,
            connections: Vec::new(),
            bucket: None,
            notified_until: None,
            busy: false,
        }
    }

    /// A manager whose user may send `rate` messages per second, `burst` at
    /// once (`rate` 0: unlimited).
    pub fn with_rate(user: &str, rate: u32, burst: u32) -> Self {
        let mut manager = Self::new(user);
        if rate > 0 {
            manager.bucket = Some(TokenBucket::new(rate, burst, Instant::now()));
        }
        manager
    }

    /// Charges one message to the user's budget.
    pub fn charge(&mut self, now: Instant) -> Result<(), RateLimited> {
        let Some(bucket) = self.bucket.as_mut() else {
            return Ok(());
        };
        let retry_after_ms = match bucket.take(now) {
            Ok(()) => return Ok(()),
            Err(ms) => ms,
        };
        let notify = self.notified_until.is_none_or(|until| now >= until);
        if notify {
            self.notified_until = Some(now + Duration::from_millis(retry_after_ms));
        }
        Err(RateLimited {
            retry_after_ms,
            notify,
        })
    }

    /// Whether a delivery was interrupted (by a panic) half-way.
    pub fn is_suspect(&self) -> bool {
        self.busy
    }

    pub fn user(&self) -> &Rc<str> {
        &self.user
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Open connections.
    pub fn len(&self) -> usize {
        self.connections.len()
    }

    pub fn is_empty(&self) -> bool {
        self.connections.is_empty()
    }

    /// Frames queued on this user's connections and not yet written.
    pub fn queued_frames(&self) -> usize {
        self.connections
            .iter()
            .map(|c| c.outbox.borrow().frames)
            .sum()
    }

    /// The isolation check at the door of every operation.
    fn admit(
        &self,
        conn: &ConnectionHandle,
        operation: &'static str,
    ) -> Result<(), IsolationViolation> {
        if conn.user.as_bytes() == self.user.as_bytes() {
            return Ok(());
        }
        crate::audit!(
                event = "isolation_violation",
            operation,
            manager_user = %self.user,
            connection_user = %conn.user,
            conn = conn.id,
            "connection refused by another user's manager"
        );
        Err(IsolationViolation { conn: conn.id })
    }

    /// Adds a connection.
    pub fn attach(&mut self, conn: Rc<ConnectionHandle>) -> Result<(), IsolationViolation> {
        self.admit(&conn, "attach")?;
        conn.attached.set(true);
        self.connections.push(conn);
        Ok(())
    }

    /// Removes a connection; removing one that is not listed does nothing.
    pub fn detach(&mut self, conn: &ConnectionHandle) -> Result<(), IsolationViolation> {
        self.admit(conn, "detach")?;
        if let Some(i) = self.connections.iter().position(|c| c.id == conn.id) {
            self.connections.swap_remove(i);
        }
        conn.attached.set(false);
        Ok(())
    }

    /// A client `send`: assigns the next sequence number and queues the
    /// message on every other connection of the user, in order.
    pub fn send_from(
        &mut self,
        sender: &ConnectionHandle,
        data: &RawValue,
        limits: OutboxLimits,
        scratch: &mut Vec<u8>,
    ) -> Result<Delivery, IsolationViolation> {
        self.admit(sender, "send")?;
        Ok(self.deliver(Some(sender.id), "client", data, limits, scratch))
    }

    /// An API publish: the same, to every connection of the user.
    pub fn publish(
        &mut self,
        data: &RawValue,
        limits: OutboxLimits,
        scratch: &mut Vec<u8>,
    ) -> Delivery {
        self.deliver(None, "server", data, limits, scratch)
    }

    fn deliver(
        &mut self,
        skip: Option<u64>,
        source: &str,
        data: &RawValue,
        limits: OutboxLimits,
        scratch: &mut Vec<u8>,
    ) -> Delivery {
        self.busy = true;
        self.seq += 1;
        let mut delivery = Delivery {
            epoch: self.epoch,
            seq: self.seq,
            delivered: 0,
            slow_consumers: 0,
        };

        // Encode the message once; each recipient gets a copy of the bytes.
        scratch.clear();
        protocol::write_message(scratch, self.epoch, self.seq, source, data);

        // Test builds only: a fault in the middle of a fan-out.
        #[cfg(feature = "fault-injection")]
        if data.get() == crate::shard::FAULT_IN_DELIVERY {
            panic!("injected fault in the middle of a delivery");
        }

        for conn in &self.connections {
            if Some(conn.id) == skip {
                continue;
            }
            // A connection in this list always belongs to this user (attach
            // checked it); the check is repeated because this is the line
            // where data leaves the manager.
            if self.admit(conn, "deliver").is_err() {
                continue;
            }
            let mut outbox = conn.outbox.borrow_mut();
            if outbox.close.is_some() {
                continue;
            }
            match outbox.push(OpCode::Text, scratch, limits) {
                Ok(()) => {
                    delivery.delivered += 1;
                    outbox.wake();
                }
                Err(_) => {
                    drop(outbox);
                    crate::audit!(
                    event = "slow_consumer",
                            user = %self.user,
                            conn = conn.id,
                            "outbound queue full; closing with 4008"
                        );
                    conn.request_close(4008, "slow consumer: messages were dropped");
                    delivery.slow_consumers += 1;
                }
            }
        }
        self.busy = false;
        delivery
    }

    /// Asks every connection to close with `code` and forgets them all.
    /// Returns how many there were.
    pub fn close_all(&mut self, code: u16, reason: &'static str) -> usize {
        let closed = self.connections.len();
        for conn in self.connections.drain(..) {
            conn.attached.set(false);
            conn.request_close(code, reason);
        }
        closed
    }

    /// The connections, for housekeeping sweeps.
    pub fn connections(&self) -> &[Rc<ConnectionHandle>] {
        &self.connections
    }
}

/// A random epoch in `1..2^53`, so that it survives a JavaScript number.
fn new_epoch() -> u64 {
    let mut bytes = [0u8; 8];
    // SAFETY: getrandom writes at most `bytes.len()` bytes into the buffer,
    // which is valid and exclusively borrowed for the call.
    let got = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    let mut value = u64::from_ne_bytes(bytes);
    if got != bytes.len() as isize {
        // getrandom on Linux does not fail for 8 bytes once the pool is up;
        // fall back to the clock so an epoch is still unlikely to repeat.
        value = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
    }
    (value & ((1 << 53) - 1)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: OutboxLimits = OutboxLimits {
        max_messages: 16,
        max_bytes: 1 << 16,
    };

    fn raw(json: &str) -> Box<RawValue> {
        RawValue::from_string(json.to_owned()).unwrap()
    }

    fn queued(conn: &ConnectionHandle) -> usize {
        conn.outbox.borrow().frames
    }

    #[test]
    fn send_reaches_siblings_not_sender_with_consecutive_numbers() {
        let mut manager = UserManager::new("alice");
        let a = ConnectionHandle::new(1, "alice", u64::MAX, None);
        let b = ConnectionHandle::new(2, "alice", u64::MAX, None);
        manager.attach(a.clone()).unwrap();
        manager.attach(b.clone()).unwrap();

        let mut scratch = Vec::new();
        let first = manager
            .send_from(&a, &raw("1"), LIMITS, &mut scratch)
            .unwrap();
        let second = manager
            .send_from(&b, &raw("2"), LIMITS, &mut scratch)
            .unwrap();
        assert_eq!((first.seq, second.seq), (1, 2));
        assert_eq!(first.epoch, second.epoch);
        assert_eq!((first.delivered, second.delivered), (1, 1));
        assert_eq!((queued(&a), queued(&b)), (1, 1));

        let published = manager.publish(&raw("3"), LIMITS, &mut scratch);
        assert_eq!((published.seq, published.delivered), (3, 2));
    }

    #[test]
    fn forged_identity_is_refused_and_nothing_is_delivered() {
        // A connection whose token says "mallory" is handed to alice's
        // manager, as a routing bug would. Every operation must refuse it.
        let mut manager = UserManager::new("alice");
        let alice = ConnectionHandle::new(1, "alice", u64::MAX, None);
        manager.attach(alice.clone()).unwrap();
        let mallory = ConnectionHandle::new(2, "mallory", u64::MAX, None);

        assert_eq!(
            manager.attach(mallory.clone()),
            Err(IsolationViolation { conn: 2 })
        );
        let mut scratch = Vec::new();
        assert!(
            manager
                .send_from(&mallory, &raw("1"), LIMITS, &mut scratch)
                .is_err()
        );
        assert!(manager.detach(&mallory).is_err());
        assert_eq!(queued(&alice), 0);
        assert_eq!(manager.seq(), 0);
        assert_eq!(manager.len(), 1);
    }

    #[test]
    fn ids_differing_by_case_or_normalisation_are_different_users() {
        let mut manager = UserManager::new("\u{e9}va");
        let nfd = ConnectionHandle::new(1, "e\u{301}va", u64::MAX, None);
        assert!(manager.attach(nfd).is_err());
        let upper = ConnectionHandle::new(2, "\u{c9}va", u64::MAX, None);
        assert!(manager.attach(upper).is_err());
    }

    #[test]
    fn a_full_outbox_closes_only_that_connection() {
        let limits = OutboxLimits {
            max_messages: 1,
            max_bytes: 1 << 16,
        };
        let mut manager = UserManager::new("alice");
        let sender = ConnectionHandle::new(1, "alice", u64::MAX, None);
        let slow = ConnectionHandle::new(2, "alice", u64::MAX, None);
        manager.attach(sender.clone()).unwrap();
        manager.attach(slow.clone()).unwrap();

        let mut scratch = Vec::new();
        manager
            .send_from(&sender, &raw("1"), limits, &mut scratch)
            .unwrap();
        let second = manager
            .send_from(&sender, &raw("2"), limits, &mut scratch)
            .unwrap();
        assert_eq!(second.slow_consumers, 1);
        assert_eq!(slow.outbox.borrow().close.map(|c| c.code), Some(4008));
        assert!(sender.outbox.borrow().close.is_none());
    }

    #[test]
    fn rate_limit_answers_once_per_window() {
        let mut manager = UserManager::with_rate("alice", 10, 2);
        let now = Instant::now();
        assert_eq!(manager.charge(now), Ok(()));
        assert_eq!(manager.charge(now), Ok(()));
        let first = manager.charge(now).unwrap_err();
        assert!(first.notify);
        assert_eq!(first.retry_after_ms, 100);
        assert!(!manager.charge(now).unwrap_err().notify);
        let later = now + Duration::from_millis(100);
        assert_eq!(manager.charge(later), Ok(()));
        assert!(manager.charge(later).unwrap_err().notify);
        assert!(UserManager::new("bob").charge(now).is_ok());
    }

    #[test]
    fn epochs_differ_between_managers() {
        let a = UserManager::new("alice");
        let b = UserManager::new("alice");
        assert_ne!(a.epoch(), b.epoch());
        assert!(a.epoch() > 0 && a.epoch() < (1 << 53));
    }
}
