//! The doctor's network side: it fetches and handshakes the way the relying parties do and
//! returns what it saw, judging nothing (that is `rules`). `aws provider` uses it too, so that
//! the thumbprint it prints is the one `check` reports.

pub mod tls;

use std::net::{SocketAddr, ToSocketAddrs as _};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::RootCertStore;

use crate::relying_party::AWS_FETCH_LIMIT;

/// An HTTP client that behaves like the relying parties: no redirects, no proxy, their limit.
pub fn relying_party_client(
    ca_pem: Option<&[u8]>,
    connect_to: Option<SocketAddr>,
    hosts: &[&str],
) -> anyhow::Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .timeout(AWS_FETCH_LIMIT)
        .user_agent(concat!("oidc-edge-check/", env!("CARGO_PKG_VERSION")));
    // The very root set the TLS probe verifies with (`tls::roots`: the given CA, else
    // webpki-roots), not reqwest's system roots: the scratch image has none, and a host's
    // extra roots would make the fetch trust a chain the probe calls untrusted (L9).
    builder = builder
        .tls_backend_preconfigured(crate::jwks::source::remote::tls_config(tls::roots(ca_pem)?));
    if let Some(addr) = connect_to {
        for host in hosts {
            builder = builder.resolve(host, addr);
        }
    }
    Ok(builder.build()?)
}

/// What one GET answered.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub status: u16,
    pub content_type: String,
    pub location: Option<String>,
    pub body: Vec<u8>,
    pub elapsed: Duration,
}

/// One GET with `client`; `Err` says why no answer came.
pub async fn fetch(client: &reqwest::Client, url: &str) -> Result<Fetched, String> {
    let started = Instant::now();
    let response = client
        .get(url)
        .send()
        .await
        .map_err(|e| crate::jwks::source::error_chain(&e))?;
    let header = |name| {
        response
            .headers()
            .get(name)
            .and_then(|v: &http::HeaderValue| v.to_str().ok())
            .map(str::to_owned)
    };
    let content_type = header(http::header::CONTENT_TYPE).unwrap_or_default();
    let location = header(http::header::LOCATION);
    let status = response.status().as_u16();
    let body = response.bytes().await.map_err(|e| e.to_string())?.to_vec();
    Ok(Fetched {
        status,
        content_type,
        location,
        body,
        elapsed: started.elapsed(),
    })
}

/// Where connections go: `--connect-to`, or the URL's own host and port.
pub fn address(url: &url::Url, connect_to: Option<SocketAddr>) -> Result<SocketAddr, String> {
    if let Some(addr) = connect_to {
        return Ok(addr);
    }
    let host = url.host_str().unwrap_or_default();
    let port = url.port_or_known_default().unwrap_or(443);
    (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("{host}: {e}"))?
        .next()
        .ok_or_else(|| format!("{host}: no address"))
}

/// The TLS facts of `host`, served at `url`'s address (or `connect_to`). `Err` says why no
/// handshake completed at all.
pub async fn tls_of(
    host: &str,
    url: &url::Url,
    connect_to: Option<SocketAddr>,
    roots: &Arc<RootCertStore>,
) -> Result<tls::TlsFacts, String> {
    let addr = address(url, connect_to)?;
    let facts = tls::probe(host, addr, Arc::clone(roots)).await;
    match &facts.unreachable {
        Some(why) => Err(why.clone()),
        None => Ok(facts),
    }
}
