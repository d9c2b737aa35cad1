//! Merging the sources of one issuer into the set we publish, with rotation grace.
//!
//! Relying parties cache keys, and tokens signed by a key that vanished upstream stay
//! valid until they expire, so a key that disappears from every source stays published for
//! `key_retention` before it is dropped (X-6, Z-9).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::PublicJwk;

/// at least token TTL + max-age + 5 min (2 h 5 min at the largest max-age); Z-9: 24 h
/// covers Azure Workload Identity's default token lifetime.
pub const DEFAULT_KEY_RETENTION: Duration = Duration::from_secs(86_400);

/// The key side of one issuer: how long a vanished key stays published (rotation grace), and
/// how many keys are published at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyPolicy {
    pub retention: Duration,
    pub max_keys: usize,
}

impl Default for KeyPolicy {
    fn default() -> Self {
        Self {
            retention: DEFAULT_KEY_RETENTION,
            max_keys: crate::relying_party::MAX_KEYS_LIMIT,
        }
    }
}

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
    /// M4: the indices of the sources that list the key (empty once it vanished); `None` when
    /// unknown (a state file of format 1). After a restart, a source that has not answered yet
    /// is taken to list what it listed before, so it neither stops the expiry of other
    /// sources' keys nor loses its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sources: Option<Vec<usize>>,
    /// Unix seconds at which a source first listed the key (it was published at the same
    /// merge); `None` for keys of a state file written before this was recorded. Kept while
    /// the key is published, across restarts: the start of its lifecycle (issue 20).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_seen_at: Option<u64>,
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

    /// L7: a vanish time in the future (written while the clock was ahead) counts as `now`, so
    /// a loaded key is retained for at most `key_retention` from now.
    pub fn clamp_vanished(&mut self, now: u64) {
        for entry in self.keys.values_mut() {
            if let Some(at) = &mut entry.vanished_at {
                *at = (*at).min(now);
            }
        }
    }

    /// L7: moves every vanish time `secs` later, after the wall clock stepped forward by that
    /// much, so that rotation grace counts time that really passed.
    pub fn shift_vanished(&mut self, secs: u64) {
        for entry in self.keys.values_mut() {
            if let Some(at) = &mut entry.vanished_at {
                *at = at.saturating_add(secs);
            }
        }
    }

    /// Drops keys whose grace ran out by `now` (used on a state file loaded at start).
    pub fn expire(&mut self, now: u64, retention: Duration) {
        self.keys.retain(|_, e| !expired(e, now, retention));
    }
}

/// Kids that name other key material in `next` than in `previous` (L8).
///
/// The old material cannot stay published next to the new one: relying parties look a key up
/// by the token's `kid` and use one match (A-11: the later duplicate wins), and a set must not
/// name two keys with one kid (D-9, RFC 7517 §4.5; `validate` refuses such a fetch). So the
/// new material is published, as the source says, and tokens signed by the old one fail at
/// once: Kubernetes kids are key hashes (K-5), so this is a non-Kubernetes IdP reusing kids or
/// tampering upstream, and the caller must say so loudly.
pub fn replaced_material<'a>(previous: &Ledger, next: &'a Ledger) -> Vec<&'a str> {
    next.keys
        .iter()
        .filter(|(kid, e)| previous.keys.get(*kid).is_some_and(|old| old.jwk != e.jwk))
        .map(|(kid, _)| kid.as_str())
        .collect()
}

/// Retained keys of `previous` that `next` dropped before their grace ran out: what `max_keys`
/// cost (M4), for a warning.
pub fn dropped_early<'a>(
    previous: &'a Ledger,
    next: &Ledger,
    now: u64,
    retention: Duration,
) -> Vec<&'a str> {
    previous
        .keys
        .iter()
        .filter(|(kid, e)| {
            !next.keys.contains_key(*kid) && e.vanished_at.is_some() && !expired(e, now, retention)
        })
        .map(|(kid, _)| kid.as_str())
        .collect()
}

fn expired(entry: &LedgerEntry, now: u64, retention: Duration) -> bool {
    entry
        .vanished_at
        .is_some_and(|at| now.saturating_sub(at) >= retention.as_secs())
}

/// Computes the next ledger from each source's last good set (`None`: the source has not
/// succeeded since start) and the previous ledger.
///
/// A key listed by no source starts its grace now. A source that has not answered since start
/// still lists what the previous ledger says it listed (M4): so a dead source neither freezes
/// the expiry of the other sources' keys nor loses its own. Keys of unknown provenance (a
/// format-1 state file) keep their state until every source has answered once.
///
/// Under `max_keys`, retained keys give way oldest first; only more *current* keys than
/// `max_keys` refuse the merge (M4), so a new signing key is never held back by old ones.
pub fn merge(
    sources: &[Option<&[PublicJwk]>],
    previous: &Ledger,
    now: u64,
    retention: Duration,
    max_keys: usize,
) -> Result<Ledger, MergeError> {
    let silent = |j: &usize| sources.get(*j).is_some_and(Option::is_none);
    let mut keys: BTreeMap<String, LedgerEntry> = BTreeMap::new();
    for (i, set) in sources.iter().enumerate() {
        for jwk in set.iter().flat_map(|set| set.iter()) {
            match keys.get_mut(&jwk.kid) {
                Some(seen) if seen.jwk == *jwk => {
                    let listed = seen.sources.get_or_insert_with(Vec::new);
                    if listed.last() != Some(&i) {
                        listed.push(i);
                    }
                }
                Some(_) => return Err(MergeError::ConflictingKid(jwk.kid.clone())),
                None => {
                    let entry = LedgerEntry {
                        jwk: jwk.clone(),
                        vanished_at: None,
                        sources: Some(vec![i]),
                        first_seen_at: Some(now),
                    };
                    keys.insert(jwk.kid.clone(), entry);
                }
            }
        }
    }
    let all_answered = sources.iter().all(Option::is_some);
    for (kid, old) in &previous.keys {
        // What silent sources listed before, by the previous ledger.
        let silent_claims: Option<Vec<usize>> = match (&old.sources, old.vanished_at) {
            (_, Some(_)) => Some(Vec::new()),
            (Some(listed), None) => Some(listed.iter().copied().filter(silent).collect()),
            (None, None) => None,
        };
        if let Some(entry) = keys.get_mut(kid) {
            if entry.jwk == old.jwk {
                // The same key as before: its lifecycle started then, not now.
                entry.first_seen_at = old.first_seen_at;
                if let (Some(listed), Some(claims)) = (&mut entry.sources, &silent_claims) {
                    listed.extend(claims);
                    listed.sort_unstable();
                    listed.dedup();
                }
            }
            continue;
        }
        let (vanished_at, sources) = match (old.vanished_at, silent_claims) {
            (Some(at), _) => (Some(at), Some(Vec::new())),
            (None, Some(claims)) if !claims.is_empty() => (None, Some(claims)),
            (None, Some(_)) => (Some(now), Some(Vec::new())),
            // Unknown provenance: some silent source may list it.
            (None, None) if !all_answered => (None, None),
            (None, None) => (Some(now), Some(Vec::new())),
        };
        let entry = LedgerEntry {
            jwk: old.jwk.clone(),
            vanished_at,
            sources,
            first_seen_at: old.first_seen_at,
        };
        if !expired(&entry, now, retention) {
            keys.insert(kid.clone(), entry);
        }
    }
    let current = keys.values().filter(|e| e.vanished_at.is_none()).count();
    if current > max_keys {
        return Err(MergeError::TooManyKeys {
            count: current,
            max: max_keys,
        });
    }
    while keys.len() > max_keys {
        let oldest = keys
            .iter()
            .filter_map(|(kid, e)| e.vanished_at.map(|at| (at, kid)))
            .min()
            .map(|(_, kid)| kid.clone());
        match oldest {
            Some(kid) => keys.remove(&kid),
            None => break,
        };
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
    fn a_key_keeps_the_time_it_was_first_seen_until_it_is_dropped() {
        let before = [key("old", "1")];
        let both = [key("old", "1"), key("new", "2")];
        let after = [key("new", "2")];
        let l0 = merge(&[Some(&before)], &Ledger::default(), 1000, HOUR, 100).expect("ok");
        assert_eq!(l0.keys["old"].first_seen_at, Some(1000));
        let l1 = merge(&[Some(&both)], &l0, 1100, HOUR, 100).expect("ok");
        assert_eq!(
            l1.keys["old"].first_seen_at,
            Some(1000),
            "not reset by a refresh"
        );
        assert_eq!(l1.keys["new"].first_seen_at, Some(1100));
        let l2 = merge(&[Some(&after)], &l1, 1200, HOUR, 100).expect("ok");
        assert_eq!(
            l2.keys["old"].first_seen_at,
            Some(1000),
            "kept while retained"
        );
        assert_eq!(l2.keys["new"].first_seen_at, Some(1100));
        // A kid that comes back with other material is another key: it starts again.
        let replaced = [key("new", "3")];
        let l3 = merge(&[Some(&replaced)], &l2, 1300, HOUR, 100).expect("ok");
        assert_eq!(l3.keys["new"].first_seen_at, Some(1300));
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
    fn a_kid_with_new_material_publishes_the_new_material_and_is_reported() {
        let l0 = merge(
            &[Some(&[key("a", "1"), key("b", "2")])],
            &Ledger::default(),
            0,
            HOUR,
            9,
        )
        .expect("ok");
        let l1 = merge(&[Some(&[key("a", "9"), key("b", "2")])], &l0, 10, HOUR, 9).expect("ok");
        assert_eq!(l1.keys["a"].jwk, key("a", "9"));
        assert_eq!(l1.keys["a"].vanished_at, None);
        assert_eq!(replaced_material(&l0, &l1), ["a"]);
        assert!(replaced_material(&l1, &l1).is_empty());
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
    fn more_current_keys_than_max_keys_is_refused() {
        let err = merge(
            &[Some(&[key("a", "1"), key("b", "2"), key("c", "3")])],
            &Ledger::default(),
            0,
            HOUR,
            2,
        )
        .expect_err("three current keys");
        assert_eq!(err, MergeError::TooManyKeys { count: 3, max: 2 });
    }

    #[test]
    fn retained_keys_give_way_oldest_first_before_a_current_key_is_refused() {
        // M4: two rotations inside the retention with max_keys = 2 must still publish the new
        // signing key; the key that vanished first goes first.
        let l0 = merge(&[Some(&[key("a", "1")])], &Ledger::default(), 0, HOUR, 2).expect("ok");
        let l1 = merge(&[Some(&[key("b", "2")])], &l0, 1, HOUR, 2).expect("ok");
        let l2 = merge(&[Some(&[key("c", "3")])], &l1, 2, HOUR, 2).expect("c is published");
        assert_eq!(kids(&l2), ["b", "c"]);
        assert_eq!(dropped_early(&l1, &l2, 2, HOUR), ["a"]);
        assert_eq!(l2.keys["b"].vanished_at, Some(2));
        assert_eq!(l2.keys["c"].vanished_at, None);
    }

    #[test]
    fn a_source_that_never_answers_after_a_restart_does_not_stop_expiry() {
        // M4, the review's sketch: source 1 never answers again after the restart.
        let persisted = merge(
            &[Some(&[key("a", "1")]), Some(&[key("b", "2")])],
            &Ledger::default(),
            0,
            HOUR,
            100,
        )
        .expect("ok");
        // Source 0 rotates a -> c, then c -> d.
        let l1 = merge(
            &[Some(&[key("c", "3")]), None],
            &persisted,
            10 * 86_400,
            HOUR,
            100,
        )
        .expect("ok");
        assert_eq!(l1.keys["a"].vanished_at, Some(10 * 86_400));
        // b is what source 1 listed last: it stays current until source 1 says otherwise.
        assert_eq!(l1.keys["b"].vanished_at, None);
        let l2 = merge(&[Some(&[key("d", "4")]), None], &l1, 20 * 86_400, HOUR, 3)
            .expect("the new signing key d must be published");
        assert_eq!(kids(&l2), ["b", "c", "d"]);
        assert_eq!(l2.keys["c"].vanished_at, Some(20 * 86_400));
        // When source 1 answers without b, b's grace starts.
        let l3 = merge(
            &[Some(&[key("d", "4")]), Some(&[key("e", "5")])],
            &l2,
            20 * 86_400 + 1,
            HOUR,
            100,
        )
        .expect("ok");
        assert_eq!(l3.keys["b"].vanished_at, Some(20 * 86_400 + 1));
    }

    #[test]
    fn a_key_listed_by_a_silent_source_and_a_live_one_stays_while_either_lists_it() {
        let persisted = merge(
            &[Some(&[key("a", "1")]), Some(&[key("a", "1")])],
            &Ledger::default(),
            0,
            HOUR,
            100,
        )
        .expect("ok");
        let l1 = merge(&[Some(&[key("a", "1")]), None], &persisted, 10, HOUR, 100).expect("ok");
        let l2 = merge(&[Some(&[key("c", "3")]), None], &l1, 20, HOUR, 100).expect("ok");
        assert_eq!(l2.keys["a"].vanished_at, None, "source 1 still lists a");
    }

    #[test]
    fn the_default_retention_meets_x6_for_every_allowed_max_age() {
        use crate::issuer::endpoint::MAX_CACHE_MAX_AGE;
        // keep an old key until token TTL (1 h) + max-age + 5 min skew after its last use.
        let x6 = HOUR + MAX_CACHE_MAX_AGE + Duration::from_secs(300);
        assert!(
            DEFAULT_KEY_RETENTION >= x6,
            "{DEFAULT_KEY_RETENTION:?} < {x6:?}"
        );
        // Z-9: the Azure Workload Identity webhook projects 24 h tokens by default.
        assert_eq!(DEFAULT_KEY_RETENTION, Duration::from_secs(86_400));
        assert_eq!(KeyPolicy::default().retention, DEFAULT_KEY_RETENTION);
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
