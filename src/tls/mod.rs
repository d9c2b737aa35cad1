//! TLS for the public HTTPS listener (DESIGN §5): certificates from ACME ([`acme`]) or from
//! PEM files ([`files`]), one rustls configuration shape for both.

pub mod acme;
pub mod cache;
pub mod files;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::ServerConfig;
use rustls::server::ResolvesServerCert;
use rustls_pki_types::CertificateDer;

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
