//! `[https.acme]`: certificates from Let's Encrypt or any RFC 8555 directory, by rustls-acme.
//!
//! rustls-acme spawns nothing: its state is a stream that orders, renews and hot-swaps the
//! certificate while it is polled. [`Acme::driver`] is that polling, returned to the server so
//! that every task is spawned in one place.
//!
//! Renewal follows the certificate's own lifetime: after deploying a certificate, rustls-acme
//! 0.15.4 sleeps until `not_after - (not_after - not_before) / 3`, i.e. 2/3 of the lifetime
//! (`state.rs`, `process_cert`). That is 30 days before expiry for today's 90-day Let's Encrypt
//! certificates, and stays proportionate when the lifetime drops to 64 days (Feb 2027) and 45
//! days (2028): nothing here assumes 90 days.
//!
//! M1 (review-reliability): rustls-acme's HTTP client has no timeout, so one request that never
//! completes used to freeze issuance and renewal for good. Here every step of the stream is
//! bounded by `https.acme.step_timeout` (plus the legitimate sleep until renewal), and a step
//! that times out or fails drops the whole `AcmeState` and builds a new one after our own
//! backoff, capped at [`MAX_BACKOFF`] (rustls-acme's own cap is 2^16 s, about 18 h, and cannot
//! be configured). The listeners never see a rebuild: they resolve through one stable
//! [`AcmeResolver`], which keeps serving the current certificate and forwards only challenge
//! handshakes to the state of the moment.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::{ArcSwap, ArcSwapOption};
use futures_util::StreamExt as _;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_acme::{
    AcmeConfig, AcmeState, EventError, EventOk, ResolvesServerCertAcme, UseChallenge,
};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tracing::{info, warn};

use super::cache::AcmeCache;
use super::{AcmeSettings, Challenge};
use crate::metrics::Metrics;

/// The longest wait between two attempts after failures (M1: rustls-acme waits up to 18 h).
pub const MAX_BACKOFF: Duration = Duration::from_secs(3600);

/// The parts of ACME the listeners need, and the driver that keeps the certificate current.
pub struct Acme {
    pub resolver: Arc<AcmeResolver>,
    /// Answers TLS-ALPN-01 validation handshakes (`None` with HTTP-01).
    pub challenge_config: Option<Arc<ServerConfig>>,
    pub driver: Pin<Box<dyn Future<Output = ()> + Send>>,
}

impl std::fmt::Debug for Acme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acme").finish_non_exhaustive()
    }
}

/// The certificate being served, and what renewal timing needs to know about it.
#[derive(Debug)]
struct Served {
    pem: Vec<u8>,
    key: Arc<CertifiedKey>,
    not_before: SystemTime,
    not_after: SystemTime,
}

/// The one resolver the listeners hold, for the life of the process (M1). Ordinary handshakes
/// get the certificate last deployed by any `AcmeState`; TLS-ALPN-01 and HTTP-01 challenges
/// go to the current state, the only one that can have an order in flight.
#[derive(Debug)]
pub struct AcmeResolver {
    state: ArcSwap<ResolvesServerCertAcme>,
    served: ArcSwapOption<Served>,
    /// Why the last attempt failed, until a new certificate is deployed (L4: `/readyz`).
    last_error: ArcSwapOption<String>,
}

impl AcmeResolver {
    fn new(state: Arc<ResolvesServerCertAcme>) -> Self {
        Self {
            state: ArcSwap::new(state),
            served: ArcSwapOption::empty(),
            last_error: ArcSwapOption::empty(),
        }
    }

    /// The key authorization of a pending HTTP-01 challenge for `token`.
    pub fn http01_key_auth(&self, token: &str) -> Option<String> {
        self.state.load().get_http_01_key_auth(token)
    }

    /// When the served certificate expires; `None` before the first one.
    pub fn not_after(&self) -> Option<SystemTime> {
        self.served.load().as_ref().map(|s| s.not_after)
    }

    /// How long rustls-acme legitimately sleeps before renewing the served certificate: until
    /// 2/3 of its lifetime, as in its `process_cert`. Zero when there is none or it is due.
    fn until_renewal(&self, now: SystemTime) -> Duration {
        let Some(served) = self.served.load_full() else {
            return Duration::ZERO;
        };
        let lifetime = served
            .not_after
            .duration_since(served.not_before)
            .unwrap_or_default();
        let renew_at = served.not_after - lifetime / 3;
        renew_at.duration_since(now).unwrap_or_default()
    }

    /// Serves `pem` (the cache's format: the private key, then the chain) unless it is the
    /// certificate served already. `Some(not_after)` when it was swapped in.
    fn deploy(&self, pem: &[u8]) -> Result<Option<SystemTime>, String> {
        if self.served.load().as_ref().is_some_and(|s| s.pem == pem) {
            return Ok(None);
        }
        let served = parse(pem)?;
        let not_after = served.not_after;
        self.served.store(Some(Arc::new(served)));
        Ok(Some(not_after))
    }
}

impl super::CertState for AcmeResolver {
    fn not_after(&self) -> Option<SystemTime> {
        AcmeResolver::not_after(self)
    }

    fn last_acme_error(&self) -> Option<String> {
        self.last_error.load().as_deref().cloned()
    }
}

impl ResolvesServerCert for AcmeResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        if rustls_acme::is_tls_alpn_challenge(&hello) {
            return self.state.load().resolve(hello);
        }
        self.served.load().as_ref().map(|s| Arc::clone(&s.key))
    }
}

/// The cache's certificate format, read as rustls-acme reads it (`parse_cert`): a PKCS#8 ECDSA
/// key, then at least one certificate, leaf first.
fn parse(pem: &[u8]) -> Result<Served, String> {
    let key = PrivateKeyDer::from_pem_slice(pem).map_err(|e| format!("private key: {e}"))?;
    let chain = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("certificate chain: {e}"))?;
    let leaf = chain.first().ok_or("no certificate")?;
    let (_, parsed) =
        x509_parser::parse_x509_certificate(leaf.as_ref()).map_err(|e| format!("leaf: {e}"))?;
    let at = |t: x509_parser::time::ASN1Time| {
        SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(t.timestamp()).unwrap_or(0))
    };
    let (not_before, not_after) = (
        at(parsed.validity().not_before),
        at(parsed.validity().not_after),
    );
    let signing = rustls::crypto::aws_lc_rs::sign::any_ecdsa_type(&key)
        .map_err(|e| format!("private key: {e}"))?;
    Ok(Served {
        pem: pem.to_owned(),
        key: Arc::new(CertifiedKey::new(chain, signing)),
        not_before,
        not_after,
    })
}

/// Builds one `AcmeState`; called again for every rebuild.
type MakeState = Box<dyn Fn() -> AcmeState<io::Error> + Send + Sync>;

/// Sets ACME up; the driver must be polled for a certificate to appear.
pub fn start(
    settings: &AcmeSettings,
    cache: AcmeCache,
    metrics: Arc<Metrics>,
) -> anyhow::Result<Acme> {
    let client = match &settings.directory_ca_file {
        Some(ca_file) => {
            // A private directory (Pebble in tests, a corporate ACME server): trust only its CA.
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(ca_file)? {
                roots.add(cert?)?;
            }
            Some(Arc::new(
                ClientConfig::builder()
                    .with_root_certificates(roots)
                    .with_no_client_auth(),
            ))
        }
        None => None,
    };
    let make_state: MakeState = {
        let settings = settings.clone();
        let cache = cache.clone();
        Box::new(move || {
            let config = match &client {
                Some(client) => {
                    AcmeConfig::new_with_client_config(&settings.domains, Arc::clone(client))
                }
                None => AcmeConfig::new(&settings.domains),
            };
            config
                .contact(&settings.contact)
                // Explicit: rustls-acme's default is Let's Encrypt *staging* (gotcha 5).
                .directory(&settings.directory)
                .challenge_type(match settings.challenge {
                    Challenge::TlsAlpn01 => UseChallenge::TlsAlpn01,
                    Challenge::Http01 => UseChallenge::Http01,
                })
                .cache(cache.clone())
                .state()
        })
    };
    let state = make_state();
    let resolver = Arc::new(AcmeResolver::new(state.resolver()));
    let challenge_config = (settings.challenge == Challenge::TlsAlpn01)
        .then(|| challenge_config(Arc::clone(&resolver)))
        .transpose()?;
    let driver = Driver {
        make_state,
        resolver: Arc::clone(&resolver),
        cache,
        metrics,
        step_timeout: settings.step_timeout,
        domains: settings.domains.join(","),
    };
    Ok(Acme {
        resolver,
        challenge_config,
        driver: Box::pin(driver.run(state)),
    })
}

/// What rustls-acme's `challenge_rustls_config` builds, on the stable resolver.
fn challenge_config(resolver: Arc<AcmeResolver>) -> anyhow::Result<Arc<ServerConfig>> {
    let mut config = ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_cert_resolver(resolver);
    config.alpn_protocols = vec![rustls_acme::acme::ACME_TLS_ALPN_NAME.to_vec()];
    Ok(Arc::new(config))
}

/// The wait before attempt `failures + 1`: 1 s, 2 s, 4 s … up to [`MAX_BACKOFF`].
pub fn backoff(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.min(12)).min(MAX_BACKOFF)
}

struct Driver {
    make_state: MakeState,
    resolver: Arc<AcmeResolver>,
    cache: AcmeCache,
    metrics: Arc<Metrics>,
    step_timeout: Duration,
    domains: String,
}

impl Driver {
    async fn run(self, mut state: AcmeState<io::Error>) {
        let mut failures = 0u32;
        let mut write_failures = 0u32;
        loop {
            self.until_failure(&mut state, &mut failures, &mut write_failures)
                .await;
            let delay = backoff(failures);
            failures = failures.saturating_add(1);
            tokio::time::sleep(delay).await;
            // A new state: its own order, no rustls-acme backoff. It loads the cached
            // certificate again, which is the one served (or a newer one).
            state = (self.make_state)();
            self.resolver.state.store(state.resolver());
        }
    }

    /// Polls `state` until a step fails in a way that needs a new state.
    async fn until_failure(
        &self,
        state: &mut AcmeState<io::Error>,
        failures: &mut u32,
        write_failures: &mut u32,
    ) {
        loop {
            // A step may include rustls-acme's sleep until renewal: allow that, plus the bound.
            let limit = self.step_timeout + self.resolver.until_renewal(SystemTime::now());
            let deadline = tokio::time::Instant::now() + limit;
            // S6: failed cache writes are retried while the state sleeps or orders. Dropping
            // `next()` loses nothing: an AcmeState keeps its progress in itself.
            let step = loop {
                tokio::select! {
                    step = tokio::time::timeout_at(deadline, state.next()) => break step,
                    () = tokio::time::sleep(backoff(*write_failures)), if self.cache.has_pending() => {
                        self.retry_cache_writes(write_failures).await;
                    }
                }
            };
            self.adopt_cached_cert();
            match step {
                Ok(Some(Ok(ok))) => {
                    let name = match ok {
                        EventOk::DeployedCachedCert => "deployed_cached_cert",
                        EventOk::DeployedNewCert => {
                            *failures = 0;
                            self.resolver.last_error.store(None);
                            "deployed_new_cert"
                        }
                        EventOk::CertCacheStore => "cert_cache_store",
                        EventOk::AccountCacheStore => "account_cache_store",
                    };
                    self.metrics.count_acme_event(name);
                    info!(event = name, domains = %self.domains, "acme");
                }
                Ok(Some(Err(e))) => {
                    self.metrics.count_acme_event("error");
                    self.resolver
                        .last_error
                        .store(Some(Arc::new(e.to_string())));
                    match e {
                        // The state goes on: the certificate is deployed (or, for a cached
                        // one that does not parse, a new order follows).
                        // S6: not "retrying with backoff" (rustls-acme never retries a
                        // store); the driver retries the write itself.
                        EventError::CertCacheStore(_) => {
                            *write_failures = 0;
                            warn!(
                                error = %e, domains = %self.domains, retry_in = ?backoff(0),
                                "acme certificate deployed but not cached; the write is retried \
                                 (a restart before it succeeds orders a new certificate)"
                            );
                        }
                        EventError::AccountCacheStore(_) => {
                            *write_failures = 0;
                            warn!(
                                error = %e, domains = %self.domains, retry_in = ?backoff(0),
                                "acme account key not cached; the write is retried"
                            );
                        }
                        EventError::CachedCertParse(_) => {
                            warn!(
                                error = %e, domains = %self.domains,
                                "acme cached certificate unusable; ordering a new one"
                            );
                        }
                        _ => {
                            warn!(
                                error = %e, domains = %self.domains, retry_in = ?backoff(*failures),
                                "acme failed; a new attempt follows"
                            );
                            return;
                        }
                    }
                }
                // Never: an AcmeState is an endless stream.
                Ok(None) => return,
                Err(_) => {
                    self.metrics.count_acme_event("timeout");
                    self.resolver.last_error.store(Some(Arc::new(format!(
                        "no answer within {}, https.acme.step_timeout",
                        humantime::format_duration(self.step_timeout)
                    ))));
                    warn!(
                        step_timeout = ?self.step_timeout, domains = %self.domains,
                        retry_in = ?backoff(*failures),
                        "acme step timed out (no answer from the ACME server); a new attempt follows"
                    );
                    return;
                }
            }
        }
    }

    async fn retry_cache_writes(&self, write_failures: &mut u32) {
        match self.cache.retry_pending().await {
            Ok(stored) => {
                *write_failures = 0;
                for kind in stored {
                    self.metrics.count_acme_event(match kind {
                        "certificate" => "cert_cache_store",
                        _ => "account_cache_store",
                    });
                    info!(kind, domains = %self.domains, "acme certificate cache write retried: stored");
                }
            }
            Err(e) => {
                *write_failures = write_failures.saturating_add(1);
                warn!(
                    error = %e, domains = %self.domains, retry_in = ?backoff(*write_failures),
                    "acme cache write failed again"
                );
            }
        }
    }

    /// Serves the certificate the cache last loaded or stored, when it is a new one: after a
    /// cache load (`DeployedCachedCert`) or the store that follows `DeployedNewCert`.
    fn adopt_cached_cert(&self) {
        let Some(pem) = self.cache.latest_cert() else {
            return;
        };
        match self.resolver.deploy(&pem) {
            Ok(Some(not_after)) => self.metrics.set_cert_not_after("https", not_after),
            Ok(None) => {}
            Err(e) => warn!(error = %e, "acme certificate not served: it does not parse"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_an_hour() {
        let waits: Vec<u64> = (0..14).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(
            waits,
            [
                1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 3600, 3600
            ]
        );
        assert_eq!(backoff(u32::MAX), MAX_BACKOFF);
    }
}
