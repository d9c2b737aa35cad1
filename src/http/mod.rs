//! The public HTTP surface (DESIGN §3): for each issuer, its discovery document and its JWKS,
//! routed by host and then by path, and nothing else.
//!
//! [`router`] is the test seam: it needs no socket.

pub mod fetched_by;
pub mod handlers;
pub mod headers;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use http::StatusCode;
use prometheus_client::metrics::counter::Counter;

use crate::issuer::endpoint::IssuerEndpoint;
use crate::jwks::store::DocumentStore;
use crate::metrics::Metrics;
use crate::push::gate::PushGate;
use crate::tls::TlsSource;
use fetched_by::FetchTracker;

/// `[http]`: the plain listener.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    /// 301 every request to https, except ACME HTTP-01 challenges.
    pub redirect_to_https: bool,
}

/// `[https]`: the TLS listener.
#[derive(Debug, Clone)]
pub struct HttpsConfig {
    pub listen: SocketAddr,
    pub tls: TlsSource,
    /// `Strict-Transport-Security` on HTTPS answers (default on).
    pub hsts: bool,
}

/// Which document a path names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Doc {
    Discovery,
    Jwks,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub issuer: usize,
    pub doc: Doc,
}

/// The routing table, built once from the configuration.
#[derive(Debug)]
pub struct Site {
    by_path: HashMap<Box<str>, PathRoutes>,
    /// Per issuer, its request counters by `DOCUMENT_CODES`: `[discovery, jwks]`.
    counters: Vec<[[Counter; 4]; 2]>,
    not_found: Counter,
    access_log: bool,
    /// The push endpoints this listener offers (issue 18); empty on most.
    pushes: Vec<PushRoute>,
    /// Every issuer's host, lowercase.
    hosts: Vec<Box<str>>,
    /// Relying-party fetch records (`[relying_parties]`); `None` in tests that need none.
    fetches: Option<Arc<FetchTracker>>,
}

/// Where one issuer takes pushes.
#[derive(Debug, Clone)]
pub struct PushRoute {
    /// Lowercase host, as documents are routed.
    pub host: Box<str>,
    pub path: Box<str>,
    pub gate: Arc<PushGate>,
}

/// The status codes a document route answers, each with its counter.
const DOCUMENT_CODES: [StatusCode; 4] = [
    StatusCode::OK,
    StatusCode::NOT_MODIFIED,
    StatusCode::METHOD_NOT_ALLOWED,
    StatusCode::SERVICE_UNAVAILABLE,
];

#[derive(Debug, Default)]
struct PathRoutes {
    /// Lowercase host → route.
    hosts: Vec<(Box<str>, Route)>,
}

impl Site {
    pub fn new(issuers: &[IssuerEndpoint], metrics: &Metrics) -> Self {
        let mut by_path: HashMap<Box<str>, PathRoutes> = HashMap::new();
        for (issuer, cfg) in issuers.iter().enumerate() {
            for (path, doc) in [
                (&cfg.discovery_path, Doc::Discovery),
                (&cfg.jwks_path, Doc::Jwks),
            ] {
                by_path
                    .entry(path.as_str().into())
                    .or_default()
                    .hosts
                    .push((cfg.issuer.host().into(), Route { issuer, doc }));
            }
        }
        // F-1: discovery also where naive concatenation lands for an issuer ending in '/'.
        // Same route, so the same bytes and headers. A configured path of another issuer on
        // the same host (`https://h/a//` against `https://h/a/`) keeps its own document.
        for (issuer, cfg) in issuers.iter().enumerate() {
            let Some(path) = cfg.issuer.concatenated_discovery_path() else {
                continue;
            };
            let host = cfg.issuer.host();
            let routes = by_path.entry(path.into()).or_default();
            if !routes.hosts.iter().any(|(h, _)| &**h == host) {
                routes.hosts.push((
                    host.into(),
                    Route {
                        issuer,
                        doc: Doc::Discovery,
                    },
                ));
            }
        }
        let counters = issuers
            .iter()
            .map(|cfg| {
                ["discovery", "jwks"].map(|document| {
                    DOCUMENT_CODES.map(|code| {
                        metrics.request_counter(cfg.issuer.as_str(), document, code.as_u16())
                    })
                })
            })
            .collect();
        Self {
            by_path,
            counters,
            not_found: metrics.request_counter("", "none", 404),
            access_log: false,
            pushes: Vec::new(),
            hosts: issuers.iter().map(|cfg| cfg.issuer.host().into()).collect(),
            fetches: None,
        }
    }

    /// Offers these push endpoints on this listener.
    pub fn with_pushes(mut self, pushes: Vec<PushRoute>) -> Self {
        self.pushes = pushes;
        self
    }

    /// Whether `path` is a push path this listener may answer: a suffix test only, so that
    /// document requests pay nothing for pushes.
    pub fn is_push_path(&self, path: &str) -> bool {
        path.ends_with(crate::issuer::PUSH_SUFFIX)
    }

    /// The gate of the issuer that takes pushes at `host` and `path`, routed like documents.
    pub fn push_gate(&self, host: Option<&str>, path: &str) -> Option<&Arc<PushGate>> {
        let mut at_path = self.pushes.iter().filter(|p| &*p.path == path);
        if let Some(host) = host {
            if let Some(route) = at_path.clone().find(|p| p.host.eq_ignore_ascii_case(host)) {
                return Some(&route.gate);
            }
            // Another issuer's own host: never someone else's push endpoint.
            if self.hosts.iter().any(|h| h.eq_ignore_ascii_case(host)) {
                return None;
            }
        }
        match (at_path.next(), at_path.next()) {
            (Some(only), None) => Some(&only.gate),
            _ => None,
        }
    }

    /// Records the fetches of relying parties recognised by their `User-Agent` in `fetches`.
    pub fn with_fetch_tracker(mut self, fetches: Arc<FetchTracker>) -> Self {
        self.fetches = Some(fetches);
        self
    }

    /// A GET of `route` answered `status` (200 or 304) with `etag`, from a client whose
    /// `User-Agent` is `user_agent`: recorded when it names a relying party. For any other
    /// client this is one substring search per pattern, with no allocation and no lock.
    pub fn observe_fetch(
        &self,
        route: Route,
        user_agent: &[u8],
        status: StatusCode,
        etag: &http::HeaderValue,
        kids: &Arc<[String]>,
    ) {
        if let Some(fetches) = &self.fetches
            && let Some(family) = fetches.family(user_agent)
        {
            fetches.record(route.issuer, route.doc, family, status.as_u16(), etag, kids);
        }
    }

    /// Logs one line per request (`[log] access = true`).
    pub fn with_access_log(mut self, enabled: bool) -> Self {
        self.access_log = enabled;
        self
    }

    pub fn access_log(&self) -> bool {
        self.access_log
    }

    /// Counts one answer: an atomic increment on a counter made at start.
    pub fn count(&self, route: Option<Route>, status: StatusCode) {
        let Some(route) = route else {
            self.not_found.inc();
            return;
        };
        let document = match route.doc {
            Doc::Discovery => 0,
            Doc::Jwks => 1,
        };
        if let Some(code) = DOCUMENT_CODES.iter().position(|c| *c == status) {
            self.counters[route.issuer][document][code].inc();
        }
    }

    /// The document for `host` (port stripped) and `path`. When no issuer has that host (a
    /// reverse proxy that rewrites Host, a local test), a path that only one issuer serves still
    /// answers: what is served never depends on the Host header, only on the configuration.
    pub fn route(&self, host: Option<&str>, path: &str) -> Option<Route> {
        let routes = self.by_path.get(path)?;
        if let Some(host) = host
            && let Some((_, route)) = routes
                .hosts
                .iter()
                .find(|(h, _)| h.eq_ignore_ascii_case(host))
        {
            return Some(*route);
        }
        match routes.hosts.as_slice() {
            [(_, only)] => Some(*only),
            _ => None,
        }
    }
}

/// Shared state of the public handlers.
#[derive(Debug)]
pub struct App {
    pub site: Site,
    pub store: Arc<DocumentStore>,
}

/// The public router: every request goes to one handler that looks up the route table.
pub fn router(site: Site, store: Arc<DocumentStore>) -> Router {
    Router::new()
        .fallback(handlers::serve_document)
        .with_state(Arc::new(App { site, store }))
}

/// The plain listener with `redirect_to_https`: every request for a configured issuer host is
/// answered `301` to the same path on https; other hosts get 404, so the redirect never points
/// anywhere the configuration does not name.
pub fn redirect_router(issuers: &[IssuerEndpoint], https_port: Option<u16>) -> Router {
    let hosts: Arc<Vec<String>> =
        Arc::new(issuers.iter().map(|i| i.issuer.host().to_owned()).collect());
    let port = https_port.filter(|p| *p != 443);
    Router::new().fallback(move |uri: http::Uri, headers: http::HeaderMap| {
        let hosts = Arc::clone(&hosts);
        async move { handlers::redirect(&hosts, port, &uri, &headers) }
    })
}

/// Adds the ACME HTTP-01 challenge route (`/.well-known/acme-challenge/{token}`) in front of
/// `router`: the one path of the plain listener that is never redirected.
pub fn with_http01(router: Router, resolver: Arc<crate::tls::acme::AcmeResolver>) -> Router {
    router.route(
        "/.well-known/acme-challenge/{token}",
        axum::routing::get(
            move |axum::extract::Path(token): axum::extract::Path<String>| {
                let resolver = Arc::clone(&resolver);
                async move { handlers::http01(&resolver, &token) }
            },
        ),
    )
}
