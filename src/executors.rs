//! Executor threads: their start-up reports and the watchdog that keeps
//! them awake.
//!
//! A glommio executor is built on its own thread, after the spawning call
//! has already returned: creating its io_uring rings or its blocking thread
//! can still fail there. Each part therefore reports once it serves; the
//! server announces its address only when every part has, and ends with
//! the reason when one cannot start.
//!
//! glommio 0.9 can also put an executor to sleep while tasks are ready to
//! run: when the thread loses its CPU for longer than the preempt timer
//! between arming that timer and running its task queues, the scheduler
//! reads "preempted" as "nothing to run" and parks. Its timers were then
//! seen not to wake it either: a router slept 14 s with three requests
//! read and waiting, a new shard never polled its first task. Each
//! executor therefore runs a heartbeat task, and a watchdog thread kicks an
//! executor whose heartbeat has stopped: a signal whose handler does
//! nothing interrupts the thread's wait in its ring, and the executor looks
//! at its queues again. A kick costs a busy executor nothing but the
//! handler's return.

use std::future::Future;
use std::os::unix::thread::JoinHandleExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use glommio::LocalExecutorBuilder;

/// How often an executor's heartbeat task runs.
const HEARTBEAT: Duration = Duration::from_millis(10);

/// An executor's thread; it ends with the reason the executor could not be
/// built, if it could not.
pub struct ExecutorThread {
    name: String,
    handle: JoinHandle<Result<(), String>>,
    beats: Arc<AtomicU64>,
}

impl ExecutorThread {
    /// Starts a thread named `name` that builds an executor with `builder`
    /// and runs the future made by `task` on it until that future ends,
    /// with a heartbeat task beside it.
    pub fn spawn<B, T, F>(name: &str, builder: B, task: T) -> std::io::Result<Self>
    where
        B: FnOnce() -> LocalExecutorBuilder + Send + 'static,
        T: FnOnce() -> F + Send + 'static,
        F: Future<Output = ()> + 'static,
    {
        let beats = Arc::new(AtomicU64::new(0));
        let counter = beats.clone();
        let handle = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                let executor = builder().make().map_err(|err| err.to_string())?;
                executor.run(async move {
                    // Detached: it ends with the executor, when `task` ends.
                    glommio::spawn_local(async move {
                        loop {
                            counter.fetch_add(1, Ordering::Relaxed);
                            glommio::timer::sleep(HEARTBEAT).await;
                        }
                    })
                    .detach();
                    task().await;
                });
                Ok(())
            })?;
        Ok(ExecutorThread {
            name: name.to_owned(),
            handle,
            beats,
        })
    }

    /// Interrupts whatever the thread is waiting in, so that a parked
    /// executor looks at its task queues again. Harmless to a thread that is
    /// busy: the handler does nothing, and glommio retries an interrupted
    /// wait.
    pub fn kick(&self) {
        kick(self.handle.as_pthread_t());
    }

    /// What the watchdog needs to look after this thread. The watchdog must
    /// be stopped before this thread is joined.
    pub fn watched(&self) -> Watched {
        Watched {
            name: self.name.clone(),
            thread: self.handle.as_pthread_t(),
            beats: self.beats.clone(),
        }
    }

    /// Whether the thread has ended (it may still be joined).
    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }

    /// Waits for the thread to end.
    pub fn join(self) -> Result<(), String> {
        match self.handle.join() {
            Ok(result) => result,
            Err(_) => Err("the executor thread panicked".to_owned()),
        }
    }
}

fn kick(thread: libc::pthread_t) {
    // SAFETY: callers pass the pthread_t of a thread that has not been
    // joined (a thread that has ended stays valid until joined), and the
    // signal's handler, installed by `install_kick_handler`, does nothing.
    unsafe { libc::pthread_kill(thread, kick_signal()) };
}

/// One executor thread as the watchdog sees it.
pub struct Watched {
    name: String,
    thread: libc::pthread_t,
    beats: Arc<AtomicU64>,
}

/// A thread that kicks executors whose heartbeat has stopped.
pub struct Watchdog {
    stop: mpsc::Sender<()>,
    thread: JoinHandle<()>,
}

impl Watchdog {
    /// How often the watchdog looks: more than two heartbeats apart, so a
    /// running executor has always beaten in between.
    pub const PERIOD: Duration = Duration::from_millis(25);

    /// Starts watching `executors`. Stop the watchdog before joining any
    /// of their threads.
    pub fn start(executors: Vec<Watched>) -> std::io::Result<Self> {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("watchdog".to_owned())
            .spawn(move || watch(&executors, &stopped))?;
        Ok(Watchdog { stop, thread })
    }

    /// Stops the watchdog and waits for it, after which the watched threads
    /// may be joined.
    pub fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.thread.join();
    }
}

fn watch(executors: &[Watched], stopped: &mpsc::Receiver<()>) {
    let mut last: Vec<u64> = executors.iter().map(|_| u64::MAX).collect();
    let mut kicks = 0u64;
    let mut last_report = Instant::now();
    let mut unreported = 0u64;
    while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(Watchdog::PERIOD) {
        for (executor, seen) in executors.iter().zip(last.iter_mut()) {
            let beats = executor.beats.load(Ordering::Relaxed);
            if beats == *seen {
                kick(executor.thread);
                kicks += 1;
                unreported += 1;
                tracing::debug!(executor = %executor.name, "heartbeat stopped; kicked");
            }
            *seen = beats;
        }
        if unreported > 0 && last_report.elapsed() >= Duration::from_secs(1) {
            tracing::info!(
                kicks = unreported,
                kicks_total = kicks,
                "woke stalled executors"
            );
            unreported = 0;
            last_report = Instant::now();
        }
    }
}

/// The signal used by [`ExecutorThread::kick`]: the second real-time signal,
/// which nothing else in the process uses.
fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN() + 1
}

extern "C" fn ignore_kick(_: libc::c_int) {}

/// Installs the do-nothing handler for the kick signal. Without
/// `SA_RESTART`, so that a kicked `io_uring_enter` returns instead of
/// resuming its wait. Call it before starting executor threads.
pub fn install_kick_handler() -> std::io::Result<()> {
    // SAFETY: sigaction with a zeroed, then filled, struct whose handler is
    // an extern "C" function that touches nothing (async-signal-safe).
    let result = unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = ignore_kick as extern "C" fn(libc::c_int) as libc::sighandler_t;
        libc::sigemptyset(&mut action.sa_mask);
        action.sa_flags = 0;
        libc::sigaction(kick_signal(), &action, std::ptr::null_mut())
    };
    if result == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A part of the server that runs on its own executor thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Router,
    Shard(usize),
}

impl std::fmt::Display for Part {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Part::Router => f.write_str("router"),
            Part::Shard(index) => write!(f, "shard {index}"),
        }
    }
}

/// Given to one part; dropping it without [`Reporter::ready`] tells the
/// server that the part will never start.
pub struct Reporter {
    part: Part,
    sender: mpsc::Sender<Part>,
}

impl Reporter {
    /// Says that the part is serving.
    pub fn ready(self) {
        // The server stops listening only once it has given up; a report
        // that comes after that has nobody left to tell.
        let _ = self.sender.send(self.part);
    }
}

/// Why the server could not start every part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// These parts ended without reporting (their threads exited).
    Ended(Vec<Part>),
    /// These parts had not reported when the time ran out.
    TimedOut(Vec<Part>),
}

/// Collects the reports of every part the server starts.
pub struct Startup {
    sender: mpsc::Sender<Part>,
    receiver: mpsc::Receiver<Part>,
    expected: Vec<Part>,
}

impl Default for Startup {
    fn default() -> Self {
        Self::new()
    }
}

impl Startup {
    pub fn new() -> Self {
        let (sender, receiver) = mpsc::channel();
        Startup {
            sender,
            receiver,
            expected: Vec::new(),
        }
    }

    /// A reporter for `part`, which the server will then wait for.
    pub fn reporter(&mut self, part: Part) -> Reporter {
        self.expected.push(part);
        Reporter {
            part,
            sender: self.sender.clone(),
        }
    }

    /// Waits until every part has reported, until one has ended without
    /// reporting, or until `timeout`. `slow` is called with the missing
    /// parts each time `notice` passes without news.
    pub fn wait(
        self,
        timeout: Duration,
        notice: Duration,
        mut slow: impl FnMut(&[Part], Duration),
    ) -> Result<(), Failure> {
        let Startup {
            sender,
            receiver,
            mut expected,
        } = self;
        // Only the reporters may keep the channel open now, so a part whose
        // thread ends without reporting shows up as a disconnect.
        drop(sender);
        let started = Instant::now();
        let deadline = started + timeout;
        while !expected.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Failure::TimedOut(expected));
            }
            match receiver.recv_timeout(left.min(notice)) {
                Ok(part) => expected.retain(|p| *p != part),
                Err(mpsc::RecvTimeoutError::Timeout) => slow(&expected, started.elapsed()),
                Err(mpsc::RecvTimeoutError::Disconnected) => return Err(Failure::Ended(expected)),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LONG: Duration = Duration::from_secs(10);

    #[test]
    fn every_part_reporting_from_its_thread_completes_the_start() {
        let mut startup = Startup::new();
        let parts = [Part::Shard(0), Part::Shard(1), Part::Router];
        let threads: Vec<_> = parts
            .iter()
            .map(|&part| {
                let reporter = startup.reporter(part);
                std::thread::spawn(move || reporter.ready())
            })
            .collect();
        assert_eq!(startup.wait(LONG, LONG, |_, _| {}), Ok(()));
        for thread in threads {
            thread.join().expect("reporter thread");
        }
    }

    #[test]
    fn a_part_that_ends_without_reporting_fails_the_start_at_once() {
        let mut startup = Startup::new();
        let ok = startup.reporter(Part::Shard(0));
        let lost = startup.reporter(Part::Shard(1));
        let router = startup.reporter(Part::Router);
        ok.ready();
        router.ready();
        std::thread::spawn(move || drop(lost))
            .join()
            .expect("thread");
        let began = Instant::now();
        assert_eq!(
            startup.wait(LONG, LONG, |_, _| {}),
            Err(Failure::Ended(vec![Part::Shard(1)]))
        );
        assert!(
            began.elapsed() < LONG,
            "a disconnect must not wait out the timeout"
        );
    }

    #[test]
    fn a_part_that_never_reports_times_out_after_notices() {
        let mut startup = Startup::new();
        let _silent = startup.reporter(Part::Router);
        let mut notices = 0;
        let result = startup.wait(
            Duration::from_millis(60),
            Duration::from_millis(10),
            |missing, _| {
                assert_eq!(missing, [Part::Router]);
                notices += 1;
            },
        );
        assert_eq!(result, Err(Failure::TimedOut(vec![Part::Router])));
        assert!(notices >= 2, "the waiter was told {notices} times");
    }

    #[test]
    fn an_executor_that_cannot_be_built_ends_its_thread_with_the_reason() {
        let thread = ExecutorThread::spawn(
            "unbuildable",
            // No machine has this CPU, so binding to it fails.
            || LocalExecutorBuilder::new(glommio::Placement::Fixed(1 << 20)),
            || async {},
        )
        .expect("thread");
        let reason = thread.join().expect_err("the build must fail");
        assert!(!reason.is_empty());
    }

    #[test]
    fn kicks_leave_a_running_executor_working() {
        install_kick_handler().expect("handler");
        let (done, finished) = mpsc::channel();
        let thread = ExecutorThread::spawn(
            "kicked",
            || LocalExecutorBuilder::new(glommio::Placement::Unbound).io_memory(0),
            move || async move {
                // Parked in its ring for most of this time, then woken by
                // kicks and by the timers.
                for _ in 0..20 {
                    glommio::timer::sleep(Duration::from_millis(10)).await;
                }
                let _ = done.send(());
            },
        )
        .expect("thread");
        for _ in 0..40 {
            thread.kick();
            std::thread::sleep(Duration::from_millis(5));
        }
        finished.recv_timeout(LONG).expect("the task finished");
        assert_eq!(thread.join(), Ok(()));
    }

    /// A thread that waits in `pause()` and counts how often a signal
    /// interrupted it, with the watchdog's view of it.
    fn pausing_thread(beats: Arc<AtomicU64>) -> (Watched, Arc<AtomicU64>, JoinHandle<()>) {
        let interrupted = Arc::new(AtomicU64::new(0));
        let count = interrupted.clone();
        let handle = std::thread::spawn(move || {
            while count.load(Ordering::Relaxed) < u64::MAX / 2 {
                // SAFETY: pause() only waits for a signal.
                unsafe { libc::pause() };
                count.fetch_add(1, Ordering::Relaxed);
            }
        });
        let watched = Watched {
            name: "pausing".to_owned(),
            thread: handle.as_pthread_t(),
            beats,
        };
        (watched, interrupted, handle)
    }

    /// Ends a `pausing_thread`: tells it to stop, then kicks it out of pause.
    fn end_pausing(interrupted: &AtomicU64, handle: JoinHandle<()>) {
        interrupted.store(u64::MAX / 2, Ordering::Relaxed);
        while !handle.is_finished() {
            kick(handle.as_pthread_t());
            std::thread::sleep(Duration::from_millis(1));
        }
        handle.join().expect("pausing thread");
    }

    #[test]
    fn the_watchdog_kicks_a_thread_whose_heartbeat_stopped() {
        install_kick_handler().expect("handler");
        let (watched, interrupted, handle) = pausing_thread(Arc::new(AtomicU64::new(0)));
        let watchdog = Watchdog::start(vec![watched]).expect("watchdog");
        let began = Instant::now();
        while interrupted.load(Ordering::Relaxed) < 2 && began.elapsed() < LONG {
            std::thread::sleep(Duration::from_millis(5));
        }
        watchdog.stop();
        assert!(interrupted.load(Ordering::Relaxed) >= 2, "the silent thread was not kicked");
        end_pausing(&interrupted, handle);
    }

    #[test]
    fn the_watchdog_leaves_a_beating_thread_alone() {
        install_kick_handler().expect("handler");
        let beats = Arc::new(AtomicU64::new(0));
        let (watched, interrupted, handle) = pausing_thread(beats.clone());
        let watchdog = Watchdog::start(vec![watched]).expect("watchdog");
        let began = Instant::now();
        let mut looks = 0;
        while began.elapsed() < Watchdog::PERIOD * 12 {
            beats.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(1));
            looks += 1;
        }
        watchdog.stop();
        // Twelve looks by the watchdog; a loaded machine may keep this test's
        // thread from beating through one or two of them, no more.
        let kicked = interrupted.load(Ordering::Relaxed);
        assert!(kicked <= 3, "a beating thread was kicked {kicked} times ({looks} beats)");
        end_pausing(&interrupted, handle);
    }
}
