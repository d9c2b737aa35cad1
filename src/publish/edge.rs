//! The agent side of a push (issue 18): `[[issuers.push]]` sends the keys the cluster lists
//! to a public oidc-edge, authenticated by a service-account token of the cluster itself
//! (the edge checks it against the keys it already publishes; see `push::gate`).
//!
//! What is pushed is `Snapshot::listed`, the keys some source lists now, never the keys this
//! agent keeps for rotation grace: the edge keeps its own grace, and a retired key must stop
//! being one the edge trusts. It is pushed after every change and every `interval` (so that
//! the edge's `confirmed_at` says when the cluster last spoke).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use aws_lc_rs::digest;
use http::StatusCode;

use super::bucket::Synced;
use super::connector::PublicRoots;
use crate::jwks::render_jwks;
use crate::jwks::source::remote::tls_config;
use crate::jwks::source::{AnySource, SourceConfig};
use crate::jwks::store::Snapshot;

/// `[[issuers.push]]`.
#[derive(Debug, Clone)]
pub struct EdgeTarget {
    /// `https://<edge>/<issuer path>/.oidc-edge/v1/jwks`.
    pub url: url::Url,
    /// Where the service-account token of each push comes from.
    pub token: PushToken,
    /// A CA to trust beside Mozilla's roots (a private CA, a test).
    pub ca_file: Option<PathBuf>,
    /// Connect here instead of resolving the edge's host.
    pub connect_to: Option<SocketAddr>,
    /// Pushed at least this often, changed or not.
    pub interval: Duration,
    /// One push, connection included.
    pub timeout: Duration,
}

/// The token a push carries.
#[derive(Debug, Clone)]
pub enum PushToken {
    /// A projected token (audience = `url`), re-read for every push because the kubelet
    /// replaces it. The edge binds a token to one key set, so a change waits for the kubelet's
    /// next token (80 % of its lifetime).
    File(PathBuf),
    /// A token minted through TokenRequest for every push (audience = `url`, 600 s), with the
    /// credentials of the issuer's apiserver `source`: a change goes out at once.
    Request {
        /// Boxed: a source's settings are large beside a path.
        source: Box<SourceConfig>,
        namespace: String,
        service_account: String,
    },
}

/// A minted push token's lifetime: TokenRequest's minimum.
const MINTED_TOKEN_SECONDS: u64 = 600;

/// Where [`Edge`] gets its tokens.
#[derive(Debug)]
enum Tokens {
    File(PathBuf),
    Request {
        /// Its own client of the apiserver (the refresh task keeps the other).
        source: tokio::sync::Mutex<AnySource>,
        namespace: String,
        service_account: String,
    },
}

/// How often an unchanged set is pushed again, unless configured.
pub const DEFAULT_PUSH_INTERVAL: Duration = Duration::from_secs(60);

/// One edge to push to.
#[derive(Debug)]
pub struct Edge {
    target: EdgeTarget,
    tokens: Tokens,
    client: reqwest::Client,
    /// The SHA-256 of the last body the edge accepted: an accepted push of the same body is
    /// reported as unchanged.
    accepted: Mutex<Option<[u8; 32]>>,
}

impl Edge {
    /// The token for the next push.
    async fn token(&self) -> anyhow::Result<String> {
        let url = &self.target.url;
        match &self.tokens {
            Tokens::File(path) => {
                let token = std::fs::read_to_string(path).with_context(|| {
                    format!("PUT {url}: cannot read the token file {}", path.display())
                })?;
                if token.trim().is_empty() {
                    anyhow::bail!("PUT {url}: the token file {} is empty", path.display());
                }
                Ok(token)
            }
            Tokens::Request {
                source,
                namespace,
                service_account,
            } => source
                .lock()
                .await
                .token_request(
                    namespace,
                    service_account,
                    url.as_str(),
                    MINTED_TOKEN_SECONDS,
                )
                .await
                .map_err(|e| anyhow::anyhow!("PUT {url}: TokenRequest: {e}")),
        }
    }

    pub fn open(target: &EdgeTarget) -> anyhow::Result<Self> {
        let extra = target
            .ca_file
            .as_ref()
            .map(|path| {
                std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
            })
            .transpose()?;
        let roots = PublicRoots::new(extra.as_deref(), target.timeout, target.timeout)
            .map_err(|e| anyhow::anyhow!("{}: ca_file: {e}", target.url))?;
        // HTTPS_PROXY and NO_PROXY are honoured on this client only: a pod that must leave
        // the cluster through a proxy pushes through it; the apiserver is never proxied.
        let mut builder = reqwest::Client::builder()
            .user_agent(concat!("oidc-edge/", env!("CARGO_PKG_VERSION")))
            .tls_backend_preconfigured(tls_config(Arc::clone(roots.roots())))
            .timeout(target.timeout)
            .redirect(reqwest::redirect::Policy::none());
        if let (Some(addr), Some(host)) = (target.connect_to, target.url.host_str()) {
            builder = builder.resolve(host, addr);
        }
        let client = builder
            .build()
            .with_context(|| format!("{}: HTTP client", target.url))?;
        let tokens = match &target.token {
            PushToken::File(path) => Tokens::File(path.clone()),
            PushToken::Request {
                source,
                namespace,
                service_account,
            } => Tokens::Request {
                source: tokio::sync::Mutex::new(AnySource::from_config(
                    &source.kind,
                    source.timeout,
                )?),
                namespace: namespace.clone(),
                service_account: service_account.clone(),
            },
        };
        Ok(Self {
            target: target.clone(),
            tokens,
            client,
            accepted: Mutex::new(None),
        })
    }

    /// PUTs the keys `snapshot` lists; `written` names the URL when the edge took a set it
    /// had not taken from us before.
    pub async fn push(&self, snapshot: &Snapshot) -> anyhow::Result<Synced> {
        let url = &self.target.url;
        let token = self.token().await?;
        let token = token.trim();
        let body = render_jwks(&snapshot.listed);
        let hash: [u8; 32] = digest::digest(&digest::SHA256, &body)
            .as_ref()
            .try_into()
            .expect("SHA-256 is 32 bytes");
        let response = self
            .client
            .put(url.clone())
            .bearer_auth(token)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "PUT {url}: {}",
                    crate::display::error_chain(&e.without_url())
                )
            })?;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        let said = text.lines().next().unwrap_or("").trim();
        if status != StatusCode::OK {
            anyhow::bail!("PUT {url}: the edge answered {status}: {said}");
        }
        let mut accepted = self.accepted.lock().expect("accepted lock");
        let changed = accepted.replace(hash) != Some(hash);
        let (written, unchanged) = if changed {
            (vec![url.to_string()], Vec::new())
        } else {
            (Vec::new(), vec![url.to_string()])
        };
        Ok(Synced {
            written,
            unchanged,
            public_differences: Vec::new(),
        })
    }
}
