//! The JWKS pipeline (DESIGN §4): fetch → validate → merge → publish → persist.
//!
//! - [`source`] fetches raw bytes from where the keys live;
//! - [`validate`] turns bytes into [`PublicJwk`]s or rejects them (pure);
//! - [`merge`] unions the sources of one issuer and applies rotation grace (pure);
//! - [`store`] holds the immutable, pre-rendered snapshots that requests read;
//! - [`persist`] keeps the last good set on disk across restarts;
//! - [`refresh`] drives the loop, one task per source.

pub mod merge;
pub mod persist;
pub mod refresh;
pub mod source;
pub mod store;
pub mod validate;

use serde::{Deserialize, Serialize};

/// A public JSON Web Key restricted to the allow-list `kty use kid alg n e crv x y`.
///
/// The type has no field for private material, so a value of it can never publish one (D-5).
/// Fields serialise in declaration order, which is the order we publish.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublicJwk {
    pub kty: String,
    /// Always `"sig"`: added when the source left it out, because Azure needs it (Z-6).
    #[serde(rename = "use")]
    pub use_: String,
    pub kid: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alg: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub e: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crv: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub y: Option<String>,
}

impl PublicJwk {
    /// The algorithm this key signs with: its `alg`, or what Kubernetes uses for its type (K-4).
    pub fn signing_alg(&self) -> &str {
        match &self.alg {
            Some(alg) => alg,
            None => default_alg(&self.kty, self.crv.as_deref()),
        }
    }
}

/// The algorithm Kubernetes signs with for a key type when a JWK names none (K-4): RS256 for
/// RSA, ES256/384/512 by curve for EC, EdDSA for OKP.
pub fn default_alg(kty: &str, crv: Option<&str>) -> &'static str {
    match (kty, crv) {
        ("EC", Some("P-384")) => "ES384",
        ("EC", Some("P-521")) => "ES512",
        ("EC", _) => "ES256",
        ("OKP", _) => "EdDSA",
        _ => "RS256",
    }
}

/// Seconds since the Unix epoch: the clock of rotation grace and of persisted state, which
/// must survive restarts (so not a monotonic clock).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Renders a JWK set as compact JSON in the order given (callers pass keys sorted by kid, so
/// that replicas produce identical bytes and ETags).
pub fn render_jwks<'a>(keys: impl IntoIterator<Item = &'a PublicJwk>) -> bytes::Bytes {
    #[derive(Serialize)]
    struct JwkSet<'a> {
        keys: Vec<&'a PublicJwk>,
    }
    let set = JwkSet {
        keys: keys.into_iter().collect(),
    };
    bytes::Bytes::from(serde_json::to_vec(&set).expect("a JWK set of strings always serialises"))
}

/// The sorted, unique signing algorithms of `keys`, for the discovery document.
pub fn signing_algs<'a>(keys: impl IntoIterator<Item = &'a PublicJwk>) -> Vec<&'a str> {
    let mut algs: Vec<&str> = keys.into_iter().map(PublicJwk::signing_alg).collect();
    algs.sort_unstable();
    algs.dedup();
    algs
}
