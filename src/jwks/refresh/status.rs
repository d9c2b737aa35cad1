//! What `/status` and `/readyz` know of an issuer and its sources.

use serde::Serialize;

/// What `/status` shows of one source.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SourceStatus {
    pub source: String,
    /// The last fetch succeeded (an unchanged file counts as its last result).
    pub healthy: bool,
    /// Unix seconds of the last successful fetch.
    pub last_success: Option<u64>,
    /// Unix seconds and text of the last failure.
    pub last_error_at: Option<u64>,
    pub last_error: Option<String>,
    /// The issuer the apiserver's own discovery document claims (apiserver sources).
    pub upstream_issuer: Option<String>,
    pub issuer_mismatch: bool,
}

/// What `/status` and `/readyz` know of one issuer.
#[derive(Debug, Clone, Serialize)]
pub struct IssuerStatus {
    pub issuer: String,
    pub discovery_url: String,
    pub jwks_uri: String,
    pub published: bool,
    /// The documents' `max-age`, and how long a key no source lists stays published: what
    /// `rotation status` times the next step with.
    pub cache_max_age_seconds: u64,
    pub key_retention_seconds: u64,
    pub kids: Vec<String>,
    /// Unix seconds at which the served key set was last confirmed by a source.
    pub confirmed_at: Option<u64>,
    pub sources: Vec<SourceStatus>,
    /// Each published key's lifecycle, by kid.
    pub keys: Vec<KeyLifecycle>,
}

/// Where one published key is in its rotation (relying-party-rules X-6): when it appeared,
/// whether a source still lists it, and until when it stays published after it left.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyLifecycle {
    pub kid: String,
    /// Unix seconds at which a source first listed the key, which is also when it was first
    /// served (a merged set is published at once); `None` for a key restored from a state
    /// file written before this was recorded.
    pub first_seen_at: Option<u64>,
    /// Unix seconds of the last confirmation of a set that listed it: the issuer's
    /// `confirmed_at` while a source lists the key, `None` once none does.
    pub last_seen_at: Option<u64>,
    /// Unix seconds of the first refresh at which no source listed it any more.
    pub vanished_at: Option<u64>,
    /// Unix seconds until which a vanished key stays published (`vanished_at` +
    /// `key_retention`), for relying parties still holding tokens it signed.
    pub retiring_until: Option<u64>,
}
