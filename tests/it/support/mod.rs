//! The test harness: scratch directories, the fixtures, `eventually`, and the submodules
//! below. Every server a test starts binds 127.0.0.1 port 0 and is stopped when its handle
//! drops: a process by its PID, an in-process server by its shutdown signal.

pub mod azurite; // Azurite (Azure Blob emulator) on port 0, SharedKey-signed requests
pub mod broken_site; // deliberately broken issuers for the doctor
pub mod clients; // the one HTTP client builder, the rustls client config, HTTPS assertions
pub mod config; // config files built over `toml::Table`, not spliced from strings
pub mod fake_apiserver; // a kube-apiserver stand-in with its own CA and failure modes
pub mod inprocess; // `Server::bind` + `run` in this process, addresses from the bound sockets
pub mod log; // a server's log lines: the binary's stderr, or the same lines in process
pub mod metrics; // Prometheus scrapes of the admin listener, `/proc` memory figures
pub mod nginx; // Debian's nginx with the test's server blocks, stopped by its PID on drop
pub mod pebble; // Pebble and challtestsrv on loopback
pub mod pki; // a test CA and the certificates it signs
pub mod process; // the real binary: spawn, signals, stderr capture, kill by PID on drop
pub mod real;
pub mod s3tap;
pub mod signer; // P-256 cluster keys and service-account tokens signed with them // records what a publisher sends to a real S3 store; a failing store on demand // kube-apiserver + etcd and SeaweedFS (STS, S3), built by tests/real/setup

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub const K3S: &str = include_str!("../../fixtures/jwks/k3s.json");
pub const ROTATED: &str = include_str!("../../fixtures/jwks/rotated.json");
pub const RSA_1024: &str = include_str!("../../fixtures/jwks/rsa-1024.json");
pub const PRIVATE_RSA: &str = include_str!("../../fixtures/jwks/private-rsa.json");
pub const OCT: &str = include_str!("../../fixtures/jwks/oct.json");

/// The host name the tests' issuer lives on; HTTPS clients resolve it to the server under test.
pub const HTTPS_DOMAIN: &str = "oidc.example.com";

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_oidc-edge")
}

pub fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
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
