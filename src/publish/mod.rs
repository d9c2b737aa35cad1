//! Keeping buckets in step with what is served: `oidc-edge publish` (from inside a cluster
//! that takes no inbound traffic), and `serve` with `[[issuers.publish]]` targets (a public
//! server that keeps a bucket as a warm standby).
//!
//! A bucket only ever receives a [`Snapshot`] the pipeline published, so a key set refused by
//! validation is never written, and the bytes and headers are `serve`'s by construction.
//! Nothing is ever deleted. Each target follows the issuer's snapshots: it syncs after every
//! change, on a slow heartbeat (to repair a bucket someone edited), and with capped backoff
//! after a failure.

mod azure;
pub mod bucket;
mod connector;
pub mod edge;
mod s3;
pub mod target;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use self::bucket::{Bucket, Synced, Wanted};
use self::edge::{DEFAULT_PUSH_INTERVAL, Edge, EdgeTarget};
use self::target::PublishTarget;
use crate::issuer::endpoint::IssuerEndpoint;
use crate::jwks::refresh::{jitter_sample, next_refresh_in};
use crate::jwks::store::{DocumentStore, Snapshot};
use crate::jwks::unix_now;
use crate::metrics::{Metrics, PublishLabels, PublishResult};

/// How often an unchanged snapshot is checked against the bucket (two HEADs per target), so
/// that an object deleted or overwritten by hand is put back.
pub const HEARTBEAT: Duration = Duration::from_secs(600);

/// The publish targets of one issuer.
#[derive(Debug)]
pub struct IssuerPublisher {
    index: usize,
    endpoint: IssuerEndpoint,
    targets: Vec<TargetPublisher>,
    metrics: Arc<Metrics>,
    /// How often an unchanged snapshot is written again.
    heartbeat: Duration,
}

#[derive(Debug)]
struct TargetPublisher {
    sink: Sink,
    labels: PublishLabels,
    status: Mutex<TargetStatus>,
}

/// Where one target writes.
#[derive(Debug)]
enum Sink {
    /// A bucket: both documents, as `serve` sends them. Boxed: it carries its store client
    /// and settings.
    Bucket(Box<Bucket>),
    /// A public oidc-edge: the keys the cluster lists, pushed (`[[issuers.push]]`).
    Edge(Box<Edge>),
}

/// One target in `/status`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TargetStatus {
    pub issuer: String,
    pub to: String,
    /// Unix seconds.
    pub last_attempt_at: Option<u64>,
    /// Unix seconds of the last attempt that left the bucket holding the served documents.
    pub last_success_at: Option<u64>,
    /// Why the last attempt failed; `None` after a success.
    pub last_error: Option<String>,
    /// The objects the last successful attempt wrote (empty: they were already right).
    pub last_written: Vec<String>,
    /// How the target's `public_url` differed from the bucket at the last successful attempt.
    pub public_differences: Vec<String>,
    pub consecutive_failures: u32,
}

impl IssuerPublisher {
    /// Opens every target of issuer `index`: credentials are resolved here, so that a target
    /// without any fails at start with a message naming what was looked for.
    pub fn open(
        index: usize,
        endpoint: &IssuerEndpoint,
        targets: &[PublishTarget],
        metrics: &Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        let targets = targets
            .iter()
            .map(|target| {
                let bucket = Bucket::open(target)?;
                Ok((target.to.as_str(), Sink::Bucket(Box::new(bucket))))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Self::with_sinks(
            index, endpoint, targets, metrics, HEARTBEAT,
        ))
    }

    /// The edges issuer `index` pushes to (`[[issuers.push]]`), pushed to at least every
    /// `interval` of the most frequent one.
    pub fn open_edges(
        index: usize,
        endpoint: &IssuerEndpoint,
        edges: &[EdgeTarget],
        metrics: &Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        let heartbeat = edges
            .iter()
            .map(|e| e.interval)
            .min()
            .unwrap_or(DEFAULT_PUSH_INTERVAL);
        let targets = edges
            .iter()
            .map(|edge| Ok((edge.url.as_str(), Sink::Edge(Box::new(Edge::open(edge)?)))))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Self::with_sinks(
            index, endpoint, targets, metrics, heartbeat,
        ))
    }

    fn with_sinks(
        index: usize,
        endpoint: &IssuerEndpoint,
        sinks: Vec<(&str, Sink)>,
        metrics: &Arc<Metrics>,
        heartbeat: Duration,
    ) -> Self {
        Self {
            index,
            endpoint: endpoint.clone(),
            targets: sinks
                .into_iter()
                .map(|(to, sink)| TargetPublisher::new(endpoint, to, sink))
                .collect(),
            metrics: Arc::clone(metrics),
            heartbeat,
        }
    }

    pub fn issuer(&self) -> &str {
        self.endpoint.issuer.as_str()
    }

    /// The issuer's index in the configuration.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Brings every target in step with `snapshot`, one after another; each result in target
    /// order.
    pub async fn publish(&self, snapshot: &Snapshot) -> Vec<anyhow::Result<Synced>> {
        // The JWKS first: a discovery document must never be fetched before the keys it
        // leads to (a relying party that reads both would miss the new key).
        let documents = [
            Wanted {
                path: &self.endpoint.jwks_path,
                document: &snapshot.jwks,
            },
            Wanted {
                path: &self.endpoint.discovery_path,
                document: &snapshot.discovery,
            },
        ];
        let mut results = Vec::with_capacity(self.targets.len());
        for target in &self.targets {
            let result = match &target.sink {
                Sink::Bucket(bucket) => bucket.sync(&documents).await,
                Sink::Edge(edge) => edge.push(snapshot).await,
            };
            target.record(&result, &self.metrics);
            results.push(result);
        }
        results
    }

    /// Every target's state, for `/status`.
    pub fn statuses(&self) -> Vec<TargetStatus> {
        self.targets
            .iter()
            .map(|t| t.status.lock().expect("status lock").clone())
            .collect()
    }

    /// Follows issuer's snapshots in `store` until `cancel` fires.
    pub async fn run(self: Arc<Self>, store: Arc<DocumentStore>, cancel: CancellationToken) {
        let mut changed = store.subscribe(self.index);
        let mut failures = 0u32;
        loop {
            // Marked seen before reading the snapshot, so a publish during the sync is not lost.
            changed.borrow_and_update();
            if let Some(snapshot) = store.get(self.index) {
                let failed = self.publish(&snapshot).await.iter().any(Result::is_err);
                failures = if failed {
                    failures.saturating_add(1)
                } else {
                    0
                };
            }
            let delay = next_refresh_in(self.heartbeat, failures, jitter_sample());
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
                changed = changed.changed() => if changed.is_err() { return },
            }
        }
    }
}

impl TargetPublisher {
    fn new(endpoint: &IssuerEndpoint, to: &str, sink: Sink) -> Self {
        Self {
            sink,
            labels: PublishLabels {
                issuer: endpoint.issuer.to_string(),
                target: to.to_owned(),
            },
            status: Mutex::new(TargetStatus {
                issuer: endpoint.issuer.to_string(),
                to: to.to_owned(),
                ..TargetStatus::default()
            }),
        }
    }

    fn record(&self, result: &anyhow::Result<Synced>, metrics: &Metrics) {
        let now = unix_now();
        let mut status = self.status.lock().expect("status lock");
        status.last_attempt_at = Some(now);
        let (outcome, written) = match result {
            Ok(synced) => {
                if !synced.written.is_empty() {
                    info!(issuer = %self.labels.issuer, target = %self.labels.target,
                          written = ?synced.written, "published");
                }
                if status.last_error.is_some() {
                    info!(issuer = %self.labels.issuer, target = %self.labels.target,
                          "publishing works again");
                }
                status.last_success_at = Some(now);
                status.last_error = None;
                status.last_written.clone_from(&synced.written);
                for difference in &synced.public_differences {
                    warn!(issuer = %self.labels.issuer, target = %self.labels.target,
                          %difference, "the public URL does not serve what the bucket holds");
                }
                status
                    .public_differences
                    .clone_from(&synced.public_differences);
                metrics.set_public_mismatch(&self.labels, !synced.public_differences.is_empty());
                status.consecutive_failures = 0;
                let outcome = if synced.written.is_empty() {
                    PublishResult::unchanged
                } else {
                    PublishResult::written
                };
                (outcome, synced.written.len())
            }
            Err(e) => {
                let reason = format!("{e:#}");
                warn!(issuer = %self.labels.issuer, target = %self.labels.target,
                      error = %reason, "publishing failed; the target keeps what it had");
                status.last_error = Some(reason);
                status.consecutive_failures = status.consecutive_failures.saturating_add(1);
                (PublishResult::error, 0)
            }
        };
        metrics.count_publish(&self.labels, outcome, written, now);
    }
}
