//! The admin listener and the signals: readiness, metrics that move, status that explains,
//! SIGHUP refreshes now, SIGTERM drains and exits 0.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

use crate::support::clients::{builder, get};
use crate::support::config::{Source, TestConfig};
use crate::support::fake_apiserver::{FakeApiserver, K3S_DEFAULT_ISSUER, Mode};
use crate::support::inprocess::InProcess;
use crate::support::metrics::{metric, scrape};
use crate::support::process::Binary;
use crate::support::{K3S, Scratch, eventually};

const ISSUER: &str = "https://oidc.example.com";
const TOKEN: &str = "admin-test-token";

fn apiserver_config(scratch: &Scratch, fake: &FakeApiserver, interval: &str) -> std::path::PathBuf {
    TestConfig::new()
        .source(
            fake.source_in(scratch, TOKEN)
                .set("refresh_interval", interval)
                .set("timeout", "500ms"),
        )
        .write(scratch)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_before_the_first_key_set_and_200_after() {
    let mut fake = FakeApiserver::start(K3S, ISSUER, TOKEN).await;
    fake.stop();
    let scratch = Scratch::new();
    let server = InProcess::start(&apiserver_config(&scratch, &fake, "100ms")).await;
    assert_eq!(
        get(&server.admin_url("/livez")).await,
        (200, "ok\n".to_owned())
    );
    server.wait_for_log("Connection refused");
    assert_eq!(
        get(&server.admin_url("/readyz")).await,
        (
            503,
            format!("not ready: {ISSUER}: no key set published yet\n")
        )
    );
    fake.restart().await;
    let url = server.admin_url("/readyz");
    eventually("ready", || async { get(&url).await.0 == 200 }).await;
    assert_eq!(get(&url).await.1, "ready\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_and_refreshes() {
    let fake = FakeApiserver::start(K3S, K3S_DEFAULT_ISSUER, TOKEN).await;
    let scratch = Scratch::new();
    let server = InProcess::start(&apiserver_config(&scratch, &fake, "100ms")).await;
    let jwks = server.url("/openid/v1/jwks");
    eventually("keys", || async { get(&jwks).await.0 == 200 }).await;
    let before = scrape(server.admin).await;
    for _ in 0..3 {
        assert_eq!(get(&jwks).await.0, 200);
    }
    assert_eq!(get(&server.url("/nope")).await.0, 404);
    let after = scrape(server.admin).await;
    let jwks_200 = [("issuer", ISSUER), ("document", "jwks"), ("code", "200")];
    assert_eq!(
        metric(&after, "oidc_edge_http_requests_total", &jwks_200)
            - metric(&before, "oidc_edge_http_requests_total", &jwks_200),
        3.0
    );
    let not_found = [("document", "none"), ("code", "404")];
    assert!(metric(&after, "oidc_edge_http_requests_total", &not_found) >= 1.0);
    assert_eq!(metric(&after, "oidc_edge_keys", &[("issuer", ISSUER)]), 2.0);
    assert_eq!(
        metric(
            &after,
            "oidc_edge_upstream_issuer_mismatch",
            &[("issuer", ISSUER), ("source", "0")]
        ),
        1.0
    );
    let ok = [("issuer", ISSUER), ("source", "0"), ("result", "ok")];
    assert!(metric(&after, "oidc_edge_refreshes_total", &ok) >= 1.0);
    assert!(metric(&after, "oidc_edge_jwks_age_seconds", &[("issuer", ISSUER)]) < 5.0);

    fake.set(|s| s.mode = Mode::Status(500));
    let failed = [
        ("issuer", ISSUER),
        ("source", "0"),
        ("result", "fetch_error"),
    ];
    let mut last = 0.0;
    for _ in 0..200 {
        last = metric(
            &scrape(server.admin).await,
            "oidc_edge_refreshes_total",
            &failed,
        );
        if last >= 2.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(last >= 2.0, "failed refreshes are counted: {last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_the_keys_and_a_failing_sources_error() {
    let fake = FakeApiserver::start(K3S, K3S_DEFAULT_ISSUER, TOKEN).await;
    let scratch = Scratch::new();
    let server = InProcess::start(&apiserver_config(&scratch, &fake, "100ms")).await;
    let jwks = server.url("/openid/v1/jwks");
    eventually("keys", || async { get(&jwks).await.0 == 200 }).await;
    fake.set(|s| s.mode = Mode::Status(403));
    server.wait_for_log("answered 403 Forbidden");
    let (code, body) = get(&server.admin_url("/status")).await;
    assert_eq!(code, 200);
    let status: serde_json::Value = serde_json::from_str(&body).expect("status is JSON");
    assert_eq!(status["ready"], true);
    let issuer = &status["issuers"][0];
    assert_eq!(issuer["issuer"], ISSUER);
    assert_eq!(issuer["published"], true);
    assert_eq!(issuer["kids"].as_array().expect("kids").len(), 2);
    let source = &issuer["sources"][0];
    assert_eq!(source["healthy"], false);
    assert_eq!(source["upstream_issuer"], K3S_DEFAULT_ISSUER);
    assert_eq!(source["issuer_mismatch"], true);
    let error = source["last_error"].as_str().expect("last_error");
    assert!(
        error.contains("answered 403 Forbidden")
            && error.contains("system:service-account-issuer-discovery"),
        "{error}"
    );
    assert!(!body.contains(TOKEN), "no secret in /status");
}

/// What AWS STS sent for both documents in a published access log (see `http::fetched_by`).
const AWS_STS: &str = "AWS Security Token Service";

/// Issue 20: a fetch over TLS by a client that says it is AWS STS is recorded with the ETag
/// and the kids it received, in `/status` and as a metric; a 304 records the ETag it already
/// held; a HEAD, a browser and a client with no `User-Agent` record nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relying_partys_fetch_is_recorded_with_the_kids_it_received() {
    let scratch = Scratch::new();
    let pki = crate::support::pki::Pki::new("fetched-by test CA");
    let leaf = pki.server_for(&[crate::support::HTTPS_DOMAIN]);
    let server = InProcess::start(&TestConfig::https_files(&scratch, &leaf).write(&scratch)).await;
    let https = |path| crate::support::clients::https_url(server.https(), path);
    let (discovery, jwks) = (
        https("/.well-known/openid-configuration"),
        https("/openid/v1/jwks"),
    );
    let as_agent = |agent: Option<&str>| {
        let mut builder = crate::support::clients::https_client(&pki.ca_pem, server.https());
        if let Some(agent) = agent {
            builder = builder.user_agent(agent);
        }
        builder.build().expect("client")
    };
    let (aws, browser, anonymous) = (
        as_agent(Some(AWS_STS)),
        as_agent(Some(
            "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
        )),
        as_agent(None),
    );
    let fetched_by = || async {
        let (code, body) = get(&server.admin_url("/status")).await;
        assert_eq!(code, 200);
        let status: serde_json::Value = serde_json::from_str(&body).expect("status is JSON");
        status["issuers"][0]["fetched_by"].clone()
    };
    eventually("keys", || async {
        browser
            .get(&jwks)
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;

    // Others, and a HEAD by AWS (which receives no keys): no record.
    for client in [&browser, &anonymous] {
        for url in [&discovery, &jwks] {
            assert_eq!(
                client.get(url.as_str()).send().await.expect("GET").status(),
                200
            );
        }
    }
    assert_eq!(aws.head(&jwks).send().await.expect("HEAD").status(), 200);
    assert_eq!(fetched_by().await, serde_json::json!([]));

    let before = oidc_edge::jwks::unix_now();
    let answer = aws.get(&discovery).send().await.expect("GET discovery");
    assert_eq!(answer.status(), 200);
    let discovery_etag = answer.headers()["etag"].to_str().expect("ascii").to_owned();
    let answer = aws.get(&jwks).send().await.expect("GET JWKS");
    assert_eq!(answer.status(), 200);
    let jwks_etag = answer.headers()["etag"].to_str().expect("ascii").to_owned();
    let received = crate::support::kids(&answer.text().await.expect("body"));
    let after = oidc_edge::jwks::unix_now();
    assert_eq!(received.len(), 2);

    let mut records = fetched_by().await;
    let at = records[1]["at"].as_u64().expect("at");
    assert!((before..=after).contains(&at), "{records:#}");
    for record in records.as_array_mut().expect("records") {
        assert!(
            record["at"]
                .as_u64()
                .is_some_and(|t| (before..=after).contains(&t))
        );
        record["at"] = 0.into();
    }
    assert_eq!(
        records,
        serde_json::json!([
            {"family": "aws", "document": "discovery", "at": 0, "status": 200, "etag": discovery_etag},
            {"family": "aws", "document": "jwks", "at": 0, "status": 200, "etag": jwks_etag, "kids": received},
        ])
    );
    let scrape = scrape(server.admin).await;
    let last_fetch = |document| {
        metric(
            &scrape,
            "oidc_edge_relying_party_last_fetch_seconds",
            &[
                ("issuer", ISSUER),
                ("document", document),
                ("family", "aws"),
            ],
        )
    };
    assert_eq!(last_fetch("jwks"), at as f64);
    assert!((before..=after).contains(&(last_fetch("discovery") as u64)));
    let series = scrape
        .samples
        .iter()
        .filter(|s| s.metric == "oidc_edge_relying_party_last_fetch_seconds")
        .count();
    assert_eq!(series, 2, "only AWS's two documents");

    // A conditional GET answered 304: the record says so, with the ETag it holds.
    let answer = aws
        .get(&jwks)
        .header("if-none-match", &jwks_etag)
        .send()
        .await
        .expect("GET JWKS");
    assert_eq!(answer.status(), 304);
    let records = fetched_by().await;
    assert_eq!(records[1]["status"], 304, "{records:#}");
    assert_eq!(records[1]["etag"], jwks_etag.as_str());
    assert_eq!(records[1]["kids"], serde_json::json!(received));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_refreshes_now() {
    let fake = FakeApiserver::start(K3S, ISSUER, TOKEN).await;
    let scratch = Scratch::new();
    // An hour between refreshes: only SIGHUP can cause the second one.
    let mut server = Binary::start(&apiserver_config(&scratch, &fake, "1h"));
    let jwks = server.url("/openid/v1/jwks");
    eventually("keys", || async { get(&jwks).await.0 == 200 }).await;
    let ok = [("issuer", ISSUER), ("source", "0"), ("result", "ok")];
    assert_eq!(
        metric(
            &scrape(server.admin).await,
            "oidc_edge_refreshes_total",
            &ok
        ),
        1.0
    );
    server.signal("HUP");
    server.wait_for_log("refreshing every source now");
    let mut refreshed = 0.0;
    for _ in 0..200 {
        refreshed = metric(
            &scrape(server.admin).await,
            "oidc_edge_refreshes_total",
            &ok,
        );
        if refreshed >= 2.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(refreshed, 2.0);
    assert_eq!(fake.jwks_requests(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_open_keep_alive_connections_exits_0_within_the_deadline() {
    let scratch = Scratch::new();
    scratch.write("jwks.json", K3S);
    let mut server = Binary::start(&TestConfig::file_source("1s").write(&scratch));
    // Keep-alive connections that stay open and idle.
    let clients: Vec<reqwest::Client> =
        (0..5).map(|_| builder().build().expect("client")).collect();
    for client in &clients {
        let response = client
            .get(server.url("/openid/v1/jwks"))
            .send()
            .await
            .expect("GET");
        assert_eq!(response.status(), 200);
        response.bytes().await.expect("body");
    }
    let started = std::time::Instant::now();
    server.signal("TERM");
    let code = server.wait_exit(Duration::from_secs(15));
    assert_eq!(code, Some(0));
    assert!(
        started.elapsed() < Duration::from_secs(11),
        "drained within the 10 s grace: {:?}",
        started.elapsed()
    );
    assert!(
        server
            .log()
            .iter()
            .any(|l| l.contains("shutting down signal=\"SIGTERM\""))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_a_log_line_or_status_even_at_trace_level() {
    // A client key in a kubeconfig, a bearer token in another source, a refused private key
    // upstream: none of them may appear in what the server says about itself.
    let fake = FakeApiserver::start(K3S, ISSUER, TOKEN).await;
    let scratch = Scratch::new();
    let admin_cert = fake.pki.client("system:admin");
    let kubeconfig = format!(
        "apiVersion: v1\nclusters:\n- cluster:\n    certificate-authority-data: {ca}\n    server: {url}\n  name: c\ncontexts:\n- context:\n    cluster: c\n    user: u\n  name: c\ncurrent-context: c\nkind: Config\nusers:\n- name: u\n  user:\n    client-certificate-data: {cert}\n    client-key-data: {key}\n",
        ca = STANDARD.encode(&fake.pki.ca_pem),
        url = fake.url(),
        cert = STANDARD.encode(&admin_cert.cert_pem),
        key = STANDARD.encode(&admin_cert.key_pem),
    );
    scratch.write("k.yaml", &kubeconfig);
    scratch.write("ca.pem", &fake.pki.ca_pem);
    scratch.write("token", TOKEN);
    let config = TestConfig::new()
        .source(
            Source::new("kubeconfig")
                .set("kubeconfig", "k.yaml")
                .set("refresh_interval", "100ms"),
        )
        .source(
            Source::new("apiserver")
                .set("url", fake.url())
                .set("ca_file", "ca.pem")
                .set("token_file", "token")
                .set("refresh_interval", "100ms"),
        )
        .set("log.level", "trace")
        .set("log.access", true)
        .write(&scratch);
    let server = InProcess::start(&config).await;
    let jwks = server.url("/openid/v1/jwks");
    eventually("keys", || async { get(&jwks).await.0 == 200 }).await;
    fake.set(|s| s.mode = Mode::Body(crate::support::PRIVATE_RSA.to_owned()));
    server.wait_for_log("PRIVATE KEY MATERIAL");
    let (_, status) = get(&server.admin_url("/status")).await;
    let (_, metrics) = get(&server.admin_url("/metrics")).await;
    let said = format!("{}\n{status}\n{metrics}", server.log().join("\n"));
    let private: serde_json::Value =
        serde_json::from_str(crate::support::PRIVATE_RSA).expect("json");
    let key_body: String = admin_cert
        .key_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    let mut secrets = vec![
        TOKEN.to_owned(),
        key_body,
        STANDARD.encode(&admin_cert.key_pem),
    ];
    for member in ["d", "p", "q", "dp", "dq", "qi"] {
        secrets.push(
            private["keys"][1][member]
                .as_str()
                .expect("member")
                .to_owned(),
        );
    }
    for secret in &secrets {
        // The tail: PEM and PKCS#8 prefixes are the same for every key.
        let probe = &secret[secret.len().saturating_sub(32)..];
        assert!(
            !said.contains(probe),
            "a secret (...{}) appears in logs, /status or /metrics",
            &probe[probe.len() - 6..]
        );
    }
    assert!(server.log().len() > 20, "trace logging was on");
}

/// The public listener answers the two documents and nothing else: the admin endpoints,
/// the state directory, traversal and reflected input all get the same fixed 404, while the
/// admin listener (loopback only) keeps its endpoints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_public_listener_serves_only_the_two_documents() {
    let scratch = Scratch::new();
    scratch.write("jwks.json", K3S);
    let server = InProcess::start(&TestConfig::file_source("1h").write(&scratch)).await;
    eventually("keys", || async {
        get(&server.url("/openid/v1/jwks")).await.0 == 200
    })
    .await;
    let raw = |path: &str| {
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: oidc.example.com\r\nConnection: close\r\n\r\n");
        let mut stream = std::net::TcpStream::connect(server.addr).expect("connect");
        std::io::Write::write_all(&mut stream, request.as_bytes()).expect("write");
        let mut answer = String::new();
        std::io::Read::read_to_string(&mut stream, &mut answer).expect("read");
        answer
    };
    for path in [
        "/",
        "/metrics",
        "/status",
        "/healthz",
        "/readyz",
        "/livez",
        "/debug/pprof/",
        "/state/",
        "/openid/v1/jwks/",
        "/openid/v1/jwks.json",
        "/openid/v1/jwks/../../../etc/passwd",
        "/%2e%2e/%2e%2e/etc/passwd",
        "//openid/v1/jwks",
        "/.well-known/openid-configuration/../../status",
        "/.well-known/acme-challenge/token",
        "/%3Cscript%3Ealert(1)%3C/script%3E",
    ] {
        let answer = raw(path);
        assert!(
            answer.starts_with("HTTP/1.1 404 Not Found\r\n"),
            "{path}: {answer}"
        );
        assert!(answer.ends_with("\r\n\r\nnot found\n"), "{path}: {answer}");
        assert!(
            answer.contains("\r\ncontent-type: text/plain; charset=utf-8\r\n"),
            "{path}: {answer}"
        );
        assert!(
            !answer.to_ascii_lowercase().contains("\r\nserver:"),
            "{path}: {answer}"
        );
    }
    // A request line hyper cannot parse gets its bare 400, nothing reflected.
    let answer = raw("/<script>");
    assert!(
        answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
        "{answer}"
    );
    assert!(!answer.contains("script"), "{answer}");
    for path in ["/metrics", "/status", "/readyz"] {
        assert_eq!(get(&server.admin_url(path)).await.0, 200, "{path}");
    }
    assert!(server.admin.ip().is_loopback());
}

/// L2 of the reliability review: the admin listener has the public listeners' deadlines and
/// a cap of 64 connections at which silent ones make room, so that a pod that can reach it
/// (the container binds it to 0.0.0.0) cannot hold descriptors or keep probes out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_drops_silent_and_slow_clients_and_keeps_answering_probes() {
    use std::io::{Read as _, Write as _};
    use std::time::Instant;
    let scratch = Scratch::new();
    scratch.write("jwks.json", K3S);
    let config = TestConfig::file_source("60s")
        .set("limits.handshake_timeout", "1s")
        .set("limits.header_read_timeout", "1s")
        .write(&scratch);
    let server = InProcess::start(&config).await;
    let admin = server.admin;
    // 100 silent connections, beyond the cap, and one that drips half a request.
    let silent: Vec<std::net::TcpStream> = (0..100)
        .map(|_| std::net::TcpStream::connect(admin).expect("connect"))
        .collect();
    let mut dripping = std::net::TcpStream::connect(admin).expect("connect");
    dripping
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x")
        .expect("write");
    // A probe still gets in at once.
    let started = Instant::now();
    assert_eq!(get(&server.admin_url("/livez")).await.0, 200);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    let held: Vec<_> = silent
        .into_iter()
        .chain([dripping])
        .map(|mut stream| {
            std::thread::spawn(move || {
                let started = Instant::now();
                stream
                    .set_read_timeout(Some(Duration::from_secs(6)))
                    .expect("timeout");
                let mut buf = [0u8; 512];
                while matches!(stream.read(&mut buf), Ok(1..)) {}
                started.elapsed()
            })
        })
        .collect();
    for stream in held {
        let waited = stream.join().expect("reader");
        // Closed by the 1 s limits or to make room, not by the reader's 6 s.
        assert!(waited < Duration::from_secs(4), "closed after {waited:?}");
    }
    let scrape = scrape(server.admin).await;
    let closed = |reason: &str| {
        metric(
            &scrape,
            "oidc_edge_connections_closed_by_limit_total",
            &[("listener", "admin"), ("reason", reason)],
        )
    };
    assert!(closed("make_room") >= 36.0, "{}", closed("make_room"));
    assert!(closed("handshake_timeout") >= 1.0);
}
