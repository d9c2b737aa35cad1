//! The published documents: one immutable, pre-rendered snapshot per issuer behind an
//! `ArcSwapOption`. Requests load a snapshot without locking or allocating a document; the
//! refresher builds a new one and swaps it in whole.

use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::HeaderValue;

use super::merge::Ledger;
use super::{render_jwks, signing_algs};
use crate::http::headers::strong_etag;
use crate::issuer::discovery;

/// One rendered document and its strong ETag over the exact bytes.
#[derive(Debug, Clone)]
pub struct Document {
    pub body: Bytes,
    pub etag: HeaderValue,
}

impl Document {
    pub fn new(body: Bytes) -> Self {
        let etag = strong_etag(&body);
        Self { body, etag }
    }
}

/// Everything served for one issuer at one moment.
#[derive(Debug)]
pub struct Snapshot {
    pub discovery: Document,
    pub jwks: Document,
    pub kids: Vec<String>,
    pub published_at: SystemTime,
}

impl Snapshot {
    /// Renders both documents from a non-empty ledger.
    pub fn render(issuer: &str, jwks_uri: &str, ledger: &Ledger) -> Self {
        let algs = signing_algs(ledger.jwks());
        Self {
            discovery: Document::new(discovery::render(issuer, jwks_uri, &algs)),
            jwks: Document::new(render_jwks(ledger.jwks())),
            kids: ledger.kids(),
            published_at: SystemTime::now(),
        }
    }
}

/// The current snapshot of every issuer, indexed like `Config::issuers`.
#[derive(Debug)]
pub struct DocumentStore {
    slots: Box<[ArcSwapOption<Snapshot>]>,
}

impl DocumentStore {
    pub fn new(issuers: usize) -> Self {
        Self {
            slots: (0..issuers).map(|_| ArcSwapOption::empty()).collect(),
        }
    }

    /// The snapshot of issuer `index`, or `None` before its first good key set.
    pub fn get(&self, index: usize) -> Option<Arc<Snapshot>> {
        self.slots.get(index).and_then(ArcSwapOption::load_full)
    }

    pub fn publish(&self, index: usize, snapshot: Snapshot) {
        self.slots[index].store(Some(Arc::new(snapshot)));
    }

    /// Ready when every issuer has a published key set.
    pub fn all_published(&self) -> bool {
        self.slots.iter().all(|s| s.load().is_some())
    }
}
