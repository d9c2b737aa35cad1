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
    pub kids: Vec<String>,
    /// Unix seconds at which the served key set was last confirmed by a source.
    pub confirmed_at: Option<u64>,
    pub sources: Vec<SourceStatus>,
}
