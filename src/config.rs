//! Every limit and timeout of the server, in one place.
//!
//! The configuration is built once at start-up (from the command line) and
//! shared read-only with the router and every shard behind an `Arc`. Nothing
//! here changes while the server runs.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

/// What the server runs with.
#[derive(Clone)]
pub struct Config {
    /// Address of the public listener: WebSocket upgrades, health, and (unless
    /// `api_listen` is set) the API and metrics. Default `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// Optional private address serving only the API, metrics and health.
    pub api_listen: Option<SocketAddr>,
    /// Number of shards; default one per core the process may run on.
    pub shards: usize,
    /// Backend API key; the API is off when `None`. Never printed by `Debug`.
    pub api_key: Option<String>,
    /// Serve `/ws/echo` (conformance and raw benchmarks). Default off.
    pub enable_echo: bool,
    /// Pin each shard to a core. Default on.
    pub pin_shards: bool,
    /// `Origin` values allowed to open WebSockets (exact, ASCII
    /// case-insensitive, e.g. `https://app.example.com`). `None` allows any;
    /// a request without `Origin` (not a browser) is always allowed. This is
    /// the defence against cross-site WebSocket hijacking.
    pub allowed_origins: Option<Vec<String>>,
    /// Proxies whose `X-Forwarded-For` header and PROXY protocol (v1) line
    /// are believed for the client address used in per-peer caps and audit
    /// events. Empty by default: the TCP peer is the client.
    pub trusted_proxies: Vec<ProxyNet>,
    pub limits: Limits,
}

/// An address or CIDR block of trusted proxies, such as `10.0.0.0/8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyNet {
    base: IpAddr,
    prefix: u8,
}

impl ProxyNet {
    pub fn contains(&self, address: IpAddr) -> bool {
        match (self.base, address) {
            (IpAddr::V4(base), IpAddr::V4(address)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(base) & mask == u32::from(address) & mask
            }
            (IpAddr::V6(base), IpAddr::V6(address)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(base) & mask == u128::from(address) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for ProxyNet {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let base: IpAddr = address
            .parse()
            .map_err(|_| format!("invalid proxy address {text:?}"))?;
        let max = if base.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(prefix) => prefix
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("invalid prefix length in {text:?}"))?,
            None => max,
        };
        Ok(ProxyNet { base, prefix })
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("api_listen", &self.api_listen)
            .field("shards", &self.shards)
            .field("api_enabled", &self.api_key.is_some())
            .field("enable_echo", &self.enable_echo)
            .field("pin_shards", &self.pin_shards)
            .field("allowed_origins", &self.allowed_origins)
            .field("trusted_proxies", &self.trusted_proxies)
            .field("limits", &self.limits)
            .finish()
    }
}

/// Limits and timeouts. Each default is chosen for a server facing the public
/// internet with browsers as clients.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest WebSocket message accepted, in bytes (default 65536, the
    /// public contract). Larger ones close the connection with 1009.
    pub max_message_size: usize,
    /// Most frames one fragmented message may span (default 64). Without a
    /// cap, a client could make the server buffer a message in tiny pieces
    /// with a header's overhead each.
    pub max_fragments: usize,
    /// Time from accept to the 101 answer, queueing at the shard included
    /// (default 10 s). Not reset by each byte, so a client dripping its head
    /// one byte at a time cannot hold a slot for long.
    pub handshake_timeout: Duration,
    /// Largest HTTP request head, in bytes (default 16 KiB); beyond it the
    /// answer is 431.
    pub max_request_head: usize,
    /// Most header lines in a request (default 64); beyond it, 431.
    pub max_headers: usize,
    /// Largest API request body (default 1 MiB); beyond it, 413.
    pub max_api_body: usize,
    /// How long an idle keep-alive API connection stays open (default 60 s).
    pub http_idle_timeout: Duration,
    /// How long the router waits for a shard to answer an API command or a
    /// metrics request (default 5 s); beyond it, 503.
    pub shard_reply_timeout: Duration,
    /// Open WebSocket connections one user may hold (default 32); the next
    /// upgrade is answered 429 by the owning shard.
    pub max_connections_per_user: usize,
    /// Open WebSocket connections one shard may hold. Derived at start-up from
    /// RLIMIT_NOFILE when not given; beyond it the shard answers 503.
    pub max_connections_per_shard: usize,
    /// Hand-offs waiting in one shard's mailbox (default 1024); a full mailbox
    /// is answered 503 by the router.
    pub handoff_queue: usize,
    /// Messages queued for one connection and not yet written (default 1024).
    /// A connection past it is a slow consumer: it is closed with 4008.
    pub outbound_queue_messages: usize,
    /// Bytes queued for one connection and not yet written (default 1 MiB),
    /// the same rule as `outbound_queue_messages`.
    pub outbound_queue_bytes: usize,
    /// How long the server waits for the peer's Close after sending its own
    /// (default 5 s) before it drops the socket.
    pub close_timeout: Duration,
    /// Seconds of clock skew tolerated on `exp` and `nbf` (default 30).
    pub jwt_leeway_secs: u64,
    /// Handshakes (connections whose request head is being read) in progress
    /// at once (default 4096); beyond it new connections get 503.
    pub max_handshakes: usize,
    /// Handshakes in progress from one peer address (default 64); beyond it
    /// that peer's new connections get 503.
    pub max_handshakes_per_peer: usize,
    /// Refused tokens per second one client address may present before its
    /// upgrades are refused without verifying (default 20; 0 turns it off).
    /// A token bucket: keeps a spray of costly forged signatures from
    /// starving honest handshakes on the router.
    pub refusals_per_peer_per_sec: u32,
    /// Refused tokens one address may present in a burst (default 100).
    pub refusal_burst_per_peer: u32,
    /// Deepest JSON nesting accepted in a client frame (default 32). Checked
    /// by a linear scan before parsing, so a deep document costs one pass.
    pub max_json_depth: usize,
    /// Messages per second one user may send over all its connections
    /// (default 100; 0 turns the limit off). A token bucket refilled at this
    /// rate.
    pub rate_per_sec: u32,
    /// Bucket size: messages a user may send in a burst (default 200).
    pub rate_burst: u32,
    /// Refused messages on one connection, counted until the client keeps to
    /// the limit for a whole second, after which it is closed with 1008
    /// (default 200): the client ignores `rate_limited`.
    pub abuse_limit: u32,
    /// Silence after which the server pings a connection (default 25 s).
    pub ping_interval: Duration,
    /// Time a ping may go unanswered before the connection is dropped as
    /// dead (default 20 s). Any frame from the peer counts as an answer.
    pub pong_timeout: Duration,
    /// On shutdown, how long queued messages may take to drain before every
    /// connection gets Close 1001 (default 5 s).
    pub drain_timeout: Duration,
    /// How long a revocation is kept by the owning shard (default 24 h).
    /// Tokens issued before a revocation and still valid after this time are
    /// accepted again, so token lifetimes should stay below it.
    pub revocation_retention: Duration,
    /// Security (audit) events logged per second per thread (default 50);
    /// beyond it they are counted and the next logged event reports how many
    /// were suppressed.
    pub audit_per_sec: u32,
    /// Longest stretch an executor (a shard or the router) runs tasks before
    /// it checks its io_uring rings and cross-thread wake-ups (default 1 ms).
    /// glommio's own default, 100 ms, lets one flooding client delay
    /// everyone else on the shard, and a hand-off wait, by that much.
    pub preempt_timer: Duration,
    /// How often a mailbox is looked at even without a wake-up (default
    /// 10 ms): a guard against glommio losing a cross-thread wake-up, which
    /// would otherwise leave a hand-off or an API reply waiting.
    pub mailbox_recheck: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_size: 64 * 1024,
            max_fragments: 64,
            handshake_timeout: Duration::from_secs(10),
            max_request_head: 16 * 1024,
            max_headers: 64,
            max_api_body: 1024 * 1024,
            http_idle_timeout: Duration::from_secs(60),
            shard_reply_timeout: Duration::from_secs(5),
            max_connections_per_user: 32,
            max_connections_per_shard: 10_000,
            handoff_queue: 1024,
            outbound_queue_messages: 1024,
            outbound_queue_bytes: 1024 * 1024,
            close_timeout: Duration::from_secs(5),
            jwt_leeway_secs: 30,
            mailbox_recheck: Duration::from_millis(10),
            preempt_timer: Duration::from_millis(1),
            max_handshakes: 4096,
            max_handshakes_per_peer: 64,
            max_json_depth: 32,
            refusals_per_peer_per_sec: 20,
            refusal_burst_per_peer: 100,
            rate_per_sec: 100,
            rate_burst: 200,
            abuse_limit: 200,
            ping_interval: Duration::from_secs(25),
            pong_timeout: Duration::from_secs(20),
            drain_timeout: Duration::from_secs(5),
            revocation_retention: Duration::from_secs(24 * 3600),
            audit_per_sec: 50,
        }
    }
}

/// Rules for a user id, shared by tokens and API bodies: a non-empty string
/// of at most 256 bytes with no control characters. Ids are compared as exact
/// byte strings: no case folding, no Unicode normalisation, no trimming.
pub fn check_user_id(user: &str) -> Result<(), &'static str> {
    if user.is_empty() {
        return Err("empty user id");
    }
    if user.len() > MAX_USER_ID_BYTES {
        return Err("user id longer than 256 bytes");
    }
    if user.chars().any(char::is_control) {
        return Err("user id contains control characters");
    }
    Ok(())
}

/// Longest user id, in bytes.
pub const MAX_USER_ID_BYTES: usize = 256;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_id_rules() {
        assert!(check_user_id("alice").is_ok());
        assert!(check_user_id("Alice ").is_ok());
        assert!(check_user_id(&"x".repeat(256)).is_ok());
        assert!(check_user_id(&"x".repeat(257)).is_err());
        assert!(check_user_id("").is_err());
        assert!(check_user_id("a\nb").is_err());
        assert!(check_user_id("a\u{7f}").is_err());
        assert!(check_user_id("a\u{85}").is_err());
    }

    #[test]
    fn proxy_networks() {
        let net: ProxyNet = "10.0.0.0/8".parse().unwrap();
        assert!(net.contains("10.200.1.1".parse().unwrap()));
        assert!(!net.contains("11.0.0.1".parse().unwrap()));
        let one: ProxyNet = "::1".parse().unwrap();
        assert!(one.contains("::1".parse().unwrap()));
        assert!(!one.contains("127.0.0.1".parse().unwrap()));
        let all: ProxyNet = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<ProxyNet>().is_err());
        assert!("nonsense".parse::<ProxyNet>().is_err());
    }

    #[test]
    fn debug_hides_the_api_key() {
        let config = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            api_listen: None,
            shards: 1,
            api_key: Some("very-secret-key".into()),
            enable_echo: false,
            pin_shards: false,
            allowed_origins: None,
            trusted_proxies: Vec::new(),
            limits: Limits::default(),
        };
        assert!(!format!("{config:?}").contains("very-secret-key"));
    }
}
