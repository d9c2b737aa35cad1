//! `[https.acme]`: certificates from Let's Encrypt or any RFC 8555 directory, by rustls-acme.
//!
//! rustls-acme spawns nothing: its state is a stream that orders, renews (at 2/3 of the
//! lifetime) and hot-swaps the certificate while it is polled. [`Acme::driver`] is that
//! polling, returned to the server so that every task is spawned in one place. Failed orders
//! back off inside rustls-acme (1 s, 2 s, 4 s … capped); they never stop the listeners.

use std::future::Future;
use std::sync::Arc;

use futures_util::StreamExt as _;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_acme::{AcmeConfig, EventOk, ResolvesServerCertAcme, UseChallenge};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;
use tracing::{info, warn};

use super::cache::AcmeCache;
use crate::config::{AcmeSettings, Challenge};
use crate::metrics::Metrics;

/// The parts of ACME the listeners need, and the driver that keeps the certificate current.
pub struct Acme {
    pub resolver: Arc<ResolvesServerCertAcme>,
    /// Answers TLS-ALPN-01 validation handshakes (`None` with HTTP-01).
    pub challenge_config: Option<Arc<ServerConfig>>,
    pub driver: std::pin::Pin<Box<dyn Future<Output = ()> + Send>>,
}

impl std::fmt::Debug for Acme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acme").finish_non_exhaustive()
    }
}

/// Sets ACME up; the driver must be polled for a certificate to appear.
pub fn start(
    settings: &AcmeSettings,
    cache: AcmeCache,
    metrics: Arc<Metrics>,
) -> anyhow::Result<Acme> {
    let config = match &settings.directory_ca_file {
        Some(ca_file) => {
            // A private directory (Pebble in tests, a corporate ACME server): trust only its CA.
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(ca_file)? {
                roots.add(cert?)?;
            }
            let client = ClientConfig::builder()
                .with_root_certificates(roots)
                .with_no_client_auth();
            AcmeConfig::new_with_client_config(&settings.domains, Arc::new(client))
        }
        None => AcmeConfig::new(&settings.domains),
    };
    let challenge = match settings.challenge {
        Challenge::TlsAlpn01 => UseChallenge::TlsAlpn01,
        Challenge::Http01 => UseChallenge::Http01,
    };
    let mut state = config
        .contact(&settings.contact)
        // Explicit: rustls-acme's default is Let's Encrypt *staging* (gotcha 5).
        .directory(&settings.directory)
        .challenge_type(challenge)
        .cache(cache)
        .state();
    let resolver = state.resolver();
    let challenge_config =
        (settings.challenge == Challenge::TlsAlpn01).then(|| state.challenge_rustls_config());
    let domains = settings.domains.join(",");
    let driver = Box::pin(async move {
        while let Some(event) = state.next().await {
            match event {
                Ok(ok) => {
                    let name = match ok {
                        EventOk::DeployedCachedCert => "deployed_cached_cert",
                        EventOk::DeployedNewCert => "deployed_new_cert",
                        EventOk::CertCacheStore => "cert_cache_store",
                        EventOk::AccountCacheStore => "account_cache_store",
                    };
                    metrics.count_acme_event(name);
                    info!(event = name, domains = %domains, "acme");
                }
                Err(e) => {
                    metrics.count_acme_event("error");
                    warn!(error = %e, domains = %domains, "acme failed; retrying with backoff");
                }
            }
        }
    });
    Ok(Acme {
        resolver,
        challenge_config,
        driver,
    })
}
