//! Executor threads: their start-up reports and the watchdog that keeps
//! them awake.
//!
//! A glommio executor is built on its own thread, after the spawning call
//! has already returned: creating its io_uring rings or its blocking thread
//! can still fail there. Each part therefore reports once it serves; the
//! server announces its address only when every part has, and ends with
//! the reason as soon as one part gives up.
//!
//! glommio 0.9 can also put an executor to sleep while tasks are ready to
//! run: when the thread loses its CPU for longer than the preempt timer
//! between arming that timer and running its task queues, the scheduler
//! reads "preempted" as "nothing to run" and parks. Its timers were then
//! seen not to wake it either: a router slept 14 s with three requests
//! read and waiting, a new shard never polled its first task. Each
//! executor therefore runs a heartbeat task, and a watchdog thread kicks a
//! running executor whose heartbeat has stopped: a signal whose handler
//! does nothing interrupts the thread's wait in its ring, glommio returns
//! from that wait, and the executor looks at its queues again. A kick costs
//! a busy executor nothing but the handler's return.

use std::future::Future;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use glommio::{LocalExecutorBuilder, Placement};

/// How often an executor's heartbeat task runs.
const HEARTBEAT: Duration = Duration::from_millis(10);

/// What an executor thread is doing, as the watchdog sees it.
const BUILDING: u8 = 0;
const RUNNING: u8 = 1;
const DONE: u8 = 2;

/// Shared between an executor thread and the watchdog: no user or
/// connection state, only whether the thread's scheduler still turns.
struct Pulse {
    state: AtomicU8,
    beats: AtomicU64,
}

impl Pulse {
    fn new() -> Self {
        Pulse {
            state: AtomicU8::new(BUILDING),
            beats: AtomicU64::new(0),
        }
    }
}

/// An executor's thread; it ends with the reason the executor could not be
/// built, if it could not.
pub struct ExecutorThread {
    name: String,
    handle: JoinHandle<Result<(), String>>,
    pulse: Arc<Pulse>,
}

impl ExecutorThread {
    /// Starts a thread named `name` that builds an executor placed at
    /// `placement` and runs the future made by `task` on it until that
    /// future ends, with a heartbeat task beside it. Every executor of the
    /// server is configured here:
    /// - no registered I/O memory: it serves file I/O only, and sockets do
    ///   not use it;
    /// - `preempt_timer`: how long tasks may run before the executor looks
    ///   at its rings again. glommio's default (100 ms) lets a busy socket
    ///   delay every other socket's wake-ups by that much.
    pub fn spawn<T, F>(
        name: &str,
        placement: Placement,
        preempt_timer: Duration,
        task: T,
    ) -> std::io::Result<Self>
    where
        T: FnOnce() -> F + Send + 'static,
        F: Future<Output = ()> + 'static,
    {
        let pulse = Arc::new(Pulse::new());
        let own = pulse.clone();
        let handle = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                let built = LocalExecutorBuilder::new(placement)
                    .io_memory(0)
                    .preempt_timer(preempt_timer)
                    .make();
                let executor = match built {
                    Ok(executor) => executor,
                    Err(err) => {
                        own.state.store(DONE, Ordering::Release);
                        return Err(err.to_string());
                    }
                };
                own.state.store(RUNNING, Ordering::Release);
                let beating = own.clone();
                executor.run(async move {
                    // Detached: it ends with the executor, when `task` ends.
                    glommio::spawn_local(async move {
                        loop {
                            beating.beats.fetch_add(1, Ordering::Relaxed);
                            glommio::timer::sleep(HEARTBEAT).await;
                        }
                    })
                    .detach();
                    task().await;
                });
                own.state.store(DONE, Ordering::Release);
                Ok(())
            })?;
        Ok(ExecutorThread {
            name: name.to_owned(),
            handle,
            pulse,
        })
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

/// The signal used for kicks: the second real-time signal (glibc keeps the
/// two below `SIGRTMIN` for itself), which nothing else in the process uses.
fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN() + 1
}

extern "C" fn ignore_kick(_: libc::c_int) {}

/// Installs the do-nothing handler for the kick signal, once per process.
/// Without `SA_RESTART`, so that a kicked `io_uring_enter` returns instead
/// of resuming its wait. Refuses to replace a handler someone else set.
fn install_kick_handler() -> Result<(), String> {
    static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            // SAFETY: sigaction with zeroed, then filled, structs; the new
            // handler is an extern "C" function that touches nothing
            // (async-signal-safe).
            unsafe {
                let mut previous: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(kick_signal(), std::ptr::null(), &mut previous) != 0 {
                    return Err(std::io::Error::last_os_error().to_string());
                }
                if previous.sa_sigaction != libc::SIG_DFL {
                    return Err(format!("signal {} already has a handler", kick_signal()));
                }
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction =
                    ignore_kick as extern "C" fn(libc::c_int) as libc::sighandler_t;
                libc::sigemptyset(&mut action.sa_mask);
                action.sa_flags = 0;
                if libc::sigaction(kick_signal(), &action, std::ptr::null_mut()) != 0 {
                    return Err(std::io::Error::last_os_error().to_string());
                }
            }
            Ok(())
        })
        .clone()
}

/// One executor thread as the watchdog thread sees it.
struct Watched {
    name: String,
    thread: libc::pthread_t,
    pulse: Arc<Pulse>,
}

/// Owns the executor threads while a watchdog thread kicks those whose
/// heartbeat has stopped. The threads can only be had back (to be joined)
/// through [`Watchdog::stop`], after the watchdog thread has ended, so a
/// kick never reaches a thread that has been joined or detached.
pub struct Watchdog {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    executors: Vec<ExecutorThread>,
}

impl Watchdog {
    /// How often the watchdog looks: more than two heartbeats apart, so a
    /// running executor has always beaten in between.
    pub const PERIOD: Duration = Duration::from_millis(25);

    /// Starts watching `executors`, which the watchdog keeps until stopped.
    /// Their indices here are the ones [`Watchdog::is_finished`] takes.
    pub fn start(executors: Vec<ExecutorThread>) -> Result<Self, String> {
        install_kick_handler()?;
        let watched = executors
            .iter()
            .map(|executor| Watched {
                name: executor.name.clone(),
                thread: executor.handle.as_pthread_t(),
                pulse: executor.pulse.clone(),
            })
            .collect::<Vec<_>>();
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("watchdog".to_owned())
            .spawn(move || watch(&watched, &stopped))
            .map_err(|err| err.to_string())?;
        Ok(Watchdog {
            stop: Some(stop),
            thread: Some(thread),
            executors,
        })
    }

    /// Whether executor `index` has ended.
    pub fn is_finished(&self, index: usize) -> bool {
        self.executors
            .get(index)
            .is_none_or(ExecutorThread::is_finished)
    }

    /// Stops the watchdog thread and hands back the executor threads.
    pub fn stop(mut self) -> Vec<ExecutorThread> {
        self.end_watching();
        std::mem::take(&mut self.executors)
    }

    fn end_watching(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Watchdog {
    /// Dropping the watchdog (an early return, a panic) ends the watchdog
    /// thread before the executor threads' handles are dropped.
    fn drop(&mut self) {
        self.end_watching();
    }
}

fn watch(executors: &[Watched], stopped: &mpsc::Receiver<()>) {
    let mut last: Vec<Option<u64>> = executors.iter().map(|_| None).collect();
    let mut kicks = 0u64;
    let mut unreported = 0u64;
    let mut last_report = Instant::now();
    while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(Watchdog::PERIOD) {
        for (executor, seen) in executors.iter().zip(last.iter_mut()) {
            // Only a running executor has a heartbeat to miss: one still
            // being built is making syscalls that need no interrupting.
            if executor.pulse.state.load(Ordering::Acquire) != RUNNING {
                *seen = None;
                continue;
            }
            let beats = executor.pulse.beats.load(Ordering::Relaxed);
            if *seen == Some(beats) {
                kick(executor.thread);
                kicks += 1;
                unreported += 1;
                tracing::debug!(executor = %executor.name, beats, "heartbeat stopped; kicked");
            }
            *seen = Some(beats);
        }
        if unreported > 0 && last_report.elapsed() >= Duration::from_secs(1) {
            report_kicks(unreported, kicks);
            unreported = 0;
            last_report = Instant::now();
        }
    }
    if unreported > 0 {
        report_kicks(unreported, kicks);
    }
}

/// At most one log line a second says how many kicks there were.
fn report_kicks(since_last: u64, total: u64) {
    tracing::info!(
        kicks = since_last,
        kicks_total = total,
        "woke stalled executors"
    );
}

fn kick(thread: libc::pthread_t) {
    // SAFETY: `thread` belongs to an ExecutorThread that the Watchdog owns
    // and neither joins nor drops before this thread has ended (a thread
    // that has exited stays valid until joined or detached), and the
    // signal's handler, installed by `Watchdog::start`, does nothing.
    unsafe { libc::pthread_kill(thread, kick_signal()) };
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

enum Report {
    Ready(Part),
    GaveUp(Part),
}

/// Given to one part; dropping it without [`Reporter::ready`] tells the
/// server at once that the part will never serve.
pub struct Reporter {
    part: Part,
    sender: Option<mpsc::Sender<Report>>,
}

impl Reporter {
    /// Says that the part is serving.
    pub fn ready(mut self) {
        if let Some(sender) = self.sender.take() {
            // The server stops waiting only once it has given up; a report
            // that comes after that has nobody left to tell.
            let _ = sender.send(Report::Ready(self.part));
        }
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        if let Some(sender) = self.sender.take() {
            let _ = sender.send(Report::GaveUp(self.part));
        }
    }
}

/// Why the server could not start every part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// This part gave up without serving (its thread ends or has ended).
    GaveUp(Part),
    /// These parts had not reported when the time ran out.
    TimedOut(Vec<Part>),
}

/// Collects the reports of every part the server starts.
pub struct Startup {
    sender: mpsc::Sender<Report>,
    receiver: mpsc::Receiver<Report>,
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
            sender: Some(self.sender.clone()),
        }
    }

    /// Waits until every part has reported ready, until one gives up, or
    /// until `timeout`. `slow` is called with the missing parts each time
    /// `notice` passes without news.
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
        drop(sender);
        let started = Instant::now();
        let deadline = started + timeout;
        while !expected.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Failure::TimedOut(expected));
            }
            match receiver.recv_timeout(left.min(notice)) {
                Ok(Report::Ready(part)) => expected.retain(|p| *p != part),
                Ok(Report::GaveUp(part)) => return Err(Failure::GaveUp(part)),
                Err(mpsc::RecvTimeoutError::Timeout) => slow(&expected, started.elapsed()),
                // Every reporter sends before it goes, so the channel closes
                // early only if a report was lost: count that part as gone.
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(Failure::GaveUp(expected[0]));
                }
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
    fn a_part_that_gives_up_ends_the_start_while_others_still_start() {
        let mut startup = Startup::new();
        let ready = startup.reporter(Part::Shard(0));
        let lost = startup.reporter(Part::Shard(1));
        // Still starting (never reports within the test): the start must
        // not wait for it once another part has given up.
        let _slow = startup.reporter(Part::Router);
        ready.ready();
        std::thread::spawn(move || drop(lost))
            .join()
            .expect("thread");
        assert_eq!(
            startup.wait(LONG, LONG, |_, _| {}),
            Err(Failure::GaveUp(Part::Shard(1)))
        );
    }

    #[test]
    fn a_part_that_never_reports_times_out_after_notices() {
        let mut startup = Startup::new();
        let _silent = startup.reporter(Part::Router);
        let mut notices = 0;
        let result = startup.wait(
            Duration::from_millis(300),
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
            Placement::Fixed(1 << 20),
            Duration::from_millis(1),
            || async {},
        )
        .expect("thread");
        let reason = thread.join().expect_err("the build must fail");
        assert!(!reason.is_empty());
    }

    /// A thread that waits in `pause()` and counts the signals that
    /// interrupted it, dressed as a running executor whose heartbeat is
    /// `beats`.
    fn pausing_executor(pulse: Arc<Pulse>) -> (ExecutorThread, Arc<AtomicU64>) {
        install_kick_handler().expect("handler");
        let interrupted = Arc::new(AtomicU64::new(0));
        let count = interrupted.clone();
        let handle = std::thread::spawn(move || {
            while count.load(Ordering::Relaxed) < u64::MAX / 2 {
                // SAFETY: pause() only waits for a signal.
                unsafe { libc::pause() };
                count.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        });
        pulse.state.store(RUNNING, Ordering::Release);
        let thread = ExecutorThread {
            name: "pausing".to_owned(),
            handle,
            pulse,
        };
        (thread, interrupted)
    }

    /// Ends a `pausing_executor`: tells it to stop, then kicks it out of
    /// its pause until it has.
    fn end_pausing(thread: ExecutorThread, interrupted: &AtomicU64) {
        interrupted.store(u64::MAX / 2, Ordering::Relaxed);
        while !thread.is_finished() {
            kick(thread.handle.as_pthread_t());
            std::thread::sleep(Duration::from_millis(1));
        }
        thread.join().expect("pausing thread");
    }

    #[test]
    fn the_watchdog_kicks_a_running_executor_whose_heartbeat_stopped() {
        let (thread, interrupted) = pausing_executor(Arc::new(Pulse::new()));
        let watchdog = Watchdog::start(vec![thread]).expect("watchdog");
        let began = Instant::now();
        while interrupted.load(Ordering::Relaxed) < 2 && began.elapsed() < LONG {
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut threads = watchdog.stop();
        let kicked = interrupted.load(Ordering::Relaxed);
        assert!(kicked >= 2, "the silent executor was kicked {kicked} times");
        end_pausing(threads.remove(0), &interrupted);
    }

    #[test]
    fn the_watchdog_leaves_beating_and_unbuilt_executors_alone() {
        let beating = Arc::new(Pulse::new());
        let (thread, beaten_kicks) = pausing_executor(beating.clone());
        let building = Arc::new(Pulse::new());
        let (unbuilt, unbuilt_kicks) = pausing_executor(building.clone());
        building.state.store(BUILDING, Ordering::Release);
        let watchdog = Watchdog::start(vec![thread, unbuilt]).expect("watchdog");
        let began = Instant::now();
        while began.elapsed() < Watchdog::PERIOD * 12 {
            beating.beats.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut threads = watchdog.stop();
        // Twelve looks by the watchdog; a loaded machine may keep this
        // test's thread from beating through one or two of them, no more.
        let kicked = beaten_kicks.load(Ordering::Relaxed);
        assert!(kicked <= 3, "a beating executor was kicked {kicked} times");
        assert_eq!(
            unbuilt_kicks.load(Ordering::Relaxed),
            0,
            "an unbuilt one was kicked"
        );
        end_pausing(threads.remove(1), &unbuilt_kicks);
        end_pausing(threads.remove(0), &beaten_kicks);
    }

    #[test]
    fn kicks_do_not_disturb_a_running_executor() {
        install_kick_handler().expect("handler");
        let (done, finished) = mpsc::channel();
        let thread = ExecutorThread::spawn(
            "kicked",
            Placement::Unbound,
            Duration::from_millis(1),
            move || async move {
                // Parked in its ring most of this time, so most kicks land
                // in its wait; the timers must still fire, in order.
                let began = Instant::now();
                for _ in 0..20 {
                    glommio::timer::sleep(Duration::from_millis(10)).await;
                }
                let _ = done.send(began.elapsed());
            },
        )
        .expect("thread");
        for _ in 0..40 {
            kick(thread.handle.as_pthread_t());
            std::thread::sleep(Duration::from_millis(5));
        }
        let took = finished.recv_timeout(LONG).expect("the task finished");
        assert!(
            took >= Duration::from_millis(200),
            "timers ended early: {took:?}"
        );
        assert_eq!(thread.join(), Ok(()));
    }
}
