//! A token bucket, for per-user message rates.

use std::time::Instant;

/// Holds up to `burst` tokens, refilled at `rate` per second; each message
/// takes one.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    tokens: f64,
    refilled_at: Instant,
    rate: f64,
    burst: f64,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: u32, burst: u32, now: Instant) -> Self {
        TokenBucket {
            tokens: f64::from(burst),
            refilled_at: now,
            rate: f64::from(rate),
            burst: f64::from(burst),
        }
    }

    /// Takes a token, or says how many milliseconds until one is available.
    pub fn take(&mut self, now: Instant) -> Result<(), u64> {
        let elapsed = now
            .saturating_duration_since(self.refilled_at)
            .as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.refilled_at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Ok(());
        }
        let wait = (1.0 - self.tokens) / self.rate;
        Err((wait * 1000.0).ceil().max(1.0) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(10, 3, start);
        for _ in 0..3 {
            assert_eq!(bucket.take(start), Ok(()));
        }
        assert_eq!(bucket.take(start), Err(100));
        let later = start + Duration::from_millis(100);
        assert_eq!(bucket.take(later), Ok(()));
        assert!(bucket.take(later).is_err());
        // Refill never exceeds the burst.
        let much_later = start + Duration::from_secs(60);
        for _ in 0..3 {
            assert_eq!(bucket.take(much_later), Ok(()));
        }
        assert!(bucket.take(much_later).is_err());
    }
}
