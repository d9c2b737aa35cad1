//! The self-test against real parts (issue 20): oidc-edge mints a token through a real
//! kube-apiserver's TokenRequest and checks it as AWS would against the issuer's public
//! documents, served over TLS by another oidc-edge with a test CA.

use crate::support::config::{Source, TestConfig};
use crate::support::inprocess::InProcess;
use crate::support::pki::Pki;
use crate::support::real::{
    Bins, Cluster, ISSUER, LISTER, LISTER_NAMESPACE, STS_AUDIENCE, SaKey, serve_https,
};
use crate::support::{Scratch, eventually};

/// oidc-edge reading `cluster` with the token in `token_file`, self-testing `default/s3-lister`
/// against the public site at `public`.
async fn self_testing(
    scratch: &Scratch,
    cluster: &Cluster,
    token_file: &str,
    public: std::net::SocketAddr,
) -> InProcess {
    self_testing_as(scratch, cluster, token_file, public, LISTER, false).await
}

/// [`self_testing`] for the service account `default/sa`, with the self-test part of
/// readiness when `readiness`.
async fn self_testing_as(
    scratch: &Scratch,
    cluster: &Cluster,
    token_file: &str,
    public: std::net::SocketAddr,
    sa: &str,
    readiness: bool,
) -> InProcess {
    let config = TestConfig::new()
        .set("issuers.0.issuer", ISSUER)
        .source(
            Source::new("apiserver")
                .set("url", cluster.url())
                .set("ca_file", "apiserver-ca.pem")
                .set("token_file", token_file),
        )
        // Its own state and config file: several of these run beside each other.
        .set(
            "state.dir",
            format!("state-{token_file}-{sa}-{}-{readiness}", public.port()),
        )
        .set(
            "issuers.0.selftest.service_account",
            format!("{LISTER_NAMESPACE}/{sa}"),
        )
        .set("issuers.0.selftest.audience", STS_AUDIENCE)
        .set("issuers.0.selftest.interval", "1s")
        .set("issuers.0.selftest.ca_file", "test-ca.pem")
        .set("issuers.0.selftest.connect_to", public.to_string())
        .set("issuers.0.selftest.readiness", readiness);
    let path = scratch.write(
        &format!(
            "selftest-{token_file}-{sa}-{}-{readiness}.toml",
            public.port()
        ),
        &config.text(),
    );
    let summary =
        crate::support::process::run(&["check-config", "--config", path.to_str().expect("utf-8")]);
    assert!(
        String::from_utf8_lossy(&summary.stdout).contains(&format!(
            "  selftest   {LISTER_NAMESPACE}/{sa} for {STS_AUDIENCE} every 1s (TokenRequest through source[0]){}\n",
            if readiness { "; part of readiness" } else { "" }
        )),
        "{summary:?}"
    );
    InProcess::start(&path).await
}

async fn selftest_status(server: &InProcess) -> serde_json::Value {
    let (_, body) = crate::support::clients::get(&server.admin_url("/status")).await;
    let status: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    status["selftest"][0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_self_test_passes_and_names_the_step_that_fails() {
    let Some(bins) = Bins::find() else { return };
    let key = SaKey::generate();
    let cluster = Cluster::start(&bins, ISSUER, &[&key], &key).await;
    let reader_token = cluster.bound_reader_token().await;
    cluster
        .create_service_account(LISTER_NAMESPACE, LISTER)
        .await;
    let scratch = Scratch::new();
    let pki = Pki::new("oidc-edge self-test CA");
    let public = serve_https(&cluster, ISSUER, &reader_token, &pki, &scratch).await;
    scratch.write("test-ca.pem", &pki.ca_pem);
    scratch.write("admin-token", &cluster.admin_token);

    // Credentials that may create tokens (here the cluster's admin): the whole chain passes,
    // and the token's kid is the apiserver's signing key.
    let allowed = self_testing(&scratch, &cluster, "admin-token", public.https()).await;
    eventually("the self-test passes", || async {
        selftest_status(&allowed).await["passed"] == true
    })
    .await;
    let status = selftest_status(&allowed).await;
    assert_eq!(status["kid"], key.kid.as_str(), "{status:#}");
    assert_eq!(status["failures"], serde_json::json!([]), "{status:#}");
    assert_eq!(status["service_account"], "default/s3-lister");
    let scrape = crate::support::metrics::scrape(allowed.admin).await;
    assert_eq!(
        crate::support::metrics::metric(
            &scrape,
            "oidc_edge_selftest_passed",
            &[("issuer", ISSUER)]
        ),
        1.0
    );

    // The reader may only read the issuer's documents: TokenRequest answers 403, and the
    // self-test says that step failed, with the apiserver's words. Serving is unaffected.
    let reader = self_testing(&scratch, &cluster, "token", public.https()).await;
    eventually("the self-test fails at TokenRequest", || async {
        selftest_status(&reader).await["passed"] == false
    })
    .await;
    let status = selftest_status(&reader).await;
    let failure = status["failures"][0].as_str().unwrap_or_default();
    assert!(
        failure.starts_with("TokenRequest: ")
            && failure.contains("403 Forbidden")
            && failure.contains("cannot create resource \"serviceaccounts/token\""),
        "{status:#}"
    );
    let (code, _) = crate::support::clients::get(&reader.url("/openid/v1/jwks")).await;
    assert_eq!(code, 200);
    drop(reader);

    // A service account that does not exist: TokenRequest's 404, in the apiserver's words.
    let nobody = self_testing_as(
        &scratch,
        &cluster,
        "admin-token",
        public.https(),
        "nobody",
        false,
    )
    .await;
    eventually(
        "the self-test fails for an unknown service account",
        || async { selftest_status(&nobody).await["passed"] == false },
    )
    .await;
    let status = selftest_status(&nobody).await;
    let failure = status["failures"][0].as_str().unwrap_or_default();
    assert!(
        failure.starts_with("TokenRequest: ")
            && failure.contains("404 Not Found")
            && failure.contains("serviceaccounts \"nobody\" not found"),
        "{status:#}"
    );
    drop(nobody);

    // An expired certificate on the public name: the TLS step says so.
    let expired = pki.expired_server_for(&[crate::support::real::ISSUER_HOST]);
    scratch.write("expired-cert.pem", &expired.cert_pem);
    scratch.write("expired-key.pem", &expired.key_pem);
    let stale_site = TestConfig::new()
        .set("issuers.0.issuer", ISSUER)
        .source(
            Source::new("apiserver")
                .set("url", cluster.url())
                .set("ca_file", "apiserver-ca.pem")
                .set("token_file", "token"),
        )
        .set("state.dir", "state-expired-site")
        .set("https.listen", "127.0.0.1:0")
        .set("https.files.cert_file", "expired-cert.pem")
        .set("https.files.key_file", "expired-key.pem");
    let stale_site =
        InProcess::start(&scratch.write("expired-site.toml", &stale_site.text())).await;
    let tls = self_testing(&scratch, &cluster, "admin-token", stale_site.https()).await;
    eventually("the self-test fails on the expired certificate", || async {
        selftest_status(&tls).await["passed"] == false
    })
    .await;
    let status = selftest_status(&tls).await;
    assert!(
        status["failures"]
            .to_string()
            .to_lowercase()
            .contains("expired"),
        "{status:#}"
    );
    drop(tls);
    drop(stale_site);

    // The public name unreachable: the step that fails is the public fetch, and the server
    // keeps serving and stays ready (the self-test never makes it less available).
    let closed: std::net::SocketAddr =
        format!("127.0.0.1:{}", crate::support::pebble::free_tcp_port())
            .parse()
            .expect("addr");
    let cut_off = self_testing(&scratch, &cluster, "admin-token", closed).await;
    eventually("the self-test fails at the public fetch", || async {
        selftest_status(&cut_off).await["passed"] == false
    })
    .await;
    let status = selftest_status(&cut_off).await;
    let failures = status["failures"].to_string();
    assert!(
        failures.contains("https://oidc.example.test/.well-known/openid-configuration")
            && failures.contains("Connection refused"),
        "{status:#}"
    );
    assert_eq!(
        crate::support::clients::get(&cut_off.admin_url("/readyz")).await,
        (200, "ready\n".to_owned())
    );
    let (code, _) = crate::support::clients::get(&cut_off.url("/openid/v1/jwks")).await;
    assert_eq!(code, 200);
    drop(cut_off);

    // The cluster signs with a key it does not publish (a rotation that signs before it
    // publishes, an external signer): said first, as the key that is not public yet.
    let unpublished = SaKey::generate();
    let mut cluster = cluster;
    cluster.restart(&[&key], &unpublished).await;
    eventually("the self-test sees the unpublished key", || async {
        selftest_status(&allowed).await["kid"] == unpublished.kid.as_str()
    })
    .await;
    let status = selftest_status(&allowed).await;
    assert_eq!(status["passed"], false, "{status:#}");
    assert_eq!(
        status["headline"].as_str(),
        Some(format!(
            "THE TOKEN'S SIGNING KEY IS NOT PUBLIC: kid {:?} is not in the published JWKS, so every relying party refuses the tokens it signs until it is published (a rotation that signs before it publishes, an external signer, a rebuilt control plane)",
            unpublished.kid
        ).as_str()),
        "{status:#}"
    );
    let scrape = crate::support::metrics::scrape(allowed.admin).await;
    assert_eq!(
        crate::support::metrics::metric(
            &scrape,
            "oidc_edge_selftest_passed",
            &[("issuer", ISSUER)]
        ),
        0.0
    );
}

/// k3s's default: the apiserver signs tokens for `https://kubernetes.default.svc.cluster.local`
/// while oidc-edge publishes the keys for the public issuer. Every relying party refuses such
/// tokens (F-1); the self-test names the `iss` it saw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_self_test_names_an_issuer_the_cluster_does_not_sign_for() {
    let Some(bins) = Bins::find() else { return };
    let key = SaKey::generate();
    let cluster_issuer = "https://kubernetes.default.svc.cluster.local";
    let cluster = Cluster::start(&bins, cluster_issuer, &[&key], &key).await;
    let reader_token = cluster.bound_reader_token().await;
    cluster
        .create_service_account(LISTER_NAMESPACE, LISTER)
        .await;
    let scratch = Scratch::new();
    let pki = Pki::new("oidc-edge self-test CA");
    let public = serve_https(&cluster, ISSUER, &reader_token, &pki, &scratch).await;
    scratch.write("test-ca.pem", &pki.ca_pem);
    scratch.write("admin-token", &cluster.admin_token);
    let tester = self_testing(&scratch, &cluster, "admin-token", public.https()).await;
    eventually("the self-test fails", || async {
        selftest_status(&tester).await["passed"] == false
    })
    .await;
    let status = selftest_status(&tester).await;
    assert!(
        status["failures"]
            .to_string()
            .contains(&format!("iss is \\\"{cluster_issuer}\\\"")),
        "{status:#}"
    );
}

/// A proxy in front of the public name that breaks what relying parties get (issue 20's
/// "a 302 or wrong content type from a proxy in front"): real nginx terminates TLS for the
/// issuer's host and forwards to oidc-edge's plain listener, but on one port answers the
/// discovery document with a 302, and on another serves the JWKS as `text/plain`
/// . The self-test names exactly that step with what it saw; serving is unaffected, and
/// readiness too unless `readiness = true` makes the self-test part of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_self_test_names_a_redirect_or_a_wrong_content_type_from_a_proxy_in_front() {
    let Some(bins) = Bins::find() else { return };
    let key = SaKey::generate();
    let cluster = Cluster::start(&bins, ISSUER, &[&key], &key).await;
    let reader_token = cluster.bound_reader_token().await;
    cluster
        .create_service_account(LISTER_NAMESPACE, LISTER)
        .await;
    let scratch = Scratch::new();
    let pki = Pki::new("oidc-edge self-test CA");
    let public = serve_https(&cluster, ISSUER, &reader_token, &pki, &scratch).await;
    scratch.write("test-ca.pem", &pki.ca_pem);
    scratch.write("admin-token", &cluster.admin_token);

    let leaf = pki.server_for(&[crate::support::real::ISSUER_HOST]);
    let cert = scratch.write("proxy.pem", &leaf.cert_pem);
    let key_file = scratch.write("proxy.key", &leaf.key_pem);
    let (redirecting, plain_text) = (
        crate::support::pebble::free_tcp_port(),
        crate::support::pebble::free_tcp_port(),
    );
    let upstream = public.addr;
    let server = |port: u16, breaks: &str| {
        format!(
            "  server {{\n    listen 127.0.0.1:{port} ssl;\n    server_name {host};\n\
             \x20   ssl_certificate {cert};\n    ssl_certificate_key {key};\n{breaks}\
             \x20   location / {{\n      proxy_pass http://{upstream};\n      proxy_set_header Host $host;\n    }}\n  }}\n",
            host = crate::support::real::ISSUER_HOST,
            cert = cert.display(),
            key = key_file.display(),
        )
    };
    let redirect = "    location = /.well-known/openid-configuration {\n\
                    \x20     return 302 https://login.example.net/.well-known/openid-configuration;\n    }\n";
    let text_plain = format!(
        "    location = /openid/v1/jwks {{\n      proxy_pass http://{upstream};\n      proxy_set_header Host $host;\n\
         \x20     proxy_hide_header Content-Type;\n      add_header Content-Type text/plain always;\n    }}\n"
    );
    let _nginx = crate::support::nginx::start(
        &scratch,
        "nginx",
        redirecting,
        &format!(
            "{}{}",
            server(redirecting, redirect),
            server(plain_text, &text_plain)
        ),
    );
    let at = |port: u16| std::net::SocketAddr::from(([127, 0, 0, 1], port));

    let behind_redirect = self_testing(&scratch, &cluster, "admin-token", at(redirecting)).await;
    let behind_text = self_testing(&scratch, &cluster, "admin-token", at(plain_text)).await;
    for tester in [&behind_redirect, &behind_text] {
        eventually("the self-test behind nginx fails", || async {
            selftest_status(tester).await["passed"] == false
        })
        .await;
    }
    // The step, with the value seen, and nothing else: the redirect stops the check before
    // the keys (a relying party gets no document to follow); the text/plain JWKS still holds
    // the key that signed the token, so only its content type fails.
    let status = selftest_status(&behind_redirect).await;
    assert_eq!(
        status["failures"],
        serde_json::json!([
            "A-6 discovery document is served without a redirect: 302 to https://login.example.net/.well-known/openid-configuration"
        ]),
        "{status:#}"
    );
    assert_eq!(status["headline"], serde_json::Value::Null, "{status:#}");
    let status = selftest_status(&behind_text).await;
    assert_eq!(
        status["failures"],
        serde_json::json!([
            "X-4 JWKS content type every client accepts (application/json): text/plain"
        ]),
        "{status:#}"
    );
    assert_eq!(status["kid"], key.kid.as_str(), "{status:#}");

    // Serving is unaffected: each tester serves both documents and stays ready.
    for tester in [&behind_redirect, &behind_text] {
        for path in ["/.well-known/openid-configuration", "/openid/v1/jwks"] {
            assert_eq!(crate::support::clients::get(&tester.url(path)).await.0, 200);
        }
        assert_eq!(
            crate::support::clients::get(&tester.admin_url("/readyz")).await,
            (200, "ready\n".to_owned())
        );
    }

    // With `readiness = true`, the failed self-test makes the server not ready, with the
    // failed step as the reason; it still serves both documents.
    let gated = self_testing_as(
        &scratch,
        &cluster,
        "admin-token",
        at(redirecting),
        LISTER,
        true,
    )
    .await;
    eventually("the gated self-test fails", || async {
        selftest_status(&gated).await["passed"] == false
    })
    .await;
    assert_eq!(
        crate::support::clients::get(&gated.admin_url("/readyz")).await,
        (
            503,
            format!(
                "not ready: {ISSUER}: self-test fails: A-6 discovery document is served without a redirect: 302 to https://login.example.net/.well-known/openid-configuration\n"
            )
        )
    );
    for path in ["/.well-known/openid-configuration", "/openid/v1/jwks"] {
        assert_eq!(crate::support::clients::get(&gated.url(path)).await.0, 200);
    }
}
