//! The summary `check-config` prints: what a valid file configures, one line per fact.

use std::fmt;

use super::Config;
use crate::jwks::source::SourceKind;
use crate::publish::edge::PushToken;
use crate::telemetry::LogFormat;
use crate::tls::TlsSource;

impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "config {}: ok", self.file.display())?;
        for cfg in &self.issuers {
            let endpoint = &cfg.endpoint;
            writeln!(f, "issuer {}", endpoint.issuer)?;
            writeln!(f, "  discovery  {}", endpoint.discovery_url())?;
            writeln!(
                f,
                "  jwks       {} ({})",
                endpoint.jwks_uri,
                endpoint.jwks_content_type.as_str()
            )?;
            writeln!(
                f,
                "  cache      max-age {}s; key retention {}; max keys {}",
                endpoint.cache_max_age.as_secs(),
                humantime::format_duration(cfg.keys.retention),
                cfg.keys.max_keys
            )?;
            for (i, s) in cfg.sources.iter().enumerate() {
                if let SourceKind::Push(_) = s.kind {
                    // Pushes arrive when they arrive; the interval is how often the trust
                    // inbox is looked at.
                    let issuer = &endpoint.issuer;
                    writeln!(
                        f,
                        "  source[{i}]  {} at PUT {}; trust inbox checked every {}",
                        s.kind,
                        issuer.url_for(&issuer.push_path()),
                        humantime::format_duration(s.refresh_interval)
                    )?;
                    continue;
                }
                writeln!(
                    f,
                    "  source[{i}]  {} every {}",
                    s.kind,
                    humantime::format_duration(s.refresh_interval)
                )?;
            }
            for (i, target) in cfg.publish.iter().enumerate() {
                writeln!(f, "  publish[{i}] {} ({})", target.to, target.describe())?;
            }
            for (i, edge) in cfg.push.iter().enumerate() {
                let token = match &edge.token {
                    PushToken::File(path) => format!("the token in {}", path.display()),
                    PushToken::Request {
                        namespace,
                        service_account,
                        ..
                    } => format!("a TokenRequest token of {namespace}/{service_account}"),
                };
                writeln!(
                    f,
                    "  push[{i}]    {} with {token}, every {}",
                    edge.url,
                    humantime::format_duration(edge.interval)
                )?;
            }
            if let Some(test) = &cfg.selftest {
                writeln!(
                    f,
                    "  selftest   {}/{} for {} every {} (TokenRequest through source[{}]){}",
                    test.namespace,
                    test.service_account,
                    test.audience,
                    humantime::format_duration(test.interval),
                    test.source,
                    if test.readiness {
                        "; part of readiness"
                    } else {
                        ""
                    }
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
        let families: Vec<&str> = (self.relying_parties.families.iter())
            .filter(|family| !family.patterns.is_empty())
            .map(|family| family.name.as_str())
            .collect();
        if families.is_empty() {
            writeln!(f, "fetched_by  off (no relying-party family has a pattern)")?;
        } else {
            writeln!(
                f,
                "fetched_by  {} by User-Agent, each record kept {} after its last fetch",
                families.join(", "),
                humantime::format_duration(self.relying_parties.forget_after)
            )?;
        }
        writeln!(f, "admin  listen {}", self.admin.listen)?;
        writeln!(f, "state  {}", self.state_dir.display())?;
        // Only for a build that added roots: the public trust then differs from Mozilla's.
        match crate::roots::extra_count() {
            0 => {}
            n => writeln!(
                f,
                "roots  Mozilla's and {n} CA certificate(s) added at build time"
            )?,
        }
        let format = match self.log.format {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        };
        write!(f, "log    {format} {}", self.log.level)
    }
}
