//! Clients, built once: every reqwest client starts from [`builder`], every raw TLS
//! connection from [`tls_config`]. Also the assertions that go through them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::{HTTPS_DOMAIN, K3S, fixture_kids, kids};

/// The one reqwest builder: redirects off, as relying parties fetch (a redirect is an answer
/// to assert on, never something to follow); no proxy, as the tests talk to loopback only;
/// and 5 s per request, so that a hung server fails a test instead of hanging it.
pub fn builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .timeout(Duration::from_secs(5))
}

/// A plain HTTP client.
pub fn client() -> reqwest::Client {
    builder().build().expect("client")
}

/// A client trusting only the CAs in `ca_pem`.
pub fn trusting(ca_pem: &str) -> reqwest::ClientBuilder {
    builder().tls_certs_only(reqwest::Certificate::from_pem_bundle(ca_pem.as_bytes()).expect("ca"))
}

/// A plain-HTTP client for `http://oidc.example.com` served at `addr`.
pub fn plain_client(addr: SocketAddr) -> reqwest::Client {
    builder()
        .resolve(HTTPS_DOMAIN, addr)
        .build()
        .expect("client")
}

/// A client for `https://oidc.example.com` served at `addr`, trusting only `ca_pem`, that
/// keeps the peer certificate of each response.
pub fn https_client(ca_pem: &str, addr: SocketAddr) -> reqwest::ClientBuilder {
    trusting(ca_pem).resolve(HTTPS_DOMAIN, addr).tls_info(true)
}

pub fn https_url(addr: SocketAddr, path: &str) -> String {
    format!("https://{HTTPS_DOMAIN}:{}{path}", addr.port())
}

/// A rustls client config trusting only the first certificate of `ca_pem`, offering `alpn`:
/// for connections a test drives byte by byte.
pub fn tls_config(ca_pem: &str, alpn: &[u8]) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject as _;
    super::install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from_pem_slice(ca_pem.as_bytes()).expect("CA"))
        .expect("root");
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    Arc::new(config)
}

/// GET `url` and return status and body.
pub async fn get(url: &str) -> (u16, String) {
    let response = client().get(url).send().await.expect("request");
    let status = response.status().as_u16();
    (status, response.text().await.expect("body"))
}

/// The DER of the certificate served now.
pub async fn served_cert(ca_pem: &str, addr: SocketAddr) -> Result<Vec<u8>, String> {
    let http = https_client(ca_pem, addr).build().expect("client");
    let response = http
        .get(https_url(addr, "/openid/v1/jwks"))
        .send()
        .await
        .map_err(|e| format!("{e:?}"))?;
    if response.status() != 200 {
        return Err(format!("status {}", response.status()));
    }
    let info = response
        .extensions()
        .get::<reqwest::tls::TlsInfo>()
        .expect("tls info");
    Ok(info.peer_certificate().expect("peer certificate").to_vec())
}

/// Both documents (the `K3S` set) over TLS 1.2 and 1.3, each with HTTP/1.1 and HTTP/2, as
/// `application/json` with HSTS.
pub async fn assert_serves_both_documents_everywhere(ca_pem: &str, addr: SocketAddr) {
    for tls in [
        reqwest::tls::Version::TLS_1_2,
        reqwest::tls::Version::TLS_1_3,
    ] {
        for http1 in [true, false] {
            let mut builder = https_client(ca_pem, addr)
                .tls_version_min(tls)
                .tls_version_max(tls);
            if http1 {
                builder = builder.http1_only();
            }
            let http = builder.build().expect("client");
            let version = if http1 {
                reqwest::Version::HTTP_11
            } else {
                reqwest::Version::HTTP_2
            };
            for path in ["/.well-known/openid-configuration", "/openid/v1/jwks"] {
                let response = http
                    .get(https_url(addr, path))
                    .send()
                    .await
                    .expect("GET over https");
                assert_eq!(
                    (response.status().as_u16(), response.version()),
                    (200, version),
                    "{tls:?} {path}"
                );
                assert_eq!(response.headers()["content-type"], "application/json");
                assert_eq!(
                    response.headers()["strict-transport-security"],
                    "max-age=31536000"
                );
                let body = response.text().await.expect("body");
                if path.ends_with("jwks") {
                    assert_eq!(kids(&body), fixture_kids(K3S));
                }
            }
        }
    }
}

/// Before the first good key set: 503 with Retry-After, never an empty set.
pub async fn assert_not_published_yet(url: &str) {
    let response = client().get(url).send().await.expect("GET");
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "5");
}
