//! A cluster's signing keys in a test: P-256 pairs made here, their public JWKs as a cluster
//! publishes them, and service-account tokens signed with them in Kubernetes' claim shape.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};

/// One signing key of a cluster.
pub struct ClusterKey {
    pub kid: String,
    pub jwk: Value,
    encoding: jsonwebtoken::EncodingKey,
}

impl ClusterKey {
    pub fn new(kid: &str) -> Self {
        let pair = rcgen::KeyPair::generate().expect("P-256 key");
        let point = pair.public_key_raw();
        let jwk = json!({"kty": "EC", "use": "sig", "kid": kid, "alg": "ES256", "crv": "P-256",
            "x": URL_SAFE_NO_PAD.encode(&point[1..33]), "y": URL_SAFE_NO_PAD.encode(&point[33..65])});
        let encoding =
            jsonwebtoken::EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).expect("EC");
        Self {
            kid: kid.to_owned(),
            jwk,
            encoding,
        }
    }

    /// `claims`, signed with this key and carrying its kid.
    pub fn sign(&self, claims: &Value) -> String {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding).expect("sign")
    }
}

/// The JWK set `kubectl get --raw /openid/v1/jwks` would print for `keys`.
pub fn jwks(keys: &[&ClusterKey]) -> String {
    json!({ "keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>() }).to_string()
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// A projected service-account token's claims as kube-apiserver 1.30+ writes them, valid
/// from now for `lifetime` seconds, with a fresh `jti`.
pub fn token_claims(iss: &str, aud: &str, sub: &str, lifetime: u64) -> Value {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let now = unix_now();
    let jti = format!(
        "{:08x}-{}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    json!({
        "aud": [aud], "exp": now + lifetime, "iat": now, "iss": iss, "jti": jti,
        "kubernetes.io": {"namespace": "oidc-edge", "serviceaccount": {"name": "pusher"}},
        "nbf": now, "sub": sub,
    })
}
