//! Rate limiting of security events.
//!
//! Every refusal is a `tracing` event at WARN with target `audit`. A flood of
//! bad input must not become a flood of log lines, so each thread (the router,
//! each shard) lets through at most a configured number of audit events per
//! second; the rest are counted, and the next event that passes carries the
//! count in its `suppressed` field. Counters in `/metrics` are not limited.

use std::cell::Cell;
use std::time::Instant;

thread_local! {
    static LIMITER: Cell<Window> = const { Cell::new(Window::EMPTY) };
    static PER_SECOND: Cell<u32> = const { Cell::new(50) };
}

#[derive(Clone, Copy)]
struct Window {
    started: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

impl Window {
    const EMPTY: Window = Window {
        started: None,
        logged: 0,
        suppressed: 0,
    };
}

/// Sets this thread's budget of audit events per second (0: no limit).
pub fn set_rate(per_second: u32) {
    PER_SECOND.with(|rate| rate.set(per_second));
}

/// Whether the caller may log an audit event now. `Some(n)` means yes, with
/// `n` events suppressed since the last one logged; `None` means suppress.
pub fn admit() -> Option<u64> {
    let budget = PER_SECOND.with(Cell::get);
    LIMITER.with(|cell| {
        let mut window = cell.get();
        let now = Instant::now();
        let fresh = window
            .started
            .is_none_or(|started| now.duration_since(started).as_secs() >= 1);
        if fresh {
            window.started = Some(now);
            window.logged = 0;
        }
        let answer = if budget == 0 || window.logged < budget {
            window.logged += 1;
            let suppressed = window.suppressed;
            window.suppressed = 0;
            Some(suppressed)
        } else {
            window.suppressed += 1;
            None
        };
        cell.set(window);
        answer
    })
}

/// Logs a security event at WARN, target `audit`, unless this thread's
/// budget is spent. Fields as in `tracing::warn!`; a `suppressed` field is
/// added.
#[macro_export]
macro_rules! audit {
    ($($fields:tt)+) => {
        if let Some(suppressed) = $crate::audit::admit() {
            tracing::warn!(target: "audit", suppressed, $($fields)+);
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_then_suppression_then_report() {
        std::thread::spawn(|| {
            set_rate(3);
            assert_eq!(admit(), Some(0));
            assert_eq!(admit(), Some(0));
            assert_eq!(admit(), Some(0));
            assert_eq!(admit(), None);
            assert_eq!(admit(), None);
            // A new second reports what was held back.
            LIMITER.with(|cell| {
                let mut window = cell.get();
                window.started = Instant::now().checked_sub(std::time::Duration::from_secs(2));
                cell.set(window);
            });
            assert_eq!(admit(), Some(2));
        })
        .join()
        .unwrap();
    }
}
