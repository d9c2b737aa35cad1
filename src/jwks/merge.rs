//! Merging the sources of one issuer into the set we publish, with rotation grace.
//!
//! Relying parties cache keys, and tokens signed by a key that vanished upstream stay
//! valid until they expire, so a key that disappears from every source stays published for
//! `key_retention` before it is dropped (X-6, Z-9).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::PublicJwk;

/// The keys of one issuer, by kid, with the moment each one vanished from every source.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ledger {
    pub keys: BTreeMap<String, LedgerEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    pub jwk: PublicJwk,
    /// Unix seconds at which no source listed the key any more; `None` while some source does.
    pub vanished_at: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MergeError {
    #[error("kid {0:?} names different keys in two sources")]
    ConflictingKid(String),
    #[error("{count} keys would be published, more than max_keys = {max} (A-9, Z-4)")]
    TooManyKeys { count: usize, max: usize },
}

impl Ledger {
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The published keys, ordered by kid.
    pub fn jwks(&self) -> impl Iterator<Item = &PublicJwk> {
        self.keys.values().map(|e| &e.jwk)
    }

    pub fn kids(&self) -> Vec<String> {
        self.keys.keys().cloned().collect()
    }

    /// Drops keys whose grace ran out by `now` (used on a state file loaded at start).
    pub fn expire(&mut self, now: u64, retention: Duration) {
        self.keys.retain(|_, e| !expired(e, now, retention));
    }
}

fn expired(entry: &LedgerEntry, now: u64, retention: Duration) -> bool {
    entry
        .vanished_at
        .is_some_and(|at| now.saturating_sub(at) >= retention.as_secs())
}

/// Computes the next ledger from each source's last good set (`None`: the source has not
/// succeeded since start) and the previous ledger.
///
/// A key absent from every source that has answered starts its grace now; while some source
/// has not answered yet, absent keys keep their state, since that source may still list them.
pub fn merge(
    sources: &[Option<&[PublicJwk]>],
    previous: &Ledger,
    now: u64,
    retention: Duration,
    max_keys: usize,
) -> Result<Ledger, MergeError> {
    let mut keys: BTreeMap<String, LedgerEntry> = BTreeMap::new();
    for jwk in sources.iter().flatten().flat_map(|set| set.iter()) {
        match keys.get(&jwk.kid) {
            Some(seen) if seen.jwk == *jwk => {}
            Some(_) => return Err(MergeError::ConflictingKid(jwk.kid.clone())),
            None => {
                let entry = LedgerEntry {
                    jwk: jwk.clone(),
                    vanished_at: None,
                };
                keys.insert(jwk.kid.clone(), entry);
            }
        }
    }
    let all_answered = sources.iter().all(Option::is_some);
    for (kid, old) in &previous.keys {
        if keys.contains_key(kid) {
            continue;
        }
        let vanished_at = match old.vanished_at {
            Some(at) => Some(at),
            None if all_answered => Some(now),
            None => None,
        };
        let entry = LedgerEntry {
            jwk: old.jwk.clone(),
            vanished_at,
        };
        if !expired(&entry, now, retention) {
            keys.insert(kid.clone(), entry);
        }
    }
    if keys.len() > max_keys {
        return Err(MergeError::TooManyKeys {
            count: keys.len(),
            max: max_keys,
        });
    }
    Ok(Ledger { keys })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn key(kid: &str, n: &str) -> PublicJwk {
        PublicJwk {
            kty: "RSA".into(),
            use_: "sig".into(),
            kid: kid.into(),
            alg: Some("RS256".into()),
            n: Some(n.into()),
            e: Some("AQAB".into()),
            crv: None,
            x: None,
            y: None,
        }
    }

    fn kids(ledger: &Ledger) -> Vec<&str> {
        ledger.keys.keys().map(String::as_str).collect()
    }

    #[test]
    fn sources_are_unioned_by_kid() {
        let a = [key("a", "1"), key("b", "2")];
        let b = [key("b", "2"), key("c", "3")];
        let merged = merge(&[Some(&a), Some(&b)], &Ledger::default(), 0, HOUR, 100).expect("ok");
        assert_eq!(kids(&merged), ["a", "b", "c"]);
        assert!(merged.keys.values().all(|e| e.vanished_at.is_none()));
    }

    #[test]
    fn same_kid_with_different_material_across_sources_is_refused() {
        let a = [key("a", "1")];
        let b = [key("a", "2")];
        let err = merge(&[Some(&a), Some(&b)], &Ledger::default(), 0, HOUR, 100).expect_err("x");
        assert_eq!(err, MergeError::ConflictingKid("a".into()));
    }

    #[test]
    fn a_rotated_out_key_is_kept_for_the_retention_then_dropped() {
        let before = [key("old", "1")];
        let after = [key("new", "2")];
        let l0 = merge(&[Some(&before)], &Ledger::default(), 1000, HOUR, 100).expect("ok");
        let l1 = merge(&[Some(&after)], &l0, 1010, HOUR, 100).expect("ok");
        assert_eq!(kids(&l1), ["new", "old"]);
        assert_eq!(l1.keys["old"].vanished_at, Some(1010));
        let l2 = merge(&[Some(&after)], &l1, 1010 + 3599, HOUR, 100).expect("ok");
        assert_eq!(kids(&l2), ["new", "old"]);
        assert_eq!(l2.keys["old"].vanished_at, Some(1010), "grace starts once");
        let l3 = merge(&[Some(&after)], &l2, 1010 + 3600, HOUR, 100).expect("ok");
        assert_eq!(kids(&l3), ["new"]);
    }

    #[test]
    fn a_key_that_comes_back_is_current_again() {
        let with = [key("a", "1"), key("b", "2")];
        let without = [key("a", "1")];
        let l0 = merge(&[Some(&with)], &Ledger::default(), 0, HOUR, 100).expect("ok");
        let l1 = merge(&[Some(&without)], &l0, 10, HOUR, 100).expect("ok");
        let l2 = merge(&[Some(&with)], &l1, 20, HOUR, 100).expect("ok");
        assert_eq!(l2.keys["b"].vanished_at, None);
    }

    #[test]
    fn persisted_keys_do_not_start_their_grace_before_every_source_answered() {
        let persisted = merge(
            &[Some(&[key("a", "1")]), Some(&[key("b", "2")])],
            &Ledger::default(),
            0,
            HOUR,
            100,
        )
        .expect("ok");
        // After a restart only the first source has answered so far.
        let l1 = merge(
            &[Some(&[key("a", "1")]), None],
            &persisted,
            10_000,
            HOUR,
            100,
        )
        .expect("ok");
        assert_eq!(kids(&l1), ["a", "b"]);
        assert_eq!(l1.keys["b"].vanished_at, None);
    }

    #[test]
    fn more_keys_than_max_keys_is_refused_counting_retained_ones() {
        let l0 = merge(&[Some(&[key("a", "1")])], &Ledger::default(), 0, HOUR, 2).expect("ok");
        let l1 = merge(&[Some(&[key("b", "2")])], &l0, 1, HOUR, 2).expect("ok");
        let err = merge(&[Some(&[key("c", "3")])], &l1, 2, HOUR, 2).expect_err("three");
        assert_eq!(err, MergeError::TooManyKeys { count: 3, max: 2 });
    }

    #[test]
    fn the_default_retention_meets_x6_for_every_allowed_max_age() {
        use crate::config::{DEFAULT_KEY_RETENTION, MAX_CACHE_MAX_AGE};
        // keep an old key until token TTL (1 h) + max-age + 5 min skew after its last use.
        let x6 = HOUR + MAX_CACHE_MAX_AGE + Duration::from_secs(300);
        assert!(
            DEFAULT_KEY_RETENTION >= x6,
            "{DEFAULT_KEY_RETENTION:?} < {x6:?}"
        );
        // Z-9: the Azure Workload Identity webhook projects 24 h tokens by default.
        assert_eq!(DEFAULT_KEY_RETENTION, Duration::from_secs(86_400));
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("jwks.json"), "{}").expect("write");
        let cfg = crate::config::Config::from_toml_str(
            "[[issuers]]\nissuer = \"https://oidc.example.com\"\n[[issuers.sources]]\n\
             kind = \"file\"\npath = \"jwks.json\"\n[http]\nlisten = \"127.0.0.1:0\"\n",
            &dir.path().join("config.toml"),
        )
        .expect("config");
        assert_eq!(cfg.issuers[0].key_retention, Duration::from_secs(86_400));
    }

    #[test]
    fn expire_drops_only_keys_past_their_grace() {
        let l0 = merge(
            &[Some(&[key("a", "1"), key("b", "2")])],
            &Ledger::default(),
            0,
            HOUR,
            9,
        )
        .expect("ok");
        let mut l1 = merge(&[Some(&[key("a", "1")])], &l0, 100, HOUR, 9).expect("ok");
        l1.expire(100 + 3599, HOUR);
        assert_eq!(kids(&l1), ["a", "b"]);
        l1.expire(100 + 3600, HOUR);
        assert_eq!(kids(&l1), ["a"]);
    }
}
