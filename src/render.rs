//! `oidc-edge render`: the seed workflows, automated. The configured sources are fetched once
//! through the same validation and merge as `serve`, and the documents are written as files,
//! byte-identical to what `serve` answers, plus what the host needs to serve them with the
//! right headers: `_headers` for Cloudflare Pages, or an object manifest for S3.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use serde::Serialize;
use tracing::warn;

use crate::cli::Layout;
use crate::config::{Config, JwksContentType};
use crate::jwks::merge::{Ledger, merge};
use crate::jwks::source::{AnySource, Fetched, KeySource as _};
use crate::jwks::store::Snapshot;
use crate::jwks::validate::validate;

/// One written object and the headers it must be served with.
#[derive(Debug, Clone, Serialize)]
pub struct Object {
    /// Path below the output directory, without a leading `/`.
    pub key: String,
    pub content_type: &'static str,
    pub cache_control: String,
}

/// Fetches every source once and writes the tree under `out`. Several hosts each get a
/// directory named after the host (a Pages site or bucket per host).
pub async fn render(config: &Config, out: &Path, layout: Layout) -> anyhow::Result<Vec<Object>> {
    let mut hosts: Vec<&str> = config.issuers.iter().map(|i| i.issuer.host()).collect();
    hosts.sort_unstable();
    hosts.dedup();
    let per_host = hosts.len() > 1;
    let now = crate::jwks::unix_now();
    let mut written: Vec<(PathBuf, Object)> = Vec::new();
    for cfg in &config.issuers {
        let mut sets = Vec::with_capacity(cfg.sources.len());
        for source in &cfg.sources {
            let mut fetcher = AnySource::from_config(&source.kind, source.timeout)?;
            let name = fetcher.describe();
            let body = match fetcher
                .fetch_key_set()
                .await
                .with_context(|| format!("{}: {name}", cfg.issuer))?
            {
                Fetched::Body { body, .. } => body,
                Fetched::Unchanged => bail!("{}: {name}: nothing fetched", cfg.issuer),
            };
            let valid = validate(&body)
                .with_context(|| format!("{}: {name}: key set refused", cfg.issuer))?;
            for dropped in &valid.dropped {
                warn!(issuer = %cfg.issuer, source = %name, "key left out: {dropped}");
            }
            sets.push(valid.keys);
        }
        let views: Vec<Option<&[_]>> = sets.iter().map(|s| Some(s.as_slice())).collect();
        let ledger = merge(
            &views,
            &Ledger::default(),
            now,
            cfg.key_retention,
            cfg.max_keys,
        )
        .with_context(|| format!("{}: merged key set refused", cfg.issuer))?;
        let snapshot = Snapshot::render(cfg.issuer.as_str(), &cfg.jwks_uri, &ledger);
        let base = if per_host {
            out.join(cfg.issuer.host())
        } else {
            out.to_owned()
        };
        let cache_control = format!("public, max-age={}", cfg.cache_max_age.as_secs());
        let jwks_type = match cfg.jwks_content_type {
            JwksContentType::Json => "application/json",
            JwksContentType::JwkSetJson => "application/jwk-set+json",
        };
        for (path, body, content_type) in [
            (
                &cfg.discovery_path,
                &snapshot.discovery.body,
                "application/json",
            ),
            (&cfg.jwks_path, &snapshot.jwks.body, jwks_type),
        ] {
            let key = path.trim_start_matches('/').to_owned();
            let file = base.join(&key);
            if let Some(dir) = file.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
            }
            std::fs::write(&file, body)
                .with_context(|| format!("cannot write {}", file.display()))?;
            written.push((
                base.clone(),
                Object {
                    key,
                    content_type,
                    cache_control: cache_control.clone(),
                },
            ));
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
        match layout {
            Layout::Pages => {
                let file = base.join("_headers");
                std::fs::write(&file, pages_headers(&objects))
                    .with_context(|| format!("cannot write {}", file.display()))?;
            }
            Layout::S3 => {
                let file = base.join("s3-objects.json");
                let mut json = serde_json::to_vec_pretty(&objects).expect("objects serialise");
                json.push(b'\n');
                std::fs::write(&file, json)
                    .with_context(|| format!("cannot write {}", file.display()))?;
            }
        }
    }
    Ok(written.into_iter().map(|(_, o)| o).collect())
}

/// Cloudflare Pages' `_headers`: the seed's content types, plus the headers `serve` sends.
fn pages_headers(objects: &[&Object]) -> String {
    let mut text = String::new();
    for object in objects {
        let _ = write!(
            text,
            "/{}\n  Content-Type: {}\n  Cache-Control: {}\n  Access-Control-Allow-Origin: *\n  X-Content-Type-Options: nosniff\n",
            object.key, object.content_type, object.cache_control
        );
    }
    text
}
