//! When each source is fetched: its interval after a success, capped exponential backoff after
//! failures, jitter against lockstep, and SIGHUP to fetch at once.

use std::hash::{BuildHasher as _, Hasher as _};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::IssuerPipeline;
use crate::jwks::source::KeySource;
use crate::supervisor::Heartbeat;

/// The first retry after a failure; each further failure doubles it.
pub const FIRST_RETRY: Duration = Duration::from_secs(1);
/// Failures never wait longer than this, nor longer than the refresh interval.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// The delay before the next fetch of a source: `interval` after a success, capped exponential
/// backoff after `consecutive_failures`, both spread by ±10 % with `jitter` in `[0, 1)` so that
/// replicas and sources do not fetch in lockstep.
pub fn next_refresh_in(interval: Duration, consecutive_failures: u32, jitter: f64) -> Duration {
    let base = match consecutive_failures {
        0 => interval,
        n => {
            let backoff = FIRST_RETRY.saturating_mul(1u32 << (n - 1).min(16));
            backoff.min(interval.min(MAX_BACKOFF))
        }
    };
    base.mul_f64(0.9 + 0.2 * jitter.clamp(0.0, 1.0))
}

/// A uniform sample in `[0, 1)` from the process's random hash keys: jitter needs no crate.
pub fn jitter_sample() -> f64 {
    let bits = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

/// Drives one source until `cancel` fires. `refresh_now` (SIGHUP) cuts the current wait short.
pub async fn run_source<S: KeySource>(
    pipeline: Arc<IssuerPipeline>,
    index: usize,
    mut source: S,
    interval: Duration,
    cancel: CancellationToken,
    mut refresh_now: watch::Receiver<()>,
    heartbeat: Arc<Heartbeat>,
) {
    let mut failures = 0u32;
    loop {
        let healthy = tokio::select! {
            _ = cancel.cancelled() => return,
            healthy = heartbeat.beat(pipeline.refresh(index, &mut source)) => healthy,
        };
        failures = if healthy {
            0
        } else {
            failures.saturating_add(1)
        };
        let delay = next_refresh_in(interval, failures, jitter_sample());
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
            _ = async {
                if refresh_now.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            } => debug!(issuer = pipeline.issuer(), "refresh requested"),
        }
    }
}
