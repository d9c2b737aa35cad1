//! ACME against a real ACME server (Pebble on loopback): issuance by TLS-ALPN-01 and HTTP-01,
//! renewal without restart, restart from the cache without a new order, the cache's file
//! modes, and kill -9 during cache writes.
//! All in process but kill -9, which needs the binary.

use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::support::clients::{
    assert_serves_both_documents_everywhere, get, plain_client, served_cert,
};
use crate::support::config::{Source, TestConfig};
use crate::support::inprocess::InProcess;
use crate::support::metrics::{metric, scrape};
use crate::support::pebble::{Pebble, free_tcp_port};
use crate::support::pki::{Leaf, Pki};
use crate::support::process::Binary;
use crate::support::{K3S, Scratch};

const DOMAIN: &str = "oidc.example.com";

/// A config whose HTTPS listener gets its certificate from `pebble`, on the fixed ports
/// Pebble validates on, and whose plain listener redirects to it. Writes `jwks.json`.
fn config(
    scratch: &Scratch,
    pebble: &Pebble,
    https_port: u16,
    http_port: u16,
    challenge: &str,
) -> TestConfig {
    scratch.write("jwks.json", K3S);
    TestConfig::new()
        .source(Source::file("jwks.json"))
        .set("http.listen", format!("127.0.0.1:{http_port}"))
        .set("http.redirect_to_https", true)
        .set("https.listen", format!("127.0.0.1:{https_port}"))
        .set("https.acme.contact", vec!["mailto:ops@example.com"])
        .set("https.acme.directory", pebble.directory.as_str())
        .set(
            "https.acme.directory_ca_file",
            pebble.api_ca_file.to_str().expect("utf-8"),
        )
        .set("https.acme.challenge", challenge)
}

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path)
        .expect("metadata")
        .permissions()
        .mode()
        & 0o777
}

/// Distinctive tails of every private key in the ACME cache files, as PEM, base64 or a
/// Debug-printed byte slice would show them. The certificate file is PEM (chain and key);
/// the account file is the key's PKCS#8 DER.
fn private_key_probes(files: &[PathBuf]) -> Vec<String> {
    use base64::Engine as _;
    use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
    let tail = |s: String| s[s.len().saturating_sub(32)..].to_owned();
    let mut probes = Vec::new();
    for file in files {
        let bytes = std::fs::read(file).expect("cache file");
        let text = String::from_utf8_lossy(&bytes);
        let (mut inside, mut key) = (false, String::new());
        for line in text.lines() {
            if line.ends_with("PRIVATE KEY-----") {
                inside = line.starts_with("-----BEGIN");
            } else if inside {
                key.push_str(line);
            }
        }
        let der = if key.is_empty() {
            bytes
        } else {
            STANDARD.decode(&key).expect("PEM body")
        };
        let debug = format!("{:?}", &der[der.len() - 12..]);
        probes.extend([
            tail(STANDARD.encode(&der)),
            tail(URL_SAFE_NO_PAD.encode(&der)),
            debug.trim_matches(|c| c == '[' || c == ']').to_owned(),
        ]);
    }
    probes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_alpn_01_issues_serves_and_restarts_from_the_cache() {
    let (https_port, http_port) = (free_tcp_port(), free_tcp_port());
    let Some(pebble) = Pebble::start(https_port, http_port, 3600).await else {
        return;
    };
    let scratch = Scratch::new();
    // Debug logging, so that the no-secret check below covers rustls-acme's own lines too.
    let config = config(&scratch, &pebble, https_port, http_port, "tls-alpn-01")
        .set("log.level", "debug")
        .write(&scratch);
    let started = Instant::now();
    let server = InProcess::start(&config).await;
    let https = server.https();
    server.wait_for_log("event=\"deployed_new_cert\"");
    let root = pebble.issuing_root_pem().await;
    let mut first_ok = None;
    while first_ok.is_none() {
        if served_cert(&root, https).await.is_ok() {
            first_ok = Some(started.elapsed());
        }
        assert!(started.elapsed() < Duration::from_secs(30), "no https 200");
    }
    println!(
        "acme tls-alpn-01: start to first HTTPS 200 in {:?}",
        first_ok.expect("measured")
    );
    assert_serves_both_documents_everywhere(&root, https).await;

    // The cache: a 0700 directory of 0600 files. rustls-acme may store the certificate after
    // deploying it; until its event, an atomic write's temporary file can be in the listing.
    server.wait_for_log("event=\"cert_cache_store\"");
    let cache = scratch.path("state/acme");
    assert_eq!(mode(&cache), 0o700);
    let files: Vec<PathBuf> = std::fs::read_dir(&cache)
        .expect("cache")
        .map(|e| e.expect("entry").path())
        .collect();
    assert!(files.len() >= 2, "account and certificate: {files:?}");
    for file in &files {
        assert_eq!(mode(file), 0o600, "{}", file.display());
    }
    // Neither the account key nor the certificate's key ever reaches a log line, /status or
    // /metrics, in any encoding they could be printed in.
    let (_, status) = get(&server.admin_url("/status")).await;
    let (_, metrics) = get(&server.admin_url("/metrics")).await;
    let said = format!("{}\n{status}\n{metrics}", server.log().join("\n"));
    let probes = private_key_probes(&files);
    assert!(
        probes.len() >= 4,
        "account and certificate keys: {probes:?}"
    );
    for probe in &probes {
        assert!(
            !said.contains(probe.as_str()),
            "an ACME private key appears: ...{probe}"
        );
    }

    // A restart serves the cached certificate at once, with no new order.
    let served = served_cert(&root, https).await.expect("served");
    let orders = pebble.orders();
    assert!(orders >= 1, "{:?}", pebble.log());
    drop(server);
    let restarted = InProcess::start(&config).await;
    restarted.wait_for_log("event=\"deployed_cached_cert\"");
    assert_eq!(
        served_cert(&root, https)
            .await
            .expect("served after restart"),
        served
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(pebble.orders(), orders, "no new order after a restart");
    assert_eq!(restarted.count_log("deployed_new_cert"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_01_issues_on_the_plain_listener_which_redirects_the_rest() {
    let (https_port, http_port) = (free_tcp_port(), free_tcp_port());
    let Some(pebble) = Pebble::start(https_port, http_port, 3600).await else {
        return;
    };
    let scratch = Scratch::new();
    let config = config(&scratch, &pebble, https_port, http_port, "http-01").write(&scratch);
    let server = InProcess::start(&config).await;
    let https = server.https();
    server.wait_for_log("event=\"deployed_new_cert\"");
    let root = pebble.issuing_root_pem().await;
    assert_serves_both_documents_everywhere(&root, https).await;
    let plain = plain_client(server.addr);
    let response = plain
        .get(format!(
            "http://{DOMAIN}:{http_port}/.well-known/openid-configuration"
        ))
        .send()
        .await
        .expect("GET");
    assert_eq!(response.status(), 301);
    assert_eq!(
        response.headers()["location"],
        format!("https://{DOMAIN}:{https_port}/.well-known/openid-configuration").as_str()
    );
    // No challenge is pending now: the challenge path answers 404, and is not redirected.
    let challenge = plain
        .get(format!(
            "http://{DOMAIN}:{http_port}/.well-known/acme-challenge/nothing"
        ))
        .send()
        .await
        .expect("GET");
    assert_eq!(challenge.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_lived_certificate_is_renewed_without_a_restart_or_a_failed_request() {
    let (https_port, http_port) = (free_tcp_port(), free_tcp_port());
    // rustls-acme renews at 2/3 of the lifetime: after about 12 s here.
    let Some(pebble) = Pebble::start(https_port, http_port, 18).await else {
        return;
    };
    let scratch = Scratch::new();
    let config = config(&scratch, &pebble, https_port, http_port, "tls-alpn-01").write(&scratch);
    let server = InProcess::start(&config).await;
    let https = server.https();
    server.wait_for_log("event=\"deployed_new_cert\"");
    let root = pebble.issuing_root_pem().await;
    let first = served_cert(&root, https).await.expect("first certificate");
    let started = Instant::now();
    let (mut requests, mut failures) = (0, Vec::new());
    loop {
        requests += 1;
        match served_cert(&root, https).await {
            Ok(cert) if cert != first => break,
            Ok(_) => {}
            Err(e) => failures.push(e),
        }
        assert!(
            started.elapsed() < Duration::from_secs(40),
            "no renewal: {:?}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "acme renewal after {:?}, {requests} requests, {} failed",
        started.elapsed(),
        failures.len()
    );
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(server.count_log("event=\"deployed_new_cert\""), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_cache_writes_never_breaks_the_next_start() {
    let (https_port, http_port) = (free_tcp_port(), free_tcp_port());
    let Some(pebble) = Pebble::start(https_port, http_port, 3600).await else {
        return;
    };
    let scratch = Scratch::new();
    let config = config(&scratch, &pebble, https_port, http_port, "tls-alpn-01").write(&scratch);
    // Kill at moments spread over the whole first issuance, cache writes included.
    for delay_ms in [300, 900, 1500, 2100, 2700, 3300] {
        let server = Binary::start(&config);
        std::thread::sleep(Duration::from_millis(delay_ms));
        server.kill();
    }
    let mut server = Binary::start(&config);
    let line = server.wait_for_log("event=\"deployed_");
    assert!(
        line.contains("deployed_cached_cert") || line.contains("deployed_new_cert"),
        "{line}"
    );
    assert_eq!(server.count_log("cache load"), 0, "{:?}", server.log());
    let root = pebble.issuing_root_pem().await;
    let https = server.listening("https");
    let deadline = Instant::now() + Duration::from_secs(20);
    while served_cert(&root, https).await.is_err() {
        assert!(Instant::now() < deadline, "{:?}", server.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// M1: an ACME server that stalls. rustls-acme's HTTP client has no timeout; each step of the
// driver is bounded by `https.acme.step_timeout` (2 s here), and the state is rebuilt.
// None of these needs Pebble.

/// A TCP port that accepts connections and never answers; it counts what it accepted.
struct Stall {
    url: String,
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Stall {
    /// Accepts and holds every connection, never sending a byte.
    async fn silent() -> Self {
        Self::serve(|stream| async move {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            drop(stream);
        })
        .await
    }

    /// Completes TLS with `leaf` (for 127.0.0.1), then drips a valid HTTP answer one byte
    /// every 500 ms: the whole answer would take about 20 s.
    async fn dripping(leaf: &Leaf) -> Self {
        let chain = CertificateDer::pem_slice_iter(leaf.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .expect("chain");
        let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).expect("key");
        let tls = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        Self::serve(move |stream| {
            let acceptor = acceptor.clone();
            async move {
                use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
                let Ok(mut tls) = acceptor.accept(stream).await else {
                    return;
                };
                let mut request = [0u8; 1024];
                let _ = tls.read(&mut request).await;
                for byte in b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}" {
                    if tls.write_all(&[*byte]).await.is_err() || tls.flush().await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        })
        .await
    }

    async fn serve<F, Fut>(handle: F) -> Self
    where
        F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(handle(stream));
            }
        });
        Self {
            url: format!("https://127.0.0.1:{port}/dir"),
            accepted,
            task,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Waits until `n` connections were accepted, at most `limit`.
    async fn wait_for(&self, n: usize, limit: Duration, server: &InProcess) -> Duration {
        let started = Instant::now();
        while self.accepted() < n {
            assert!(
                started.elapsed() < limit,
                "{} connection(s) after {limit:?}, wanted {n}:\n{}",
                self.accepted(),
                server.log().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        started.elapsed()
    }
}

impl Drop for Stall {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A config whose ACME directory is `directory`, with a 2 s step timeout.
fn stalled_config(
    scratch: &Scratch,
    directory: &str,
    ca_file: Option<&std::path::Path>,
) -> PathBuf {
    scratch.write("jwks.json", K3S);
    let config = TestConfig::new()
        .source(Source::file("jwks.json"))
        .set("https.listen", "127.0.0.1:0")
        .set("https.acme.contact", vec!["mailto:ops@example.com"])
        .set("https.acme.directory", directory)
        .set("https.acme.step_timeout", "2s");
    match ca_file {
        Some(ca) => config.set("https.acme.directory_ca_file", ca.to_str().expect("utf-8")),
        None => config,
    }
    .write(scratch)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_that_never_answers_times_out_is_counted_and_tried_again() {
    let stall = Stall::silent().await;
    let scratch = Scratch::new();
    let server = InProcess::start(&stalled_config(&scratch, &stall.url, None)).await;
    stall.wait_for(1, Duration::from_secs(10), &server).await;
    // 2 s step timeout, then a 1 s backoff, then a new state connects again.
    let second = stall.wait_for(2, Duration::from_secs(8), &server).await;
    println!("acme stall: second attempt {second:?} after the first");
    let scrape = scrape(server.admin).await;
    assert!(
        metric(
            &scrape,
            "oidc_edge_acme_events_total",
            &[("event", "timeout")]
        ) >= 1.0
    );
    assert!(
        server.count_log("acme step timed out") >= 1,
        "{:?}",
        server.log()
    );
    // Never deployed anything.
    assert_eq!(
        metric(
            &scrape,
            "oidc_edge_acme_events_total",
            &[("event", "deployed_new_cert")]
        ),
        0.0
    );
    // L4: not ready, and why.
    let (code, body) = get(&server.admin_url("/readyz")).await;
    assert_eq!(
        (code, body.as_str()),
        (
            503,
            "not ready: https: no certificate yet (last ACME attempt: no answer within 2s, https.acme.step_timeout)\n"
        )
    );
    let (_, status) = get(&server.admin_url("/status")).await;
    let status: serde_json::Value = serde_json::from_str(&status).expect("JSON");
    assert_eq!(status["ready"], false);
    assert_eq!(status["https"]["not_after"], serde_json::Value::Null);
    assert_eq!(
        status["https"]["last_acme_error"],
        "no answer within 2s, https.acme.step_timeout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_that_answers_slower_than_the_step_timeout_is_tried_again() {
    crate::support::install_crypto_provider();
    let pki = Pki::new("slow ACME CA");
    let stall = Stall::dripping(&pki.server_for(&["localhost", "127.0.0.1"])).await;
    let scratch = Scratch::new();
    let ca = scratch.write("acme-ca.pem", &pki.ca_pem);
    let server = InProcess::start(&stalled_config(&scratch, &stall.url, Some(&ca))).await;
    stall.wait_for(1, Duration::from_secs(10), &server).await;
    // The answer would take 20 s; the step gives up after 2 s and tries again.
    stall.wait_for(2, Duration::from_secs(8), &server).await;
    let scrape = scrape(server.admin).await;
    assert!(
        metric(
            &scrape,
            "oidc_edge_acme_events_total",
            &[("event", "timeout")]
        ) >= 1.0
    );
}

/// The file name `AcmeCache` gives the certificate of `domains` from `directory`.
fn cached_cert_name(domains: &[&str], directory: &str) -> String {
    use base64::Engine as _;
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for domain in domains {
        ctx.update(domain.as_bytes());
        ctx.update(&[0]);
    }
    ctx.update(directory.as_bytes());
    format!(
        "cert-{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(ctx.finish().as_ref())
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_renewal_keeps_serving_the_cached_certificate() {
    crate::support::install_crypto_provider();
    let stall = Stall::silent().await;
    let scratch = Scratch::new();
    // A certificate from an earlier run, past 2/3 of its lifetime: renewal starts at once,
    // into the stall.
    let pki = Pki::new("earlier ACME CA");
    let now = std::time::SystemTime::now();
    const DAY: Duration = Duration::from_secs(86_400);
    let leaf = pki.server_valid_between(&[DOMAIN], now - 60 * DAY, now + 3 * DAY);
    let cache = scratch.path("state/acme");
    std::fs::create_dir_all(&cache).expect("cache dir");
    std::fs::set_permissions(
        scratch.path("state"),
        std::fs::Permissions::from_mode(0o700),
    )
    .expect("chmod");
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    std::fs::write(
        cache.join(cached_cert_name(&[DOMAIN], &stall.url)),
        format!("{}\n{}", leaf.key_pem, leaf.cert_pem),
    )
    .expect("seed cache");
    let leaf_der = CertificateDer::from_pem_slice(leaf.cert_pem.as_bytes())
        .expect("der")
        .to_vec();

    let server = InProcess::start(&stalled_config(&scratch, &stall.url, None)).await;
    let https = server.https();
    server.wait_for_log("event=\"deployed_cached_cert\"");
    assert_eq!(served_cert(&pki.ca_pem, https).await, Ok(leaf_der.clone()));
    // Two timeouts and rebuilds (2 s + 1 s, 2 s + 2 s): the same certificate throughout.
    let started = Instant::now();
    while stall.accepted() < 3 {
        assert_eq!(
            served_cert(&pki.ca_pem, https).await,
            Ok(leaf_der.clone()),
            "after {:?}",
            started.elapsed()
        );
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "{} attempts:\n{}",
            stall.accepted(),
            server.log().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(served_cert(&pki.ca_pem, https).await, Ok(leaf_der));
    let scrape = scrape(server.admin).await;
    assert!(
        metric(
            &scrape,
            "oidc_edge_acme_events_total",
            &[("event", "timeout")]
        ) >= 2.0
    );
    // L4: served, but it expires within 7 days and renewal is stuck: not ready, and why.
    let (code, body) = get(&server.admin_url("/readyz")).await;
    assert_eq!(code, 503);
    assert!(
        body.starts_with("not ready: https: certificate expires on ")
            && body.ends_with(
                ", in less than 7 days (last ACME attempt: no answer within 2s, https.acme.step_timeout)\n"
            ),
        "{body}"
    );
}

/// S6: a certificate that could not be written to the cache is still served, the failure is
/// logged as what it is, and the write is retried: otherwise every restart orders a new
/// certificate (Let's Encrypt allows 5 duplicates a week).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_certificate_cache_write_is_retried() {
    let (https_port, http_port) = (free_tcp_port(), free_tcp_port());
    let Some(pebble) = Pebble::start(https_port, http_port, 3600).await else {
        return;
    };
    let scratch = Scratch::new();
    let config = config(&scratch, &pebble, https_port, http_port, "tls-alpn-01").write(&scratch);
    let name = cached_cert_name(&[DOMAIN], &pebble.directory);
    let cached = scratch.path("state/acme").join(&name);
    // A non-empty directory where the certificate goes: the rename of write_atomic's
    // temporary file onto it fails. Put there once the startup load (which would fail on
    // it) is done: the account is stored after it and before the certificate is ordered.
    let blocker = cached.clone();
    std::fs::create_dir_all(scratch.path("state/acme")).expect("state dir");
    std::fs::set_permissions(
        scratch.path("state"),
        std::fs::Permissions::from_mode(0o700),
    )
    .expect("chmod");
    let server = InProcess::start(&config).await;
    let https = server.https();
    server.wait_for_log("event=\"account_cache_store\"");
    std::fs::create_dir_all(blocker.join("blocker")).expect("blocker");
    server.wait_for_log("event=\"deployed_new_cert\"");
    let line = server.wait_for_log("cert cache store");
    assert!(line.contains("not cached"), "{line}");
    assert!(!line.contains("retrying with backoff"), "{line}");
    let root = pebble.issuing_root_pem().await;
    let served = served_cert(&root, https)
        .await
        .expect("served although not cached");

    std::fs::remove_dir_all(&blocker).expect("remove blocker");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cached.is_file() {
        assert!(
            Instant::now() < deadline,
            "never stored:\n{}",
            server.log().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pem = std::fs::read(&cached).expect("cached");
    assert!(
        CertificateDer::pem_slice_iter(&pem).any(|c| c.expect("pem").as_ref() == served),
        "the served certificate is the one cached"
    );
    assert_eq!(mode(&cached), 0o600);
    server.wait_for_log("acme certificate cache write retried");

    // A restart serves it without a new order.
    let orders = pebble.orders();
    drop(server);
    let restarted = InProcess::start(&config).await;
    restarted.wait_for_log("event=\"deployed_cached_cert\"");
    assert_eq!(served_cert(&root, https).await, Ok(served));
    assert_eq!(pebble.orders(), orders);
}
