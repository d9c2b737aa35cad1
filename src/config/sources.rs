//! Validation of `[[issuers.sources]]`: each kind's keys, and the files it will read.

use std::path::PathBuf;

use super::ConfigError;
use super::raw::RawSource;
use super::validate::{FETCH_TIMEOUT_BOUNDS, REFRESH_INTERVAL_BOUNDS, Validator};
use crate::display::{redacted_text, redacted_url};
use crate::jwks::source::apiserver::{
    ApiAuth, ApiserverSource, IN_CLUSTER_CA, IN_CLUSTER_TOKEN, Pem,
};
use crate::jwks::source::push::PushPolicy;
use crate::jwks::source::{
    DEFAULT_FETCH_TIMEOUT, DEFAULT_REFRESH_INTERVAL, SourceConfig, SourceKind,
};

/// `system:serviceaccount:NAMESPACE:NAME`, the `sub` Kubernetes gives a service account's
/// tokens; a push names the one account allowed to push.
fn is_service_account(subject: &str) -> bool {
    subject
        .strip_prefix("system:serviceaccount:")
        .and_then(|rest| rest.split_once(':'))
        .is_some_and(|(namespace, name)| {
            !namespace.is_empty() && !name.is_empty() && !name.contains(':')
        })
}

impl Validator<'_> {
    pub(super) fn source(&self, key: &str, raw: RawSource) -> Result<SourceConfig, ConfigError> {
        let refresh_interval = self.bounded_duration(
            &format!("{key}.refresh_interval"),
            raw.refresh_interval.clone(),
            DEFAULT_REFRESH_INTERVAL,
            REFRESH_INTERVAL_BOUNDS,
        )?;
        let timeout = self.bounded_duration(
            &format!("{key}.timeout"),
            raw.timeout.clone(),
            DEFAULT_FETCH_TIMEOUT,
            FETCH_TIMEOUT_BOUNDS,
        )?;
        let allowed: &[&str] = match raw.kind.as_str() {
            "file" => &["path"],
            "apiserver" => &[
                "url",
                "ca_file",
                "token_file",
                "client_cert_file",
                "client_key_file",
            ],
            "kubeconfig" => &["kubeconfig", "context"],
            "in-cluster" => &["ca_file", "token_file"],
            "url" => &["url", "ca_file"],
            "push" => &["audience", "subject", "allow_tokens_without_jti"],
            other => {
                return Err(self.err(
                    format!("{key}.kind"),
                    format!("{other:?} is not one of \"apiserver\", \"kubeconfig\", \"in-cluster\", \"file\", \"url\", \"push\""),
                ));
            }
        };
        if let Some(extra) = raw.set_keys().into_iter().find(|k| !allowed.contains(k)) {
            return Err(self.err(
                format!("{key}.{extra}"),
                format!("is not used by kind = {:?}", raw.kind),
            ));
        }
        let required = |name: &str, value: Option<&PathBuf>| {
            value.cloned().ok_or_else(|| {
                self.err(
                    format!("{key}.{name}"),
                    format!("is required for kind = {:?}", raw.kind),
                )
            })
        };
        let kind = match raw.kind.as_str() {
            "file" => {
                let path = self.resolve(&required("path", raw.path.as_ref())?);
                self.file_to_come(&format!("{key}.path"), &path)?;
                SourceKind::File { path }
            }
            "apiserver" => {
                let url = raw.url.as_deref().ok_or_else(|| {
                    self.err(format!("{key}.url"), "is required for kind = \"apiserver\"")
                })?;
                let server = self.https_url(&format!("{key}.url"), url)?;
                let ca = self.resolve(&required("ca_file", raw.ca_file.as_ref())?);
                self.pem(
                    &format!("{key}.ca_file"),
                    &Pem::File(ca.clone()),
                    PemKind::Certificates,
                )?;
                let auth = match (&raw.token_file, &raw.client_cert_file, &raw.client_key_file) {
                    (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
                        return Err(self.err(
                            format!("{key}.token_file"),
                            "use either token_file or client_cert_file + client_key_file, not both",
                        ));
                    }
                    (Some(token), None, None) => ApiAuth::TokenFile(self.resolve(token)),
                    (None, Some(cert), Some(private)) => ApiAuth::ClientCert {
                        cert: Pem::File(self.resolve(cert)),
                        key: Pem::File(self.resolve(private)),
                    },
                    (None, Some(_), None) => {
                        return Err(self.err(
                            format!("{key}.client_key_file"),
                            "is required with client_cert_file",
                        ));
                    }
                    (None, None, Some(_)) => {
                        return Err(self.err(
                            format!("{key}.client_cert_file"),
                            "is required with client_key_file",
                        ));
                    }
                    (None, None, None) => ApiAuth::Anonymous,
                };
                let (cert_key, key_key) = match auth {
                    ApiAuth::TokenFile(_) => ("token_file", "token_file"),
                    _ => ("client_cert_file", "client_key_file"),
                };
                self.auth_files(key, &auth, cert_key, key_key)?;
                SourceKind::Apiserver(ApiserverSource {
                    origin: "apiserver".to_owned(),
                    server,
                    ca: Pem::File(ca),
                    auth,
                    kubeconfig: None,
                })
            }
            "kubeconfig" => {
                let path = self.resolve(&required("kubeconfig", raw.kubeconfig.as_ref())?);
                let k = format!("{key}.kubeconfig");
                let yaml = std::fs::read_to_string(&path)
                    .map_err(|e| self.err(&k, format!("cannot read {}: {e}", path.display())))?;
                let api =
                    crate::jwks::source::kubeconfig::parse(&yaml, &path, raw.context.as_deref())
                        .map_err(|m| self.err(&k, format!("{}: {m}", path.display())))?;
                self.pem(&k, &api.ca, PemKind::Certificates)?;
                self.auth_files(key, &api.auth, "kubeconfig", "kubeconfig")?;
                SourceKind::Apiserver(api)
            }
            "in-cluster" => {
                let host = std::env::var("KUBERNETES_SERVICE_HOST").map_err(|_| {
                    self.err(
                        format!("{key}.kind"),
                        "\"in-cluster\" needs KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT, which Kubernetes sets in a pod",
                    )
                })?;
                let port =
                    std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".to_owned());
                let host = if host.contains(':') {
                    format!("[{host}]")
                } else {
                    host
                };
                let server =
                    self.https_url(&format!("{key}.kind"), &format!("https://{host}:{port}"))?;
                let ca = raw
                    .ca_file
                    .as_deref()
                    .map_or_else(|| PathBuf::from(IN_CLUSTER_CA), |p| self.resolve(p));
                let token = raw
                    .token_file
                    .as_deref()
                    .map_or_else(|| PathBuf::from(IN_CLUSTER_TOKEN), |p| self.resolve(p));
                self.pem(
                    &format!("{key}.ca_file"),
                    &Pem::File(ca.clone()),
                    PemKind::Certificates,
                )?;
                self.file_to_come(&format!("{key}.token_file"), &token)?;
                SourceKind::Apiserver(ApiserverSource {
                    origin: "in-cluster".to_owned(),
                    server,
                    ca: Pem::File(ca),
                    auth: ApiAuth::TokenFile(token),
                    kubeconfig: None,
                })
            }
            "push" => {
                let text = |name: &str, value: Option<&String>| {
                    value
                        .filter(|v| !v.trim().is_empty())
                        .cloned()
                        .ok_or_else(|| {
                            self.err(format!("{key}.{name}"), "is required for kind = \"push\"")
                        })
                };
                let subject = text("subject", raw.subject.as_ref())?;
                if !is_service_account(&subject) {
                    return Err(self.err(
                        format!("{key}.subject"),
                        format!(
                            "{subject:?} is not a service account's token subject \
                             (system:serviceaccount:NAMESPACE:NAME)"
                        ),
                    ));
                }
                SourceKind::Push(PushPolicy {
                    audience: text("audience", raw.audience.as_ref())?,
                    subject,
                    allow_tokens_without_jti: raw.allow_tokens_without_jti.unwrap_or(false),
                })
            }
            _ => {
                let url = raw.url.as_deref().ok_or_else(|| {
                    self.err(format!("{key}.url"), "is required for kind = \"url\"")
                })?;
                let url = self.https_url(&format!("{key}.url"), url)?;
                let ca_file = raw.ca_file.as_deref().map(|p| self.resolve(p));
                if let Some(ca) = &ca_file {
                    self.pem(
                        &format!("{key}.ca_file"),
                        &Pem::File(ca.clone()),
                        PemKind::Certificates,
                    )?;
                }
                SourceKind::Url { url, ca_file }
            }
        };
        Ok(SourceConfig {
            kind,
            refresh_interval,
            timeout,
        })
    }

    pub(super) fn https_url(&self, key: &str, text: &str) -> Result<url::Url, ConfigError> {
        // Every message shows the URL with its user info cut out, even when it does not parse
        // (M5): a password typed here must never reach the terminal or a CI log.
        let shown = redacted_text(text);
        let url = url::Url::parse(text)
            .map_err(|e| self.err(key, format!("{shown:?} is not a URL: {e}")))?;
        if !url.username().is_empty() || url.password().is_some() {
            // reqwest would turn it into `Authorization: Basic`, but the URL is also the
            // source's name in every log line, in /status and in this summary (M5).
            return Err(self.err(
                key,
                format!(
                    "{:?} must not contain user info (user:password@): it would be shown in logs, /status and metrics",
                    redacted_url(&url)
                ),
            ));
        }
        if url.scheme() != "https" {
            return Err(self.err(
                key,
                format!("{shown:?} must use https: keys are fetched over TLS only"),
            ));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(self.err(
                key,
                format!("{shown:?} must not contain a query or fragment"),
            ));
        }
        Ok(url)
    }

    /// Checks that PEM material parses: CA bundles hold certificates, keys one private key.
    pub(super) fn pem(&self, key: &str, pem: &Pem, kind: PemKind) -> Result<(), ConfigError> {
        use rustls_pki_types::pem::{PemObject as _, SectionKind};
        let name = match pem {
            Pem::File(path) => path.display().to_string(),
            Pem::Inline(_) => "the inline data".to_owned(),
        };
        let bytes = pem
            .read()
            .map_err(|e| self.err(key, format!("cannot read {name}: {e}")))?;
        let (mut certs, mut keys) = (0, 0);
        for section in <(SectionKind, Vec<u8>)>::pem_slice_iter(&bytes) {
            match section {
                Ok((SectionKind::Certificate, _)) => certs += 1,
                Ok((
                    SectionKind::PrivateKey
                    | SectionKind::RsaPrivateKey
                    | SectionKind::EcPrivateKey,
                    _,
                )) => {
                    keys += 1;
                }
                Ok(_) => {}
                Err(e) => return Err(self.err(key, format!("{name} is not valid PEM: {e}"))),
            }
        }
        match kind {
            PemKind::Certificates if certs == 0 => {
                Err(self.err(key, format!("{name} contains no PEM certificate")))
            }
            PemKind::PrivateKey if keys != 1 => Err(self.err(
                key,
                format!("{name} must contain exactly one PEM private key"),
            )),
            _ => Ok(()),
        }
    }

    /// `KEY.ca_file`, when set: resolved, and holding PEM certificates.
    pub(super) fn ca_file(
        &self,
        key: &str,
        raw: Option<&std::path::Path>,
    ) -> Result<Option<PathBuf>, ConfigError> {
        let Some(path) = raw.map(|path| self.resolve(path)) else {
            return Ok(None);
        };
        self.pem(
            &format!("{key}.ca_file"),
            &Pem::File(path.clone()),
            PemKind::Certificates,
        )?;
        Ok(Some(path))
    }

    /// Checks the files that client-certificate or token-file authentication needs.
    pub(super) fn auth_files(
        &self,
        key: &str,
        auth: &ApiAuth,
        cert_key: &str,
        key_key: &str,
    ) -> Result<(), ConfigError> {
        match auth {
            ApiAuth::ClientCert { cert, key: private } => {
                self.pem(&format!("{key}.{cert_key}"), cert, PemKind::Certificates)?;
                self.pem(&format!("{key}.{key_key}"), private, PemKind::PrivateKey)
            }
            ApiAuth::TokenFile(path) => self.file_to_come(&format!("{key}.{key_key}"), path),
            ApiAuth::Anonymous | ApiAuth::Token(_) => Ok(()),
        }
    }
}

#[derive(Clone, Copy)]
pub(super) enum PemKind {
    Certificates,
    PrivateKey,
}
