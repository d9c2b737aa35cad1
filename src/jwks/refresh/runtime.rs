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
use crate::jwks::store::DocumentStore;
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
