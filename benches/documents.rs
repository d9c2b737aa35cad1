//! Criterion benchmarks of the pure hot paths: validating and rendering a k3s-shaped JWKS
//! (2 and 100 keys), and the public router answering both documents, with and without a
//! matching `If-None-Match`. `cargo bench --bench documents`.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use criterion::{Criterion, criterion_group};
use http::Request;
use oidc_edge::config::Config;
use oidc_edge::http::fetched_by::FetchTracker;
use oidc_edge::http::{Site, router};
use oidc_edge::issuer::Issuer;
use oidc_edge::issuer::endpoint::IssuerEndpoint;
use oidc_edge::jwks::merge::{Ledger, merge};
use oidc_edge::jwks::store::{DocumentStore, Snapshot};
use oidc_edge::jwks::validate::validate;
use oidc_edge::metrics::Metrics;
use serde_json::{Value, json};
use tower::ServiceExt as _;

const K3S: &str = include_str!("../tests/fixtures/jwks/k3s.json");

/// The k3s set, and 100 keys made from its RSA key with distinct kids.
fn sets() -> [(&'static str, Vec<u8>); 2] {
    let set: Value = serde_json::from_str(K3S).expect("fixture");
    let rsa = set["keys"][0].clone();
    let many: Vec<Value> = (0..100)
        .map(|i| {
            let mut key = rsa.clone();
            key["kid"] = json!(format!("kid-{i:03}"));
            key
        })
        .collect();
    [
        ("2 keys", K3S.as_bytes().to_vec()),
        (
            "100 keys",
            serde_json::to_vec(&json!({ "keys": many })).expect("json"),
        ),
    ]
}

fn validate_and_render(c: &mut Criterion) {
    let endpoint = IssuerEndpoint::new(Issuer::parse("https://oidc.example.com").expect("issuer"));
    for (name, body) in sets() {
        c.bench_function(&format!("validate+merge+render {name}"), |b| {
            b.iter(|| {
                let keys = validate(&body).expect("valid").keys;
                let ledger = merge(
                    &[Some(&keys)],
                    &Ledger::default(),
                    0,
                    Duration::from_secs(3600),
                    100,
                )
                .expect("merge");
                Snapshot::build(&endpoint, &ledger)
            });
        });
    }
}

/// The public router with the k3s set published, and the JWKS's ETag.
fn app() -> (axum::Router, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("jwks.json"), K3S).expect("write");
    let config = Config::from_toml_str(
        "[[issuers]]\nissuer = \"https://oidc.example.com\"\n  [[issuers.sources]]\n  kind = \"file\"\n  path = \"jwks.json\"\n[http]\nlisten = \"127.0.0.1:0\"\n",
        &dir.path().join("config.toml"),
    )
    .expect("config");
    let store = Arc::new(DocumentStore::new(1));
    let cfg = &config.issuers[0];
    let snapshot = Snapshot::first(&cfg.endpoint, cfg.keys, &[K3S.as_bytes()]).expect("valid");
    store.publish(0, snapshot);
    // Relying-party fetch tracking as `serve` has it: the built-in families.
    let fetches = Arc::new(FetchTracker::new(&config.relying_parties, 1));
    let app = router(
        Site::new(&config.endpoints(), &Metrics::new()).with_fetch_tracker(fetches),
        Arc::clone(&store),
    );
    let etag = store
        .get(0)
        .expect("published")
        .jwks
        .etag
        .to_str()
        .expect("ascii")
        .to_owned();
    (app, etag)
}

/// A browser's User-Agent: what most requests that are not a relying party's carry.
const BROWSER: &str = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0";

/// The requests measured, by name: path, `If-None-Match`, `User-Agent`.
fn cases(
    etag: &str,
) -> Vec<(
    &'static str,
    &'static str,
    Option<String>,
    Option<&'static str>,
)> {
    let jwks = "/openid/v1/jwks";
    vec![
        (
            "discovery 200",
            "/.well-known/openid-configuration",
            None,
            None,
        ),
        ("jwks 200", jwks, None, None),
        ("jwks 304", jwks, Some(etag.to_owned()), None),
        ("jwks 200 browser", jwks, None, Some(BROWSER)),
        // A relying party's fetch: recorded (a cache insert) as well as answered.
        (
            "jwks 200 aws",
            jwks,
            None,
            Some("AWS Security Token Service"),
        ),
    ]
}

fn request(path: &str, inm: Option<&str>, user_agent: Option<&str>) -> http::Request<Body> {
    let mut request = Request::get(path).header("host", "oidc.example.com");
    if let Some(tag) = inm {
        request = request.header("if-none-match", tag);
    }
    if let Some(agent) = user_agent {
        request = request.header("user-agent", agent);
    }
    request.body(Body::empty()).expect("request")
}

fn routes(c: &mut Criterion) {
    let (app, etag) = app();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    for (name, path, inm, agent) in cases(&etag) {
        c.bench_function(&format!("router {name}"), |b| {
            b.iter(|| {
                runtime
                    .block_on(app.clone().oneshot(request(path, inm.as_deref(), agent)))
                    .expect("infallible")
            });
        });
    }
}

/// `benches/callgrind.sh`'s mode: `OIDC_EDGE_CALLGRIND=N CASE` answers N requests of one case
/// and exits, so that the difference of two runs under callgrind is the instructions of the
/// requests alone (setup and exit cancel out).
fn callgrind(count: usize, case: &str) {
    let (app, etag) = app();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let (_, path, inm, agent) = cases(&etag)
        .into_iter()
        .find(|(name, ..)| *name == case)
        .unwrap_or_else(|| panic!("no case {case:?}"));
    for _ in 0..count {
        let response = runtime
            .block_on(app.clone().oneshot(request(path, inm.as_deref(), agent)))
            .expect("infallible");
        assert!(response.status().as_u16() < 400);
    }
}

criterion_group!(benches, validate_and_render, routes);

fn main() {
    if let Ok(count) = std::env::var("OIDC_EDGE_CALLGRIND") {
        let case = std::env::args().skip(1).find(|a| !a.starts_with('-'));
        callgrind(
            count.parse().expect("OIDC_EDGE_CALLGRIND=<requests>"),
            &case.expect("a case name"),
        );
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
