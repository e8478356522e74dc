//! Process limits the server needs, checked and raised at start-up.
//!
//! Two limits matter. RLIMIT_MEMLOCK: glommio refuses to create an executor
//! when the soft limit is below 512 KiB (its own threshold), and each executor
//! registers 64 KiB of I/O memory with each of its three io_uring rings,
//! which the kernel charges as locked memory (a failed registration only
//! costs file-I/O speed, which this server does not use). RLIMIT_NOFILE: every
//! WebSocket connection holds one descriptor, and each executor a handful.
//! Soft limits are raised to the hard limits; the server fails only when it
//! cannot run at all, and says what it needs, what it found, and how to raise
//! it.

use std::io;

/// glommio's start-up threshold on the soft RLIMIT_MEMLOCK.
pub const GLOMMIO_MEMLOCK_THRESHOLD: u64 = 512 * 1024;
/// Locked memory one executor registers: 64 KiB for each of three rings.
pub const MEMLOCK_PER_EXECUTOR: u64 = 3 * 64 * 1024;
/// Descriptors used apart from connections: stdio, listeners, and per
/// executor its rings, eventfds and timers, with room to spare.
pub const DESCRIPTOR_RESERVE_BASE: u64 = 64;
pub const DESCRIPTORS_PER_EXECUTOR: u64 = 16;

/// A soft and hard limit pair.
#[derive(Debug, Clone, Copy)]
pub struct Limit {
    pub soft: u64,
    pub hard: u64,
}

/// What the start-up check found and did.
#[derive(Debug, Clone, Copy)]
pub struct Report {
    pub memlock: Limit,
    pub memlock_wanted: u64,
    pub nofile: Limit,
    /// Descriptors left for connections across all shards.
    pub connection_descriptors: u64,
}

/// Why the server cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(
        "RLIMIT_MEMLOCK soft limit is {found} bytes (hard {hard}); glommio needs at least \
         {needed} bytes to start its executors. Raise it with `ulimit -l {needed_kib}` (as \
         root, or after raising the hard limit in /etc/security/limits.conf), or \
         LimitMEMLOCK= in a systemd unit; see tuning.md"
    )]
    Memlock {
        found: u64,
        hard: u64,
        needed: u64,
        needed_kib: u64,
    },
    #[error(
        "RLIMIT_NOFILE soft limit is {found} (hard {hard}); the server needs at least {needed} \
         descriptors to run. Raise it with `ulimit -n 65536`, LimitNOFILE= in a systemd unit, \
         or /etc/security/limits.conf; see tuning.md"
    )]
    Nofile { found: u64, hard: u64, needed: u64 },
    #[error("cannot read or set a resource limit: {0}")]
    Io(#[from] io::Error),
}

fn get(resource: libc::__rlimit_resource_t) -> io::Result<Limit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit struct into valid, owned memory.
    if unsafe { libc::getrlimit(resource, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Limit {
        soft: limit.rlim_cur,
        hard: limit.rlim_max,
    })
}

/// Raises the soft limit to the hard one; returns the limits now in force.
fn raise(resource: libc::__rlimit_resource_t) -> io::Result<Limit> {
    let limit = get(resource)?;
    if limit.soft < limit.hard {
        let wanted = libc::rlimit {
            rlim_cur: limit.hard,
            rlim_max: limit.hard,
        };
        // SAFETY: setrlimit reads one valid rlimit struct.
        if unsafe { libc::setrlimit(resource, &wanted) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    get(resource)
}

/// Checks and raises both limits for `executors` executors (shards plus the
/// router). Fails only when the server cannot run.
pub fn prepare(executors: usize) -> Result<Report, StartupError> {
    let executors = executors as u64;

    let memlock = raise(libc::RLIMIT_MEMLOCK)?;
    let memlock_wanted = GLOMMIO_MEMLOCK_THRESHOLD.max(executors * MEMLOCK_PER_EXECUTOR);
    if memlock.soft < GLOMMIO_MEMLOCK_THRESHOLD {
        return Err(StartupError::Memlock {
            found: memlock.soft,
            hard: memlock.hard,
            needed: GLOMMIO_MEMLOCK_THRESHOLD,
            needed_kib: GLOMMIO_MEMLOCK_THRESHOLD / 1024,
        });
    }

    let nofile = raise(libc::RLIMIT_NOFILE)?;
    let reserve = DESCRIPTOR_RESERVE_BASE + executors * DESCRIPTORS_PER_EXECUTOR;
    if nofile.soft < reserve + 16 {
        return Err(StartupError::Nofile {
            found: nofile.soft,
            hard: nofile.hard,
            needed: reserve + 16,
        });
    }

    Ok(Report {
        memlock,
        memlock_wanted,
        nofile,
        connection_descriptors: nofile.soft - reserve,
    })
}

/// The CPUs this process may run on, in order.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; zeroed is a valid empty set, and
    // sched_getaffinity writes at most size_of::<cpu_set_t>() bytes into it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: see above; pid 0 is the calling thread.
    let ok = unsafe { libc::sched_getaffinity(0, size, &mut set) } == 0;
    let cpus: Vec<usize> = if ok {
        // SAFETY: CPU_ISSET reads the set initialised above.
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
            .collect()
    } else {
        Vec::new()
    };
    if cpus.is_empty() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        return (0..n).collect();
    }
    cpus
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prepare_succeeds_on_this_machine_and_reports() {
        let report = prepare(3).expect("the test machine can run the server");
        assert!(report.memlock.soft >= GLOMMIO_MEMLOCK_THRESHOLD);
        assert!(report.connection_descriptors > 0);
        assert!(report.memlock_wanted >= GLOMMIO_MEMLOCK_THRESHOLD);
    }

    #[test]
    fn at_least_one_cpu() {
        assert!(!allowed_cpus().is_empty());
    }

    #[test]
    fn error_says_what_to_do() {
        let err = StartupError::Memlock {
            found: 65536,
            hard: 65536,
            needed: GLOMMIO_MEMLOCK_THRESHOLD,
            needed_kib: 512,
        };
        let text = err.to_string();
        assert!(text.contains("ulimit -l 512"));
        assert!(text.contains("tuning.md"));
    }
}
