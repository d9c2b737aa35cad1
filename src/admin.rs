//! The admin listener (loopback by default, never public): `/livez`, `/readyz`, `/metrics`,
//! `/status`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;

use crate::http::fetched_by::{Fetch, FetchTracker};
use crate::jwks::refresh::{IssuerPipeline, IssuerStatus};
use crate::jwks::unix_now;
use crate::listener::{Limits, PublicListener, Transport};
use crate::metrics::Metrics;
use crate::publish::{IssuerPublisher, TargetStatus};
use crate::push::gate::{PushGate, PushStatus};
use crate::selftest::{SelfTest, SelfTestStatus};
use crate::tls::{CertState, HttpsStatus};

/// The admin listener: `/livez`, `/readyz`, `/metrics`, `/status`.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// When set, an issuer whose key set no source confirmed for this long is not ready.
    pub max_staleness: Option<Duration>,
}

pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9090";

const OPENMETRICS: HeaderValue =
    HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8");

#[derive(Debug)]
pub struct Admin {
    pub pipelines: Vec<Arc<IssuerPipeline>>,
    pub metrics: Arc<Metrics>,
    pub max_staleness: Option<Duration>,
    /// The HTTPS certificate, when there is an HTTPS listener (L4).
    pub https: Option<Arc<dyn CertState>>,
    /// Bucket targets, each issuer's publisher (`[[issuers.publish]]`).
    pub publishers: Vec<Arc<IssuerPublisher>>,
    /// `[issuers.selftest]`, per issuer that has one.
    pub selftests: Vec<Arc<SelfTest>>,
    /// Push endpoints, per issuer with a push source.
    pub pushes: Vec<Arc<PushGate>>,
    /// Relying-party fetch records, by issuer index (the pipelines' order).
    pub fetches: Arc<FetchTracker>,
}

/// Open connections the admin listener holds: probes and scrapes, a few at a time.
const MAX_CONNECTIONS: usize = 64;

/// The admin listener on `listener`. L2: it gets the public listeners' deadlines and its own
/// small cap: a probe or a scrape needs a connection or two, and a container may expose it.
pub fn listener(listener: tokio::net::TcpListener, admin: Admin, limits: Limits) -> PublicListener {
    PublicListener {
        name: "admin",
        listener,
        router: router(Arc::new(admin)),
        transport: Transport::Plain,
        limits: Limits {
            max_connections: MAX_CONNECTIONS,
            ..limits
        },
    }
}

pub fn router(admin: Arc<Admin>) -> Router {
    let router = Router::new()
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .with_state(admin);
    guarded(router)
}

/// The admin router's request deadline and panic guard.
fn guarded(router: Router) -> Router {
    router
        // L5: /readyz, /status and /metrics wait on each issuer's pipeline lock, which a hung
        // state write would hold: a probe then gets a 503, not a request that never ends.
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            http::StatusCode::SERVICE_UNAVAILABLE,
            ADMIN_REQUEST_TIMEOUT,
        ))
        // A bug in a handler answers 500 and is logged, rather than dropping the connection.
        .layer(tower_http::catch_panic::CatchPanicLayer::new())
}

/// How long an admin request may take: a probe's own timeout is usually 1 s to 10 s.
pub const ADMIN_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

async fn statuses(admin: &Admin) -> Vec<IssuerStatus> {
    let mut all = Vec::with_capacity(admin.pipelines.len());
    for pipeline in &admin.pipelines {
        all.push(pipeline.status().await);
    }
    all
}

/// The readiness rule, in one place: every issuer has a published key set, and, when
/// `max_staleness` is set, a source confirmed it within that time. Returns why not.
pub fn not_ready_reasons(
    issuers: &[IssuerStatus],
    max_staleness: Option<Duration>,
    now: u64,
) -> Vec<String> {
    let mut reasons = Vec::new();
    for issuer in issuers {
        if !issuer.published {
            reasons.push(format!("{}: no key set published yet", issuer.issuer));
            continue;
        }
        let Some(max) = max_staleness else {
            continue;
        };
        match issuer.confirmed_at {
            Some(at) if now.saturating_sub(at) <= max.as_secs() => {}
            Some(at) => reasons.push(format!(
                "{}: key set last confirmed {} s ago, more than max_staleness ({} s)",
                issuer.issuer,
                now.saturating_sub(at),
                max.as_secs()
            )),
            None => reasons.push(format!(
                "{}: key set never confirmed by a source",
                issuer.issuer
            )),
        }
    }
    reasons
}

/// Every reason the server is not ready: the key sets, then HTTPS (L4), then the self-tests
/// that are part of readiness (`[issuers.selftest] readiness = true`).
fn all_reasons(admin: &Admin, issuers: &[IssuerStatus]) -> Vec<String> {
    let mut reasons = not_ready_reasons(issuers, admin.max_staleness, unix_now());
    if let Some(https) = &admin.https {
        reasons.extend(crate::tls::not_ready_reason(
            https.as_ref(),
            std::time::SystemTime::now(),
        ));
    }
    reasons.extend(admin.selftests.iter().filter_map(|t| t.not_ready_reason()));
    reasons
}

async fn readyz(State(admin): State<Arc<Admin>>) -> Response {
    let reasons = all_reasons(&admin, &statuses(&admin).await);
    if reasons.is_empty() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", reasons.join("; ")),
        )
            .into_response()
    }
}

async fn metrics(State(admin): State<Arc<Admin>>) -> Response {
    // The gauges computed at scrape time, from atomics: a scrape never waits on a refresh.
    for pipeline in &admin.pipelines {
        if let Some(at) = pipeline.confirmed_at() {
            admin.metrics.observe_jwks_age(pipeline.issuer(), at);
        }
    }
    // Also made at scrape time, from the records: the request that matched a relying party
    // only wrote its record, and a forgotten record's series goes with it.
    let fetches: Vec<(&str, Fetch)> = (admin.pipelines.iter().enumerate())
        .flat_map(|(index, pipeline)| {
            let issuer = pipeline.issuer();
            admin
                .fetches
                .fetches(index)
                .into_iter()
                .map(move |f| (issuer, f))
        })
        .collect();
    admin.metrics.set_relying_party_fetches(
        fetches
            .iter()
            .map(|(issuer, f)| (*issuer, f.document, f.family.as_str(), f.at)),
    );
    ([(CONTENT_TYPE, OPENMETRICS)], admin.metrics.render()).into_response()
}

#[derive(Serialize)]
struct StatusDoc {
    version: &'static str,
    ready: bool,
    issuers: Vec<IssuerDoc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    https: Option<HttpsStatus>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    publish: Vec<TargetStatus>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    selftest: Vec<SelfTestStatus>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    push: Vec<PushStatus>,
}

/// One issuer in `/status`: what its pipeline knows, and which relying parties fetched its
/// documents.
#[derive(Serialize)]
struct IssuerDoc {
    #[serde(flatten)]
    status: IssuerStatus,
    /// The last fetch of each document by each relying-party family, by `User-Agent` (a hint,
    /// not proof).
    fetched_by: Vec<Fetch>,
}

async fn status(State(admin): State<Arc<Admin>>) -> Response {
    let issuers = statuses(&admin).await;
    let ready = all_reasons(&admin, &issuers).is_empty();
    let doc = StatusDoc {
        version: env!("CARGO_PKG_VERSION"),
        ready,
        issuers: (issuers.into_iter().enumerate())
            .map(|(index, status)| IssuerDoc {
                status,
                fetched_by: admin.fetches.fetches(index),
            })
            .collect(),
        https: admin.https.as_deref().map(crate::tls::https_status),
        publish: admin.publishers.iter().flat_map(|p| p.statuses()).collect(),
        selftest: admin.selftests.iter().map(|t| t.status()).collect(),
        push: admin.pushes.iter().map(|g| g.status()).collect(),
    };
    let mut body = serde_json::to_vec_pretty(&doc).expect("status serialises");
    body.push(b'\n');
    (
        [(CONTENT_TYPE, HeaderValue::from_static("application/json"))],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt as _;

    async fn answer(router: Router, path: &str) -> (u16, String) {
        let request = http::Request::get(path)
            .body(axum::body::Body::empty())
            .expect("request");
        let response = router.oneshot(request).await.expect("infallible");
        let status = response.status().as_u16();
        let body = http_body_util::BodyExt::collect(response.into_body())
            .await
            .expect("body")
            .to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    async fn panics() -> &'static str {
        panic!("a bug")
    }

    /// L5: a handler stuck on a lock (a hung state write holds the pipeline's) answers 503
    /// after ADMIN_REQUEST_TIMEOUT; a panicking one answers 500.
    #[tokio::test(start_paused = true)]
    async fn stuck_or_panicking_admin_handlers_still_answer() {
        let router = guarded(
            Router::new()
                .route("/stuck", get(std::future::pending::<&str>))
                .route("/panics", get(panics)),
        );
        let started = tokio::time::Instant::now();
        assert_eq!(answer(router.clone(), "/stuck").await.0, 503);
        assert_eq!(started.elapsed(), ADMIN_REQUEST_TIMEOUT);
        assert_eq!(answer(router, "/panics").await.0, 500);
    }

    fn issuer(published: bool, confirmed_at: Option<u64>) -> IssuerStatus {
        IssuerStatus {
            issuer: "https://oidc.example.com".into(),
            discovery_url: String::new(),
            jwks_uri: String::new(),
            published,
            cache_max_age_seconds: 300,
            key_retention_seconds: 86_400,
            kids: Vec::new(),
            confirmed_at,
            sources: Vec::new(),
            keys: Vec::new(),
        }
    }

    #[test]
    fn ready_when_every_issuer_is_published() {
        assert!(not_ready_reasons(&[issuer(true, None)], None, 100).is_empty());
        assert_eq!(
            not_ready_reasons(&[issuer(true, None), issuer(false, None)], None, 100),
            ["https://oidc.example.com: no key set published yet"]
        );
    }

    #[test]
    fn max_staleness_turns_an_old_confirmation_into_not_ready() {
        let max = Some(Duration::from_secs(60));
        assert!(not_ready_reasons(&[issuer(true, Some(40))], max, 100).is_empty());
        assert_eq!(
            not_ready_reasons(&[issuer(true, Some(39))], max, 100),
            [
                "https://oidc.example.com: key set last confirmed 61 s ago, more than max_staleness (60 s)"
            ]
        );
        assert_eq!(
            not_ready_reasons(&[issuer(true, None)], max, 100),
            ["https://oidc.example.com: key set never confirmed by a source"]
        );
    }
}
