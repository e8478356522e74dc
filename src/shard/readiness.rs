//! Socket readiness for a shard's connections, from one epoll instance.
//!
//! glommio 0.9 learns that a socket has input by a one-shot io_uring poll,
//! armed again after every short read. When bytes then arrive, the kernel
//! completes that poll by queueing work for the shard's thread and, when
//! the thread is running on another CPU, interrupting it (an IPI): one
//! interrupt of the shard per message received, and the sender's CPU pays
//! for sending it. On loopback that took more than half of the load
//! generator's time and about a seventh of the shard's (see tuning.md).
//!
//! Instead, the shard reads and writes its connection sockets itself with
//! non-blocking system calls, and learns when to try again from one
//! edge-triggered epoll instance holding all of them. The [`Poller`]'s task
//! collects what is ready with a non-blocking `epoll_wait` each time it
//! runs and wakes those connections. Only when nothing is ready does it ask
//! glommio to wait for the epoll descriptor itself: one poll for the whole
//! shard, armed only when the shard has run out of input.
//!
//! A connection clears its flag before each attempt and sets it back only
//! when the attempt shows more may be waiting (a full buffer, or a hang-up
//! not yet read), so an edge that arrives during the attempt is never lost:
//! the kernel queues a new event for any input or write space that comes
//! after the event last collected.

use std::cell::Cell;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;

use futures_lite::AsyncReadExt;
use glommio::net::TcpStream;

use super::Shard;

/// Events collected by one `epoll_wait`.
const EVENTS_PER_WAIT: usize = 256;

/// Whether a socket may have input or room for output. Both start true, so
/// a new connection tries its first read and write at once.
#[derive(Debug)]
pub struct SocketReady {
    pub readable: Cell<bool>,
    pub writable: Cell<bool>,
    /// The peer's FIN or reset has arrived. A read that returns less than
    /// asked for then does not mean the socket is drained: the end of
    /// stream (or the error) is still to be read, and no new edge will
    /// announce it, so reading goes on until it is.
    pub hung_up: Cell<bool>,
}

impl Default for SocketReady {
    fn default() -> Self {
        SocketReady {
            readable: Cell::new(true),
            writable: Cell::new(true),
            hung_up: Cell::new(false),
        }
    }
}

/// The shard's epoll instance.
pub struct Poller {
    epoll: OwnedFd,
}

impl Poller {
    pub fn new() -> io::Result<Poller> {
        // SAFETY: plain system call; the result is checked before use.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Poller { epoll })
    }

    /// Watches `fd` for connection `id`, edge-triggered: input, hang-up,
    /// and write space after a send that found the buffer full.
    pub fn register(&self, fd: RawFd, id: u64) -> io::Result<()> {
        let mut event = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32,
            u64: id,
        };
        // SAFETY: both descriptors are open; the event is a valid struct.
        let rc =
            unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut event) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Stops watching `fd`; call it while `fd` is still open.
    pub fn deregister(&self, fd: RawFd) {
        // SAFETY: a null event is allowed for EPOLL_CTL_DEL.
        unsafe {
            libc::epoll_ctl(
                self.epoll.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                fd,
                std::ptr::null_mut(),
            )
        };
    }

    /// Runs for the life of the shard: wakes the connections whose sockets
    /// turned ready, letting them run between two collections.
    pub async fn drive(shard: Rc<Shard>) {
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; EVENTS_PER_WAIT];
        loop {
            let epoll = shard.poller.epoll.as_raw_fd();
            // SAFETY: the buffer holds `events.len()` entries.
            let n = unsafe {
                libc::epoll_wait(epoll, events.as_mut_ptr(), events.len() as libc::c_int, 0)
            };
            if n > 0 {
                for event in &events[..n as usize] {
                    shard.socket_ready(event.u64, event.events);
                }
                futures_lite::future::yield_now().await;
                continue;
            }
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.kind() != io::ErrorKind::Interrupted {
                    tracing::error!(shard = shard.index, cause = %err, "epoll_wait failed");
                }
            }
            if let Err(err) = shard.poller.wait_readable().await {
                tracing::error!(shard = shard.index, cause = %err, "cannot wait for epoll");
                glommio::timer::sleep(std::time::Duration::from_millis(1)).await;
            }
        }
    }

    /// Waits until the epoll instance has events.
    ///
    /// glommio 0.9 has no public call that awaits readiness of an arbitrary
    /// descriptor, but wrapping one in its `TcpStream` arms exactly that: a
    /// one-shot io_uring poll for input, submitted with the executor's next
    /// batch (and completed at once if events are already there). The first
    /// read on the wrapper waits for that poll, then fails because an epoll
    /// descriptor is no socket, which is all this needs to know. The
    /// wrapper owns a duplicate, so dropping it leaves the instance open.
    async fn wait_readable(&self) -> io::Result<()> {
        // SAFETY: duplicates a descriptor we own; the result is checked.
        let copy = unsafe { libc::fcntl(self.epoll.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
        if copy < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `copy` is a new descriptor; the wrapper becomes its owner.
        let mut waiter = unsafe { TcpStream::from_raw_fd(copy) };
        let mut byte = [0u8; 1];
        let _ = waiter.read(&mut byte).await;
        Ok(())
    }
}

/// Reads into `buf` without blocking: `Ok(None)` when there is nothing to
/// read now.
pub fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<Option<usize>> {
    without_blocking(|| {
        // SAFETY: writes at most `buf.len()` bytes into `buf`.
        unsafe {
            libc::recv(
                fd,
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        }
    })
}

/// Writes from `buf` without blocking: `Ok(None)` when the socket's buffer
/// is full.
pub fn send(fd: RawFd, buf: &[u8]) -> io::Result<Option<usize>> {
    without_blocking(|| {
        // SAFETY: reads at most `buf.len()` bytes from `buf`.
        unsafe {
            libc::send(
                fd,
                buf.as_ptr() as *const libc::c_void,
                buf.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        }
    })
}

/// Runs a non-blocking socket call, again when a signal interrupted it.
fn without_blocking(mut call: impl FnMut() -> isize) -> io::Result<Option<usize>> {
    loop {
        let n = call();
        if n >= 0 {
            return Ok(Some(n as usize));
        }
        let err = io::Error::last_os_error();
        match err.kind() {
            io::ErrorKind::WouldBlock => return Ok(None),
            io::ErrorKind::Interrupted => continue,
            _ => return Err(err),
        }
    }
}
