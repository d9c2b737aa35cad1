//! Validation of `[https]`: certificate files or ACME.

use std::path::Path;
use std::time::Duration;

use super::ConfigError;
use super::IssuerConfig;
use super::raw::{RawAcme, RawHttps};
use super::sources::PemKind;
use super::validate::Validator;
use crate::http::HttpsConfig;
use crate::jwks::source::apiserver::Pem;
use crate::tls::{AcmeSettings, Challenge, TlsSource};

impl Validator<'_> {
    pub(super) fn https(
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

    pub(super) fn acme(
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
                    let host = issuer.endpoint.issuer.host();
                    if !hosts.iter().any(|h| h == host) {
                        hosts.push(host.to_owned());
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
}
