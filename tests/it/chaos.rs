//! Chaos: the upstream flaps between healthy, failing, hanging, closed and hostile every second
//! or so while its keys rotate, and clients poll all along. No request may fail, and every body
//! served must be a valid key set made of keys the upstream really published.
//!
//! The normal test run takes `OIDC_EDGE_CHAOS_SECS` = 6 seconds; the long run for the figures
//! in the notes is `OIDC_EDGE_CHAOS_SECS=600 cargo test --release --test it chaos -- --nocapture`.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::support::clients::{client, get};
use crate::support::config::TestConfig;
use crate::support::fake_apiserver::{FakeApiserver, Mode};
use crate::support::inprocess::InProcess;
use crate::support::{K3S, PRIVATE_RSA, ROTATED, Scratch, eventually};

const ISSUER: &str = "https://oidc.example.com";
const TOKEN: &str = "chaos-token";

/// Every public key the upstream ever publishes, as oidc-edge renders it.
fn known_keys() -> HashSet<String> {
    [K3S, ROTATED]
        .iter()
        .flat_map(|set| {
            oidc_edge::jwks::validate::validate(set.as_bytes())
                .expect("fixture")
                .keys
        })
        .map(|k| serde_json::to_string(&k).expect("json"))
        .collect()
}

/// A served body is valid when it is a non-empty set of known keys, sorted by kid, rendered
/// exactly as oidc-edge renders it.
fn valid(body: &str, known: &HashSet<String>) -> bool {
    let Ok(parsed) = oidc_edge::jwks::validate::validate(body.as_bytes()) else {
        return false;
    };
    parsed.dropped.is_empty()
        && oidc_edge::jwks::render_jwks(&parsed.keys).as_ref() == body.as_bytes()
        && parsed
            .keys
            .iter()
            .all(|k| known.contains(&serde_json::to_string(k).expect("json")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flapping_upstream_rotating_keys_and_polling_clients() {
    let secs: u64 = std::env::var("OIDC_EDGE_CHAOS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(6);
    let mut fake = FakeApiserver::start(K3S, ISSUER, TOKEN).await;
    let scratch = Scratch::new();
    let config = TestConfig::new()
        .set("issuers.0.key_retention", "2s")
        .source(
            fake.source_in(&scratch, TOKEN)
                .set("refresh_interval", "100ms")
                .set("timeout", "300ms"),
        )
        .write(&scratch);
    let server = InProcess::start(&config).await;
    let url = server.url("/openid/v1/jwks");
    eventually("first keys", || async { get(&url).await.0 == 200 }).await;

    let known = Arc::new(known_keys());
    let stop = Arc::new(AtomicBool::new(false));
    let [requests, failed, invalid, not_modified] =
        std::array::from_fn(|_| Arc::new(AtomicU64::new(0)));
    let served_sets = Arc::new(std::sync::Mutex::new(HashSet::new()));
    let mut pollers = Vec::new();
    for n in 0..4 {
        let (stop, known, url, http) =
            (Arc::clone(&stop), Arc::clone(&known), url.clone(), client());
        let served_sets = Arc::clone(&served_sets);
        let (requests, failed, invalid, not_modified) = (
            Arc::clone(&requests),
            Arc::clone(&failed),
            Arc::clone(&invalid),
            Arc::clone(&not_modified),
        );
        pollers.push(tokio::spawn(async move {
            let mut etag: Option<String> = None;
            while !stop.load(Ordering::Relaxed) {
                let mut request = http.get(&url);
                // Half the clients revalidate, as caching relying parties do.
                if let (1 | 3, Some(tag)) = (n, &etag) {
                    request = request.header("if-none-match", tag.as_str());
                }
                requests.fetch_add(1, Ordering::Relaxed);
                match request.send().await {
                    Ok(r) if r.status() == 304 => {
                        not_modified.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) if r.status() == 200 => {
                        etag = r
                            .headers()
                            .get("etag")
                            .and_then(|e| e.to_str().ok())
                            .map(str::to_owned);
                        match r.text().await {
                            Ok(body) if valid(&body, &known) => {
                                served_sets.lock().expect("sets").insert(body);
                            }
                            Ok(_) => {
                                invalid.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(_) => {
                                failed.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    _ => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }));
    }

    let modes = [
        Mode::Normal,
        Mode::Status(500),
        Mode::Normal,
        Mode::Hang,
        Mode::Status(503),
        Mode::Body(PRIVATE_RSA.to_owned()),
        Mode::Normal,
        Mode::Body("{\"keys\": [".to_owned()),
        Mode::Drip,
        Mode::Redirect("https://evil.example/".to_owned()),
    ];
    let started = Instant::now();
    let (mut step, mut stops, mut rotations) = (0usize, 0u64, 0u64);
    while started.elapsed() < Duration::from_secs(secs) {
        if step % 3 == 0 {
            rotations += 1;
            fake.set(|s| s.jwks = if rotations % 2 == 0 { K3S } else { ROTATED }.to_owned());
        }
        if step % 7 == 6 {
            stops += 1;
            fake.stop();
            tokio::time::sleep(Duration::from_millis(400)).await;
            fake.restart().await;
        } else {
            let mode = modes[step % modes.len()].clone();
            fake.set(|s| s.mode = mode);
        }
        step += 1;
        tokio::time::sleep(Duration::from_millis(300 + (step as u64 * 137) % 600)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for poller in pollers {
        poller.await.expect("poller");
    }
    let [requests, failed, invalid, not_modified] =
        [&requests, &failed, &invalid, &not_modified].map(|c| c.load(Ordering::Relaxed));
    let distinct = served_sets.lock().expect("sets").len();
    println!(
        "chaos: {secs} s, {step} upstream changes ({rotations} key rotations, {stops} port closures), \
         {requests} requests ({not_modified} answered 304), {distinct} distinct key sets served, \
         {failed} failed, {invalid} invalid bodies"
    );
    assert!(distinct >= 2, "the rotations reached the clients");
    assert!(requests > secs * 50, "{requests} requests");
    assert_eq!((failed, invalid), (0, 0));
}
