//! `oidc-edge rotation status`: per published key, where it is in a rotation and the earliest
//! safe time for the next step, from a running server's `/status` (rule X-6 of the relying
//! party notes: publish a new key at least max-age, and at least an hour, before it signs;
//! keep the old one published for the longest token lifetime + max-age + 5 min of skew after
//! its last use). Under each key, each relying party recognised by its `User-Agent` says
//! whether the JWKS it last fetched held the key ("has AWS fetched the new key yet?").

use std::time::{Duration, UNIX_EPOCH};

use anyhow::{Context as _, anyhow, bail};
use serde::Deserialize;

use crate::config::Config;
use crate::display::error_chain;
use crate::healthcheck::admin_address;

/// The clock skew relying parties allow.
const SKEW: u64 = 300;
/// A new key waits at least this long, whatever max-age is.
const MIN_PUBLISH_AHEAD: u64 = 3600;

/// What `rotation status` reads.
#[derive(Debug, Clone)]
pub struct Options {
    /// The admin listener, e.g. `http://127.0.0.1:9090`; `None`: from the config.
    pub admin: Option<String>,
    pub config: std::path::PathBuf,
    /// Only this issuer.
    pub issuer: Option<String>,
    /// The longest lifetime of a token the cluster issues.
    pub token_lifetime: Duration,
}

#[derive(Debug, Deserialize)]
struct Status {
    issuers: Vec<IssuerView>,
}

/// The part of `/status` this reads (`jwks::refresh::IssuerStatus`).
#[derive(Debug, Deserialize)]
pub struct IssuerView {
    pub issuer: String,
    pub cache_max_age_seconds: u64,
    pub key_retention_seconds: u64,
    pub keys: Vec<KeyView>,
    /// The relying parties' last fetches (`http::fetched_by::Fetch`); absent from the
    /// `/status` of an older server.
    #[serde(default)]
    pub fetched_by: Vec<FetchView>,
}

/// The part of a `/status` fetch record this reads.
#[derive(Debug, Deserialize)]
pub struct FetchView {
    pub family: String,
    pub document: String,
    pub at: u64,
    #[serde(default)]
    pub kids: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
pub struct KeyView {
    pub kid: String,
    pub first_seen_at: Option<u64>,
    pub vanished_at: Option<u64>,
    pub retiring_until: Option<u64>,
}

/// Fetches `/status` and renders the report.
pub async fn run(options: &Options) -> anyhow::Result<String> {
    let base = match &options.admin {
        Some(url) => url.trim_end_matches('/').to_owned(),
        None => format!("http://{}", admin_address(&Config::load(&options.config)?)?),
    };
    let url = format!("{base}/status");
    let client = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10))
        .build()
        .context("cannot build the HTTP client")?;
    let response = client
        .get(&url)
        .send()
        .await
        .map_err(|e| anyhow!("GET {url}: {}", error_chain(&e)))?;
    if !response.status().is_success() {
        bail!("GET {url}: {}", response.status());
    }
    let body = response
        .bytes()
        .await
        .map_err(|e| anyhow!("GET {url}: {}", error_chain(&e)))?;
    let status: Status = serde_json::from_slice(&body)
        .map_err(|e| anyhow!("GET {url}: not oidc-edge's /status: {e}"))?;
    let issuers: Vec<&IssuerView> = status
        .issuers
        .iter()
        .filter(|i| {
            options
                .issuer
                .as_deref()
                .is_none_or(|want| i.issuer == want)
        })
        .collect();
    if issuers.is_empty() {
        bail!(
            "GET {url}: no issuer {}",
            options.issuer.as_deref().unwrap_or("at all")
        );
    }
    let now = crate::jwks::unix_now();
    Ok(issuers
        .into_iter()
        .map(|issuer| report(issuer, now, options.token_lifetime.as_secs()))
        .collect())
}

/// One issuer's keys, a line each, at `now`.
pub fn report(issuer: &IssuerView, now: u64, token_lifetime: u64) -> String {
    let max_age = issuer.cache_max_age_seconds;
    let mut out = format!(
        "issuer {} (max-age {max_age}s, key_retention {}, token lifetime {})\n",
        issuer.issuer,
        humantime::format_duration(Duration::from_secs(issuer.key_retention_seconds)),
        humantime::format_duration(Duration::from_secs(token_lifetime)),
    );
    let jwks_fetches: Vec<&FetchView> = (issuer.fetched_by.iter())
        .filter(|f| f.document == "jwks")
        .collect();
    for key in &issuer.keys {
        let line = match key.vanished_at {
            None => {
                let wait = max_age.max(MIN_PUBLISH_AHEAD);
                match key.first_seen_at {
                    Some(seen) if now < seen + wait => format!(
                        "publishing  published since {}; safe to sign with from {}",
                        time(seen),
                        time(seen + wait)
                    ),
                    Some(seen) => format!(
                        "ready       published since {}; safe to sign with",
                        time(seen)
                    ),
                    None => "ready       published since before oidc-edge recorded it; safe to sign with".to_owned(),
                }
            }
            Some(gone) => {
                // The cluster stopped signing with it no later than it stopped listing it.
                let safe = gone + token_lifetime + max_age + SKEW;
                let until = key.retiring_until.unwrap_or(gone);
                let mut line = format!(
                    "retiring    no source lists it since {}; tokens it signed may be in use until {}; published until {}",
                    time(gone),
                    time(safe),
                    time(until)
                );
                if until < safe {
                    line.push_str(&format!(
                        " (too early: raise key_retention to at least {})",
                        humantime::format_duration(Duration::from_secs(safe - gone))
                    ));
                }
                line
            }
        };
        out.push_str(&format!("  {}  {line}\n", key.kid));
        for fetch in jwks_fetches.iter() {
            out.push_str(&format!("      {}\n", seen_by(fetch, key, now)));
        }
    }
    if jwks_fetches.is_empty() {
        out.push_str("  no relying party's fetch of the JWKS recorded (by User-Agent, since this server started)\n");
    }
    out
}

/// Whether the JWKS `fetch` received held `key`: a hint, since a `User-Agent` is only a hint.
fn seen_by(fetch: &FetchView, key: &KeyView, now: u64) -> String {
    let ago = humantime::format_duration(Duration::from_secs(now.saturating_sub(fetch.at)));
    let family = &fetch.family;
    let held = fetch
        .kids
        .as_ref()
        .is_some_and(|kids| kids.contains(&key.kid));
    if held {
        format!("{family} last fetched the JWKS {ago} ago and saw this key")
    } else if key.first_seen_at.is_some_and(|seen| fetch.at < seen) {
        format!(
            "{family} last fetched the JWKS {ago} ago, before this key was published: not seen yet"
        )
    } else {
        format!("{family} last fetched the JWKS {ago} ago and did not see this key")
    }
}

fn time(secs: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issuer(keys: Vec<KeyView>) -> IssuerView {
        IssuerView {
            issuer: "https://oidc.example.com".into(),
            cache_max_age_seconds: 300,
            key_retention_seconds: 86_400,
            keys,
            fetched_by: Vec::new(),
        }
    }

    fn fetch(family: &str, document: &str, at: u64, kids: &[&str]) -> FetchView {
        FetchView {
            family: family.into(),
            document: document.into(),
            at,
            kids: (document == "jwks").then(|| kids.iter().map(|k| (*k).to_owned()).collect()),
        }
    }

    fn key(kid: &str, first: Option<u64>, gone: Option<u64>) -> KeyView {
        KeyView {
            kid: kid.into(),
            first_seen_at: first,
            vanished_at: gone,
            retiring_until: gone.map(|g| g + 86_400),
        }
    }

    #[test]
    fn a_scripted_rotation_has_each_phase_and_its_safe_time() {
        let t0 = 1_800_000_000; // 2027-01-15T08:00:00Z
        let report = report(
            &issuer(vec![
                key("new", Some(t0), None),
                key("current", Some(t0 - 7200), None),
                key("old", Some(t0 - 90_000), Some(t0 - 60)),
            ]),
            t0 + 10,
            3600,
        );
        assert_eq!(
            report,
            "issuer https://oidc.example.com (max-age 300s, key_retention 1day, token lifetime 1h)\n\
             \x20 new  publishing  published since 2027-01-15T08:00:00Z; safe to sign with from 2027-01-15T09:00:00Z\n\
             \x20 current  ready       published since 2027-01-15T06:00:00Z; safe to sign with\n\
             \x20 old  retiring    no source lists it since 2027-01-15T07:59:00Z; tokens it signed may be in use until 2027-01-15T09:09:00Z; published until 2027-01-16T07:59:00Z\n\
             \x20 no relying party's fetch of the JWKS recorded (by User-Agent, since this server started)\n"
        );
    }

    /// "Has AWS fetched the new key yet?": under each key, per family, whether the JWKS it
    /// last fetched held it; a discovery fetch says nothing about keys.
    #[test]
    fn each_relying_party_says_whether_its_last_jwks_held_each_key() {
        let t0 = 1_800_000_000;
        let mut rotation = issuer(vec![
            key("new", Some(t0), None),
            key("current", Some(t0 - 7200), None),
        ]);
        rotation.fetched_by = vec![
            fetch("aws", "discovery", t0 + 500, &[]),
            fetch("aws", "jwks", t0 + 420, &["current", "new"]),
            fetch("google", "jwks", t0 - 60, &["current"]),
            fetch("vault", "jwks", t0 + 5, &["current"]),
        ];
        assert_eq!(
            report(&rotation, t0 + 600, 3600),
            "issuer https://oidc.example.com (max-age 300s, key_retention 1day, token lifetime 1h)\n\
             \x20 new  publishing  published since 2027-01-15T08:00:00Z; safe to sign with from 2027-01-15T09:00:00Z\n\
             \x20     aws last fetched the JWKS 3m ago and saw this key\n\
             \x20     google last fetched the JWKS 11m ago, before this key was published: not seen yet\n\
             \x20     vault last fetched the JWKS 9m 55s ago and did not see this key\n\
             \x20 current  ready       published since 2027-01-15T06:00:00Z; safe to sign with\n\
             \x20     aws last fetched the JWKS 3m ago and saw this key\n\
             \x20     google last fetched the JWKS 11m ago and saw this key\n\
             \x20     vault last fetched the JWKS 9m 55s ago and saw this key\n"
        );
    }

    #[test]
    fn a_retention_shorter_than_the_token_lifetime_is_called_out() {
        let t0 = 1_800_000_000;
        let mut short = issuer(vec![key("old", Some(t0 - 100), Some(t0))]);
        short.keys[0].retiring_until = Some(t0 + 3600);
        let report = report(&short, t0 + 1, 86_400);
        assert!(
            report.contains("; published until 2027-01-15T09:00:00Z (too early: raise key_retention to at least 1day 10m)\n"),
            "{report}"
        );
    }
}
