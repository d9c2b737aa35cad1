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
use tokio_util::task::TaskTracker;
use tracing::{Instrument as _, info, info_span, warn};

use crate::config::{Config, SourceKind};
use crate::http::{self, Site};
use crate::jwks::persist::{StateFile, create_state_dir};
use crate::jwks::refresh::{IssuerPipeline, run_source};
use crate::jwks::remote::RemoteSource;
use crate::jwks::source::{AnySource, FileSource};
use crate::jwks::store::DocumentStore;

/// How long open connections and tasks get to finish after SIGTERM.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub struct Server {
    config: Config,
    store: Arc<DocumentStore>,
    pipelines: Vec<Arc<IssuerPipeline>>,
    /// Per issuer, its sources ready to fetch.
    sources: Vec<Vec<AnySource>>,
    http: Option<TcpListener>,
}

impl Server {
    /// Restores persisted key sets (served from the first request on) and binds the listeners.
    pub async fn bind(config: Config) -> anyhow::Result<Self> {
        create_state_dir(&config.state_dir)?;
        let store = Arc::new(DocumentStore::new(config.issuers.len()));
        let mut pipelines = Vec::with_capacity(config.issuers.len());
        for (index, cfg) in config.issuers.iter().enumerate() {
            let state_file = StateFile::new(&config.state_dir, cfg.issuer.as_str());
            let pipeline = IssuerPipeline::new(index, cfg.clone(), Arc::clone(&store), state_file);
            pipeline.restore().await;
            pipelines.push(Arc::new(pipeline));
        }
        let sources = config
            .issuers
            .iter()
            .map(|cfg| {
                cfg.sources
                    .iter()
                    .map(|s| key_source(&s.kind, s.timeout))
                    .collect()
            })
            .collect::<anyhow::Result<_>>()?;
        let http = match &config.http {
            Some(http) => Some(
                TcpListener::bind(http.listen)
                    .await
                    .with_context(|| format!("cannot listen on {} (http.listen)", http.listen))?,
            ),
            None => None,
        };
        Ok(Self {
            config,
            store,
            pipelines,
            sources,
            http,
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
                let span = info_span!("source", index);
                let task = run_source(
                    Arc::clone(pipeline),
                    index,
                    fetcher,
                    source.refresh_interval,
                    cancel.clone(),
                    refresh_rx.clone(),
                );
                tracker.spawn(task.instrument(span));
            }
        }

        if let Some(listener) = self.http {
            let addr = listener.local_addr()?;
            info!(listener = "http", %addr, "listening");
            let router = http::router(Site::new(&self.config.issuers), Arc::clone(&self.store));
            let stop = cancel.clone();
            tracker.spawn(
                async move {
                    let served = axum::serve(listener, router)
                        .with_graceful_shutdown(stop.cancelled_owned())
                        .await;
                    if let Err(e) = served {
                        warn!(error = %e, "http listener stopped");
                    }
                }
                .instrument(info_span!("http")),
            );
        }

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
