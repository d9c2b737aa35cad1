//! Relying-party fetch tracking (issue 20): which relying party last fetched which document of
//! an issuer, and what it got (the ETag, and for the JWKS its kids), so that "has AWS fetched
//! the new key yet?" has an answer.
//!
//! A relying party is recognised by its `User-Agent` only, which any client can send: a record
//! is a hint that AWS (say) fetched the JWKS, not proof. What each family matches, and where
//! that is known or guessed, is in [`BUILT_IN`].
//!
//! The cost stays off the hot path: a request whose `User-Agent` matches no family costs one
//! substring search per pattern (memchr's, no allocation, no lock); only a match, a few
//! requests per relying party per hour, takes the cache's write path.

use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use memchr::memmem::Finder;
use serde::Serialize;

use super::Doc;

/// The families known without configuration, each with the `User-Agent` substrings that name
/// it. `[relying_parties.user_agents]` replaces a family's list (`[]` turns it off) or adds a
/// family.
///
/// - `aws`: "AWS Security Token Service" is what STS sent for both documents in an access log
///   published with a self-hosted IRSA walkthrough (nginx, Dec 2023: `"GET
///   /.well-known/openid-configuration HTTP/1.1" 200 … "AWS Security Token Service"`, the same
///   for the JWKS). Seen, though in one published log only.
/// - `google`, `microsoft`: guesses. No published log or document showing what Google's STS
///   (workload identity federation) or Microsoft Entra send when they fetch an external
///   issuer's documents was found, so these match any `User-Agent` containing the company's
///   name, which also matches their crawlers and other products. Replace them with the string
///   your access log shows (`[log] access = true` logs each request's `User-Agent`).
pub const BUILT_IN: [(&str, &[&str]); 3] = [
    ("aws", &["AWS Security Token Service"]),
    ("google", &["Google"]),
    ("microsoft", &["Microsoft", "Azure"]),
];

/// A record is forgotten this long after its family's last fetch.
pub const DEFAULT_FORGET_AFTER: Duration = Duration::from_secs(7 * 86_400);

/// `[relying_parties]`: the families and how long a record is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelyingParties {
    /// In match order: the first family with a matching pattern takes the request.
    pub families: Vec<FamilyConfig>,
    pub forget_after: Duration,
}

/// One family: its name (a metric label) and its `User-Agent` substrings (case-sensitive).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FamilyConfig {
    pub name: String,
    pub patterns: Vec<String>,
}

impl Default for RelyingParties {
    fn default() -> Self {
        Self {
            families: BUILT_IN
                .iter()
                .map(|(name, patterns)| FamilyConfig {
                    name: (*name).to_owned(),
                    patterns: patterns.iter().map(|p| (*p).to_owned()).collect(),
                })
                .collect(),
            forget_after: DEFAULT_FORGET_AFTER,
        }
    }
}

#[derive(Debug)]
struct Family {
    name: Box<str>,
    finders: Box<[Finder<'static>]>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    issuer: usize,
    jwks: bool,
    family: usize,
}

#[derive(Debug, Clone)]
struct Record {
    at: u64,
    status: u16,
    etag: HeaderValue,
    /// The kids of the snapshot whose JWKS was served (for the JWKS only).
    kids: Option<Arc<[String]>>,
}

/// The last fetch of one document by one family, as `/status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Fetch {
    pub family: String,
    /// `discovery` or `jwks`.
    pub document: &'static str,
    /// Unix seconds.
    pub at: u64,
    /// 200, or 304 when the client already held this ETag.
    pub status: u16,
    pub etag: String,
    /// The kids of the JWKS it received (or, on a 304, already held).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kids: Option<Vec<String>>,
}

/// Every issuer's fetch records, keyed (issuer, document, family).
#[derive(Debug)]
pub struct FetchTracker {
    families: Box<[Family]>,
    records: moka::sync::Cache<Key, Record>,
}

impl FetchTracker {
    pub fn new(config: &RelyingParties, issuers: usize) -> Self {
        let families: Box<[Family]> = config
            .families
            .iter()
            .filter(|f| !f.patterns.is_empty())
            .map(|f| Family {
                name: f.name.as_str().into(),
                finders: f
                    .patterns
                    .iter()
                    .map(|p| Finder::new(p.as_bytes()).into_owned())
                    .collect(),
            })
            .collect();
        // Every key there can be: the cache never has to evict a live record for room.
        let capacity = issuers * 2 * families.len();
        Self {
            records: moka::sync::Cache::builder()
                .max_capacity(u64::try_from(capacity).unwrap_or(u64::MAX))
                // Time to live, not to idle: a read by /status must not keep a record alive;
                // each fetch inserts anew and so restarts it.
                .time_to_live(config.forget_after)
                .build(),
            families,
        }
    }

    /// The family `user_agent` names: the first with a pattern it contains.
    pub fn family(&self, user_agent: &[u8]) -> Option<usize> {
        self.families
            .iter()
            .position(|f| f.finders.iter().any(|p| p.find(user_agent).is_some()))
    }

    /// A fetch of `doc` of issuer `issuer` by `family`, answered `status` with `etag`; `kids`
    /// are those of the snapshot served.
    pub fn record(
        &self,
        issuer: usize,
        doc: Doc,
        family: usize,
        status: u16,
        etag: &HeaderValue,
        kids: &Arc<[String]>,
    ) {
        let jwks = doc == Doc::Jwks;
        self.records.insert(
            Key {
                issuer,
                jwks,
                family,
            },
            Record {
                at: crate::jwks::unix_now(),
                status,
                etag: etag.clone(),
                kids: jwks.then(|| Arc::clone(kids)),
            },
        );
    }

    /// Issuer `issuer`'s records, by family (in match order), discovery before the JWKS.
    pub fn fetches(&self, issuer: usize) -> Vec<Fetch> {
        let mut all: Vec<(Key, Record)> = self
            .records
            .iter()
            .filter(|(key, _)| key.issuer == issuer)
            .map(|(key, record)| (*key, record))
            .collect();
        all.sort_by_key(|(key, _)| (key.family, key.jwks));
        all.into_iter()
            .map(|(key, record)| Fetch {
                family: self.families[key.family].name.to_string(),
                document: if key.jwks { "jwks" } else { "discovery" },
                at: record.at,
                status: record.status,
                etag: String::from_utf8_lossy(record.etag.as_bytes()).into_owned(),
                kids: record.kids.map(|k| k.to_vec()),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracker(families: &[(&str, &[&str])], forget_after: Duration) -> FetchTracker {
        let config = RelyingParties {
            families: families
                .iter()
                .map(|(name, patterns)| FamilyConfig {
                    name: (*name).to_owned(),
                    patterns: patterns.iter().map(|p| (*p).to_owned()).collect(),
                })
                .collect(),
            forget_after,
        };
        FetchTracker::new(&config, 2)
    }

    fn family_of<'a>(t: &'a FetchTracker, agent: &str) -> Option<&'a str> {
        t.family(agent.as_bytes()).map(|i| &*t.families[i].name)
    }

    #[test]
    fn the_built_in_families_match_their_user_agents_and_nothing_else() {
        let t = FetchTracker::new(&RelyingParties::default(), 1);
        assert_eq!(family_of(&t, "AWS Security Token Service"), Some("aws"));
        assert_eq!(family_of(&t, "Google-Cloud-Example/1.0"), Some("google"));
        assert_eq!(family_of(&t, "Azure-Example/2"), Some("microsoft"));
        assert_eq!(family_of(&t, "Microsoft-Example"), Some("microsoft"));
        for other in [
            "",
            "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
            "curl/8.14.1",
            "Go-http-client/1.1",
            "oidc-edge-check/0.1.0",
            // Case-sensitive, and the whole phrase: neither names AWS's fetcher.
            "aws security token service",
            "aws-sdk-go-v2/1.30.3 os/linux lang/go#1.22.5 api/sts#1.30.3",
        ] {
            assert_eq!(family_of(&t, other), None, "{other:?}");
        }
    }

    #[test]
    fn the_first_family_with_a_matching_pattern_takes_the_request() {
        let t = tracker(
            &[
                ("vault", &["Vault/", "vault-agent"]),
                ("go", &["Go-http-client/"]),
            ],
            DEFAULT_FORGET_AFTER,
        );
        assert_eq!(
            family_of(&t, "Vault/1.17.2 (+https://www.vaultproject.io/; go1.22.5)"),
            Some("vault")
        );
        assert_eq!(family_of(&t, "my vault-agent"), Some("vault"));
        assert_eq!(family_of(&t, "Go-http-client/2.0"), Some("go"));
        assert_eq!(family_of(&t, "Vault/1 Go-http-client/2.0"), Some("vault"));
        // A byte string that is not UTF-8 is searched like any other.
        assert_eq!(family_of(&t, "\u{fffd}Go-http-client/1.1"), Some("go"));
        assert_eq!(t.family(b"\xffVault/\xfe"), Some(0));
    }

    #[test]
    fn a_family_with_no_pattern_matches_nothing() {
        let t = tracker(
            &[("aws", &[]), ("google", &["Google"])],
            DEFAULT_FORGET_AFTER,
        );
        assert_eq!(family_of(&t, "AWS Security Token Service"), None);
        assert_eq!(family_of(&t, "Google"), Some("google"));
    }

    #[test]
    fn a_record_holds_the_last_fetch_with_the_served_kids_per_issuer_document_and_family() {
        let t = tracker(
            &[("aws", &["AWS"]), ("google", &["Google"])],
            DEFAULT_FORGET_AFTER,
        );
        let old: Arc<[String]> = Arc::from(vec!["old".to_owned()]);
        let both: Arc<[String]> = Arc::from(vec!["old".to_owned(), "new".to_owned()]);
        let etag = |s: &'static str| HeaderValue::from_static(s);
        t.record(0, Doc::Jwks, 0, 200, &etag("\"a\""), &old);
        t.record(0, Doc::Jwks, 0, 304, &etag("\"b\""), &both);
        t.record(0, Doc::Discovery, 1, 200, &etag("\"d\""), &both);
        t.record(1, Doc::Jwks, 1, 200, &etag("\"c\""), &old);
        let now = crate::jwks::unix_now();
        let mut fetches = t.fetches(0);
        assert!(
            fetches.iter().all(|f| now.abs_diff(f.at) <= 1),
            "{fetches:?}"
        );
        for f in &mut fetches {
            f.at = 0;
        }
        assert_eq!(
            fetches,
            [
                Fetch {
                    family: "aws".into(),
                    document: "jwks",
                    at: 0,
                    status: 304,
                    etag: "\"b\"".into(),
                    kids: Some(vec!["old".into(), "new".into()]),
                },
                Fetch {
                    family: "google".into(),
                    document: "discovery",
                    at: 0,
                    status: 200,
                    etag: "\"d\"".into(),
                    kids: None,
                },
            ]
        );
        assert_eq!(t.fetches(1).len(), 1);
        assert_eq!(
            serde_json::to_string(&t.fetches(1)[0].kids).expect("json"),
            "[\"old\"]"
        );
    }

    #[test]
    fn a_record_is_forgotten_after_forget_after_without_a_fetch() {
        let t = tracker(&[("aws", &["AWS"])], Duration::from_secs(1));
        let kids: Arc<[String]> = Arc::from(vec!["k".to_owned()]);
        let fetch = || {
            t.record(
                0,
                Doc::Jwks,
                0,
                200,
                &HeaderValue::from_static("\"a\""),
                &kids,
            )
        };
        fetch();
        std::thread::sleep(Duration::from_millis(600));
        fetch();
        std::thread::sleep(Duration::from_millis(600));
        // 1.2 s after the first fetch, 0.6 s after the last: kept.
        assert_eq!(t.fetches(0).len(), 1);
        std::thread::sleep(Duration::from_millis(800));
        assert_eq!(t.fetches(0), []);
    }
}
