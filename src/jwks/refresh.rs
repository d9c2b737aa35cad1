//! The refresh loop: one task per source, all sources of an issuer feeding one pipeline.
//!
//! A failed fetch, a refused set or a refused merge never touches what is published: the last
//! good snapshot keeps being served, and the failure is logged with its reason.

use std::hash::{BuildHasher as _, Hasher as _};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::{Mutex, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::merge::{KeyPolicy, Ledger, dropped_early, merge, replaced_material};
use super::persist::StateFile;
use super::source::{AnySource, FetchError, Fetched, KeySource};
use super::store::{DocumentStore, Snapshot};
use super::validate::validate;
use super::{PublicJwk, unix_now};
use crate::issuer::endpoint::IssuerEndpoint;
use crate::metrics::{IssuerLabels, Metrics, RefreshResult, SourceLabels};
use crate::supervisor::Heartbeat;

/// The first retry after a failure; each further failure doubles it.
pub const FIRST_RETRY: Duration = Duration::from_secs(1);
/// Failures never wait longer than this, nor longer than the refresh interval.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// M3: a confirmation alone (no change to the keys) is written to the state file at most this
/// often, so a restart reports it at most this much too old without a write per refresh.
pub const CONFIRMATION_WRITE_INTERVAL: u64 = 60;

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

/// What `/status` shows of one source.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SourceStatus {
    pub source: String,
    /// The last fetch succeeded (an unchanged file counts as its last result).
    pub healthy: bool,
    /// Unix seconds of the last successful fetch.
    pub last_success: Option<u64>,
    /// Unix seconds and text of the last failure.
    pub last_error_at: Option<u64>,
    pub last_error: Option<String>,
    /// The issuer the apiserver's own discovery document claims (apiserver sources).
    pub upstream_issuer: Option<String>,
    pub issuer_mismatch: bool,
}

/// What `/status` and `/readyz` know of one issuer.
#[derive(Debug, Clone, Serialize)]
pub struct IssuerStatus {
    pub issuer: String,
    pub discovery_url: String,
    pub jwks_uri: String,
    pub published: bool,
    pub kids: Vec<String>,
    /// Unix seconds at which the served key set was last confirmed by a source.
    pub confirmed_at: Option<u64>,
    pub sources: Vec<SourceStatus>,
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
        self.metrics
            .keys
            .get_or_create(&self.issuer_labels())
            .set(i64::try_from(ledger.keys.len()).unwrap_or(i64::MAX));
    }

    fn issuer_labels(&self) -> IssuerLabels {
        IssuerLabels {
            issuer: self.issuer().to_owned(),
        }
    }

    /// One fetch of source `i`; returns whether the source is healthy.
    pub async fn refresh<S: KeySource>(&self, i: usize, source: &mut S) -> bool {
        let fetched = source.fetch_key_set().await;
        self.apply(i, &source.describe(), fetched, Clock::now())
            .await
    }

    /// Takes one fetch result of source `i` (called `name`) at `clock`: validate, merge,
    /// publish, persist. Returns whether the source is healthy.
    async fn apply(
        &self,
        i: usize,
        name: &str,
        fetched: Result<Fetched, FetchError>,
        clock: Clock,
    ) -> bool {
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
        match fetched {
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
                    if keys_changed || self.store.get(self.index).is_none() {
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

        self.metrics.count_refresh(issuer, i, result);
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
        let healthy = status.healthy;
        // M3: an unchanged answer from a source whose last fetch was good confirms the set as
        // much as a new body does (a healthy file source only ever answers "unchanged").
        if healthy && merged && matches!(result, RefreshResult::ok | RefreshResult::unchanged) {
            state.confirmed_at = Some(UNIX_EPOCH + Duration::from_secs(now));
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
        healthy
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
        self.metrics
            .issuer_mismatch
            .get_or_create(&SourceLabels {
                issuer: configured.to_owned(),
                source: i.to_string(),
            })
            .set(i64::from(mismatch));
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

    /// The issuer's state for `/status` and `/readyz`; also refreshes the age gauge.
    pub async fn status(&self) -> IssuerStatus {
        let state = self.state.lock().await;
        let confirmed_at = state
            .confirmed_at
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok());
        if let Some(at) = confirmed_at {
            let age = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |now| now.saturating_sub(at).as_secs_f64());
            self.metrics
                .jwks_age
                .get_or_create(&self.issuer_labels())
                .set(age);
        }
        let snapshot = self.store.get(self.index);
        IssuerStatus {
            issuer: self.issuer().to_owned(),
            discovery_url: self.endpoint.discovery_url(),
            jwks_uri: self.endpoint.jwks_uri.clone(),
            published: snapshot.is_some(),
            kids: snapshot.map(|s| s.kids.clone()).unwrap_or_default(),
            confirmed_at: confirmed_at.map(|d| d.as_secs()),
            sources: state.sources.clone(),
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
        self.metrics
            .state_write_errors
            .get_or_create(&self.issuer_labels())
            .inc();
        false
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use bytes::Bytes;

    use super::*;
    use crate::state::create_state_dir;

    const MINUTE: Duration = Duration::from_secs(60);
    const ISSUER: &str = "https://oidc.example.com";
    const K3S: &str = include_str!("../../tests/fixtures/jwks/k3s.json");
    const ROTATED: &str = include_str!("../../tests/fixtures/jwks/rotated.json");

    /// A one-source pipeline with its state under `dir/state`.
    fn pipeline(dir: &Path, keys: KeyPolicy) -> IssuerPipeline {
        let state = dir.join("state");
        create_state_dir(&state).expect("state dir");
        IssuerPipeline::new(
            0,
            IssuerEndpoint::new(crate::issuer::Issuer::parse(ISSUER).expect("issuer")),
            keys,
            Arc::new(DocumentStore::new(1)),
            StateFile::new(&state, ISSUER),
            Arc::new(Metrics::new()),
            vec!["jwks.json".to_owned()],
        )
    }

    fn body(set: &'static str) -> Result<Fetched, FetchError> {
        Ok(Fetched::Body {
            body: Bytes::from_static(set.as_bytes()),
            upstream_issuer: None,
        })
    }

    fn sorted_kids(set: &str) -> Vec<String> {
        let mut kids: Vec<String> = validate(set.as_bytes())
            .expect("fixture")
            .keys
            .into_iter()
            .map(|k| k.kid)
            .collect();
        kids.sort();
        kids
    }

    fn published(p: &IssuerPipeline) -> Vec<String> {
        p.store.get(0).expect("published").kids.clone()
    }

    /// The value of `oidc_edge_refreshes_total` for `result`, from the exposition text.
    fn refreshes(p: &IssuerPipeline, result: &str) -> u64 {
        let needle = format!("source=\"0\",result=\"{result}\"}} ");
        p.metrics
            .render()
            .lines()
            .filter(|l| l.starts_with("oidc_edge_refreshes_total{") && l.contains(&needle))
            .map(|l| {
                l.rsplit(' ')
                    .next()
                    .expect("value")
                    .parse::<u64>()
                    .expect("count")
            })
            .sum()
    }

    /// Every refresh outcome, in a row, against one pipeline: what `refresh` returns, the
    /// result it counts, the error `/status` shows, and that a failure never changes what is
    /// published (DESIGN §4: "a failed fetch, a refused set or a refused merge never changes
    /// what is served").
    #[tokio::test]
    async fn each_refresh_outcome_is_counted_and_failures_keep_the_published_set() {
        const PRIVATE: &str = include_str!("../../tests/fixtures/jwks/private-rsa.json");
        let dir = tempfile::tempdir().expect("tempdir");
        let p = pipeline(dir.path(), KeyPolicy::default());
        let clock = || Clock {
            wall: 1_000,
            mono: std::time::Instant::now(),
        };
        let missing = || {
            Err(FetchError::File {
                path: "jwks.json".into(),
                source: std::io::ErrorKind::NotFound.into(),
            })
        };
        // (fetched, healthy, counted as, last error shown)
        type Row = (
            Result<Fetched, FetchError>,
            bool,
            &'static str,
            Option<&'static str>,
        );
        let table: [Row; 5] = [
            (body(K3S), true, "ok", None),
            (Ok(Fetched::Unchanged), true, "unchanged", None),
            (
                missing(),
                false,
                "fetch_error",
                Some("jwks.json: entity not found"),
            ),
            (body("{}"), false, "rejected", Some("not a JWK set")),
            (body(PRIVATE), false, "rejected", Some("private")),
        ];
        for (n, (fetched, healthy, result, error)) in table.into_iter().enumerate() {
            let before = refreshes(&p, result);
            assert_eq!(p.apply(0, "s", fetched, clock()).await, healthy, "row {n}");
            assert_eq!(
                refreshes(&p, result),
                before + 1,
                "row {n}: counted as {result}"
            );
            assert_eq!(
                published(&p),
                sorted_kids(K3S),
                "row {n}: still the first set"
            );
            let status = p.status().await.sources[0].clone();
            assert_eq!(status.healthy, healthy, "row {n}");
            match error {
                None => assert_eq!(status.last_error, None, "row {n}"),
                Some(text) => {
                    let shown = status.last_error.expect("an error");
                    assert!(shown.contains(text), "row {n}: {shown}");
                }
            }
        }
        // A set the merge refuses: more current keys than max_keys.
        let dir = tempfile::tempdir().expect("tempdir");
        let p = pipeline(
            dir.path(),
            KeyPolicy {
                max_keys: 1,
                ..KeyPolicy::default()
            },
        );
        assert!(!p.apply(0, "s", body(K3S), clock()).await);
        assert_eq!(refreshes(&p, "merge_rejected"), 1);
        assert!(
            p.store.get(0).is_none(),
            "nothing published, never an empty set"
        );
    }

    #[tokio::test]
    async fn only_an_unchanged_answer_from_a_healthy_source_confirms() {
        // M3: "unchanged" repeats the source's last result; after a refused body that result
        // is a failure, and nothing is confirmed.
        let dir = tempfile::tempdir().expect("tempdir");
        let p = pipeline(dir.path(), KeyPolicy::default());
        let at = |wall: u64| Clock {
            wall,
            mono: std::time::Instant::now(),
        };
        let confirmed = || async { p.status().await.confirmed_at };
        assert!(p.apply(0, "s", body(K3S), at(1_000)).await);
        assert_eq!(confirmed().await, Some(1_000));
        assert!(p.apply(0, "s", Ok(Fetched::Unchanged), at(1_060)).await);
        assert_eq!(confirmed().await, Some(1_060));
        assert!(!p.apply(0, "s", body("{}"), at(1_120)).await);
        assert!(!p.apply(0, "s", Ok(Fetched::Unchanged), at(1_180)).await);
        assert_eq!(confirmed().await, Some(1_060));
        let on_disk = p.state_file.load_state().expect("load").expect("saved");
        assert_eq!(on_disk.confirmed_at, Some(1_060), "written after 60 s");
    }

    #[tokio::test]
    async fn a_forward_wall_clock_step_does_not_cut_rotation_grace() {
        // L7: a board boots with an old clock, then NTP steps it a year forward.
        let dir = tempfile::tempdir().expect("tempdir");
        let p = pipeline(
            dir.path(),
            KeyPolicy {
                retention: Duration::from_secs(3600),
                ..KeyPolicy::default()
            },
        );
        let start = Clock {
            wall: 1_700_000_000,
            mono: std::time::Instant::now(),
        };
        let at = |wall: u64, mono: u64| Clock {
            wall,
            mono: start.mono + Duration::from_secs(mono),
        };
        assert!(p.apply(0, "s", body(K3S), start).await);
        let w = start.wall;
        assert!(p.apply(0, "s", body(ROTATED), at(w + 10, 10)).await);
        let mut both = [sorted_kids(K3S), sorted_kids(ROTATED)].concat();
        both.sort();
        both.dedup();
        assert_eq!(published(&p), both);
        let year = 365 * 86_400;
        assert!(
            p.apply(0, "s", Ok(Fetched::Unchanged), at(w + year, 20))
                .await
        );
        assert_eq!(published(&p), both, "grace kept across the step");
        // The grace runs out one hour after the key vanished, by the monotonic clock.
        assert!(
            p.apply(0, "s", Ok(Fetched::Unchanged), at(w + year + 3589, 3609))
                .await
        );
        assert_eq!(published(&p), both);
        assert!(
            p.apply(0, "s", Ok(Fetched::Unchanged), at(w + year + 3590, 3610))
                .await
        );
        assert_eq!(published(&p), sorted_kids(ROTATED));
    }

    #[tokio::test]
    async fn restore_clamps_vanish_times_in_the_future_to_now() {
        // L7: a vanish time written while the clock was far ahead must not retain a key for
        // years; at most `key_retention` from now.
        let dir = tempfile::tempdir().expect("tempdir");
        let p = pipeline(dir.path(), KeyPolicy::default());
        let k3s = validate(K3S.as_bytes()).expect("fixture").keys;
        let rotated = validate(ROTATED.as_bytes()).expect("fixture").keys;
        let future = unix_now() + 10 * 365 * 86_400;
        let l0 = merge(&[Some(&k3s)], &Ledger::default(), future, MINUTE, 100).expect("ok");
        let l1 = merge(&[Some(&rotated)], &l0, future, MINUTE, 100).expect("ok");
        p.state_file.save(&l1).expect("save");
        let before = unix_now();
        p.restore().await;
        let state = p.state.lock().await;
        let vanished: Vec<u64> = state
            .ledger
            .keys
            .values()
            .filter_map(|e| e.vanished_at)
            .collect();
        assert_eq!(vanished.len(), 1, "{:?}", state.ledger);
        assert!((before..=unix_now()).contains(&vanished[0]), "{vanished:?}");
    }

    #[tokio::test]
    async fn a_failed_persist_is_retried_on_later_refreshes_and_counted() {
        // M2: the disk fails once; the ledger does not change again; the next refresh must
        // still write it, or a restart during an outage serves a set without the new key.
        let dir = tempfile::tempdir().expect("tempdir");
        let p = pipeline(dir.path(), KeyPolicy::default());
        assert!(p.apply(0, "s", body(K3S), Clock::now()).await);
        // rename(2) cannot replace a non-empty directory: stands in for ENOSPC or EIO.
        let path = p.state_file.path().to_owned();
        std::fs::remove_file(&path).expect("rm");
        std::fs::create_dir(&path).expect("blocker");
        std::fs::write(path.join("x"), b"x").expect("write");
        assert!(p.apply(0, "s", body(ROTATED), Clock::now()).await);
        let metrics = p.metrics.render();
        assert!(
            metrics.contains(&format!(
                "oidc_edge_state_write_errors_total{{issuer=\"{ISSUER}\"}} 1\n"
            )),
            "{metrics}"
        );
        std::fs::remove_dir_all(&path).expect("unblock");
        assert!(p.apply(0, "s", Ok(Fetched::Unchanged), Clock::now()).await);
        let on_disk = p.state_file.load().expect("load").expect("persisted");
        let mut union = [sorted_kids(K3S), sorted_kids(ROTATED)].concat();
        union.sort();
        union.dedup();
        assert_eq!(on_disk.kids(), union);
        assert_eq!(on_disk, p.state.lock().await.ledger);
        // Written once, not again on every refresh.
        let written = std::fs::metadata(&path)
            .expect("meta")
            .modified()
            .expect("mtime");
        std::fs::remove_file(&path).expect("rm");
        assert!(p.apply(0, "s", Ok(Fetched::Unchanged), Clock::now()).await);
        assert!(
            !path.exists(),
            "rewritten although nothing changed (was {written:?})"
        );
        let metrics = p.metrics.render();
        assert!(
            metrics.contains(
                "oidc_edge_state_write_errors_total{issuer=\"https://oidc.example.com\"} 1\n"
            ),
            "{metrics}"
        );
    }

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
