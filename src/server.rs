//! Start-up and wiring: bind the listeners, start the shards and the router,
//! and wait.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::auth::Verifier;
use crate::config::Config;
use crate::executors::{self, Part, Startup, Watchdog};
use crate::mailbox;
use crate::router::{self, Role, RouterControl};
use crate::shard;
use crate::shard::message::ShardMessage;
use crate::system;

/// Listen backlog asked for; the kernel caps it at net.core.somaxconn.
const LISTEN_BACKLOG: i32 = 4096;

/// Why the server stopped or could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Startup(#[from] system::StartupError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start an executor: {0}")]
    Executor(String),
}

/// A running server's addresses, known once it listens.
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub listen: SocketAddr,
    pub api_listen: Option<SocketAddr>,
}

/// Runs the server until SIGINT or SIGTERM has drained it. `on_bound` is
/// called once both listeners are bound and every executor has started.
pub fn run(
    mut config: Config,
    verifier: Verifier,
    connections_per_shard_given: bool,
    on_bound: impl FnOnce(Bound),
) -> Result<(), ServerError> {
    // Limits first: they decide how many connections each shard may hold.
    let report = system::prepare(config.shards + 1)?;
    let derived_cap = (report.connection_descriptors / config.shards as u64).max(1) as usize;
    if !connections_per_shard_given {
        config.limits.max_connections_per_shard = derived_cap;
    } else if config.limits.max_connections_per_shard > derived_cap {
        tracing::warn!(
            asked = config.limits.max_connections_per_shard,
            descriptors_allow = derived_cap,
            "RLIMIT_NOFILE allows fewer connections per shard than configured; \
             accepts will fail beyond it (see tuning.md)"
        );
    }
    if report.memlock.soft < report.memlock_wanted {
        tracing::warn!(
            found = report.memlock.soft,
            wanted = report.memlock_wanted,
            "RLIMIT_MEMLOCK is below what all executors register; some will skip \
             buffer registration (file I/O only, no effect on sockets)"
        );
    }
    tracing::info!(
        memlock_soft = report.memlock.soft,
        memlock_hard = report.memlock.hard,
        memlock_needed = system::GLOMMIO_MEMLOCK_THRESHOLD,
        nofile_soft = report.nofile.soft,
        nofile_hard = report.nofile.hard,
        connections_per_shard = config.limits.max_connections_per_shard,
        "resource limits"
    );

    tracing::info!(?config, "configuration");

    let listen = bind(config.listen)?;
    let api_listen = config.api_listen.map(bind).transpose()?;
    let bound = Bound {
        listen: local_addr(&listen, config.listen),
        api_listen: api_listen
            .as_ref()
            .zip(config.api_listen)
            .map(|(l, a)| local_addr(l, a)),
    };

    let config = Arc::new(config);
    let verifier = Arc::new(verifier);

    // Every thread started from here inherits a mask that blocks the
    // shutdown signals; this thread collects them with sigwait().
    let signals = shutdown_signals();
    block(&signals);

    // Shards, pinned round-robin over the CPUs this process may use.
    let cpus = system::allowed_cpus();
    let mut startup = Startup::new();
    let mut senders = Vec::with_capacity(config.shards);
    let mut shard_handles = Vec::with_capacity(config.shards);
    for index in 0..config.shards {
        let (sender, inbox) = mailbox::mailbox(config.limits.handoff_queue);
        let cpu = config.pin_shards.then(|| cpus[index % cpus.len()]);
        let reporter = startup.reporter(Part::Shard(index));
        let handle = shard::spawn(
            index,
            cpu,
            config.clone(),
            verifier.clone(),
            inbox,
            reporter,
        )
        .map_err(|err| ServerError::Executor(err.to_string()))?;
        tracing::info!(shard = index, cpu = ?cpu, "shard placed");
        senders.push(sender);
        shard_handles.push(handle);
    }

    let mut listeners = vec![(
        listen,
        Role::Public {
            with_api: api_listen.is_none(),
        },
    )];
    if let Some(api) = api_listen {
        listeners.push((api, Role::Private));
    }
    let draining = Arc::new(AtomicBool::new(false));
    let (router_control, control_inbox) = mailbox::mailbox(4);
    let router = router::spawn(
        config.clone(),
        verifier,
        senders.clone(),
        listeners,
        draining.clone(),
        control_inbox,
        startup.reporter(Part::Router),
    )
    .map_err(|err| ServerError::Executor(err.to_string()))?;

    // From here until every executor thread has ended, the watchdog owns
    // them and wakes any that glommio has put to sleep with work to do.
    // Shards keep their indices; the router comes last.
    let router_index = shard_handles.len();
    shard_handles.push(router);
    let watchdog = Watchdog::start(shard_handles)
        .map_err(|err| ServerError::Executor(format!("cannot start the watchdog: {err}")))?;

    let waited = startup.wait(STARTUP_TIMEOUT, STARTUP_WARNING, |missing, waited| {
        tracing::warn!(
            missing = %list(missing),
            waited_ms = waited.as_millis() as u64,
            "executors still starting"
        );
    });
    match waited {
        Ok(()) => {}
        Err(executors::Failure::GaveUp(part)) => {
            // The part's thread ends (or has ended) without serving; its
            // result says why. The others are left to the process's exit.
            let index = match part {
                Part::Shard(index) => index,
                Part::Router => router_index,
            };
            let mut threads = watchdog.stop();
            let reason = join_reason(threads.swap_remove(index).join());
            return Err(ServerError::Executor(format!("{part}: {reason}")));
        }
        Err(executors::Failure::TimedOut(missing)) => {
            return Err(ServerError::Executor(format!(
                "{} not started after {} s",
                list(&missing),
                STARTUP_TIMEOUT.as_secs()
            )));
        }
    }

    tracing::info!(
        listen = %bound.listen,
        api_listen = ?bound.api_listen,
        shards = config.shards,
        cpus = ?cpus,
        api = config.api_key.is_some(),
        echo = config.enable_echo,
        "shardgate listening"
    );
    on_bound(bound);

    // Wait for SIGINT or SIGTERM, then drain: /readyz turns 503, the public
    // listener stops accepting, shards refuse new work, flush what is queued
    // and close every connection with 1001.
    let signal = wait_for(&signals);
    tracing::info!(signal, "shutting down");
    draining.store(true, Ordering::Relaxed);
    let _ = router_control.try_send(RouterControl::StopAccepting);
    for sender in &senders {
        let _ = sender.try_send(ShardMessage::Shutdown);
    }

    // A second signal ends the process at once.
    std::thread::spawn(move || {
        let signal = wait_for(&shutdown_signals());
        tracing::warn!(signal, "second signal; exiting without draining");
        std::process::exit(1);
    });

    // The watchdog keeps watching while the shards drain; the threads come
    // back from it, to be joined, once they have all ended.
    wait_until(|| (0..router_index).all(|index| watchdog.is_finished(index)));
    let _ = router_control.try_send(RouterControl::Exit);
    wait_until(|| watchdog.is_finished(router_index));
    let mut threads = watchdog.stop();
    let router = threads.swap_remove(router_index);
    for shard in threads {
        let _ = shard.join();
    }
    if let Err(err) = router.join() {
        return Err(ServerError::Executor(err));
    }
    tracing::info!("shutdown complete");
    Ok(())
}

/// How long the executors may take to start before the server gives up.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a slow start is logged while waiting.
const STARTUP_WARNING: Duration = Duration::from_secs(2);

/// Returns once `done` is true, looking every 10 ms.
fn wait_until(mut done: impl FnMut() -> bool) {
    while !done() {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// "shard 0, router" for a log line or an error.
fn list(parts: &[Part]) -> String {
    parts
        .iter()
        .map(Part::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Why an executor thread that never reported ready has ended.
fn join_reason(result: Result<(), String>) -> String {
    match result {
        // A part that ends cleanly without reporting gave its reason in an
        // earlier log line.
        Ok(()) => "ended before it was ready (see the log above)".to_owned(),
        Err(err) => err,
    }
}

fn shutdown_signals() -> libc::sigset_t {
    // SAFETY: sigemptyset and sigaddset initialise and fill a sigset_t that
    // this function owns.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        set
    }
}

/// Blocks `set` in the calling thread (and so in threads it starts later).
fn block(set: &libc::sigset_t) {
    // SAFETY: pthread_sigmask reads a valid, initialised sigset_t.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, set, std::ptr::null_mut()) };
}

/// Waits for one of the blocked signals in `set`; returns its name.
fn wait_for(set: &libc::sigset_t) -> &'static str {
    let mut signal = 0;
    // SAFETY: sigwait reads a valid sigset_t and writes one int.
    unsafe { libc::sigwait(set, &mut signal) };
    match signal {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        _ => "signal",
    }
}

fn bind(addr: SocketAddr) -> Result<TcpListener, ServerError> {
    let listener = TcpListener::bind(addr).map_err(|source| ServerError::Bind { addr, source })?;
    // std listens with a small backlog; ask for more so bursts of
    // connections wait in the kernel instead of being dropped.
    // SAFETY: listen() on a socket the listener owns and keeps open.
    unsafe { libc::listen(listener.as_raw_fd(), LISTEN_BACKLOG) };
    Ok(listener)
}

fn local_addr(listener: &TcpListener, fallback: SocketAddr) -> SocketAddr {
    listener.local_addr().unwrap_or(fallback)
}
