//! Azurite, Microsoft's Azure Blob emulator (npm, installed by `tests/real/setup`), on
//! 127.0.0.1 port 0, with its well-known development account. It checks SharedKey
//! signatures as Azure does, so the test signs its own requests (creating the container,
//! reading blobs back) with [`shared_key`], written from Microsoft's "Authorize with Shared
//! Key" rules.

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

use super::real::find_parts;

/// Azurite's development account and its published key (Microsoft's docs).
pub const ACCOUNT: &str = "devstoreaccount1";
pub const ACCOUNT_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
const VERSION: &str = "2021-08-06";

#[derive(Debug)]
pub struct Azurite {
    child: Child,
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Azurite {
    /// Starts Azurite, or `None` when it is missing and `OIDC_EDGE_SKIP_REAL=1`.
    pub fn start() -> Option<Self> {
        let [bin] = find_parts("Azurite", ["OIDC_EDGE_AZURITE"], &["node"])?;
        let dir = tempfile::tempdir().expect("tempdir");
        let mut child = Command::new(bin)
            .args(["--blobHost", "127.0.0.1", "--blobPort", "0", "--location"])
            .arg(dir.path())
            .args(["--skipApiVersionCheck", "--disableProductStyleUrl"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn azurite");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                // "Azurite Blob service successfully listens on http://127.0.0.1:PORT"
                if let Some(addr) = line.split("listens on http://").nth(1) {
                    let _ = tx.send(addr.trim().to_owned());
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("Azurite says where it listens")
            .parse()
            .expect("an address");
        Some(Self {
            child,
            addr,
            _dir: dir,
        })
    }

    /// The endpoint a target names: path style, ending with the account.
    pub fn endpoint(&self) -> String {
        format!("http://{}/{ACCOUNT}", self.addr)
    }

    /// Creates `container`.
    pub async fn create_container(&self, container: &str) {
        let (status, _, body) = self
            .request("PUT", &format!("/{container}"), &[("restype", "container")])
            .await;
        assert_eq!(status, 201, "{}", String::from_utf8_lossy(&body));
    }

    /// `GET` of a blob: status, headers and body.
    pub async fn blob(
        &self,
        container: &str,
        key: &str,
    ) -> (u16, reqwest::header::HeaderMap, Vec<u8>) {
        self.request("GET", &format!("/{container}/{key}"), &[])
            .await
    }

    async fn request(
        &self,
        method: &str,
        path: &str,
        query: &[(&str, &str)],
    ) -> (u16, reqwest::header::HeaderMap, Vec<u8>) {
        let date = httpdate::fmt_http_date(std::time::SystemTime::now());
        let path = format!("/{ACCOUNT}{path}");
        let authorization = shared_key(method, &path, query, &date);
        let mut url = format!("http://{}{path}", self.addr);
        if !query.is_empty() {
            let pairs: Vec<String> = query.iter().map(|(k, v)| format!("{k}={v}")).collect();
            url = format!("{url}?{}", pairs.join("&"));
        }
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let response = super::clients::client()
            .request(method, url)
            .header("x-ms-date", &date)
            .header("x-ms-version", VERSION)
            .header("authorization", authorization)
            .header("content-length", "0")
            .send()
            .await
            .expect("Azurite request");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        (
            status,
            headers,
            response.bytes().await.expect("body").to_vec(),
        )
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An account SAS for the blob service (read, write, list, create on services, containers and
/// objects), valid until 2099, over http: the token a `sas_token_file` holds.
pub fn account_sas() -> String {
    let (permissions, services, types, expiry, protocol) =
        ("rwlac", "b", "sco", "2099-01-01T00:00:00Z", "https,http");
    // Version 2020-12-06 and later: account, permissions, services, resource types, start,
    // expiry, IP, protocol, version, encryption scope, each followed by a newline.
    let text = format!(
        "{ACCOUNT}\n{permissions}\n{services}\n{types}\n\n{expiry}\n\n{protocol}\n{VERSION}\n\n"
    );
    let signature = hmac(text.as_bytes());
    let pairs = [
        ("sv", VERSION),
        ("ss", services),
        ("srt", types),
        ("sp", permissions),
        ("se", expiry),
        ("spr", protocol),
        ("sig", &signature),
    ];
    url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish()
}

fn hmac(text: &[u8]) -> String {
    let key = STANDARD.decode(ACCOUNT_KEY).expect("base64 key");
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &key);
    STANDARD.encode(aws_lc_rs::hmac::sign(&key, text).as_ref())
}

/// `SharedKey ACCOUNT:signature` for a request with no body and only `x-ms-date` and
/// `x-ms-version` headers.
fn shared_key(method: &str, path: &str, query: &[(&str, &str)], date: &str) -> String {
    // VERB, then Content-Encoding .. Range (11 standard headers, all empty here).
    let mut text = format!("{method}\n{}", "\n".repeat(11));
    text.push_str(&format!("x-ms-date:{date}\nx-ms-version:{VERSION}\n"));
    text.push_str(&format!("/{ACCOUNT}{path}"));
    let mut params: Vec<&(&str, &str)> = query.iter().collect();
    params.sort();
    for (k, v) in params {
        text.push_str(&format!("\n{}:{v}", k.to_ascii_lowercase()));
    }
    let key = STANDARD.decode(ACCOUNT_KEY).expect("base64 key");
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &key);
    let signature = aws_lc_rs::hmac::sign(&key, text.as_bytes());
    format!(
        "SharedKey {ACCOUNT}:{}",
        STANDARD.encode(signature.as_ref())
    )
}
