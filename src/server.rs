//! The composition root: [`Server::bind`] prepares state and binds every listener (so that
//! tests can bind port 0 and read the address), [`Server::run`] spawns every task in one place
//! under one cancellation token and drains them with a deadline.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument as _, info, info_span, warn};

use crate::admin::{self, Admin};
use crate::config::{Config, SourceKind};
use crate::http::{self, Site};
use crate::jwks::persist::{StateFile, create_state_dir};
use crate::jwks::refresh::{IssuerPipeline, run_source};
use crate::jwks::remote::RemoteSource;
use crate::jwks::source::{AnySource, FileSource, KeySource as _};
use crate::jwks::store::DocumentStore;
use crate::metrics::Metrics;

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
    admin: TcpListener,
}

impl Server {
    /// Restores persisted key sets (served from the first request on) and binds the listeners.
    pub async fn bind(config: Config) -> anyhow::Result<Self> {
        create_state_dir(&config.state_dir)?;
        let sources: Vec<Vec<AnySource>> = config
            .issuers
            .iter()
            .map(|cfg| {
                cfg.sources
                    .iter()
                    .map(|s| key_source(&s.kind, s.timeout))
                    .collect()
            })
            .collect::<anyhow::Result<_>>()?;
        let store = Arc::new(DocumentStore::new(config.issuers.len()));
        let metrics = Arc::new(Metrics::new());
        let mut pipelines = Vec::with_capacity(config.issuers.len());
        for (index, (cfg, fetchers)) in config.issuers.iter().zip(&sources).enumerate() {
            let state_file = StateFile::new(&config.state_dir, cfg.issuer.as_str());
            let names = fetchers.iter().map(|f| f.describe()).collect();
            let pipeline = IssuerPipeline::new(
                index,
                cfg.clone(),
                Arc::clone(&store),
                state_file,
                Arc::clone(&metrics),
                names,
            );
            pipeline.restore().await;
            pipelines.push(Arc::new(pipeline));
        }
        let http = match &config.http {
            Some(http) => Some(listen(http.listen, "http.listen").await?),
            None => None,
        };
        let admin = listen(config.admin.listen, "admin.listen").await?;
        Ok(Self {
            config,
            store,
            metrics,
            pipelines,
            sources,
            http,
            admin,
        })
    }

    /// The bound address of the plain HTTP listener.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn store(&self) -> Arc<DocumentStore> {
        Arc::clone(&self.store)
    }

    /// Serves until `shutdown` resolves, then drains within [`SHUTDOWN_GRACE`].
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let (refresh_tx, refresh_rx) = watch::channel(());

        for ((pipeline, cfg), fetchers) in self
            .pipelines
            .iter()
            .zip(&self.config.issuers)
            .zip(self.sources)
        {
            for (index, (source, fetcher)) in cfg.sources.iter().zip(fetchers).enumerate() {
                let task = run_source(
                    Arc::clone(pipeline),
                    index,
                    fetcher,
                    source.refresh_interval,
                    cancel.clone(),
                    refresh_rx.clone(),
                );
                tracker.spawn(task.instrument(info_span!("source", index)));
            }
        }

        if let Some(listener) = self.http {
            let site = Site::new(&self.config.issuers, &self.metrics);
            let router = http::router(site, Arc::clone(&self.store));
            tracker.spawn(serve("http", listener, router, cancel.clone())?);
        }
        let admin = Arc::new(Admin {
            pipelines: self.pipelines.clone(),
            metrics: Arc::clone(&self.metrics),
            max_staleness: self.config.admin.max_staleness,
        });
        tracker.spawn(serve(
            "admin",
            self.admin,
            admin::router(admin),
            cancel.clone(),
        )?);

        let mut hangup =
            signal(SignalKind::hangup()).context("cannot install the SIGHUP handler")?;
        let stop = cancel.clone();
        tracker.spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    Some(()) = hangup.recv() => {
                        info!(signal = "SIGHUP", "refreshing every source now");
                        refresh_tx.send_replace(());
                    }
                }
            }
        });

        shutdown.await;
        cancel.cancel();
        tracker.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
            .await
            .is_err()
        {
            warn!(grace = ?SHUTDOWN_GRACE, "tasks still running at the end of the grace period");
        }
        Ok(())
    }
}

async fn listen(addr: SocketAddr, key: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} ({key})"))
}

/// One listener's serve loop, stopping gracefully on `cancel`.
fn serve(
    name: &'static str,
    listener: TcpListener,
    router: Router,
    cancel: CancellationToken,
) -> anyhow::Result<impl Future<Output = ()>> {
    let addr = listener.local_addr()?;
    info!(listener = name, %addr, "listening");
    Ok(async move {
        let served = axum::serve(listener, router)
            .with_graceful_shutdown(cancel.cancelled_owned())
            .await;
        if let Err(e) = served {
            warn!(listener = name, error = %e, "listener stopped");
        }
    }
    .instrument(info_span!("listener", name)))
}

/// Builds the fetcher of one configured source.
fn key_source(kind: &SourceKind, timeout: Duration) -> anyhow::Result<AnySource> {
    Ok(match kind {
        SourceKind::File { path } => AnySource::File(FileSource::new(path.clone())),
        SourceKind::Apiserver(api) => AnySource::Remote(RemoteSource::apiserver(api, timeout)?),
        SourceKind::Url { url, ca_file } => {
            AnySource::Remote(RemoteSource::url(url, ca_file.as_ref(), timeout)?)
        }
    })
}
