//! Prometheus metrics, served only on the admin listener. One registry, no global state.
//!
//! Request counters are created up front for every route and status we answer, so that the
//! public handler only increments an atomic: no lock, no label lookup on the hot path.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The issuer URL, or "" for requests that matched no document.
    pub issuer: String,
    /// `discovery`, `jwks`, or `none`.
    pub document: &'static str,
    pub code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefreshLabels {
    pub issuer: String,
    /// The source's index in `issuers[].sources`.
    pub source: String,
    pub result: RefreshResult,
}

/// Outcome of one refresh of one source.
#[derive(
    Clone, Copy, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelValue,
)]
#[allow(non_camel_case_types)]
pub enum RefreshResult {
    /// A new body, validated and merged.
    ok,
    /// The source did not change (file sources).
    unchanged,
    /// The fetch failed: network, TLS, status, size, token file.
    fetch_error,
    /// The body was refused by validation (private key, not a JWK set, nothing usable).
    rejected,
    /// The merged set was refused (conflicting kids, over max_keys).
    merge_rejected,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IssuerLabels {
    pub issuer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub issuer: String,
    pub source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PublishLabels {
    pub issuer: String,
    /// The target's `to`, e.g. `s3://bucket/prefix`.
    pub target: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PublishResultLabels {
    pub issuer: String,
    pub target: String,
    pub result: PublishResult,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PushLabels {
    pub issuer: String,
    pub result: PushResult,
}

/// Outcome of one push an agent sent to this edge (issue 18).
#[derive(
    Clone, Copy, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelValue,
)]
#[allow(non_camel_case_types)]
pub enum PushResult {
    /// Authenticated, validated and merged (or already what is served).
    accepted,
    /// No bearer token, or one that is not a JWT with a kid.
    no_token,
    /// Signed by a key this edge does not publish: a forgery or an abrupt key change.
    unknown_key,
    /// Signed by a key kept only for rotation grace.
    retired_key,
    /// The signature does not verify with the published key.
    bad_signature,
    /// `iss`, `aud`, `sub`, times, lifetime or `jti` refused.
    claims,
    /// A `jti` already used for another body.
    replay,
    /// The body: too large, too slow, not a public JWK set, or not listing the signing key.
    bad_body,
    /// A valid set the merge refused (over max_keys, a kid with other material).
    refused_set,
}

/// Outcome of one publish attempt to one target.
#[derive(
    Clone, Copy, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelValue,
)]
#[allow(non_camel_case_types)]
pub enum PublishResult {
    /// At least one object was written and read back.
    written,
    /// The bucket already held both documents.
    unchanged,
    /// A request failed, or a read-back differed.
    error,
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    refreshes: Family<RefreshLabels, Counter>,
    keys: Family<IssuerLabels, Gauge>,
    jwks_age: Family<IssuerLabels, Gauge<f64, AtomicU64>>,
    issuer_mismatch: Family<SourceLabels, Gauge>,
    cert_not_after: Family<ListenerLabels, Gauge>,
    acme_events: Family<AcmeEventLabels, Counter>,
    /// M2: failed writes of an issuer's state file; each is retried on every refresh.
    state_write_errors: Family<IssuerLabels, Counter>,
    connections_closed: Family<ConnectionCloseLabels, Counter>,
    publishes: Family<PublishResultLabels, Counter>,
    published_objects: Family<PublishLabels, Counter>,
    publish_last_success: Family<PublishLabels, Gauge>,
    publish_public_mismatch: Family<PublishLabels, Gauge>,
    key_first_seen: Family<KeyLabels, Gauge>,
    selftest_passed: Family<IssuerLabels, Gauge>,
    key_retiring_until: Family<KeyLabels, Gauge>,
    pushes: Family<PushLabels, Counter>,
    push_last_accepted: Family<IssuerLabels, Gauge>,
    relying_party_last_fetch: Family<RelyingPartyLabels, Gauge>,
    /// The relying-party series exported by the last scrape, so that a forgotten record's
    /// series is removed without a moment in which the others are missing.
    relying_party_exported: std::sync::Mutex<Vec<RelyingPartyLabels>>,
    /// The kids exported per issuer, so that a key's series go when the key does.
    exported_kids: std::sync::Mutex<std::collections::HashMap<String, Vec<String>>>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RelyingPartyLabels {
    pub issuer: String,
    /// `discovery` or `jwks`.
    pub document: &'static str,
    /// `aws`, `google`, `microsoft`, or a configured family.
    pub family: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KeyLabels {
    pub issuer: String,
    pub kid: String,
}

/// One published key's lifecycle, as [`Metrics::set_key_lifecycles`] exports it.
#[derive(Debug, Clone)]
pub struct KeyTimes {
    pub kid: String,
    /// Unix seconds; unknown for keys restored from an older state file.
    pub first_seen_at: Option<u64>,
    /// Unix seconds until which a vanished key stays published.
    pub retiring_until: Option<u64>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionCloseLabels {
    pub listener: &'static str,
    /// Which limit closed it: see [`crate::listener::Closed`].
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    pub listener: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AcmeEventLabels {
    /// `deployed_cached_cert`, `deployed_new_cert`, `cert_cache_store`, `account_cache_store`
    /// (also counted when a failed write is retried successfully), `error`, or `timeout` (a
    /// driver step exceeded `https.acme.step_timeout`, M1).
    pub event: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("oidc_edge");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "Public requests answered, by issuer, document and status code",
            requests.clone(),
        );
        let refreshes = Family::<RefreshLabels, Counter>::default();
        registry.register(
            "refreshes",
            "Key-set refreshes by issuer, source and result",
            refreshes.clone(),
        );
        let keys = Family::<IssuerLabels, Gauge>::default();
        registry.register(
            "keys",
            "Keys published per issuer, retained ones included",
            keys.clone(),
        );
        let jwks_age = Family::<IssuerLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "jwks_age_seconds",
            "Seconds since a source last confirmed the published key set",
            jwks_age.clone(),
        );
        let issuer_mismatch = Family::<SourceLabels, Gauge>::default();
        registry.register(
            "upstream_issuer_mismatch",
            "1 when the apiserver signs tokens for another issuer than the configured one (F-1)",
            issuer_mismatch.clone(),
        );
        let cert_not_after = Family::<ListenerLabels, Gauge>::default();
        registry.register(
            "certificate_not_after_seconds",
            "Unix time at which the served certificate expires",
            cert_not_after.clone(),
        );
        let acme_events = Family::<AcmeEventLabels, Counter>::default();
        registry.register("acme_events", "ACME events by kind", acme_events.clone());
        let state_write_errors = Family::<IssuerLabels, Counter>::default();
        registry.register(
            "state_write_errors",
            "Failed writes of the persisted key set, retried on every refresh until one succeeds",
            state_write_errors.clone(),
        );
        let connections_closed = Family::<ConnectionCloseLabels, Counter>::default();
        registry.register(
            "connections_closed_by_limit",
            "Connections the server closed because a limit or deadline ran out, by listener and reason",
            connections_closed.clone(),
        );
        let publishes = Family::<PublishResultLabels, Counter>::default();
        registry.register(
            "publishes",
            "Publish attempts to a bucket target, by issuer, target and result",
            publishes.clone(),
        );
        let published_objects = Family::<PublishLabels, Counter>::default();
        registry.register(
            "published_objects",
            "Objects written to a bucket target (and read back), by issuer and target",
            published_objects.clone(),
        );
        let publish_last_success = Family::<PublishLabels, Gauge>::default();
        registry.register(
            "publish_last_success_seconds",
            "Unix time of the last publish attempt that left the target holding the served documents",
            publish_last_success.clone(),
        );
        let publish_public_mismatch = Family::<PublishLabels, Gauge>::default();
        registry.register(
            "publish_public_mismatch",
            "1 when a target's public_url did not serve the bucket's bytes and content type at the last publish",
            publish_public_mismatch.clone(),
        );
        let key_first_seen = Family::<KeyLabels, Gauge>::default();
        registry.register(
            "key_first_seen_seconds",
            "Unix time at which a source first listed a published key (it was served from then on)",
            key_first_seen.clone(),
        );
        let key_retiring_until = Family::<KeyLabels, Gauge>::default();
        registry.register(
            "key_retiring_until_seconds",
            "Unix time until which a key no source lists any more stays published (key_retention)",
            key_retiring_until.clone(),
        );
        let relying_party_last_fetch = Family::<RelyingPartyLabels, Gauge>::default();
        registry.register(
            "relying_party_last_fetch_seconds",
            "Unix time of a relying party's last fetch of a document, recognised by its User-Agent (a hint, not proof); gone after relying_parties.forget_after without a fetch",
            relying_party_last_fetch.clone(),
        );
        let selftest_passed = Family::<IssuerLabels, Gauge>::default();
        registry.register(
            "selftest_passed",
            "1 when the last self-test's token would be accepted by a relying party, 0 when not",
            selftest_passed.clone(),
        );
        let pushes = Family::<PushLabels, Counter>::default();
        registry.register(
            "pushes_received",
            "Key-set pushes received from an agent in the cluster, by issuer and result",
            pushes.clone(),
        );
        let push_last_accepted = Family::<IssuerLabels, Gauge>::default();
        registry.register(
            "push_last_accepted_seconds",
            "Unix time of the last push this edge accepted for an issuer",
            push_last_accepted.clone(),
        );
        Self {
            registry,
            requests,
            pushes,
            push_last_accepted,
            refreshes,
            keys,
            jwks_age,
            issuer_mismatch,
            cert_not_after,
            acme_events,
            state_write_errors,
            connections_closed,
            publishes,
            published_objects,
            publish_last_success,
            publish_public_mismatch,
            key_first_seen,
            key_retiring_until,
            selftest_passed,
            relying_party_last_fetch,
            relying_party_exported: std::sync::Mutex::default(),
            exported_kids: std::sync::Mutex::default(),
        }
    }

    /// The counter for one (issuer, document, code), created now so that serving only increments.
    pub fn request_counter(&self, issuer: &str, document: &'static str, code: u16) -> Counter {
        self.requests
            .get_or_create(&RequestLabels {
                issuer: issuer.to_owned(),
                document,
                code,
            })
            .clone()
    }

    pub fn count_refresh(&self, issuer: &str, source: usize, result: RefreshResult) {
        self.refreshes
            .get_or_create(&RefreshLabels {
                issuer: issuer.to_owned(),
                source: source.to_string(),
                result,
            })
            .inc();
    }

    /// `oidc_edge_keys` of `issuer`: how many keys it publishes.
    pub fn set_keys(&self, issuer: &str, keys: usize) {
        self.keys
            .get_or_create(&IssuerLabels {
                issuer: issuer.to_owned(),
            })
            .set(i64::try_from(keys).unwrap_or(i64::MAX));
    }

    /// Whether source `source` of `issuer` signs for another issuer (F-1).
    pub fn set_issuer_mismatch(&self, issuer: &str, source: usize, mismatch: bool) {
        self.issuer_mismatch
            .get_or_create(&SourceLabels {
                issuer: issuer.to_owned(),
                source: source.to_string(),
            })
            .set(i64::from(mismatch));
    }

    /// One failed write of `issuer`'s state file (M2).
    pub fn count_state_write_error(&self, issuer: &str) {
        self.state_write_errors
            .get_or_create(&IssuerLabels {
                issuer: issuer.to_owned(),
            })
            .inc();
    }

    /// The family of connections closed by a limit, for each listener's own counters.
    pub fn connections_closed(&self) -> Family<ConnectionCloseLabels, Counter> {
        self.connections_closed.clone()
    }

    /// `oidc_edge_jwks_age_seconds` of `issuer`, whose set a source last confirmed at
    /// `confirmed_at` (Unix seconds): computed at scrape time, so it grows between refreshes.
    pub fn observe_jwks_age(&self, issuer: &str, confirmed_at: u64) {
        let age = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |now| {
                now.saturating_sub(std::time::Duration::from_secs(confirmed_at))
                    .as_secs_f64()
            });
        self.jwks_age
            .get_or_create(&IssuerLabels {
                issuer: issuer.to_owned(),
            })
            .set(age);
    }

    pub fn set_cert_not_after(&self, listener: &'static str, not_after: std::time::SystemTime) {
        let secs = not_after
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        self.cert_not_after
            .get_or_create(&ListenerLabels { listener })
            .set(secs);
    }

    pub fn count_acme_event(&self, event: &'static str) {
        self.acme_events
            .get_or_create(&AcmeEventLabels { event })
            .inc();
    }

    /// One publish attempt to `target` of `issuer`, which wrote `written` objects; a success
    /// also sets the target's last-success time to `now` (Unix seconds).
    pub fn count_publish(
        &self,
        labels: &PublishLabels,
        result: PublishResult,
        written: usize,
        now: u64,
    ) {
        self.publishes
            .get_or_create(&PublishResultLabels {
                issuer: labels.issuer.clone(),
                target: labels.target.clone(),
                result,
            })
            .inc();
        if written > 0 {
            self.published_objects
                .get_or_create(labels)
                .inc_by(u64::try_from(written).unwrap_or(u64::MAX));
        }
        if result != PublishResult::error {
            self.publish_last_success
                .get_or_create(labels)
                .set(i64::try_from(now).unwrap_or(i64::MAX));
        }
    }

    /// One push received for `issuer`; an accepted one also sets its last-accepted time.
    pub fn count_push(&self, issuer: &str, result: PushResult, now: u64) {
        self.pushes
            .get_or_create(&PushLabels {
                issuer: issuer.to_owned(),
                result,
            })
            .inc();
        if result == PushResult::accepted {
            self.push_last_accepted
                .get_or_create(&IssuerLabels {
                    issuer: issuer.to_owned(),
                })
                .set(i64::try_from(now).unwrap_or(i64::MAX));
        }
    }

    /// Whether `target`'s public URL differed from the bucket at its last publish.
    pub fn set_public_mismatch(&self, labels: &PublishLabels, mismatch: bool) {
        self.publish_public_mismatch
            .get_or_create(labels)
            .set(i64::from(mismatch));
    }

    /// The lifecycle of every key `issuer` publishes now; the series of keys it no longer
    /// publishes are removed.
    pub fn set_key_lifecycles(&self, issuer: &str, keys: &[KeyTimes]) {
        let seconds = |t: u64| i64::try_from(t).unwrap_or(i64::MAX);
        let labels = |kid: &str| KeyLabels {
            issuer: issuer.to_owned(),
            kid: kid.to_owned(),
        };
        let mut exported = self.exported_kids.lock().expect("metrics lock");
        let previous = exported.insert(
            issuer.to_owned(),
            keys.iter().map(|k| k.kid.clone()).collect(),
        );
        for kid in previous.unwrap_or_default() {
            self.key_first_seen.remove(&labels(&kid));
            self.key_retiring_until.remove(&labels(&kid));
        }
        for key in keys {
            if let Some(at) = key.first_seen_at {
                self.key_first_seen
                    .get_or_create(&labels(&key.kid))
                    .set(seconds(at));
            }
            if let Some(until) = key.retiring_until {
                self.key_retiring_until
                    .get_or_create(&labels(&key.kid))
                    .set(seconds(until));
            }
        }
    }

    /// Every relying-party fetch record, as (issuer, document, family, Unix seconds): the
    /// series of records that are gone are removed.
    pub fn set_relying_party_fetches<'a>(
        &self,
        fetches: impl IntoIterator<Item = (&'a str, &'static str, &'a str, u64)>,
    ) {
        let mut exported = self.relying_party_exported.lock().expect("metrics lock");
        let current: Vec<(RelyingPartyLabels, u64)> = fetches
            .into_iter()
            .map(|(issuer, document, family, at)| {
                let labels = RelyingPartyLabels {
                    issuer: issuer.to_owned(),
                    document,
                    family: family.to_owned(),
                };
                (labels, at)
            })
            .collect();
        for gone in exported.iter() {
            if !current.iter().any(|(labels, _)| labels == gone) {
                self.relying_party_last_fetch.remove(gone);
            }
        }
        for (labels, at) in &current {
            self.relying_party_last_fetch
                .get_or_create(labels)
                .set(i64::try_from(*at).unwrap_or(i64::MAX));
        }
        *exported = current.into_iter().map(|(labels, _)| labels).collect();
    }

    /// The outcome of `issuer`'s last self-test.
    pub fn set_selftest_passed(&self, issuer: &str, passed: bool) {
        self.selftest_passed
            .get_or_create(&IssuerLabels {
                issuer: issuer.to_owned(),
            })
            .set(i64::from(passed));
    }

    /// The text exposition (OpenMetrics 1.0, which Prometheus scrapes natively).
    pub fn render(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The relying-party series, sorted (a family's series come in hash order).
    fn series(metrics: &Metrics) -> Vec<String> {
        let mut lines: Vec<String> = metrics
            .render()
            .lines()
            .filter(|l| l.starts_with("oidc_edge_relying_party_last_fetch_seconds{"))
            .map(str::to_owned)
            .collect();
        lines.sort();
        lines
    }

    #[test]
    fn a_forgotten_relying_party_record_takes_its_series_with_it() {
        let metrics = Metrics::new();
        let issuer = "https://oidc.example.com";
        metrics.set_relying_party_fetches([
            (issuer, "jwks", "aws", 1_800_000_000),
            (issuer, "discovery", "aws", 1_800_000_001),
        ]);
        assert_eq!(
            series(&metrics),
            [
                "oidc_edge_relying_party_last_fetch_seconds{issuer=\"https://oidc.example.com\",document=\"discovery\",family=\"aws\"} 1800000001",
                "oidc_edge_relying_party_last_fetch_seconds{issuer=\"https://oidc.example.com\",document=\"jwks\",family=\"aws\"} 1800000000",
            ]
        );
        metrics.set_relying_party_fetches([(issuer, "jwks", "aws", 1_800_000_060)]);
        assert_eq!(
            series(&metrics),
            [
                "oidc_edge_relying_party_last_fetch_seconds{issuer=\"https://oidc.example.com\",document=\"jwks\",family=\"aws\"} 1800000060"
            ]
        );
        metrics.set_relying_party_fetches([]);
        assert_eq!(series(&metrics), Vec::<String>::new());
    }
}
