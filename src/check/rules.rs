//! The doctor's verdicts: pure functions from what the probe saw to findings in a `Report`.
//! Each finding names its rule in `notes/relying-party-rules.md`; the limits themselves live
//! in `relying_party`, shared with the server.

use std::time::Duration;

use serde_json::Value;

use super::probe::Fetched;
use super::probe::tls::{self, TlsFacts};
use super::report::{Report, Status};
use crate::issuer::Issuer;
use crate::jwks::validate::PRIVATE_MEMBERS;
use crate::relying_party::{
    AWS_FETCH_LIMIT, AWS_MAX_KEYS_PER_TYPE, AZURE_MAX_KEYS, GCP_MAX_UPLOADED_KEYS, MIN_RSA_BITS,
    Target,
};

/// the budget per fetch a validator should meet well inside AWS's limit; beyond it the
/// doctor warns before AWS fails.
const FETCH_BUDGET: Duration = Duration::from_secs(1);
/// D-8: the days of certificate life left below which the doctor warns.
const CERT_DAYS_WARNING: i64 = 14;

/// A-1, D-1: the issuer's form; the parsed issuer when there is more to check.
pub(crate) fn issuer_findings(report: &mut Report, issuer: &str) -> Option<Issuer> {
    const CHECK: &str = "issuer is https with no port, query or fragment";
    match Issuer::parse(issuer) {
        Ok(parsed) => {
            report.add("A-1", CHECK, Status::Pass, issuer.to_owned());
            Some(parsed)
        }
        Err(e) => {
            report.add("A-1", CHECK, Status::Fail, format!("issuer {e}"));
            None
        }
    }
}

/// A-3 (reachable, 200) and A-6 (no redirect) for one GET of `what`; the answer when there
/// is more to check in it.
pub(crate) fn answer_findings(
    report: &mut Report,
    url: &str,
    what: &str,
    answer: Result<Fetched, String>,
) -> Option<Fetched> {
    let fetched = match answer {
        Ok(fetched) => fetched,
        Err(e) => {
            report.add(
                "A-3",
                format!("{what} is reachable"),
                Status::Fail,
                format!("GET {url}: {e}"),
            );
            return None;
        }
    };
    if let Some(location) = &fetched.location {
        report.add(
            "A-6",
            format!("{what} is served without a redirect"),
            Status::Fail,
            format!("{} to {location}", fetched.status),
        );
        return None;
    }
    report.pass_or(
        fetched.status == 200,
        "A-3",
        &format!("{what} answers 200"),
        Status::Fail,
        format!("{} from {url}", fetched.status),
    );
    Some(fetched)
}

fn media_type(content_type: &str) -> &str {
    content_type.split(';').next().unwrap_or_default().trim()
}

/// D-7: the discovery document's content type.
pub(crate) fn discovery_type_findings(report: &mut Report, content_type: &str) {
    report.pass_or(
        media_type(content_type) == "application/json",
        "D-7",
        "discovery document is application/json",
        Status::Fail,
        content_type.to_owned(),
    );
}

/// the JWKS content type; `application/jwk-set+json` is correct but not every client
/// takes it.
pub(crate) fn jwks_type_findings(report: &mut Report, content_type: &str) {
    let status = match media_type(content_type) {
        "application/json" => Status::Pass,
        "application/jwk-set+json" => Status::Warn,
        _ => Status::Fail,
    };
    report.add(
        "X-4",
        "JWKS content type every client accepts (application/json)",
        status,
        content_type.to_owned(),
    );
}

/// both documents within AWS's limit, `total` being the two fetches together.
pub(crate) fn fetch_time_findings(report: &mut Report, total: Duration) {
    let status = if total > AWS_FETCH_LIMIT {
        Status::Fail
    } else if total > FETCH_BUDGET {
        Status::Warn
    } else {
        Status::Pass
    };
    report.add_for(
        "A-7",
        "both documents within AWS's 5 s",
        status,
        format!("{} ms", total.as_millis()),
        &[Target::Aws],
    );
}

/// The discovery-document rules (D-2, D-4, D-6, D-7, A-2, A-5, F-1, F-7); returns the
/// `jwks_uri` to fetch when there is an https one.
pub(crate) fn discovery_findings(
    report: &mut Report,
    body: &[u8],
    issuer: &str,
) -> Option<url::Url> {
    let doc: Value = match serde_json::from_slice(body) {
        Ok(Value::Object(map)) => Value::Object(map),
        _ => {
            report.add(
                "D-7",
                "discovery document is a JSON object",
                Status::Fail,
                "not a JSON object",
            );
            return None;
        }
    };

    // D-6, A-2, F-1: byte-equal issuer.
    match doc.get("issuer").and_then(Value::as_str) {
        Some(published) if published == issuer => {
            report.add(
                "D-6",
                "issuer is byte-identical to the URL",
                Status::Pass,
                published.to_owned(),
            );
        }
        Some(published) => {
            let hint = if published.trim_end_matches('/') == issuer.trim_end_matches('/') {
                " (they differ only by a trailing slash, F-1)"
            } else {
                ""
            };
            report.add(
                "D-6",
                "issuer is byte-identical to the URL",
                Status::Fail,
                format!("document says {published:?}, URL is {:?}{hint}", issuer),
            );
        }
        None => report.add(
            "D-6",
            "issuer is byte-identical to the URL",
            Status::Fail,
            "no \"issuer\"",
        ),
    }
    // D-2, A-5: required members, none empty (D-7).
    for member in [
        "response_types_supported",
        "subject_types_supported",
        "id_token_signing_alg_values_supported",
    ] {
        let ok = doc
            .get(member)
            .and_then(Value::as_array)
            .is_some_and(|a| !a.is_empty());
        report.pass_or(
            ok,
            "A-5",
            &format!("{member} is present and not empty"),
            Status::Fail,
            if ok { "present" } else { "missing or empty" },
        );
    }
    let algs: Vec<&str> = doc
        .get("id_token_signing_alg_values_supported")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    report.pass_or(
        algs.contains(&"RS256"),
        "D-2",
        "id_token_signing_alg_values_supported includes RS256",
        Status::Warn,
        algs.join(","),
    );
    report.pass_or(
        doc.get("authorization_endpoint").is_some(),
        "F-7",
        "authorization_endpoint is present (strict OIDC clients need it)",
        Status::Warn,
        doc.get("authorization_endpoint")
            .map_or("missing".to_owned(), Value::to_string),
    );

    // D-4: jwks_uri.
    let Some(jwks_uri) = doc
        .get("jwks_uri")
        .and_then(Value::as_str)
        .map(str::to_owned)
    else {
        report.add("D-2", "jwks_uri is present", Status::Fail, "missing");
        return None;
    };
    match url::Url::parse(&jwks_uri) {
        Ok(url) if url.scheme() == "https" => {
            report.add("D-4", "jwks_uri is https", Status::Pass, jwks_uri.clone());
            Some(url)
        }
        _ => {
            report.add("D-4", "jwks_uri is https", Status::Fail, jwks_uri.clone());
            None
        }
    }
}

/// The key-set rules (D-5, D-9, D-12, A-9, A-10, A-11, G-4, G-5, G-6, Z-4, Z-5, Z-6);
/// returns the keys when the body is a JWK set.
pub(crate) fn jwks_findings(
    report: &mut Report,
    body: &[u8],
    targets: &[Target],
) -> Option<Vec<Value>> {
    let keys = match serde_json::from_slice::<Value>(body) {
        Ok(set) => set.get("keys").and_then(Value::as_array).cloned(),
        Err(_) => None,
    };
    let Some(keys) = keys else {
        report.add(
            "D-9",
            "JWKS is a JSON object with a keys array",
            Status::Fail,
            "not a JWK set",
        );
        return None;
    };
    check_keys(report, &keys, targets);
    Some(keys)
}

/// The TLS rules for one host (A-8, A-8c, G-3, D-8), from what the probe saw (`Err`: no
/// handshake completed). `aws` makes a missing TLS 1.2 a failure rather than a warning.
pub(crate) fn tls_findings(
    report: &mut Report,
    host: &str,
    facts: &Result<TlsFacts, String>,
    custom_ca: bool,
    aws: bool,
) {
    let facts = match facts {
        Ok(facts) => facts,
        Err(why) => {
            report.add("D-8", format!("TLS of {host}"), Status::Fail, why.clone());
            return;
        }
    };
    let tls12 = if facts.tls12 {
        Status::Pass
    } else if aws {
        Status::Fail
    } else {
        Status::Warn
    };
    report.add_for(
        "A-8",
        format!("{host} offers TLS 1.2 (AWS falls back to thumbprints without it)"),
        tls12,
        format!("TLS 1.2 {}, TLS 1.3 {}", yes(facts.tls12), yes(facts.tls13)),
        &[Target::Aws],
    );
    match &facts.trusted {
        Ok(()) => report.add(
            "G-3",
            format!("{host} certificate is trusted"),
            Status::Pass,
            trust_source(custom_ca),
        ),
        Err(e) => report.add(
            "G-3",
            format!("{host} certificate is trusted"),
            Status::Fail,
            e.clone(),
        ),
    }
    match tls::chain_order(&facts.chain) {
        Ok(()) => report.add_for(
            "A-8c",
            format!("{host} chain is ordered, leaf first, no duplicates"),
            Status::Pass,
            format!("{} certificate(s)", facts.chain.len()),
            &[Target::Aws],
        ),
        Err(e) => report.add_for(
            "A-8c",
            format!("{host} chain is ordered, leaf first, no duplicates"),
            Status::Fail,
            e,
            &[Target::Aws],
        ),
    }
    if let Some(days) = tls::days_left(&facts.chain) {
        let status = if days < 0 {
            Status::Fail
        } else if days < CERT_DAYS_WARNING {
            Status::Warn
        } else {
            Status::Pass
        };
        let observed = if days < 0 {
            format!("expired {} days ago", -days)
        } else {
            format!("{days} days left")
        };
        report.add(
            "D-8",
            format!("{host} certificate is valid"),
            status,
            observed,
        );
    }
}

fn yes(b: bool) -> &'static str {
    if b { "offered" } else { "not offered" }
}

fn trust_source(custom: bool) -> &'static str {
    if custom {
        "verified against --ca-file"
    } else {
        "verified against the public roots"
    }
}

/// The algorithm a key signs with: its `alg`, or what Kubernetes uses for its type (K-4).
pub fn key_alg(key: &Value) -> String {
    let text = |name| key.get(name).and_then(Value::as_str);
    match text("alg") {
        Some(alg) => alg.to_owned(),
        None => crate::jwks::default_alg(text("kty").unwrap_or_default(), text("crv")).to_owned(),
    }
}

fn check_keys(report: &mut Report, keys: &[Value], targets: &[Target]) {
    report.pass_or(
        !keys.is_empty(),
        "A-9",
        "JWKS has at least one key",
        Status::Fail,
        format!("{} key(s)", keys.len()),
    );
    let rsa = keys.iter().filter(|k| k["kty"] == "RSA").count();
    let ec = keys.iter().filter(|k| k["kty"] == "EC").count();
    if targets.contains(&Target::Aws) {
        let ok = rsa <= AWS_MAX_KEYS_PER_TYPE && ec <= AWS_MAX_KEYS_PER_TYPE;
        report.add_for(
            "A-9",
            format!("at most {AWS_MAX_KEYS_PER_TYPE} RSA and {AWS_MAX_KEYS_PER_TYPE} EC keys"),
            if ok { Status::Pass } else { Status::Fail },
            format!("{rsa} RSA, {ec} EC"),
            &[Target::Aws],
        );
    }
    if targets.contains(&Target::Azure) {
        let ok = keys.len() <= AZURE_MAX_KEYS;
        report.add_for(
            "Z-4",
            format!("at most {AZURE_MAX_KEYS} keys (Entra uses the first {AZURE_MAX_KEYS})"),
            if ok { Status::Pass } else { Status::Fail },
            format!("{}", keys.len()),
            &[Target::Azure],
        );
    }
    if targets.contains(&Target::Gcp) {
        // A warning only: GCP downloads any number of keys; the limit binds an upload.
        let ok = keys.len() <= GCP_MAX_UPLOADED_KEYS;
        report.add_for(
            "G-4",
            format!("at most {GCP_MAX_UPLOADED_KEYS} keys if the JWKS is ever uploaded to GCP"),
            if ok { Status::Pass } else { Status::Warn },
            format!("{}", keys.len()),
            &[Target::Gcp],
        );
    }
    let mut kids = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        let kid = key.get("kid").and_then(Value::as_str);
        let name = kid.map_or_else(|| format!("key {i}"), |k| format!("key {k}"));
        if let Some(member) = PRIVATE_MEMBERS.iter().find(|m| key.get(**m).is_some()) {
            report.add(
                "D-5",
                format!("{name} has no private member"),
                Status::Fail,
                format!("has {member:?}"),
            );
        }
        match kid {
            Some(kid) if kids.contains(&kid) => report.add(
                "A-11",
                format!("{name} has a unique kid"),
                Status::Fail,
                "duplicate kid",
            ),
            Some(kid) => kids.push(kid),
            None => report.add("A-11", format!("{name} has a kid"), Status::Fail, "no kid"),
        }
        if key["kty"] == "RSA" {
            let bits = key
                .get("n")
                .and_then(Value::as_str)
                .and_then(|n| {
                    use base64::Engine as _;
                    base64::engine::general_purpose::URL_SAFE_NO_PAD
                        .decode(n)
                        .ok()
                })
                .map_or(0, |n| crate::jwks::validate::bit_length(&n));
            report.pass_or(
                bits >= MIN_RSA_BITS,
                "D-12",
                &format!("{name} RSA modulus is at least {MIN_RSA_BITS} bits"),
                Status::Fail,
                format!("{bits} bits"),
            );
        }
        let alg = key_alg(key);
        for target in targets {
            if !target.accepted_algs().contains(&alg.as_str()) {
                report.add_for(
                    target.alg_rule(),
                    format!("{name} algorithm is accepted"),
                    Status::Fail,
                    alg.clone(),
                    &[*target],
                );
            }
        }
        match key.get("use").and_then(Value::as_str) {
            Some("sig") => {}
            Some(other) => report.add(
                "A-11",
                format!("{name} use is sig"),
                Status::Fail,
                format!("use {other:?}"),
            ),
            None if targets.contains(&Target::Azure) => {
                report.add_for(
                    "Z-6",
                    format!("{name} has use: sig"),
                    Status::Warn,
                    "no \"use\"",
                    &[Target::Azure],
                );
            }
            None => {}
        }
        for member in ["key_ops", "x5c", "x5t"] {
            if key.get(member).is_some() {
                report.add(
                    "G-5",
                    format!("{name} has no {member}"),
                    Status::Warn,
                    format!(
                        "has {member:?} (GCP uploads refuse it; AWS ignores keys with key_ops)"
                    ),
                );
            }
        }
    }
    report.add(
        "D-9",
        "keys are well formed",
        Status::Pass,
        format!("{} key(s): {rsa} RSA, {ec} EC", keys.len()),
    );
}
