//! The apiserver, kubeconfig, in-cluster and url sources against the fake apiserver over real
//! TLS: outages and bad answers never change what is served. The happy path, the real
//! formats, `Accept`, RBAC and token renewal run against a real kube-apiserver in
//! `real_source.rs`; what stays here needs a fault the real one cannot be made to produce, or
//! an identity its test cluster does not have (client certificates; see
//! `support/FAKE_APISERVER.md`).
//!
//! The fake runs on the test's runtime while the harness blocks on log lines, so these tests
//! use a multi-threaded runtime: the fake keeps answering on the other worker.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

use crate::support::clients::{assert_not_published_yet, client, get};
use crate::support::config::{Source, TestConfig};
use crate::support::fake_apiserver::{FakeApiserver, K3S_DEFAULT_ISSUER, Mode};
use crate::support::inprocess::InProcess;
use crate::support::pki::Pki;
use crate::support::process::{Binary, run};
use crate::support::{
    K3S, PRIVATE_RSA, ROTATED, RSA_1024, Scratch, eventually, fixture_kids, kids,
};

const ISSUER: &str = "https://oidc.example.com";
const TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.token-a.sig";

/// A scratch dir with the fake's CA in `ca.pem` and the token in `token`, and a config that
/// reads the fake every 100 ms.
fn setup(fake: &FakeApiserver) -> (Scratch, TestConfig) {
    let scratch = Scratch::new();
    // A trailing newline, as `kubectl create token > token` leaves.
    let source = fake
        .source_in(&scratch, &format!("{TOKEN}\n"))
        .set("refresh_interval", "100ms")
        .set("timeout", "500ms");
    (scratch, TestConfig::new().source(source))
}

/// The kids served at `jwks_url`; none while it is not 200.
async fn served_kids(jwks_url: &str) -> Vec<String> {
    let (status, body) = get(jwks_url).await;
    if status == 200 {
        kids(&body)
    } else {
        Vec::new()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outages_never_change_what_is_served_and_no_request_fails() {
    let mut fake = FakeApiserver::start(K3S, ISSUER, TOKEN).await;
    let (scratch, config) = setup(&fake);
    let config = config.write(&scratch);
    let server = InProcess::start(&config).await;
    eventually("keys", || async {
        !served_kids(&server.url("/openid/v1/jwks")).await.is_empty()
    })
    .await;
    let (_, good) = get(&server.url("/openid/v1/jwks")).await;

    // A client polls all along; every answer must be the good set, byte for byte.
    let stop = Arc::new(AtomicBool::new(false));
    let (requests, bad) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let poller = tokio::spawn({
        let (stop, requests, bad) = (Arc::clone(&stop), Arc::clone(&requests), Arc::clone(&bad));
        let (url, good, http) = (server.url("/openid/v1/jwks"), good.clone(), client());
        async move {
            while !stop.load(Ordering::Relaxed) {
                let ok = match http.get(&url).send().await {
                    Ok(r) if r.status() == 200 => r.text().await.is_ok_and(|b| b == good),
                    _ => false,
                };
                requests.fetch_add(1, Ordering::Relaxed);
                if !ok {
                    bad.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });

    for (mode, log) in [
        (Mode::Status(500), "answered 500 Internal Server Error"),
        (Mode::Hang, "operation timed out"),
        (Mode::Status(401), "the apiserver refused the credentials"),
    ] {
        fake.set(|s| s.mode = mode.clone());
        server.wait_for_log(log);
        fake.set(|s| s.mode = Mode::Normal);
    }
    fake.stop();
    server.wait_for_log("Connection refused");
    fake.restart().await;
    let failures_before = server.count_log("fetch failed; still serving the last good set");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        server.count_log("fetch failed; still serving the last good set"),
        failures_before,
        "the restarted upstream is fetched without error"
    );
    stop.store(true, Ordering::Relaxed);
    poller.await.expect("poller");
    let (requests, bad) = (
        requests.load(Ordering::Relaxed),
        bad.load(Ordering::Relaxed),
    );
    assert!(requests > 50, "{requests} requests");
    assert_eq!(bad, 0, "{bad} of {requests} requests failed or differed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_upstream_answers_are_never_published() {
    let fake = FakeApiserver::start(K3S, ISSUER, TOKEN).await;
    let (scratch, config) = setup(&fake);
    let config = config.write(&scratch);
    let server = InProcess::start(&config).await;
    eventually("keys", || async {
        !served_kids(&server.url("/openid/v1/jwks")).await.is_empty()
    })
    .await;
    let (_, good) = get(&server.url("/openid/v1/jwks")).await;

    let weak_only = {
        let set: serde_json::Value = serde_json::from_str(RSA_1024).expect("json");
        serde_json::json!({ "keys": [set["keys"][0].clone()] }).to_string()
    };
    let cases = [
        (Mode::Body(PRIVATE_RSA.to_owned()), "PRIVATE KEY MATERIAL"),
        (Mode::Body(weak_only), "RSA modulus is 1024 bits"),
        (
            Mode::Body("<html>gateway</html>".to_owned()),
            "not valid JSON",
        ),
        (
            Mode::Body("x".repeat(2 << 20)),
            "is larger than 1048576 bytes",
        ),
        (
            Mode::Redirect("https://evil.example/jwks".to_owned()),
            "answered 302 Found with Location \"https://evil.example/jwks\"; redirects are never followed",
        ),
        (Mode::Drip, "operation timed out"),
    ];
    for (mode, reason) in cases {
        fake.set(|s| s.mode = mode);
        let line = server.wait_for_log(reason);
        assert!(
            line.contains("still serving the last good set") || line.contains("key left out"),
            "{line}"
        );
        let (status, body) = get(&server.url("/openid/v1/jwks")).await;
        assert_eq!((status, body.as_str()), (200, good.as_str()), "{reason}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_is_a_clear_error_naming_the_url() {
    let fake = FakeApiserver::start(K3S, ISSUER, TOKEN).await;
    let (scratch, config) = setup(&fake);
    let config = config.write(&scratch);
    scratch.write("ca.pem", &Pki::new("some-other-ca").ca_pem);
    let server = InProcess::start(&config).await;
    let line = server.wait_for_log("fetch failed");
    assert!(
        line.contains(&format!("GET {}/openid/v1/jwks: ", fake.url())),
        "{line}"
    );
    assert!(
        line.contains("invalid peer certificate: UnknownIssuer"),
        "{line}"
    );
    assert_eq!(get(&server.url("/openid/v1/jwks")).await.0, 503);
    assert_eq!(
        fake.jwks_requests(),
        0,
        "nothing was sent to an unverified server"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn down_at_start_with_no_state_is_503_and_recovers_by_itself() {
    let mut fake = FakeApiserver::start(K3S, ISSUER, TOKEN).await;
    fake.stop();
    let (scratch, config) = setup(&fake);
    let config = config.write(&scratch);
    let server = InProcess::start(&config).await;
    server.wait_for_log("Connection refused");
    assert_not_published_yet(&server.url("/openid/v1/jwks")).await;
    fake.restart().await;
    eventually("recovery", || async {
        served_kids(&server.url("/openid/v1/jwks")).await == fixture_kids(K3S)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn down_at_start_with_persisted_state_serves_at_once() {
    let mut fake = FakeApiserver::start(K3S, ISSUER, TOKEN).await;
    let (scratch, config) = setup(&fake);
    let config = config.write(&scratch);
    let server = Binary::start(&config);
    eventually("keys", || async {
        !served_kids(&server.url("/openid/v1/jwks")).await.is_empty()
    })
    .await;
    let (_, good) = get(&server.url("/openid/v1/jwks")).await;
    server.kill();
    fake.stop();
    let restarted = Binary::start(&config);
    assert_eq!(get(&restarted.url("/openid/v1/jwks")).await, (200, good));
}

/// F-1 as it changes: the real apiserver's mismatch report is in `real_source.rs`, but its
/// `--service-account-issuer` is fixed for the life of the test cluster; the fake's issuer
/// changes between two refreshes, as after the apiserver is restarted with the flag fixed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_issuer_mismatch_is_reported_once_and_its_resolution_when_the_cluster_is_fixed() {
    let fake = FakeApiserver::start(K3S, K3S_DEFAULT_ISSUER, TOKEN).await;
    let (scratch, config) = setup(&fake);
    let config = config.write(&scratch);
    let server = InProcess::start(&config).await;
    server.wait_for_log("issuer mismatch");
    // Reported once, not on every refresh.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(server.count_log("issuer mismatch"), 1);
    fake.set(|s| s.issuer = ISSUER.to_owned());
    let line = server.wait_for_log("issuer mismatch resolved");
    assert!(
        line.contains("issuer mismatch resolved: the cluster signs tokens for this issuer"),
        "{line}"
    );
}

fn kubeconfig(server: &str, ca_pem: &str, user: &str) -> String {
    format!(
        "apiVersion: v1
clusters:
- cluster:
    certificate-authority-data: {}
    server: {server}
  name: default
contexts:
- context:
    cluster: default
    user: default
  name: default
current-context: default
kind: Config
preferences: {{}}
users:
- name: default
  user:
{user}",
        STANDARD.encode(ca_pem)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_k3s_kubeconfig_with_client_certificate_data_works() {
    let fake = FakeApiserver::start(K3S, ISSUER, "no-token-accepted").await;
    let scratch = Scratch::new();
    let admin = fake.pki.client("system:admin");
    let user = format!(
        "    client-certificate-data: {}\n    client-key-data: {}\n",
        STANDARD.encode(&admin.cert_pem),
        STANDARD.encode(&admin.key_pem)
    );
    scratch.write(
        "k3s.yaml",
        &kubeconfig(&fake.url(), &fake.pki.ca_pem, &user),
    );
    let config = TestConfig::new()
        .source(
            Source::new("kubeconfig")
                .set("kubeconfig", "k3s.yaml")
                .set("refresh_interval", "100ms"),
        )
        .write(&scratch);
    let out = run(&["check-config", "--config", config.to_str().expect("utf-8")]);
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(
        summary.contains("(context \"default\")") && summary.contains("(client certificate)"),
        "{summary}"
    );
    let server = InProcess::start(&config).await;
    eventually("keys over the client certificate", || async {
        served_kids(&server.url("/openid/v1/jwks")).await == fixture_kids(K3S)
    })
    .await;
    assert_eq!(
        fake.state.lock().expect("state").jwks_auth[0],
        None,
        "no bearer token sent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kubeconfig_with_an_exec_plugin_is_refused_with_a_clear_message() {
    let scratch = Scratch::new();
    let user = "    exec:\n      apiVersion: client.authentication.k8s.io/v1beta1\n      command: aws\n      args: [eks, get-token]\n";
    let ca = Pki::new("ca").ca_pem;
    let kubeconfig_path = scratch.write(
        "kubeconfig",
        &kubeconfig("https://127.0.0.1:6443", &ca, user),
    );
    let config = TestConfig::new()
        .source(Source::new("kubeconfig").set("kubeconfig", "kubeconfig"))
        .write(&scratch);
    let out = run(&["check-config", "--config", config.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(64));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "oidc-edge: {}: issuers[0].sources[0].kubeconfig: {}: user \"default\" uses an exec plugin, which oidc-edge does not run; use a kubeconfig with a token, tokenFile or client certificate, or kind = \"apiserver\" with token_file\n",
            config.display(),
            kubeconfig_path.display()
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_cluster_uses_the_pod_environment() {
    let fake = FakeApiserver::start(K3S, ISSUER, TOKEN).await;
    let scratch = Scratch::new();
    scratch.write("ca.crt", &fake.pki.ca_pem);
    scratch.write("token", TOKEN);
    let config = TestConfig::new()
        .source(
            Source::new("in-cluster")
                .set("ca_file", "ca.crt")
                .set("token_file", "token")
                .set("refresh_interval", "100ms"),
        )
        .write(&scratch);
    let port = fake.addr.port().to_string();
    let server = Binary::start_with_env(
        &config,
        &[
            ("KUBERNETES_SERVICE_HOST", "127.0.0.1"),
            ("KUBERNETES_SERVICE_PORT", &port),
        ],
    );
    eventually("in-cluster keys", || async {
        served_kids(&server.url("/openid/v1/jwks")).await == fixture_kids(K3S)
    })
    .await;

    let out = run(&["check-config", "--config", config.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(64), "no pod environment");
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("\"in-cluster\" needs KUBERNETES_SERVICE_HOST")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_apiservers_and_a_url_source_are_unioned() {
    let a = FakeApiserver::start(K3S, ISSUER, TOKEN).await;
    let b = FakeApiserver::start(ROTATED, ISSUER, "token-b").await;
    let extra = serde_json::json!({ "keys": [{
        "kty": "OKP", "kid": "ed25519-1", "crv": "Ed25519",
        "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"
    }]});
    let public = FakeApiserver::start(&extra.to_string(), ISSUER, "unused").await;
    public.set(|s| s.anonymous = true);
    let scratch = Scratch::new();
    scratch.write("a.pem", &a.pki.ca_pem);
    scratch.write("b.pem", &b.pki.ca_pem);
    scratch.write("public.pem", &public.pki.ca_pem);
    scratch.write("token-a", TOKEN);
    scratch.write("token-b", "token-b");
    let source = |kind: &str, url: String, ca: &str| {
        Source::new(kind)
            .set("url", url)
            .set("ca_file", ca)
            .set("refresh_interval", "100ms")
    };
    let config = TestConfig::new()
        .source(source("apiserver", a.url(), "a.pem").set("token_file", "token-a"))
        .source(source("apiserver", b.url(), "b.pem").set("token_file", "token-b"))
        .source(source(
            "url",
            format!("{}/openid/v1/jwks", public.url()),
            "public.pem",
        ))
        .write(&scratch);
    let server = InProcess::start(&config).await;
    let mut all = fixture_kids(K3S);
    all.extend(fixture_kids(ROTATED));
    all.push("ed25519-1".to_owned());
    all.sort();
    all.dedup();
    eventually("the union of three sources", || async {
        served_kids(&server.url("/openid/v1/jwks")).await == all
    })
    .await;
    let discovery = get(&server.url("/.well-known/openid-configuration"))
        .await
        .1;
    assert!(
        discovery.contains(r#""id_token_signing_alg_values_supported":["ES256","EdDSA","RS256"]"#),
        "{discovery}"
    );
    assert_eq!(
        public.state.lock().expect("state").jwks_auth[0],
        None,
        "the url source sends no token"
    );
}

/// L9: the scratch image has no CA bundle. A url source without ca_file must still start and
/// verify against the compiled-in webpki roots; the fake's private CA is not among them, so
/// the fetch fails as untrusted, not for want of roots. No system roots are simulated with an
/// empty SSL_CERT_FILE and SSL_CERT_DIR (read by rustls-native-certs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_url_source_without_ca_file_needs_no_system_roots() {
    let public = FakeApiserver::start(K3S, ISSUER, "unused").await;
    public.set(|s| s.anonymous = true);
    let scratch = Scratch::new();
    let empty = scratch.write("empty.pem", "");
    std::fs::create_dir(scratch.path("certs")).expect("mkdir");
    let config = TestConfig::new()
        .source(
            Source::new("url")
                .set("url", format!("{}/openid/v1/jwks", public.url()))
                .set("refresh_interval", "100ms"),
        )
        .write(&scratch);
    let certs = scratch.path("certs");
    let mut server = Binary::start_with_env(
        &config,
        &[
            ("SSL_CERT_FILE", empty.to_str().expect("utf-8")),
            ("SSL_CERT_DIR", certs.to_str().expect("utf-8")),
        ],
    );
    let line = server.wait_for_log("fetch failed; still serving the last good set");
    assert!(line.contains("UnknownIssuer"), "{line}");
    assert_eq!(
        server.count_log("No CA certificates"),
        0,
        "{:?}",
        server.log()
    );
    server.kill();
}

/// The DER of the first certificate in `pem`.
fn der(pem: &str) -> Vec<u8> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    CertificateDer::from_pem_slice(pem.as_bytes())
        .expect("certificate")
        .as_ref()
        .to_vec()
}

/// L1: a rotated client certificate and key are picked up without a restart. The fake stops
/// accepting the old certificate (as when it expires), the files are replaced with a new pair
/// from the same CA, SIGHUP asks for a fetch, and the fetch succeeds with the new certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_client_certificate_files_are_used_without_a_restart() {
    let fake = FakeApiserver::start(K3S, ISSUER, TOKEN).await;
    let (old, new) = (
        fake.pki.client("system:admin"),
        fake.pki.client("system:admin"),
    );
    let scratch = Scratch::new();
    scratch.write("ca.pem", &fake.pki.ca_pem);
    scratch.write("client.pem", &old.cert_pem);
    scratch.write("client-key.pem", &old.key_pem);
    let config = TestConfig::new()
        .source(
            Source::new("apiserver")
                .set("url", fake.url())
                .set("ca_file", "ca.pem")
                .set("client_cert_file", "client.pem")
                .set("client_key_file", "client-key.pem")
                .set("refresh_interval", "100ms"),
        )
        .write(&scratch);
    let server = Binary::start(&config);
    eventually("keys over the first certificate", || async {
        served_kids(&server.url("/openid/v1/jwks")).await == fixture_kids(K3S)
    })
    .await;

    fake.set(|s| {
        s.refused_client_certs.push(der(&old.cert_pem));
        s.jwks = ROTATED.to_owned();
    });
    scratch.replace("client.pem", &new.cert_pem);
    scratch.replace("client-key.pem", &new.key_pem);
    server.signal("HUP");
    let mut both = fixture_kids(K3S);
    both.extend(fixture_kids(ROTATED));
    both.sort();
    both.dedup();
    eventually("keys over the new certificate", || async {
        served_kids(&server.url("/openid/v1/jwks")).await == both
    })
    .await;
    let seen = fake.state.lock().expect("state").jwks_client_certs.clone();
    assert_eq!(seen.last(), Some(&Some(der(&new.cert_pem))));
}
