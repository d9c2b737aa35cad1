//! Criterion benchmarks of the pure hot paths: validating and rendering a k3s-shaped JWKS
//! (2 and 100 keys), and the public router answering both documents, with and without a
//! matching `If-None-Match`. `cargo bench --bench documents`.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use criterion::{Criterion, criterion_group, criterion_main};
use http::Request;
use oidc_edge::config::Config;
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

fn routes(c: &mut Criterion) {
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
    let app = router(
        Site::new(&config.endpoints(), &Metrics::new()),
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
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    for (name, path, inm) in [
        ("discovery 200", "/.well-known/openid-configuration", None),
        ("jwks 200", "/openid/v1/jwks", None),
        ("jwks 304", "/openid/v1/jwks", Some(etag.as_str())),
    ] {
        c.bench_function(&format!("router {name}"), |b| {
            b.iter(|| {
                let mut request = Request::get(path).header("host", "oidc.example.com");
                if let Some(tag) = inm {
                    request = request.header("if-none-match", tag);
                }
                let request = request.body(Body::empty()).expect("request");
                runtime
                    .block_on(app.clone().oneshot(request))
                    .expect("infallible")
            });
        });
    }
}

criterion_group!(benches, validate_and_render, routes);
criterion_main!(benches);
