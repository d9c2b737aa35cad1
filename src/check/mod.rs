//! `oidc-edge check`: the doctor. It fetches an issuer's documents the way AWS, GCP and Azure
//! do (no redirects, their time limits) and reports every rule of
//! `notes/relying-party-rules.md` that applies, with the value it saw and the rule's ID, so
//! that a silent "InvalidIdentityToken" becomes a named cause before a relying party is asked.
//!
//! `probe` fetches and handshakes, `rules` judges what it saw, `token` verifies a token as STS
//! does, and `report` holds the verdicts; `run` below only puts them in order.

pub mod probe;
pub mod report;
pub mod rules;
pub mod token;

use std::net::SocketAddr;
use std::path::PathBuf;

pub use report::{Finding, Report, Status};

use crate::issuer::DISCOVERY_SUFFIX;
use crate::relying_party::Target;
use probe::tls;

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
    /// A token in hand (the self-test's, minted by TokenRequest).
    Inline(String),
}

/// Runs every check that what came before allows. `Err` is for the doctor itself failing (a
/// CA file or token it cannot read, a client it cannot build), never for a finding.
pub async fn run(options: &Options) -> anyhow::Result<Report> {
    let issuer_url = &options.issuer;
    let connect_to = options.connect_to;
    let targets = &options.targets;
    let aws = targets.contains(&Target::Aws);
    let mut report = Report::new(issuer_url);
    let ca_pem = options.ca_file.as_ref().map(std::fs::read).transpose()?;
    let custom_ca = ca_pem.is_some();

    // A-1, D-1: the issuer's form.
    let Some(issuer) = rules::issuer_findings(&mut report, issuer_url) else {
        return Ok(report);
    };
    let discovery_url = format!(
        "{}{DISCOVERY_SUFFIX}",
        issuer_url.strip_suffix('/').unwrap_or(issuer_url)
    );

    // D-7, then the discovery document's own rules.
    let client = probe::relying_party_client(ca_pem.as_deref(), connect_to, &[issuer.host()])?;
    let answer = probe::fetch(&client, &discovery_url).await;
    let what = "discovery document";
    let Some(discovery) = rules::answer_findings(&mut report, &discovery_url, what, answer) else {
        // Say why when TLS is the reason (expired, untrusted, TLS 1.3 only).
        let roots = tls::roots(ca_pem.as_deref())?;
        let url = url::Url::parse(&discovery_url)?;
        let facts = probe::tls_of(issuer.host(), &url, connect_to, &roots).await;
        rules::tls_findings(&mut report, issuer.host(), &facts, custom_ca, aws);
        return Ok(report);
    };
    rules::discovery_type_findings(&mut report, &discovery.content_type);
    let Some(jwks_url) = rules::discovery_findings(&mut report, &discovery.body, issuer_url) else {
        return Ok(report);
    };

    // The same for the JWKS, and A-7 for both fetches.
    let jwks_host = jwks_url.host_str().unwrap_or_default().to_owned();
    let client =
        probe::relying_party_client(ca_pem.as_deref(), connect_to, &[issuer.host(), &jwks_host])?;
    let answer = probe::fetch(&client, jwks_url.as_str()).await;
    let Some(jwks) = rules::answer_findings(&mut report, jwks_url.as_str(), "JWKS", answer) else {
        return Ok(report);
    };
    rules::jwks_type_findings(&mut report, &jwks.content_type);
    rules::fetch_time_findings(&mut report, discovery.elapsed + jwks.elapsed);

    // TLS of both hosts (A-8, A-8c, G-3, D-8); AWS's thumbprint is the JWKS host's (A-8b).
    let roots = tls::roots(ca_pem.as_deref())?;
    let mut hosts = vec![(issuer.host().to_owned(), url::Url::parse(&discovery_url)?)];
    if jwks_host != issuer.host() {
        hosts.push((jwks_host.clone(), jwks_url.clone()));
    }
    for (host, url) in &hosts {
        let facts = probe::tls_of(host, url, connect_to, &roots).await;
        rules::tls_findings(&mut report, host, &facts, custom_ca, aws);
        if host == &jwks_host {
            report.thumbprint = facts.ok().and_then(|f| tls::aws_thumbprint(&f.chain));
        }
    }

    // The keys, then the token against them (A-12, A-13, A-14, G-7).
    let Some(keys) = rules::jwks_findings(&mut report, &jwks.body, targets) else {
        return Ok(report);
    };
    if let Some(source) = &options.token {
        let text = match source {
            TokenSource::Stdin => std::io::read_to_string(std::io::stdin())?,
            TokenSource::File(path) => std::fs::read_to_string(path)?,
            TokenSource::Inline(token) => token.clone(),
        };
        let audience = options.audience.as_deref();
        token::check(
            &mut report,
            text.trim(),
            &keys,
            issuer_url,
            audience,
            targets,
        );
    }
    Ok(report)
}
