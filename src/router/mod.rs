//! The router: accepts TCP connections, reads each request head under a
//! deadline, answers plain HTTP itself and hands verified WebSocket upgrades
//! to the owning shard.
//!
//! The router runs on its own glommio executor, one task per connection, so
//! a slow or half-sent request never blocks another. It keeps no per-user
//! state and never reads a shard's counts: a shard decides for itself whether
//! it has room, after the hand-off.

mod api;
mod peers;
mod upgrade;

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use glommio::channels::local_channel::{self, LocalReceiver};
use glommio::net::{TcpListener, TcpStream};
use glommio::{Latency, Placement, Shares, TaskQueueHandle};

use crate::auth::Verifier;
use crate::config::Config;
use crate::executors::{ExecutorThread, Reporter};
use crate::http::{self, HeadError, RequestHead};
use crate::mailbox::{self, MailboxReceiver, MailboxSender};
use crate::metrics;
use crate::shard::message::{Endpoint, ShardMessage, ShardStats};
use peers::Peers;

/// Which routes a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// WebSocket upgrades and health; also the API and metrics when no
    /// private listener is configured.
    Public { with_api: bool },
    /// API, metrics and health only.
    Private,
}

/// Router-side counters, for `/metrics`.
#[derive(Default)]
pub struct RouterCounters {
    pub accepted: Cell<u64>,
    pub handed_off: Cell<u64>,
    pub api_requests: Cell<u64>,
    /// Refused requests by reason.
    pub refused: RefCell<BTreeMap<&'static str, u64>>,
}

impl RouterCounters {
    pub fn refuse(&self, reason: &'static str) {
        *self.refused.borrow_mut().entry(reason).or_default() += 1;
    }
}

/// The router's state, owned by its thread.
pub struct Router {
    config: Arc<Config>,
    verifier: Arc<Verifier>,
    shards: Vec<MailboxSender<ShardMessage>>,
    /// Set by the process when it starts draining; `/readyz` then says 503.
    draining: Arc<AtomicBool>,
    counters: RouterCounters,
    queue: TaskQueueHandle,
    /// Handshake slots, refusal budgets and trusted proxies, by address, for
    /// the public listener and for the private API listener.
    peers: Peers,
    private_peers: Peers,
}

/// Orders from the process to the router.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouterControl {
    /// Stop accepting on the public listener (draining).
    StopAccepting,
    /// End the router.
    Exit,
}

/// What the answer to a request does to the connection afterwards.
enum After {
    KeepAlive,
    Close,
    /// The socket went to a shard (or was answered and closed).
    HandedOff,
}

/// Starts the router on its own thread with the already bound listeners.
pub fn spawn(
    config: Arc<Config>,
    verifier: Arc<Verifier>,
    shards: Vec<MailboxSender<ShardMessage>>,
    listeners: Vec<(std::net::TcpListener, Role)>,
    draining: Arc<AtomicBool>,
    control: MailboxReceiver<RouterControl>,
    reporter: Reporter,
) -> std::io::Result<ExecutorThread> {
    ExecutorThread::spawn(
        "router",
        Placement::Unbound,
        config.limits.preempt_timer,
        move || async move {
            crate::audit::set_rate(config.limits.audit_per_sec);
            // One queue for every router task. Not latency-sensitive: glommio
            // 0.9 loses wake-ups on its latency ring (requests were seen left
            // unread); the 1 ms preempt timer bounds how long a busy router
            // takes to notice a shard's reply.
            let queue = glommio::executor().create_task_queue(
                Shares::default(),
                Latency::NotImportant,
                "router",
            );
            let trusted_proxies = config.trusted_proxies.clone();
            // Re-checked like the shards' mailboxes, in case a cross-thread
            // wake-up is lost.
            let recheck = config.limits.mailbox_recheck;
            let router = Rc::new(Router {
                config,
                verifier,
                shards,
                draining,
                counters: RouterCounters::default(),
                queue,
                peers: Peers::new(trusted_proxies),
                private_peers: Peers::new(Vec::new()),
            });
            let mut stops = Vec::new();
            let mut accepting = true;
            for (listener, role) in listeners {
                // SAFETY: the descriptor comes from a std listener consumed
                // here; the glommio listener becomes its only owner.
                let listener = unsafe { TcpListener::from_raw_fd(listener.into_raw_fd()) };
                let (stop, stopped) = local_channel::new_bounded(1);
                let accept = router.clone().accept_loop(listener, role, stopped);
                match glommio::spawn_local_into(accept, queue) {
                    Ok(task) => {
                        task.detach();
                        stops.push((role, stop));
                    }
                    Err(err) => {
                        tracing::error!(cause = %err, "cannot start accept loop");
                        accepting = false;
                    }
                }
            }
            // Without every accept loop the router gives up (its reporter tells
            // the server so) instead of serving half its listeners.
            if !accepting {
                return;
            }
            reporter.ready();

            while let Some(order) = control.recv_rechecking(recheck).await {
                match order {
                    RouterControl::StopAccepting => {
                        // The private listener keeps answering /readyz (503)
                        // and metrics while the shards drain.
                        for (role, stop) in &stops {
                            if matches!(role, Role::Public { .. }) {
                                let _ = stop.try_send(());
                            }
                        }
                        tracing::info!("stopped accepting on the public listener");
                    }
                    RouterControl::Exit => break,
                }
            }
        },
    )
}

impl Router {
    async fn accept_loop(
        self: Rc<Self>,
        listener: TcpListener,
        role: Role,
        stopped: LocalReceiver<()>,
    ) {
        loop {
            let next = futures_lite::future::or(async { Some(listener.accept().await) }, async {
                let _ = stopped.recv().await;
                None
            });
            let Some(accepted) = next.await else {
                // Dropping the listener closes it: new connections are refused.
                return;
            };
            let stream = match accepted {
                Ok(stream) => stream,
                Err(err) => {
                    // Out of descriptors or memory: back off instead of
                    // spinning; open connections keep working meanwhile.
                    tracing::warn!(cause = %err, "accept failed; backing off");
                    glommio::timer::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            self.counters.accepted.set(self.counters.accepted.get() + 1);
            let task = glommio::spawn_local_into(self.clone().serve(stream, role), self.queue);
            match task {
                Ok(task) => {
                    task.detach();
                }
                Err(err) => tracing::error!(cause = %err, "cannot spawn connection task"),
            }
        }
    }

    /// Serves one TCP connection: requests in turn (keep-alive) until a
    /// WebSocket upgrade hands it off or either side closes.
    async fn serve(self: Rc<Self>, mut stream: TcpStream, role: Role) {
        let accepted_at = Instant::now();
        let peer = stream
            .peer_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        // Small frames must not wait for Nagle's algorithm.
        let _ = stream.set_nodelay(true);

        let limits = &self.config.limits;
        // Each listener counts its own handshakes, so a flood on the public
        // port cannot take health checks and the API down with it.
        let peers = match role {
            Role::Private => &self.private_peers,
            Role::Public { .. } => &self.peers,
        };
        let trusted = peers.is_trusted(peer.ip());
        // The client's address for caps and audit events: the peer, or what
        // a trusted proxy says it forwards.
        let mut client = peer;
        let mut buf = Vec::new();
        let mut deadline = accepted_at + limits.handshake_timeout;
        let mut first = true;
        loop {
            if !first {
                // Between keep-alive requests the connection may idle (no
                // slot held); once the next request starts, its head must
                // arrive within the handshake timeout like the first one.
                if buf.is_empty() {
                    let idle = Instant::now() + limits.http_idle_timeout;
                    if http::before(idle, http::read_more(&mut stream, &mut buf))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                deadline = Instant::now() + limits.handshake_timeout;
            }
            let Some(slot) = peers.slot(peer.ip(), limits) else {
                self.refuse_busy(&mut stream, peer).await;
                return;
            };
            if first && trusted {
                let proxy_line = http::read_proxy_line(&mut stream, &mut buf);
                match http::before(deadline, proxy_line).await {
                    Ok(Some(address)) => client = address,
                    Ok(None) => {}
                    Err(err) => {
                        self.head_failed(&mut stream, err, peer).await;
                        return;
                    }
                }
            }
            let read = http::read_head(
                &mut stream,
                &mut buf,
                limits.max_request_head,
                limits.max_headers,
            );
            let (head, head_len) = match http::before(deadline, read).await {
                Ok(parsed) => parsed,
                Err(err) => {
                    self.head_failed(&mut stream, err, peer).await;
                    return;
                }
            };
            first = false;
            drop(slot);
            if trusted && client.ip() == peer.ip() {
                client = SocketAddr::new(peers.client_address(peer.ip(), &head), 0);
            }

            let after = self
                .route(
                    &mut stream,
                    role,
                    head,
                    &mut buf,
                    head_len,
                    client,
                    accepted_at,
                    deadline,
                )
                .await;
            match after {
                After::KeepAlive => {}
                After::Close | After::HandedOff => return,
            }
        }
    }

    async fn refuse_busy(&self, stream: &mut TcpStream, peer: SocketAddr) {
        self.counters.refuse("handshake_cap");
        crate::audit!(
            event = "handshake_cap",
            peer = %peer,
            in_progress = self.peers.in_progress(),
            "too many handshakes in progress; answered 503"
        );
        let mut out = Vec::new();
        let headers = [("Retry-After", "1")];
        http::write_response(
            &mut out,
            503,
            &headers,
            "text/plain",
            b"overloaded\n",
            false,
        );
        let _ = http::write_all(stream, &out).await;
    }

    async fn head_failed(&self, stream: &mut TcpStream, err: HeadError, peer: SocketAddr) {
        match err {
            HeadError::Closed | HeadError::Io(_) => return,
            _ => {}
        }
        self.counters.refuse(err.reason());
        tracing::debug!(peer = %peer, reason = err.reason(), "bad request head");
        if let Some(status) = err.status() {
            let mut out = Vec::new();
            http::write_response(
                &mut out,
                status,
                &[],
                "text/plain",
                err.to_string().as_bytes(),
                false,
            );
            let _ = http::write_all(stream, &out).await;
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn route(
        &self,
        stream: &mut TcpStream,
        role: Role,
        head: RequestHead,
        buf: &mut Vec<u8>,
        head_len: usize,
        peer: SocketAddr,
        accepted_at: Instant,
        deadline: Instant,
    ) -> After {
        let keep_alive = head.keep_alive();
        let serves_api = matches!(role, Role::Private | Role::Public { with_api: true });
        let public = matches!(role, Role::Public { .. });
        let path = head.path.clone();

        let endpoint = match path.as_str() {
            "/ws" if public => Some(Endpoint::Protocol),
            "/ws/echo" if public && self.config.enable_echo => Some(Endpoint::Echo),
            _ => None,
        };
        if let Some(endpoint) = endpoint {
            let early = buf.split_off(head_len);
            buf.clear();
            let request = upgrade::Upgrade {
                head,
                early,
                peer,
                accepted_at,
                deadline,
                endpoint,
            };
            self.upgrade(stream, request).await;
            return After::HandedOff;
        }

        let mut out = Vec::new();
        let mut close = !keep_alive;
        // Bytes of `buf` the API used for head and body, when it ran.
        let mut body_read = None;
        match path.as_str() {
            "/healthz" | "/readyz" | "/metrics"
                if head.method != "GET" && head.method != "HEAD" =>
            {
                http::write_response(
                    &mut out,
                    405,
                    &[("Allow", "GET")],
                    "text/plain",
                    b"",
                    keep_alive,
                );
            }
            "/healthz" => {
                http::write_response(&mut out, 200, &[], "text/plain", b"ok\n", keep_alive);
            }
            "/readyz" => {
                let (status, body): (u16, &[u8]) = if self.draining.load(Ordering::Relaxed) {
                    (503, b"draining\n")
                } else {
                    (200, b"ready\n")
                };
                http::write_response(&mut out, status, &[], "text/plain", body, keep_alive);
            }
            "/metrics" if serves_api => {
                let body = self.metrics().await;
                http::write_response(
                    &mut out,
                    200,
                    &[],
                    metrics::CONTENT_TYPE,
                    body.as_bytes(),
                    keep_alive,
                );
            }
            api if serves_api && api.starts_with("/api/") => {
                self.counters
                    .api_requests
                    .set(self.counters.api_requests.get() + 1);
                let answer = self.api(stream, &head, buf, head_len, deadline).await;
                close |= answer.close;
                let headers: Vec<(&str, &str)> = answer
                    .headers
                    .iter()
                    .map(|(n, v)| (*n, v.as_str()))
                    .collect();
                http::write_response(
                    &mut out,
                    answer.status,
                    &headers,
                    "application/json",
                    &answer.body,
                    !close,
                );
                body_read = Some(answer.consumed);
            }
            _ => {
                http::write_response(&mut out, 404, &[], "text/plain", b"not found\n", keep_alive);
            }
        }

        // Only the API reads request bodies; for any other request a
        // declared body is refused by closing after the answer.
        let consumed = match body_read {
            Some(consumed) => consumed,
            None => {
                let declares_body = head
                    .header("content-length")
                    .is_some_and(|v| v.trim_ascii() != b"0")
                    || head.header("transfer-encoding").is_some();
                close |= declares_body;
                head_len
            }
        };
        buf.drain(..consumed.min(buf.len()));
        if http::write_all(stream, &out).await.is_err() || close {
            return After::Close;
        }
        After::KeepAlive
    }

    /// Gathers every shard's counters by message and renders them. All
    /// shards are asked at once; one that does not answer in time (or has
    /// stopped) is left out, and `shardgate_shards_answering` says so.
    async fn metrics(&self) -> String {
        let deadline = Instant::now() + self.config.limits.shard_reply_timeout;
        let mut waiting = Vec::with_capacity(self.shards.len());
        for shard in &self.shards {
            let (reply, answer) = mailbox::mailbox(1);
            if shard.try_send(ShardMessage::Stats { reply }).is_ok() {
                waiting.push(answer);
            }
        }
        let mut stats: Vec<ShardStats> = Vec::with_capacity(waiting.len());
        for answer in waiting {
            let recheck = self.config.limits.mailbox_recheck;
            let wait = async {
                answer
                    .recv_rechecking(recheck)
                    .await
                    .ok_or(HeadError::Closed)
            };
            if let Ok(shard_stats) = http::before(deadline, wait).await {
                stats.push(shard_stats);
            }
        }
        metrics::render(&self.counters, self.shards.len(), &stats)
    }
}
