//! The HTTPS listener's certificates, ready to serve: from files or from ACME, with the task
//! that keeps them current and what the plain listener must answer for HTTP-01.

use std::pin::Pin;
use std::sync::Arc;

use anyhow::Context as _;
use rustls::ServerConfig;
use rustls::server::ResolvesServerCert;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use super::acme::{self, AcmeResolver};
use super::cache::AcmeCache;
use super::files::FileCerts;
use super::{CertState, TlsSource, server_config};
use crate::metrics::Metrics;

/// Everything the HTTPS listener needs from TLS.
#[derive(Debug)]
pub struct HttpsCerts {
    /// Answers each handshake with the current certificate.
    pub config: Arc<ServerConfig>,
    /// Answers ACME TLS-ALPN-01 validation handshakes (`acme-tls/1`).
    pub acme_challenge: Option<Arc<ServerConfig>>,
    /// Pending HTTP-01 challenges, answered on the plain listener.
    pub http01: Option<Arc<AcmeResolver>>,
    /// The certificate as readiness sees it (L4).
    pub state: Arc<dyn CertState>,
    /// What keeps the certificate current.
    pub upkeep: Upkeep,
}

/// The task beside the listener: the ACME driver, or polling the certificate files.
pub enum Upkeep {
    Acme(Pin<Box<dyn Future<Output = ()> + Send>>),
    Files(Arc<FileCerts>),
}

impl std::fmt::Debug for Upkeep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Upkeep::Acme(_) => "Upkeep::Acme",
            Upkeep::Files(_) => "Upkeep::Files",
        })
    }
}

impl HttpsCerts {
    /// Loads the certificate files, or sets ACME up (its driver runs in [`Upkeep::run`]).
    pub fn start(source: &TlsSource, metrics: &Arc<Metrics>) -> anyhow::Result<Self> {
        match source {
            TlsSource::Files {
                cert_file,
                key_file,
            } => {
                let certs = Arc::new(FileCerts::load_observed(cert_file, key_file, metrics)?);
                Ok(Self {
                    config: server_config(Arc::clone(&certs) as Arc<dyn ResolvesServerCert>),
                    acme_challenge: None,
                    http01: None,
                    state: Arc::clone(&certs) as _,
                    upkeep: Upkeep::Files(certs),
                })
            }
            TlsSource::Acme(settings) => {
                let cache = AcmeCache::new(settings.cache_dir.clone())
                    .with_context(|| format!("ACME cache {}", settings.cache_dir.display()))?;
                let acme = acme::start(settings, cache, Arc::clone(metrics))?;
                Ok(Self {
                    config: server_config(Arc::clone(&acme.resolver) as _),
                    // HTTP-01 when there is no TLS-ALPN-01 configuration.
                    http01: acme
                        .challenge_config
                        .is_none()
                        .then(|| Arc::clone(&acme.resolver)),
                    acme_challenge: acme.challenge_config,
                    state: acme.resolver,
                    upkeep: Upkeep::Acme(acme.driver),
                })
            }
        }
    }
}

impl Upkeep {
    /// The task's name for the supervisor.
    pub fn name(&self) -> &'static str {
        match self {
            Upkeep::Acme(_) => "acme",
            Upkeep::Files(_) => "certificate files",
        }
    }

    /// The certificate files SIGHUP reloads, if the certificate comes from files.
    pub fn files(&self) -> Option<Arc<FileCerts>> {
        match self {
            Upkeep::Files(certs) => Some(Arc::clone(certs)),
            Upkeep::Acme(_) => None,
        }
    }

    /// Keeps the certificate current until `cancel` fires.
    pub async fn run(self, metrics: Arc<Metrics>, cancel: CancellationToken) {
        match self {
            Upkeep::Acme(driver) => {
                async move {
                    tokio::select! {
                        _ = cancel.cancelled() => {}
                        () = driver => {}
                    }
                }
                .instrument(tracing::info_span!("acme"))
                .await
            }
            Upkeep::Files(certs) => certs.watch(metrics, cancel).await,
        }
    }
}
