//! The validation pass: raw tables to typed settings, every error naming its key.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::raw::{RawConfig, RawIssuer, RawLimits, RawLog, RawRelyingParties, RawSelfTest};
use super::{Config, ConfigError, DEFAULT_STATE_DIR, IssuerConfig};
use crate::admin::{AdminConfig, DEFAULT_ADMIN_LISTEN};
use crate::http::fetched_by::{self, FamilyConfig, RelyingParties};
use crate::http::{HttpConfig, HttpsConfig};
use crate::issuer::endpoint::{
    DEFAULT_CACHE_MAX_AGE, IssuerEndpoint, JwksContentType, MAX_CACHE_MAX_AGE,
};
use crate::issuer::{self, Issuer};
use crate::jwks::merge::{DEFAULT_KEY_RETENTION, KeyPolicy};
use crate::jwks::source::{SourceConfig, SourceKind};
use crate::listener::Limits;
use crate::relying_party::MAX_KEYS_LIMIT;
use crate::selftest::SelfTestConfig;
use crate::telemetry::{LogConfig, LogFormat};
use crate::tls::{Challenge, TlsSource};

/// The range a duration key accepts, with the bounds as the error message writes them.
#[derive(Debug, Clone, Copy)]
pub(super) struct Bounds {
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
pub(super) const REFRESH_INTERVAL_BOUNDS: Bounds = Bounds {
    min: (Duration::from_millis(1), "1ms"),
    max: (Duration::from_secs(86_400), "24h"),
};
/// One fetch: anything slower than 5 minutes is an outage, and the next attempt should start.
pub(super) const FETCH_TIMEOUT_BOUNDS: Bounds = Bounds {
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
/// A request to the store, retries included: long enough for a slow store, short enough that
/// a hung one is noticed well within a refresh interval.
pub(super) const PUBLISH_TIMEOUT_BOUNDS: Bounds = Bounds {
    min: (Duration::from_millis(100), "100ms"),
    max: MINUTES_5,
};
/// A self-test mints a token and makes two fetches: not more than once a second, and at
/// least daily.
const SELFTEST_INTERVAL_BOUNDS: Bounds = Bounds {
    min: (SECOND, "1s"),
    max: (Duration::from_secs(86_400), "24h"),
};
/// A push at least hourly, so that the edge's `max_staleness` can say when the cluster last
/// spoke; not more than once a second.
pub(super) const PUSH_INTERVAL_BOUNDS: Bounds = Bounds {
    min: (SECOND, "1s"),
    max: HOUR,
};
/// A relying-party fetch record: kept at least a minute (a scrape or two), at most a quarter
/// (relying parties fetch at least daily; a record older than that describes an old setup).
const FORGET_AFTER_BOUNDS: Bounds = Bounds {
    min: (Duration::from_secs(60), "1m"),
    max: (Duration::from_secs(90 * 86_400), "90days"),
};
/// Families and patterns per family: each pattern is searched in every request's
/// `User-Agent`, and each family is a metric label value per issuer and document.
const MAX_FAMILIES: usize = 16;
const MAX_PATTERNS: usize = 8;
const MAX_PATTERN_BYTES: usize = 256;
/// Readiness is judged in whole seconds (`/readyz`), so less than one second means nothing.
const MAX_STALENESS_BOUNDS: Bounds = Bounds {
    min: (SECOND, "1s"),
    max: DAYS_30,
};

pub(super) struct Validator<'a> {
    pub(super) file: &'a Path,
    pub(super) base: &'a Path,
    pub(super) warnings: RefCell<Vec<String>>,
}

impl Validator<'_> {
    pub(super) fn err(&self, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.to_owned(),
            key: Some(key.into()),
            message: message.into(),
        }
    }

    pub(super) fn config(&self, raw: RawConfig) -> Result<Config, ConfigError> {
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
        self.publish_keys_are_unique(&issuers)?;

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
        // A publisher or a push agent inside the cluster serves nothing itself: its buckets
        // or its edge do.
        let outbound = issuers
            .iter()
            .any(|i| !i.publish.is_empty() || !i.push.is_empty());
        if http.is_none() && https.is_none() && !outbound {
            return Err(self.err(
                "http",
                "no listener is configured: add [http] with listen = \"…\", or [https], or an [[issuers.publish]] or [[issuers.push]] target",
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

        let relying_parties = self.relying_parties(raw.relying_parties.unwrap_or_default())?;

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
            relying_parties,
            warnings: self.warnings.take(),
        })
    }

    pub(super) fn issuer(&self, key: &str, raw: RawIssuer) -> Result<IssuerConfig, ConfigError> {
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
        // One push source per issuer: one push URL, one account allowed to push.
        if let Some(second) = sources
            .iter()
            .enumerate()
            .filter(|(_, s)| matches!(s.kind, SourceKind::Push(_)))
            .nth(1)
            .map(|(i, _)| i)
        {
            return Err(self.err(
                format!("{key}.sources[{second}].kind"),
                "an issuer has at most one push source",
            ));
        }
        let publish = raw
            .publish
            .into_iter()
            .enumerate()
            .map(|(i, p)| self.publish_target(&format!("{key}.publish[{i}]"), p))
            .collect::<Result<Vec<_>, _>>()?;
        let push = raw
            .push
            .into_iter()
            .enumerate()
            .map(|(i, p)| self.push_target(&format!("{key}.push[{i}]"), p, &issuer, &sources))
            .collect::<Result<Vec<_>, _>>()?;
        let selftest = raw
            .selftest
            .map(|t| self.selftest(&format!("{key}.selftest"), t, &sources))
            .transpose()?;
        Ok(IssuerConfig {
            endpoint: IssuerEndpoint {
                jwks_content_type,
                cache_max_age,
                ..IssuerEndpoint::with_jwks_path(issuer, jwks_path)
            },
            keys: KeyPolicy {
                retention: key_retention,
                max_keys,
            },
            sources,
            publish,
            push,
            selftest,
        })
    }

    /// `[relying_parties]`: the built-in families, each replaced by a list of the same name,
    /// then the other lists in name order.
    fn relying_parties(&self, raw: RawRelyingParties) -> Result<RelyingParties, ConfigError> {
        let forget_after = self.bounded_duration(
            "relying_parties.forget_after",
            raw.forget_after,
            fetched_by::DEFAULT_FORGET_AFTER,
            FORGET_AFTER_BOUNDS,
        )?;
        let mut families = RelyingParties::default().families;
        for (name, patterns) in raw.user_agents {
            let key = format!("relying_parties.user_agents.{name}");
            let valid_name = (1..=32).contains(&name.len())
                && name.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_'
                });
            if !valid_name {
                return Err(self.err(
                    key,
                    "is not a family name: 1 to 32 lowercase letters, digits, '-' or '_'",
                ));
            }
            if patterns.len() > MAX_PATTERNS {
                return Err(self.err(
                    key,
                    format!("{} patterns; at most {MAX_PATTERNS}", patterns.len()),
                ));
            }
            for (i, pattern) in patterns.iter().enumerate() {
                // Printable ASCII: what a User-Agent carries; an empty pattern would match
                // every request.
                let printable = pattern.bytes().all(|b| (0x20..=0x7e).contains(&b));
                if pattern.is_empty() || pattern.len() > MAX_PATTERN_BYTES || !printable {
                    return Err(self.err(
                        format!("{key}[{i}]"),
                        format!(
                            "{pattern:?} is not a User-Agent substring: 1 to {MAX_PATTERN_BYTES} printable ASCII characters"
                        ),
                    ));
                }
            }
            match families.iter_mut().find(|f| f.name == name) {
                Some(family) => family.patterns = patterns,
                None => families.push(FamilyConfig { name, patterns }),
            }
        }
        if families.len() > MAX_FAMILIES {
            return Err(self.err(
                "relying_parties.user_agents",
                format!(
                    "{} families, the built-in ones included; at most {MAX_FAMILIES}",
                    families.len()
                ),
            ));
        }
        Ok(RelyingParties {
            families,
            forget_after,
        })
    }

    fn selftest(
        &self,
        key: &str,
        raw: RawSelfTest,
        sources: &[SourceConfig],
    ) -> Result<SelfTestConfig, ConfigError> {
        let source = sources
            .iter()
            .position(|s| matches!(s.kind, SourceKind::Apiserver(_)))
            .ok_or_else(|| {
                self.err(
                    key,
                    "needs an apiserver, kubeconfig or in-cluster source: its credentials mint the tokens (TokenRequest)",
                )
            })?;
        let (namespace, service_account) =
            self.service_account(&format!("{key}.service_account"), &raw.service_account)?;
        let interval = self.bounded_duration(
            &format!("{key}.interval"),
            raw.interval,
            Duration::from_secs(300),
            SELFTEST_INTERVAL_BOUNDS,
        )?;
        let ca_file = raw.ca_file.map(|p| self.resolve(&p));
        if let Some(path) = &ca_file {
            self.readable(&format!("{key}.ca_file"), path)?;
        }
        let connect_to = self.connect_to(key, raw.connect_to)?;
        Ok(SelfTestConfig {
            source,
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
            audience: raw
                .audience
                .unwrap_or_else(|| "sts.amazonaws.com".to_owned()),
            interval,
            ca_file,
            connect_to,
            readiness: raw.readiness.unwrap_or(false),
        })
    }

    pub(super) fn duration(
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
    pub(super) fn bounded_duration(
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

    pub(super) fn address(
        &self,
        key: &str,
        text: &str,
        example: &str,
    ) -> Result<SocketAddr, ConfigError> {
        text.parse().map_err(|e| {
            self.err(
                key,
                format!("{text:?} is not an address like {example}: {e}"),
            )
        })
    }

    pub(super) fn limits(&self, raw: RawLimits) -> Result<Limits, ConfigError> {
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

    pub(super) fn resolve(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            path.to_owned()
        } else {
            self.base.join(path)
        }
    }

    /// A service account as `NAMESPACE/NAME`.
    pub(super) fn service_account<'t>(
        &self,
        key: &str,
        text: &'t str,
    ) -> Result<(&'t str, &'t str), ConfigError> {
        text.split_once('/')
            .filter(|(ns, sa)| !ns.is_empty() && !sa.is_empty() && !sa.contains('/'))
            .ok_or_else(|| self.err(key, format!("{text:?} is not NAMESPACE/NAME")))
    }

    /// `KEY.connect_to`: an address to connect to instead of resolving a host.
    pub(super) fn connect_to(
        &self,
        key: &str,
        raw: Option<String>,
    ) -> Result<Option<SocketAddr>, ConfigError> {
        raw.map(|text| {
            text.parse::<SocketAddr>().map_err(|e| {
                self.err(
                    format!("{key}.connect_to"),
                    format!("{text:?} is not an address like 203.0.113.7:443: {e}"),
                )
            })
        })
        .transpose()
    }

    pub(super) fn readable(&self, key: &str, path: &Path) -> Result<(), ConfigError> {
        std::fs::File::open(path)
            .map(drop)
            .map_err(|e| self.err(key, format!("cannot read {}: {e}", path.display())))
    }

    /// A file that is read again at every fetch (a JWKS file, a token file): missing at start
    /// is only a warning, because it can appear later (a volume mounted late, a projected token
    /// not written yet), and refusing to start would also refuse to serve the persisted set
    /// through the outage (L13, DESIGN §4 "Persist"). What can never work is still an error.
    pub(super) fn file_to_come(&self, key: &str, path: &Path) -> Result<(), ConfigError> {
        self.file_to_come_for(key, path, "the source's fetches fail")
    }

    /// [`Validator::file_to_come`], saying what fails until the file appears.
    pub(super) fn file_to_come_for(
        &self,
        key: &str,
        path: &Path,
        what_fails: &str,
    ) -> Result<(), ConfigError> {
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
                        "cannot read {}: {e}; {what_fails} until it appears",
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
    pub(super) fn routes_are_unique(&self, issuers: &[IssuerConfig]) -> Result<(), ConfigError> {
        let mut seen: HashMap<(&str, &str), usize> = HashMap::new();
        for (i, cfg) in issuers.iter().map(|c| &c.endpoint).enumerate() {
            for path in [&cfg.discovery_path, &cfg.jwks_path] {
                if let Some(other) = seen.insert((cfg.issuer.host(), path), i)
                    && other != i
                {
                    return Err(self.err(
                        format!("issuers[{i}]"),
                        format!(
                            "https://{}{path} is also served by issuers[{other}] ({})",
                            cfg.issuer.host(),
                            issuers[other].endpoint.issuer
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}
