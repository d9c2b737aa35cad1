//! The refresh loop: one task per source, all sources of an issuer feeding one pipeline.
//!
//! A failed fetch, a refused set or a refused merge never touches what is published: the last
//! good snapshot keeps being served, and the failure is logged with its reason.

mod runtime;
mod schedule;
mod status;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::Mutex;
use tracing::{debug, error, info, warn};

use super::merge::{KeyPolicy, Ledger, dropped_early, merge, replaced_material};
use super::persist::StateFile;
use super::source::{AnySource, FetchError, Fetched, KeySource};
use super::store::{DocumentStore, Snapshot};
use super::validate::validate;
use super::{PublicJwk, unix_now};
use crate::issuer::endpoint::IssuerEndpoint;
use crate::metrics::{KeyTimes, Metrics, RefreshResult};

pub use self::runtime::{IssuerRuntime, Source};
pub use self::schedule::{FIRST_RETRY, MAX_BACKOFF, jitter_sample, next_refresh_in, run_source};
pub use self::status::{IssuerStatus, KeyLifecycle, SourceStatus};

/// M3: a confirmation alone (no change to the keys) is written to the state file at most this
/// often, so a restart reports it at most this much too old without a write per refresh.
pub const CONFIRMATION_WRITE_INTERVAL: u64 = 60;

/// The two clocks of one refresh: wall-clock Unix seconds (persisted, survives restarts) and
/// the monotonic clock (immune to clock steps, L7).
#[derive(Debug, Clone, Copy)]
struct Clock {
    wall: u64,
    mono: std::time::Instant,
}

impl Clock {
    fn now() -> Self {
        Self {
            wall: unix_now(),
            mono: std::time::Instant::now(),
        }
    }

    /// L7: how far the wall clock stepped forward since `earlier`, beyond the time that really
    /// passed (monotonic); 0 when it did not, within a 2 s allowance for whole seconds. A
    /// backward step only lengthens grace, the safe direction, and is left alone. Suspend
    /// also shows as a forward step (the monotonic clock stops), which lengthens grace too.
    fn forward_step_since(&self, earlier: &Clock) -> u64 {
        let wall = self.wall.saturating_sub(earlier.wall);
        let real = self.mono.saturating_duration_since(earlier.mono).as_secs();
        match wall.saturating_sub(real) {
            step if step > 2 => step,
            _ => 0,
        }
    }
}

/// Fetch results of every source of one issuer, merged, published and persisted.
#[derive(Debug)]
pub struct IssuerPipeline {
    index: usize,
    endpoint: IssuerEndpoint,
    keys: KeyPolicy,
    store: Arc<DocumentStore>,
    state_file: StateFile,
    metrics: Arc<Metrics>,
    /// `PipelineState::confirmed_at` in Unix seconds (0: never), readable without the lock:
    /// `/metrics` computes the JWKS age from it at scrape time.
    confirmed_secs: AtomicU64,
    /// Held for a whole refresh, the state write included: it orders the writes, so that the
    /// file never goes back to an older ledger. `/metrics` never waits on it; `/readyz` and
    /// `/status` do, within the admin router's 5 s deadline (L5).
    state: Mutex<PipelineState>,
}

#[derive(Debug)]
struct PipelineState {
    /// Last good set of each source; `None` until it first succeeds.
    sets: Vec<Option<Vec<PublicJwk>>>,
    sources: Vec<SourceStatus>,
    ledger: Ledger,
    /// M2: the ledger is not on disk yet (a write failed, or it changed since the last one);
    /// every refresh retries until a write succeeds.
    dirty: bool,
    /// When a source last confirmed the published set: a fetch that was merged, or an
    /// unchanged answer from a healthy source (M3). Restored from the state file, never from
    /// its mtime.
    confirmed_at: Option<SystemTime>,
    /// The confirmation the state file holds (Unix seconds).
    persisted_confirmed_at: Option<u64>,
    /// The clocks of the last refresh, to notice wall-clock steps (L7).
    last_clock: Option<Clock>,
}

impl IssuerPipeline {
    /// Issuer `index`'s pipeline over `sources`, its persisted set under `state_dir` restored
    /// and published: how `serve` and `render` both start, so that they serve the same bytes.
    pub async fn restored(
        index: usize,
        endpoint: &IssuerEndpoint,
        keys: KeyPolicy,
        state_dir: &std::path::Path,
        store: &Arc<DocumentStore>,
        metrics: &Arc<Metrics>,
        sources: &[AnySource],
    ) -> Self {
        let pipeline = Self::new(
            index,
            endpoint.clone(),
            keys,
            Arc::clone(store),
            StateFile::new(state_dir, endpoint.issuer.as_str()),
            Arc::clone(metrics),
            sources.iter().map(KeySource::describe).collect(),
        );
        pipeline.restore().await;
        pipeline
    }

    /// Where the last good set is persisted.
    pub fn state_path(&self) -> &std::path::Path {
        self.state_file.path()
    }

    pub fn new(
        index: usize,
        endpoint: IssuerEndpoint,
        keys: KeyPolicy,
        store: Arc<DocumentStore>,
        state_file: StateFile,
        metrics: Arc<Metrics>,
        names: Vec<String>,
    ) -> Self {
        let count = names.len();
        Self {
            index,
            endpoint,
            keys,
            store,
            state_file,
            metrics,
            confirmed_secs: AtomicU64::new(0),
            state: Mutex::new(PipelineState {
                sets: vec![None; count],
                sources: names
                    .into_iter()
                    .map(|source| SourceStatus {
                        source,
                        ..SourceStatus::default()
                    })
                    .collect(),
                ledger: Ledger::default(),
                dirty: false,
                confirmed_at: None,
                persisted_confirmed_at: None,
                last_clock: None,
            }),
        }
    }

    pub fn issuer(&self) -> &str {
        self.endpoint.issuer.as_str()
    }

    /// Loads the persisted last good set and publishes it at once, so that a restart during an
    /// upstream outage keeps serving. A corrupt file is reported and ignored.
    pub async fn restore(&self) {
        let loaded = match self.state_file.load_state() {
            Ok(Some(persisted)) => persisted,
            Ok(None) => return,
            Err(e) => {
                error!(issuer = self.issuer(), error = %e, "persisted key set not used");
                return;
            }
        };
        let mut state = self.state.lock().await;
        let now = unix_now();
        let mut ledger = loaded.ledger;
        ledger.clamp_vanished(now);
        ledger.expire(now, self.keys.retention);
        if !ledger.is_empty() {
            self.publish(&ledger);
            // M3: the confirmation recorded in the file; a file without one (format 1) leaves
            // the set unconfirmed. A time in the future (a clock that was ahead) counts as now.
            let confirmed = loaded.confirmed_at.map(|at| at.min(now));
            state.confirmed_at = confirmed.map(|at| UNIX_EPOCH + Duration::from_secs(at));
            self.confirmed_secs
                .store(confirmed.unwrap_or(0), Ordering::Relaxed);
            state.persisted_confirmed_at = confirmed;
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
        let snapshot = Snapshot::build(&self.endpoint, ledger);
        self.store.publish(self.index, snapshot);
        self.metrics.set_keys(self.issuer(), ledger.keys.len());
        let retention = self.keys.retention.as_secs();
        let lifecycles: Vec<KeyTimes> = ledger
            .keys
            .iter()
            .map(|(kid, entry)| KeyTimes {
                kid: kid.clone(),
                first_seen_at: entry.first_seen_at,
                retiring_until: entry.vanished_at.map(|at| at.saturating_add(retention)),
            })
            .collect();
        self.metrics.set_key_lifecycles(self.issuer(), &lifecycles);
    }

    /// One fetch of source `i`; returns whether the source is healthy.
    pub async fn refresh<S: KeySource>(&self, i: usize, source: &mut S) -> bool {
        let fetched = source.fetch_key_set().await;
        self.apply(i, &source.describe(), fetched, Clock::now())
            .await
    }

    /// Takes a key set that source `i` (called `name`) was told rather than fetched (a push):
    /// validated, merged, published and persisted like any fetch. `Err` says why it was
    /// refused; what is served is then unchanged.
    pub async fn accept(&self, i: usize, name: &str, body: bytes::Bytes) -> Result<(), String> {
        let fetched = Ok(Fetched::Body {
            body,
            upstream_issuer: None,
        });
        self.take(i, name, fetched, Clock::now()).await
    }

    /// [`Self::take`], saying only whether the source is healthy.
    async fn apply(
        &self,
        i: usize,
        name: &str,
        fetched: Result<Fetched, FetchError>,
        clock: Clock,
    ) -> bool {
        self.take(i, name, fetched, clock).await.is_ok()
    }

    /// Takes one fetch result of source `i` (called `name`) at `clock`: validate, merge,
    /// publish, persist. `Ok` when the source is healthy, else its last error.
    async fn take(
        &self,
        i: usize,
        name: &str,
        fetched: Result<Fetched, FetchError>,
        clock: Clock,
    ) -> Result<(), String> {
        let mut state = self.state.lock().await;
        let issuer = self.endpoint.issuer.as_str();
        let now = clock.wall;
        // L7: grace runs on the monotonic clock within a process. After a forward wall-clock
        // step (an RTC-less board, then NTP), vanish times move with the clock, so that retained
        // keys keep the grace that really remains instead of vanishing at this merge.
        if let Some(step) = state.last_clock.map(|last| clock.forward_step_since(&last))
            && step > 0
        {
            warn!(
                issuer,
                step_secs = step,
                "the wall clock stepped forward; rotation grace keeps counting real time"
            );
            state.ledger.shift_vanished(step);
            state.dirty = true;
        }
        state.last_clock = Some(clock);
        let mut candidate = None;
        let mut failure = None;
        let mut result = RefreshResult::ok;
        let idle = matches!(fetched, Ok(Fetched::Idle));
        match fetched {
            Ok(Fetched::Idle) => result = RefreshResult::unchanged,
            Ok(Fetched::Unchanged) => {
                debug!(issuer, source = %name, "key set unchanged");
                result = RefreshResult::unchanged;
            }
            Ok(Fetched::Body {
                body,
                upstream_issuer,
            }) => {
                self.check_upstream_issuer(&mut state.sources[i], i, upstream_issuer);
                match validate(&body) {
                    Ok(valid) => {
                        for dropped in &valid.dropped {
                            warn!(issuer, source = %name, "key left out: {dropped}");
                        }
                        // S4, D-11: once per key, not on every refresh: only a key this source
                        // did not already list with the same material is news.
                        let known = state.sets[i].as_deref().unwrap_or_default();
                        for note in &valid.non_minimal {
                            let listed = valid
                                .keys
                                .iter()
                                .find(|k| k.kid == note.kid)
                                .is_some_and(|k| known.contains(k));
                            if !listed {
                                let members: Vec<&str> =
                                    note.members.iter().map(|(m, _)| *m).collect();
                                warn!(issuer, source = %name, kid = %note.kid, members = ?members, "{note}");
                            }
                        }
                        candidate = Some(valid.keys);
                    }
                    Err(rejected) => {
                        error!(issuer, source = %name, reason = %rejected, "key set refused; still serving the last good set");
                        failure = Some(rejected.to_string());
                        result = RefreshResult::rejected;
                    }
                }
            }
            Err(e) => {
                warn!(issuer, source = %name, error = %e, "fetch failed; still serving the last good set");
                failure = Some(e.to_string());
                result = RefreshResult::fetch_error;
            }
        }

        // Merge even when nothing new arrived: rotation grace runs out on the clock.
        let mut sets = state.sets.clone();
        if let Some(keys) = &candidate {
            sets[i] = Some(keys.clone());
        }
        let views: Vec<Option<&[PublicJwk]>> = sets.iter().map(Option::as_deref).collect();
        let mut merged = false;
        match merge(
            &views,
            &state.ledger,
            now,
            self.keys.retention,
            self.keys.max_keys,
        ) {
            Ok(next) => {
                merged = true;
                // L8: see `replaced_material` for why the new material wins; once per change.
                for kid in replaced_material(&state.ledger, &next) {
                    error!(issuer, source = %name, kid,
                        "kid {kid:?} now names different key material; publishing the new material, \
                         tokens signed by the old one no longer verify (a kid names one key: A-11, D-9)");
                }
                let early = dropped_early(&state.ledger, &next, now, self.keys.retention);
                if !early.is_empty() {
                    warn!(issuer, source = %name, kids = ?early, max_keys = self.keys.max_keys,
                        "retained keys dropped before their rotation grace ran out to stay within max_keys (M4)");
                }
                if let Some(keys) = candidate {
                    state.sets[i] = Some(keys);
                }
                if next != state.ledger {
                    let keys_changed = !next.jwks().eq(state.ledger.jwks());
                    // A key that vanished (or came back) changes no document, but it changes
                    // which keys may sign a push (`Snapshot::listed`).
                    let listed = |ledger: &Ledger| {
                        ledger
                            .keys
                            .iter()
                            .filter(|(_, e)| e.vanished_at.is_none())
                            .map(|(kid, _)| kid.clone())
                            .collect::<Vec<_>>()
                    };
                    let listing_changed = listed(&next) != listed(&state.ledger);
                    if keys_changed || listing_changed || self.store.get(self.index).is_none() {
                        self.publish(&next);
                        info!(issuer, source = %name, kids = ?next.kids(), "published key set");
                    }
                    state.ledger = next;
                    state.dirty = true;
                }
            }
            Err(e) => {
                error!(issuer, source = %name, reason = %e, "merged key set refused; still serving the last good set");
                if candidate.is_some() {
                    failure = Some(e.to_string());
                    result = RefreshResult::merge_rejected;
                }
            }
        }

        if !idle {
            self.metrics.count_refresh(issuer, i, result);
        }
        let status = &mut state.sources[i];
        match (result, failure) {
            (RefreshResult::unchanged, _) => {}
            (_, Some(reason)) => {
                status.healthy = false;
                status.last_error_at = Some(now);
                status.last_error = Some(reason);
            }
            (_, None) => {
                status.healthy = true;
                status.last_success = Some(now);
            }
        }
        // An idle source is not failing: a push source between pushes.
        let healthy = status.healthy || idle;
        let outcome = if healthy {
            Ok(())
        } else {
            Err(status.last_error.clone().unwrap_or_default())
        };
        // M3: an unchanged answer from a source whose last fetch was good confirms the set as
        // much as a new body does (a healthy file source only ever answers "unchanged"). An
        // idle source confirms nothing: only a push does.
        if healthy
            && !idle
            && merged
            && matches!(result, RefreshResult::ok | RefreshResult::unchanged)
        {
            state.confirmed_at = Some(UNIX_EPOCH + Duration::from_secs(now));
            self.confirmed_secs.store(now, Ordering::Relaxed);
        }
        let confirmed = state
            .confirmed_at
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_secs());
        let confirmation_due = match (confirmed, state.persisted_confirmed_at) {
            (Some(at), Some(on_disk)) => at.saturating_sub(on_disk) >= CONFIRMATION_WRITE_INTERVAL,
            (Some(_), None) => true,
            (None, _) => false,
        };
        if (state.dirty || confirmation_due) && !state.ledger.is_empty() {
            let written = self.persist(&state.ledger, confirmed).await;
            state.dirty = !written;
            if written {
                state.persisted_confirmed_at = confirmed;
            }
        }
        outcome
    }

    /// F-1, the most common misconfiguration: the cluster still signs tokens for its default
    /// issuer (`https://kubernetes.default.svc.cluster.local` on k3s, K3-1), so relying parties
    /// refuse them whatever we publish. Logged when it starts and when it ends.
    fn check_upstream_issuer(&self, status: &mut SourceStatus, i: usize, upstream: Option<String>) {
        let Some(upstream) = upstream else {
            return;
        };
        let configured = self.endpoint.issuer.as_str();
        let mismatch = upstream != configured;
        self.metrics.set_issuer_mismatch(configured, i, mismatch);
        let was = status.upstream_issuer.replace(upstream.clone());
        status.issuer_mismatch = mismatch;
        if was.as_deref() == Some(upstream.as_str()) {
            return;
        }
        let name = &status.source;
        if mismatch {
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

    /// Unix seconds at which a source last confirmed the published set, without waiting on a
    /// refresh.
    pub fn confirmed_at(&self) -> Option<u64> {
        match self.confirmed_secs.load(Ordering::Relaxed) {
            0 => None,
            at => Some(at),
        }
    }

    /// The issuer's state for `/status` and `/readyz`.
    pub async fn status(&self) -> IssuerStatus {
        let state = self.state.lock().await;
        let confirmed_at = state
            .confirmed_at
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok());
        let snapshot = self.store.get(self.index);
        let confirmed_at = confirmed_at.map(|d| d.as_secs());
        let retention = self.keys.retention.as_secs();
        let keys = state
            .ledger
            .keys
            .iter()
            .map(|(kid, entry)| KeyLifecycle {
                kid: kid.clone(),
                first_seen_at: entry.first_seen_at,
                last_seen_at: entry.vanished_at.map_or(confirmed_at, |_| None),
                vanished_at: entry.vanished_at,
                retiring_until: entry.vanished_at.map(|at| at.saturating_add(retention)),
            })
            .collect();
        IssuerStatus {
            issuer: self.issuer().to_owned(),
            discovery_url: self.endpoint.discovery_url(),
            jwks_uri: self.endpoint.jwks_uri.clone(),
            published: snapshot.is_some(),
            cache_max_age_seconds: self.endpoint.cache_max_age.as_secs(),
            key_retention_seconds: retention,
            kids: snapshot.map(|s| s.kids.to_vec()).unwrap_or_default(),
            confirmed_at,
            sources: state.sources.clone(),
            keys,
        }
    }

    /// Whether the published ledger is on disk, with no write pending after a failure (M2).
    /// `render` runs once and has no later refresh to retry in, so it asks (L6).
    pub async fn persisted(&self) -> bool {
        !self.state.lock().await.dirty
    }

    /// Writes the ledger; returns whether it is on disk. A failure is logged and counted, and
    /// the caller retries on the next refresh (M2).
    async fn persist(&self, ledger: &Ledger, confirmed_at: Option<u64>) -> bool {
        let file = self.state_file.clone();
        let ledger = ledger.clone();
        let saved =
            tokio::task::spawn_blocking(move || file.save_state(&ledger, confirmed_at)).await;
        let error = match saved {
            Ok(Ok(())) => return true,
            Ok(Err(e)) => e.to_string(),
            Err(e) => format!("persist task failed: {e}"),
        };
        error!(issuer = self.issuer(), error = %error, "could not persist the key set; retrying on every refresh");
        self.metrics.count_state_write_error(self.issuer());
        false
    }
}
