//! The configuration file (DESIGN §2): the only code that knows its format.
//!
//! Two layers: `Raw*` structs mirror the TOML (unknown keys are errors), and one validation pass
//! turns them into typed values. Every error names the file and the key at fault, so that a bad
//! config stops the process with one line and exit code 64 before anything is bound.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::issuer::{self, Issuer};

/// Where `serve` and `check-config` look when neither `--config` nor `$OIDC_EDGE_CONFIG` is set.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/oidc-edge/config.toml";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/oidc-edge";
/// X-6: at least token TTL + max-age + 5 min (2 h 5 min at the largest max-age); Z-9: 24 h
/// covers Azure Workload Identity's default token lifetime.
pub const DEFAULT_KEY_RETENTION: Duration = Duration::from_secs(86_400);
pub use crate::relying_party::MAX_KEYS_LIMIT;
pub const DEFAULT_CACHE_MAX_AGE: Duration = Duration::from_secs(300);
/// X-3: relying parties should not cache longer than the apiserver's own 3600 s.
pub const MAX_CACHE_MAX_AGE: Duration = Duration::from_secs(3600);
pub const DEFAULT_REFRESH_INTERVAL: Duration = Duration::from_secs(60);
pub const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// The range a duration key accepts, with the bounds as the error message writes them.
#[derive(Debug, Clone, Copy)]
struct Bounds {
    min: (Duration, &'static str),
    max: (Duration, &'static str),
}

const SECOND: Duration = Duration::from_secs(1);
const MINUTES_5: (Duration, &str) = (Duration::from_secs(300), "5m");
const HOUR: (Duration, &str) = (Duration::from_secs(3600), "1h");
const DAYS_30: (Duration, &str) = (Duration::from_secs(30 * 86_400), "30days");

// L11: every duration is bounded at config time. Unbounded values panicked inside tasks that
// then died silently (`Instant + Duration` overflow in the accept loop, `Duration::mul_f64` in
// the refresh schedule), and "1ns" made a source spin. The upper bounds are far above any
// sensible setting and far below any overflow; the lower bounds stop spinning but stay below
// what the test suite uses to run in seconds (a file source every 5 ms, a fetch timeout of
// 300 ms against a local fake apiserver).
/// A refresh at most daily: a key rotation must show up well inside a token's lifetime.
const REFRESH_INTERVAL_BOUNDS: Bounds = Bounds {
    min: (Duration::from_millis(1), "1ms"),
    max: (Duration::from_secs(86_400), "24h"),
};
/// One fetch: anything slower than 5 minutes is an outage, and the next attempt should start.
const FETCH_TIMEOUT_BOUNDS: Bounds = Bounds {
    min: (Duration::from_millis(100), "100ms"),
    max: MINUTES_5,
};
/// A TLS handshake or a request's headers: real clients need well under a second; a bound of
/// minutes would hand slow clients the connection slots (DESIGN §3).
const CLIENT_TIMEOUT_BOUNDS: Bounds = Bounds {
    min: (SECOND, "1s"),
    max: MINUTES_5,
};
const IDLE_TIMEOUT_BOUNDS: Bounds = Bounds {
    min: (SECOND, "1s"),
    max: HOUR,
};
/// Rotation grace: longer than the longest token lifetime in use (24 h for Azure Workload
/// Identity, Z-9) with room to spare; keys kept for months are revoked keys still published.
const KEY_RETENTION_BOUNDS: Bounds = Bounds {
    min: (SECOND, "1s"),
    max: DAYS_30,
};
/// Readiness is judged in whole seconds (`/readyz`), so less than one second means nothing.
const MAX_STALENESS_BOUNDS: Bounds = Bounds {
    min: (SECOND, "1s"),
    max: DAYS_30,
};

// === validated configuration ===

#[derive(Debug, Clone)]
pub struct Config {
    /// The file this was loaded from; relative paths in it are resolved against its directory.
    pub file: PathBuf,
    pub issuers: Vec<IssuerConfig>,
    pub http: Option<HttpConfig>,
    pub https: Option<HttpsConfig>,
    pub limits: Limits,
    pub admin: AdminConfig,
    pub state_dir: PathBuf,
    pub log: LogConfig,
    /// Problems that are not errors because they can fix themselves, each `<file>: <key>:
    /// <what>` on one line: `check-config` prints them and `serve` logs them (L13).
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct IssuerConfig {
    pub issuer: Issuer,
    pub discovery_path: String,
    pub jwks_path: String,
    /// `https://<issuer host><jwks_path>`, as published in the discovery document.
    pub jwks_uri: String,
    pub jwks_content_type: JwksContentType,
    pub cache_max_age: Duration,
    pub key_retention: Duration,
    pub max_keys: usize,
    pub sources: Vec<SourceConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JwksContentType {
    /// X-4: what EKS serves and every client accepts (the default).
    Json,
    /// RFC 7517 §8.5.1, what kube-apiserver serves; some clients refuse it (F-8).
    JwkSetJson,
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
        }
    }
}

/// `url` with any user info shown as `***` (M5). Config refuses user info in source URLs;
/// everything that names a URL in a log line, `/status` or an error goes through this anyway,
/// so that a credential that slips past validation is still never printed.
pub fn redacted_url(url: &url::Url) -> String {
    if url.username().is_empty() && url.password().is_none() {
        return url.to_string();
    }
    let mut shown = url.clone();
    // Both fail only for URLs without a host, which have no user info to hide.
    let _ = shown.set_password(None);
    let _ = shown.set_username("***");
    shown.to_string()
}

/// Text meant to be a URL, with anything between `://` and the last `@` of the authority
/// replaced by `***`: for messages about text that may not even parse as a URL (M5).
pub fn redacted_text(text: &str) -> String {
    let Some(scheme_end) = text.find("://") else {
        return text.to_owned();
    };
    let start = scheme_end + 3;
    let rest = &text[start..];
    let authority_len = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_len].rfind('@') {
        Some(at) => format!("{}***{}", &text[..start], &rest[at..]),
        None => text.to_owned(),
    }
}

/// How to reach one apiserver. Its CA is always pinned: it is private (K3-3), and trusting
/// system roots would let any public certificate for that name serve us keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiserverSource {
    /// What logs call it: `apiserver`, `kubeconfig <path> (context …)`, `in-cluster`.
    pub origin: String,
    pub server: url::Url,
    pub ca: Pem,
    pub auth: ApiAuth,
    /// The kubeconfig file and context this was read from, read again when the file changes:
    /// k3s rewrites its inline client certificate when it rotates it (L1).
    pub kubeconfig: Option<(PathBuf, Option<String>)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiAuth {
    /// Anonymous discovery (needs `system:unauthenticated` bound to the discovery role, K-7).
    Anonymous,
    /// A bearer token file, re-read on every fetch: projected tokens rotate (K-8).
    TokenFile(PathBuf),
    /// A bearer token written in a kubeconfig.
    Token(Secret),
    /// A client certificate and key (k3s admin kubeconfig style).
    ClientCert { cert: Pem, key: Pem },
}

impl ApiAuth {
    fn describe(&self) -> String {
        match self {
            ApiAuth::Anonymous => "anonymous".to_owned(),
            ApiAuth::TokenFile(path) => format!("token file {}", path.display()),
            ApiAuth::Token(_) => "kubeconfig token".to_owned(),
            ApiAuth::ClientCert { .. } => "client certificate".to_owned(),
        }
    }
}

/// PEM from a file, or inline (kubeconfig `*-data`).
#[derive(Clone, PartialEq, Eq)]
pub enum Pem {
    File(PathBuf),
    Inline(Vec<u8>),
}

impl Pem {
    pub fn read(&self) -> std::io::Result<Vec<u8>> {
        match self {
            Pem::File(path) => std::fs::read(path),
            Pem::Inline(bytes) => Ok(bytes.clone()),
        }
    }
}

impl fmt::Debug for Pem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pem::File(path) => write!(f, "Pem::File({})", path.display()),
            // May be a private key: never in a log line.
            Pem::Inline(bytes) => write!(f, "Pem::Inline({} bytes)", bytes.len()),
        }
    }
}

/// A secret string whose Debug form is redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Where Kubernetes mounts a pod's service-account credentials.
pub const IN_CLUSTER_TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
pub const IN_CLUSTER_CA: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";

#[derive(Debug, Clone)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    /// 301 every request to https, except ACME HTTP-01 challenges.
    pub redirect_to_https: bool,
}

#[derive(Debug, Clone)]
pub struct HttpsConfig {
    pub listen: SocketAddr,
    pub tls: TlsSource,
    /// `Strict-Transport-Security` on HTTPS answers (default on).
    pub hsts: bool,
}

#[derive(Debug, Clone)]
pub enum TlsSource {
    Acme(AcmeSettings),
    Files {
        cert_file: PathBuf,
        key_file: PathBuf,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcmeSettings {
    pub domains: Vec<String>,
    pub contact: Vec<String>,
    /// The directory URL.
    pub directory: String,
    pub directory_ca_file: Option<PathBuf>,
    pub challenge: Challenge,
    /// `state.dir/acme`.
    pub cache_dir: PathBuf,
    /// The longest one step of the ACME driver may take (M1: rustls-acme's HTTP client has no
    /// timeout of its own).
    pub step_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Challenge {
    /// On the HTTPS port itself: no port 80 needed.
    TlsAlpn01,
    /// On the plain listener, which must then be reachable on port 80.
    Http01,
}

/// The admin listener: `/livez`, `/readyz`, `/metrics`, `/status`.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// When set, an issuer whose key set no source confirmed for this long is not ready.
    pub max_staleness: Option<Duration>,
}

pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9090";

/// Limits of the public listeners (DESIGN §3): what a hostile client can hold.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// A TLS client must finish its handshake within this.
    pub handshake_timeout: Duration,
    /// A request's headers must arrive within this; also the HTTP/1.1 keep-alive idle time.
    pub header_read_timeout: Duration,
    pub max_connections: usize,
    pub h2_max_concurrent_streams: u32,
    /// Larger request headers get 431 (HTTP/1.1) or a stream reset (HTTP/2).
    pub max_header_bytes: usize,
    /// A connection on which no request has started for this long is closed gracefully
    /// (HTTP/2 has no idle limit of its own).
    pub idle_timeout: Duration,
    /// A response that makes no progress for this long (the client stopped reading, or holds
    /// an HTTP/2 window at zero) ends its connection, as nginx's `send_timeout`; also how long
    /// a connection closing gracefully may take before it is dropped.
    pub send_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            max_connections: 4096,
            h2_max_concurrent_streams: 64,
            max_header_bytes: 16 * 1024,
            idle_timeout: Duration::from_secs(60),
            send_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub format: LogFormat,
    /// One line per public request (off by default: relying parties poll often).
    pub access: bool,
    /// An `EnvFilter` directive; `RUST_LOG` overrides it.
    pub level: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

// === errors ===

/// A configuration error: `<file>: <key>: <what is wrong>`, on one line.
#[derive(Debug, thiserror::Error)]
#[error("{}: {}{message}", file.display(), key.as_deref().map(|k| format!("{k}: ")).unwrap_or_default())]
pub struct ConfigError {
    pub file: PathBuf,
    pub key: Option<String>,
    pub message: String,
}

// === raw file format ===

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    issuers: Vec<RawIssuer>,
    http: Option<RawHttp>,
    https: Option<RawHttps>,
    limits: Option<RawLimits>,
    admin: Option<RawAdmin>,
    state: Option<RawState>,
    log: Option<RawLog>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIssuer {
    issuer: String,
    jwks_path: Option<String>,
    jwks_content_type: Option<String>,
    cache_max_age: Option<String>,
    key_retention: Option<String>,
    max_keys: Option<usize>,
    #[serde(default)]
    sources: Vec<RawSource>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    kind: String,
    path: Option<PathBuf>,
    url: Option<String>,
    ca_file: Option<PathBuf>,
    token_file: Option<PathBuf>,
    client_cert_file: Option<PathBuf>,
    client_key_file: Option<PathBuf>,
    kubeconfig: Option<PathBuf>,
    context: Option<String>,
    refresh_interval: Option<String>,
    timeout: Option<String>,
}

impl RawSource {
    /// The kind-specific keys that are set, for "not used by this kind" errors.
    fn set_keys(&self) -> Vec<&'static str> {
        [
            ("path", self.path.is_some()),
            ("url", self.url.is_some()),
            ("ca_file", self.ca_file.is_some()),
            ("token_file", self.token_file.is_some()),
            ("client_cert_file", self.client_cert_file.is_some()),
            ("client_key_file", self.client_key_file.is_some()),
            ("kubeconfig", self.kubeconfig.is_some()),
            ("context", self.context.is_some()),
        ]
        .into_iter()
        .filter_map(|(key, set)| set.then_some(key))
        .collect()
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    listen: String,
    redirect_to_https: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttps {
    listen: String,
    hsts: Option<bool>,
    acme: Option<RawAcme>,
    files: Option<RawFiles>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAcme {
    domains: Option<Vec<String>>,
    #[serde(default)]
    contact: Vec<String>,
    directory: Option<String>,
    directory_ca_file: Option<PathBuf>,
    challenge: Option<String>,
    step_timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFiles {
    cert_file: PathBuf,
    key_file: PathBuf,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    handshake_timeout: Option<String>,
    header_read_timeout: Option<String>,
    max_connections: Option<usize>,
    h2_max_concurrent_streams: Option<u32>,
    max_header_bytes: Option<usize>,
    idle_timeout: Option<String>,
    send_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Option<String>,
    allow_remote: Option<bool>,
    max_staleness: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawState {
    dir: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    format: Option<String>,
    level: Option<String>,
    access: Option<bool>,
}

// === loading and validation ===

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_owned(),
            key: None,
            message: format!("cannot read the configuration file: {e}"),
        })?;
        Self::from_toml_str(&text, path)
    }

    /// Parses and validates `text` as if read from `file` (relative paths resolve against its
    /// directory).
    pub fn from_toml_str(text: &str, file: &Path) -> Result<Self, ConfigError> {
        let raw = parse(text, file)?;
        let base = file.parent().unwrap_or(Path::new("."));
        Validator {
            file,
            base,
            warnings: std::cell::RefCell::default(),
        }
        .config(raw)
    }
}

fn parse(text: &str, file: &Path) -> Result<RawConfig, ConfigError> {
    let located = |message: &str, span: Option<std::ops::Range<usize>>| match span {
        Some(span) => {
            let (line, column) = line_and_column(text, span.start);
            format!("{message} (line {line}, column {column})")
        }
        None => message.to_owned(),
    };
    let de = toml::Deserializer::parse(text).map_err(|e| ConfigError {
        file: file.to_owned(),
        key: None,
        message: located(e.message().trim_end(), e.span()),
    })?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.inner();
        ConfigError {
            file: file.to_owned(),
            key: (path != ".").then_some(path),
            message: located(inner.message().trim_end(), inner.span()),
        }
    })
}

fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

struct Validator<'a> {
    file: &'a Path,
    base: &'a Path,
    warnings: std::cell::RefCell<Vec<String>>,
}

impl Validator<'_> {
    fn err(&self, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.to_owned(),
            key: Some(key.into()),
            message: message.into(),
        }
    }

    fn config(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        if raw.issuers.is_empty() {
            return Err(self.err("issuers", "at least one [[issuers]] table is required"));
        }
        let issuers = raw
            .issuers
            .into_iter()
            .enumerate()
            .map(|(i, r)| self.issuer(&format!("issuers[{i}]"), r))
            .collect::<Result<Vec<_>, _>>()?;
        self.routes_are_unique(&issuers)?;

        let state_dir = raw
            .state
            .as_ref()
            .map(|s| self.resolve(&s.dir))
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
        let https = raw
            .https
            .map(|h| self.https(h, &issuers, &state_dir))
            .transpose()?;
        let http = raw
            .http
            .map(|h| {
                let listen = self.address("http.listen", &h.listen, "127.0.0.1:8080")?;
                let redirect_to_https = h.redirect_to_https.unwrap_or(false);
                if redirect_to_https && https.is_none() {
                    return Err(self.err(
                        "http.redirect_to_https",
                        "needs an [https] listener to redirect to",
                    ));
                }
                Ok(HttpConfig {
                    listen,
                    redirect_to_https,
                })
            })
            .transpose()?;
        if http.is_none() && https.is_none() {
            return Err(self.err(
                "http",
                "no listener is configured: add [http] with listen = \"…\", or [https]",
            ));
        }
        if let Some(HttpsConfig {
            tls: TlsSource::Acme(acme),
            ..
        }) = &https
            && acme.challenge == Challenge::Http01
            && http.is_none()
        {
            return Err(self.err(
                "https.acme.challenge",
                "\"http-01\" is answered on the [http] listener, which is not configured (it must be reachable on port 80)",
            ));
        }
        let limits = self.limits(raw.limits.unwrap_or_default())?;

        let raw_admin = raw.admin.unwrap_or_default();
        let admin_listen = raw_admin.listen.as_deref().unwrap_or(DEFAULT_ADMIN_LISTEN);
        let listen: SocketAddr = admin_listen.parse().map_err(|e| {
            self.err(
                "admin.listen",
                format!("{admin_listen:?} is not an address like 127.0.0.1:9090: {e}"),
            )
        })?;
        if !listen.ip().is_loopback() && raw_admin.allow_remote != Some(true) {
            return Err(self.err(
                "admin.listen",
                format!(
                    "{listen} is not a loopback address; the admin endpoints are not for the internet \
                     (set allow_remote = true to bind it anyway, e.g. inside a container)"
                ),
            ));
        }
        let max_staleness = raw_admin
            .max_staleness
            .map(|text| {
                self.bounded_duration(
                    "admin.max_staleness",
                    Some(text),
                    Duration::ZERO,
                    MAX_STALENESS_BOUNDS,
                )
            })
            .transpose()?;
        let admin = AdminConfig {
            listen,
            max_staleness,
        };

        let raw_log = raw.log.unwrap_or(RawLog {
            format: None,
            level: None,
            access: None,
        });
        let format = match raw_log.format.as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(self.err(
                    "log.format",
                    format!("{other:?} is not \"text\" or \"json\""),
                ));
            }
        };
        let level = raw_log.level.unwrap_or_else(|| "info".to_owned());
        if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(&level) {
            return Err(self.err("log.level", format!("{level:?} is not a log filter: {e}")));
        }

        Ok(Config {
            file: self.file.to_owned(),
            issuers,
            http,
            https,
            limits,
            admin,
            state_dir,
            log: LogConfig {
                format,
                level,
                access: raw_log.access.unwrap_or(false),
            },
            warnings: self.warnings.take(),
        })
    }

    fn issuer(&self, key: &str, raw: RawIssuer) -> Result<IssuerConfig, ConfigError> {
        let issuer = Issuer::parse(&raw.issuer)
            .map_err(|e| self.err(format!("{key}.issuer"), e.to_string()))?;
        let jwks_path = match raw.jwks_path {
            Some(path) => {
                issuer::check_path(&issuer, &path)
                    .map_err(|m| self.err(format!("{key}.jwks_path"), m))?;
                path
            }
            None => issuer.default_jwks_path(),
        };
        let discovery_path = issuer.discovery_path();
        if jwks_path == discovery_path {
            return Err(self.err(
                format!("{key}.jwks_path"),
                "must differ from the discovery document's path",
            ));
        }
        let jwks_content_type = match raw.jwks_content_type.as_deref() {
            None | Some("application/json") => JwksContentType::Json,
            Some("application/jwk-set+json") => JwksContentType::JwkSetJson,
            Some(other) => {
                return Err(self.err(
                    format!("{key}.jwks_content_type"),
                    format!(
                        "{other:?} is not \"application/json\" or \"application/jwk-set+json\""
                    ),
                ));
            }
        };
        let cache_max_age = self.duration(
            &format!("{key}.cache_max_age"),
            raw.cache_max_age,
            DEFAULT_CACHE_MAX_AGE,
        )?;
        if cache_max_age > MAX_CACHE_MAX_AGE {
            return Err(self.err(format!("{key}.cache_max_age"), "must be at most 1h (X-3)"));
        }
        let key_retention = self.bounded_duration(
            &format!("{key}.key_retention"),
            raw.key_retention,
            DEFAULT_KEY_RETENTION,
            KEY_RETENTION_BOUNDS,
        )?;
        let max_keys = raw.max_keys.unwrap_or(MAX_KEYS_LIMIT);
        if !(1..=MAX_KEYS_LIMIT).contains(&max_keys) {
            return Err(self.err(
                format!("{key}.max_keys"),
                format!("{max_keys} is not from 1 to {MAX_KEYS_LIMIT} (AWS and Azure use at most 100 keys, A-9, Z-4)"),
            ));
        }
        if raw.sources.is_empty() {
            return Err(self.err(
                format!("{key}.sources"),
                "at least one [[issuers.sources]] table is required",
            ));
        }
        let sources = raw
            .sources
            .into_iter()
            .enumerate()
            .map(|(i, s)| self.source(&format!("{key}.sources[{i}]"), s))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(IssuerConfig {
            jwks_uri: issuer.url_for(&jwks_path),
            issuer,
            discovery_path,
            jwks_path,
            jwks_content_type,
            cache_max_age,
            key_retention,
            max_keys,
            sources,
        })
    }

    fn source(&self, key: &str, raw: RawSource) -> Result<SourceConfig, ConfigError> {
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
            other => {
                return Err(self.err(
                    format!("{key}.kind"),
                    format!("{other:?} is not one of \"apiserver\", \"kubeconfig\", \"in-cluster\", \"file\", \"url\""),
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
                let api = crate::kubeconfig::parse(&yaml, &path, raw.context.as_deref())
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

    fn duration(
        &self,
        key: &str,
        raw: Option<String>,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        let Some(text) = raw else {
            return Ok(default);
        };
        match humantime::parse_duration(&text) {
            Ok(d) if d.is_zero() => Err(self.err(key, "must be longer than zero")),
            Ok(d) => Ok(d),
            Err(e) => Err(self.err(
                key,
                format!("{text:?} is not a duration like \"60s\" or \"24h\": {e}"),
            )),
        }
    }

    /// [`Self::duration`], within `bounds` (L11).
    fn bounded_duration(
        &self,
        key: &str,
        raw: Option<String>,
        default: Duration,
        bounds: Bounds,
    ) -> Result<Duration, ConfigError> {
        let text = raw.clone();
        let value = self.duration(key, raw, default)?;
        if (bounds.min.0..=bounds.max.0).contains(&value) {
            return Ok(value);
        }
        Err(self.err(
            key,
            format!(
                "{:?} is not from {} to {}",
                text.unwrap_or_default(),
                bounds.min.1,
                bounds.max.1
            ),
        ))
    }

    fn address(&self, key: &str, text: &str, example: &str) -> Result<SocketAddr, ConfigError> {
        text.parse().map_err(|e| {
            self.err(
                key,
                format!("{text:?} is not an address like {example}: {e}"),
            )
        })
    }

    fn https(
        &self,
        raw: RawHttps,
        issuers: &[IssuerConfig],
        state_dir: &Path,
    ) -> Result<HttpsConfig, ConfigError> {
        let listen = self.address("https.listen", &raw.listen, "[::]:443")?;
        let tls = match (raw.acme, raw.files) {
            (Some(_), Some(_)) => {
                return Err(self.err("https", "set [https.acme] or [https.files], not both"));
            }
            (None, None) => {
                return Err(self.err(
                    "https",
                    "needs [https.acme] (Let's Encrypt) or [https.files] (certificate files)",
                ));
            }
            (None, Some(files)) => {
                let cert_file = self.resolve(&files.cert_file);
                let key_file = self.resolve(&files.key_file);
                crate::tls::files::load(&cert_file, &key_file)
                    .map_err(|e| self.err("https.files", e.to_string()))?;
                TlsSource::Files {
                    cert_file,
                    key_file,
                }
            }
            (Some(acme), None) => TlsSource::Acme(self.acme(acme, issuers, state_dir)?),
        };
        Ok(HttpsConfig {
            listen,
            tls,
            hsts: raw.hsts.unwrap_or(true),
        })
    }

    fn acme(
        &self,
        raw: RawAcme,
        issuers: &[IssuerConfig],
        state_dir: &Path,
    ) -> Result<AcmeSettings, ConfigError> {
        let domains = match raw.domains {
            Some(domains) => domains,
            None => {
                let mut hosts: Vec<String> = Vec::new();
                for issuer in issuers {
                    if !hosts.iter().any(|h| h == issuer.issuer.host()) {
                        hosts.push(issuer.issuer.host().to_owned());
                    }
                }
                hosts
            }
        };
        if domains.is_empty() {
            return Err(self.err("https.acme.domains", "must name at least one domain"));
        }
        for domain in &domains {
            let valid = !domain.is_empty()
                && domain.parse::<std::net::IpAddr>().is_err()
                && !domain.starts_with('[')
                && domain.split('.').all(|label| {
                    !label.is_empty()
                        && label
                            .bytes()
                            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                });
            if !valid {
                return Err(self.err(
                    "https.acme.domains",
                    format!(
                        "{domain:?} is not a lowercase DNS name (punycode for international names)"
                    ),
                ));
            }
        }
        for address in &raw.contact {
            if !address.starts_with("mailto:") {
                return Err(self.err(
                    "https.acme.contact",
                    format!("{address:?} must be a mailto: URL, like \"mailto:ops@example.com\""),
                ));
            }
        }
        let directory = match raw.directory.as_deref() {
            None | Some("letsencrypt") => {
                rustls_acme::acme::LETS_ENCRYPT_PRODUCTION_DIRECTORY.to_owned()
            }
            Some("letsencrypt-staging") => {
                rustls_acme::acme::LETS_ENCRYPT_STAGING_DIRECTORY.to_owned()
            }
            Some(url) => self.https_url("https.acme.directory", url)?.to_string(),
        };
        let directory_ca_file = raw.directory_ca_file.as_deref().map(|p| self.resolve(p));
        if let Some(ca) = &directory_ca_file {
            self.pem(
                "https.acme.directory_ca_file",
                &Pem::File(ca.clone()),
                PemKind::Certificates,
            )?;
        }
        let challenge = match raw.challenge.as_deref() {
            None | Some("tls-alpn-01") => Challenge::TlsAlpn01,
            Some("http-01") => Challenge::Http01,
            Some(other) => {
                return Err(self.err(
                    "https.acme.challenge",
                    format!("{other:?} is not \"tls-alpn-01\" or \"http-01\" (rustls-acme has no dns-01)"),
                ));
            }
        };
        // M1: bounds a hung ACME request. An order normally takes seconds; an hour is plenty
        // for the slowest, and below a second every order would be cut short.
        let step_timeout = self.duration(
            "https.acme.step_timeout",
            raw.step_timeout,
            Duration::from_secs(300),
        )?;
        if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&step_timeout) {
            return Err(self.err(
                "https.acme.step_timeout",
                "must be between \"1s\" and \"1h\"",
            ));
        }
        Ok(AcmeSettings {
            domains,
            contact: raw.contact,
            directory,
            directory_ca_file,
            challenge,
            cache_dir: state_dir.join("acme"),
            step_timeout,
        })
    }

    fn limits(&self, raw: RawLimits) -> Result<Limits, ConfigError> {
        let defaults = Limits::default();
        let positive = |key: &str, value: Option<usize>, default: usize| match value {
            Some(0) => Err(self.err(key, "must be at least 1")),
            Some(v) => Ok(v),
            None => Ok(default),
        };
        let max_header_bytes = positive(
            "limits.max_header_bytes",
            raw.max_header_bytes,
            defaults.max_header_bytes,
        )?;
        if max_header_bytes < 8192 {
            return Err(self.err(
                "limits.max_header_bytes",
                "must be at least 8192 (hyper's smallest buffer)",
            ));
        }
        Ok(Limits {
            handshake_timeout: self.bounded_duration(
                "limits.handshake_timeout",
                raw.handshake_timeout,
                defaults.handshake_timeout,
                CLIENT_TIMEOUT_BOUNDS,
            )?,
            header_read_timeout: self.bounded_duration(
                "limits.header_read_timeout",
                raw.header_read_timeout,
                defaults.header_read_timeout,
                CLIENT_TIMEOUT_BOUNDS,
            )?,
            max_connections: positive(
                "limits.max_connections",
                raw.max_connections,
                defaults.max_connections,
            )?,
            h2_max_concurrent_streams: u32::try_from(positive(
                "limits.h2_max_concurrent_streams",
                raw.h2_max_concurrent_streams.map(|v| v as usize),
                defaults.h2_max_concurrent_streams as usize,
            )?)
            .unwrap_or(u32::MAX),
            max_header_bytes,
            idle_timeout: self.bounded_duration(
                "limits.idle_timeout",
                raw.idle_timeout,
                defaults.idle_timeout,
                IDLE_TIMEOUT_BOUNDS,
            )?,
            send_timeout: self.bounded_duration(
                "limits.send_timeout",
                raw.send_timeout,
                defaults.send_timeout,
                CLIENT_TIMEOUT_BOUNDS,
            )?,
        })
    }

    fn https_url(&self, key: &str, text: &str) -> Result<url::Url, ConfigError> {
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
    fn pem(&self, key: &str, pem: &Pem, kind: PemKind) -> Result<(), ConfigError> {
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

    /// Checks the files that client-certificate or token-file authentication needs.
    fn auth_files(
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

    fn resolve(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            path.to_owned()
        } else {
            self.base.join(path)
        }
    }

    fn readable(&self, key: &str, path: &Path) -> Result<(), ConfigError> {
        std::fs::File::open(path)
            .map(drop)
            .map_err(|e| self.err(key, format!("cannot read {}: {e}", path.display())))
    }

    /// A file that is read again at every fetch (a JWKS file, a token file): missing at start
    /// is only a warning, because it can appear later (a volume mounted late, a projected token
    /// not written yet), and refusing to start would also refuse to serve the persisted set
    /// through the outage (L13, DESIGN §4 "Persist"). What can never work is still an error.
    fn file_to_come(&self, key: &str, path: &Path) -> Result<(), ConfigError> {
        match std::fs::metadata(path) {
            Ok(meta) if meta.is_dir() => Err(self.err(
                key,
                format!("{} is a directory, not a file", path.display()),
            )),
            Ok(_) => self.readable(key, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let warning = self.err(
                    key,
                    format!(
                        "cannot read {}: {e}; the source's fetches fail until it appears",
                        path.display()
                    ),
                );
                self.warnings.borrow_mut().push(warning.to_string());
                Ok(())
            }
            Err(e) => Err(self.err(key, format!("cannot read {}: {e}", path.display()))),
        }
    }

    /// Two issuers must never answer the same host and path: a relying party would get the
    /// other cluster's keys.
    fn routes_are_unique(&self, issuers: &[IssuerConfig]) -> Result<(), ConfigError> {
        let mut seen: HashMap<(&str, &str), usize> = HashMap::new();
        for (i, cfg) in issuers.iter().enumerate() {
            for path in [&cfg.discovery_path, &cfg.jwks_path] {
                if let Some(other) = seen.insert((cfg.issuer.host(), path), i)
                    && other != i
                {
                    return Err(self.err(
                        format!("issuers[{i}]"),
                        format!(
                            "https://{}{path} is also served by issuers[{other}] ({})",
                            cfg.issuer.host(),
                            issuers[other].issuer
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

#[derive(Clone, Copy)]
enum PemKind {
    Certificates,
    PrivateKey,
}

// === summary for check-config ===

impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "config {}: ok", self.file.display())?;
        for cfg in &self.issuers {
            writeln!(f, "issuer {}", cfg.issuer)?;
            writeln!(
                f,
                "  discovery  {}",
                cfg.issuer.url_for(&cfg.discovery_path)
            )?;
            let content_type = match cfg.jwks_content_type {
                JwksContentType::Json => "application/json",
                JwksContentType::JwkSetJson => "application/jwk-set+json",
            };
            writeln!(f, "  jwks       {} ({content_type})", cfg.jwks_uri)?;
            writeln!(
                f,
                "  cache      max-age {}s; key retention {}; max keys {}",
                cfg.cache_max_age.as_secs(),
                humantime::format_duration(cfg.key_retention),
                cfg.max_keys
            )?;
            for (i, s) in cfg.sources.iter().enumerate() {
                writeln!(
                    f,
                    "  source[{i}]  {} every {}",
                    s.kind,
                    humantime::format_duration(s.refresh_interval)
                )?;
            }
        }
        if let Some(http) = &self.http {
            let redirect = if http.redirect_to_https {
                " (redirects to https)"
            } else {
                ""
            };
            writeln!(f, "http   listen {}{redirect}", http.listen)?;
        }
        if let Some(https) = &self.https {
            let tls = match &https.tls {
                TlsSource::Acme(acme) => format!(
                    "acme {} for {} ({:?})",
                    acme.directory,
                    acme.domains.join(", "),
                    acme.challenge
                ),
                TlsSource::Files { cert_file, .. } => format!("files {}", cert_file.display()),
            };
            writeln!(f, "https  listen {} {tls}", https.listen)?;
        }
        writeln!(f, "admin  listen {}", self.admin.listen)?;
        writeln!(f, "state  {}", self.state_dir.display())?;
        let format = match self.log.format {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        };
        write!(f, "log    {format} {}", self.log.level)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("jwks.json"), "{}").expect("write");
        Config::from_toml_str(text, &dir.path().join("config.toml"))
    }

    const MINIMAL: &str = r#"
        [[issuers]]
        issuer = "https://oidc.example.com"
          [[issuers.sources]]
          kind = "file"
          path = "jwks.json"
        [http]
        listen = "127.0.0.1:8080"
    "#;

    #[test]
    fn defaults_are_applied() {
        let cfg = load(MINIMAL).expect("valid");
        let issuer = &cfg.issuers[0];
        assert_eq!(issuer.jwks_uri, "https://oidc.example.com/openid/v1/jwks");
        assert_eq!(issuer.discovery_path, "/.well-known/openid-configuration");
        assert_eq!(issuer.cache_max_age, Duration::from_secs(300));
        assert_eq!(issuer.key_retention, Duration::from_secs(86_400));
        assert_eq!(issuer.max_keys, 100);
        assert_eq!(issuer.jwks_content_type, JwksContentType::Json);
        assert_eq!(issuer.sources[0].refresh_interval, Duration::from_secs(60));
        assert_eq!(cfg.state_dir, PathBuf::from("/var/lib/oidc-edge"));
        assert_eq!(cfg.log.format, LogFormat::Text);
    }

    #[test]
    fn relative_paths_resolve_against_the_config_directory() {
        let cfg = load(MINIMAL).expect("valid");
        let SourceKind::File { path } = &cfg.issuers[0].sources[0].kind else {
            panic!("a file source");
        };
        assert!(path.is_absolute() && path.ends_with("jwks.json"));
    }

    #[test]
    fn user_info_is_cut_out_of_urls_and_url_like_text() {
        let url = url::Url::parse("https://user:S3CRET@h.example:8443/p").expect("url");
        assert_eq!(redacted_url(&url), "https://***@h.example:8443/p");
        let url = url::Url::parse("https://S3CRET@h.example/").expect("url");
        assert_eq!(redacted_url(&url), "https://***@h.example/");
        let url = url::Url::parse("https://h.example/a@b").expect("url");
        assert_eq!(redacted_url(&url), "https://h.example/a@b");
        assert_eq!(
            redacted_text("https://u:S3CRET@x@h:99999/a@b?c@d"),
            "https://***@h:99999/a@b?c@d"
        );
        assert_eq!(redacted_text("https://h/a@b"), "https://h/a@b");
        assert_eq!(redacted_text("not a url @ all"), "not a url @ all");
        let kind = SourceKind::Url {
            url: url::Url::parse("https://u:S3CRET@h.example/keys").expect("url"),
            ca_file: None,
        };
        assert_eq!(kind.to_string(), "url https://***@h.example/keys");
    }

    #[test]
    fn line_and_column_count_from_one() {
        assert_eq!(line_and_column("ab\ncd", 0), (1, 1));
        assert_eq!(line_and_column("ab\ncd", 4), (2, 2));
    }
}
