//! The published side of one issuer: where its two documents live and how they are served.
//! Everything that writes the documents (the HTTP handler, `render`, a bucket) reads it here.

use std::time::Duration;

use super::Issuer;

/// How long relying parties may cache the documents, unless configured.
pub const DEFAULT_CACHE_MAX_AGE: Duration = Duration::from_secs(300);
/// relying parties should not cache longer than the apiserver's own 3600 s.
pub const MAX_CACHE_MAX_AGE: Duration = Duration::from_secs(3600);

/// One issuer's public face: its URL, its two paths and their headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuerEndpoint {
    pub issuer: Issuer,
    pub discovery_path: String,
    pub jwks_path: String,
    /// `https://<issuer host><jwks_path>`, as published in the discovery document.
    pub jwks_uri: String,
    pub jwks_content_type: JwksContentType,
    pub cache_max_age: Duration,
}

impl IssuerEndpoint {
    /// The endpoint with the default paths and headers.
    pub fn new(issuer: Issuer) -> Self {
        let jwks_path = issuer.default_jwks_path();
        Self::with_jwks_path(issuer, jwks_path)
    }

    /// The endpoint with its JWKS at `jwks_path` (already checked against the issuer).
    pub fn with_jwks_path(issuer: Issuer, jwks_path: String) -> Self {
        Self {
            discovery_path: issuer.discovery_path(),
            jwks_uri: issuer.url_for(&jwks_path),
            jwks_path,
            issuer,
            jwks_content_type: JwksContentType::Json,
            cache_max_age: DEFAULT_CACHE_MAX_AGE,
        }
    }

    /// The discovery document's URL, as relying parties fetch it.
    pub fn discovery_url(&self) -> String {
        self.issuer.url_for(&self.discovery_path)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JwksContentType {
    /// what EKS serves and every client accepts (the default).
    Json,
    /// RFC 7517 §8.5.1, what kube-apiserver serves; some clients refuse it (F-8).
    JwkSetJson,
}

impl JwksContentType {
    pub fn as_str(self) -> &'static str {
        match self {
            JwksContentType::Json => "application/json",
            JwksContentType::JwkSetJson => "application/jwk-set+json",
        }
    }
}
