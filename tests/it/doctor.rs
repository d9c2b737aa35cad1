//! The doctor and the helpers: `check` against a healthy oidc-edge and against broken issuers,
//! tokens, `render`, and `aws provider` / `aws trust-policy`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Output;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};

use crate::support::broken_site::{Answer, BrokenSite};
use crate::support::config::{Source, TestConfig};
use crate::support::inprocess::InProcess;
use crate::support::pki::Pki;
use crate::support::process::{Binary, run};
use crate::support::{K3S, Scratch};

const ISSUER: &str = "https://oidc.example.com";
const DOMAIN: &str = "oidc.example.com";
const RSA_SIGNING_PEM: &str = include_str!("../fixtures/tokens/rsa-signing.pem");
const RSA_SIGNING_JWKS: &str = include_str!("../fixtures/tokens/rsa-signing.jwks.json");

fn rsa_key(index: usize, set: &str) -> Value {
    serde_json::from_str::<Value>(set).expect("json")["keys"][index].clone()
}

/// oidc-edge over HTTPS with certificate files from `pki`, serving `jwks`.
async fn healthy(scratch: &Scratch, pki: &Pki, jwks: &str) -> (InProcess, SocketAddr) {
    let leaf = pki.server_for(&[DOMAIN]);
    scratch.write("jwks.json", jwks);
    scratch.write("cert.pem", &leaf.cert_pem);
    scratch.write("key.pem", &leaf.key_pem);
    scratch.write("ca.pem", &pki.ca_pem);
    let config = TestConfig::new()
        .source(Source::file("jwks.json"))
        .set("https.listen", "127.0.0.1:0")
        .set("https.files.cert_file", "cert.pem")
        .set("https.files.key_file", "key.pem")
        .write(scratch);
    let server = InProcess::start(&config).await;
    let https = server.https();
    server.wait_for_log("published key set");
    (server, https)
}

/// `oidc-edge check --json` and its parsed report.
fn check(scratch: &Scratch, issuer: &str, addr: SocketAddr, extra: &[&str]) -> (Output, Value) {
    let ca = scratch.path("ca.pem");
    let addr = addr.to_string();
    let mut args = vec![
        "check",
        issuer,
        "--ca-file",
        ca.to_str().expect("utf-8"),
        "--connect-to",
        &addr,
        "--json",
    ];
    args.extend_from_slice(extra);
    let out = run(&args);
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out, report)
}

fn findings<'a>(report: &'a Value, rule: &str, status: &str) -> Vec<&'a Value> {
    report["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .filter(|f| f["rule"] == rule && f["status"] == status)
        .collect()
}

/// Asserts exit 2 and a failing `rule` whose observation contains `observed`.
fn assert_fails(out: &Output, report: &Value, rule: &str, observed: &str) {
    assert_eq!(out.status.code(), Some(2), "{report:#}");
    let failing = findings(report, rule, "fail");
    assert!(
        failing
            .iter()
            .any(|f| f["observed"].as_str().is_some_and(|o| o.contains(observed))),
        "no failing {rule} with {observed:?} in {report:#}"
    );
}

fn discovery(issuer: &str, jwks_uri: &str) -> String {
    json!({
        "issuer": issuer, "jwks_uri": jwks_uri,
        "authorization_endpoint": "urn:kubernetes:programmatic_authorization",
        "response_types_supported": ["id_token"], "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256"]
    })
    .to_string()
}

/// A broken issuer: the good documents, with `change` applied.
async fn broken(
    pki: &Pki,
    change: impl FnOnce(&mut HashMap<String, Answer>),
    tls13_only: bool,
) -> BrokenSite {
    let mut answers = HashMap::new();
    answers.insert(
        "/.well-known/openid-configuration".to_owned(),
        Answer::json(discovery(ISSUER, "https://oidc.example.com/openid/v1/jwks")),
    );
    answers.insert("/openid/v1/jwks".to_owned(), Answer::json(RSA_SIGNING_JWKS));
    change(&mut answers);
    BrokenSite::start(answers, &pki.server_for(&[DOMAIN]), tls13_only).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_oidc_edge_passes_every_rule() {
    let scratch = Scratch::new();
    let pki = Pki::new("doctor test CA");
    let (_server, https) = healthy(&scratch, &pki, RSA_SIGNING_JWKS).await;
    let (out, report) = check(&scratch, ISSUER, https, &[]);
    assert_eq!(out.status.code(), Some(0), "{report:#}");
    let statuses: Vec<&str> = report["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .map(|f| f["status"].as_str().expect("status"))
        .collect();
    assert!(statuses.iter().all(|s| *s == "pass"), "{report:#}");
    assert!(statuses.len() >= 20, "{} checks", statuses.len());
    assert_eq!(report["thumbprint"].as_str().expect("thumbprint").len(), 40);
    // The table for people says the same.
    let ca = scratch.path("ca.pem");
    let table = run(&[
        "check",
        ISSUER,
        "--ca-file",
        ca.to_str().expect("utf-8"),
        "--connect-to",
        &https.to_string(),
    ]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.contains("checks: 0 failed, 0 warnings"), "{text}");
    assert!(
        text.contains("pass  D-6    issuer is byte-identical to the URL: https://oidc.example.com"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_issuers_fail_naming_the_rule() {
    let scratch = Scratch::new();
    let pki = Pki::new("doctor test CA");
    scratch.write("ca.pem", &pki.ca_pem);
    let discovery_path = "/.well-known/openid-configuration".to_owned();
    let jwks_path = "/openid/v1/jwks".to_owned();
    let with_keys = |keys: Vec<Value>| Answer::json(json!({ "keys": keys }).to_string());
    let good_key = rsa_key(0, RSA_SIGNING_JWKS);
    let weak = rsa_key(0, include_str!("../fixtures/jwks/rsa-1024.json"));
    let many: Vec<Value> = (0..101)
        .map(|i| {
            let mut key = good_key.clone();
            key["kid"] = json!(format!("k{i}"));
            key
        })
        .collect();
    let es512 = json!({"kty": "EC", "use": "sig", "kid": "es512", "alg": "ES512", "crv": "P-521",
        "x": URL_SAFE_NO_PAD.encode([1u8; 66]), "y": URL_SAFE_NO_PAD.encode([2u8; 66])});
    let mut no_use = good_key.clone();
    no_use.as_object_mut().expect("object").remove("use");

    type Change = Box<dyn FnOnce(&mut HashMap<String, Answer>)>;
    /// (what, the change, extra flags, the rule that must fail, what it must say)
    type Case<'a> = (&'a str, Change, &'a [&'a str], &'a str, &'a str);
    let cases: Vec<Case> = vec![
        (
            "discovery as text/plain",
            Box::new({
                let p = discovery_path.clone();
                move |a| {
                    a.get_mut(&p).expect("discovery").headers =
                        vec![("content-type".into(), "text/plain".into())]
                }
            }),
            &[],
            "D-7",
            "text/plain",
        ),
        (
            "302 on discovery",
            Box::new({
                let p = discovery_path.clone();
                move |a| {
                    a.insert(
                        p,
                        Answer {
                            status: 302,
                            headers: vec![("location".into(), "https://elsewhere.example/".into())],
                            body: String::new(),
                        },
                    );
                }
            }),
            &[],
            "A-6",
            "302 to https://elsewhere.example/",
        ),
        (
            "issuer differs by a trailing slash",
            Box::new({
                let p = discovery_path.clone();
                move |a| {
                    a.insert(
                        p,
                        Answer::json(discovery(
                            "https://oidc.example.com/",
                            "https://oidc.example.com/openid/v1/jwks",
                        )),
                    );
                }
            }),
            &[],
            "D-6",
            "trailing slash",
        ),
        (
            "jwks_uri over http",
            Box::new({
                let p = discovery_path.clone();
                move |a| {
                    a.insert(
                        p,
                        Answer::json(discovery(ISSUER, "http://oidc.example.com/openid/v1/jwks")),
                    );
                }
            }),
            &[],
            "D-4",
            "http://oidc.example.com/openid/v1/jwks",
        ),
        (
            "a 1024-bit RSA key",
            Box::new({
                let p = jwks_path.clone();
                move |a| {
                    a.insert(p, with_keys(vec![weak]));
                }
            }),
            &[],
            "D-12",
            "1024 bits",
        ),
        (
            "101 RSA keys",
            Box::new({
                let p = jwks_path.clone();
                move |a| {
                    a.insert(p, with_keys(many));
                }
            }),
            &["--target", "aws"],
            "A-9",
            "101 RSA",
        ),
        (
            "an ES512 key",
            Box::new({
                let p = jwks_path.clone();
                move |a| {
                    a.insert(p, with_keys(vec![good_key.clone(), es512]));
                }
            }),
            &["--target", "gcp"],
            "G-6",
            "ES512",
        ),
    ];
    for (what, change, extra, rule, observed) in cases {
        let site = broken(&pki, change, false).await;
        let (out, report) = check(&scratch, ISSUER, site.addr, extra);
        assert_fails(&out, &report, rule, observed);
        println!("{what}: {rule} fails as expected");
    }

    // A key without "use": Azure warns, nothing fails.
    let site = broken(
        &pki,
        |a| {
            a.insert("/openid/v1/jwks".into(), with_keys(vec![no_use]));
        },
        false,
    )
    .await;
    let (out, report) = check(&scratch, ISSUER, site.addr, &["--target", "azure"]);
    assert_eq!(out.status.code(), Some(0), "{report:#}");
    assert_eq!(findings(&report, "Z-6", "warn").len(), 1, "{report:#}");

    // TLS 1.3 only: AWS falls back to thumbprints (A-8).
    let site = broken(&pki, |_| {}, true).await;
    let (out, report) = check(&scratch, ISSUER, site.addr, &["--target", "aws"]);
    assert_fails(&out, &report, "A-8", "TLS 1.2 not offered");

    // An expired certificate.
    let mut answers = HashMap::new();
    answers.insert(
        discovery_path.clone(),
        Answer::json(discovery(ISSUER, "https://oidc.example.com/openid/v1/jwks")),
    );
    answers.insert(jwks_path.clone(), Answer::json(RSA_SIGNING_JWKS));
    let site = BrokenSite::start(answers, &pki.expired_server_for(&[DOMAIN]), false).await;
    let ca = scratch.path("ca.pem");
    let out = run(&[
        "check",
        ISSUER,
        "--ca-file",
        ca.to_str().expect("utf-8"),
        "--connect-to",
        &site.addr.to_string(),
        "--json",
    ]);
    let report: Value = serde_json::from_slice(&out.stdout).expect("report");
    // The documents cannot even be fetched, and the TLS rules say why.
    assert_fails(&out, &report, "A-3", "expired");
    assert_fails(&out, &report, "D-8", "expired");

    // An issuer with a port needs no server to fail.
    let (out, report) = check(&scratch, "https://oidc.example.com:8443", site.addr, &[]);
    assert_fails(&out, &report, "A-1", "must not contain a port");
}

fn now() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_secs(),
    )
    .expect("i64")
}

fn claims(iss: &str, aud: &str, iat: i64, exp: i64) -> Value {
    json!({ "iss": iss, "aud": [aud], "sub": "system:serviceaccount:default:s3-lister", "iat": iat, "nbf": iat, "exp": exp })
}

fn sign(
    claims: &Value,
    alg: jsonwebtoken::Algorithm,
    kid: &str,
    key: &jsonwebtoken::EncodingKey,
) -> String {
    let mut header = jsonwebtoken::Header::new(alg);
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(&header, claims, key).expect("sign")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_verified_like_sts_does() {
    // An ES256 key made here, and the RS256 fixture key, both published.
    let ec = rcgen::KeyPair::generate().expect("ec key");
    let point = ec.public_key_raw();
    let ec_jwk = json!({"kty": "EC", "use": "sig", "kid": "ec-1", "alg": "ES256", "crv": "P-256",
        "x": URL_SAFE_NO_PAD.encode(&point[1..33]), "y": URL_SAFE_NO_PAD.encode(&point[33..65])});
    let rsa_jwk = rsa_key(0, RSA_SIGNING_JWKS);
    let rsa_kid = rsa_jwk["kid"].as_str().expect("kid").to_owned();
    let scratch = Scratch::new();
    let pki = Pki::new("doctor test CA");
    let (_server, https) = healthy(
        &scratch,
        &pki,
        &json!({ "keys": [rsa_jwk, ec_jwk] }).to_string(),
    )
    .await;

    let rsa = jsonwebtoken::EncodingKey::from_rsa_pem(RSA_SIGNING_PEM.as_bytes()).expect("rsa");
    let es = jsonwebtoken::EncodingKey::from_ec_pem(ec.serialize_pem().as_bytes()).expect("ec");
    let (n, aud) = (now(), "sts.amazonaws.com");
    let good = claims(ISSUER, aud, n, n + 3600);
    let tampered = {
        let token = sign(&good, jsonwebtoken::Algorithm::RS256, &rsa_kid, &rsa);
        let parts: Vec<&str> = token.split('.').collect();
        let forged = URL_SAFE_NO_PAD.encode(claims(ISSUER, aud, n, n + 999_999).to_string());
        format!("{}.{forged}.{}", parts[0], parts[2])
    };
    /// (what, token, the rule that must fail and what it must say; None: all pass)
    type Case<'a> = (&'a str, String, Option<(&'a str, &'a str)>);
    let cases: Vec<Case> = vec![
        (
            "RS256",
            sign(&good, jsonwebtoken::Algorithm::RS256, &rsa_kid, &rsa),
            None,
        ),
        (
            "ES256",
            sign(&good, jsonwebtoken::Algorithm::ES256, "ec-1", &es),
            None,
        ),
        (
            "expired",
            sign(
                &claims(ISSUER, aud, n - 7200, n - 3600),
                jsonwebtoken::Algorithm::RS256,
                &rsa_kid,
                &rsa,
            ),
            Some(("A-13", "expired 360")),
        ),
        (
            "wrong audience",
            sign(
                &claims(ISSUER, "api://AzureADTokenExchange", n, n + 600),
                jsonwebtoken::Algorithm::RS256,
                &rsa_kid,
                &rsa,
            ),
            Some(("A-14", "not \"sts.amazonaws.com\"")),
        ),
        (
            "wrong issuer",
            sign(
                &claims(
                    "https://kubernetes.default.svc.cluster.local",
                    aud,
                    n,
                    n + 600,
                ),
                jsonwebtoken::Algorithm::RS256,
                &rsa_kid,
                &rsa,
            ),
            Some((
                "A-2",
                "iss is \"https://kubernetes.default.svc.cluster.local\"",
            )),
        ),
        (
            "unknown kid",
            sign(&good, jsonwebtoken::Algorithm::RS256, "rotated-away", &rsa),
            Some(("Z-7", "unknown kid \"rotated-away\"")),
        ),
        ("tampered", tampered, Some(("A-2", "tampered"))),
    ];
    for (what, token, failure) in cases {
        let file = scratch.write("token", &token);
        let (out, report) = check(
            &scratch,
            ISSUER,
            https,
            &[
                "--token",
                file.to_str().expect("utf-8"),
                "--audience",
                aud,
                "--target",
                "aws",
            ],
        );
        match failure {
            None => {
                assert_eq!(out.status.code(), Some(0), "{what}: {report:#}");
                assert_eq!(report["subject"], "system:serviceaccount:default:s3-lister");
            }
            Some((rule, observed)) => assert_fails(&out, &report, rule, observed),
        }
        // A signing key that is not public is said first, above every rule.
        let headline = report["headline"].as_str();
        if what == "unknown kid" {
            assert_eq!(
                headline,
                Some(
                    "THE TOKEN'S SIGNING KEY IS NOT PUBLIC: kid \"rotated-away\" is not in the published JWKS, so every relying party refuses the tokens it signs until it is published (a rotation that signs before it publishes, an external signer, a rebuilt control plane)"
                ),
                "{report:#}"
            );
            let table = run(&[
                "check",
                ISSUER,
                "--ca-file",
                scratch.path("ca.pem").to_str().expect("utf-8"),
                "--connect-to",
                &https.to_string(),
                "--token",
                file.to_str().expect("utf-8"),
                "--audience",
                aud,
                "--target",
                "aws",
            ]);
            let table = String::from_utf8_lossy(&table.stdout).into_owned();
            assert_eq!(table.lines().nth(1), headline, "{table}");
        } else {
            assert_eq!(headline, None, "{what}: {report:#}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_provider_prints_the_thumbprint_check_reports_and_trust_policy_has_the_seed_shape() {
    let scratch = Scratch::new();
    let pki = Pki::new("doctor test CA");
    let (_server, https) = healthy(&scratch, &pki, RSA_SIGNING_JWKS).await;
    let (_, report) = check(&scratch, ISSUER, https, &[]);
    let thumbprint = report["thumbprint"].as_str().expect("thumbprint");
    let ca = scratch.path("ca.pem");
    let out = run(&[
        "aws",
        "provider",
        ISSUER,
        "--ca-file",
        ca.to_str().expect("utf-8"),
        "--connect-to",
        &https.to_string(),
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!(
            "aws iam create-open-id-connect-provider \\\n  --url {ISSUER} \\\n  --client-id-list sts.amazonaws.com \\\n  --thumbprint-list {thumbprint}\n"
        )
    );

    let out = run(&[
        "aws",
        "trust-policy",
        "--issuer",
        ISSUER,
        "--account-id",
        "123456789012",
        "--namespace",
        "default",
        "--service-account",
        "s3-lister",
    ]);
    assert_eq!(out.status.code(), Some(0));
    let policy: Value = serde_json::from_slice(&out.stdout).expect("policy is JSON");
    assert_eq!(
        policy,
        json!({
            "Version": "2012-10-17",
            "Statement": [{
                "Effect": "Allow",
                "Principal": { "Federated": "arn:aws:iam::123456789012:oidc-provider/oidc.example.com" },
                "Action": "sts:AssumeRoleWithWebIdentity",
                "Condition": { "StringEquals": {
                    "oidc.example.com:aud": "sts.amazonaws.com",
                    "oidc.example.com:sub": "system:serviceaccount:default:s3-lister"
                }}
            }]
        })
    );
    let bad = run(&[
        "aws",
        "trust-policy",
        "--issuer",
        ISSUER,
        "--account-id",
        "12",
        "--namespace",
        "default",
        "--service-account",
        "x",
    ]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&bad.stderr)
            .contains("--account-id \"12\" is not a 12-digit AWS account id")
    );
}

/// A child process stopped (SIGTERM by its PID, then reaped) when dropped, also when an
/// assertion fails first: a leaked nginx would hold the test's stdout open.
struct StopOnDrop(std::process::Child);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(self.0.id().to_string())
            .status();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn render_writes_what_serve_serves_byte_for_byte() {
    let scratch = Scratch::new();
    scratch.write("jwks.json", K3S);
    let config = TestConfig::file_source("1s").write(&scratch);
    let out_dir = scratch.path("site");
    let rendered = run(&[
        "render",
        "--config",
        config.to_str().expect("utf-8"),
        "--out",
        out_dir.to_str().expect("utf-8"),
    ]);
    assert_eq!(
        rendered.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&rendered.stderr)
    );
    let headers = std::fs::read_to_string(out_dir.join("_headers")).expect("_headers");
    for path in ["/.well-known/openid-configuration", "/openid/v1/jwks"] {
        assert!(
            headers.contains(&format!("{path}\n  Content-Type: application/json\n")),
            "{headers}"
        );
    }

    // Served by a plain static file server (nginx), the files are what `serve` answers.
    let port = crate::support::pebble::free_tcp_port();
    let conf = scratch.write(
        "static.conf",
        &format!(
            "daemon off; worker_processes 1; pid {dir}/static.pid; error_log {dir}/static.log warn;\n\
             events {{ worker_connections 16; }}\nhttp {{ access_log off; default_type application/json;\n\
             client_body_temp_path {dir}/b; proxy_temp_path {dir}/p; fastcgi_temp_path {dir}/f; uwsgi_temp_path {dir}/u; scgi_temp_path {dir}/s;\n\
             server {{ listen 127.0.0.1:{port}; root {site}; }} }}\n",
            dir = scratch.dir.path().display(),
            site = out_dir.display()
        ),
    );
    let nginx = StopOnDrop(
        std::process::Command::new("nginx")
            .arg("-c")
            .arg(&conf)
            .spawn()
            .expect("nginx"),
    );
    let server = Binary::start(&config);
    let http = crate::support::clients::client();
    for path in ["/.well-known/openid-configuration", "/openid/v1/jwks"] {
        let mut from_files = None;
        for _ in 0..100 {
            if let Ok(r) = http
                .get(format!("http://127.0.0.1:{port}{path}"))
                .send()
                .await
            {
                from_files = Some(r.bytes().await.expect("body"));
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let served = http
            .get(server.url(path))
            .send()
            .await
            .expect("GET")
            .bytes()
            .await
            .expect("body");
        assert_eq!(from_files.expect("nginx answered"), served, "{path}");
    }
    drop(nginx);

    let s3 = run(&[
        "render",
        "--config",
        config.to_str().expect("utf-8"),
        "--out",
        scratch.path("s3").to_str().expect("utf-8"),
        "--layout",
        "s3",
    ]);
    assert_eq!(s3.status.code(), Some(0));
    let objects: Value = serde_json::from_str(
        &std::fs::read_to_string(scratch.path("s3/s3-objects.json")).expect("manifest"),
    )
    .expect("json");
    assert_eq!(objects[1]["key"], "openid/v1/jwks");
    assert_eq!(objects[1]["content_type"], "application/json");
    assert_eq!(objects[1]["cache_control"], "public, max-age=300");
}

/// `render` with key_retention and a state directory: the config for the L6 test.
fn render_config(scratch: &Scratch) -> std::path::PathBuf {
    TestConfig::new()
        .set("issuers.0.key_retention", "1h")
        .source(Source::file("jwks.json"))
        .write(scratch)
}

/// `oidc-edge render` into `scratch/site`; panics unless it succeeds.
fn render_site(scratch: &Scratch, config: &std::path::Path) {
    let out = run(&[
        "render",
        "--config",
        config.to_str().expect("utf-8"),
        "--out",
        scratch.path("site").to_str().expect("utf-8"),
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The JWKS `serve` publishes for `sets` merged (keys sorted by kid), as exact bytes.
fn jwks_of(sets: &[&str]) -> String {
    let mut keys: Vec<oidc_edge::jwks::PublicJwk> = sets
        .iter()
        .flat_map(|set| {
            oidc_edge::jwks::validate::validate(set.as_bytes())
                .expect("fixture")
                .keys
        })
        .collect();
    keys.sort_by(|a, b| a.kid.cmp(&b.kid));
    keys.dedup();
    String::from_utf8(oidc_edge::jwks::render_jwks(&keys).to_vec()).expect("utf-8")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn render_keeps_rotation_grace_across_runs_like_serve() {
    // L6: cron renders {3wms, 08az}, the cluster rotates to {jvAl, 08az}, cron renders again.
    // Tokens signed by 3wms stay valid for a while (X-6, Z-9), so 3wms must stay published
    // for key_retention, exactly as `serve` keeps it.
    let scratch = Scratch::new();
    scratch.write("jwks.json", K3S);
    let config = render_config(&scratch);
    render_site(&scratch, &config);
    assert_eq!(
        std::fs::read_to_string(scratch.path("site/openid/v1/jwks")).expect("jwks"),
        jwks_of(&[K3S])
    );
    scratch.replace("jwks.json", crate::support::ROTATED);
    render_site(&scratch, &config);
    let rendered = std::fs::read_to_string(scratch.path("site/openid/v1/jwks")).expect("jwks");
    assert_eq!(rendered, jwks_of(&[K3S, crate::support::ROTATED]));
    let names: Vec<String> = std::fs::read_dir(scratch.path("site/openid/v1"))
        .expect("dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["jwks"], "no temporary file left behind");

    // `serve` on the same state and source, once the source has answered, publishes the
    // same bytes.
    let server = Binary::start(&config);
    crate::support::eventually("the source answered", || async {
        let (_, status) = crate::support::clients::get(&server.admin_url("/status")).await;
        let status: Value = serde_json::from_str(&status).expect("status is JSON");
        status["issuers"][0]["sources"][0]["healthy"] == true
    })
    .await;
    let http = crate::support::clients::client();
    for path in ["/.well-known/openid-configuration", "/openid/v1/jwks"] {
        let served = http
            .get(server.url(path))
            .send()
            .await
            .expect("GET")
            .text()
            .await
            .expect("body");
        let file = std::fs::read_to_string(scratch.path(&format!("site{path}"))).expect("file");
        assert_eq!(file, served, "{path}");
    }
    server.kill();

    // Once 3wms's grace has run out (its vanish time set two hours back), the next render
    // drops it.
    let state = std::fs::read_dir(scratch.path("state"))
        .expect("state dir")
        .map(|e| e.expect("entry").path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("jwks-"))
        })
        .expect("render saved the state");
    let mut doc: Value =
        serde_json::from_str(&std::fs::read_to_string(&state).expect("state")).expect("json");
    let past = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        - 7200;
    let mut retained = 0;
    for entry in doc["keys"].as_array_mut().expect("keys") {
        if !entry["vanished_at"].is_null() {
            entry["vanished_at"] = json!(past);
            retained += 1;
        }
    }
    assert_eq!(retained, 1, "{doc:#}");
    std::fs::write(&state, doc.to_string()).expect("write state");
    render_site(&scratch, &config);
    assert_eq!(
        std::fs::read_to_string(scratch.path("site/openid/v1/jwks")).expect("jwks"),
        jwks_of(&[crate::support::ROTATED])
    );
}

#[test]
fn render_fails_and_keeps_the_old_files_when_the_state_cannot_be_saved() {
    // L6: a render whose ledger is not on disk would let the next one drop retained keys at
    // once, so it fails loudly instead (cron mails, CI goes red) and publishes nothing new.
    let scratch = Scratch::new();
    scratch.write("jwks.json", K3S);
    let config = render_config(&scratch);
    render_site(&scratch, &config);
    let state = std::fs::read_dir(scratch.path("state"))
        .expect("state dir")
        .map(|e| e.expect("entry").path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("jwks-"))
        })
        .expect("render saved the state");
    // rename(2) cannot replace a non-empty directory: stands in for ENOSPC or EROFS.
    std::fs::remove_file(&state).expect("rm");
    std::fs::create_dir(&state).expect("blocker");
    std::fs::write(state.join("x"), "x").expect("write");
    scratch.replace("jwks.json", crate::support::ROTATED);
    let out = run(&[
        "render",
        "--config",
        config.to_str().expect("utf-8"),
        "--out",
        scratch.path("site").to_str().expect("utf-8"),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "https://oidc.example.com: could not save the key set to {}; without it the next run \
             loses rotation grace",
            state.display()
        )),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(scratch.path("site/openid/v1/jwks")).expect("jwks"),
        jwks_of(&[K3S]),
        "the files of the last good render stay"
    );
}

#[test]
fn trust_policy_keeps_a_trailing_slash_of_the_issuer_and_says_why() {
    // S7, A-2: IAM keeps the provider URL as created (a trailing '/' makes another provider),
    // and STS finds the provider by the token's `iss`, which carries the '/' of such an
    // issuer. So the ARN and the condition keys keep it; stripping it would name a provider
    // that does not exist.
    for (issuer, provider) in [
        ("https://oidc.example.com/", "oidc.example.com/"),
        (
            "https://edge.example.com/cluster-a/",
            "edge.example.com/cluster-a/",
        ),
    ] {
        let out = run(&[
            "aws",
            "trust-policy",
            "--issuer",
            issuer,
            "--account-id",
            "123456789012",
            "--namespace",
            "default",
            "--service-account",
            "s3-lister",
        ]);
        assert_eq!(out.status.code(), Some(0), "{issuer}");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!(
                r#"{{
  "Statement": [
    {{
      "Action": "sts:AssumeRoleWithWebIdentity",
      "Condition": {{
        "StringEquals": {{
          "{provider}:aud": "sts.amazonaws.com",
          "{provider}:sub": "system:serviceaccount:default:s3-lister"
        }}
      }},
      "Effect": "Allow",
      "Principal": {{
        "Federated": "arn:aws:iam::123456789012:oidc-provider/{provider}"
      }}
    }}
  ],
  "Version": "2012-10-17"
}}
"#
            )
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stderr),
            format!(
                "oidc-edge: note: the issuer ends in '/', so the provider {provider} in the ARN and \
                 in the condition keys does too: IAM keeps a provider URL as it was created, and \
                 STS finds the provider by the token's iss, which ends in '/' as well (A-2, F-1). \
                 Create the provider with --url {issuer} exactly, as `oidc-edge aws provider` \
                 prints it.\n"
            )
        );
    }
    let out = run(&[
        "aws",
        "trust-policy",
        "--issuer",
        ISSUER,
        "--account-id",
        "123456789012",
        "--namespace",
        "default",
        "--service-account",
        "s3-lister",
    ]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "",
        "no note without a '/'"
    );
}
