//! Test harness: temporary directories with config files, and the real `oidc-edge` binary
//! started on 127.0.0.1:0 with its stderr captured. Every process is killed by its PID when its
//! handle drops.

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const K3S: &str = include_str!("../fixtures/jwks/k3s.json");
pub const ROTATED: &str = include_str!("../fixtures/jwks/rotated.json");
pub const RSA_1024: &str = include_str!("../fixtures/jwks/rsa-1024.json");
pub const PRIVATE_RSA: &str = include_str!("../fixtures/jwks/private-rsa.json");
pub const OCT: &str = include_str!("../fixtures/jwks/oct.json");

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_oidc-edge")
}

pub fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// Runs `oidc-edge ARGS` to completion.
pub fn run(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .env_remove("OIDC_EDGE_CONFIG")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("run oidc-edge")
}

/// A scratch directory holding a config, its JWKS file and the state directory.
pub struct Scratch {
    pub dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, contents).expect("write");
        path
    }

    /// Replaces `name` atomically, as a config manager would, so that the server never reads
    /// a half-written file.
    pub fn replace(&self, name: &str, contents: &str) {
        let tmp = self.path(&format!(".{name}.new"));
        std::fs::write(&tmp, contents).expect("write");
        std::fs::rename(&tmp, self.path(name)).expect("rename");
    }

    /// A one-issuer config on 127.0.0.1:0 reading `jwks.json` every `interval`.
    pub fn config(&self, interval: &str) -> PathBuf {
        self.write(
            "config.toml",
            &format!(
                r#"
[[issuers]]
issuer = "https://oidc.example.com"
  [[issuers.sources]]
  kind = "file"
  path = "jwks.json"
  refresh_interval = "{interval}"
[http]
listen = "127.0.0.1:0"
[state]
dir = "state"
[log]
level = "info"
"#
            ),
        )
    }
}

impl Scratch {
    /// A one-issuer config serving `jwks.json` (the `K3S` set) on plain HTTP and on HTTPS
    /// with `leaf` as certificate files, both on 127.0.0.1:0. `http_extra` goes under
    /// `[http]`, `rest` at the end.
    pub fn https_files_config(
        &self,
        leaf: &crate::fake_apiserver::Leaf,
        http_extra: &str,
        rest: &str,
    ) -> PathBuf {
        self.write("jwks.json", K3S);
        self.write("cert.pem", &leaf.cert_pem);
        self.write("key.pem", &leaf.key_pem);
        self.write(
            "config.toml",
            &format!(
                "[[issuers]]\nissuer = \"https://{HTTPS_DOMAIN}\"\n  [[issuers.sources]]\n  kind = \"file\"\n  path = \"jwks.json\"\n\
                 [http]\nlisten = \"127.0.0.1:0\"\n{http_extra}\n[https]\nlisten = \"127.0.0.1:0\"\n[https.files]\ncert_file = \"cert.pem\"\nkey_file = \"key.pem\"\n\
                 [state]\ndir = \"state\"\n{rest}"
            ),
        )
    }
}

/// A running `oidc-edge serve`, killed on drop.
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

impl Server {
    pub fn start(config: &Path) -> Self {
        Self::start_with_env(config, &[])
    }

    /// Starts with extra environment variables (the pod environment of `in-cluster`).
    pub fn start_with_env(config: &Path, env: &[(&str, &str)]) -> Self {
        let mut command = Command::new(bin());
        command.args(["serve", "--config"]).arg(config);
        Self::spawn(command, config, env)
    }

    /// Starts `command`, which must exec `oidc-edge serve --config CONFIG` (e.g. through
    /// `sh -c`). A config without `[admin]` gets one on 127.0.0.1:0, so that tests never
    /// share a port.
    pub fn spawn(mut command: Command, config: &Path, env: &[(&str, &str)]) -> Self {
        let text = std::fs::read_to_string(config).expect("config");
        if !text.contains("[admin]") {
            std::fs::write(
                config,
                format!("{text}\n[admin]\nlisten = \"127.0.0.1:0\"\n"),
            )
            .expect("config");
        }
        let mut child = command
            .env_remove("RUST_LOG")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("KUBERNETES_SERVICE_PORT")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn oidc-edge");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().expect("log lock").push(line);
            }
        });
        let unbound = SocketAddr::from(([127, 0, 0, 1], 0));
        let mut server = Self {
            child,
            addr: unbound,
            admin: unbound,
            log,
        };
        server.addr = server.listening("http");
        server.admin = server.listening("admin");
        server
    }

    /// The address a listener logged (`http`, `https`, `admin`).
    pub fn listening(&mut self, listener: &str) -> SocketAddr {
        let line = self.wait_for_log(&format!("listening listener=\"{listener}\""));
        let addr = line.split("addr=").nth(1).expect("addr=").trim();
        addr.parse().expect("socket address")
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (e.g. "TERM", "HUP") to the server by its PID.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Waits up to `limit` for the process to exit and returns its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            assert!(Instant::now() < deadline, "still running after {limit:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn log(&self) -> Vec<String> {
        self.log.lock().expect("log lock").clone()
    }

    /// Waits up to 10 s for a log line containing `needle` and returns it.
    pub fn wait_for_log(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(line) = self.log().into_iter().find(|l| l.contains(needle)) {
                return line;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "oidc-edge exited with {status} before logging {needle:?}:\n{}",
                    self.log().join("\n")
                );
            }
            assert!(
                Instant::now() < deadline,
                "no log line {needle:?} in:\n{}",
                self.log().join("\n")
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Counts log lines containing `needle`.
    pub fn count_log(&self, needle: &str) -> usize {
        self.log().iter().filter(|l| l.contains(needle)).count()
    }

    /// SIGKILL by PID, as a crash or the OOM killer would.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain HTTP client with redirects off, as relying parties fetch.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client")
}

/// GET `url` and return status and body.
pub async fn get(url: &str) -> (u16, String) {
    let response = client().get(url).send().await.expect("request");
    let status = response.status().as_u16();
    (status, response.text().await.expect("body"))
}

/// Polls `check` every 20 ms for up to 10 s.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The kids of a served JWKS body, in order.
pub fn kids(body: &str) -> Vec<String> {
    let set: serde_json::Value = serde_json::from_str(body).expect("JWKS is JSON");
    set["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .map(|k| k["kid"].as_str().expect("kid").to_owned())
        .collect()
}

/// The kids of a fixture, sorted as we publish them.
pub fn fixture_kids(fixture: &str) -> Vec<String> {
    let mut kids = kids(fixture);
    kids.sort();
    kids
}

/// rustls needs one process-wide provider before any config is built (crates-and-acme §2).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// Runs a future to completion from a synchronous test.
pub fn block_on<F: Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(future)
}

/// The host name HTTPS tests serve, resolved to the server under test.
pub const HTTPS_DOMAIN: &str = "oidc.example.com";

/// A plain-HTTP client for `http://oidc.example.com` served at `addr`, redirects off.
pub fn plain_client(addr: SocketAddr) -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .resolve(HTTPS_DOMAIN, addr)
        .no_proxy()
        .build()
        .expect("client")
}

/// A client for `https://oidc.example.com` served at `addr`, trusting only `ca_pem`.
pub fn https_client(ca_pem: &str, addr: SocketAddr) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .tls_certs_only(reqwest::Certificate::from_pem_bundle(ca_pem.as_bytes()).expect("ca"))
        .resolve(HTTPS_DOMAIN, addr)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .tls_info(true)
        .timeout(Duration::from_secs(5))
}

pub fn https_url(addr: SocketAddr, path: &str) -> String {
    format!("https://{HTTPS_DOMAIN}:{}{path}", addr.port())
}

/// The DER of the certificate served now.
pub async fn served_cert(ca_pem: &str, addr: SocketAddr) -> Result<Vec<u8>, String> {
    let http = https_client(ca_pem, addr).build().expect("client");
    let response = http
        .get(https_url(addr, "/openid/v1/jwks"))
        .send()
        .await
        .map_err(|e| format!("{e:?}"))?;
    if response.status() != 200 {
        return Err(format!("status {}", response.status()));
    }
    let info = response
        .extensions()
        .get::<reqwest::tls::TlsInfo>()
        .expect("tls info");
    Ok(info.peer_certificate().expect("peer certificate").to_vec())
}

/// Both documents (the `K3S` set) over TLS 1.2 and 1.3, each with HTTP/1.1 and HTTP/2, as
/// `application/json` with HSTS.
pub async fn assert_serves_both_documents_everywhere(ca_pem: &str, addr: SocketAddr) {
    for tls in [
        reqwest::tls::Version::TLS_1_2,
        reqwest::tls::Version::TLS_1_3,
    ] {
        for http1 in [true, false] {
            let mut builder = https_client(ca_pem, addr)
                .tls_version_min(tls)
                .tls_version_max(tls);
            if http1 {
                builder = builder.http1_only();
            }
            let http = builder.build().expect("client");
            let version = if http1 {
                reqwest::Version::HTTP_11
            } else {
                reqwest::Version::HTTP_2
            };
            for path in ["/.well-known/openid-configuration", "/openid/v1/jwks"] {
                let response = http
                    .get(https_url(addr, path))
                    .send()
                    .await
                    .expect("GET over https");
                assert_eq!(
                    (response.status().as_u16(), response.version()),
                    (200, version),
                    "{tls:?} {path}"
                );
                assert_eq!(response.headers()["content-type"], "application/json");
                assert_eq!(
                    response.headers()["strict-transport-security"],
                    "max-age=31536000"
                );
                let body = response.text().await.expect("body");
                if path.ends_with("jwks") {
                    assert_eq!(kids(&body), fixture_kids(K3S));
                }
            }
        }
    }
}

/// Before the first good key set: 503 with Retry-After, never an empty set.
pub async fn assert_not_published_yet(url: &str) {
    let response = client().get(url).send().await.expect("GET");
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "5");
}

/// A memory figure of a process from `/proc/PID/status` in KiB: `VmRSS` now, `VmHWM` at peak.
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Samples of the scrape, parsed as a Prometheus scraper would.
pub async fn scrape(server: &Server) -> prometheus_parse::Scrape {
    let response = reqwest::get(server.admin_url("/metrics"))
        .await
        .expect("GET /metrics");
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .expect("ascii")
            .starts_with("application/openmetrics-text; version=1.0.0")
    );
    let text = response.text().await.expect("body");
    assert!(text.ends_with("# EOF\n"), "{text}");
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .expect("Prometheus text")
}

/// The value of `name` whose labels include all of `labels`, or 0.
pub fn metric(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}
