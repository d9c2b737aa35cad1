//! The public router, driven with `oneshot` (no sockets): routing by host and path, the
//! exact headers relying parties see, conditional requests, and the error statuses.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use http::{Request, Response, StatusCode, header};
use http_body_util::BodyExt as _;
use oidc_edge::config::{Config, IssuerConfig};
use oidc_edge::http::{Site, router};
use oidc_edge::jwks::merge::{Ledger, merge};
use oidc_edge::jwks::store::{DocumentStore, Snapshot};
use oidc_edge::jwks::validate::validate;
use tower::ServiceExt as _;

use crate::support::{K3S, ROTATED, Scratch};

const TWO_HOSTS_AND_A_PREFIX: &str = r#"
[[issuers]]
issuer = "https://oidc.example.com"
  [[issuers.sources]]
  kind = "file"
  path = "jwks.json"
[[issuers]]
issuer = "https://edge.example.com/cluster-a"
jwks_content_type = "application/jwk-set+json"
cache_max_age = "1h"
  [[issuers.sources]]
  kind = "file"
  path = "jwks.json"
[[issuers]]
issuer = "https://edge.example.com/cluster-b/"
jwks_path = "/keys/b"
  [[issuers.sources]]
  kind = "file"
  path = "jwks.json"
[[issuers]]
issuer = "https://other.example.org"
  [[issuers.sources]]
  kind = "file"
  path = "jwks.json"
[http]
listen = "127.0.0.1:0"
"#;

struct Fixture {
    config: Config,
    store: Arc<DocumentStore>,
    app: Router,
}

fn ledger(jwks: &str) -> Ledger {
    let keys = validate(jwks.as_bytes()).expect("fixture is valid").keys;
    merge(
        &[Some(&keys)],
        &Ledger::default(),
        0,
        Duration::from_secs(60),
        100,
    )
    .expect("merge")
}

/// What a new pipeline publishes for `cfg` from one source serving `jwks`.
fn snapshot(cfg: &IssuerConfig, jwks: &str) -> Snapshot {
    Snapshot::first(&cfg.endpoint, cfg.keys, &[jwks.as_bytes()]).expect("fixture is valid")
}

/// The four issuers above; all but the last have published `K3S` (issuer 2: `ROTATED`).
fn fixture() -> Fixture {
    let scratch = Scratch::new();
    scratch.write("jwks.json", K3S);
    let config =
        Config::from_toml_str(TWO_HOSTS_AND_A_PREFIX, &scratch.path("config.toml")).expect("valid");
    let store = Arc::new(DocumentStore::new(config.issuers.len()));
    for (i, jwks) in [(0, K3S), (1, K3S), (2, ROTATED)] {
        let cfg = &config.issuers[i];
        store.publish(i, snapshot(cfg, jwks));
    }
    let app = router(
        Site::new(&config.endpoints(), &oidc_edge::metrics::Metrics::new()),
        Arc::clone(&store),
    );
    Fixture { config, store, app }
}

async fn send(
    app: &Router,
    method: &str,
    host: &str,
    path: &str,
    extra: &[(&str, &str)],
) -> Response<Body> {
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, host);
    for (name, value) in extra {
        request = request.header(*name, *value);
    }
    app.clone()
        .oneshot(request.body(Body::empty()).expect("request"))
        .await
        .expect("infallible")
}

async fn body(response: Response<Body>) -> Vec<u8> {
    response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes()
        .to_vec()
}

fn header_of<'a>(response: &'a Response<Body>, name: &str) -> &'a str {
    response
        .headers()
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header"))
        .to_str()
        .expect("ascii")
}

#[tokio::test]
async fn discovery_document_is_generated_with_the_exact_issuer_and_headers() {
    let f = fixture();
    let response = send(
        &f.app,
        "GET",
        "oidc.example.com",
        "/.well-known/openid-configuration",
        &[],
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(header_of(&response, "content-type"), "application/json");
    assert_eq!(header_of(&response, "cache-control"), "public, max-age=300");
    assert_eq!(header_of(&response, "x-content-type-options"), "nosniff");
    assert_eq!(header_of(&response, "access-control-allow-origin"), "*");
    let etag = header_of(&response, "etag").to_owned();
    assert!(
        etag.starts_with('"') && etag.ends_with('"'),
        "strong ETag: {etag}"
    );
    let bytes = body(response).await;
    assert_eq!(
        etag,
        oidc_edge::jwks::store::strong_etag(&bytes)
            .to_str()
            .expect("ascii")
    );
    assert_eq!(
        String::from_utf8(bytes).expect("utf-8"),
        concat!(
            r#"{"issuer":"https://oidc.example.com","jwks_uri":"https://oidc.example.com/openid/v1/jwks","#,
            r#""authorization_endpoint":"urn:kubernetes:programmatic_authorization","#,
            r#""response_types_supported":["id_token"],"subject_types_supported":["public"],"#,
            r#""claims_supported":["sub","iss"],"id_token_signing_alg_values_supported":["ES256","RS256"]}"#
        )
    );
}

#[tokio::test]
async fn jwks_is_served_with_sorted_allow_listed_keys() {
    let f = fixture();
    let response = send(&f.app, "GET", "oidc.example.com", "/openid/v1/jwks", &[]).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(header_of(&response, "content-type"), "application/json");
    let served = String::from_utf8(body(response).await).expect("utf-8");
    assert_eq!(
        crate::support::kids(&served),
        crate::support::fixture_kids(K3S)
    );
    let expected = oidc_edge::jwks::render_jwks(ledger(K3S).jwks());
    assert_eq!(served.as_bytes(), expected.as_ref());
}

#[tokio::test]
async fn path_prefixed_issuers_answer_below_their_prefix_only() {
    let f = fixture();
    let a = send(
        &f.app,
        "GET",
        "edge.example.com",
        "/cluster-a/.well-known/openid-configuration",
        &[],
    )
    .await;
    assert_eq!(a.status(), StatusCode::OK);
    let doc: serde_json::Value = serde_json::from_slice(&body(a).await).expect("json");
    assert_eq!(doc["issuer"], "https://edge.example.com/cluster-a");
    assert_eq!(
        doc["jwks_uri"],
        "https://edge.example.com/cluster-a/openid/v1/jwks"
    );

    let jwks = send(
        &f.app,
        "GET",
        "edge.example.com",
        "/cluster-a/openid/v1/jwks",
        &[],
    )
    .await;
    assert_eq!(header_of(&jwks, "content-type"), "application/jwk-set+json");
    assert_eq!(header_of(&jwks, "cache-control"), "public, max-age=3600");

    // A trailing '/' in the issuer is kept byte for byte, and removed once for discovery (D-3).
    let b = send(
        &f.app,
        "GET",
        "edge.example.com",
        "/cluster-b/.well-known/openid-configuration",
        &[],
    )
    .await;
    let doc: serde_json::Value = serde_json::from_slice(&body(b).await).expect("json");
    assert_eq!(doc["issuer"], "https://edge.example.com/cluster-b/");
    assert_eq!(doc["jwks_uri"], "https://edge.example.com/keys/b");
    let keys = send(&f.app, "GET", "edge.example.com", "/keys/b", &[]).await;
    let served = String::from_utf8(body(keys).await).expect("utf-8");
    assert_eq!(
        crate::support::kids(&served),
        crate::support::fixture_kids(ROTATED)
    );

    for path in [
        "/.well-known/openid-configuration/",
        "/cluster-a/.well-known/openid-configuration/",
        "/cluster-a",
        "/cluster-a/",
        "/cluster-b/openid/v1/jwks",
        "/.well-known/openid-configuration/x",
        "/openid/v1/jwks/",
        "/nope",
        "/",
    ] {
        let response = send(&f.app, "GET", "edge.example.com", path, &[]).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{path}");
        assert_eq!(
            header_of(&response, "content-type"),
            "text/plain; charset=utf-8"
        );
        assert_eq!(body(response).await, b"not found\n");
    }
}

#[tokio::test]
async fn host_selects_the_issuer_and_unknown_hosts_fall_back_to_unambiguous_paths() {
    let f = fixture();
    let issuer_of = |response: Response<Body>| async move {
        let doc: serde_json::Value = serde_json::from_slice(&body(response).await).expect("json");
        doc["issuer"].as_str().expect("issuer").to_owned()
    };
    let path = "/.well-known/openid-configuration";
    let own = send(&f.app, "GET", "OIDC.Example.COM:8443", path, &[]).await;
    assert_eq!(issuer_of(own).await, "https://oidc.example.com");
    let other = send(&f.app, "GET", "other.example.org", path, &[]).await;
    assert_eq!(
        other.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "issuer 3 has no keys yet"
    );
    // Two issuers serve this path: an unknown Host must not pick one at random.
    let unknown = send(&f.app, "GET", "127.0.0.1:8080", path, &[]).await;
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    // Only one issuer serves this one, so any Host (a proxy, a test) reaches it.
    let prefixed = send(
        &f.app,
        "GET",
        "127.0.0.1:8080",
        "/cluster-a/.well-known/openid-configuration",
        &[],
    )
    .await;
    assert_eq!(
        issuer_of(prefixed).await,
        "https://edge.example.com/cluster-a"
    );
    // X-Forwarded-Host is never trusted for what is served.
    let forged = send(
        &f.app,
        "GET",
        "oidc.example.com",
        path,
        &[
            ("x-forwarded-host", "other.example.org"),
            ("x-forwarded-proto", "http"),
        ],
    )
    .await;
    assert_eq!(issuer_of(forged).await, "https://oidc.example.com");
}

#[tokio::test]
async fn if_none_match_gets_304_with_the_validators_and_no_body() {
    let f = fixture();
    for path in ["/.well-known/openid-configuration", "/openid/v1/jwks"] {
        let first = send(&f.app, "GET", "oidc.example.com", path, &[]).await;
        let etag = header_of(&first, "etag").to_owned();
        for inm in [
            etag.clone(),
            format!("W/{etag}"),
            format!("\"other\", {etag}"),
            "*".to_owned(),
        ] {
            let again = send(
                &f.app,
                "GET",
                "oidc.example.com",
                path,
                &[("if-none-match", &inm)],
            )
            .await;
            assert_eq!(again.status(), StatusCode::NOT_MODIFIED, "{path} {inm}");
            assert_eq!(header_of(&again, "etag"), etag);
            assert_eq!(header_of(&again, "cache-control"), "public, max-age=300");
            assert!(body(again).await.is_empty());
        }
        let stale = send(
            &f.app,
            "GET",
            "oidc.example.com",
            path,
            &[("if-none-match", "\"stale\"")],
        )
        .await;
        assert_eq!(stale.status(), StatusCode::OK);
        assert!(!body(stale).await.is_empty());
    }
}

#[tokio::test]
async fn a_new_snapshot_changes_the_etag() {
    let f = fixture();
    let before = send(&f.app, "GET", "oidc.example.com", "/openid/v1/jwks", &[]).await;
    let etag = header_of(&before, "etag").to_owned();
    let cfg = &f.config.issuers[0];
    f.store.publish(0, snapshot(cfg, ROTATED));
    let after = send(
        &f.app,
        "GET",
        "oidc.example.com",
        "/openid/v1/jwks",
        &[("if-none-match", &etag)],
    )
    .await;
    assert_eq!(after.status(), StatusCode::OK);
    assert_ne!(header_of(&after, "etag"), etag);
}

#[tokio::test]
async fn head_has_the_get_headers_and_no_body() {
    let f = fixture();
    let get = send(&f.app, "GET", "oidc.example.com", "/openid/v1/jwks", &[]).await;
    let head = send(&f.app, "HEAD", "oidc.example.com", "/openid/v1/jwks", &[]).await;
    assert_eq!(head.status(), StatusCode::OK);
    for name in ["content-type", "content-length", "etag", "cache-control"] {
        assert_eq!(header_of(&head, name), header_of(&get, name), "{name}");
    }
    assert!(body(head).await.is_empty());
}

#[tokio::test]
async fn other_methods_get_405_with_allow() {
    let f = fixture();
    for method in ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE"] {
        let response = send(&f.app, method, "oidc.example.com", "/openid/v1/jwks", &[]).await;
        assert_eq!(
            response.status(),
            StatusCode::METHOD_NOT_ALLOWED,
            "{method}"
        );
        assert_eq!(header_of(&response, "allow"), "GET, HEAD");
    }
    let unknown = send(&f.app, "POST", "oidc.example.com", "/nope", &[]).await;
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn before_the_first_key_set_both_documents_are_503_with_retry_after() {
    let f = fixture();
    for path in ["/.well-known/openid-configuration", "/openid/v1/jwks"] {
        let response = send(&f.app, "GET", "other.example.org", path, &[]).await;
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(header_of(&response, "retry-after"), "5");
        assert_eq!(header_of(&response, "cache-control"), "no-store");
        assert_eq!(body(response).await, b"no key set has been published yet\n");
    }
}

#[tokio::test]
async fn a_request_body_is_ignored() {
    let f = fixture();
    let request = Request::builder()
        .method("GET")
        .uri("/openid/v1/jwks")
        .header(header::HOST, "oidc.example.com")
        .body(Body::from(vec![b'x'; 1 << 20]))
        .expect("request");
    let response = f.app.clone().oneshot(request).await.expect("infallible");
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn naive_concatenation_on_a_trailing_slash_issuer_gets_the_same_discovery_document() {
    // F-1: a client that builds `<issuer>/.well-known/openid-configuration` by string
    // concatenation asks `https://oidc.example.com//.well-known/...` when the issuer ends in
    // '/'. F-1 says to serve discovery there too; only discovery, with identical bytes and
    // headers.
    let scratch = Scratch::new();
    scratch.write("jwks.json", K3S);
    let config = Config::from_toml_str(
        "[[issuers]]\nissuer = \"https://oidc.example.com/\"\n[[issuers.sources]]\n\
         kind = \"file\"\npath = \"jwks.json\"\n[http]\nlisten = \"127.0.0.1:0\"\n",
        &scratch.path("config.toml"),
    )
    .expect("valid");
    let store = Arc::new(DocumentStore::new(1));
    let cfg = &config.issuers[0];
    store.publish(0, snapshot(cfg, K3S));
    let root = router(
        Site::new(&config.endpoints(), &oidc_edge::metrics::Metrics::new()),
        store,
    );
    let f = fixture();
    // (router, host, the D-3 path, the concatenated path, the issuer the document names)
    let cases = [
        (
            &root,
            "oidc.example.com",
            "/.well-known/openid-configuration",
            "//.well-known/openid-configuration",
            "https://oidc.example.com/",
        ),
        (
            &f.app,
            "edge.example.com",
            "/cluster-b/.well-known/openid-configuration",
            "/cluster-b//.well-known/openid-configuration",
            "https://edge.example.com/cluster-b/",
        ),
    ];
    for (app, host, path, concatenated, issuer) in cases {
        for method in ["GET", "HEAD"] {
            let want = send(app, method, host, path, &[]).await;
            let got = send(app, method, host, concatenated, &[]).await;
            assert_eq!(got.status(), StatusCode::OK, "{concatenated}");
            assert_eq!(got.headers(), want.headers(), "{method} {concatenated}");
            assert_eq!(body(got).await, body(want).await, "{method} {concatenated}");
        }
        let doc = send(app, "GET", host, concatenated, &[]).await;
        let doc: serde_json::Value = serde_json::from_slice(&body(doc).await).expect("json");
        assert_eq!(doc["issuer"], issuer);
        let etag = header_of(&send(app, "GET", host, path, &[]).await, "etag").to_owned();
        let again = send(app, "GET", host, concatenated, &[("if-none-match", &etag)]).await;
        assert_eq!(again.status(), StatusCode::NOT_MODIFIED);
    }

    // Only the discovery document, and only for issuers that end in '/'.
    for (app, host, path) in [
        (&root, "oidc.example.com", "//openid/v1/jwks"),
        (&f.app, "edge.example.com", "/cluster-b//keys/b"),
        (
            &f.app,
            "oidc.example.com",
            "//.well-known/openid-configuration",
        ),
        (
            &f.app,
            "edge.example.com",
            "/cluster-a//.well-known/openid-configuration",
        ),
        (
            &root,
            "oidc.example.com",
            "///.well-known/openid-configuration",
        ),
    ] {
        let response = send(app, "GET", host, path, &[]).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{host}{path}");
        assert_eq!(body(response).await, b"not found\n");
    }

    // An issuer whose own discovery path is that double-slash path keeps it.
    let config = Config::from_toml_str(
        "[[issuers]]\nissuer = \"https://edge.example.com/a/\"\n[[issuers.sources]]\n\
         kind = \"file\"\npath = \"jwks.json\"\n[[issuers]]\nissuer = \"https://edge.example.com/a//\"\n\
         [[issuers.sources]]\nkind = \"file\"\npath = \"jwks.json\"\n[http]\nlisten = \"127.0.0.1:0\"\n",
        &scratch.path("config.toml"),
    )
    .expect("valid");
    let store = Arc::new(DocumentStore::new(2));
    for (i, cfg) in config.issuers.iter().enumerate() {
        store.publish(i, snapshot(cfg, K3S));
    }
    let app = router(
        Site::new(&config.endpoints(), &oidc_edge::metrics::Metrics::new()),
        store,
    );
    let response = send(
        &app,
        "GET",
        "edge.example.com",
        "/a//.well-known/openid-configuration",
        &[],
    )
    .await;
    let doc: serde_json::Value = serde_json::from_slice(&body(response).await).expect("json");
    assert_eq!(doc["issuer"], "https://edge.example.com/a//");
}
