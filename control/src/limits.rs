//! Bounds on what one client can make the control plane do.
use std::time::{Duration, Instant};

/// Largest message the control plane accepts from an agent (a report of its workloads).
pub const MAX_AGENT_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
/// Largest message the control plane sends; batches are split well below it.
pub const MAX_SERVER_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
/// Resources of one batch are split into messages of about this size.
pub const CHUNK_BYTES: usize = 1024 * 1024;
/// An agent must say Hello this soon after opening the stream.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Messages per second an agent may send on its stream, sustained, and in a burst. An agent
/// that sends more (a NACK storm, a report loop) has its stream closed.
pub const AGENT_MESSAGES_PER_SECOND: f64 = 20.0;
pub const AGENT_MESSAGE_BURST: f64 = 200.0;
/// Joins per second over all clients, sustained and in a burst; tokens cannot be brute-forced.
pub const JOINS_PER_SECOND: f64 = 5.0;
pub const JOIN_BURST: f64 = 20.0;
/// Workload certificates one node may have signed per second, sustained and in a burst. A burst
/// covers an agent starting with many workloads at once; beyond it `SignWorkload` answers
/// RESOURCE_EXHAUSTED and the agent retries later, so one node cannot keep the CA busy.
pub const WORKLOAD_SIGNS_PER_SECOND: f64 = 8.0;
pub const WORKLOAD_SIGN_BURST: f64 = 64.0;
/// Longest NACK error text that is logged.
pub const MAX_LOGGED_ERROR: usize = 2048;
/// Longest version string taken from an agent; longer ones count as "holds nothing".
pub const MAX_VERSION_LEN: usize = 256;

/// A token bucket: `burst` tokens, refilled at `per_second`.
#[derive(Debug)]
pub struct TokenBucket {
    burst: f64,
    per_second: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(burst: f64, per_second: f64) -> Self {
        TokenBucket {
            burst,
            per_second,
            tokens: burst,
            last: Instant::now(),
        }
    }

    pub fn try_take(&mut self) -> bool {
        self.try_take_at(Instant::now())
    }

    fn try_take_at(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Cuts `text` to at most `max` bytes on a character boundary.
pub fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// How long a stream waits after the Hello for the agent's first report before sending the
/// first update anyway.
pub const FIRST_REPORT_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_a_burst_then_the_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(3.0, 10.0);
        bucket.last = start;
        assert!((0..3).all(|_| bucket.try_take_at(start)));
        assert!(!bucket.try_take_at(start), "burst exhausted");
        assert!(
            bucket.try_take_at(start + Duration::from_millis(100)),
            "refilled one"
        );
        assert!(!bucket.try_take_at(start + Duration::from_millis(100)));
    }

    #[test]
    fn truncate_respects_characters() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("abc", 10), "abc");
    }
}
