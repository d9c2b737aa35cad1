//! Where key sets come from. Each source yields raw bytes; validation happens once, downstream.
//!
//! [`KeySource`] is the seam the refresher drives; [`AnySource`] is every real kind:
//! [`mod@file`], and [`remote`] for apiservers ([`apiserver`], [`kubeconfig`]) and plain URLs.

pub mod apiserver;
pub mod file;
pub mod kubeconfig;
pub mod push;
pub mod remote;

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;

use self::apiserver::ApiserverSource;
pub use self::file::FileSource;
use self::push::{PushInbox, PushPolicy};
use self::remote::RemoteSource;
pub use crate::display::error_chain;
use crate::display::redacted_url;

/// No JWK set of a real cluster comes near this; a bigger answer is refused unread (DESIGN §4).
pub const MAX_BODY_BYTES: u64 = 1024 * 1024;

/// All of `file` (at `path`), refused unread beyond [`MAX_BODY_BYTES`].
fn read_capped(file: &mut std::fs::File, path: &std::path::Path) -> Result<Bytes, FetchError> {
    use std::io::Read as _;
    let mut body = Vec::new();
    file.take(MAX_BODY_BYTES + 1)
        .read_to_end(&mut body)
        .map_err(|source| FetchError::File {
            path: path.to_owned(),
            source,
        })?;
    if body.len() as u64 > MAX_BODY_BYTES {
        return Err(FetchError::TooLarge {
            what: path.display().to_string(),
        });
    }
    Ok(Bytes::from(body))
}

/// What one fetch produced.
#[derive(Debug)]
pub enum Fetched {
    /// A new body to validate, and the `issuer` the upstream's own discovery document claims
    /// (apiservers only).
    Body {
        body: Bytes,
        upstream_issuer: Option<String>,
    },
    /// The source is unchanged since the last fetch: keep its last result.
    Unchanged,
    /// Nothing to report: a source that is told rather than asked (a push source between
    /// pushes). Neither a confirmation nor a failure; the source keeps what it listed.
    Idle,
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{path}: {source}")]
    File { path: PathBuf, source: io::Error },
    #[error("{what} is larger than {MAX_BODY_BYTES} bytes")]
    TooLarge { what: String },
    #[error("token file {path} is empty")]
    EmptyToken { path: PathBuf },
    #[error("GET {url}: {}", error_chain(source))]
    Http { url: String, source: reqwest::Error },
    #[error(
        "GET {url}: answered {status} with Location {location:?}; redirects are never followed"
    )]
    Redirect {
        url: String,
        status: http::StatusCode,
        location: String,
    },
    /// The credentials or CA changed on disk and could not be loaded (L1); retried at the
    /// next fetch.
    #[error("{0}")]
    Setup(#[from] remote::SetupError),
    #[error("GET {url}: answered {status}{hint}")]
    Status {
        url: String,
        status: http::StatusCode,
        hint: &'static str,
    },
}

/// Every kind of source, for the refresher (static dispatch, no boxing).
#[derive(Debug)]
pub enum AnySource {
    File(FileSource),
    /// Boxed: a remote source carries its client and what it was built from (L1).
    Remote(Box<RemoteSource>),
    Push(PushInbox),
}

impl AnySource {
    /// The fetcher of one configured source. A push source's fetcher is its issuer's trust
    /// inbox, next to the issuer's state: [`AnySource::for_issuer`].
    pub fn from_config(kind: &SourceKind, timeout: Duration) -> anyhow::Result<Self> {
        Ok(match kind {
            SourceKind::File { path } => AnySource::File(FileSource::new(path.clone())),
            SourceKind::Apiserver(api) => {
                AnySource::Remote(Box::new(RemoteSource::apiserver(api, timeout)?))
            }
            SourceKind::Url { url, ca_file } => {
                AnySource::Remote(Box::new(RemoteSource::url(url, ca_file.as_ref(), timeout)?))
            }
            SourceKind::Push(_) => {
                anyhow::bail!("a push source has no fetcher of its own outside its issuer")
            }
        })
    }

    /// The fetcher of one configured source of the issuer at `push_url` whose state file is
    /// `state_file`.
    pub fn for_issuer(
        kind: &SourceKind,
        timeout: Duration,
        push_url: &str,
        state_file: &std::path::Path,
    ) -> anyhow::Result<Self> {
        match kind {
            SourceKind::Push(_) => Ok(AnySource::Push(PushInbox::new(
                format!("push {push_url}"),
                push::trust_inbox(state_file),
            ))),
            _ => Self::from_config(kind, timeout),
        }
    }
}

impl AnySource {
    /// A token for `namespace/service_account` with `audience`, living `seconds`, minted
    /// through TokenRequest with this source's apiserver and credentials (the self-test, a
    /// push agent). `Err` is one line: why, in the apiserver's words when it answered.
    pub async fn token_request(
        &mut self,
        namespace: &str,
        service_account: &str,
        audience: &str,
        seconds: u64,
    ) -> Result<String, String> {
        match self {
            AnySource::Remote(source) => {
                source
                    .token_request(namespace, service_account, audience, seconds)
                    .await
            }
            AnySource::File(_) | AnySource::Push(_) => {
                Err("TokenRequest needs an apiserver source".to_owned())
            }
        }
    }
}

impl KeySource for AnySource {
    fn describe(&self) -> String {
        match self {
            AnySource::File(s) => s.describe(),
            AnySource::Remote(s) => s.describe(),
            AnySource::Push(s) => s.describe(),
        }
    }

    async fn fetch_key_set(&mut self) -> Result<Fetched, FetchError> {
        match self {
            AnySource::File(s) => s.fetch_key_set().await,
            AnySource::Remote(s) => s.fetch_key_set().await,
            AnySource::Push(s) => s.fetch_key_set().await,
        }
    }
}

/// A source of key sets, driven by the refresher.
pub trait KeySource: Send {
    /// What the logs call this source (a path or a URL).
    fn describe(&self) -> String;

    fn fetch_key_set(&mut self) -> impl Future<Output = Result<Fetched, FetchError>> + Send;
}

#[derive(Debug, Clone)]
pub struct SourceConfig {
    pub kind: SourceKind,
    pub refresh_interval: Duration,
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceKind {
    /// A JWKS file, re-read when it changes.
    File { path: PathBuf },
    /// A kube-apiserver, configured directly, from a kubeconfig, or from the pod environment.
    Apiserver(ApiserverSource),
    /// Any https JWKS URL; trusted by `ca_file` when given, else by the system roots.
    Url {
        url: url::Url,
        ca_file: Option<PathBuf>,
    },
    /// Key sets the cluster pushes (issue 18), authenticated by the keys already published.
    Push(PushPolicy),
}

impl fmt::Display for SourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SourceKind::File { path } => write!(f, "file {}", path.display()),
            SourceKind::Apiserver(api) => write!(
                f,
                "{} {} ({})",
                api.origin,
                redacted_url(&api.server),
                api.auth.describe()
            ),
            SourceKind::Url { url, .. } => write!(f, "url {}", redacted_url(url)),
            SourceKind::Push(policy) => write!(
                f,
                "push from {} (audience {})",
                policy.subject, policy.audience
            ),
        }
    }
}

/// How often a source is fetched, and how long one fetch may take, unless configured.
pub const DEFAULT_REFRESH_INTERVAL: Duration = Duration::from_secs(60);
pub const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_url_is_shown_without_its_user_info() {
        // M5: the source's name in logs, /status and check-config.
        let kind = SourceKind::Url {
            url: url::Url::parse("https://u:S3CRET@h.example/keys").expect("url"),
            ca_file: None,
        };
        assert_eq!(kind.to_string(), "url https://***@h.example/keys");
    }
}
