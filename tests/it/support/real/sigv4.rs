//! A minimal AWS Signature Version 4 signer for S3 requests (header signing only), so that the
//! tests talk to SeaweedFS as the AWS CLI would, with temporary credentials and their session
//! token. Nothing in Cargo.lock signs SigV4; this is the whole algorithm for the cases the
//! tests use (plain ASCII paths, a few query parameters) on the aws-lc-rs already in the tree.
//!
//! Reference: AWS "Create a signed AWS API request" (canonical request, string to sign,
//! signing key chain `AWS4<secret>` → date → region → service → `aws4_request`).

use std::time::SystemTime;

use aws_lc_rs::{digest, hmac};

/// AWS credentials: static (an IAM user) or temporary (from STS, with a session token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex(digest::digest(&digest::SHA256, data).as_ref())
}

fn hmac_sha256(key: &[u8], data: &str) -> Vec<u8> {
    let key = hmac::Key::new(hmac::HMAC_SHA256, key);
    hmac::sign(&key, data.as_bytes()).as_ref().to_vec()
}

/// RFC 3986 encoding with AWS's unreserved set; `/` kept in paths, encoded in query values.
fn uri_encode(text: &str, keep_slash: bool) -> String {
    let mut out = String::new();
    for byte in text.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(byte as char);
            }
            b'/' if keep_slash => out.push('/'),
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}

/// The query string a request must carry so that it matches what was signed.
pub fn query_string(query: &[(&str, &str)]) -> String {
    let mut pairs: Vec<(String, String)> = query
        .iter()
        .map(|(k, v)| (uri_encode(k, false), uri_encode(v, false)))
        .collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// What is signed of a request.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub method: &'a str,
    /// The Host header the client will send (`127.0.0.1:PORT`).
    pub host: &'a str,
    pub path: &'a str,
    pub query: &'a [(&'a str, &'a str)],
    pub body: &'a [u8],
}

/// The headers that sign `request` for service `s3` in `region` at `now`: `authorization`,
/// `x-amz-date`, `x-amz-content-sha256` and, for temporary credentials,
/// `x-amz-security-token`.
pub fn sign(
    credentials: &Credentials,
    region: &str,
    request: &Request<'_>,
    now: SystemTime,
) -> Vec<(&'static str, String)> {
    let Request {
        method,
        host,
        path,
        query,
        body,
    } = *request;
    // "2026-12-02T16:27:19Z" → "20261202T162719Z"
    let amz_date: String = humantime::format_rfc3339_seconds(now)
        .to_string()
        .chars()
        .filter(|c| *c != '-' && *c != ':')
        .collect();
    let date = &amz_date[..8];
    let payload_hash = sha256_hex(body);
    let mut headers = vec![
        ("host", host.to_owned()),
        ("x-amz-content-sha256", payload_hash.clone()),
        ("x-amz-date", amz_date.clone()),
    ];
    if let Some(token) = &credentials.session_token {
        headers.push(("x-amz-security-token", token.clone()));
    }
    let canonical_headers: String = headers.iter().map(|(k, v)| format!("{k}:{v}\n")).collect();
    let signed_headers = headers
        .iter()
        .map(|(k, _)| *k)
        .collect::<Vec<_>>()
        .join(";");
    let canonical_request = format!(
        "{method}\n{}\n{}\n{canonical_headers}\n{signed_headers}\n{payload_hash}",
        uri_encode(path, true),
        query_string(query),
    );
    let scope = format!("{date}/{region}/s3/aws4_request");
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
        sha256_hex(canonical_request.as_bytes())
    );
    let mut key = hmac_sha256(
        format!("AWS4{}", credentials.secret_access_key).as_bytes(),
        date,
    );
    for part in [region, "s3", "aws4_request"] {
        key = hmac_sha256(&key, part);
    }
    let signature = hex(&hmac_sha256(&key, &string_to_sign));
    headers.retain(|(k, _)| *k != "host");
    headers.push((
        "authorization",
        format!(
            "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed_headers}, Signature={signature}",
            credentials.access_key_id
        ),
    ));
    headers
}

/// AWS's published example (S3 API reference, "Signature Calculations for the Authorization
/// Header", GET Bucket with `max-keys=2&prefix=J`): the signer must reproduce its signature.
#[test]
fn the_signer_reproduces_the_list_objects_example_of_the_aws_documentation() {
    let credentials = Credentials {
        access_key_id: "AKIAIOSFODNN7EXAMPLE".to_owned(),
        secret_access_key: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY".to_owned(),
        session_token: None,
    };
    // 2013-05-24T00:00:00Z
    let at = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_369_353_600);
    let request = Request {
        method: "GET",
        host: "examplebucket.s3.amazonaws.com",
        path: "/",
        query: &[("max-keys", "2"), ("prefix", "J")],
        body: b"",
    };
    let headers = sign(&credentials, "us-east-1", &request, at);
    assert_eq!(
        headers.last().expect("authorization").1,
        "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, \
         SignedHeaders=host;x-amz-content-sha256;x-amz-date, \
         Signature=34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7"
    );
}
