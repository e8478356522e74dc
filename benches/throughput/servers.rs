//! Server processes under test: shardgate's binary and the peer servers
//! (this bench binary re-executed with `--serve-peer`). Each is pinned with
//! a pre_exec hook, dies with the bench (PR_SET_PDEATHSIG) and is killed and
//! reaped when its `Proc` is dropped, panics included.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub const SECRET: &str = "throughput-bench-secret-0123456789abcdef";
pub const API_KEY: &str = "throughput-bench-api-key-0123456789";

pub fn cpu_set(cpus: &[usize]) -> libc::cpu_set_t {
    // SAFETY: cpu_set_t is plain data; the macros index within it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &cpu in cpus {
            libc::CPU_SET(cpu, &mut set);
        }
        set
    }
}

/// Pins the calling thread.
pub fn pin_current_thread(cpu: usize) -> bool {
    let set = cpu_set(&[cpu]);
    // SAFETY: sets the calling thread's affinity from a valid set.
    unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0 }
}

/// Raises RLIMIT_NOFILE (soft and, as root, hard) to at least `want`;
/// returns the soft limit in force afterwards.
pub fn raise_nofile(want: u64) -> u64 {
    // SAFETY: reads and writes a resource limit through valid pointers.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        if lim.rlim_cur >= want {
            return lim.rlim_cur;
        }
        let wanted = libc::rlimit {
            rlim_cur: want,
            rlim_max: lim.rlim_max.max(want),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) != 0 {
            let soft = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            libc::setrlimit(libc::RLIMIT_NOFILE, &soft);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur
    }
}

pub struct Proc {
    child: Child,
    pub addr: SocketAddr,
    pub pid: i32,
    pub log: PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"))
}

/// Spawns `cmd` pinned to `cpus`, waits for a line with `marker` followed by
/// the address on its stdout, and keeps draining stdout afterwards.
fn spawn(mut cmd: Command, cpus: &[usize], marker: &'static str, label: &str) -> Proc {
    let set = cpu_set(cpus);
    let logs = target_dir().join("bench-logs");
    let _ = std::fs::create_dir_all(&logs);
    static SERIAL: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let serial = SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let log = logs.join(format!(
        "{serial:03}-{}.log",
        label.replace([' ', '/'], "_")
    ));
    let stderr = File::create(&log).expect("create server log");
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::from(stderr))
        .stdin(Stdio::null());
    // SAFETY: the hook only makes async-signal-safe system calls.
    unsafe {
        cmd.pre_exec(move || {
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {label}: {e}"));
    let pid = child.id() as i32;
    // Owned from here on, so the child is killed on every path.
    let mut proc = Proc {
        child,
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        pid,
        log,
    };
    let stdout = proc.child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        for line in lines.by_ref() {
            let Ok(line) = line else { break };
            if let Some(addr) = line.trim().strip_prefix(marker) {
                let _ = tx.send(addr.trim().to_string());
                break;
            }
        }
        // Keep draining so the child never blocks on a full pipe.
        for _ in lines {}
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|_| panic!("{label} did not report its address; see {:?}", proc.log));
    proc.addr = addr.parse().expect("address");
    proc
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alg {
    Hs256,
    Rs256,
    Es256,
    EdDsa,
}

impl Alg {
    pub fn name(self) -> &'static str {
        match self {
            Alg::Hs256 => "HS256",
            Alg::Rs256 => "RS256",
            Alg::Es256 => "ES256",
            Alg::EdDsa => "EdDSA",
        }
    }

    fn fixture(self) -> Option<&'static str> {
        match self {
            Alg::Hs256 => None,
            Alg::Rs256 => Some("rsa"),
            Alg::Es256 => Some("ec"),
            Alg::EdDsa => Some("ed25519"),
        }
    }

    pub fn public_key(self) -> Option<PathBuf> {
        self.fixture().map(|f| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/{f}_public.pem"))
        })
    }

    pub fn private_key(self) -> Option<PathBuf> {
        self.fixture().map(|f| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join(format!("tests/fixtures/{f}_private.pem"))
        })
    }
}

/// shardgate with `shards` shards, the whole process pinned to `cpus`.
pub fn shardgate(shards: u16, cpus: &[usize], alg: Alg, label: &str) -> Proc {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_shardgate"));
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--shards"])
        .arg(shards.to_string())
        .args([
            "--rate-limit",
            "0",
            "--enable-echo",
            "--max-connections-per-user",
            "64",
            "--outbound-queue-messages",
            "65536",
        ])
        .env("SHARDGATE_API_KEY", API_KEY)
        .env("RUST_LOG", "warn");
    match alg.public_key() {
        Some(key) => {
            cmd.arg("--jwt-public-key")
                .arg(key)
                .args(["--jwt-alg", alg.name()])
                .env_remove("SHARDGATE_JWT_SECRET");
        }
        None => {
            cmd.env("SHARDGATE_JWT_SECRET", SECRET);
        }
    }
    spawn(cmd, cpus, "shardgate listening on http://", label)
}

/// A peer server: this binary re-executed with `--serve-peer NAME`.
pub fn peer(name: &str, threads: usize, cpus: &[usize], label: &str) -> Proc {
    let exe = std::env::current_exe().expect("current_exe");
    let mut cmd = Command::new(exe);
    cmd.args(["--serve-peer", name, "--listen", "127.0.0.1:0", "--threads"])
        .arg(threads.to_string())
        .env("SHARDGATE_JWT_SECRET", SECRET);
    spawn(cmd, cpus, "peer listening on ", label)
}

/// utime + stime of the whole process (all threads), in seconds.
pub fn cpu_seconds(pid: i32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the command name: state is field 3, utime 14, stime 15.
    let ticks: u64 = fields.get(11).and_then(|f| f.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|f| f.parse().ok()).unwrap_or(0);
    // SAFETY: plain query.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks as f64 / hz
}

/// VmRSS in KiB.
pub fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// CPU time of the calling thread, in seconds.
pub fn thread_cpu_seconds() -> f64 {
    // SAFETY: fills a zeroed rusage.
    unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_THREAD, &mut usage);
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        tv(usage.ru_utime) + tv(usage.ru_stime)
    }
}

/// Busy time (all but idle and iowait) of `cpus` from /proc/stat, in seconds.
pub fn cpus_busy_seconds(cpus: &[usize]) -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return 0.0;
    };
    // SAFETY: plain query.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mut ticks = 0u64;
    for line in stat.lines() {
        let mut fields = line.split_whitespace();
        let Some(name) = fields.next() else { continue };
        let Some(cpu) = name
            .strip_prefix("cpu")
            .and_then(|n| n.parse::<usize>().ok())
        else {
            continue;
        };
        if !cpus.contains(&cpu) {
            continue;
        }
        let values: Vec<u64> = fields.filter_map(|f| f.parse().ok()).collect();
        // user nice system idle iowait irq softirq steal (guest is in user).
        let busy: u64 = values
            .iter()
            .take(8)
            .enumerate()
            .filter(|(i, _)| *i != 3 && *i != 4)
            .map(|(_, v)| v)
            .sum();
        ticks += busy;
    }
    ticks as f64 / hz
}
