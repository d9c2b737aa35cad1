//! The edge side of a push: who may change an issuer's key set from the outside.
//!
//! No shared secret: the agent in the cluster sends a service-account token of the cluster
//! itself, and the edge verifies it with the keys it **already publishes** for that issuer,
//! never with the pushed set. Only keys some source lists now may authenticate (a key kept
//! only for rotation grace is served, never trusted), so a proper rotation (publish the new
//! key, then sign with it) flows through by itself and an abrupt key change is refused with
//! the command that re-trusts. The cheap checks come first and the body is read only after
//! the token passed, so a flood of bad pushes costs a header parse each.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_lc_rs::digest;
use bytes::Bytes;
use http::StatusCode;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{DecodingKey, Validation};
use serde::Serialize;
use serde_json::Value;
use tracing::{info, warn};

use crate::jwks::refresh::IssuerPipeline;
use crate::jwks::source::push::{MAX_PUSH_TOKEN_LIFETIME, PushPolicy};
use crate::jwks::store::DocumentStore;
use crate::jwks::unix_now;
use crate::jwks::validate::validate;
use crate::metrics::{Metrics, PushResult};

/// Clock skew allowed on `exp`, `nbf` and `iat`: a minute, as kube-apiserver allows its own
/// tokens (a push is between two machines we run, not a relying party's five minutes).
pub const PUSH_CLOCK_SKEW_SECS: u64 = 60;

/// How long a body may take to arrive once the token passed.
pub const PUSH_BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// A refused push: the status and the one line the agent is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub result: PushResult,
    pub reason: String,
}

impl Refusal {
    fn new(status: StatusCode, result: PushResult, reason: impl Into<String>) -> Self {
        Self {
            status,
            result,
            reason: reason.into(),
        }
    }
}

/// A token that passed: who pushed, with which key, and its ID.
#[derive(Debug, Clone)]
pub struct Verified {
    pub kid: String,
    pub subject: String,
    pub jti: Option<String>,
    /// Unix seconds.
    pub issued_at: u64,
}

/// One push source in `/status`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PushStatus {
    pub issuer: String,
    /// The URL pushes go to.
    pub url: String,
    /// The service account allowed to push.
    pub subject: String,
    pub audience: String,
    /// Unix seconds of the last accepted push.
    pub last_accepted_at: Option<u64>,
    /// The kid that signed the last accepted push's token.
    pub last_accepted_kid: Option<String>,
    /// Unix seconds and reason of the last refused push.
    pub last_refused_at: Option<u64>,
    pub last_refused: Option<String>,
}

/// The push endpoint of one issuer.
#[derive(Debug)]
pub struct PushGate {
    issuer: String,
    index: usize,
    /// The push source's index among the issuer's sources, and its name.
    source: usize,
    name: String,
    policy: PushPolicy,
    /// What the refusals tell the operator to run.
    trust_command: String,
    pipeline: Arc<IssuerPipeline>,
    store: Arc<DocumentStore>,
    metrics: Arc<Metrics>,
    /// Every `jti` that authenticated a push, with the SHA-256 of its body, until the token
    /// has expired for certain (its lifetime is at most an hour, plus the skew).
    used: moka::sync::Cache<String, [u8; 32]>,
    /// Unix seconds at which `used` started: it knows nothing of tokens used before.
    started_at: u64,
    status: Mutex<PushStatus>,
}

/// Bounds the replay cache: far more pushes in an hour than one agent ever sends.
const USED_TOKENS_CAPACITY: u64 = 10_000;

/// What the gate needs of its issuer.
#[derive(Debug)]
pub struct GateParts {
    pub index: usize,
    pub source: usize,
    pub url: String,
    pub policy: PushPolicy,
    /// The configuration file, for the re-trust command in refusals.
    pub config_path: String,
    pub pipeline: Arc<IssuerPipeline>,
    pub store: Arc<DocumentStore>,
    pub metrics: Arc<Metrics>,
}

impl PushGate {
    pub fn new(parts: GateParts) -> Self {
        let issuer = parts.pipeline.issuer().to_owned();
        let trust_command = format!(
            "oidc-edge trust --config {} --issuer {issuer} --jwks FILE, with FILE from `kubectl get --raw /openid/v1/jwks` on the cluster",
            parts.config_path
        );
        let name = format!("push {}", parts.url);
        Self {
            status: Mutex::new(PushStatus {
                issuer: issuer.clone(),
                url: parts.url,
                subject: parts.policy.subject.clone(),
                audience: parts.policy.audience.clone(),
                ..PushStatus::default()
            }),
            issuer,
            index: parts.index,
            source: parts.source,
            name,
            policy: parts.policy,
            trust_command,
            pipeline: parts.pipeline,
            store: parts.store,
            metrics: parts.metrics,
            started_at: unix_now(),
            used: moka::sync::Cache::builder()
                .max_capacity(USED_TOKENS_CAPACITY)
                .time_to_live(MAX_PUSH_TOKEN_LIFETIME + Duration::from_secs(PUSH_CLOCK_SKEW_SECS))
                .build(),
        }
    }

    pub fn status(&self) -> PushStatus {
        self.status.lock().expect("push status lock").clone()
    }

    /// Checks the `Authorization` header of a push against the keys published now.
    pub fn authenticate(&self, authorization: Option<&[u8]>) -> Result<Verified, Refusal> {
        self.check_token(authorization, unix_now())
            .inspect_err(|refusal| self.refused(refusal))
    }

    /// Takes the body of an authenticated push: the replay check, validation, the signing
    /// key in the set, then the pipeline (merge, publish, persist). `Ok` says what is served.
    pub async fn accept(&self, verified: &Verified, body: Bytes) -> Result<String, Refusal> {
        let result = self.take(verified, body).await;
        match &result {
            Ok(_) => {
                let now = unix_now();
                let mut status = self.status.lock().expect("push status lock");
                status.last_accepted_at = Some(now);
                status.last_accepted_kid = Some(verified.kid.clone());
                self.metrics
                    .count_push(&self.issuer, PushResult::accepted, now);
            }
            Err(refusal) => self.refused(refusal),
        }
        result
    }

    /// Counts, logs and records a refusal.
    pub fn refused(&self, refusal: &Refusal) {
        let now = unix_now();
        warn!(issuer = %self.issuer, status = refusal.status.as_u16(), reason = %refusal.reason,
              "push refused; what is served is unchanged");
        let mut status = self.status.lock().expect("push status lock");
        status.last_refused_at = Some(now);
        status.last_refused = Some(refusal.reason.clone());
        self.metrics.count_push(&self.issuer, refusal.result, now);
    }

    async fn take(&self, verified: &Verified, body: Bytes) -> Result<String, Refusal> {
        let bad_body = |reason: String| {
            Refusal::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                PushResult::bad_body,
                reason,
            )
        };
        if let Some(jti) = &verified.jti {
            let hash: [u8; 32] = digest::digest(&digest::SHA256, &body)
                .as_ref()
                .try_into()
                .expect("SHA-256 is 32 bytes");
            // Bound on first use: the same token again may only repeat the same body (an
            // agent that retries after a lost answer), never carry another.
            let entry = self.used.entry(jti.clone()).or_insert(hash);
            if !entry.is_fresh() && *entry.value() != hash {
                return Err(Refusal::new(
                    StatusCode::CONFLICT,
                    PushResult::replay,
                    format!(
                        "the token with jti {jti:?} was already used to push another key set: a replay; \
                         each change needs a token of its own"
                    ),
                ));
            }
        }
        let valid =
            validate(&body).map_err(|e| bad_body(format!("the pushed key set is refused: {e}")))?;
        // The replay record starts with this process: a token issued before may have carried
        // another set before a restart. It may confirm what is listed, never change it.
        if verified.issued_at < self.started_at && !self.lists_exactly(&valid.keys) {
            return Err(Refusal::new(
                StatusCode::CONFLICT,
                PushResult::replay,
                "the token was issued before this edge started, so its earlier uses are unknown: \
                 a change needs a token issued since (the kubelet renews projected tokens at 80 % \
                 of their lifetime)",
            ));
        }
        // A cluster always publishes the key it signs with: a set without it would refuse
        // every token the cluster issues (and this edge would trust no key of the pusher).
        if !valid.keys.iter().any(|k| k.kid == verified.kid) {
            return Err(bad_body(format!(
                "the pushed key set does not list kid {:?}, which signed the push token; a cluster always publishes its signing key",
                verified.kid
            )));
        }
        self.pipeline
            .accept(self.source, &self.name, body)
            .await
            .map_err(|reason| {
                Refusal::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    PushResult::refused_set,
                    format!("the pushed key set is refused: {reason}"),
                )
            })?;
        let kids = self
            .store
            .get(self.index)
            .map(|s| s.kids.join(", "))
            .unwrap_or_default();
        info!(issuer = %self.issuer, kid = %verified.kid, subject = %verified.subject, "push accepted");
        Ok(format!("accepted; serving kids {kids}\n"))
    }

    /// Whether `keys` are exactly the keys listed now (a push that changes nothing).
    fn lists_exactly(&self, keys: &[crate::jwks::PublicJwk]) -> bool {
        let Some(snapshot) = self.store.get(self.index) else {
            return false;
        };
        keys.len() == snapshot.listed.len() && keys.iter().all(|k| snapshot.listed.contains(k))
    }

    fn check_token(&self, authorization: Option<&[u8]>, now: u64) -> Result<Verified, Refusal> {
        let unauthorized =
            |reason: String| Refusal::new(StatusCode::UNAUTHORIZED, PushResult::no_token, reason);
        let token = authorization
            .and_then(|h| h.strip_prefix(b"Bearer "))
            .and_then(|t| std::str::from_utf8(t).ok())
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                unauthorized(
                    "a push needs Authorization: Bearer with a service-account token of the cluster"
                        .to_owned(),
                )
            })?;
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| unauthorized(format!("the bearer token is not a JWT: {e}")))?;
        let kid = header
            .kid
            .ok_or_else(|| unauthorized("the bearer token has no kid".to_owned()))?;
        let forbidden =
            |result, reason: String| Refusal::new(StatusCode::FORBIDDEN, result, reason);
        let Some(snapshot) = self.store.get(self.index) else {
            return Err(forbidden(
                PushResult::unknown_key,
                format!(
                    "this edge publishes no key for {} yet, so no push can be authenticated; trust the cluster's keys once: {}",
                    self.issuer, self.trust_command
                ),
            ));
        };
        let Some(key) = snapshot.listed.iter().find(|k| k.kid == kid) else {
            if snapshot.kids.contains(&kid) {
                return Err(forbidden(
                    PushResult::retired_key,
                    format!(
                        "the token is signed by kid {kid:?}, which this edge keeps only for rotation grace: \
                         a retired key is still served but may not change the key set"
                    ),
                ));
            }
            return Err(forbidden(
                PushResult::unknown_key,
                format!(
                    "the token is signed by kid {kid:?}, which this edge does not publish for {}: a push is \
                     authenticated only by keys already published (an abrupt key change, a rebuilt cluster, \
                     or a forgery); if the cluster's keys were replaced on purpose, trust the new set once: {}",
                    self.issuer, self.trust_command
                ),
            ));
        };
        let claims = verify_signature(token, key, &kid).map_err(|reason| {
            Refusal::new(StatusCode::UNAUTHORIZED, PushResult::bad_signature, reason)
        })?;
        self.check_claims(&claims, now)
            .map_err(|reason| forbidden(PushResult::claims, reason))?;
        Ok(Verified {
            kid,
            subject: self.policy.subject.clone(),
            jti: claims.get("jti").and_then(Value::as_str).map(str::to_owned),
            issued_at: claims.get("iat").and_then(Value::as_u64).unwrap_or(0),
        })
    }

    /// Each claim the edge requires, with the value it saw.
    fn check_claims(&self, claims: &Value, now: u64) -> Result<(), String> {
        let text = |name: &str| claims.get(name).and_then(Value::as_str);
        let time = |name: &str| claims.get(name).and_then(Value::as_u64);
        match text("iss") {
            Some(iss) if iss == self.issuer => {}
            other => {
                return Err(format!(
                    "the token's iss is {other:?}, not the issuer {:?}",
                    self.issuer
                ));
            }
        }
        let audiences: Vec<&str> = match claims.get("aud") {
            Some(Value::String(one)) => vec![one.as_str()],
            Some(Value::Array(many)) => many.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        if !audiences.contains(&self.policy.audience.as_str()) {
            return Err(format!(
                "the token's aud is {audiences:?}, which does not contain the push audience {:?}",
                self.policy.audience
            ));
        }
        if text("sub") != Some(self.policy.subject.as_str()) {
            return Err(format!(
                "the token's sub is {:?}, not {:?}, the only account allowed to push",
                text("sub"),
                self.policy.subject
            ));
        }
        let (Some(exp), Some(iat)) = (time("exp"), time("iat")) else {
            return Err("the token needs exp and iat".to_owned());
        };
        if now > exp.saturating_add(PUSH_CLOCK_SKEW_SECS) {
            return Err(format!(
                "the token expired {} s ago (exp {exp})",
                now.saturating_sub(exp)
            ));
        }
        if let Some(nbf) = time("nbf")
            && nbf > now.saturating_add(PUSH_CLOCK_SKEW_SECS)
        {
            return Err(format!(
                "the token is not valid for {} s yet (nbf {nbf})",
                nbf - now
            ));
        }
        let lifetime = exp.saturating_sub(iat);
        if lifetime > MAX_PUSH_TOKEN_LIFETIME.as_secs() {
            return Err(format!(
                "the token lives {lifetime} s, more than the {} s a push accepts: use a projected token with expirationSeconds of at most 3600",
                MAX_PUSH_TOKEN_LIFETIME.as_secs()
            ));
        }
        if text("jti").is_none() && !self.policy.allow_tokens_without_jti {
            return Err(
                "the token has no jti, so a replay could not be told; Kubernetes adds one since 1.30 \
                 (allow_tokens_without_jti = true accepts older clusters)"
                    .to_owned(),
            );
        }
        Ok(())
    }
}

/// The token's claims when its signature verifies with `key`, in the algorithm the key names.
fn verify_signature(token: &str, key: &crate::jwks::PublicJwk, kid: &str) -> Result<Value, String> {
    let jwk: Jwk = serde_json::to_value(key)
        .and_then(serde_json::from_value)
        .map_err(|e| format!("published key {kid:?} cannot verify tokens: {e}"))?;
    let decoding = DecodingKey::from_jwk(&jwk)
        .map_err(|e| format!("published key {kid:?} cannot verify tokens: {e}"))?;
    let alg: jsonwebtoken::Algorithm = key
        .signing_alg()
        .parse()
        .map_err(|e| format!("published key {kid:?} has no usable algorithm: {e}"))?;
    // Only the signature and the algorithm here; every claim is checked by hand, so that
    // each refusal names what it saw.
    let mut validation = Validation::new(alg);
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    validation.required_spec_claims.clear();
    jsonwebtoken::decode::<Value>(token, &decoding, &validation)
        .map(|data| data.claims)
        .map_err(|e| {
            format!("the token's signature does not verify with published key {kid:?}: {e}")
        })
}
