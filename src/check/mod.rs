//! `oidc-edge check`: the doctor. It fetches an issuer's documents the way AWS, GCP and Azure
//! do (no redirects, their time limits) and reports every rule of
//! `notes/relying-party-rules.md` that applies, with the value it saw and the rule's ID, so
//! that a silent "InvalidIdentityToken" becomes a named cause before a relying party is asked.

pub mod tls;
pub mod token;

use std::fmt::Write as _;
use std::net::{SocketAddr, ToSocketAddrs as _};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;

use crate::issuer::{DISCOVERY_SUFFIX, Issuer};
use crate::jwks::validate::PRIVATE_MEMBERS;
use crate::relying_party::{AWS_FETCH_LIMIT, Target};

/// What to check, as plain values (the command line is converted in `main`).
#[derive(Debug, Clone)]
pub struct Options {
    /// The issuer URL, exactly as tokens carry it in `iss`.
    pub issuer: String,
    /// Trust this CA (PEM) instead of the public roots relying parties use.
    pub ca_file: Option<PathBuf>,
    /// A token to verify against the published keys, read only when the keys were found.
    pub token: Option<TokenSource>,
    /// The audience the token must carry.
    pub audience: Option<String>,
    /// The relying parties whose rules apply.
    pub targets: Vec<Target>,
    /// Send every connection to this address (a server not yet in DNS, or a test).
    pub connect_to: Option<SocketAddr>,
}

/// Where the token to verify comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    Stdin,
    File(PathBuf),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Warn,
    Fail,
}

/// One rule's verdict.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    /// The rule ID in relying-party-rules.md.
    pub rule: &'static str,
    pub check: String,
    pub status: Status,
    pub observed: String,
    /// The relying parties this verdict is about; empty means all.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<&'static str>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub issuer: String,
    pub findings: Vec<Finding>,
    /// The AWS thumbprint of the JWKS host (A-8b).
    pub thumbprint: Option<String>,
    /// The token's `sub`: what a trust policy's `:sub` condition must say.
    pub subject: Option<String>,
}

impl Report {
    pub(crate) fn new(issuer: &str) -> Self {
        Self {
            issuer: issuer.to_owned(),
            findings: Vec::new(),
            thumbprint: None,
            subject: None,
        }
    }

    pub fn failed(&self) -> bool {
        self.findings.iter().any(|f| f.status == Status::Fail)
    }

    fn add(
        &mut self,
        rule: &'static str,
        check: impl Into<String>,
        status: Status,
        observed: impl Into<String>,
    ) {
        self.add_for(rule, check, status, observed, &[]);
    }

    fn add_for(
        &mut self,
        rule: &'static str,
        check: impl Into<String>,
        status: Status,
        observed: impl Into<String>,
        targets: &[&'static str],
    ) {
        self.findings.push(Finding {
            rule,
            check: check.into(),
            status,
            observed: observed.into(),
            targets: targets.to_vec(),
        });
    }

    fn pass_or(
        &mut self,
        ok: bool,
        rule: &'static str,
        check: &str,
        bad: Status,
        observed: impl Into<String>,
    ) {
        self.add(rule, check, if ok { Status::Pass } else { bad }, observed);
    }

    /// The table for people.
    pub fn table(&self) -> String {
        let mut out = format!("oidc-edge check {}\n", self.issuer);
        for f in &self.findings {
            let status = match f.status {
                Status::Pass => "pass",
                Status::Warn => "WARN",
                Status::Fail => "FAIL",
            };
            let targets = if f.targets.is_empty() {
                String::new()
            } else {
                format!(" [{}]", f.targets.join(","))
            };
            let _ = writeln!(
                out,
                "{status:<5} {:<6} {}{targets}: {}",
                f.rule, f.check, f.observed
            );
        }
        if let Some(thumbprint) = &self.thumbprint {
            let _ = writeln!(out, "AWS thumbprint: {thumbprint}");
        }
        if let Some(subject) = &self.subject {
            let _ = writeln!(out, "token subject (trust policy :sub): {subject}");
        }
        let fails = self
            .findings
            .iter()
            .filter(|f| f.status == Status::Fail)
            .count();
        let warns = self
            .findings
            .iter()
            .filter(|f| f.status == Status::Warn)
            .count();
        let _ = writeln!(
            out,
            "{} checks: {fails} failed, {warns} warnings",
            self.findings.len()
        );
        out
    }
}

fn target_names(targets: &[Target]) -> Vec<&'static str> {
    targets
        .iter()
        .map(|t| match t {
            Target::Aws => "aws",
            Target::Gcp => "gcp",
            Target::Azure => "azure",
        })
        .collect()
}

/// Where connections go: `--connect-to`, or the URL's own host and port.
fn address(url: &url::Url, connect_to: Option<SocketAddr>) -> Result<SocketAddr, String> {
    if let Some(addr) = connect_to {
        return Ok(addr);
    }
    let host = url.host_str().unwrap_or_default();
    let port = url.port_or_known_default().unwrap_or(443);
    (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("{host}: {e}"))?
        .next()
        .ok_or_else(|| format!("{host}: no address"))
}

/// An HTTP client that behaves like the relying parties: no redirects, no proxy, their limit.
pub fn relying_party_client(
    ca_pem: Option<&[u8]>,
    connect_to: Option<SocketAddr>,
    hosts: &[&str],
) -> anyhow::Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .timeout(AWS_FETCH_LIMIT)
        .user_agent(concat!("oidc-edge-check/", env!("CARGO_PKG_VERSION")));
    // The very root set the TLS probe verifies with (`tls::roots`: the given CA, else
    // webpki-roots), not reqwest's system roots: the scratch image has none, and a host's
    // extra roots would make the fetch trust a chain the probe calls untrusted (L9).
    builder =
        builder.tls_backend_preconfigured(crate::jwks::remote::tls_config(tls::roots(ca_pem)?));
    if let Some(addr) = connect_to {
        for host in hosts {
            builder = builder.resolve(host, addr);
        }
    }
    Ok(builder.build()?)
}

struct Fetched {
    status: u16,
    content_type: String,
    location: Option<String>,
    body: Vec<u8>,
    elapsed: Duration,
}

async fn fetch(client: &reqwest::Client, url: &str) -> Result<Fetched, String> {
    let started = Instant::now();
    let response = client
        .get(url)
        .send()
        .await
        .map_err(|e| crate::jwks::source::error_chain(&e))?;
    let header = |name| {
        response
            .headers()
            .get(name)
            .and_then(|v: &http::HeaderValue| v.to_str().ok())
            .map(str::to_owned)
    };
    let content_type = header(http::header::CONTENT_TYPE).unwrap_or_default();
    let location = header(http::header::LOCATION);
    let status = response.status().as_u16();
    let body = response.bytes().await.map_err(|e| e.to_string())?.to_vec();
    Ok(Fetched {
        status,
        content_type,
        location,
        body,
        elapsed: started.elapsed(),
    })
}

/// GET one document: A-3 (reachable, 200) and A-6 (no redirect). `None` when nothing more
/// can be checked.
async fn fetch_document(
    report: &mut Report,
    client: &reqwest::Client,
    url: &str,
    what: &str,
) -> Option<Fetched> {
    let fetched = match fetch(client, url).await {
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

/// Runs every check. `connect_to` sends every connection to one address (a server not yet
/// in DNS, or a test).
pub async fn run(args: &Options) -> anyhow::Result<Report> {
    let connect_to = args.connect_to;
    let targets = target_names(&args.targets);
    let has = |t: &str| targets.contains(&t);
    let mut report = Report::new(&args.issuer);
    let ca_pem = args.ca_file.as_ref().map(std::fs::read).transpose()?;

    // A-1, D-1: the issuer's form.
    let issuer = match Issuer::parse(&args.issuer) {
        Ok(issuer) => {
            report.add(
                "A-1",
                "issuer is https with no port, query or fragment",
                Status::Pass,
                args.issuer.clone(),
            );
            issuer
        }
        Err(e) => {
            report.add(
                "A-1",
                "issuer is https with no port, query or fragment",
                Status::Fail,
                format!("issuer {e}"),
            );
            return Ok(report);
        }
    };
    let discovery_url = format!(
        "{}{DISCOVERY_SUFFIX}",
        args.issuer.strip_suffix('/').unwrap_or(&args.issuer)
    );
    let client = relying_party_client(ca_pem.as_deref(), connect_to, &[issuer.host()])?;

    // D-7: the discovery document.
    let Some(discovery) =
        fetch_document(&mut report, &client, &discovery_url, "discovery document").await
    else {
        // Say why when TLS is the reason (expired, untrusted, TLS 1.3 only).
        let roots = tls::roots(ca_pem.as_deref())?;
        let url = url::Url::parse(&discovery_url)?;
        tls_findings(
            &mut report,
            issuer.host(),
            &url,
            connect_to,
            &roots,
            ca_pem.is_some(),
            has("aws"),
        )
        .await;
        return Ok(report);
    };
    let ct = media_type(&discovery.content_type).to_owned();
    report.pass_or(
        ct == "application/json",
        "D-7",
        "discovery document is application/json",
        Status::Fail,
        discovery.content_type.clone(),
    );
    let Some(jwks_url) = discovery_findings(&mut report, &discovery.body, &args.issuer) else {
        return Ok(report);
    };
    let jwks_uri = jwks_url.to_string();
    let jwks_host = jwks_url.host_str().unwrap_or_default().to_owned();
    let client = relying_party_client(ca_pem.as_deref(), connect_to, &[issuer.host(), &jwks_host])?;
    let Some(jwks) = fetch_document(&mut report, &client, &jwks_uri, "JWKS").await else {
        return Ok(report);
    };
    let jwks_type = media_type(&jwks.content_type).to_owned();
    let type_status = match jwks_type.as_str() {
        "application/json" => Status::Pass,
        "application/jwk-set+json" => Status::Warn,
        _ => Status::Fail,
    };
    report.add(
        "X-4",
        "JWKS content type every client accepts (application/json)",
        type_status,
        jwks.content_type.clone(),
    );
    let total = discovery.elapsed + jwks.elapsed;
    let time_status = if total > AWS_FETCH_LIMIT {
        Status::Fail
    } else if total > Duration::from_secs(1) {
        Status::Warn
    } else {
        Status::Pass
    };
    report.add_for(
        "A-7",
        "both documents within AWS's 5 s",
        time_status,
        format!("{} ms", total.as_millis()),
        &["aws"],
    );

    // TLS of both hosts (A-8, A-8b, A-8c, G-3, D-8).
    let roots = tls::roots(ca_pem.as_deref())?;
    let mut hosts = vec![(issuer.host().to_owned(), url::Url::parse(&discovery_url)?)];
    if jwks_host != issuer.host() {
        hosts.push((jwks_host.clone(), jwks_url.clone()));
    }
    for (host, url) in &hosts {
        let thumbprint = tls_findings(
            &mut report,
            host,
            url,
            connect_to,
            &roots,
            ca_pem.is_some(),
            has("aws"),
        )
        .await;
        if host == &jwks_host {
            report.thumbprint = thumbprint;
        }
    }

    // The keys (D-5, D-9, D-12, A-9, A-10, A-11, G-4, G-5, G-6, Z-4, Z-5, Z-6).
    let Some(keys) = jwks_findings(&mut report, &jwks.body, &targets) else {
        return Ok(report);
    };

    if let Some(source) = &args.token {
        let text = match source {
            TokenSource::Stdin => std::io::read_to_string(std::io::stdin())?,
            TokenSource::File(path) => std::fs::read_to_string(path)?,
        };
        token::check(
            &mut report,
            text.trim(),
            &keys,
            &args.issuer,
            args.audience.as_deref(),
            &targets,
        );
    }
    Ok(report)
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
    targets: &[&'static str],
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

/// The TLS rules for one host; returns its AWS thumbprint.
async fn tls_findings(
    report: &mut Report,
    host: &str,
    url: &url::Url,
    connect_to: Option<SocketAddr>,
    roots: &std::sync::Arc<rustls::RootCertStore>,
    custom_ca: bool,
    aws: bool,
) -> Option<String> {
    let addr = match address(url, connect_to) {
        Ok(addr) => addr,
        Err(e) => {
            report.add("D-8", format!("TLS of {host}"), Status::Fail, e);
            return None;
        }
    };
    let facts = tls::probe(host, addr, std::sync::Arc::clone(roots)).await;
    if let Some(why) = &facts.unreachable {
        report.add("D-8", format!("TLS of {host}"), Status::Fail, why.clone());
        return None;
    }
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
        &["aws"],
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
            &["aws"],
        ),
        Err(e) => report.add_for(
            "A-8c",
            format!("{host} chain is ordered, leaf first, no duplicates"),
            Status::Fail,
            e,
            &["aws"],
        ),
    }
    if let Some(days) = tls::days_left(&facts.chain) {
        let status = if days < 0 {
            Status::Fail
        } else if days < 14 {
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
    tls::aws_thumbprint(&facts.chain)
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

/// The signing algorithms each relying party accepts (A-10, G-6, Z-5).
pub fn accepted_algs(target: &str) -> &'static [&'static str] {
    match target {
        "aws" => &["RS256", "RS384", "RS512", "ES256", "ES384", "ES512"],
        "gcp" => &["RS256", "ES256"],
        _ => &["RS256"],
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

fn check_keys(report: &mut Report, keys: &[Value], targets: &[&'static str]) {
    report.pass_or(
        !keys.is_empty(),
        "A-9",
        "JWKS has at least one key",
        Status::Fail,
        format!("{} key(s)", keys.len()),
    );
    let rsa = keys.iter().filter(|k| k["kty"] == "RSA").count();
    let ec = keys.iter().filter(|k| k["kty"] == "EC").count();
    if targets.contains(&"aws") {
        let ok = rsa <= 100 && ec <= 100;
        report.add_for(
            "A-9",
            "at most 100 RSA and 100 EC keys",
            if ok { Status::Pass } else { Status::Fail },
            format!("{rsa} RSA, {ec} EC"),
            &["aws"],
        );
    }
    if targets.contains(&"azure") {
        let ok = keys.len() <= 100;
        report.add_for(
            "Z-4",
            "at most 100 keys (Entra uses the first 100)",
            if ok { Status::Pass } else { Status::Fail },
            format!("{}", keys.len()),
            &["azure"],
        );
    }
    if targets.contains(&"gcp") {
        let ok = keys.len() <= 8;
        report.add_for(
            "G-4",
            "at most 8 keys if the JWKS is ever uploaded to GCP",
            if ok { Status::Pass } else { Status::Warn },
            format!("{}", keys.len()),
            &["gcp"],
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
                bits >= 2048,
                "D-12",
                &format!("{name} RSA modulus is at least 2048 bits"),
                Status::Fail,
                format!("{bits} bits"),
            );
        }
        let alg = key_alg(key);
        for target in targets {
            if !accepted_algs(target).contains(&alg.as_str()) {
                let rule = match *target {
                    "aws" => "A-10",
                    "gcp" => "G-6",
                    _ => "Z-5",
                };
                report.add_for(
                    rule,
                    format!("{name} algorithm is accepted"),
                    Status::Fail,
                    alg.clone(),
                    &[target],
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
            None if targets.contains(&"azure") => {
                report.add_for(
                    "Z-6",
                    format!("{name} has use: sig"),
                    Status::Warn,
                    "no \"use\"",
                    &["azure"],
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
