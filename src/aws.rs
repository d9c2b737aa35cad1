//! `oidc-edge aws`: what to paste into AWS. The provider command carries the live thumbprint
//! of the JWKS host (the same one `check` reports); the trust policy has the `:aud` and `:sub`
//! conditions of the first seed, so that no other service account can assume the role.

use std::net::SocketAddr;

use anyhow::{Context as _, bail};
use serde_json::json;

use crate::check::probe::{relying_party_client, tls};
use crate::issuer::{DISCOVERY_SUFFIX, Issuer};

/// The `aws iam create-open-id-connect-provider` command for `issuer`.
pub async fn provider_command(
    issuer: &str,
    audience: &str,
    ca_pem: Option<&[u8]>,
    connect_to: Option<SocketAddr>,
) -> anyhow::Result<String> {
    let parsed = Issuer::parse(issuer).map_err(|e| anyhow::anyhow!("issuer {e}"))?;
    let client = relying_party_client(ca_pem, connect_to, &[parsed.host()])?;
    let discovery_url = format!(
        "{}{DISCOVERY_SUFFIX}",
        issuer.strip_suffix('/').unwrap_or(issuer)
    );
    let doc: serde_json::Value = client
        .get(&discovery_url)
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .with_context(|| format!("GET {discovery_url}"))?
        .bytes()
        .await
        .with_context(|| format!("GET {discovery_url}"))
        .and_then(|body| {
            serde_json::from_slice(&body).with_context(|| format!("{discovery_url}: not JSON"))
        })?;
    let jwks_uri = doc["jwks_uri"]
        .as_str()
        .with_context(|| format!("{discovery_url}: no jwks_uri"))?;
    let jwks_url = url::Url::parse(jwks_uri).with_context(|| format!("jwks_uri {jwks_uri:?}"))?;
    let host = jwks_url.host_str().unwrap_or_default();
    // Resolved here, not by `probe::tls_of`: that one words its errors for a report line
    // (`host: why`), and this command's errors keep their own wording.
    let addr = match connect_to {
        Some(addr) => addr,
        None => {
            use std::net::ToSocketAddrs as _;
            (host, jwks_url.port_or_known_default().unwrap_or(443))
                .to_socket_addrs()?
                .next()
                .with_context(|| format!("{host}: no address"))?
        }
    };
    let facts = tls::probe(host, addr, tls::roots(ca_pem)?).await;
    if let Some(why) = facts.unreachable {
        bail!("TLS to {host}: {why}");
    }
    let thumbprint = tls::aws_thumbprint(&facts.chain)
        .with_context(|| format!("{host} presented no certificate"))?;
    Ok(format!(
        "aws iam create-open-id-connect-provider \\\n  --url {issuer} \\\n  --client-id-list {audience} \\\n  --thumbprint-list {thumbprint}\n"
    ))
}

/// A trust policy and what to tell the operator about it (on stderr, so stdout stays JSON).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustPolicy {
    pub policy: String,
    pub note: Option<String>,
}

/// The role trust policy for one service account.
pub fn trust_policy(
    issuer: &str,
    account_id: &str,
    namespace: &str,
    service_account: &str,
    audience: &str,
) -> anyhow::Result<TrustPolicy> {
    Issuer::parse(issuer).map_err(|e| anyhow::anyhow!("--issuer {e}"))?;
    if account_id.len() != 12 || !account_id.bytes().all(|b| b.is_ascii_digit()) {
        bail!("--account-id {account_id:?} is not a 12-digit AWS account id");
    }
    for (flag, value, max) in [
        ("--namespace", namespace, 63),
        ("--service-account", service_account, 253),
    ] {
        let valid = !value.is_empty()
            && value.len() <= max
            && value
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
            && !value.starts_with('-');
        if !valid {
            bail!("{flag} {value:?} is not a Kubernetes name (lowercase letters, digits, '-')");
        }
    }
    // the provider is named by the issuer without its scheme, byte for byte.
    //
    // S7: a trailing '/' stays. IAM does not normalise a provider URL (`https://h` and
    // `https://h/` are two providers), and STS looks the provider up by the token's `iss`,
    // which for such an issuer ends in '/' (we publish the issuer byte-exact, D-6, and the
    // apiserver must sign with the same string, F-1). A working provider for an issuer with a
    // '/' is named `h/` in its ARN and in its `h/:aud` keys; stripping the '/' here would name
    // a provider that does not exist. Refusing would refuse a valid setup; say it instead.
    let provider = issuer.trim_start_matches("https://");
    let note = issuer.ends_with('/').then(|| {
        format!(
            "the issuer ends in '/', so the provider {provider} in the ARN and in the condition \
             keys does too: IAM keeps a provider URL as it was created, and STS finds the \
             provider by the token's iss, which ends in '/' as well (A-2, F-1). Create the \
             provider with --url {issuer} exactly, as `oidc-edge aws provider` prints it."
        )
    });
    let policy = json!({
        "Version": "2012-10-17",
        "Statement": [{
            "Effect": "Allow",
            "Principal": { "Federated": format!("arn:aws:iam::{account_id}:oidc-provider/{provider}") },
            "Action": "sts:AssumeRoleWithWebIdentity",
            "Condition": {
                "StringEquals": {
                    format!("{provider}:aud"): audience,
                    format!("{provider}:sub"): format!("system:serviceaccount:{namespace}:{service_account}"),
                }
            }
        }]
    });
    let mut text = serde_json::to_string_pretty(&policy).expect("a policy serialises");
    text.push('\n');
    Ok(TrustPolicy { policy: text, note })
}
