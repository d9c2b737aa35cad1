//! A fake kube-apiserver for fault injection (what it imitates, from which real behaviour, and
//! which tests still use it: `FAKE_APISERVER.md` beside this file). It speaks the real one's
//! formats and failure modes over real TLS with its own CA generated at test time (k3s style:
//! an EC P-256 `k3s-server-ca@…` CA, a serving certificate for `kubernetes.default.svc`,
//! `localhost` and `127.0.0.1`).
//!
//! - `GET /openid/v1/jwks` → `application/jwk-set+json`; `406` when `Accept` does not admit it
//!   (the real apiserver refuses `Accept: application/json` alone); `Cache-Control` and the
//!   `Status` bodies of 401 and 406 as kube-apiserver 1.20 sends them;
//! - `GET /.well-known/openid-configuration` → `application/json` with a settable `issuer`;
//! - `401` with a `Status` object unless a known bearer token or a client certificate signed by
//!   the CA is presented;
//! - [`Mode`] makes it fail: a status, a hang, a slow drip, any body, a redirect; [`stop`]
//!   closes the port (connection refused) and [`restart`] opens it again.
//!
//! [`stop`]: FakeApiserver::stop
//! [`restart`]: FakeApiserver::restart

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use super::Scratch;
use super::config::Source;
use super::pki::{Leaf, Pki};

/// How the fake answers the next requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    Normal,
    /// Every request gets this status.
    Status(u16),
    /// Requests are read and never answered.
    Hang,
    /// The JWKS arrives one byte every 100 ms.
    Drip,
    /// The JWKS route answers 200 `application/jwk-set+json` with this body.
    Body(String),
    /// Every request is redirected there.
    Redirect(String),
    /// The JWKS route answers 200 with these bytes and extra headers.
    Raw(Vec<u8>, Vec<(String, String)>),
}

#[derive(Debug)]
pub struct FakeState {
    pub jwks: String,
    pub issuer: String,
    pub mode: Mode,
    /// Bearer tokens that authenticate.
    pub tokens: Vec<String>,
    /// Whether requests without credentials are let in (`system:unauthenticated` bound, K-7).
    pub anonymous: bool,
    /// The `Authorization` header of every JWKS request, in order.
    pub jwks_auth: Vec<Option<String>>,
    /// Client certificates (DER) that no longer authenticate, as an expired one would not.
    pub refused_client_certs: Vec<Vec<u8>>,
    /// The client certificate (DER) of every JWKS request, in order.
    pub jwks_client_certs: Vec<Option<Vec<u8>>>,
}

pub struct FakeApiserver {
    pub addr: SocketAddr,
    pub pki: Pki,
    pub state: Arc<Mutex<FakeState>>,
    acceptor: TlsAcceptor,
    task: Option<JoinHandle<()>>,
}

/// The k3s default issuer (K3-1): what a cluster claims before `--service-account-issuer` is set.
pub const K3S_DEFAULT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

impl FakeApiserver {
    /// Serves `jwks` on 127.0.0.1:0, accepting `token` and client certificates of its CA.
    pub async fn start(jwks: &str, issuer: &str, token: &str) -> Self {
        crate::support::install_crypto_provider();
        let pki = Pki::new("k3s-server-ca@1700000000");
        let acceptor = tls_acceptor(&pki, &pki.server());
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let state = Arc::new(Mutex::new(FakeState {
            jwks: jwks.to_owned(),
            issuer: issuer.to_owned(),
            mode: Mode::Normal,
            tokens: vec![token.to_owned()],
            anonymous: false,
            jwks_auth: Vec::new(),
            refused_client_certs: Vec::new(),
            jwks_client_certs: Vec::new(),
        }));
        let mut fake = Self {
            addr: listener.local_addr().expect("addr"),
            pki,
            state,
            acceptor,
            task: None,
        };
        fake.serve(listener);
        fake
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// This fake as an `apiserver` source of a config in `scratch`: its CA written to
    /// `ca.pem`, `token_contents` to `token`.
    pub fn source_in(&self, scratch: &Scratch, token_contents: &str) -> Source {
        scratch.write("ca.pem", &self.pki.ca_pem);
        scratch.write("token", token_contents);
        Source::new("apiserver")
            .set("url", self.url())
            .set("ca_file", "ca.pem")
            .set("token_file", "token")
    }

    pub fn set(&self, change: impl FnOnce(&mut FakeState)) {
        change(&mut self.state.lock().expect("fake state"));
    }

    pub fn jwks_requests(&self) -> usize {
        self.state.lock().expect("fake state").jwks_auth.len()
    }

    /// Serves `leaf` from now on, on the same port (e.g. a certificate for another name).
    pub async fn serve_certificate(&mut self, leaf: &Leaf) {
        self.acceptor = tls_acceptor(&self.pki, leaf);
        self.restart().await;
    }

    /// Closes the port: new connections are refused.
    pub fn stop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }

    /// Opens the same port again.
    pub async fn restart(&mut self) {
        self.stop();
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(listener) => break listener,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        self.serve(listener);
    }

    fn serve(&mut self, listener: TcpListener) {
        let acceptor = self.acceptor.clone();
        let state = Arc::clone(&self.state);
        self.task = Some(tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                let state = Arc::clone(&state);
                // Dropping the set when this task is aborted closes every open connection too.
                connections.spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let client_cert = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .map(|c| c.as_ref().to_vec());
                    let service = hyper::service::service_fn(move |req| {
                        let state = Arc::clone(&state);
                        let client_cert = client_cert.clone();
                        async move { Ok::<_, Infallible>(answer(&state, client_cert, req).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
                });
            }
        }));
    }
}

impl Drop for FakeApiserver {
    fn drop(&mut self) {
        self.stop();
    }
}

type Body = BoxBody<Bytes, Infallible>;

/// A response with the apiserver's `Cache-Control`: `public, max-age=3600` on the discovery
/// routes' 200s (`pkg/routes/openidmetadata.go`), `no-cache, private` on everything else.
fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let cache_control = if status == StatusCode::OK {
        "public, max-age=3600"
    } else {
        "no-cache, private"
    };
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .header("cache-control", cache_control)
        .body(Full::new(body.into()).boxed())
        .expect("response")
}

/// The apiserver's `Status` object for an error, with its `message` (e.g. `Unauthorized`,
/// `406: Not Acceptable`) and `reason` (`Unauthorized`, `NotAcceptable`).
fn status_object(code: StatusCode, message: &str, reason: &str) -> Response<Body> {
    let body = format!(
        r#"{{"kind":"Status","apiVersion":"v1","metadata":{{}},"status":"Failure","message":"{message}","reason":"{reason}","code":{}}}"#,
        code.as_u16()
    );
    full(code, "application/json", body)
}

async fn answer(
    state: &Mutex<FakeState>,
    client_cert: Option<Vec<u8>>,
    req: Request<Incoming>,
) -> Response<Body> {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let (auth, accept) = (header("authorization"), header("accept"));
    let path = req.uri().path().to_owned();
    let (mode, authenticated, jwks, issuer) = {
        let mut s = state.lock().expect("fake state");
        if path == "/openid/v1/jwks" {
            s.jwks_auth.push(auth.clone());
            s.jwks_client_certs.push(client_cert.clone());
        }
        let cert_ok = client_cert
            .as_ref()
            .is_some_and(|der| !s.refused_client_certs.contains(der));
        let token_ok = auth
            .as_deref()
            .and_then(|a| a.strip_prefix("Bearer "))
            .is_some_and(|t| s.tokens.iter().any(|known| known == t));
        let authenticated = cert_ok || token_ok || (s.anonymous && auth.is_none());
        (
            s.mode.clone(),
            authenticated,
            s.jwks.clone(),
            s.issuer.clone(),
        )
    };
    match &mode {
        Mode::Status(code) => {
            let code = StatusCode::from_u16(*code).expect("status");
            let reason = code.canonical_reason().unwrap_or("Error");
            return status_object(code, reason, reason);
        }
        Mode::Hang => std::future::pending::<()>().await,
        Mode::Redirect(to) => {
            return Response::builder()
                .status(StatusCode::FOUND)
                .header("location", to)
                .body(Full::new(Bytes::new()).boxed())
                .expect("response");
        }
        _ => {}
    }
    if !authenticated {
        return status_object(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized");
    }
    match path.as_str() {
        "/openid/v1/jwks" => {
            let acceptable = accept
                .as_deref()
                .is_none_or(|a| a.contains("application/jwk-set+json") || a.contains("*/*"));
            if !acceptable {
                return status_object(
                    StatusCode::NOT_ACCEPTABLE,
                    "406: Not Acceptable",
                    "NotAcceptable",
                );
            }
            match mode {
                Mode::Body(body) => full(StatusCode::OK, "application/jwk-set+json", body),
                Mode::Raw(bytes, headers) => {
                    let mut response = full(StatusCode::OK, "application/jwk-set+json", bytes);
                    for (name, value) in headers {
                        response.headers_mut().insert(
                            http::HeaderName::from_bytes(name.as_bytes()).expect("header name"),
                            http::HeaderValue::from_str(&value).expect("header value"),
                        );
                    }
                    response
                }
                Mode::Drip => {
                    let bytes = Bytes::from(jwks);
                    let stream = futures_util::stream::unfold(0, move |i| {
                        let bytes = bytes.clone();
                        async move {
                            if i >= bytes.len() {
                                return None;
                            }
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            Some((
                                Ok::<_, Infallible>(Frame::data(bytes.slice(i..i + 1))),
                                i + 1,
                            ))
                        }
                    });
                    Response::builder()
                        .header("content-type", "application/jwk-set+json")
                        .body(StreamBody::new(stream).boxed())
                        .expect("response")
                }
                _ => full(StatusCode::OK, "application/jwk-set+json", jwks),
            }
        }
        "/.well-known/openid-configuration" => {
            let doc = format!(
                r#"{{"issuer":"{issuer}","jwks_uri":"https://10.43.0.1:443/openid/v1/jwks","response_types_supported":["id_token"],"subject_types_supported":["public"],"id_token_signing_alg_values_supported":["ES256","RS256"]}}"#
            );
            full(StatusCode::OK, "application/json", doc)
        }
        _ => status_object(StatusCode::NOT_FOUND, "NotFound", "NotFound"),
    }
}

/// Serves `leaf`; accepts client certificates signed by `pki`'s CA, or none.
fn tls_acceptor(pki: &Pki, leaf: &Leaf) -> TlsAcceptor {
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(pki.ca_pem.as_bytes()).expect("CA der"))
        .expect("root");
    let verifier = WebPkiClientVerifier::builder(Arc::new(roots))
        .allow_unauthenticated()
        .build()
        .expect("client verifier");
    let chain = CertificateDer::pem_slice_iter(leaf.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .expect("chain");
    let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).expect("key");
    let mut tls = rustls::ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .expect("server config");
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    TlsAcceptor::from(Arc::new(tls))
}
