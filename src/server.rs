//! The composition root, in linkerd2-proxy's shape: [`Server::bind`] builds every part from
//! the configuration and binds every listener (so that tests can bind port 0 and read the
//! address); [`Server::run`] only spawns them in one place, under one cancellation token, and
//! drains them with a deadline.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{Instrument as _, info, info_span};

use crate::admin::{self, Admin};
use crate::config::Config;
use crate::config::IssuerConfig;
use crate::http::fetched_by::FetchTracker;
use crate::http::{self, PushRoute, Site, headers};
use crate::jwks::refresh::{IssuerRuntime, run_source};
use crate::jwks::source::SourceKind;
use crate::jwks::store::{DocumentStore, Snapshot};
use crate::listener::{self, PublicListener, TlsTransport, Transport};
use crate::metrics::Metrics;
use crate::publish::IssuerPublisher;
use crate::publish::bucket::Synced;
use crate::push::gate::{GateParts, PushGate};
use crate::selftest::SelfTest;
use crate::signals::{self, Hangup};
use crate::state::create_state_dir;
use crate::supervisor::{Heartbeats, Supervisor};
use crate::systemd::{self, Activated};
use crate::tls::https::{HttpsCerts, Upkeep};

/// How long open connections and tasks get to finish after SIGTERM.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// What a refresh may take beyond its source's fetch timeout before the watchdog stops.
const REFRESH_SLACK: Duration = Duration::from_secs(60);

/// Every part of a running oidc-edge, built and bound, not yet spawned.
#[derive(Debug)]
pub struct Server {
    issuers: Vec<IssuerRuntime>,
    /// HTTPS, plain HTTP and admin, as configured.
    listeners: Vec<PublicListener>,
    /// What keeps the HTTPS certificate current.
    tls_upkeep: Option<Upkeep>,
    /// Bucket targets, per issuer that has any.
    publishers: Vec<Arc<IssuerPublisher>>,
    /// Self-tests, per issuer that has `[issuers.selftest]`.
    selftests: Vec<Arc<SelfTest>>,
    store: Arc<DocumentStore>,
    metrics: Arc<Metrics>,
}

impl Server {
    /// Restores persisted key sets and binds the listeners.
    pub async fn bind(config: Config) -> anyhow::Result<Self> {
        Self::bind_activated(config, Activated::default()).await
    }

    /// Like [`Server::bind`], with public listeners passed by the service manager.
    pub async fn bind_activated(config: Config, activated: Activated) -> anyhow::Result<Self> {
        create_state_dir(&config.state_dir)?;
        let public = usize::from(config.http.is_some()) + usize::from(config.https.is_some());
        listener::raise_open_file_limit(&config.limits, public);
        let store = Arc::new(DocumentStore::new(config.issuers.len()));
        let metrics = Arc::new(Metrics::new());
        let mut issuers = Vec::with_capacity(config.issuers.len());
        for (index, cfg) in config.issuers.iter().enumerate() {
            let issuer = IssuerRuntime::restored(
                index,
                &cfg.endpoint,
                cfg.keys,
                &cfg.sources,
                &config.state_dir,
                &store,
                &metrics,
            );
            issuers.push(issuer.await?);
        }
        let publishers = publishers(&config, &metrics)?;
        let selftests = config
            .issuers
            .iter()
            .filter_map(|cfg| {
                let test = cfg.selftest.as_ref()?;
                let issuer = cfg.endpoint.issuer.as_str();
                Some(SelfTest::new(issuer, test, &cfg.sources, &metrics).map(Arc::new))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let pushes = push_gates(&config, &issuers, &store, &metrics);
        let push_routes: Vec<PushRoute> = pushes
            .iter()
            .zip(config.issuers.iter().filter(|cfg| has_push_source(cfg)))
            .map(|(gate, cfg)| PushRoute {
                host: cfg.endpoint.issuer.host().into(),
                path: cfg.endpoint.issuer.push_path().into(),
                gate: Arc::clone(gate),
            })
            .collect();
        let endpoints = config.endpoints();
        // One tracker for every public listener: a relying party's fetch is the same record
        // whether it came over HTTPS or through a proxy to the plain listener.
        let fetches = Arc::new(FetchTracker::new(
            &config.relying_parties,
            config.issuers.len(),
        ));
        let site = || {
            Site::new(&endpoints, &metrics)
                .with_access_log(config.log.access)
                .with_fetch_tracker(Arc::clone(&fetches))
        };
        let public = |name, listener, router, transport| PublicListener {
            name,
            listener,
            router,
            transport,
            limits: config.limits,
        };

        // Bound in this order (http, https, admin), so that a taken port is reported as before.
        let http = match &config.http {
            Some(cfg) => Some((
                cfg,
                listener::listen_or_take(activated.http, cfg.listen, "http.listen")?,
            )),
            None => None,
        };
        let https = match &config.https {
            Some(cfg) => Some((
                cfg,
                HttpsCerts::start(&cfg.tls, &metrics)?,
                listener::listen_or_take(activated.https, cfg.listen, "https.listen")?,
            )),
            None => None,
        };
        // The bound port, not the configured one (which may be 0), for redirects.
        let https_port = https.as_ref().map(|(_, _, l)| l.local_addr()).transpose()?;
        let http01 = https
            .as_ref()
            .and_then(|(_, certs, _)| certs.http01.clone());

        let mut listeners = Vec::new();
        let (tls_upkeep, cert_state) = match https {
            Some((cfg, certs, listener)) => {
                let site = site().with_pushes(push_routes.clone());
                let mut router = http::router(site, Arc::clone(&store));
                if cfg.hsts {
                    router = headers::with_hsts(router);
                }
                let transport = Transport::Tls(Arc::new(TlsTransport {
                    config: certs.config,
                    acme_challenge: certs.acme_challenge,
                }));
                listeners.push(public("https", listener, router, transport));
                (Some(certs.upkeep), Some(certs.state))
            }
            None => (None, None),
        };
        if let Some((cfg, listener)) = http {
            let mut router = if cfg.redirect_to_https {
                http::redirect_router(&endpoints, https_port.map(|a| a.port()))
            } else if https_port.is_some() {
                // Issue 18: with HTTPS there, pushes are not offered in plain text, where a
                // bearer token could be read and replayed on the way.
                http::router(site(), Arc::clone(&store))
            } else {
                // Plain only: TLS ends at a reverse proxy in front.
                http::router(site().with_pushes(push_routes), Arc::clone(&store))
            };
            if let Some(resolver) = http01 {
                router = http::with_http01(router, resolver);
            }
            listeners.push(public("http", listener, router, Transport::Plain));
        }
        let admin = Admin {
            pipelines: issuers.iter().map(|i| Arc::clone(&i.pipeline)).collect(),
            metrics: Arc::clone(&metrics),
            max_staleness: config.admin.max_staleness,
            https: cert_state,
            publishers: publishers.clone(),
            selftests: selftests.clone(),
            pushes,
            fetches: Arc::clone(&fetches),
        };
        let admin_listener = listener::listen(config.admin.listen, "admin.listen")?;
        listeners.push(admin::listener(admin_listener, admin, config.limits));
        Ok(Self {
            issuers,
            listeners,
            tls_upkeep,
            publishers,
            selftests,
            store,
            metrics,
        })
    }

    fn addr(&self, name: &str) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|l| l.name == name)
            .map(PublicListener::local_addr)
    }

    /// The bound address of the plain HTTP listener.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.addr("http")
    }

    /// The bound address of the HTTPS listener.
    pub fn https_addr(&self) -> Option<SocketAddr> {
        self.addr("https")
    }

    /// The bound address of the admin listener.
    pub fn admin_addr(&self) -> SocketAddr {
        self.addr("admin")
            .expect("the admin listener is always bound")
    }

    /// Serves until `shutdown` resolves, then drains within [`SHUTDOWN_GRACE`].
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let supervisor = Supervisor::default();
        let cancel = supervisor.cancel().clone();
        let heartbeats = Arc::new(Heartbeats::default());
        let (refresh_now, refresh_rx) = watch::channel(());
        let hangup = Hangup {
            refresh_now,
            certs: self.tls_upkeep.as_ref().and_then(Upkeep::files),
            metrics: Arc::clone(&self.metrics),
        };
        supervisor.spawn("signals", hangup.install(cancel.clone())?);

        let issuer_count = self.issuers.len();
        for issuer in self.issuers {
            for (index, source) in issuer.sources.into_iter().enumerate() {
                let name = format!("source {index} of {}", issuer.pipeline.issuer());
                // A fetch is bounded by its timeout; validation, merge and the state write
                // take milliseconds, unless a disk or a lock hangs.
                let heartbeat = heartbeats.register(name.clone(), source.timeout + REFRESH_SLACK);
                let task = run_source(
                    Arc::clone(&issuer.pipeline),
                    index,
                    source.fetcher,
                    source.interval,
                    cancel.clone(),
                    refresh_rx.clone(),
                    heartbeat,
                );
                supervisor.spawn(name, task.instrument(info_span!("source", index)));
            }
        }
        for publisher in self.publishers {
            let name = format!("publisher of {}", publisher.issuer());
            supervisor.spawn(name, publisher.run(Arc::clone(&self.store), cancel.clone()));
        }
        for selftest in self.selftests {
            let name = format!("self-test of {}", selftest.issuer());
            supervisor.spawn(name, selftest.run(cancel.clone()));
        }
        if let Some(upkeep) = self.tls_upkeep {
            let name = upkeep.name();
            supervisor.spawn(name, upkeep.run(Arc::clone(&self.metrics), cancel.clone()));
        }
        for listener in self.listeners {
            info!(listener = listener.name, addr = %listener.local_addr(), "listening");
            let (metrics, stop) = (Arc::clone(&self.metrics), cancel.clone());
            let name = format!("listener {}", listener.name);
            supervisor.spawn(name, async move {
                listener.serve(&metrics, stop, SHUTDOWN_GRACE).await;
            });
        }
        if let Some(interval) = systemd::watchdog_interval() {
            let watchdog = signals::watchdog(interval, heartbeats, cancel.clone());
            supervisor.spawn("watchdog", watchdog);
        }
        systemd::ready(&format!("serving {issuer_count} issuer(s)"));

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

/// Every issuer's bucket targets, opened (credentials resolved), and the edges it pushes to,
/// for the issuers that have any: one publisher per issuer and kind, each with its heartbeat.
fn publishers(
    config: &Config,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<Vec<Arc<IssuerPublisher>>> {
    let mut publishers = Vec::new();
    for (index, cfg) in config.issuers.iter().enumerate() {
        if !cfg.publish.is_empty() {
            let publisher = IssuerPublisher::open(index, &cfg.endpoint, &cfg.publish, metrics)?;
            publishers.push(Arc::new(publisher));
        }
        if !cfg.push.is_empty() {
            let pusher = IssuerPublisher::open_edges(index, &cfg.endpoint, &cfg.push, metrics)?;
            publishers.push(Arc::new(pusher));
        }
    }
    Ok(publishers)
}

/// `publish --once` and `push --once`: every issuer's sources fetched once through `serve`'s
/// pipeline (restored from and saved to `[state] dir`, as `render` does), then every target
/// (bucket or edge) brought in step. Returns each target's result; an issuer whose refresh
/// fails writes nothing anywhere.
pub async fn publish_once(
    config: &Config,
) -> anyhow::Result<Vec<(String, anyhow::Result<Synced>)>> {
    create_state_dir(&config.state_dir)?;
    let store = Arc::new(DocumentStore::new(config.issuers.len()));
    let metrics = Arc::new(Metrics::new());
    let publishers = publishers(config, &metrics)?;
    let mut results = Vec::new();
    let mut refreshed: Vec<Option<Arc<Snapshot>>> = vec![None; config.issuers.len()];
    for publisher in publishers {
        let index = publisher.index();
        let cfg = &config.issuers[index];
        // An issuer with buckets and edges is refreshed once, for both.
        let snapshot = match &refreshed[index] {
            Some(snapshot) => Arc::clone(snapshot),
            None => {
                let snapshot = IssuerRuntime::refreshed_snapshot(
                    index,
                    &cfg.endpoint,
                    cfg.keys,
                    &cfg.sources,
                    &config.state_dir,
                    &store,
                    &metrics,
                )
                .await?;
                refreshed[index] = Some(Arc::clone(&snapshot));
                snapshot
            }
        };
        let tos = publisher.statuses().into_iter().map(|t| t.to);
        results.extend(tos.zip(publisher.publish(&snapshot).await));
    }
    Ok(results)
}

fn has_push_source(cfg: &IssuerConfig) -> bool {
    cfg.sources
        .iter()
        .any(|s| matches!(s.kind, SourceKind::Push(_)))
}

/// The push endpoint of every issuer with a push source, in issuer order.
fn push_gates(
    config: &Config,
    issuers: &[IssuerRuntime],
    store: &Arc<DocumentStore>,
    metrics: &Arc<Metrics>,
) -> Vec<Arc<PushGate>> {
    config
        .issuers
        .iter()
        .zip(issuers)
        .enumerate()
        .filter_map(|(index, (cfg, runtime))| {
            let (source, policy) =
                cfg.sources
                    .iter()
                    .enumerate()
                    .find_map(|(i, s)| match &s.kind {
                        SourceKind::Push(policy) => Some((i, policy.clone())),
                        _ => None,
                    })?;
            let issuer = &cfg.endpoint.issuer;
            Some(Arc::new(PushGate::new(GateParts {
                index,
                source,
                url: issuer.url_for(&issuer.push_path()),
                policy,
                config_path: config.file.display().to_string(),
                pipeline: Arc::clone(&runtime.pipeline),
                store: Arc::clone(store),
                metrics: Arc::clone(metrics),
            })))
        })
        .collect()
}
