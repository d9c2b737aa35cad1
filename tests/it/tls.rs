//! The HTTPS listener with certificate files, and the limits that protect both public
//! listeners from slow and oversized clients. Real TLS, real clients.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::support::clients::{
    assert_serves_both_documents_everywhere, get, https_client, https_url, plain_client,
    served_cert, tls_config,
};
use crate::support::config::TestConfig;
use crate::support::inprocess::InProcess;
use crate::support::metrics::{metric, scrape};
use crate::support::pki::{Leaf, Pki};
use crate::support::process::Binary;
use crate::support::{HTTPS_DOMAIN, Scratch};

/// A file source, certificate files and short limits.
fn config(scratch: &Scratch, leaf: &Leaf) -> TestConfig {
    TestConfig::https_files(scratch, leaf)
        .set("limits.handshake_timeout", "1s")
        .set("limits.header_read_timeout", "1s")
}

/// The server of [`config`] in process, and its HTTPS address.
async fn start(scratch: &Scratch, leaf: &Leaf) -> (InProcess, SocketAddr) {
    let server = InProcess::start(&config(scratch, leaf).write(scratch)).await;
    let https = server.https();
    (server, https)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_documents_over_tls_1_2_and_1_3_with_http_1_1_and_2() {
    let pki = Pki::new("test public CA");
    let scratch = Scratch::new();
    let (_server, https) = start(&scratch, &pki.server_for(&[HTTPS_DOMAIN])).await;
    assert_serves_both_documents_everywhere(&pki.ca_pem, https).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaced_files_swap_the_certificate_and_broken_ones_keep_it() {
    let pki = Pki::new("test public CA");
    let scratch = Scratch::new();
    let first = pki.server_for(&[HTTPS_DOMAIN]);
    // SIGHUP: the binary (a signal to this process would reach every in-process server).
    let mut server = Binary::start(&config(&scratch, &first).write(&scratch));
    let https = server.listening("https");
    let before = served_cert(&pki.ca_pem, https).await.expect("served");
    // A connection opened before the swap keeps working after it.
    let kept = https_client(&pki.ca_pem, https).build().expect("client");
    assert_eq!(
        kept.get(https_url(https, "/openid/v1/jwks"))
            .send()
            .await
            .expect("GET")
            .status(),
        200
    );

    let second = pki.server_for(&[HTTPS_DOMAIN]);
    scratch.replace("key.pem", &second.key_pem);
    scratch.replace("cert.pem", &second.cert_pem);
    server.signal("HUP");
    server.wait_for_log("certificate files reloaded");
    let after = served_cert(&pki.ca_pem, https).await.expect("served");
    assert_ne!(before, after, "a new certificate is served");
    assert_eq!(
        kept.get(https_url(https, "/openid/v1/jwks"))
            .send()
            .await
            .expect("GET")
            .status(),
        200
    );

    // A key that does not match, then garbage: the second certificate stays.
    scratch.replace("key.pem", &pki.server_for(&[HTTPS_DOMAIN]).key_pem);
    let line = server.wait_for_log("certificate files not reloaded");
    assert!(line.contains("does not match the certificate"), "{line}");
    scratch.replace("cert.pem", "garbage");
    server.signal("HUP");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        served_cert(&pki.ca_pem, https).await.expect("served"),
        after
    );
}

/// Reads until the peer closes (or 6 s pass); returns how long that took and what came.
fn read_until_closed(mut stream: TcpStream) -> (Duration, Vec<u8>) {
    let started = Instant::now();
    stream
        .set_read_timeout(Some(Duration::from_secs(6)))
        .expect("timeout");
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return (started.elapsed(), received),
            Ok(n) => received.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_slow_clients_are_dropped_and_others_keep_being_served() {
    let pki = Pki::new("test public CA");
    let scratch = Scratch::new();
    let (server, https) = start(&scratch, &pki.server_for(&[HTTPS_DOMAIN])).await;
    // 50 connections that open TLS and say nothing, and 50 that drip half a request.
    let silent: Vec<TcpStream> = (0..50)
        .map(|_| TcpStream::connect(https).expect("connect"))
        .collect();
    let dripping: Vec<TcpStream> = (0..50)
        .map(|_| {
            let mut stream = TcpStream::connect(server.addr).expect("connect");
            stream
                .write_all(b"GET /openid/v1/jwks HTTP/1.1\r\nHost: oidc.exa")
                .expect("write");
            stream
        })
        .collect();
    // Meanwhile an ordinary client is served at once.
    let http = https_client(&pki.ca_pem, https).build().expect("client");
    let started = Instant::now();
    assert_eq!(
        http.get(https_url(https, "/openid/v1/jwks"))
            .send()
            .await
            .expect("GET")
            .status(),
        200
    );
    assert!(started.elapsed() < Duration::from_secs(1));
    let handles: Vec<_> = silent
        .into_iter()
        .chain(dripping)
        .map(|s| std::thread::spawn(move || read_until_closed(s)))
        .collect();
    for handle in handles {
        let (waited, received) = handle.join().expect("reader");
        // Dropped by the 1 s limits (with scheduling slack), not by the 6 s read timeout.
        assert!(waited < Duration::from_secs(4), "closed after {waited:?}");
        assert!(
            received.is_empty() || received.starts_with(b"HTTP/1.1 408"),
            "{:?}",
            String::from_utf8_lossy(&received)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_get_431() {
    let pki = Pki::new("test public CA");
    let scratch = Scratch::new();
    let (server, _https) = start(&scratch, &pki.server_for(&[HTTPS_DOMAIN])).await;
    let mut stream = TcpStream::connect(server.addr).expect("connect");
    let big = "a".repeat(20 * 1024);
    stream
        .write_all(
            format!("GET /openid/v1/jwks HTTP/1.1\r\nHost: {HTTPS_DOMAIN}\r\nX-Big: {big}\r\n\r\n")
                .as_bytes(),
        )
        .expect("write");
    let (_, received) = read_until_closed(stream);
    assert!(
        received.starts_with(b"HTTP/1.1 431"),
        "{:?}",
        String::from_utf8_lossy(&received[..received.len().min(80)])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plain_listener_redirects_to_https_when_asked() {
    let pki = Pki::new("test public CA");
    let scratch = Scratch::new();
    let config = config(&scratch, &pki.server_for(&[HTTPS_DOMAIN]))
        .set("http.redirect_to_https", true)
        .write(&scratch);
    let server = InProcess::start(&config).await;
    let https = server.https();
    let plain = plain_client(server.addr);
    let response = plain
        .get(format!(
            "http://{HTTPS_DOMAIN}:{}/openid/v1/jwks?x=1",
            server.addr.port()
        ))
        .send()
        .await
        .expect("GET");
    assert_eq!(response.status(), 301);
    assert_eq!(
        response.headers()["location"],
        format!("https://{HTTPS_DOMAIN}:{}/openid/v1/jwks?x=1", https.port()).as_str()
    );
    // A host that is not configured is not redirected anywhere.
    let other = plain
        .get(format!("http://{HTTPS_DOMAIN}:{}/", server.addr.port()))
        .header("host", "evil.example")
        .send()
        .await
        .expect("GET");
    assert_eq!(other.status(), 404);
}

/// L4: readiness covers the HTTPS certificate. An expired one, or one that expires within
/// 7 days, makes `/readyz` 503 with the reason, and `/status` says when it expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_reports_an_expired_or_expiring_certificate() {
    const DAY: Duration = Duration::from_secs(86_400);
    let pki = Pki::new("test public CA");
    let scratch = Scratch::new();
    let (server, _https) = start(&scratch, &pki.expired_server_for(&[HTTPS_DOMAIN])).await;
    let (code, body) = get(&server.admin_url("/readyz")).await;
    assert_eq!(
        (code, body.as_str()),
        (
            503,
            "not ready: https: certificate expired on 2022-01-01T00:00:00Z\n"
        )
    );
    let (_, status) = get(&server.admin_url("/status")).await;
    let status: serde_json::Value = serde_json::from_str(&status).expect("JSON");
    assert_eq!(status["ready"], false);
    assert_eq!(status["https"]["not_after"], "2022-01-01T00:00:00Z");
    server.stop().await;

    // Valid for 3 more days: still served, but not ready.
    let now = std::time::SystemTime::now();
    let scratch = Scratch::new();
    let expiring = pki.server_valid_between(&[HTTPS_DOMAIN], now - DAY, now + 3 * DAY);
    let (server, https) = start(&scratch, &expiring).await;
    assert!(served_cert(&pki.ca_pem, https).await.is_ok());
    let (code, body) = get(&server.admin_url("/readyz")).await;
    assert_eq!(code, 503);
    assert!(
        body.starts_with("not ready: https: certificate expires on ")
            && body.ends_with(", in less than 7 days\n"),
        "{body}"
    );
    server.stop().await;

    // Valid for 30 more days: ready.
    let scratch = Scratch::new();
    let fine = pki.server_valid_between(&[HTTPS_DOMAIN], now - DAY, now + 30 * DAY);
    let (server, _https) = start(&scratch, &fine).await;
    let (code, body) = get(&server.admin_url("/readyz")).await;
    assert_eq!((code, body.as_str()), (200, "ready\n"));
}

/// A TLS connection to `addr` with ALPN `alpn`, handshake completed.
fn tls_connected(
    ca_pem: &str,
    addr: SocketAddr,
    alpn: &[u8],
) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    let name = rustls::pki_types::ServerName::try_from(HTTPS_DOMAIN).expect("name");
    let mut conn = rustls::ClientConnection::new(tls_config(ca_pem, alpn), name).expect("tls");
    let mut tcp = TcpStream::connect(addr).expect("connect");
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).expect("handshake");
    }
    rustls::StreamOwned::new(conn, tcp)
}

/// L3 of the reliability review: silence after the TLS handshake, or half an HTTP/2 preface
/// (TLS or h2c), is closed at `header_read_timeout` (1 s here), not held until `idle_timeout`
/// (60 s) as hyper's version detection would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silence_after_tls_or_half_a_preface_is_closed_at_the_header_timeout() {
    crate::support::install_crypto_provider();
    let pki = Pki::new("test public CA");
    let scratch = Scratch::new();
    let (server, https) = start(&scratch, &pki.server_for(&[HTTPS_DOMAIN])).await;
    let preface = b"PRI * HTTP/2.0\r\n";
    let mut cases: Vec<(&str, std::thread::JoinHandle<Duration>)> = Vec::new();
    for (what, alpn, first) in [
        ("silent after TLS (h2)", &b"h2"[..], &b""[..]),
        ("silent after TLS (http/1.1)", b"http/1.1", b""),
        ("half a preface over TLS", b"h2", preface),
    ] {
        let mut tls = tls_connected(&pki.ca_pem, https, alpn);
        tls.write_all(first).expect("write");
        tls.flush().expect("flush");
        cases.push((
            what,
            std::thread::spawn(move || {
                let started = Instant::now();
                tls.sock
                    .set_read_timeout(Some(Duration::from_secs(6)))
                    .expect("timeout");
                let mut buf = [0u8; 256];
                loop {
                    match tls.read(&mut buf) {
                        Ok(0) | Err(_) => return started.elapsed(),
                        Ok(_) => {}
                    }
                }
            }),
        ));
    }
    let mut h2c = TcpStream::connect(server.addr).expect("connect");
    h2c.write_all(preface).expect("write");
    cases.push((
        "half a preface over h2c",
        std::thread::spawn(move || read_until_closed(h2c).0),
    ));
    for (what, case) in cases {
        let waited = case.join().expect("reader");
        // 1 s and hyper's 0.5 s to answer 408 first, with scheduling slack; not 6 s or 60 s.
        assert!(
            waited < Duration::from_secs(4),
            "{what}: closed after {waited:?}"
        );
    }
    let scrape = scrape(server.admin).await;
    let closed = metric(
        &scrape,
        "oidc_edge_connections_closed_by_limit_total",
        &[("reason", "first_request_timeout")],
    );
    assert_eq!(closed, 4.0, "each counted once");
}
