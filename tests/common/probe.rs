//! Introspection of a running server from the outside, for the isolation
//! suite: the per-shard gauges of `/metrics`, the server's open file
//! descriptors (`/proc/<pid>/fd`), TCP resets (`SO_LINGER` 0), and a small
//! gate so that threads start an operation at the same moment.
//!
//! Nothing here reaches into the server's memory: gauges come from
//! `/metrics` over loopback, descriptors from procfs.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::{Server, http_get};

/// The per-shard gauges of one `/metrics` scrape.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShardGauges {
    /// `shardgate_shard_users`: users with a manager on the shard.
    pub users: u64,
    /// `shardgate_shard_connections`: open `/ws` connections.
    pub connections: u64,
    /// `shardgate_shard_queued_messages`: frames queued, not yet written.
    pub queued: u64,
    /// `shardgate_shard_echo_connections`: open `/ws/echo` connections.
    pub echo: u64,
}

/// One scrape of `/metrics`: every per-shard gauge, by shard index, and
/// every sample as text (for counters).
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    pub shards: BTreeMap<u64, ShardGauges>,
    pub text: String,
}

impl Scrape {
    /// The value of a sample such as
    /// `shardgate_router_refused_total{reason="bad_signature"}` (0 when the
    /// series has no sample yet, as a counter that was never bumped).
    pub fn value(&self, series: &str) -> f64 {
        self.text
            .lines()
            .find_map(|line| {
                let value = line.strip_prefix(series)?.strip_prefix(' ')?;
                value.trim().parse().ok()
            })
            .unwrap_or(0.0)
    }

    /// A per-shard counter, e.g. `shardgate_shard_forbidden_total`.
    pub fn shard_counter(&self, name: &str, shard: u64) -> f64 {
        self.value(&format!("{name}{{shard=\"{shard}\"}}"))
    }

    /// The gauges of one shard (all zero if the shard did not answer).
    pub fn shard(&self, shard: u64) -> ShardGauges {
        self.shards.get(&shard).copied().unwrap_or_default()
    }

    /// Sums of the gauges over every shard.
    pub fn total(&self) -> ShardGauges {
        self.shards
            .values()
            .fold(ShardGauges::default(), |a, g| ShardGauges {
                users: a.users + g.users,
                connections: a.connections + g.connections,
                queued: a.queued + g.queued,
                echo: a.echo + g.echo,
            })
    }
}

/// Scrapes `/metrics` at `addr` once.
pub fn scrape(addr: SocketAddr) -> Scrape {
    let response = http_get(addr, "/metrics");
    assert_eq!(response.status, 200, "/metrics: {}", response.text());
    let text = response.text();
    let answering = text
        .lines()
        .find_map(|l| l.strip_prefix("shardgate_shards_answering "))
        .and_then(|v| v.trim().parse::<u64>().ok());
    let configured = text
        .lines()
        .find_map(|l| l.strip_prefix("shardgate_shards "))
        .and_then(|v| v.trim().parse::<u64>().ok());
    assert_eq!(
        answering, configured,
        "every shard must answer the scrape:\n{text}"
    );
    let mut shards: BTreeMap<u64, ShardGauges> = BTreeMap::new();
    for line in text.lines() {
        let Some((series, value)) = line.split_once(' ') else {
            continue;
        };
        let Some((name, labels)) = series.split_once("{shard=\"") else {
            continue;
        };
        let Some(shard) = labels.strip_suffix("\"}") else {
            continue;
        };
        let (Ok(shard), Ok(value)) = (shard.parse::<u64>(), value.trim().parse::<f64>()) else {
            continue;
        };
        let gauges = shards.entry(shard).or_default();
        match name {
            "shardgate_shard_users" => gauges.users = value as u64,
            "shardgate_shard_connections" => gauges.connections = value as u64,
            "shardgate_shard_queued_messages" => gauges.queued = value as u64,
            "shardgate_shard_echo_connections" => gauges.echo = value as u64,
            _ => {}
        }
    }
    Scrape { shards, text }
}

/// Polls `/metrics` until `check` holds for a scrape; the last scrape is
/// returned either way, with whether it held.
pub fn wait_scrape(
    addr: SocketAddr,
    timeout: Duration,
    mut check: impl FnMut(&Scrape) -> bool,
) -> (bool, Scrape) {
    let deadline = Instant::now() + timeout;
    loop {
        let now = scrape(addr);
        if check(&now) {
            return (true, now);
        }
        if Instant::now() >= deadline {
            return (false, now);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Asserts (polling up to `timeout`) that every shard reports zero users,
/// zero connections (both endpoints) and zero queued frames.
pub fn assert_all_shards_idle(server: &Server, timeout: Duration) {
    let (idle, last) = wait_scrape(server.addr(), timeout, |s| {
        s.shards.values().all(|g| *g == ShardGauges::default())
    });
    assert!(
        idle,
        "every shard should be back to zero users, connections and queued \
         frames within {timeout:?}; last scrape: {:?}",
        last.shards
    );
}

/// Number of open descriptors of process `pid` (entries of
/// `/proc/<pid>/fd`).
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read /proc/<pid>/fd of the server")
        .count()
}

/// A baseline descriptor count: polls until two readings 100 ms apart agree
/// (bounded), so that connections the server is still closing are not part
/// of it.
pub fn stable_fd_count(pid: u32) -> usize {
    let mut last = fd_count(pid);
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(100));
        let now = fd_count(pid);
        if now == last {
            return now;
        }
        last = now;
    }
    last
}

/// Asserts (polling up to `timeout`) that the server's descriptor count is
/// back to `baseline`.
pub fn assert_fds_back_to(server: &Server, baseline: usize, timeout: Duration) {
    let mut last = 0;
    let back = super::poll(timeout, || {
        last = fd_count(server.pid());
        last <= baseline
    });
    assert!(
        back,
        "the server holds {last} descriptors {timeout:?} after the clients left; \
         baseline {baseline}"
    );
}

/// Sets `SO_LINGER` to zero seconds: closing the socket then sends a TCP
/// reset instead of a FIN, as a crashed or killed client would.
pub fn set_linger_zero(stream: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a descriptor `stream` owns and keeps open, with
    // a pointer to a live `linger` value and its exact size.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "setsockopt(SO_LINGER) failed");
}

/// Closes `stream` with a TCP reset (`SO_LINGER` 0, then close).
pub fn reset(stream: TcpStream) {
    set_linger_zero(&stream);
    drop(stream);
}

/// A one-shot gate: threads wait for it, one call opens it for all. Waits
/// are bounded, so a failed test cannot hang its other threads.
#[derive(Clone, Default)]
pub struct Gate(Arc<(Mutex<bool>, Condvar)>);

impl Gate {
    pub fn new() -> Gate {
        Gate::default()
    }

    /// Opens the gate for every waiter, present and future.
    pub fn open(&self) {
        let (lock, signal) = &*self.0;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
        signal.notify_all();
    }

    /// Waits until the gate opens; false when `timeout` passed first.
    pub fn wait(&self, timeout: Duration) -> bool {
        let (lock, signal) = &*self.0;
        let guard = lock.lock().unwrap_or_else(|e| e.into_inner());
        let (guard, _) = signal
            .wait_timeout_while(guard, timeout, |open| !*open)
            .unwrap_or_else(|e| e.into_inner());
        *guard
    }
}
