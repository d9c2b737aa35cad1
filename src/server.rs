//! The composition root: [`Server::bind`] prepares state and binds every listener (so that
//! tests can bind port 0 and read the address), [`Server::run`] spawns every task in one place
//! under one cancellation token and drains them with a deadline.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, error, info, info_span};

use crate::admin::{self, Admin};
use crate::config::{Config, Limits, TlsSource};
use crate::http::{self, Site};
use crate::jwks::persist::create_state_dir;
use crate::jwks::refresh::{IssuerPipeline, run_source};
use crate::jwks::source::AnySource;
use crate::jwks::store::DocumentStore;
use crate::listener::{self, CloseCounters, TlsTransport, Transport};
use crate::metrics::Metrics;
use crate::supervisor::{Heartbeats, Supervisor};
use crate::systemd::{self, Activated};
use crate::tls::{self, acme, acme::Acme, cache::AcmeCache, files::FileCerts};

/// How long open connections and tasks get to finish after SIGTERM.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub struct Server {
    config: Config,
    store: Arc<DocumentStore>,
    metrics: Arc<Metrics>,
    pipelines: Vec<Arc<IssuerPipeline>>,
    /// Per issuer, its sources ready to fetch.
    sources: Vec<Vec<AnySource>>,
    http: Option<TcpListener>,
    https: Option<(TcpListener, Tls)>,
    admin: TcpListener,
}

/// The certificate side of the HTTPS listener.
#[derive(Debug)]
enum Tls {
    Files(Arc<FileCerts>),
    Acme(Acme),
}

impl Server {
    /// Restores persisted key sets (served from the first request on) and binds the listeners.
    pub async fn bind(config: Config) -> anyhow::Result<Self> {
        Self::bind_activated(config, Activated::default()).await
    }

    /// Like [`Server::bind`], with public listeners passed by the service manager.
    pub async fn bind_activated(config: Config, activated: Activated) -> anyhow::Result<Self> {
        create_state_dir(&config.state_dir)?;
        let public = usize::from(config.http.is_some()) + usize::from(config.https.is_some());
        listener::raise_open_file_limit(&config.limits, public);
        let sources: Vec<Vec<AnySource>> = config
            .issuers
            .iter()
            .map(|cfg| {
                cfg.sources
                    .iter()
                    .map(|s| AnySource::from_config(&s.kind, s.timeout))
                    .collect()
            })
            .collect::<anyhow::Result<_>>()?;
        let store = Arc::new(DocumentStore::new(config.issuers.len()));
        let metrics = Arc::new(Metrics::new());
        let mut pipelines = Vec::with_capacity(config.issuers.len());
        for (index, (cfg, fetchers)) in config.issuers.iter().zip(&sources).enumerate() {
            let pipeline =
                IssuerPipeline::restored(index, cfg, &config.state_dir, &store, &metrics, fetchers)
                    .await;
            pipelines.push(Arc::new(pipeline));
        }
        let http = match &config.http {
            Some(http) => Some(listen_or_take(activated.http, http.listen, "http.listen")?),
            None => None,
        };
        let https = match &config.https {
            Some(https) => {
                let tls = match &https.tls {
                    TlsSource::Files {
                        cert_file,
                        key_file,
                    } => {
                        let certs = FileCerts::load(cert_file, key_file)?;
                        observe_cert(&metrics, &certs);
                        Tls::Files(Arc::new(certs))
                    }
                    TlsSource::Acme(settings) => {
                        let cache =
                            AcmeCache::new(settings.cache_dir.clone()).with_context(|| {
                                format!("ACME cache {}", settings.cache_dir.display())
                            })?;
                        Tls::Acme(acme::start(settings, cache, Arc::clone(&metrics))?)
                    }
                };
                Some((
                    listen_or_take(activated.https, https.listen, "https.listen")?,
                    tls,
                ))
            }
            None => None,
        };
        let admin = listen(config.admin.listen, "admin.listen")?;
        Ok(Self {
            config,
            store,
            metrics,
            pipelines,
            sources,
            http,
            https,
            admin,
        })
    }

    /// The bound address of the plain HTTP listener.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The bound address of the HTTPS listener.
    pub fn https_addr(&self) -> Option<SocketAddr> {
        self.https.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }

    /// The bound address of the admin listener.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
            .local_addr()
            .expect("a bound listener has an address")
    }

    pub fn store(&self) -> Arc<DocumentStore> {
        Arc::clone(&self.store)
    }

    /// Serves until `shutdown` resolves, then drains within [`SHUTDOWN_GRACE`].
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let supervisor = Supervisor::default();
        let cancel = supervisor.cancel().clone();
        let heartbeats = Arc::new(Heartbeats::default());
        let (refresh_tx, refresh_rx) = watch::channel(());

        for ((pipeline, cfg), fetchers) in self
            .pipelines
            .iter()
            .zip(&self.config.issuers)
            .zip(self.sources)
        {
            for (index, (source, fetcher)) in cfg.sources.iter().zip(fetchers).enumerate() {
                let name = format!("source {index} of {}", cfg.issuer);
                // A fetch is bounded by its timeout; validation, merge and the state write
                // take milliseconds, unless a disk or a lock hangs.
                let heartbeat = heartbeats.register(name.clone(), source.timeout + REFRESH_SLACK);
                let task = run_source(
                    Arc::clone(pipeline),
                    index,
                    fetcher,
                    source.refresh_interval,
                    cancel.clone(),
                    refresh_rx.clone(),
                    heartbeat,
                );
                supervisor.spawn(name, task.instrument(info_span!("source", index)));
            }
        }

        let limits = self.config.limits;
        // The bound port, not the configured one (which may be 0).
        let https_port = match &self.https {
            Some((listener, _)) => Some(listener.local_addr()?.port()),
            None => None,
        };
        let mut file_certs = None;
        let mut http01 = None;
        let mut https_cert: Option<Arc<dyn tls::CertState>> = None;
        if let Some((listener, tls)) = self.https {
            let https = self
                .config
                .https
                .as_ref()
                .expect("an https listener has its config");
            let (resolver, acme_challenge): (Arc<dyn rustls::server::ResolvesServerCert>, _) =
                match tls {
                    Tls::Files(certs) => {
                        file_certs = Some(Arc::clone(&certs));
                        https_cert = Some(Arc::clone(&certs) as _);
                        (certs, None)
                    }
                    Tls::Acme(acme) => {
                        https_cert = Some(Arc::clone(&acme.resolver) as _);
                        if acme.challenge_config.is_none() {
                            http01 = Some(Arc::clone(&acme.resolver));
                        }
                        let stop = cancel.clone();
                        let driver = acme.driver;
                        supervisor.spawn(
                            "acme",
                            async move {
                                tokio::select! {
                                    _ = stop.cancelled() => {}
                                    () = driver => {}
                                }
                            }
                            .instrument(info_span!("acme")),
                        );
                        (acme.resolver, acme.challenge_config)
                    }
                };
            let transport = Transport::Tls(Arc::new(TlsTransport {
                config: tls::server_config(resolver),
                acme_challenge,
            }));
            let site = Site::new(&self.config.issuers, &self.metrics)
                .with_access_log(self.config.log.access);
            let router = http::router(site, Arc::clone(&self.store))
                .layer(axum::middleware::map_response(hsts_layer(https.hsts)));
            info!(listener = "https", addr = %listener.local_addr()?, "listening");
            supervisor.spawn(
                "listener https",
                listener::serve(
                    listener,
                    router,
                    transport,
                    limits,
                    CloseCounters::new("https", &self.metrics),
                    cancel.clone(),
                    SHUTDOWN_GRACE,
                ),
            );
        }
        if let Some(listener) = self.http {
            let plain = self
                .config
                .http
                .as_ref()
                .expect("an http listener has its config");
            let mut router = if plain.redirect_to_https {
                http::redirect_router(&self.config.issuers, https_port)
            } else {
                http::router(
                    Site::new(&self.config.issuers, &self.metrics)
                        .with_access_log(self.config.log.access),
                    Arc::clone(&self.store),
                )
            };
            if let Some(resolver) = http01 {
                router = http::with_http01(router, resolver);
            }
            info!(listener = "http", addr = %listener.local_addr()?, "listening");
            supervisor.spawn(
                "listener http",
                listener::serve(
                    listener,
                    router,
                    Transport::Plain,
                    limits,
                    CloseCounters::new("http", &self.metrics),
                    cancel.clone(),
                    SHUTDOWN_GRACE,
                ),
            );
        }
        if let Some(certs) = file_certs.clone() {
            supervisor.spawn(
                "certificate files",
                watch_cert_files(certs, Arc::clone(&self.metrics), cancel.clone()),
            );
        }
        let admin = Arc::new(Admin {
            pipelines: self.pipelines.clone(),
            metrics: Arc::clone(&self.metrics),
            max_staleness: self.config.admin.max_staleness,
            https: https_cert,
        });
        // L2: the admin listener gets the public listeners' deadlines and its own small cap:
        // a probe or a scrape needs a connection or two, and a container may expose it.
        info!(listener = "admin", addr = %self.admin.local_addr()?, "listening");
        supervisor.spawn(
            "listener admin",
            listener::serve(
                self.admin,
                admin::router(admin),
                Transport::Plain,
                Limits {
                    max_connections: ADMIN_MAX_CONNECTIONS,
                    ..limits
                },
                CloseCounters::new("admin", &self.metrics),
                cancel.clone(),
                SHUTDOWN_GRACE,
            ),
        );

        let mut hangup =
            signal(SignalKind::hangup()).context("cannot install the SIGHUP handler")?;
        let stop = cancel.clone();
        let metrics = Arc::clone(&self.metrics);
        supervisor.spawn("signals", async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                                        Some(()) = hangup.recv() => {
                        info!(signal = "SIGHUP", "refreshing every source now");
                        refresh_tx.send_replace(());
                        if let Some(certs) = &file_certs {
                            reload_certs(certs, &metrics, true);
                        }
                    }
                }
            }
        });

        if let Some(interval) = systemd::watchdog_interval() {
            supervisor.spawn("watchdog", watchdog(interval, heartbeats, cancel.clone()));
        }
        systemd::ready(&format!("serving {} issuer(s)", self.config.issuers.len()));

        let failed = tokio::select! {
            () = shutdown => None,
            why = supervisor.failure() => Some(why),
        };
        systemd::stopping();
        let failed_while_stopping = supervisor.stop(SHUTDOWN_GRACE).await;
        match failed.or(failed_while_stopping) {
            Some(why) => Err(anyhow::anyhow!(why)),
            None => Ok(()),
        }
    }
}

/// What a refresh may take beyond its source's fetch timeout before the watchdog stops.
const REFRESH_SLACK: Duration = Duration::from_secs(60);

/// L5: pings systemd's watchdog every `interval` while no refresh is stuck, so that a hung
/// disk or lock gets the process restarted rather than serving stale keys "alive".
async fn watchdog(interval: Duration, heartbeats: Arc<Heartbeats>, cancel: CancellationToken) {
    let mut was_stuck = Vec::new();
    loop {
        let stuck = heartbeats.stuck();
        if stuck.is_empty() {
            systemd::watchdog_ping();
        } else if stuck != was_stuck {
            error!(sources = ?stuck, "a refresh is stuck; no more watchdog pings, for systemd to restart oidc-edge");
        }
        was_stuck = stuck;
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

/// A passed socket when there is one, else a new one bound to `addr`.
fn listen_or_take(
    passed: Option<std::net::TcpListener>,
    addr: SocketAddr,
    key: &str,
) -> anyhow::Result<TcpListener> {
    match passed {
        Some(listener) => {
            listener.set_nonblocking(true)?;
            info!(key, addr = %listener.local_addr()?, "using the socket passed by the service manager");
            Ok(TcpListener::from_std(listener)?)
        }
        None => listen(addr, key),
    }
}

/// The accept queue asked for; Linux caps it at `net.core.somaxconn` (4096 since 5.4), as
/// systemd's `Backlog=` default does. tokio's 1024 overflows under a connection flood: the
/// SYNs of real clients are then dropped and retried only after 1 s, 3 s, 7 s.
const LISTEN_BACKLOG: u32 = 4096;

fn listen(addr: SocketAddr, key: &str) -> anyhow::Result<TcpListener> {
    let bind = || -> std::io::Result<TcpListener> {
        let socket = match addr {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        // As std and tokio do: a restart can bind while old connections are in TIME_WAIT.
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(LISTEN_BACKLOG)
    };
    bind().with_context(|| format!("cannot listen on {addr} ({key})"))
}

/// Open connections the admin listener holds: probes and scrapes, a few at a time.
const ADMIN_MAX_CONNECTIONS: usize = 64;

/// How often certificate files are checked for changes.
const CERT_FILE_POLL: Duration = Duration::from_secs(2);

/// Reloads the certificate files when they change, until `cancel` fires.
async fn watch_cert_files(certs: Arc<FileCerts>, metrics: Arc<Metrics>, cancel: CancellationToken) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(CERT_FILE_POLL) => reload_certs(&certs, &metrics, false),
        }
    }
}

fn reload_certs(certs: &FileCerts, metrics: &Metrics, force: bool) {
    match certs.reload(force) {
        Ok(true) => {
            observe_cert(metrics, certs);
            info!("certificate files reloaded");
        }
        Ok(false) => {}
        Err(e) => {
            error!(error = %e, "certificate files not reloaded; still serving the previous certificate")
        }
    }
}

fn observe_cert(metrics: &Metrics, certs: &FileCerts) {
    if let Some(not_after) = certs.current().cert.first().and_then(tls::not_after) {
        metrics.set_cert_not_after("https", not_after);
    }
}

/// HSTS on every HTTPS answer: once a browser has used https, it never falls back.
fn hsts_layer(
    enabled: bool,
) -> impl Fn(axum::response::Response) -> std::future::Ready<axum::response::Response>
+ Clone
+ Send
+ Sync
+ 'static {
    const HSTS: ::http::HeaderValue = ::http::HeaderValue::from_static("max-age=31536000");
    move |mut response: axum::response::Response| {
        if enabled {
            response
                .headers_mut()
                .insert(::http::header::STRICT_TRANSPORT_SECURITY, HSTS);
        }
        std::future::ready(response)
    }
}
