//! One issuer ready to run: its pipeline, restored from the state file and published, and its
//! sources with their schedules. `serve` spawns a task per source; `render` drives each once.
//! Both start an issuer here, so that they serve the same bytes.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::IssuerPipeline;
use crate::issuer::endpoint::IssuerEndpoint;
use crate::jwks::merge::KeyPolicy;
use crate::jwks::source::{AnySource, SourceConfig};
use crate::jwks::store::{DocumentStore, Snapshot};
use crate::metrics::Metrics;

/// One issuer: its pipeline, and the sources that feed it.
#[derive(Debug)]
pub struct IssuerRuntime {
    pub pipeline: Arc<IssuerPipeline>,
    pub sources: Vec<Source>,
}

/// One source, ready to fetch, and its schedule.
#[derive(Debug)]
pub struct Source {
    pub fetcher: AnySource,
    pub interval: Duration,
    pub timeout: Duration,
}

impl IssuerRuntime {
    /// Issuer `index` restored from `state_dir`, every source fetched once and the ledger
    /// saved ([`IssuerRuntime::refresh_once`]): the snapshot it now publishes. How `render` and
    /// `publish --once` get what they write.
    pub async fn refreshed_snapshot(
        index: usize,
        endpoint: &IssuerEndpoint,
        keys: KeyPolicy,
        sources: &[SourceConfig],
        state_dir: &Path,
        store: &Arc<DocumentStore>,
        metrics: &Arc<Metrics>,
    ) -> anyhow::Result<Arc<Snapshot>> {
        Self::restored(index, endpoint, keys, sources, state_dir, store, metrics)
            .await?
            .refresh_once()
            .await?;
        store
            .get(index)
            .ok_or_else(|| anyhow::anyhow!("{}: no key set to publish", endpoint.issuer))
    }

    /// Fetches every source once and saves the ledger: `serve`'s pipeline driven once, as
    /// `render` and `publish --once` do. A failing source, a refused set or merge, or a state
    /// file that cannot be written fails it (without the file, the next run would lose
    /// rotation grace); what is already published elsewhere stays the last good.
    pub async fn refresh_once(self) -> anyhow::Result<Arc<IssuerPipeline>> {
        let Self { pipeline, sources } = self;
        for (i, mut source) in sources.into_iter().enumerate() {
            if !pipeline.refresh(i, &mut source.fetcher).await {
                let status = pipeline.status().await;
                let source = &status.sources[i];
                let reason = source.last_error.as_deref().unwrap_or("nothing fetched");
                anyhow::bail!("{}: {}: {reason}", pipeline.issuer(), source.source);
            }
        }
        if !pipeline.persisted().await {
            anyhow::bail!(
                "{}: could not save the key set to {}; without it the next run loses rotation grace",
                pipeline.issuer(),
                pipeline.state_path().display()
            );
        }
        Ok(pipeline)
    }

    /// Builds the fetchers, and the pipeline with its persisted set restored and published
    /// (served from the first request on).
    pub async fn restored(
        index: usize,
        endpoint: &IssuerEndpoint,
        keys: KeyPolicy,
        sources: &[SourceConfig],
        state_dir: &Path,
        store: &Arc<DocumentStore>,
        metrics: &Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        let fetchers = sources
            .iter()
            .map(|s| AnySource::from_config(&s.kind, s.timeout))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let pipeline =
            IssuerPipeline::restored(index, endpoint, keys, state_dir, store, metrics, &fetchers)
                .await;
        let sources = fetchers
            .into_iter()
            .zip(sources)
            .map(|(fetcher, s)| Source {
                fetcher,
                interval: s.refresh_interval,
                timeout: s.timeout,
            })
            .collect();
        Ok(Self {
            pipeline: Arc::new(pipeline),
            sources,
        })
    }
}
