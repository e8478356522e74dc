//! The load generator's network core: one thread, non-blocking sockets,
//! edge-triggered epoll through libc, a read buffer and a write buffer per
//! connection that keep their capacity, so the steady state allocates
//! nothing per message.
//!
//! `Net` owns the sockets and speaks just enough RFC 6455 for a client:
//! the upgrade request, unmasked server frames in, pre-masked frames out
//! (built once by the scenarios), pong for ping, the close handshake.
//! Scenarios implement `Driver` and react to opens, frames and closes.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::RawFd;
use std::time::Instant;

pub const OP_TEXT: u8 = 0x1;
pub const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// A fixed client mask. Clients must mask; the key's value does not change
/// the server's work, and a fixed key lets frames be masked once, up front.
const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// A masked client frame (FIN set) with `opcode` and `payload`.
pub fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= u16::MAX as usize => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&MASK);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
    out
}

/// An HTTP/1.1 WebSocket upgrade request for `path`, with a bearer token
/// when one is given.
pub fn upgrade_request(path: &str, token: Option<&str>) -> Vec<u8> {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{auth}\r\n"
    )
    .into_bytes()
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum State {
    /// Slot unused (its descriptor is closed).
    Free,
    /// `connect()` in progress.
    Connecting,
    /// Upgrade request sent, waiting for the 101.
    Upgrading,
    /// Frames flow (or, for raw connections, bytes).
    Open,
    /// We sent Close and wait for the server to close the socket.
    Closing,
}

pub struct Conn {
    fd: RawFd,
    pub state: State,
    /// Raw TCP (HTTP API clients): no upgrade, bytes go to `on_raw`.
    raw: bool,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    wpos: usize,
    /// When `connect()` was called.
    pub started: Instant,
}

/// What a scenario does with the traffic.
pub trait Driver {
    /// The upgrade succeeded (or a raw connection connected).
    fn on_open(&mut self, net: &mut Net, idx: usize, now: Instant);
    /// One complete data frame from the server (text or binary).
    fn on_frame(&mut self, net: &mut Net, idx: usize, opcode: u8, payload: &[u8], now: Instant);
    /// Bytes on a raw connection; returns how many were consumed.
    fn on_raw(&mut self, _net: &mut Net, _idx: usize, _data: &[u8], _now: Instant) -> usize {
        0
    }
    /// The connection is gone; `clean` when we had started the close.
    fn on_gone(&mut self, _net: &mut Net, _idx: usize, _clean: bool) {}
}

/// Counters of everything unexpected, reported with each run.
#[derive(Default, Clone, Debug)]
pub struct NetStats {
    pub connect_failures: u64,
    /// Upgrades answered with something other than 101.
    pub refused: u64,
    pub first_refusal: Option<String>,
    /// Connections the server closed (Close frame or EOF) before we did.
    pub server_closes: u64,
    pub first_close: Option<String>,
    /// Socket errors (resets and the like) on open connections.
    pub io_errors: u64,
    /// Masked or fragmented frames from a server, or bad lengths.
    pub bad_frames: u64,
}

impl NetStats {
    pub fn total(&self) -> u64 {
        self.connect_failures + self.refused + self.server_closes + self.io_errors + self.bad_frames
    }
}

pub struct Net {
    ep: RawFd,
    pub conns: Vec<Conn>,
    free: Vec<usize>,
    /// Freed during this poll; reusable only after it, so a slot freed by a
    /// callback is not reopened while its own events are still handled.
    freed: Vec<usize>,
    events: Vec<libc::epoll_event>,
    rbuf_cap: usize,
    /// Connections in Connecting or Upgrading state.
    pub handshaking: usize,
    /// Connections not Free.
    pub live: usize,
    pub stats: NetStats,
    close_frame: Vec<u8>,
}

fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

impl Net {
    /// `rbuf_cap`: initial read buffer per connection (grows for frames
    /// larger than it, once).
    pub fn new(rbuf_cap: usize) -> Net {
        // SAFETY: plain system call.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        assert!(ep >= 0, "epoll_create1: {}", io::Error::last_os_error());
        Net {
            ep,
            conns: Vec::new(),
            free: Vec::new(),
            freed: Vec::new(),
            events: vec![libc::epoll_event { events: 0, u64: 0 }; 1024],
            rbuf_cap,
            handshaking: 0,
            live: 0,
            stats: NetStats::default(),
            close_frame: client_frame(OP_CLOSE, &1000u16.to_be_bytes()),
        }
    }

    /// Starts a connection from `src` (port chosen by the kernel) to `dst`.
    /// With `request`, it is upgraded to a WebSocket with those bytes; without,
    /// it is a raw TCP connection. Returns the slot index.
    pub fn connect(
        &mut self,
        src: Ipv4Addr,
        dst: SocketAddr,
        request: Option<&[u8]>,
    ) -> io::Result<usize> {
        let SocketAddr::V4(dst) = dst else {
            return Err(io::Error::other("IPv4 only"));
        };
        // SAFETY: system calls on a descriptor this function owns; the
        // sockaddr structures live on the stack for the calls' duration.
        let fd = unsafe {
            let fd = libc::socket(
                libc::AF_INET,
                libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            );
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let one: libc::c_int = 1;
            let len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            let p = &one as *const libc::c_int as *const libc::c_void;
            libc::setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, p, len);
            // Choose the port at connect() time, per (src, dst) pair.
            libc::setsockopt(fd, libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT, p, len);
            let mut sa: libc::sockaddr_in = std::mem::zeroed();
            sa.sin_family = libc::AF_INET as libc::sa_family_t;
            sa.sin_addr.s_addr = u32::from(src).to_be();
            let salen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            if libc::bind(fd, &sa as *const _ as *const libc::sockaddr, salen) != 0 {
                let err = io::Error::last_os_error();
                libc::close(fd);
                return Err(err);
            }
            sa.sin_addr.s_addr = u32::from(*dst.ip()).to_be();
            sa.sin_port = dst.port().to_be();
            let rc = libc::connect(fd, &sa as *const _ as *const libc::sockaddr, salen);
            if rc != 0 && errno() != libc::EINPROGRESS {
                let err = io::Error::last_os_error();
                libc::close(fd);
                return Err(err);
            }
            fd
        };
        let idx = match self.free.pop() {
            Some(idx) => idx,
            None => {
                self.conns.push(Conn {
                    fd: -1,
                    state: State::Free,
                    raw: false,
                    rbuf: Vec::with_capacity(self.rbuf_cap),
                    wbuf: Vec::new(),
                    wpos: 0,
                    started: Instant::now(),
                });
                self.conns.len() - 1
            }
        };
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32,
            u64: idx as u64,
        };
        // SAFETY: registers a descriptor we own.
        let rc = unsafe { libc::epoll_ctl(self.ep, libc::EPOLL_CTL_ADD, fd, &mut ev) };
        if rc != 0 {
            let err = io::Error::last_os_error();
            // SAFETY: closes the descriptor created above.
            unsafe { libc::close(fd) };
            self.free.push(idx);
            return Err(err);
        }
        let conn = &mut self.conns[idx];
        conn.fd = fd;
        conn.state = State::Connecting;
        conn.raw = request.is_none();
        conn.rbuf.clear();
        conn.wbuf.clear();
        conn.wpos = 0;
        conn.started = Instant::now();
        if let Some(request) = request {
            conn.wbuf.extend_from_slice(request);
        }
        self.handshaking += 1;
        self.live += 1;
        Ok(idx)
    }

    /// Queues `bytes` on connection `idx`, writing at once when nothing is
    /// pending.
    pub fn send(&mut self, idx: usize, bytes: &[u8]) {
        let conn = &mut self.conns[idx];
        match conn.state {
            State::Free | State::Closing => return,
            State::Connecting | State::Upgrading => {
                conn.wbuf.extend_from_slice(bytes);
                return;
            }
            State::Open => {}
        }
        if conn.wpos < conn.wbuf.len() {
            conn.wbuf.extend_from_slice(bytes);
            return;
        }
        conn.wbuf.clear();
        conn.wpos = 0;
        // SAFETY: writes from a live slice to a descriptor we own.
        let n = unsafe {
            libc::send(
                conn.fd,
                bytes.as_ptr() as *const libc::c_void,
                bytes.len(),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            if (n as usize) < bytes.len() {
                conn.wbuf.extend_from_slice(&bytes[n as usize..]);
            }
        } else if errno() == libc::EAGAIN {
            conn.wbuf.extend_from_slice(bytes);
        }
        // Other errors surface as EPOLLERR / EPOLLHUP on the read side.
    }

    /// Sends Close (1000); the connection ends when the server closes it.
    pub fn close_ws(&mut self, idx: usize) {
        if self.conns[idx].state != State::Open {
            return;
        }
        let frame = std::mem::take(&mut self.close_frame);
        self.send(idx, &frame);
        self.close_frame = frame;
        self.conns[idx].state = State::Closing;
    }

    /// Closes the descriptor now (with RST, so no TIME_WAIT is left behind).
    pub fn abort(&mut self, idx: usize) {
        let conn = &mut self.conns[idx];
        if conn.state == State::Free {
            return;
        }
        if matches!(conn.state, State::Connecting | State::Upgrading) {
            self.handshaking -= 1;
        }
        // SAFETY: closes a descriptor we own; linger {1, 0} makes it a reset.
        unsafe {
            let linger = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            libc::setsockopt(
                conn.fd,
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                &linger as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            );
            libc::close(conn.fd);
        }
        conn.fd = -1;
        conn.state = State::Free;
        conn.rbuf.clear();
        conn.wbuf.clear();
        conn.wpos = 0;
        self.live -= 1;
        self.freed.push(idx);
    }

    /// Like `abort` but a plain close (FIN), after the server closed its side.
    fn release(&mut self, idx: usize) {
        let conn = &mut self.conns[idx];
        if matches!(conn.state, State::Connecting | State::Upgrading) {
            self.handshaking -= 1;
        }
        // SAFETY: closes a descriptor we own.
        unsafe { libc::close(conn.fd) };
        conn.fd = -1;
        conn.state = State::Free;
        conn.rbuf.clear();
        conn.wbuf.clear();
        conn.wpos = 0;
        self.live -= 1;
        self.freed.push(idx);
    }

    /// Aborts every live connection.
    pub fn abort_all(&mut self) {
        for idx in 0..self.conns.len() {
            self.abort(idx);
        }
        self.free.append(&mut self.freed);
    }

    /// Waits up to `timeout_ms` for events and handles them.
    pub fn poll<D: Driver>(&mut self, driver: &mut D, timeout_ms: i32) {
        let mut events = std::mem::take(&mut self.events);
        // SAFETY: the buffer has `events.len()` initialised entries.
        let n = unsafe {
            libc::epoll_wait(
                self.ep,
                events.as_mut_ptr(),
                events.len() as libc::c_int,
                timeout_ms,
            )
        };
        for ev in events.iter().take(n.max(0) as usize) {
            let idx = ev.u64 as usize;
            let flags = ev.events;
            self.handle(driver, idx, flags);
        }
        self.events = events;
        self.free.append(&mut self.freed);
    }

    fn handle<D: Driver>(&mut self, driver: &mut D, idx: usize, flags: u32) {
        let state = self.conns[idx].state;
        if state == State::Free {
            return;
        }
        if state == State::Connecting {
            let mut err: libc::c_int = 0;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: reads an int option into a stack variable.
            unsafe {
                libc::getsockopt(
                    self.conns[idx].fd,
                    libc::SOL_SOCKET,
                    libc::SO_ERROR,
                    &mut err as *mut _ as *mut libc::c_void,
                    &mut len,
                )
            };
            if err != 0 {
                self.stats.connect_failures += 1;
                self.abort(idx);
                driver.on_gone(self, idx, false);
                return;
            }
            if flags & libc::EPOLLOUT as u32 == 0 {
                return;
            }
            let conn = &mut self.conns[idx];
            if conn.raw {
                conn.state = State::Open;
                self.handshaking -= 1;
                driver.on_open(self, idx, Instant::now());
            } else {
                conn.state = State::Upgrading;
            }
        }
        if flags & libc::EPOLLOUT as u32 != 0 && !self.flush(idx) {
            self.stats.io_errors += 1;
            self.abort(idx);
            driver.on_gone(self, idx, false);
            return;
        }
        if self.conns[idx].state == State::Free {
            return;
        }
        if flags & (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0
        {
            let hangup = flags & (libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0;
            self.read(driver, idx, hangup);
        }
    }

    /// Writes pending bytes; false on a socket error.
    fn flush(&mut self, idx: usize) -> bool {
        let conn = &mut self.conns[idx];
        while conn.wpos < conn.wbuf.len() {
            let rest = &conn.wbuf[conn.wpos..];
            // SAFETY: writes from a live slice to a descriptor we own.
            let n = unsafe {
                libc::send(
                    conn.fd,
                    rest.as_ptr() as *const libc::c_void,
                    rest.len(),
                    libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                )
            };
            if n >= 0 {
                conn.wpos += n as usize;
            } else {
                // EAGAIN: the rest goes when the socket is writable again.
                return errno() == libc::EAGAIN;
            }
        }
        conn.wbuf.clear();
        conn.wpos = 0;
        true
    }

    /// Reads until EAGAIN, a short read (unless `hangup`: then to EOF), or
    /// EOF.
    fn read<D: Driver>(&mut self, driver: &mut D, idx: usize, hangup: bool) {
        let fd = self.conns[idx].fd;
        let mut buf = std::mem::take(&mut self.conns[idx].rbuf);
        let outcome = loop {
            if buf.len() == buf.capacity() {
                buf.reserve(buf.capacity().max(4096));
            }
            let spare = buf.capacity() - buf.len();
            // SAFETY: reads into the vector's spare capacity, then extends
            // its length by exactly what was read.
            let n = unsafe {
                libc::recv(
                    fd,
                    buf.as_mut_ptr().add(buf.len()) as *mut libc::c_void,
                    spare,
                    libc::MSG_DONTWAIT,
                )
            };
            if n > 0 {
                // SAFETY: see above.
                unsafe { buf.set_len(buf.len() + n as usize) };
                if !self.consume(driver, idx, &mut buf) {
                    // The slot was closed by a callback or a refusal.
                    break None;
                }
                if (n as usize) < spare && !hangup {
                    // A short read drained the socket; anything arriving
                    // later (a FIN included) raises a new edge, so skip the
                    // EAGAIN read.
                    break Some(false);
                }
                continue;
            }
            if n == 0 {
                break Some(true);
            }
            match errno() {
                libc::EAGAIN => break Some(false),
                libc::EINTR => continue,
                _ => break Some(true),
            }
        };
        match outcome {
            None => {
                // Slot already freed; keep the buffer's capacity.
                buf.clear();
                self.conns[idx].rbuf = buf;
            }
            Some(false) => {
                // Keep the unparsed tail: `consume` left it at the front.
                self.conns[idx].rbuf = buf;
            }
            Some(true) => {
                // EOF or error.
                let clean = self.conns[idx].state == State::Closing;
                if !clean {
                    self.stats.server_closes += 1;
                    if self.stats.first_close.is_none() {
                        self.stats.first_close = Some(format!(
                            "EOF/reset in state {:?}: {}",
                            self.conns[idx].state,
                            io::Error::last_os_error()
                        ));
                    }
                }
                self.conns[idx].rbuf = buf;
                self.release(idx);
                driver.on_gone(self, idx, clean);
            }
        }
    }

    /// Handles what `buf` holds; leaves an incomplete tail at its front.
    /// Returns false when the slot was closed meanwhile.
    fn consume<D: Driver>(&mut self, driver: &mut D, idx: usize, buf: &mut Vec<u8>) -> bool {
        let mut at = 0;
        if self.conns[idx].state == State::Upgrading {
            let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                return true;
            };
            if !buf.starts_with(b"HTTP/1.1 101") {
                self.stats.refused += 1;
                if self.stats.first_refusal.is_none() {
                    let head = String::from_utf8_lossy(&buf[..end]);
                    self.stats.first_refusal = Some(head.lines().next().unwrap_or("").to_string());
                }
                self.abort(idx);
                driver.on_gone(self, idx, false);
                return false;
            }
            at = end + 4;
            self.conns[idx].state = State::Open;
            self.handshaking -= 1;
            driver.on_open(self, idx, Instant::now());
            if self.conns[idx].state == State::Free {
                return false;
            }
        }
        if self.conns[idx].raw {
            let used = driver.on_raw(self, idx, &buf[at..], Instant::now());
            at += used;
            if self.conns[idx].state == State::Free {
                return false;
            }
        } else {
            loop {
                let rest = &buf[at..];
                if rest.len() < 2 {
                    break;
                }
                let (head, len) = match rest[1] & 0x7f {
                    126 if rest.len() >= 4 => (4, u16::from_be_bytes([rest[2], rest[3]]) as usize),
                    127 if rest.len() >= 10 => {
                        let mut b = [0u8; 8];
                        b.copy_from_slice(&rest[2..10]);
                        (10, u64::from_be_bytes(b) as usize)
                    }
                    126 | 127 => break,
                    n => (2, n as usize),
                };
                if rest[1] & 0x80 != 0 || rest[0] & 0x80 == 0 {
                    // Masked, or not final: not what these servers should send.
                    self.stats.bad_frames += 1;
                }
                if rest.len() < head + len {
                    buf.reserve((at + head + len).saturating_sub(buf.len()));
                    break;
                }
                let opcode = rest[0] & 0x0f;
                let start = at + head;
                at = start + len;
                let now = Instant::now();
                match opcode {
                    OP_PING => {
                        let mut pong = [0u8; 131];
                        let payload = &buf[start..start + len.min(125)];
                        pong[0] = 0x80 | OP_PONG;
                        pong[1] = 0x80 | payload.len() as u8;
                        pong[2..6].copy_from_slice(&MASK);
                        for (i, b) in payload.iter().enumerate() {
                            pong[6 + i] = b ^ MASK[i % 4];
                        }
                        self.send(idx, &pong[..6 + payload.len()]);
                    }
                    OP_PONG => {}
                    OP_CLOSE => {
                        if self.conns[idx].state != State::Closing {
                            self.stats.server_closes += 1;
                            if self.stats.first_close.is_none() {
                                let code = if len >= 2 {
                                    u16::from_be_bytes([buf[start], buf[start + 1]])
                                } else {
                                    0
                                };
                                let reason = String::from_utf8_lossy(&buf[start + 2.min(len)..at]);
                                self.stats.first_close =
                                    Some(format!("server Close {code} {reason:?}"));
                            }
                            self.abort(idx);
                            driver.on_gone(self, idx, false);
                            return false;
                        }
                    }
                    _ => {
                        if self.conns[idx].state == State::Open {
                            driver.on_frame(self, idx, opcode, &buf[start..at], now);
                            if self.conns[idx].state == State::Free {
                                return false;
                            }
                        }
                    }
                }
            }
        }
        buf.copy_within(at.., 0);
        buf.truncate(buf.len() - at);
        true
    }
}

impl Net {
    /// Where the live connections are, for a stall report: counts per
    /// state, and for those waiting for a 101 whether the request is still
    /// in our send queue (not yet taken by the server's kernel socket).
    pub fn snapshot(&self) -> String {
        let mut counts = [0usize; 5];
        let (mut request_queued, mut request_delivered) = (0, 0);
        for conn in &self.conns {
            let i = match conn.state {
                State::Free => 0,
                State::Connecting => 1,
                State::Upgrading => 2,
                State::Open => 3,
                State::Closing => 4,
            };
            counts[i] += 1;
            if conn.state == State::Upgrading {
                let mut outq: libc::c_int = 0;
                // SAFETY: SIOCOUTQ writes one int.
                unsafe { libc::ioctl(conn.fd, libc::TIOCOUTQ, &mut outq) };
                if outq > 0 || conn.wpos < conn.wbuf.len() {
                    request_queued += 1;
                } else {
                    request_delivered += 1;
                }
            }
        }
        format!(
            "connecting {}, awaiting 101 {} (request delivered {}, still queued {}), \
             open {}, closing {}",
            counts[1], counts[2], request_delivered, request_queued, counts[3], counts[4]
        )
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.abort_all();
        // SAFETY: closes the epoll descriptor we created.
        unsafe { libc::close(self.ep) };
    }
}
