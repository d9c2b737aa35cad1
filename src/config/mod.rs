//! The configuration file (DESIGN §2): reading it and checking it, nothing else.
//!
//! Two layers: `raw` mirrors the TOML (unknown keys are errors), and one validation pass
//! (`validate`) turns it into the typed settings each part owns ([`IssuerEndpoint`],
//! [`KeyPolicy`], [`SourceConfig`], [`Limits`], [`crate::tls::TlsSource`], [`AdminConfig`],
//! [`LogConfig`]).
//! Every error names the file and the key at fault, so that a bad config stops the process
//! with one line and exit code 64 before anything is bound. Only the composition root and the
//! commands import this module.
//!
//! One deliberate exception to "only reads and checks": certificate files are loaded at
//! validation time (`tls::files::load`), so that a bad certificate fails `check-config`.

mod https;
mod publish;
mod raw;
mod sources;
mod summary;
mod validate;

use std::path::{Path, PathBuf};

use crate::admin::AdminConfig;
use crate::http::fetched_by::RelyingParties;
use crate::http::{HttpConfig, HttpsConfig};
use crate::issuer::endpoint::IssuerEndpoint;
use crate::jwks::merge::KeyPolicy;
use crate::jwks::source::SourceConfig;
use crate::listener::Limits;
use crate::publish::edge::EdgeTarget;
use crate::publish::target::PublishTarget;
use crate::selftest::SelfTestConfig;
use crate::telemetry::LogConfig;

/// Where `serve` and `check-config` look when neither `--config` nor `$OIDC_EDGE_CONFIG` is set.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/oidc-edge/config.toml";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/oidc-edge";

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
    /// `[relying_parties]`: which fetches are recorded as a relying party's, by `User-Agent`.
    pub relying_parties: RelyingParties,
    /// Problems that are not errors because they can fix themselves, each `<file>: <key>:
    /// <what>` on one line: `check-config` prints them and `serve` logs them (L13).
    pub warnings: Vec<String>,
}

/// One `[[issuers]]` table: its public face, its key policy and its sources.
#[derive(Debug, Clone)]
pub struct IssuerConfig {
    pub endpoint: IssuerEndpoint,
    pub keys: KeyPolicy,
    pub sources: Vec<SourceConfig>,
    /// Buckets kept in step with what is served (`oidc-edge publish`).
    pub publish: Vec<PublishTarget>,
    /// Public oidc-edges this issuer's keys are pushed to (`oidc-edge push`).
    pub push: Vec<EdgeTarget>,
    /// `[issuers.selftest]`: a token minted and checked as a relying party would.
    pub selftest: Option<SelfTestConfig>,
}

/// A configuration error: `<file>: <key>: <what is wrong>`, on one line.
#[derive(Debug, thiserror::Error)]
#[error("{}: {}{message}", file.display(), key.as_deref().map(|k| format!("{k}: ")).unwrap_or_default())]
pub struct ConfigError {
    pub file: PathBuf,
    pub key: Option<String>,
    pub message: String,
}

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

    /// Every issuer's public face, in configuration order (the index is the issuer's).
    pub fn endpoints(&self) -> Vec<IssuerEndpoint> {
        self.issuers.iter().map(|i| i.endpoint.clone()).collect()
    }

    /// Parses and validates `text` as if read from `file` (relative paths resolve against its
    /// directory).
    pub fn from_toml_str(text: &str, file: &Path) -> Result<Self, ConfigError> {
        let raw = parse(text, file)?;
        let base = file.parent().unwrap_or(Path::new("."));
        validate::Validator {
            file,
            base,
            warnings: std::cell::RefCell::default(),
        }
        .config(raw)
    }
}

fn parse(text: &str, file: &Path) -> Result<raw::RawConfig, ConfigError> {
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::http::fetched_by::RelyingParties;
    use crate::issuer::endpoint::JwksContentType;
    use crate::jwks::source::SourceKind;
    use crate::telemetry::LogFormat;

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
        let endpoint = &issuer.endpoint;
        assert_eq!(endpoint.jwks_uri, "https://oidc.example.com/openid/v1/jwks");
        assert_eq!(endpoint.discovery_path, "/.well-known/openid-configuration");
        assert_eq!(endpoint.cache_max_age, Duration::from_secs(300));
        assert_eq!(issuer.keys.retention, Duration::from_secs(86_400));
        assert_eq!(issuer.keys.max_keys, 100);
        assert_eq!(endpoint.jwks_content_type, JwksContentType::Json);
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

    /// The built-in families keep their place (aws first); a list of the same name replaces
    /// one, `[]` turns it off, and other names are added after them, in name order.
    #[test]
    fn relying_party_families_replace_the_built_in_ones_or_are_added() {
        let defaults = load(MINIMAL).expect("valid").relying_parties;
        assert_eq!(defaults, RelyingParties::default());
        let cfg = load(&format!(
            "{MINIMAL}\n[relying_parties]\nforget_after = \"2days\"\n\
             [relying_parties.user_agents]\nvault = [\"Vault/\"]\ngoogle = []\n\
             aws = [\"AWS Security Token Service\", \"my-sts-proxy/\"]\nargo = [\"argocd\"]\n"
        ))
        .expect("valid");
        let families: Vec<(&str, Vec<&str>)> = (cfg.relying_parties.families.iter())
            .map(|f| {
                (
                    f.name.as_str(),
                    f.patterns.iter().map(String::as_str).collect(),
                )
            })
            .collect();
        assert_eq!(
            families,
            [
                ("aws", vec!["AWS Security Token Service", "my-sts-proxy/"]),
                ("google", vec![]),
                ("microsoft", vec!["Microsoft", "Azure"]),
                ("argo", vec!["argocd"]),
                ("vault", vec!["Vault/"]),
            ]
        );
        assert_eq!(
            cfg.relying_parties.forget_after,
            Duration::from_secs(2 * 86_400)
        );
        assert!(
            cfg.to_string().contains(
                "\nfetched_by  aws, microsoft, argo, vault by User-Agent, each record kept 2days after its last fetch\n"
            ),
            "{cfg}"
        );
    }

    #[test]
    fn line_and_column_count_from_one() {
        assert_eq!(line_and_column("ab\ncd", 0), (1, 1));
        assert_eq!(line_and_column("ab\ncd", 4), (2, 2));
    }
}
