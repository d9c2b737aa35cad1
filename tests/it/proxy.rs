//! Behind a real reverse proxy, as in a container deployment: nginx (Debian's package)
//! terminates TLS with a generated CA and forwards to oidc-edge's plain listener; Caddy
//! (Debian's package) forwards plain HTTP to it, with the Caddyfile block README shows. What relying parties
//! get through it must be byte-identical to what oidc-edge serves, and a forged
//! `X-Forwarded-Host` must change nothing.

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::clients::{client, trusting};
use crate::support::config::TestConfig;
use crate::support::inprocess::InProcess;
use crate::support::pebble::free_tcp_port;
use crate::support::pki::Pki;
use crate::support::{K3S, Scratch, repo_path};

const DOMAIN: &str = "oidc.example.com";

/// Caddy in the foreground, stopped by its PID on drop, also when the test fails.
struct Proxy(Child);

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.0.id().to_string())
            .status();
        let _ = self.0.wait();
    }
}

fn start_nginx(
    scratch: &Scratch,
    port: u16,
    upstream: std::net::SocketAddr,
    pki: &Pki,
) -> crate::support::nginx::Nginx {
    let leaf = pki.server_for(&[DOMAIN]);
    let cert = scratch.write("proxy.pem", &leaf.cert_pem);
    let key = scratch.write("proxy.key", &leaf.key_pem);
    crate::support::nginx::start(
        scratch,
        "nginx",
        port,
        &format!(
            "  server {{\n    listen 127.0.0.1:{port} ssl http2;\n    server_name {DOMAIN};\n\
               ssl_certificate {};\n    ssl_certificate_key {};\n\
               location / {{\n      proxy_pass http://{upstream};\n      proxy_http_version 1.1;\n\
                 proxy_set_header Host $host;\n      proxy_set_header X-Forwarded-Host $host;\n\
                 proxy_set_header X-Forwarded-Proto https;\n    }}\n  }}",
            cert.display(),
            key.display()
        ),
    )
}

/// The checks every proxy in front of the plain listener must pass, `base` being the proxy's
/// origin as relying parties see it: both documents byte-identical to what oidc-edge serves
/// directly, with its content type, `Cache-Control` and `ETag`; a forged `X-Forwarded-Host`,
/// `X-Forwarded-Proto` or `Host` changes nothing; no `Content-Encoding` added even when the
/// client offers gzip; no redirect; `If-None-Match` answered 304. `forge_host` adds a forged
/// `Host` to the forged requests: for a plain-HTTP proxy, where `Host` is whatever the client
/// sends. Over nginx's HTTP/2 the authority is `:authority` and nginx answers a conflicting
/// `Host` 400 itself, so the forged `Host` never reaches oidc-edge there.
async fn check_documents(
    proxy: &str,
    proxied: &reqwest::Client,
    base: &str,
    server: &InProcess,
    forge_host: bool,
) {
    let direct = client();
    for path in ["/.well-known/openid-configuration", "/openid/v1/jwks"] {
        let want = direct.get(server.url(path)).send().await.expect("direct");
        let want_etag = want.headers()["etag"].clone();
        let want_cache_control = want.headers()["cache-control"].clone();
        let want = want.bytes().await.expect("body");
        for forged in [None, Some("evil.example.org")] {
            let mut request = proxied
                .get(format!("{base}{path}"))
                .header("accept-encoding", "gzip");
            if let Some(host) = forged {
                request = request
                    .header("x-forwarded-host", host)
                    .header("x-forwarded-proto", "http");
                if forge_host {
                    request = request.header("host", host);
                }
            }
            let response = request.send().await.expect(proxy);
            assert_eq!(response.status(), 200, "{proxy} {path} forged={forged:?}");
            assert_eq!(response.headers()["content-type"], "application/json");
            assert_eq!(response.headers()["cache-control"], want_cache_control);
            assert_eq!(response.headers()["etag"], want_etag);
            assert!(
                response.headers().get("content-encoding").is_none(),
                "{proxy} {path}: {:?}",
                response.headers()
            );
            assert_eq!(
                response.bytes().await.expect("body"),
                want,
                "{proxy} {path} forged={forged:?}"
            );
        }
        let response = proxied
            .get(format!("{base}{path}"))
            .header("if-none-match", want_etag.clone())
            .send()
            .await
            .expect(proxy);
        assert_eq!(response.status(), 304, "{proxy} {path} If-None-Match");
        assert_eq!(response.headers()["etag"], want_etag);
        assert!(response.bytes().await.expect("body").is_empty());
    }
}

/// The Caddyfile the test runs: README's Caddy block, read from README.md, with the ports filled
/// in, after global options that keep Caddy to this test: no admin endpoint, no automatic HTTPS
/// (no certificates, no :80/:443). The `http://` site address without a host catches every
/// `Host`, so a forged one reaches oidc-edge; `bind` keeps it on loopback.
fn caddyfile(port: u16, upstream: std::net::SocketAddr) -> String {
    let readme = std::fs::read_to_string(repo_path("README.md")).expect("README.md");
    let block = readme
        .split("```caddyfile\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("README's ```caddyfile block");
    let block: Vec<&str> = block
        .lines()
        .map(|line| line.strip_prefix("  ").unwrap_or(line).trim_end())
        .collect();
    let block = block.join("\n");
    assert!(
        block.contains("http://:80 {") && block.contains("reverse_proxy 127.0.0.1:8080"),
        "README's Caddy block changed shape: {block}"
    );
    let block = block
        .replace("http://:80 {", &format!("http://:{port} {{"))
        .replace(
            "reverse_proxy 127.0.0.1:8080",
            &format!("reverse_proxy {upstream}"),
        );
    format!("{{\n\tadmin off\n\tauto_https off\n}}\n\n{block}\n")
}

fn start_caddy(scratch: &Scratch, port: u16, upstream: std::net::SocketAddr) -> Proxy {
    let home = scratch.path("caddy-home");
    std::fs::create_dir_all(&home).expect("caddy home");
    let conf = scratch.write("Caddyfile", &caddyfile(port, upstream));
    let log = std::fs::File::create(scratch.path("caddy.log")).expect("caddy log");
    // The port was picked free, then Caddy binds it: a race with other processes that
    // Caddy's config leaves no way around (it cannot report a port it chose itself).
    let child = Command::new("caddy")
        .arg("run")
        .arg("--config")
        .arg(&conf)
        .arg("--adapter")
        .arg("caddyfile")
        .env("HOME", &home)
        .env("XDG_DATA_HOME", home.join("data"))
        .env("XDG_CONFIG_HOME", home.join("config"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("caddy (package caddy)");
    let mut caddy = Proxy(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        let log = std::fs::read_to_string(scratch.path("caddy.log")).unwrap_or_default();
        let exited = caddy.0.try_wait().expect("caddy status");
        assert!(
            exited.is_none() && Instant::now() < deadline,
            "caddy did not start ({exited:?}): {log}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    caddy
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_caddy_the_documents_are_byte_identical_and_forwarded_headers_change_nothing() {
    let scratch = Scratch::new();
    scratch.write("jwks.json", K3S);
    let server = InProcess::start(&TestConfig::file_source("1s").write(&scratch)).await;
    let port = free_tcp_port();
    let _caddy = start_caddy(&scratch, port, server.addr);

    let proxied = client();
    check_documents(
        "caddy",
        &proxied,
        &format!("http://127.0.0.1:{port}"),
        &server,
        true,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_nginx_the_documents_are_byte_identical_and_forwarded_headers_change_nothing() {
    let scratch = Scratch::new();
    scratch.write("jwks.json", K3S);
    let server = InProcess::start(&TestConfig::file_source("1s").write(&scratch)).await;
    let pki = Pki::new("proxy test CA");
    let port = free_tcp_port();
    let _nginx = start_nginx(&scratch, port, server.addr, &pki);

    let proxied = trusting(&pki.ca_pem)
        .resolve(DOMAIN, std::net::SocketAddr::from(([127, 0, 0, 1], port)))
        .build()
        .expect("client");
    check_documents(
        "nginx",
        &proxied,
        &format!("https://{DOMAIN}:{port}"),
        &server,
        false,
    )
    .await;
}
