//! The refresh loop: one task per source, all sources of an issuer feeding one pipeline.
//!
//! A failed fetch, a refused set or a refused merge never touches what is published: the last
//! good snapshot keeps being served, and the failure is logged with its reason.

use std::hash::{BuildHasher as _, Hasher as _};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{Mutex, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::PublicJwk;
use super::merge::{Ledger, merge};
use super::persist::StateFile;
use super::source::{Fetched, KeySource};
use super::store::{DocumentStore, Snapshot};
use super::validate::validate;
use crate::config::IssuerConfig;

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
fn jitter_sample() -> f64 {
    let bits = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Fetch results of every source of one issuer, merged, published and persisted.
#[derive(Debug)]
pub struct IssuerPipeline {
    index: usize,
    cfg: IssuerConfig,
    store: Arc<DocumentStore>,
    state_file: StateFile,
    state: Mutex<PipelineState>,
}

#[derive(Debug)]
struct PipelineState {
    /// Last good set of each source; `None` until it first succeeds.
    sources: Vec<Option<Vec<PublicJwk>>>,
    /// Last outcome of each source, kept while an unchanged source is not re-read.
    healthy: Vec<bool>,
    /// The `issuer` each apiserver source last claimed in its own discovery document.
    upstream_issuers: Vec<Option<String>>,
    ledger: Ledger,
}

impl IssuerPipeline {
    pub fn new(
        index: usize,
        cfg: IssuerConfig,
        store: Arc<DocumentStore>,
        state_file: StateFile,
    ) -> Self {
        let count = cfg.sources.len();
        Self {
            index,
            cfg,
            store,
            state_file,
            state: Mutex::new(PipelineState {
                sources: vec![None; count],
                healthy: vec![false; count],
                upstream_issuers: vec![None; count],
                ledger: Ledger::default(),
            }),
        }
    }

    pub fn issuer(&self) -> &str {
        self.cfg.issuer.as_str()
    }

    /// Loads the persisted last good set and publishes it at once, so that a restart during an
    /// upstream outage keeps serving. A corrupt file is reported and ignored.
    pub async fn restore(&self) {
        let loaded = match self.state_file.load() {
            Ok(Some(ledger)) => ledger,
            Ok(None) => return,
            Err(e) => {
                error!(issuer = self.issuer(), error = %e, "persisted key set not used");
                return;
            }
        };
        let mut state = self.state.lock().await;
        let mut ledger = loaded;
        ledger.expire(unix_now(), self.cfg.key_retention);
        if !ledger.is_empty() {
            self.publish(&ledger);
            info!(
                issuer = self.issuer(),
                kids = ?ledger.kids(),
                file = %self.state_file.path().display(),
                "serving the persisted key set until the sources answer"
            );
        }
        state.ledger = ledger;
    }

    fn publish(&self, ledger: &Ledger) {
        let snapshot = Snapshot::render(self.cfg.issuer.as_str(), &self.cfg.jwks_uri, ledger);
        self.store.publish(self.index, snapshot);
    }

    /// One fetch of source `i`; returns whether the source is healthy.
    pub async fn refresh<S: KeySource>(&self, i: usize, source: &mut S) -> bool {
        let fetched = source.fetch_key_set().await;
        let mut state = self.state.lock().await;
        let issuer = self.cfg.issuer.as_str();
        let name = source.describe();
        let mut candidate = None;
        match fetched {
            Ok(Fetched::Unchanged) => {
                debug!(issuer, source = %name, "key set unchanged");
            }
            Ok(Fetched::Body {
                body,
                upstream_issuer,
            }) => {
                self.check_upstream_issuer(&mut state, i, &name, upstream_issuer);
                match validate(&body) {
                    Ok(valid) => {
                        for dropped in &valid.dropped {
                            warn!(issuer, source = %name, "key left out: {dropped}");
                        }
                        candidate = Some(valid.keys);
                    }
                    Err(rejected) => {
                        error!(issuer, source = %name, reason = %rejected, "key set refused; still serving the last good set");
                        state.healthy[i] = false;
                    }
                }
            }
            Err(e) => {
                warn!(issuer, source = %name, error = %e, "fetch failed; still serving the last good set");
                state.healthy[i] = false;
            }
        }

        // Merge even when nothing new arrived: rotation grace runs out on the clock.
        let mut sources = state.sources.clone();
        if let Some(keys) = &candidate {
            sources[i] = Some(keys.clone());
        }
        let sets: Vec<Option<&[PublicJwk]>> = sources.iter().map(Option::as_deref).collect();
        let merged = merge(
            &sets,
            &state.ledger,
            unix_now(),
            self.cfg.key_retention,
            self.cfg.max_keys,
        );
        let next = match merged {
            Ok(next) => next,
            Err(e) => {
                error!(issuer, source = %name, reason = %e, "merged key set refused; still serving the last good set");
                if candidate.is_some() {
                    state.healthy[i] = false;
                }
                return state.healthy[i];
            }
        };
        if let Some(keys) = candidate {
            state.sources[i] = Some(keys);
            state.healthy[i] = true;
        }
        if next != state.ledger {
            let keys_changed = !next.jwks().eq(state.ledger.jwks());
            if keys_changed || self.store.get(self.index).is_none() {
                self.publish(&next);
                info!(issuer, source = %name, kids = ?next.kids(), "published key set");
            }
            state.ledger = next;
            self.persist(&state.ledger).await;
        }
        state.healthy[i]
    }

    /// F-1, the most common misconfiguration: the cluster still signs tokens for its default
    /// issuer (`https://kubernetes.default.svc.cluster.local` on k3s, K3-1), so relying parties
    /// refuse them whatever we publish. Logged when it starts and when it ends.
    fn check_upstream_issuer(
        &self,
        state: &mut PipelineState,
        i: usize,
        name: &str,
        upstream: Option<String>,
    ) {
        let Some(upstream) = upstream else {
            return;
        };
        let configured = self.cfg.issuer.as_str();
        let was = state.upstream_issuers[i].replace(upstream.clone());
        if was.as_deref() == Some(upstream.as_str()) {
            return;
        }
        if upstream != configured {
            warn!(
                issuer = configured,
                source = %name,
                upstream_issuer = %upstream,
                "issuer mismatch: the cluster signs tokens for {upstream:?}, not {configured:?}; relying parties \
                 will refuse them; set --service-account-issuer={configured} on the apiserver (F-1)"
            );
        } else if was.is_some() {
            info!(issuer = configured, source = %name, "issuer mismatch resolved: the cluster signs tokens for this issuer");
        }
    }

    /// The issuers the upstream apiservers claim, where one differs from the configured issuer.
    pub async fn issuer_mismatches(&self) -> Vec<String> {
        let configured = self.cfg.issuer.as_str();
        let state = self.state.lock().await;
        state
            .upstream_issuers
            .iter()
            .flatten()
            .filter(|u| u.as_str() != configured)
            .cloned()
            .collect()
    }

    async fn persist(&self, ledger: &Ledger) {
        let file = self.state_file.clone();
        let ledger = ledger.clone();
        let saved = tokio::task::spawn_blocking(move || file.save(&ledger)).await;
        match saved {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                error!(issuer = self.issuer(), error = %e, "could not persist the key set")
            }
            Err(e) => error!(issuer = self.issuer(), error = %e, "persist task failed"),
        }
    }
}

/// Drives one source until `cancel` fires. `refresh_now` (SIGHUP) cuts the current wait short.
pub async fn run_source<S: KeySource>(
    pipeline: Arc<IssuerPipeline>,
    index: usize,
    mut source: S,
    interval: Duration,
    cancel: CancellationToken,
    mut refresh_now: watch::Receiver<()>,
) {
    let mut failures = 0u32;
    loop {
        let healthy = tokio::select! {
            _ = cancel.cancelled() => return,
            healthy = pipeline.refresh(index, &mut source) => healthy,
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

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);

    #[test]
    fn success_waits_the_interval_with_ten_percent_jitter() {
        assert_eq!(next_refresh_in(MINUTE, 0, 0.5), MINUTE);
        assert_eq!(next_refresh_in(MINUTE, 0, 0.0), Duration::from_secs(54));
        assert!(next_refresh_in(MINUTE, 0, 0.999_999) < Duration::from_secs(66));
        assert_eq!(
            next_refresh_in(MINUTE, 0, 7.0),
            Duration::from_secs(66),
            "clamped"
        );
    }

    #[test]
    fn failures_back_off_exponentially_up_to_the_interval() {
        let delays: Vec<u64> = (1..=8)
            .map(|n| next_refresh_in(MINUTE, n, 0.5).as_secs())
            .collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(
            next_refresh_in(MINUTE, u32::MAX, 0.5),
            MINUTE,
            "no overflow"
        );
    }

    #[test]
    fn backoff_is_capped_at_five_minutes_for_long_intervals() {
        let day = Duration::from_secs(86_400);
        assert_eq!(next_refresh_in(day, 30, 0.5), MAX_BACKOFF);
        assert_eq!(next_refresh_in(day, 0, 0.5), day);
    }

    #[test]
    fn a_failing_source_never_waits_longer_than_a_healthy_one() {
        let short = Duration::from_millis(100);
        assert_eq!(next_refresh_in(short, 3, 0.5), short);
    }

    #[test]
    fn jitter_samples_are_in_range() {
        for _ in 0..1000 {
            let s = jitter_sample();
            assert!((0.0..1.0).contains(&s));
        }
    }
}
