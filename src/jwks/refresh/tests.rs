use std::path::Path;

use bytes::Bytes;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::schedule::jitter_sample;
use super::*;
use crate::state::create_state_dir;

const MINUTE: Duration = Duration::from_secs(60);
const ISSUER: &str = "https://oidc.example.com";
const K3S: &str = include_str!("../../../tests/fixtures/jwks/k3s.json");
const ROTATED: &str = include_str!("../../../tests/fixtures/jwks/rotated.json");

/// A one-source pipeline with its state under `dir/state`.
fn pipeline(dir: &Path, keys: KeyPolicy) -> IssuerPipeline {
    pipeline_of(dir, keys, &["jwks.json"])
}

/// A pipeline over sources named `names`, with its state under `dir/state`.
fn pipeline_of(dir: &Path, keys: KeyPolicy, names: &[&str]) -> IssuerPipeline {
    let state = dir.join("state");
    create_state_dir(&state).expect("state dir");
    IssuerPipeline::new(
        0,
        IssuerEndpoint::new(crate::issuer::Issuer::parse(ISSUER).expect("issuer")),
        keys,
        Arc::new(DocumentStore::new(1)),
        StateFile::new(&state, ISSUER),
        Arc::new(Metrics::new()),
        names.iter().map(|n| (*n).to_owned()).collect(),
    )
}

/// A `KeySource` fed from a queue, as SPIRE's `FakeKeySetSource`: each fetch takes the next
/// answer (an empty queue answers "unchanged") and records when it was asked.
struct FakeSource {
    name: &'static str,
    answers: std::collections::VecDeque<Result<Fetched, FetchError>>,
    asked_at: Arc<std::sync::Mutex<Vec<tokio::time::Instant>>>,
}

impl FakeSource {
    fn new(name: &'static str, answers: Vec<Result<Fetched, FetchError>>) -> Self {
        Self {
            name,
            answers: answers.into(),
            asked_at: Arc::default(),
        }
    }
}

impl KeySource for FakeSource {
    fn describe(&self) -> String {
        self.name.to_owned()
    }

    async fn fetch_key_set(&mut self) -> Result<Fetched, FetchError> {
        self.asked_at
            .lock()
            .expect("lock")
            .push(tokio::time::Instant::now());
        self.answers.pop_front().unwrap_or(Ok(Fetched::Unchanged))
    }
}

fn missing() -> Result<Fetched, FetchError> {
    Err(FetchError::File {
        path: "jwks.json".into(),
        source: std::io::ErrorKind::NotFound.into(),
    })
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
    p.store.get(0).expect("published").kids.to_vec()
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
    const PRIVATE: &str = include_str!("../../../tests/fixtures/jwks/private-rsa.json");
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

/// The refresh outcomes through the `KeySource` seam, with two sources feeding one issuer:
/// what `refresh` returns, what is published (the union of the sources' last good sets), and
/// what `/status` shows of each source. A failing source keeps its last good set in the union.
#[tokio::test]
async fn two_fake_sources_union_and_a_failing_one_keeps_its_last_good_set() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = pipeline_of(dir.path(), KeyPolicy::default(), &["a", "b"]);
    let mut a = FakeSource::new("a", vec![body(K3S), missing(), body("{}")]);
    let mut b = FakeSource::new("b", vec![body(ROTATED), Ok(Fetched::Unchanged)]);
    let union = || {
        let mut kids = sorted_kids(K3S);
        kids.extend(sorted_kids(ROTATED));
        kids.sort();
        kids.dedup();
        kids
    };
    assert!(p.refresh(0, &mut a).await, "a: first set");
    assert_eq!(published(&p), sorted_kids(K3S));
    assert!(p.refresh(1, &mut b).await, "b: second set");
    assert_eq!(published(&p), union());
    assert!(!p.refresh(0, &mut a).await, "a: fetch fails");
    assert_eq!(published(&p), union(), "a's last good set stays");
    assert!(!p.refresh(0, &mut a).await, "a: body refused");
    assert_eq!(published(&p), union(), "a refused set changes nothing");
    assert!(p.refresh(1, &mut b).await, "b: unchanged");
    let status = p.status().await;
    let names: Vec<&str> = status.sources.iter().map(|s| s.source.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
    assert!(!status.sources[0].healthy);
    let shown = status.sources[0].last_error.clone().expect("an error");
    assert!(shown.contains("not a JWK set"), "{shown}");
    assert!(status.sources[1].healthy);
    assert_eq!(status.sources[1].last_error, None);
    assert_eq!(refreshes(&p, "fetch_error"), 1);
    assert_eq!(refreshes(&p, "rejected"), 1);
    let text = p.metrics.render();
    assert!(
        text.lines()
            .any(|l| l.starts_with("oidc_edge_refreshes_total{")
                && l.contains("source=\"1\",result=\"unchanged\"} 1")),
        "b's unchanged answer is counted under source 1"
    );
}

/// `run_source` in paused time: failures retry after 1 s, 2 s and 4 s, a success waits the
/// interval, each within the ±10 % jitter; SIGHUP (`refresh_now`) fetches at once; `cancel`
/// ends the task.
#[tokio::test(start_paused = true)]
async fn run_source_backs_off_then_waits_the_interval_and_sighup_cuts_the_wait() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = Arc::new(pipeline(dir.path(), KeyPolicy::default()));
    let source = FakeSource::new("s", vec![missing(), missing(), missing(), body(K3S)]);
    let asked_at = Arc::clone(&source.asked_at);
    let cancel = CancellationToken::new();
    let (refresh_now, refresh_rx) = watch::channel(());
    let heartbeat = crate::supervisor::Heartbeats::default().register("s".into(), MINUTE);
    let task = tokio::spawn(run_source(
        Arc::clone(&p),
        0,
        source,
        MINUTE,
        cancel.clone(),
        refresh_rx,
        heartbeat,
    ));
    // Six fetches take 1 + 2 + 4 + 60 + 60 s, ±10 %; virtual time, so this costs nothing.
    let started = tokio::time::Instant::now();
    while asked_at.lock().expect("lock").len() < 6 {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "six fetches in 5 min"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let gaps: Vec<Duration> = {
        let at = asked_at.lock().expect("lock");
        at.windows(2).map(|w| w[1] - w[0]).collect()
    };
    let nominal = [1, 2, 4, 60, 60].map(Duration::from_secs);
    assert_eq!(gaps.len(), nominal.len(), "{gaps:?}");
    for (gap, nominal) in gaps.iter().zip(nominal) {
        assert!(
            *gap >= nominal.mul_f64(0.9) && *gap <= nominal.mul_f64(1.1),
            "{gap:?} is not {nominal:?} ± 10 % (all: {gaps:?})"
        );
    }
    assert_eq!(published(&p), sorted_kids(K3S));

    let before = asked_at.lock().expect("lock").len();
    let sent = tokio::time::Instant::now();
    refresh_now.send_replace(());
    tokio::time::sleep(Duration::from_millis(1)).await;
    let at = asked_at.lock().expect("lock").clone();
    assert_eq!(at.len(), before + 1, "SIGHUP fetches at once");
    assert!(at[before] - sent < Duration::from_millis(1));

    cancel.cancel();
    task.await.expect("run_source ends when cancelled");
}

/// Every outcome of `IssuerPipeline::refresh` through the `KeySource` seam, one row per
/// answer of one fake source, in order: what `refresh` returns, the result counted, the
/// issuer the upstream claims as `/status` shows it, and what is published afterwards. Only a
/// good set changes what is published; an issuer mismatch (F-1) is flagged but the keys are
/// still the cluster's and are served.
#[tokio::test]
async fn every_refresh_outcome_through_the_key_source_seam() {
    const PRIVATE: &str = include_str!("../../../tests/fixtures/jwks/private-rsa.json");
    let from = |set: &'static str, upstream: &str| {
        Ok(Fetched::Body {
            body: Bytes::from_static(set.as_bytes()),
            upstream_issuer: Some(upstream.to_owned()),
        })
    };
    // (answer, healthy, counted as, upstream mismatch, published)
    type Row = (
        Result<Fetched, FetchError>,
        bool,
        &'static str,
        bool,
        &'static str,
    );
    let rows: Vec<Row> = vec![
        (from(K3S, ISSUER), true, "ok", false, K3S),
        (Ok(Fetched::Unchanged), true, "unchanged", false, K3S),
        (missing(), false, "fetch_error", false, K3S),
        (body("{}"), false, "rejected", false, K3S),
        (body(PRIVATE), false, "rejected", false, K3S),
        (
            from(ROTATED, "https://kubernetes.default.svc"),
            true,
            "ok",
            true,
            "both",
        ),
        (from(ROTATED, ISSUER), true, "ok", false, "both"),
    ];
    let dir = tempfile::tempdir().expect("tempdir");
    let p = pipeline(dir.path(), KeyPolicy::default());
    let mut source = FakeSource::new("s", Vec::new());
    let both = {
        let mut kids = sorted_kids(K3S);
        kids.extend(sorted_kids(ROTATED));
        kids.sort();
        kids.dedup();
        kids
    };
    for (n, (answer, healthy, result, mismatch, published_set)) in rows.into_iter().enumerate() {
        source.answers.push_back(answer);
        let before = refreshes(&p, result);
        assert_eq!(p.refresh(0, &mut source).await, healthy, "row {n}");
        assert_eq!(
            refreshes(&p, result),
            before + 1,
            "row {n}: counted as {result}"
        );
        let status = p.status().await.sources[0].clone();
        assert_eq!(status.healthy, healthy, "row {n}");
        assert_eq!(status.issuer_mismatch, mismatch, "row {n}");
        let expected = match published_set {
            "both" => both.clone(),
            set => sorted_kids(set),
        };
        assert_eq!(published(&p), expected, "row {n}");
    }

    // A set the merge refuses (more current keys than max_keys) publishes nothing.
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = KeyPolicy {
        max_keys: 1,
        ..KeyPolicy::default()
    };
    let p = pipeline(dir.path(), keys);
    let mut source = FakeSource::new("s", vec![body(K3S)]);
    assert!(!p.refresh(0, &mut source).await);
    assert_eq!(refreshes(&p, "merge_rejected"), 1);
    assert!(p.store.get(0).is_none(), "never an empty or partial set");
}
