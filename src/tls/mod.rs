//! TLS for the public HTTPS listener (DESIGN §5): certificates from ACME ([`acme`]) or from
//! PEM files ([`files`]), one rustls configuration shape for both.

pub mod acme;
pub mod cache;
pub mod files;
pub mod https;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::ServerConfig;
use rustls::server::ResolvesServerCert;
use rustls_pki_types::CertificateDer;
use serde::Serialize;

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

/// TLS 1.2 and 1.3 (A-8: AWS falls back to thumbprints when only 1.3 is offered), ALPN h2 and
/// http/1.1 (the stock rustls-acme config sets no ALPN, so HTTP/2 would never be chosen).
pub fn server_config(resolver: Arc<dyn ResolvesServerCert>) -> Arc<ServerConfig> {
    let mut config = ServerConfig::builder_with_protocol_versions(&[
        &rustls::version::TLS13,
        &rustls::version::TLS12,
    ])
    .with_no_client_auth()
    .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(config)
}

/// The `notAfter` of a DER certificate.
pub fn not_after(cert: &CertificateDer<'_>) -> Option<SystemTime> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let secs = u64::try_from(parsed.validity().not_after.timestamp()).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
}

/// Readiness wants at least this much validity left (L4): a week to act before relying
/// parties fail, and below the renewal point of any certificate rustls-acme renews (1/3 of
/// the lifetime: 30 days of 90, 15 days of 45).
pub const MIN_CERT_VALIDITY: Duration = Duration::from_secs(7 * 86_400);

/// What readiness and `/status` need to know about the HTTPS certificate (L4).
pub trait CertState: Send + Sync + std::fmt::Debug {
    /// When the served certificate expires; `None` before the first one.
    fn not_after(&self) -> Option<SystemTime>;
    /// Why the last ACME attempt failed, until a new certificate is deployed.
    fn last_acme_error(&self) -> Option<String> {
        None
    }
}

/// The `https` part of `/status`.
#[derive(Debug, Serialize)]
pub struct HttpsStatus {
    /// RFC 3339, UTC.
    pub not_after: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_acme_error: Option<String>,
}

pub fn https_status(cert: &dyn CertState) -> HttpsStatus {
    HttpsStatus {
        not_after: cert
            .not_after()
            .map(|t| humantime::format_rfc3339_seconds(t).to_string()),
        last_acme_error: cert.last_acme_error(),
    }
}

/// Why HTTPS makes the server not ready: no certificate, an expired one, or one that expires
/// within [`MIN_CERT_VALIDITY`]. A failing ACME attempt alone does not: the certificate is
/// still good, and rustls-acme retries.
pub fn not_ready_reason(cert: &dyn CertState, now: SystemTime) -> Option<String> {
    let detail = cert
        .last_acme_error()
        .map(|e| format!(" (last ACME attempt: {e})"))
        .unwrap_or_default();
    let Some(not_after) = cert.not_after() else {
        return Some(format!("https: no certificate yet{detail}"));
    };
    let date = humantime::format_rfc3339_seconds(not_after);
    match not_after.duration_since(now) {
        Err(_) | Ok(Duration::ZERO) => {
            Some(format!("https: certificate expired on {date}{detail}"))
        }
        Ok(left) if left < MIN_CERT_VALIDITY => Some(format!(
            "https: certificate expires on {date}, in less than {} days{detail}",
            MIN_CERT_VALIDITY.as_secs() / 86_400
        )),
        Ok(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Fixed(Option<SystemTime>, Option<&'static str>);

    impl CertState for Fixed {
        fn not_after(&self) -> Option<SystemTime> {
            self.0
        }
        fn last_acme_error(&self) -> Option<String> {
            self.1.map(str::to_owned)
        }
    }

    #[test]
    fn https_readiness_needs_a_certificate_valid_for_a_week() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let day = Duration::from_secs(86_400);
        assert_eq!(
            not_ready_reason(&Fixed(None, None), now).as_deref(),
            Some("https: no certificate yet")
        );
        assert_eq!(
            not_ready_reason(&Fixed(None, Some("order: refused")), now).as_deref(),
            Some("https: no certificate yet (last ACME attempt: order: refused)")
        );
        assert_eq!(
            not_ready_reason(&Fixed(Some(now), None), now).as_deref(),
            Some("https: certificate expired on 2027-01-15T08:00:00Z")
        );
        assert_eq!(
            not_ready_reason(
                &Fixed(Some(now + 7 * day - Duration::from_secs(1)), None),
                now
            )
            .as_deref(),
            Some("https: certificate expires on 2027-01-22T07:59:59Z, in less than 7 days")
        );
        assert_eq!(
            not_ready_reason(&Fixed(Some(now + 7 * day), None), now),
            None
        );
        // A failing renewal with plenty of validity left is reported in /status only.
        assert_eq!(
            not_ready_reason(&Fixed(Some(now + 20 * day), Some("timeout")), now),
            None
        );
    }
}
