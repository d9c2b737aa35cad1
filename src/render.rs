//! `oidc-edge render`: the seed workflows, automated. The configured sources are fetched once
//! through the same validation and merge as `serve`, and the documents are written as files,
//! byte-identical to what `serve` answers, plus what the host needs to serve them with the
//! right headers: `_headers` for Cloudflare Pages, or an object manifest for S3.
//!
//! L6: each issuer goes through `serve`'s own pipeline, driven once: restore the ledger from
//! `[state] dir`, refresh every source, save the ledger back. So a key that vanished upstream
//! stays published for `key_retention` across renders (cron, CI) as it does in `serve`
//! (X-6, Z-9), and the bytes are `serve`'s by construction, not by a second copy of the merge.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use serde::Serialize;

use crate::config::Config;
use crate::http::headers;
use crate::jwks::refresh::IssuerPipeline;
use crate::jwks::source::AnySource;
use crate::jwks::store::{Document, DocumentStore};
use crate::metrics::Metrics;
use crate::state::{create_state_dir, write_public};

/// What `render` writes besides the documents, for the host that serves them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Layout {
    /// A Cloudflare Pages `_headers` file.
    Pages,
    /// An S3 object manifest, `s3-objects.json`.
    S3,
}

/// Where and how to write.
#[derive(Debug, Clone)]
pub struct Options {
    pub out: PathBuf,
    pub layout: Layout,
}

/// One written object and the headers it must be served with.
#[derive(Debug, Clone, Serialize)]
pub struct Object {
    /// Path below the output directory, without a leading `/`.
    pub key: String,
    pub content_type: String,
    pub cache_control: String,
}

impl Object {
    /// The object at `path` holding `doc`, with `doc`'s own headers.
    fn new(path: &str, doc: &Document) -> Self {
        let text = |v: &http::HeaderValue| v.to_str().expect("our headers are ASCII").to_owned();
        Self {
            key: path.trim_start_matches('/').to_owned(),
            content_type: text(&doc.content_type),
            cache_control: text(&doc.cache_control),
        }
    }
}

/// Fetches every source once and writes the tree under `options.out`. Several hosts each get
/// a directory named after the host (a Pages site or bucket per host).
///
/// Any failing source, refused set or refused merge fails the render before that issuer's
/// files are touched, so the files already published stay the last good ones. So does a
/// state file that cannot be written: the next render would otherwise drop retained keys.
pub async fn render(config: &Config, options: &Options) -> anyhow::Result<Vec<Object>> {
    let out = &options.out;
    let mut hosts: Vec<&str> = config
        .issuers
        .iter()
        .map(|i| i.endpoint.issuer.host())
        .collect();
    hosts.sort_unstable();
    hosts.dedup();
    let per_host = hosts.len() > 1;
    create_state_dir(&config.state_dir)?;
    let store = Arc::new(DocumentStore::new(config.issuers.len()));
    let metrics = Arc::new(Metrics::new());
    let mut written: Vec<(PathBuf, Object)> = Vec::new();
    for (index, cfg) in config.issuers.iter().enumerate() {
        let endpoint = &cfg.endpoint;
        let mut fetchers = cfg
            .sources
            .iter()
            .map(|source| AnySource::from_config(&source.kind, source.timeout))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let pipeline = IssuerPipeline::restored(
            index,
            endpoint,
            cfg.keys,
            &config.state_dir,
            &store,
            &metrics,
            &fetchers,
        )
        .await;
        for (i, fetcher) in fetchers.iter_mut().enumerate() {
            if !pipeline.refresh(i, fetcher).await {
                let status = pipeline.status().await;
                let source = &status.sources[i];
                let reason = source.last_error.as_deref().unwrap_or("nothing fetched");
                bail!("{}: {}: {reason}", endpoint.issuer, source.source);
            }
        }
        if !pipeline.persisted().await {
            bail!(
                "{}: could not save the key set to {}; without it the next render loses \
                 rotation grace",
                endpoint.issuer,
                pipeline.state_path().display()
            );
        }
        let snapshot = store
            .get(index)
            .with_context(|| format!("{}: no key set to publish", endpoint.issuer))?;
        let base = if per_host {
            out.join(endpoint.issuer.host())
        } else {
            out.to_owned()
        };
        for (path, doc) in [
            (&endpoint.discovery_path, &snapshot.discovery),
            (&endpoint.jwks_path, &snapshot.jwks),
        ] {
            let object = Object::new(path, doc);
            let file = base.join(&object.key);
            if let Some(dir) = file.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
            }
            write_public(&file, &doc.body)
                .with_context(|| format!("cannot write {}", file.display()))?;
            written.push((base.clone(), object));
        }
    }
    let mut bases: Vec<&PathBuf> = written.iter().map(|(b, _)| b).collect();
    bases.dedup();
    for base in bases {
        let objects: Vec<&Object> = written
            .iter()
            .filter(|(b, _)| b == base)
            .map(|(_, o)| o)
            .collect();
        match options.layout {
            Layout::Pages => {
                let file = base.join("_headers");
                write_public(&file, pages_headers(&objects).as_bytes())
                    .with_context(|| format!("cannot write {}", file.display()))?;
            }
            Layout::S3 => {
                let file = base.join("s3-objects.json");
                let mut json = serde_json::to_vec_pretty(&objects).expect("objects serialise");
                json.push(b'\n');
                write_public(&file, &json)
                    .with_context(|| format!("cannot write {}", file.display()))?;
            }
        }
    }
    Ok(written.into_iter().map(|(_, o)| o).collect())
}

/// Cloudflare Pages' `_headers`: the seed's content types, plus the headers `serve` sends.
fn pages_headers(objects: &[&Object]) -> String {
    let (cors, nosniff) = (headers::ANY_ORIGIN, headers::NOSNIFF);
    let (cors, nosniff) = (
        cors.to_str().expect("ASCII"),
        nosniff.to_str().expect("ASCII"),
    );
    let mut text = String::new();
    for object in objects {
        let _ = write!(
            text,
            "/{}\n  Content-Type: {}\n  Cache-Control: {}\n  Access-Control-Allow-Origin: {cors}\n  X-Content-Type-Options: {nosniff}\n",
            object.key, object.content_type, object.cache_control
        );
    }
    text
}
