//! What the router knows about peer addresses: handshakes in progress per
//! address, each address's budget of refused tokens, and which addresses are
//! trusted proxies whose forwarded client address may be believed.
//!
//! All of it lives on the router's thread and is about addresses, never
//! users.

use std::cell::{Cell, RefCell};
use std::net::IpAddr;
use std::time::Instant;

use ahash::AHashMap;

use crate::config::{Limits, ProxyNet};
use crate::http::RequestHead;
use crate::shard::rate::TokenBucket;

/// Most addresses whose refusal budget is tracked; past it the table starts
/// afresh, which forgives everyone rather than growing without bound.
const MAX_TRACKED_PEERS: usize = 100_000;

/// Per-address state of the router.
pub struct Peers {
    handshakes: Cell<usize>,
    handshakes_by_peer: RefCell<AHashMap<IpAddr, usize>>,
    refusals: RefCell<AHashMap<IpAddr, TokenBucket>>,
    trusted: Vec<ProxyNet>,
}

/// A handshake slot, given back when dropped.
pub struct HandshakeSlot<'a> {
    peers: &'a Peers,
    /// The address the per-peer count was charged to; `None` for a trusted
    /// proxy, which carries many clients.
    peer: Option<IpAddr>,
}

impl Drop for HandshakeSlot<'_> {
    fn drop(&mut self) {
        let peers = self.peers;
        peers.handshakes.set(peers.handshakes.get() - 1);
        let Some(peer) = self.peer else {
            return;
        };
        let mut by_peer = peers.handshakes_by_peer.borrow_mut();
        if let Some(count) = by_peer.get_mut(&peer) {
            *count -= 1;
            if *count == 0 {
                by_peer.remove(&peer);
            }
        }
    }
}

impl Peers {
    pub fn new(trusted: Vec<ProxyNet>) -> Self {
        Peers {
            handshakes: Cell::new(0),
            handshakes_by_peer: RefCell::new(AHashMap::new()),
            refusals: RefCell::new(AHashMap::new()),
            trusted,
        }
    }

    pub fn in_progress(&self) -> usize {
        self.handshakes.get()
    }

    /// Whether `peer` is a configured proxy.
    pub fn is_trusted(&self, peer: IpAddr) -> bool {
        self.trusted.iter().any(|net| net.contains(peer))
    }

    /// Takes a handshake slot, unless the overall or per-peer cap is reached.
    /// Trusted proxies are exempt from the per-peer cap.
    pub fn slot(&self, peer: IpAddr, limits: &Limits) -> Option<HandshakeSlot<'_>> {
        if self.handshakes.get() >= limits.max_handshakes {
            return None;
        }
        let charged = if self.is_trusted(peer) {
            None
        } else {
            let mut by_peer = self.handshakes_by_peer.borrow_mut();
            let count = by_peer.entry(peer).or_default();
            if *count >= limits.max_handshakes_per_peer {
                return None;
            }
            *count += 1;
            Some(peer)
        };
        self.handshakes.set(self.handshakes.get() + 1);
        Some(HandshakeSlot {
            peers: self,
            peer: charged,
        })
    }

    /// Whether a token from `client` may still be verified: an address that
    /// keeps presenting bad tokens spends its budget, and then is refused
    /// before any signature check, so a spray of expensive RS256 or ES256
    /// forgeries cannot keep the router from other clients.
    pub fn may_verify(&self, client: IpAddr, limits: &Limits) -> bool {
        if limits.refusals_per_peer_per_sec == 0 {
            return true;
        }
        let mut refusals = self.refusals.borrow_mut();
        let Some(bucket) = refusals.get_mut(&client) else {
            return true;
        };
        // Peek: a refusal budget is spent by refusals, not by attempts.
        let mut probe = bucket.clone();
        probe.take(Instant::now()).is_ok()
    }

    /// Charges a refused token to `client`.
    pub fn refused(&self, client: IpAddr, limits: &Limits) {
        if limits.refusals_per_peer_per_sec == 0 {
            return;
        }
        let mut refusals = self.refusals.borrow_mut();
        if refusals.len() >= MAX_TRACKED_PEERS && !refusals.contains_key(&client) {
            refusals.clear();
        }
        let now = Instant::now();
        let bucket = refusals.entry(client).or_insert_with(|| {
            TokenBucket::new(
                limits.refusals_per_peer_per_sec,
                limits.refusal_burst_per_peer,
                now,
            )
        });
        let _ = bucket.take(now);
    }

    /// The client's address: the peer itself, or for a trusted proxy the
    /// nearest address in `X-Forwarded-For` that is not itself a trusted
    /// proxy (the rightmost untrusted one; entries further left were written
    /// by the client and prove nothing).
    pub fn client_address(&self, peer: IpAddr, head: &RequestHead) -> IpAddr {
        if !self.is_trusted(peer) {
            return peer;
        }
        let mut client = peer;
        for value in head.all("x-forwarded-for").iter().rev() {
            let Ok(text) = std::str::from_utf8(value) else {
                return client;
            };
            for item in text.rsplit(',') {
                let Ok(address) = item.trim().parse::<IpAddr>() else {
                    return client;
                };
                client = address;
                if !self.is_trusted(address) {
                    return client;
                }
            }
        }
        client
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::parse_head;

    fn peers() -> Peers {
        Peers::new(vec![
            "10.0.0.0/8".parse().unwrap(),
            "127.0.0.9".parse().unwrap(),
        ])
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let head = parse_head(
            b"GET / HTTP/1.1\r\nX-Forwarded-For: 6.6.6.6, 1.2.3.4, 10.1.1.1\r\n\r\n",
            8,
        )
        .unwrap();
        let peers = peers();
        // From a trusted proxy: skip trusted hops, take the next one.
        assert_eq!(peers.client_address(ip("127.0.0.9"), &head), ip("1.2.3.4"));
        // From anyone else the header is ignored.
        assert_eq!(peers.client_address(ip("5.5.5.5"), &head), ip("5.5.5.5"));
        // Garbage stops the walk at the last good address.
        let bad = parse_head(b"GET / HTTP/1.1\r\nX-Forwarded-For: nonsense\r\n\r\n", 8).unwrap();
        assert_eq!(peers.client_address(ip("10.2.2.2"), &bad), ip("10.2.2.2"));
    }

    #[test]
    fn per_peer_cap_and_release() {
        let limits = Limits {
            max_handshakes: 3,
            max_handshakes_per_peer: 2,
            ..Limits::default()
        };
        let peers = peers();
        let a = peers.slot(ip("1.1.1.1"), &limits).unwrap();
        let b = peers.slot(ip("1.1.1.1"), &limits).unwrap();
        assert!(peers.slot(ip("1.1.1.1"), &limits).is_none());
        // A trusted proxy is not capped per peer, only overall.
        let c = peers.slot(ip("10.0.0.1"), &limits).unwrap();
        assert!(peers.slot(ip("2.2.2.2"), &limits).is_none());
        drop((a, b, c));
        assert_eq!(peers.in_progress(), 0);
        assert!(peers.slot(ip("1.1.1.1"), &limits).is_some());
    }

    #[test]
    fn refusal_budget_runs_out_and_comes_back() {
        let limits = Limits {
            refusals_per_peer_per_sec: 1,
            refusal_burst_per_peer: 3,
            ..Limits::default()
        };
        let peers = peers();
        let sprayer = ip("3.3.3.3");
        for _ in 0..3 {
            assert!(peers.may_verify(sprayer, &limits));
            peers.refused(sprayer, &limits);
        }
        assert!(!peers.may_verify(sprayer, &limits));
        assert!(peers.may_verify(ip("4.4.4.4"), &limits));
    }
}
