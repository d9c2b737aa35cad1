//! The real parts, in place of hand-written fakes (shared notes real-parts.md): a Kubernetes
//! 1.20 kube-apiserver on a real etcd, built and installed by `tests/real/setup`, and
//! SeaweedFS, whose STS verifies `AssumeRoleWithWebIdentity` tokens against the issuer's
//! published discovery document and JWKS, as AWS STS does, and whose S3 checks SigV4.
//!
//! Binaries come from `OIDC_EDGE_KUBE_APISERVER`, `OIDC_EDGE_ETCD` and `OIDC_EDGE_WEED`
//! (scripts/test sets them from `tests/real/setup`), or else from the `real.env` that setup
//! leaves in its cache. A missing one fails the test, naming `tests/real/setup`, unless
//! `OIDC_EDGE_SKIP_REAL=1`, which turns it into a skip.
//!
//! Every process is killed by its PID when its handle drops, also when a test fails; their
//! output goes to files in the fixture's scratch directory, and the last lines are quoted when
//! one does not start.
//!
//! ## How SeaweedFS reaches `https://oidc.example.test`
//!
//! The issuer a relying party is given has no port (A-1), so SeaweedFS connects to port 443 of
//! whatever `oidc.example.test` resolves to. Nothing global may change for that (no
//! `/etc/hosts` entry, no port 443 on the machine's loopback), and `weed` is a static Go binary:
//! its resolver ignores `HOSTALIASES`, and its OIDC client has its own transport, which ignores
//! `HTTPS_PROXY` (tried). So `weed` runs in namespaces of its own (`unshare`: user, network,
//! mount, PID), where
//! - `/etc/hosts` is a bind mount of a file saying `127.0.0.1 oidc.example.test`, seen by that
//!   process tree only;
//! - its own loopback has port 443, where `socat` forwards each connection to a Unix socket in
//!   the scratch directory; Unix sockets are files, so they cross network namespaces;
//! - on the test's side of that socket, a thread connects each one to oidc-edge's HTTPS listener
//!   on 127.0.0.1. TLS is end to end: SeaweedFS sends SNI `oidc.example.test` and checks
//!   oidc-edge's certificate against the test CA given as `SSL_CERT_FILE` (the Go way of
//!   setting the system roots);
//! - the S3 and STS endpoint comes back the same way: `weed -s3.localSocket` in the scratch
//!   directory, and a test listener on 127.0.0.1 port 0 forwarding to it;
//! - `/tmp` is a tmpfs of its own, as weed keeps gRPC sockets at fixed paths there.
//!
//! SeaweedFS therefore sees exactly what it would in production, and the machine sees only
//! 127.0.0.1 ports and files in a temporary directory. When the namespace's first process dies
//! the kernel kills the rest, so killing `unshare` (its parent, `--kill-child`) stops them all.

pub mod relying;
pub mod sigv4;

use std::fs::File;
use std::io::Write as _;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};

use self::sigv4::Credentials;
use super::Scratch;
use super::config::{Source, TestConfig};
use super::inprocess::InProcess;
use super::pebble::free_tcp_port;
use super::pki::Pki;

/// The issuer of the real tests: `.test` never resolves publicly (RFC 6761).
pub const ISSUER: &str = "https://oidc.example.test";
pub const ISSUER_HOST: &str = "oidc.example.test";
/// The audience AWS STS requires, and the client ID of SeaweedFS's OIDC provider.
pub const STS_AUDIENCE: &str = "sts.amazonaws.com";
/// The apiserver's own audiences, as k3s sets them: a token minted without an explicit
/// audience gets these, which STS must refuse.
pub const API_AUDIENCES: &str = "https://kubernetes.default.svc.cluster.local,k3s";
/// The role the walkthrough's workload assumes, and the one subject its trust policy admits.
pub const ROLE_ARN: &str = "arn:aws:iam::role/S3Lister";
pub const LISTER_NAMESPACE: &str = "default";
pub const LISTER: &str = "s3-lister";
pub const BUCKET: &str = "docs";
/// The service account oidc-edge reads the apiserver as.
pub const READER_NAMESPACE: &str = "oidc-edge";
pub const READER: &str = "oidc-edge";
const REGION: &str = "us-east-1";

/// The binaries of the real parts.
#[derive(Debug, Clone)]
pub struct Bins {
    pub kube_apiserver: PathBuf,
    pub etcd: PathBuf,
    pub weed: PathBuf,
}

fn skip_allowed() -> bool {
    std::env::var("OIDC_EDGE_SKIP_REAL").is_ok_and(|v| v == "1")
}

/// `VAR=value` from `export VAR=value` lines of setup's `real.env`.
fn from_env_file(var: &str) -> Option<String> {
    let cache = std::env::var_os("OIDC_EDGE_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/oidc-edge")))?;
    let text = std::fs::read_to_string(cache.join("real.env")).ok()?;
    text.lines().find_map(|line| {
        let (name, value) = line.strip_prefix("export ")?.split_once('=')?;
        (name == var).then(|| value.to_owned())
    })
}

impl Bins {
    /// The binaries, or `None` (after saying so) when one is missing and
    /// `OIDC_EDGE_SKIP_REAL=1`; a missing one otherwise fails the test.
    pub fn find() -> Option<Self> {
        let [kube_apiserver, etcd, weed] = find_parts(
            "real parts",
            [
                "OIDC_EDGE_KUBE_APISERVER",
                "OIDC_EDGE_ETCD",
                "OIDC_EDGE_WEED",
            ],
            &["socat", "unshare", "openssl"],
        )?;
        Some(Self {
            kube_apiserver,
            etcd,
            weed,
        })
    }
}

/// The binaries named by `vars` (from the environment, or setup's `real.env`) in that order,
/// when each exists and every one of `tools` is on the PATH. Otherwise `None` (after saying
/// so) when `OIDC_EDGE_SKIP_REAL=1`, and a failed test naming `tests/real/setup` when not.
pub(crate) fn find_parts<const N: usize>(
    what: &str,
    vars: [&str; N],
    tools: &[&str],
) -> Option<[PathBuf; N]> {
    let mut missing = Vec::new();
    let paths = vars.map(|var| {
        let found = std::env::var(var)
            .ok()
            .or_else(|| from_env_file(var))
            .map(PathBuf::from)
            .filter(|p| p.is_file());
        if found.is_none() {
            missing.push(var.to_owned());
        }
        found.unwrap_or_default()
    });
    for tool in tools {
        if Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .map_or(true, |s| !s.success())
        {
            missing.push((*tool).to_owned());
        }
    }
    if missing.is_empty() {
        return Some(paths);
    }
    assert!(
        skip_allowed(),
        "{what} missing ({}): run tests/real/setup (scripts/test does), or set OIDC_EDGE_SKIP_REAL=1",
        missing.join(", ")
    );
    eprintln!(
        "{what} missing ({}): skipped because OIDC_EDGE_SKIP_REAL=1",
        missing.join(", ")
    );
    None
}

/// A process killed by its PID on drop, its output in a file.
#[derive(Debug)]
struct Proc {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &'static str, command: &mut Command, log: &Path) -> Self {
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .expect("log file");
        let child = command
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log file"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Self {
            name,
            child,
            log: log.to_owned(),
        }
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The last 40 lines of its output, for failure messages.
    fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Fails the test when the process has ended; `what` says what was awaited.
    fn assert_running(&mut self, what: &str) {
        if let Some(status) = self.exited() {
            panic!(
                "{} exited with {status} before {what}:\n{}",
                self.name,
                self.tail()
            );
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM by PID, as systemd stops a service; SIGKILL if it is still there after 10 s.
    fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.exited().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `check` every 100 ms until it answers `Some`, for up to `limit`; `alive` fails the
/// test early when the awaited process has died.
async fn wait_for<T, F, Fut>(
    what: &str,
    limit: Duration,
    mut alive: impl FnMut(),
    mut check: F,
) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        alive();
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A service-account key pair, as `openssl genrsa 2048` makes for k3s (facts §4: RSA).
#[derive(Debug, Clone)]
pub struct SaKey {
    pub private_pem: String,
    pub public_pem: String,
    /// Kubernetes' key ID: base64url(SHA-256(DER SubjectPublicKeyInfo)), facts §3.
    pub kid: String,
}

fn openssl(args: &[&str], input: Option<&str>) -> String {
    let mut child = Command::new("openssl")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn openssl");
    let mut stdin = child.stdin.take().expect("stdin");
    if let Some(input) = input {
        stdin.write_all(input.as_bytes()).expect("write to openssl");
    }
    drop(stdin);
    let out = child.wait_with_output().expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("PEM is ASCII")
}

impl SaKey {
    pub fn generate() -> Self {
        let private_pem = openssl(
            &[
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
            ],
            None,
        );
        let public_pem = openssl(&["pkey", "-pubout"], Some(&private_pem));
        let der: String = public_pem
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect();
        let der = STANDARD.decode(der).expect("PEM base64");
        let hash = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &der);
        Self {
            private_pem,
            public_pem,
            kid: URL_SAFE_NO_PAD.encode(hash.as_ref()),
        }
    }
}

/// etcd and a kube-apiserver on loopback ports, with an admin token (`system:masters`).
#[derive(Debug)]
pub struct Cluster {
    // Dropped in this order: the apiserver before its etcd, both before their directory.
    apiserver: Option<Proc>,
    _etcd: Proc,
    bin: PathBuf,
    etcd_url: String,
    issuer: String,
    pub port: u16,
    pub admin_token: String,
    /// The apiserver's self-signed serving certificate (`certs/apiserver.crt`), which pins it.
    pub ca_pem: String,
    pub dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts etcd and an apiserver for `issuer` that verifies tokens with `verify` and signs
    /// with `signing`, and waits until it is ready.
    pub async fn start(bins: &Bins, issuer: &str, verify: &[&SaKey], signing: &SaKey) -> Self {
        super::install_crypto_provider();
        let dir = tempfile::tempdir().expect("tempdir");
        // Pick-then-spawn: etcd and the apiserver must be told their ports up front and never
        // report one they chose (the harness otherwise binds port 0; see pebble.rs).
        let (client, peer, port) = (free_tcp_port(), free_tcp_port(), free_tcp_port());
        let etcd_url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let mut etcd = Proc::spawn(
            "etcd",
            Command::new(&bins.etcd)
                .args(["--name", "t", "--log-level", "warn"])
                .arg("--data-dir")
                .arg(dir.path().join("etcd"))
                .args(["--listen-client-urls", &etcd_url])
                .args(["--advertise-client-urls", &etcd_url])
                .args(["--listen-peer-urls", &peer_url])
                .args(["--initial-advertise-peer-urls", &peer_url])
                .args(["--initial-cluster", &format!("t={peer_url}")]),
            &dir.path().join("etcd.log"),
        );
        let health = format!("{etcd_url}/health");
        let http = super::clients::client();
        wait_for(
            "etcd /health",
            Duration::from_secs(30),
            || etcd.assert_running("answering /health"),
            || async {
                let response = http.get(&health).send().await.ok()?;
                (response.status() == 200).then_some(())
            },
        )
        .await;
        let admin_token = format!("admin-{}", URL_SAFE_NO_PAD.encode(random_bytes()));
        std::fs::write(
            dir.path().join("tokens.csv"),
            format!("{admin_token},admin,admin-uid,\"system:masters\"\n"),
        )
        .expect("tokens.csv");
        let mut cluster = Self {
            apiserver: None,
            _etcd: etcd,
            bin: bins.kube_apiserver.clone(),
            etcd_url,
            issuer: issuer.to_owned(),
            port,
            admin_token,
            ca_pem: String::new(),
            dir,
        };
        cluster.start_apiserver(verify, signing).await;
        cluster
    }

    /// Stops the apiserver (SIGTERM, as a control-plane restart does) and starts it again on
    /// the same port, etcd and serving certificate, verifying with `verify` and signing with
    /// `signing`: one step of a staged rotation (real-parts §1).
    pub async fn restart(&mut self, verify: &[&SaKey], signing: &SaKey) {
        if let Some(mut old) = self.apiserver.take() {
            // Off the runtime: a task beside this one keeps running during the stop.
            tokio::task::spawn_blocking(move || old.stop())
                .await
                .expect("stop task");
        }
        self.start_apiserver(verify, signing).await;
    }

    async fn start_apiserver(&mut self, verify: &[&SaKey], signing: &SaKey) {
        let dir = self.dir.path();
        let mut command = Command::new(&self.bin);
        command
            .arg(format!("--etcd-servers={}", self.etcd_url))
            .args(["--bind-address=127.0.0.1", "--advertise-address=127.0.0.1"])
            .arg(format!("--secure-port={}", self.port))
            .arg("--insecure-port=0")
            .arg(format!("--cert-dir={}", dir.join("certs").display()))
            .arg(format!(
                "--token-auth-file={}",
                dir.join("tokens.csv").display()
            ))
            .arg("--authorization-mode=RBAC")
            .arg(format!("--service-account-issuer={}", self.issuer))
            .arg(format!("--api-audiences={API_AUDIENCES}"))
            .args([
                "--service-cluster-ip-range=10.96.0.0/24",
                "--enable-priority-and-fairness=false",
                "--v=1",
            ]);
        for key in verify {
            let path = dir.join(format!("{}.pub", key.kid));
            std::fs::write(&path, &key.public_pem).expect("public key");
            command.arg(format!("--service-account-key-file={}", path.display()));
        }
        let signing_path = dir.join("signing.key");
        std::fs::write(&signing_path, &signing.private_pem).expect("signing key");
        command.arg(format!(
            "--service-account-signing-key-file={}",
            signing_path.display()
        ));
        let mut apiserver = Proc::spawn("kube-apiserver", &mut command, &dir.join("apiserver.log"));
        let cert = dir.join("certs/apiserver.crt");
        // The certificate is written before the port opens, and kept across restarts.
        let ca_pem = wait_for(
            "certs/apiserver.crt",
            Duration::from_secs(60),
            || apiserver.assert_running("writing its certificate"),
            || async {
                std::fs::read_to_string(&cert)
                    .ok()
                    .filter(|p| p.contains("-----END"))
            },
        )
        .await;
        let http = super::clients::trusting(&ca_pem).build().expect("client");
        let readyz = format!("https://127.0.0.1:{}/readyz", self.port);
        let token = self.admin_token.clone();
        // 3–5 s on an idle machine (real-parts §1); much longer when the suite loads both cores.
        wait_for(
            "kube-apiserver /readyz",
            Duration::from_secs(120),
            || apiserver.assert_running("answering /readyz"),
            || async {
                let response = http.get(&readyz).bearer_auth(&token).send().await.ok()?;
                (response.status() == 200).then_some(())
            },
        )
        .await;
        self.ca_pem = ca_pem;
        self.apiserver = Some(apiserver);
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// An admin client of its own, for a task that runs beside a restart.
    pub fn api(&self) -> Api {
        Api {
            url: self.url(),
            admin_token: self.admin_token.clone(),
            http: super::clients::trusting(&self.ca_pem)
                .build()
                .expect("client"),
        }
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        self.api().get(path).await
    }

    pub async fn create_namespace(&self, namespace: &str) {
        self.api().create_namespace(namespace).await;
    }

    pub async fn create_service_account(&self, namespace: &str, name: &str) {
        self.api().create_service_account(namespace, name).await;
    }

    pub async fn bind_cluster_role(&self, binding: &str, role: &str, namespace: &str, sa: &str) {
        self.api()
            .bind_cluster_role(binding, role, namespace, sa)
            .await;
    }

    pub async fn token(&self, namespace: &str, sa: &str, audiences: &[&str]) -> String {
        self.api()
            .try_token(namespace, sa, audiences)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Creates the service account oidc-edge reads the keys as, [`READER_NAMESPACE`]/[`READER`].
    pub async fn create_reader(&self) {
        self.create_namespace(READER_NAMESPACE).await;
        self.create_service_account(READER_NAMESPACE, READER).await;
    }

    /// [`Cluster::create_reader`], bound to `system:service-account-issuer-discovery`, and a
    /// token for it. The binding is redundant with the bootstrap binding to all service
    /// accounts, which README step 2 relies on; it is made explicitly (facts §2) so that the
    /// tests do not depend on that default.
    pub async fn bound_reader_token(&self) -> String {
        self.create_reader().await;
        self.bind_cluster_role(
            "oidc-edge-issuer-discovery",
            "system:service-account-issuer-discovery",
            READER_NAMESPACE,
            READER,
        )
        .await;
        self.token(READER_NAMESPACE, READER, &[]).await
    }
}

/// oidc-edge in process, serving `issuer` over HTTPS with a certificate for
/// [`ISSUER_HOST`] from `pki`, and reading `cluster` every second with `reader_token`; its
/// files under `scratch`.
pub async fn serve_https(
    cluster: &Cluster,
    issuer: &str,
    reader_token: &str,
    pki: &Pki,
    scratch: &Scratch,
) -> InProcess {
    scratch.write("apiserver-ca.pem", &cluster.ca_pem);
    scratch.write("token", reader_token);
    let leaf = pki.server_for(&[ISSUER_HOST]);
    scratch.write("cert.pem", &leaf.cert_pem);
    scratch.write("key.pem", &leaf.key_pem);
    let config = TestConfig::new()
        .set("issuers.0.issuer", issuer)
        .source(
            Source::new("apiserver")
                .set("url", cluster.url())
                .set("ca_file", "apiserver-ca.pem")
                .set("token_file", "token")
                .set("refresh_interval", "1s"),
        )
        .set("https.listen", "127.0.0.1:0")
        .set("https.files.cert_file", "cert.pem")
        .set("https.files.key_file", "key.pem")
        .write(scratch);
    InProcess::start(&config).await
}

/// The apiserver's API as the admin.
#[derive(Debug, Clone)]
pub struct Api {
    url: String,
    admin_token: String,
    http: reqwest::Client,
}

impl Api {
    /// POSTs `body` and returns status and body.
    async fn post(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<(u16, String), reqwest::Error> {
        let response = self
            .http
            .post(format!("{}{path}", self.url))
            .bearer_auth(&self.admin_token)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await?;
        let status = response.status().as_u16();
        Ok((status, response.text().await?))
    }

    async fn must_post(&self, path: &str, body: &serde_json::Value) -> (u16, String) {
        self.post(path, body)
            .await
            .unwrap_or_else(|e| panic!("POST {path}: {e:?}"))
    }

    /// GETs `path` and returns status and body.
    pub async fn get(&self, path: &str) -> (u16, String) {
        let response = self
            .http
            .get(format!("{}{path}", self.url))
            .bearer_auth(&self.admin_token)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e:?}"));
        let status = response.status().as_u16();
        (status, response.text().await.expect("body"))
    }

    /// Creates `namespace` unless it exists.
    pub async fn create_namespace(&self, namespace: &str) {
        let (status, body) = self
            .must_post(
                "/api/v1/namespaces",
                &serde_json::json!({"apiVersion": "v1", "kind": "Namespace",
                    "metadata": {"name": namespace}}),
            )
            .await;
        assert!(
            status == 201 || status == 409,
            "namespace {namespace}: {status} {body}"
        );
    }

    /// Creates a service account. The `default` namespace is made by a controller after
    /// /readyz, so a 404 for it is retried for a while.
    pub async fn create_service_account(&self, namespace: &str, name: &str) {
        let path = format!("/api/v1/namespaces/{namespace}/serviceaccounts");
        let body = serde_json::json!({"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": name}});
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (status, text) = self.must_post(&path, &body).await;
            if status == 201 {
                return;
            }
            assert!(
                status == 404 && Instant::now() < deadline,
                "serviceaccount {namespace}/{name}: {status} {text}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Binds a ClusterRole to a service account.
    pub async fn bind_cluster_role(&self, binding: &str, role: &str, namespace: &str, sa: &str) {
        let (status, body) = self
            .must_post(
                "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
                &serde_json::json!({
                    "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                    "metadata": {"name": binding},
                    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                        "name": role},
                    "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": namespace}],
                }),
            )
            .await;
        assert_eq!(status, 201, "clusterrolebinding {binding}: {body}");
    }

    /// A token for `namespace/sa` from the TokenRequest API (facts §1), valid for an hour;
    /// `audiences` empty means the apiserver's own ([`API_AUDIENCES`]). An error when the
    /// apiserver does not answer 201 (e.g. while it restarts).
    pub async fn try_token(
        &self,
        namespace: &str,
        sa: &str,
        audiences: &[&str],
    ) -> Result<String, String> {
        let path = format!("/api/v1/namespaces/{namespace}/serviceaccounts/{sa}/token");
        let (status, body) = self
            .post(
                &path,
                &serde_json::json!({
                    "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                    "spec": {"audiences": audiences, "expirationSeconds": 3600},
                }),
            )
            .await
            .map_err(|e| format!("TokenRequest for {namespace}/{sa}: {e}"))?;
        if status != 201 {
            return Err(format!(
                "TokenRequest for {namespace}/{sa}: {status} {body}"
            ));
        }
        let answer: serde_json::Value = serde_json::from_str(&body).expect("TokenRequest JSON");
        Ok(answer["status"]["token"]
            .as_str()
            .expect("status.token")
            .to_owned())
    }
}

fn random_bytes() -> [u8; 16] {
    let mut bytes = [0; 16];
    aws_lc_rs::rand::fill(&mut bytes).expect("random");
    bytes
}

/// The claims of a JWT, not verified.
pub fn claims(token: &str) -> serde_json::Value {
    let payload = token.split('.').nth(1).expect("a JWS");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).expect("base64url")).expect("JSON")
}

/// The `kid` of a JWT's header.
pub fn kid(token: &str) -> String {
    let header = token.split('.').next().expect("a JWS");
    let header: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).expect("base64url")).expect("JSON");
    header["kid"].as_str().expect("kid").to_owned()
}

/// Accepts connections on a listener and copies bytes both ways to a new connection to the
/// target, a thread per direction; stops accepting on drop.
#[derive(Debug)]
struct Bridge {
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

trait Stream: std::io::Read + std::io::Write + Send + Sized + 'static {
    fn split(&self) -> Self;
    fn close_write(&self);
}

impl Stream for TcpStream {
    fn split(&self) -> Self {
        self.try_clone().expect("clone")
    }
    fn close_write(&self) {
        let _ = self.shutdown(Shutdown::Write);
    }
}

impl Stream for UnixStream {
    fn split(&self) -> Self {
        self.try_clone().expect("clone")
    }
    fn close_write(&self) {
        let _ = self.shutdown(Shutdown::Write);
    }
}

/// Copies both ways between `a` and `b`, a thread per direction; each direction's end is
/// passed on as a half-close, so that TLS close_notify and EOF reach the other side.
fn pipe<A: Stream, B: Stream>(a: A, b: B) {
    let (a2, b2) = (a.split(), b.split());
    std::thread::spawn(move || copy(a, b2));
    std::thread::spawn(move || copy(b, a2));
}

fn copy<F: Stream, T: Stream>(mut from: F, mut to: T) {
    let _ = std::io::copy(&mut from, &mut to);
    to.close_write();
}

impl Bridge {
    /// Unix socket `path` → TCP `target`.
    fn unix_to_tcp(path: &Path, target: SocketAddr) -> Self {
        let listener = UnixListener::bind(path).expect("bind unix socket");
        listener.set_nonblocking(true).expect("nonblocking");
        Self::run(move || match listener.accept() {
            Ok((conn, _)) => {
                conn.set_nonblocking(false).expect("blocking");
                if let Ok(out) = TcpStream::connect(target) {
                    pipe(conn, out);
                }
                true
            }
            Err(_) => false,
        })
    }

    /// TCP 127.0.0.1 port 0 → Unix socket `path`; returns the bound address.
    fn tcp_to_unix(path: &Path) -> (Self, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        listener.set_nonblocking(true).expect("nonblocking");
        let path = path.to_owned();
        let bridge = Self::run(move || match listener.accept() {
            Ok((conn, _)) => {
                conn.set_nonblocking(false).expect("blocking");
                if let Ok(out) = UnixStream::connect(&path) {
                    pipe(conn, out);
                }
                true
            }
            Err(_) => false,
        });
        (bridge, addr)
    }

    /// Calls `accept_one` until stopped; it answers whether it accepted a connection.
    fn run(mut accept_one: impl FnMut() -> bool + Send + 'static) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let (flag, count) = (Arc::clone(&stop), Arc::clone(&accepted));
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::SeqCst) {
                if accept_one() {
                    count.fetch_add(1, Ordering::SeqCst);
                } else {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        });
        Self {
            stop,
            accepted,
            thread: Some(thread),
        }
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// An STS answer that is not a success: status and the `Code` and `Message` of its XML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StsError {
    pub status: u16,
    pub code: String,
    pub message: String,
}

/// The text of the first `<tag>…</tag>` in `xml`, with the XML entities SeaweedFS writes
/// decoded.
pub fn xml_text(xml: &str, tag: &str) -> Option<String> {
    let start = xml.find(&format!("<{tag}>"))? + tag.len() + 2;
    let end = start + xml[start..].find(&format!("</{tag}>"))?;
    Some(
        xml[start..end]
            .replace("&#34;", "\"")
            .replace("&quot;", "\"")
            .replace("&#39;", "'")
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&amp;", "&"),
    )
}

/// SeaweedFS (`weed mini`: master, volume, filer, S3 with STS) trusting `ISSUER` as an OIDC
/// provider with client ID `sts.amazonaws.com`, in namespaces of its own (see the module
/// docs), reaching the issuer through oidc-edge's HTTPS listener.
#[derive(Debug)]
pub struct Seaweed {
    // Dropped in this order: the processes, then the bridges, then the directory.
    proc: Proc,
    issuer_bridge: Bridge,
    _s3_bridge: Bridge,
    /// The S3 and STS endpoint, on the test's side.
    pub s3: SocketAddr,
    /// A static identity allowed everything.
    pub admin: Credentials,
    /// A static identity that may read, write and list objects, but not create buckets: what
    /// a publisher should be given.
    pub publisher: Credentials,
    _dir: tempfile::TempDir,
}

impl Seaweed {
    /// Starts SeaweedFS; its connections to `https://oidc.example.test` reach `issuer_https`,
    /// whose certificate must chain to `ca_pem`. Waits until an admin can list the bucket.
    pub async fn start(bins: &Bins, issuer_https: SocketAddr, ca_pem: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = |name: &str| dir.path().join(name);
        let write = |name: &str, text: &str| std::fs::write(path(name), text).expect("write");
        write("ca.pem", ca_pem);
        write("hosts", &format!("127.0.0.1 localhost {ISSUER_HOST}\n"));
        let admin = Credentials {
            access_key_id: "AKIDSEAWEEDADMIN".to_owned(),
            secret_access_key: URL_SAFE_NO_PAD.encode(random_bytes()),
            session_token: None,
        };
        let publisher = Credentials {
            access_key_id: "AKIDSEAWEEDPUBLISHER".to_owned(),
            secret_access_key: URL_SAFE_NO_PAD.encode(random_bytes()),
            session_token: None,
        };
        write(
            "s3.json",
            &serde_json::json!({"identities": [{"name": "admin",
                "credentials": [{"accessKey": admin.access_key_id,
                    "secretKey": admin.secret_access_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"]},
                {"name": "publisher",
                "credentials": [{"accessKey": publisher.access_key_id,
                    "secretKey": publisher.secret_access_key}],
                "actions": ["Read", "Write", "List"]}]})
            .to_string(),
        );
        write("iam.json", &iam_config().to_string());
        // Runs as the namespace's first process: when it dies, the kernel kills the others.
        write(
            "inner.sh",
            r#"set -e
ip link set lo up
mount --bind "$D/hosts" /etc/hosts
# weed puts gRPC sockets at fixed paths in /tmp (seaweedfs-master-grpc-19333.sock, ...), which
# concurrent instances would share: give this one a /tmp of its own. The scratch dir may be
# under /tmp, so it is reached as /mnt first (mounts here are private to this namespace).
mount --bind "$D" /mnt
D=/mnt
mount -t tmpfs -o size=16m tmpfs /tmp
# The test CA as the system roots, the Go way (real-parts §2).
export SSL_CERT_FILE="$D/ca.pem"
unset SSL_CERT_DIR
socat TCP-LISTEN:443,bind=127.0.0.1,fork,reuseaddr "UNIX-CONNECT:$D/issuer.sock" &
"$WEED" mini -dir="$D/data" -ip=127.0.0.1 -ip.bind=127.0.0.1 -master.telemetry=false \
  -admin.ui=false -webdav=false -s3.port.iceberg=0 -s3.port.lance=0 \
  -s3.localSocket="$D/s3.sock" -filer.localSocket="$D/filer.sock" \
  -s3.config="$D/s3.json" -s3.iam.config="$D/iam.json" -bucket=docs &
wait
"#,
        );
        std::fs::create_dir(path("data")).expect("data dir");
        let issuer_bridge = Bridge::unix_to_tcp(&path("issuer.sock"), issuer_https);
        let (s3_bridge, s3) = Bridge::tcp_to_unix(&path("s3.sock"));
        let mut proc = Proc::spawn(
            "weed (in unshare)",
            Command::new("unshare")
                .args(["--user", "--map-root-user", "--net", "--mount", "--pid"])
                .args(["--fork", "--kill-child", "--", "sh"])
                .arg(path("inner.sh"))
                .env("D", dir.path())
                .env("WEED", &bins.weed),
            &path("weed.log"),
        );
        let http = super::clients::client();
        let list = format!("/{BUCKET}");
        // Under a second when idle (real-parts §2).
        let ready = wait_for(
            "SeaweedFS to list the bucket",
            Duration::from_secs(60),
            || proc.assert_running("listing the bucket"),
            || async {
                let (status, body) =
                    s3_request(&http, s3, &admin, "GET", &list, &[("list-type", "2")], b"")
                        .await
                        .ok()?;
                (status == 200).then_some(body)
            },
        )
        .await;
        assert!(ready.contains(&format!("<Name>{BUCKET}</Name>")), "{ready}");
        Self {
            proc,
            issuer_bridge,
            _s3_bridge: s3_bridge,
            s3,
            admin,
            publisher,
            _dir: dir,
        }
    }

    /// Connections SeaweedFS has opened to the issuer so far.
    pub fn issuer_connections(&self) -> usize {
        self.issuer_bridge.accepted.load(Ordering::SeqCst)
    }

    /// The last lines of SeaweedFS's output, for failure messages.
    pub fn log(&self) -> String {
        self.proc.tail()
    }

    /// `AssumeRoleWithWebIdentity` for [`ROLE_ARN`] with `token`, unsigned, as the AWS SDKs
    /// send it.
    pub async fn assume_role(&self, token: &str) -> Result<Credentials, StsError> {
        let form = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs([
                ("Action", "AssumeRoleWithWebIdentity"),
                ("Version", "2011-06-15"),
                ("RoleArn", ROLE_ARN),
                ("RoleSessionName", "oidc-edge-test"),
                ("WebIdentityToken", token),
            ])
            .finish();
        let response = super::clients::client()
            .post(format!("http://{}/", self.s3))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form)
            .send()
            .await
            .expect("POST to STS");
        let status = response.status().as_u16();
        let body = response.text().await.expect("body");
        if status != 200 {
            return Err(StsError {
                status,
                code: xml_text(&body, "Code").unwrap_or_else(|| panic!("no Code: {body}")),
                message: xml_text(&body, "Message").unwrap_or_default(),
            });
        }
        let field = |tag| xml_text(&body, tag).unwrap_or_else(|| panic!("no {tag}: {body}"));
        Ok(Credentials {
            access_key_id: field("AccessKeyId"),
            secret_access_key: field("SecretAccessKey"),
            session_token: Some(field("SessionToken")),
        })
    }

    /// A SigV4-signed S3 request; returns status and body.
    pub async fn s3(
        &self,
        credentials: &Credentials,
        method: &str,
        path: &str,
        query: &[(&str, &str)],
        body: &[u8],
    ) -> (u16, String) {
        let http = super::clients::client();
        s3_request(&http, self.s3, credentials, method, path, query, body)
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e:?}"))
    }
}

impl Seaweed {
    /// `GET /BUCKET/key` as the admin: status, headers and body bytes.
    pub async fn object(&self, key: &str) -> (u16, reqwest::header::HeaderMap, Vec<u8>) {
        let host = self.s3.to_string();
        let path = format!("/{BUCKET}/{key}");
        let request = sigv4::Request {
            method: "GET",
            host: &host,
            path: &path,
            query: &[],
            body: b"",
        };
        let headers = sigv4::sign(&self.admin, REGION, &request, SystemTime::now());
        let mut get = super::clients::client().get(format!("http://{host}{path}"));
        for (name, value) in headers {
            get = get.header(name, value);
        }
        let response = get.send().await.expect("GET object");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        (
            status,
            headers,
            response.bytes().await.expect("body").to_vec(),
        )
    }
}

async fn s3_request(
    http: &reqwest::Client,
    s3: SocketAddr,
    credentials: &Credentials,
    method: &str,
    path: &str,
    query: &[(&str, &str)],
    body: &[u8],
) -> Result<(u16, String), reqwest::Error> {
    let host = s3.to_string();
    let request = sigv4::Request {
        method,
        host: &host,
        path,
        query,
        body,
    };
    let headers = sigv4::sign(credentials, REGION, &request, SystemTime::now());
    let mut url = format!("http://{host}{path}");
    if !query.is_empty() {
        url = format!("{url}?{}", sigv4::query_string(query));
    }
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
    let mut request = http.request(method, url).body(body.to_vec());
    for (name, value) in headers {
        request = request.header(name, value);
    }
    let response = request.send().await?;
    let status = response.status().as_u16();
    Ok((status, response.text().await?))
}

/// SeaweedFS's advanced IAM config (real-parts §2): the STS, `ISSUER` as OIDC provider `k8s`
/// with client ID `sts.amazonaws.com` (the audience check: a trust-policy condition on
/// `oidc:aud` does not match an array `aud`), and the walkthrough's role, which only
/// `system:serviceaccount:default:s3-lister` may assume (seed walkthrough §4: "or else any
/// service account in your K3s cluster can assume the IAM role").
fn iam_config() -> serde_json::Value {
    let mut signing_key = [0; 32];
    aws_lc_rs::rand::fill(&mut signing_key).expect("random");
    serde_json::json!({
        "sts": {
            "tokenDuration": "1h",
            "maxSessionLength": "12h",
            "issuer": "seaweedfs-sts",
            "signingKey": STANDARD.encode(signing_key),
            "providers": [{
                "name": "k8s",
                "type": "oidc",
                "enabled": true,
                "config": {"issuer": ISSUER, "clientId": STS_AUDIENCE, "jwksCacheTTLSeconds": 5},
            }],
        },
        "policy": {"defaultEffect": "Deny"},
        "roles": [{
            "roleName": "S3Lister",
            "roleArn": ROLE_ARN,
            "trustPolicy": {
                "Version": "2012-10-17",
                "Statement": [{
                    "Effect": "Allow",
                    "Principal": {"Federated": "k8s"},
                    "Action": ["sts:AssumeRoleWithWebIdentity"],
                    "Condition": {"StringEquals": {
                        "oidc:sub": format!("system:serviceaccount:{LISTER_NAMESPACE}:{LISTER}"),
                    }},
                }],
            },
            "attachedPolicies": ["S3All"],
        }],
        "policies": [{
            "name": "S3All",
            "document": {
                "Version": "2012-10-17",
                "Statement": [
                    {"Effect": "Allow", "Action": "s3:*", "Resource": "*"},
                    {"Effect": "Allow", "Action": "sts:ValidateSession", "Resource": "*"},
                ],
            },
        }],
    })
}
