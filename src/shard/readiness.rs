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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::{Shutdown, TcpListener, TcpStream as StdTcpStream};

    fn loopback_pair() -> (StdTcpStream, StdTcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = StdTcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        (client, server)
    }

    /// Loopback delivers within the sender's system call, unless the
    /// kernel defers its softirq work; this leaves room for that.
    fn settle() {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }

    /// Events waiting on the poller now, as (connection id, events).
    fn collect(poller: &Poller) -> Vec<(u64, u32)> {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 8];
        // SAFETY: the buffer holds 8 entries.
        let n = unsafe { libc::epoll_wait(poller.epoll.as_raw_fd(), events.as_mut_ptr(), 8, 0) };
        assert!(n >= 0, "{}", io::Error::last_os_error());
        events[..n as usize]
            .iter()
            .map(|e| (e.u64, e.events))
            .collect()
    }

    #[test]
    fn would_block_is_none_and_bytes_are_counted() {
        let (mut client, server) = loopback_pair();
        let fd = server.as_raw_fd();
        let mut buf = [0u8; 64];
        assert_eq!(recv(fd, &mut buf).unwrap(), None);
        client.write_all(b"hello").unwrap();
        settle();
        assert_eq!(recv(fd, &mut buf).unwrap(), Some(5));
        assert_eq!(&buf[..5], b"hello");

        // Writing to a peer that never reads ends in a full buffer.
        let chunk = vec![7u8; 64 * 1024];
        let mut full = false;
        for _ in 0..10_000 {
            if send(fd, &chunk).unwrap().is_none() {
                full = true;
                break;
            }
        }
        assert!(full, "the send buffer never filled");
    }

    #[test]
    fn events_carry_the_connection_id_and_come_once_per_change() {
        let poller = Poller::new().unwrap();
        let (mut client, server) = loopback_pair();
        poller.register(server.as_raw_fd(), 42).unwrap();
        settle();

        // Registering reports the current state once: writable.
        let first = collect(&poller);
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].0, 42);
        assert!(first[0].1 & libc::EPOLLOUT as u32 != 0);
        assert!(collect(&poller).is_empty(), "edge-triggered: reported once");

        client.write_all(b"x").unwrap();
        settle();
        let input = collect(&poller);
        assert_eq!(input.len(), 1);
        assert!(input[0].1 & libc::EPOLLIN as u32 != 0);
        assert!(collect(&poller).is_empty());

        poller.deregister(server.as_raw_fd());
        client.write_all(b"y").unwrap();
        settle();
        assert!(collect(&poller).is_empty(), "no events after deregister");
    }

    /// Why a read after a hang-up keeps the socket marked readable: data
    /// and FIN that arrive before the events are collected make a single
    /// edge, the read returns only the data, and no new edge announces the
    /// end of stream still to be read.
    #[test]
    fn data_and_fin_together_raise_one_edge() {
        let poller = Poller::new().unwrap();
        let (mut client, server) = loopback_pair();
        poller.register(server.as_raw_fd(), 1).unwrap();
        collect(&poller);

        client.write_all(b"last words").unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        settle();
        let events = collect(&poller);
        assert_eq!(events.len(), 1);
        assert!(
            events[0].1 & libc::EPOLLRDHUP as u32 != 0,
            "{:#x}",
            events[0].1
        );

        let mut buf = [0u8; 64];
        assert_eq!(recv(server.as_raw_fd(), &mut buf).unwrap(), Some(10));
        assert!(collect(&poller).is_empty(), "no second edge for the FIN");
        assert_eq!(recv(server.as_raw_fd(), &mut buf).unwrap(), Some(0));
    }
}
