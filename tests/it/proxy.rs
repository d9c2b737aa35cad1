//! Behind a real reverse proxy: nginx (Debian's package) terminates TLS with a generated CA and
//! forwards to oidc-edge's plain listener, as in a container deployment. What relying parties
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
use crate::support::{K3S, Scratch};

const DOMAIN: &str = "oidc.example.com";

struct Nginx(Child);

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM, not SIGKILL: the master must stop its workers.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.0.id().to_string())
            .status();
        let _ = self.0.wait();
    }
}

fn start_nginx(scratch: &Scratch, port: u16, upstream: std::net::SocketAddr, pki: &Pki) -> Nginx {
    let leaf = pki.server_for(&[DOMAIN]);
    let cert = scratch.write("proxy.pem", &leaf.cert_pem);
    let key = scratch.write("proxy.key", &leaf.key_pem);
    let dir = scratch.dir.path().display();
    let conf = scratch.write(
        "nginx.conf",
        &format!(
            "daemon off;\nworker_processes 1;\npid {dir}/nginx.pid;\nerror_log {dir}/nginx-error.log warn;\n\
             events {{ worker_connections 64; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {dir}/body;\n  proxy_temp_path {dir}/proxy;\n\
               fastcgi_temp_path {dir}/fastcgi;\n  uwsgi_temp_path {dir}/uwsgi;\n  scgi_temp_path {dir}/scgi;\n\
               server {{\n    listen 127.0.0.1:{port} ssl http2;\n    server_name {DOMAIN};\n\
                 ssl_certificate {};\n    ssl_certificate_key {};\n\
                 location / {{\n      proxy_pass http://{upstream};\n      proxy_http_version 1.1;\n\
                   proxy_set_header Host $host;\n      proxy_set_header X-Forwarded-Host $host;\n\
                   proxy_set_header X-Forwarded-Proto https;\n    }}\n  }}\n}}\n",
            cert.display(),
            key.display()
        ),
    );
    let child = Command::new("nginx")
        .arg("-c")
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nginx (package nginx-light)");
    let nginx = Nginx(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        let log = std::fs::read_to_string(scratch.path("nginx-error.log")).unwrap_or_default();
        assert!(Instant::now() < deadline, "nginx did not start: {log}");
        std::thread::sleep(Duration::from_millis(20));
    }
    nginx
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
    let direct = client();
    for path in ["/.well-known/openid-configuration", "/openid/v1/jwks"] {
        let want = direct.get(server.url(path)).send().await.expect("direct");
        let want_etag = want.headers()["etag"].clone();
        let want = want.bytes().await.expect("body");
        for forged in [None, Some("evil.example.org")] {
            let mut request = proxied.get(format!("https://{DOMAIN}:{port}{path}"));
            if let Some(host) = forged {
                request = request
                    .header("x-forwarded-host", host)
                    .header("x-forwarded-proto", "http");
            }
            let response = request.send().await.expect("through nginx");
            assert_eq!(response.status(), 200, "{path}");
            assert_eq!(response.headers()["content-type"], "application/json");
            assert_eq!(response.headers()["etag"], want_etag);
            assert_eq!(
                response.bytes().await.expect("body"),
                want,
                "{path} forged={forged:?}"
            );
        }
    }
}
