//! Sources fetched over HTTPS: kube-apiservers (configured directly, from a kubeconfig or from
//! the pod environment) and plain JWKS URLs. One client builder serves them all (DESIGN §4):
//! pinned CA, no redirects, no proxy, no decompression, connect and total timeouts, a body cap,
//! and the token file re-read on every fetch.

use std::path::PathBuf;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::StatusCode;
use http::header::{ACCEPT, LOCATION};
use url::Url;

use super::apiserver::{ApiAuth, ApiserverSource, Pem, Secret};
use super::file::FileStamp;
use super::{FetchError, Fetched, KeySource, MAX_BODY_BYTES};
use crate::display::redacted_url as redacted;

/// kube-apiserver answers 406 to `Accept: application/json` alone on the JWKS route (K-6).
pub const JWKS_ACCEPT: &str = "application/jwk-set+json, application/json";
/// Connecting never needs more than this, whatever the total timeout.
const MAX_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How a remote source authenticates each request.
#[derive(Debug, Clone)]
enum Bearer {
    None,
    File(PathBuf),
    Inline(Secret),
}

/// An HTTPS source: an apiserver (JWKS + discovery, for the issuer check) or a JWKS URL.
#[derive(Debug)]
pub struct RemoteSource {
    client: reqwest::Client,
    jwks_url: Url,
    /// The apiserver's own discovery document, read only to compare its `issuer` (F-1).
    discovery_url: Option<Url>,
    bearer: Bearer,
    describe: String,
    /// What the client was built from, to build it again when its files change (L1).
    /// Boxed: read only when files change, and large next to a file source.
    spec: Box<Spec>,
    timeout: Duration,
    /// The files the client was built from, with their stamps taken before they were read.
    stamps: Vec<(PathBuf, Option<FileStamp>)>,
}

#[derive(Debug)]
enum Spec {
    Apiserver(ApiserverSource),
    Url { url: Url, ca_file: Option<PathBuf> },
}

/// The files whose contents are baked into the client: the CA, the client certificate and
/// key, and the kubeconfig that may hold them inline. Token files are not: they are read at
/// every fetch anyway.
fn credential_files(spec: &Spec) -> Vec<PathBuf> {
    let mut files = Vec::new();
    match spec {
        Spec::Apiserver(api) => {
            if let Some((kubeconfig, _)) = &api.kubeconfig {
                files.push(kubeconfig.clone());
            }
            let mut pems = vec![&api.ca];
            if let ApiAuth::ClientCert { cert, key } = &api.auth {
                pems.extend([cert, key]);
            }
            files.extend(pems.into_iter().filter_map(|pem| match pem {
                Pem::File(path) => Some(path.clone()),
                Pem::Inline(_) => None,
            }));
        }
        Spec::Url { ca_file, .. } => files.extend(ca_file.iter().cloned()),
    }
    files
}

fn stamps(files: Vec<PathBuf>) -> Vec<(PathBuf, Option<FileStamp>)> {
    files
        .into_iter()
        .map(|path| {
            let stamp = FileStamp::of(&path);
            (path, stamp)
        })
        .collect()
}

/// Why a remote source could not be set up (bad PEM that passed config validation, a file
/// that went away between validation and start).
#[derive(Debug, thiserror::Error)]
#[error("{what}: {reason}")]
pub struct SetupError {
    what: String,
    reason: String,
}

impl RemoteSource {
    /// An apiserver: `<server>/openid/v1/jwks`, trusting only its pinned CA.
    pub fn apiserver(api: &ApiserverSource, timeout: Duration) -> Result<Self, SetupError> {
        let spec = Box::new(Spec::Apiserver(api.clone()));
        // Stamped before reading: a change while the files are read shows at the next fetch.
        let stamps = stamps(credential_files(&spec));
        let setup = |reason: String| SetupError {
            what: format!("{} {}", api.origin, redacted(&api.server)),
            reason,
        };
        let ca = read_pem(&api.ca).map_err(setup)?;
        let cas =
            reqwest::Certificate::from_pem_bundle(&ca).map_err(|e| setup(format!("CA: {e}")))?;
        let mut builder = base_client(timeout).tls_certs_only(cas);
        let bearer = match &api.auth {
            ApiAuth::Anonymous => Bearer::None,
            ApiAuth::TokenFile(path) => Bearer::File(path.clone()),
            ApiAuth::Token(secret) => Bearer::Inline(secret.clone()),
            ApiAuth::ClientCert { cert, key } => {
                let mut pem = read_pem(cert).map_err(setup)?;
                pem.push(b'\n');
                pem.extend(read_pem(key).map_err(setup)?);
                let identity = reqwest::Identity::from_pem(&pem)
                    .map_err(|e| setup(format!("client certificate: {e}")))?;
                builder = builder.identity(identity);
                Bearer::None
            }
        };
        let client = builder.build().map_err(|e| setup(e.to_string()))?;
        Ok(Self {
            client,
            jwks_url: join(&api.server, "openid/v1/jwks"),
            discovery_url: Some(join(&api.server, ".well-known/openid-configuration")),
            bearer,
            describe: format!("{} {}", api.origin, redacted(&api.server)),
            spec,
            timeout,
            stamps,
        })
    }

    /// A JWKS URL, trusting `ca_file` when given, else Mozilla's roots (compiled in, L9).
    pub fn url(
        url: &Url,
        ca_file: Option<&PathBuf>,
        timeout: Duration,
    ) -> Result<Self, SetupError> {
        let spec = Box::new(Spec::Url {
            url: url.clone(),
            ca_file: ca_file.cloned(),
        });
        let stamps = stamps(credential_files(&spec));
        let setup = |reason: String| SetupError {
            what: redacted(url),
            reason,
        };
        let mut builder = base_client(timeout);
        if let Some(ca) = ca_file {
            let pem = read_pem(&Pem::File(ca.clone())).map_err(setup)?;
            let cas = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| setup(format!("CA: {e}")))?;
            builder = builder.tls_certs_only(cas);
        } else {
            builder = builder.tls_backend_preconfigured(public_tls());
        }
        Ok(Self {
            client: builder.build().map_err(|e| setup(e.to_string()))?,
            jwks_url: url.clone(),
            discovery_url: None,
            bearer: Bearer::None,
            describe: redacted(url),
            spec,
            timeout,
            stamps,
        })
    }

    /// Builds the client again when a file it was built from changed (L1): a rotated client
    /// certificate (k3s renews its own within 90 days of expiry), a renewed CA (the in-cluster
    /// `ca.crt` follows the kube-root-ca ConfigMap), a kubeconfig rewritten with new inline
    /// data. Checked at every fetch, so SIGHUP (which fetches at once) picks it up too; the
    /// cost is a few `stat` calls. A failed load fails this fetch and is retried at the next,
    /// since the stamps are only kept once a client was built.
    fn reload_if_changed(&mut self) -> Result<(), SetupError> {
        if self
            .stamps
            .iter()
            .all(|(path, stamp)| FileStamp::of(path) == *stamp)
        {
            return Ok(());
        }
        let next = match self.spec.as_ref() {
            Spec::Apiserver(api) => match &api.kubeconfig {
                Some((path, context)) => {
                    let before = FileStamp::of(path);
                    let what = || format!("kubeconfig {}", path.display());
                    let yaml = std::fs::read_to_string(path).map_err(|e| SetupError {
                        what: what(),
                        reason: e.to_string(),
                    })?;
                    let api = super::kubeconfig::parse(&yaml, path, context.as_deref()).map_err(
                        |reason| SetupError {
                            what: what(),
                            reason,
                        },
                    )?;
                    let mut next = Self::apiserver(&api, self.timeout)?;
                    // The kubeconfig's stamp from before it was read, for the same reason as
                    // in `apiserver`.
                    for (file, stamp) in &mut next.stamps {
                        if file == path {
                            *stamp = before;
                        }
                    }
                    next
                }
                None => Self::apiserver(api, self.timeout)?,
            },
            Spec::Url { url, ca_file } => Self::url(url, ca_file.as_ref(), self.timeout)?,
        };
        tracing::info!(source = %next.describe, "credentials or CA changed on disk; reloaded");
        *self = next;
        Ok(())
    }

    fn token(&self) -> Result<Option<String>, FetchError> {
        match &self.bearer {
            Bearer::None => Ok(None),
            Bearer::Inline(secret) => Ok(Some(secret.0.clone())),
            Bearer::File(path) => {
                // Re-read on every fetch: kubelet rotates projected tokens in place (K-8).
                let text = std::fs::read_to_string(path).map_err(|source| FetchError::File {
                    path: path.clone(),
                    source,
                })?;
                let token = text.trim();
                if token.is_empty() {
                    return Err(FetchError::EmptyToken { path: path.clone() });
                }
                Ok(Some(token.to_owned()))
            }
        }
    }

    /// One GET with the body capped at [`MAX_BODY_BYTES`].
    async fn get(&self, url: &Url, accept: &'static str) -> Result<Bytes, FetchError> {
        let mut request = self.client.get(url.clone()).header(ACCEPT, accept);
        if let Some(token) = self.token()? {
            request = request.bearer_auth(token);
        }
        let http = |source: reqwest::Error| FetchError::Http {
            url: redacted(url),
            source: source.without_url(),
        };
        let mut response = request.send().await.map_err(http)?;
        let status = response.status();
        if status.is_redirection() {
            let location = response
                .headers()
                .get(LOCATION)
                .and_then(|l| l.to_str().ok())
                .unwrap_or("nowhere")
                .to_owned();
            return Err(FetchError::Redirect {
                url: redacted(url),
                status,
                location,
            });
        }
        if status != StatusCode::OK {
            return Err(FetchError::Status {
                url: redacted(url),
                status,
                hint: status_hint(status),
            });
        }
        if response
            .content_length()
            .is_some_and(|len| len > MAX_BODY_BYTES)
        {
            return Err(FetchError::TooLarge {
                what: redacted(url),
            });
        }
        let mut body = BytesMut::new();
        while let Some(chunk) = response.chunk().await.map_err(http)? {
            if body.len() + chunk.len() > MAX_BODY_BYTES as usize {
                return Err(FetchError::TooLarge {
                    what: redacted(url),
                });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body.freeze())
    }

    /// `TokenRequest` for `namespace/service_account` with `audience`, valid for
    /// `expiration_seconds`, with this source's credentials (the self-test, issue 20). `Err`
    /// is one line: the status and the apiserver's own message (403: the credentials may not
    /// create tokens for that service account; 404: no such service account).
    pub async fn token_request(
        &mut self,
        namespace: &str,
        service_account: &str,
        audience: &str,
        expiration_seconds: u64,
    ) -> Result<String, String> {
        self.reload_if_changed().map_err(|e| e.to_string())?;
        let Spec::Apiserver(api) = self.spec.as_ref() else {
            return Err("TokenRequest needs an apiserver source".to_owned());
        };
        let url = join(
            &api.server,
            &format!("api/v1/namespaces/{namespace}/serviceaccounts/{service_account}/token"),
        );
        let body = serde_json::json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"audiences": [audience], "expirationSeconds": expiration_seconds},
        });
        let mut request = self
            .client
            .post(url.clone())
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(body.to_string());
        if let Some(token) = self.token().map_err(|e| e.to_string())? {
            request = request.bearer_auth(token);
        }
        let shown = redacted(&url);
        let response = request
            .send()
            .await
            .map_err(|e| format!("{shown}: {}", crate::display::error_chain(&e.without_url())))?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| format!("{shown}: {}", crate::display::error_chain(&e.without_url())))?;
        let answer: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        if status != StatusCode::CREATED && status != StatusCode::OK {
            let message = answer["message"].as_str().unwrap_or("");
            return Err(format!("{shown}: {status}: {message}"));
        }
        answer["status"]["token"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("{shown}: {status} without status.token"))
    }

    /// The `issuer` of the apiserver's discovery document, when it can be read.
    async fn upstream_issuer(&self) -> Option<Result<String, String>> {
        let url = self.discovery_url.as_ref()?;
        let body = match self.get(url, "application/json").await {
            Ok(body) => body,
            Err(e) => return Some(Err(e.to_string())),
        };
        let doc: serde_json::Value = match serde_json::from_slice(&body) {
            Ok(doc) => doc,
            Err(e) => return Some(Err(format!("{}: not JSON: {e}", redacted(url)))),
        };
        Some(
            doc.get("issuer")
                .and_then(|i| i.as_str())
                .map(str::to_owned)
                .ok_or_else(|| format!("{}: no \"issuer\"", redacted(url))),
        )
    }
}

impl KeySource for RemoteSource {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    async fn fetch_key_set(&mut self) -> Result<Fetched, FetchError> {
        self.reload_if_changed()?;
        let body = self.get(&self.jwks_url, JWKS_ACCEPT).await?;
        let upstream_issuer = match self.upstream_issuer().await {
            Some(Ok(issuer)) => Some(issuer),
            Some(Err(e)) => {
                tracing::debug!(error = %e, "apiserver discovery document not read");
                None
            }
            None => None,
        };
        Ok(Fetched::Body {
            body,
            upstream_issuer,
        })
    }
}

/// The settings every remote source shares.
fn base_client(timeout: Duration) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        // HTTP(S)_PROXY must not silently route key fetches elsewhere.
        .no_proxy()
        .timeout(timeout)
        .connect_timeout(timeout.min(MAX_CONNECT_TIMEOUT))
        .user_agent(concat!("oidc-edge/", env!("CARGO_PKG_VERSION")))
}

/// The trust for a URL without `ca_file`: Mozilla's roots from webpki-roots, compiled in, and
/// those the build added (`crate::roots`).
///
/// Not the system roots (L9): reqwest's `rustls` feature reads them through
/// rustls-platform-verifier, which fails with "No CA certificates were loaded from the system"
/// in the scratch container image, which has no CA bundle. These are also the roots of the
/// doctor's TLS probe and document fetch (`check::probe::tls::roots`), so that every "publicly
/// trusted" in oidc-edge means the same set, on a host and in the image alike.
pub fn public_tls() -> rustls::ClientConfig {
    tls_config(std::sync::Arc::new(crate::roots::public()))
}

/// A rustls client config trusting exactly `roots`, for `tls_backend_preconfigured`: the same
/// protocol versions and ALPN (h2, http/1.1) reqwest would set itself.
pub fn tls_config(roots: std::sync::Arc<rustls::RootCertStore>) -> rustls::ClientConfig {
    // The process installs aws-lc-rs at start (main.rs); tests may not have.
    let provider = rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider()));
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("aws-lc-rs supports TLS 1.2 and 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config
}

fn read_pem(pem: &Pem) -> Result<Vec<u8>, String> {
    pem.read().map_err(|e| match pem {
        Pem::File(path) => format!("{}: {e}", path.display()),
        Pem::Inline(_) => e.to_string(),
    })
}

/// `base` + `rel`, keeping a path prefix of `base` (apiservers behind Rancher-style proxies).
fn join(base: &Url, rel: &str) -> Url {
    let mut url = base.clone();
    let path = format!("{}/{rel}", base.path().trim_end_matches('/'));
    url.set_path(&path);
    url
}

fn status_hint(status: StatusCode) -> &'static str {
    match status {
        StatusCode::UNAUTHORIZED => {
            "; the apiserver refused the credentials (token or client certificate)"
        }
        StatusCode::FORBIDDEN => {
            "; the identity may not read the discovery endpoints: bind it to the ClusterRole system:service-account-issuer-discovery (K-7)"
        }
        StatusCode::NOT_FOUND => {
            "; the apiserver serves no discovery endpoints: is --service-account-issuer an https URL? (K-9)"
        }
        StatusCode::NOT_ACCEPTABLE => "; the server refused the Accept header",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_keeps_a_path_prefix() {
        let base = Url::parse("https://10.0.0.10:6443").expect("url");
        assert_eq!(
            join(&base, "openid/v1/jwks").as_str(),
            "https://10.0.0.10:6443/openid/v1/jwks"
        );
        let proxied = Url::parse("https://rancher.example.com/k8s/clusters/c-1/").expect("url");
        assert_eq!(
            join(&proxied, ".well-known/openid-configuration").as_str(),
            "https://rancher.example.com/k8s/clusters/c-1/.well-known/openid-configuration"
        );
    }

    /// M5, defence in depth: config refuses user info in source URLs, but should one get
    /// through, neither the name in logs and `/status` nor a fetch error shows the password.
    #[tokio::test]
    async fn user_info_never_reaches_describe_or_fetch_errors() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let url = Url::parse("https://user:S3CRET-PASSWORD@127.0.0.1:1/keys").expect("url");
        let mut source = RemoteSource::url(&url, None, Duration::from_secs(1)).expect("source");
        assert_eq!(source.describe(), "https://***@127.0.0.1:1/keys");
        let err = source
            .fetch_key_set()
            .await
            .expect_err("nothing listens on port 1");
        let text = err.to_string();
        assert!(
            text.starts_with("GET https://***@127.0.0.1:1/keys: "),
            "{text}"
        );
        assert!(
            !text.contains("S3CRET") && !format!("{err:?}").contains("S3CRET"),
            "{text}"
        );
        assert_eq!(
            redacted(&Url::parse("https://h.example/p").expect("url")),
            "https://h.example/p"
        );
    }

    /// L9: without `ca_file`, a URL source trusts webpki-roots, not the (possibly absent)
    /// system roots, and the client builds from it.
    #[test]
    fn a_url_without_ca_file_trusts_the_compiled_in_roots() {
        let tls = public_tls();
        assert_eq!(
            tls.alpn_protocols,
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        );
        let url = Url::parse("https://jwks.example.com/keys").expect("url");
        RemoteSource::url(&url, None, Duration::from_secs(1)).expect("builds with webpki roots");
        // A config of another rustls version would be an "unknown TLS backend" at build time.
        reqwest::Client::builder()
            .tls_backend_preconfigured(public_tls())
            .build()
            .expect("reqwest takes the config");
    }
}
