//! The published documents: one immutable, pre-rendered snapshot per issuer behind an
//! `ArcSwapOption`. Requests load a snapshot without locking or allocating a document; the
//! refresher builds a new one and swaps it in whole.
//!
//! [`Snapshot::build`] is the only place documents are made, with every header that
//! describes them, so that each writer (the HTTP handler, `render`, a bucket) sends the same
//! bytes with the same headers. As kube-apiserver's `openidmetadata.go` has it, everything that
//! deals with keys stays here; only rendered documents leave.

use std::sync::Arc;

use arc_swap::ArcSwapOption;
use aws_lc_rs::digest;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http::HeaderValue;
use tokio::sync::watch;

use super::merge::{KeyPolicy, Ledger, MergeError, merge};
use super::validate::{Rejected, validate};
use super::{render_jwks, signing_algs};
use crate::issuer::discovery;
use crate::issuer::endpoint::IssuerEndpoint;

/// One rendered document: its exact bytes and the headers that describe them.
#[derive(Debug, Clone)]
pub struct Document {
    pub body: Bytes,
    /// A strong validator over `body`.
    pub etag: HeaderValue,
    pub content_type: HeaderValue,
    /// `public, max-age=N`.
    pub cache_control: HeaderValue,
}

impl Document {
    fn new(body: Bytes, content_type: &'static str, cache_control: &HeaderValue) -> Self {
        Self {
            etag: strong_etag(&body),
            body,
            content_type: HeaderValue::from_static(content_type),
            cache_control: cache_control.clone(),
        }
    }
}

/// Everything served for one issuer at one moment.
#[derive(Debug)]
pub struct Snapshot {
    pub discovery: Document,
    pub jwks: Document,
    /// The kids of `jwks`, shared with relying-party fetch records (`http::fetched_by`), which
    /// keep what a fetch received without copying it on the request path.
    pub kids: Arc<[String]>,
    /// The keys some source lists now: the published ones less those kept only for rotation
    /// grace. What a push may be signed with (a retired key is served, never trusted), and
    /// what a push agent sends.
    pub listed: Vec<super::PublicJwk>,
}

impl Snapshot {
    /// Renders both documents of `endpoint` from a non-empty ledger.
    pub fn build(endpoint: &IssuerEndpoint, ledger: &Ledger) -> Self {
        let algs = signing_algs(ledger.jwks());
        let cache_control = cache_control(endpoint.cache_max_age.as_secs());
        let discovery = discovery::render(endpoint.issuer.as_str(), &endpoint.jwks_uri, &algs);
        Self {
            // the discovery document is always application/json.
            discovery: Document::new(discovery, "application/json", &cache_control),
            jwks: Document::new(
                render_jwks(ledger.jwks()),
                endpoint.jwks_content_type.as_str(),
                &cache_control,
            ),
            kids: ledger.kids().into(),
            listed: ledger
                .keys
                .values()
                .filter(|entry| entry.vanished_at.is_none())
                .map(|entry| entry.jwk.clone())
                .collect(),
        }
    }
}

/// Why [`Snapshot::first`] publishes nothing.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("source {0}: {1}")]
    Rejected(usize, Rejected),
    #[error(transparent)]
    Merge(#[from] MergeError),
}

impl Snapshot {
    /// The first snapshot of `endpoint` from the JWKS bodies of its sources, as a new pipeline
    /// publishes it: each body validated, the sets merged with no history. For tests, benches
    /// and tools; the pipeline goes through the same `validate`, `merge` and
    /// [`Snapshot::build`], and adds history (rotation grace), persistence and metrics.
    pub fn first(
        endpoint: &IssuerEndpoint,
        keys: KeyPolicy,
        bodies: &[&[u8]],
    ) -> Result<Self, Refused> {
        let sets = bodies
            .iter()
            .enumerate()
            .map(|(i, body)| {
                validate(body)
                    .map(|v| v.keys)
                    .map_err(|e| Refused::Rejected(i, e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let views: Vec<Option<&[super::PublicJwk]>> = sets.iter().map(|s| Some(&s[..])).collect();
        let ledger = merge(&views, &Ledger::default(), 0, keys.retention, keys.max_keys)?;
        Ok(Self::build(endpoint, &ledger))
    }
}

/// A strong validator over the exact bytes: the first 128 bits of their SHA-256, base64url.
/// The same bytes give the same ETag on every replica.
pub fn strong_etag(body: &[u8]) -> HeaderValue {
    let hash = digest::digest(&digest::SHA256, body);
    let tag = format!("\"{}\"", URL_SAFE_NO_PAD.encode(&hash.as_ref()[..16]));
    HeaderValue::from_str(&tag).expect("base64url and quotes are valid header text")
}

/// `Cache-Control: public, max-age=N`.
fn cache_control(max_age_secs: u64) -> HeaderValue {
    HeaderValue::from_str(&format!("public, max-age={max_age_secs}"))
        .expect("digits are valid header text")
}

/// The current snapshot of every issuer, indexed like `Config::issuers`.
#[derive(Debug)]
pub struct DocumentStore {
    slots: Box<[ArcSwapOption<Snapshot>]>,
    /// Signalled on every publish, for writers that follow the snapshots (bucket targets).
    /// Off the request path: requests only load `slots`.
    changes: Box<[watch::Sender<()>]>,
}

impl DocumentStore {
    pub fn new(issuers: usize) -> Self {
        Self {
            slots: (0..issuers).map(|_| ArcSwapOption::empty()).collect(),
            changes: (0..issuers).map(|_| watch::Sender::new(())).collect(),
        }
    }

    /// A receiver that sees issuer `index`'s next publish (and only the latest, if several
    /// came while it was busy).
    pub fn subscribe(&self, index: usize) -> watch::Receiver<()> {
        self.changes[index].subscribe()
    }

    /// The snapshot of issuer `index`, or `None` before its first good key set.
    pub fn get(&self, index: usize) -> Option<Arc<Snapshot>> {
        self.slots.get(index).and_then(ArcSwapOption::load_full)
    }

    pub fn publish(&self, index: usize, snapshot: Snapshot) {
        self.slots[index].store(Some(Arc::new(snapshot)));
        self.changes[index].send_replace(());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etag_is_strong_quoted_and_stable() {
        let a = strong_etag(b"{\"keys\":[]}");
        assert_eq!(a, strong_etag(b"{\"keys\":[]}"));
        assert_ne!(a, strong_etag(b"{\"keys\":[ ]}"));
        let s = a.to_str().expect("ascii");
        assert!(s.starts_with('"') && s.ends_with('"') && !s.starts_with("W/"));
        assert_eq!(s.len(), 24);
    }
}
