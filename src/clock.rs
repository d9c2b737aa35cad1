//! The process's monotonic clock in milliseconds, for state kept in atomics: one clock read
//! per event, comparable across tasks, and never 0, so that 0 can mean "not set".

use std::sync::LazyLock;
use std::time::{Duration, Instant};

static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

/// The clock starts at one day, so that "long ago" is a time like any other (no underflow
/// for a process that just started) and 0 is never a reading.
const START_MS: u64 = 86_400_000;

pub fn now_ms() -> u64 {
    u64::try_from(EPOCH.elapsed().as_millis())
        .unwrap_or(u64::MAX)
        .saturating_add(START_MS)
}

/// The instant `after` past the reading `ms`, for a timer.
pub fn instant_at(ms: u64, after: Duration) -> tokio::time::Instant {
    let since_epoch = Duration::from_millis(ms.saturating_sub(START_MS));
    tokio::time::Instant::from_std(*EPOCH + since_epoch + after)
}
