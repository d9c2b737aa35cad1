//! ACME against a real ACME server (Pebble on loopback): issuance by TLS-ALPN-01 and HTTP-01,
//! renewal without restart, restart from the cache without a new order, the cache's file
//! modes, and kill -9 during cache writes.

use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::pebble::{Pebble, free_tcp_port};
use crate::support::{
    K3S, Scratch, Server, assert_serves_both_documents_everywhere, get, plain_client, served_cert,
};

const DOMAIN: &str = "oidc.example.com";

/// Writes a config whose HTTPS listener gets its certificate from `pebble`.
fn config(
    scratch: &Scratch,
    pebble: &Pebble,
    https_port: u16,
    http_port: u16,
    challenge: &str,
) -> PathBuf {
    scratch.write("jwks.json", K3S);
    scratch.write(
        "config.toml",
        &format!(
            "[[issuers]]\nissuer = \"https://{DOMAIN}\"\n  [[issuers.sources]]\n  kind = \"file\"\n  path = \"jwks.json\"\n\
             [http]\nlisten = \"127.0.0.1:{http_port}\"\nredirect_to_https = true\n\
             [https]\nlisten = \"127.0.0.1:{https_port}\"\n[https.acme]\ncontact = [\"mailto:ops@example.com\"]\n\
             directory = \"{}\"\ndirectory_ca_file = \"{}\"\nchallenge = \"{challenge}\"\n[state]\ndir = \"state\"\n",
            pebble.directory,
            pebble.api_ca_file.display()
        ),
    )
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
    let config = config(&scratch, &pebble, https_port, http_port, "tls-alpn-01");
    // Debug logging, so that the no-secret check below covers rustls-acme's own lines too.
    let text = std::fs::read_to_string(&config).expect("config");
    std::fs::write(&config, format!("{text}[log]\nlevel = \"debug\"\n")).expect("config");
    let started = Instant::now();
    let mut server = Server::start(&config);
    let https = server.listening("https");
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
    server.kill();
    let mut restarted = Server::start(&config);
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
    let mut server = Server::start(&config(&scratch, &pebble, https_port, http_port, "http-01"));
    let https = server.listening("https");
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
    let mut server = Server::start(&config(
        &scratch,
        &pebble,
        https_port,
        http_port,
        "tls-alpn-01",
    ));
    let https = server.listening("https");
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
    let config = config(&scratch, &pebble, https_port, http_port, "tls-alpn-01");
    // Kill at moments spread over the whole first issuance, cache writes included.
    for delay_ms in [300, 900, 1500, 2100, 2700, 3300] {
        let server = Server::start(&config);
        std::thread::sleep(Duration::from_millis(delay_ms));
        server.kill();
    }
    let mut server = Server::start(&config);
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
