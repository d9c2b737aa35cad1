//! The self-test (issue 20): would a relying party accept a token of this cluster right now?
//! Every `interval` it mints a token through TokenRequest with the issuer's apiserver source's
//! credentials, then runs the doctor on it: the issuer's public discovery document and JWKS
//! fetched as AWS fetches them (no redirects, 5 s, public roots or the given CA), and the
//! token verified against them (its kid published, signature, `iss`, `aud`, times, size).
//!
//! It never makes serving less available: it runs in its own task, and its result only
//! reaches `/status`, a metric and the log, and `/readyz` when `readiness = true` asks for it
//! (off by default: see [`not_ready_reason`] for why that can cost availability).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::check::{self, Status, TokenSource};
use crate::jwks::refresh::{jitter_sample, next_refresh_in};
use crate::jwks::source::{AnySource, SourceConfig};
use crate::jwks::unix_now;
use crate::metrics::Metrics;
use crate::relying_party::Target;

/// A self-test token's lifetime: TokenRequest's minimum (600 s).
const TOKEN_SECONDS: u64 = 600;

/// `[issuers.selftest]`.
#[derive(Debug, Clone)]
pub struct SelfTestConfig {
    /// The index of the apiserver source whose credentials mint the tokens.
    pub source: usize,
    pub namespace: String,
    pub service_account: String,
    /// The audience of the minted token: the relying party's client ID.
    pub audience: String,
    pub interval: Duration,
    /// A CA to trust for the public URL instead of the public roots (a test, a private CA).
    pub ca_file: Option<PathBuf>,
    /// Connect here instead of resolving the issuer's host (a name not in DNS yet).
    pub connect_to: Option<SocketAddr>,
    /// A failed self-test makes the server not ready (`/readyz` 503 with the reason).
    pub readiness: bool,
}

/// Why a failed self-test makes the server not ready, when it is part of readiness: its
/// headline (the signing key that is not public yet) or its failed steps. Before the first
/// run, and while it passes, nothing.
///
/// Off by default because readiness usually decides who gets traffic: when every replica
/// fails the self-test through the public name that routes only to ready replicas (a key
/// that is not public yet on all of them, a broken proxy), all of them leave the load
/// balancer, the public name then answers nothing, and the self-test cannot pass again
/// until a replica is ready anyway.
pub fn not_ready_reason(status: &SelfTestStatus, readiness: bool) -> Option<String> {
    if !readiness || status.passed != Some(false) {
        return None;
    }
    let why: Vec<&str> = (status.headline.iter())
        .chain(status.failures.iter())
        .map(String::as_str)
        .collect();
    Some(format!(
        "{}: self-test fails: {}",
        status.issuer,
        why.join("; ")
    ))
}

/// The last self-test of one issuer, in `/status`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SelfTestStatus {
    pub issuer: String,
    pub service_account: String,
    pub audience: String,
    /// Unix seconds.
    pub last_run_at: Option<u64>,
    /// `None` before the first run.
    pub passed: Option<bool>,
    /// The token's kid, when one was minted.
    pub kid: Option<String>,
    /// The signing key that is not public yet, said first (see `check --token`).
    pub headline: Option<String>,
    /// Each failed step: `RULE check: what was seen`, or `TokenRequest: why`.
    pub failures: Vec<String>,
}

/// One issuer's self-test.
#[derive(Debug)]
pub struct SelfTest {
    issuer: String,
    config: SelfTestConfig,
    source: tokio::sync::Mutex<AnySource>,
    status: Mutex<SelfTestStatus>,
    metrics: Arc<Metrics>,
}

impl SelfTest {
    /// Its own client for the apiserver source (the refresh task keeps the other).
    pub fn new(
        issuer: &str,
        config: &SelfTestConfig,
        sources: &[SourceConfig],
        metrics: &Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        let source = &sources[config.source];
        Ok(Self {
            issuer: issuer.to_owned(),
            config: config.clone(),
            source: tokio::sync::Mutex::new(AnySource::from_config(&source.kind, source.timeout)?),
            status: Mutex::new(SelfTestStatus {
                issuer: issuer.to_owned(),
                service_account: format!("{}/{}", config.namespace, config.service_account),
                audience: config.audience.clone(),
                ..SelfTestStatus::default()
            }),
            metrics: Arc::clone(metrics),
        })
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    pub fn status(&self) -> SelfTestStatus {
        self.status.lock().expect("self-test status").clone()
    }

    /// Why this self-test makes the server not ready, if it is part of readiness and fails.
    pub fn not_ready_reason(&self) -> Option<String> {
        not_ready_reason(&self.status(), self.config.readiness)
    }

    /// Runs every `interval` (jittered) until `cancel` fires.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = self.run_once() => {}
            }
            let delay = next_refresh_in(self.config.interval, 0, jitter_sample());
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// One self-test: mint, fetch, verify; the result recorded.
    pub async fn run_once(&self) {
        let cfg = &self.config;
        let minted = self
            .source
            .lock()
            .await
            .token_request(
                &cfg.namespace,
                &cfg.service_account,
                &cfg.audience,
                TOKEN_SECONDS,
            )
            .await;
        let mut outcome = SelfTestStatus {
            last_run_at: Some(unix_now()),
            ..self.status()
        };
        outcome.headline = None;
        outcome.kid = None;
        outcome.failures = match minted {
            Err(why) => vec![format!("TokenRequest: {why}")],
            Ok(token) => {
                outcome.kid = jsonwebtoken::decode_header(&token).ok().and_then(|h| h.kid);
                let options = check::Options {
                    issuer: self.issuer.clone(),
                    ca_file: cfg.ca_file.clone(),
                    token: Some(TokenSource::Inline(token)),
                    audience: Some(cfg.audience.clone()),
                    targets: vec![Target::Aws],
                    connect_to: cfg.connect_to,
                };
                match check::run(&options).await {
                    Ok(report) => {
                        outcome.headline = report.headline.clone();
                        report
                            .findings
                            .iter()
                            .filter(|f| f.status == Status::Fail)
                            .map(|f| format!("{} {}: {}", f.rule, f.check, f.observed))
                            .collect()
                    }
                    Err(e) => vec![format!("doctor: {e:#}")],
                }
            }
        };
        let passed = outcome.failures.is_empty();
        outcome.passed = Some(passed);
        let mut status = self.status.lock().expect("self-test status");
        let changed = status.passed != Some(passed) || status.failures != outcome.failures;
        if changed && passed {
            info!(issuer = %self.issuer, kid = ?outcome.kid, "self-test passes: a relying party would accept this cluster's tokens");
        } else if changed {
            warn!(issuer = %self.issuer, headline = ?outcome.headline, failures = ?outcome.failures,
                  "self-test fails: a relying party would refuse this cluster's tokens");
        }
        self.metrics.set_selftest_passed(&self.issuer, passed);
        *status = outcome;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(passed: Option<bool>, headline: Option<&str>, failures: &[&str]) -> SelfTestStatus {
        SelfTestStatus {
            issuer: "https://oidc.example.com".into(),
            passed,
            headline: headline.map(str::to_owned),
            failures: failures.iter().map(|f| (*f).to_owned()).collect(),
            ..SelfTestStatus::default()
        }
    }

    #[test]
    fn only_a_failed_self_test_that_is_part_of_readiness_makes_the_server_not_ready() {
        let failed = status(
            Some(false),
            None,
            &["A-6 discovery document is served without a redirect: 302 to https://x/"],
        );
        assert_eq!(not_ready_reason(&failed, false), None);
        assert_eq!(
            not_ready_reason(&failed, true).as_deref(),
            Some(
                "https://oidc.example.com: self-test fails: A-6 discovery document is served without a redirect: 302 to https://x/"
            )
        );
        assert_eq!(not_ready_reason(&status(None, None, &[]), true), None);
        assert_eq!(not_ready_reason(&status(Some(true), None, &[]), true), None);
        let unpublished = status(
            Some(false),
            Some("THE TOKEN'S SIGNING KEY IS NOT PUBLIC: kid \"k\" …"),
            &["A-4 token's kid is published: k"],
        );
        assert_eq!(
            not_ready_reason(&unpublished, true).as_deref(),
            Some(
                "https://oidc.example.com: self-test fails: THE TOKEN'S SIGNING KEY IS NOT PUBLIC: kid \"k\" …; A-4 token's kid is published: k"
            )
        );
    }
}
