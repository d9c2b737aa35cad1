//! A real ACME server for the tests: Pebble and pebble-challtestsrv from Debian's packages,
//! on loopback ports, with the settings that keep issuance fast and deterministic
//! (crates-and-acme §5 and gotchas 1–4): `PEBBLE_VA_NOSLEEP=1`, `PEBBLE_WFE_NONCEREJECT=0`,
//! challtestsrv as a DNS server only (every name → 127.0.0.1), all its challenge listeners off.
//!
//! Pebble validates by connecting to fixed ports (`tlsPort`, `httpPort`), so those are picked
//! free here and the server under test is told to bind them.

use std::io::{BufRead as _, BufReader};
use std::net::{TcpListener, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::pki::Pki;

/// Whether Pebble tests may be skipped: only when explicitly asked.
fn skip_allowed() -> bool {
    std::env::var("OIDC_EDGE_SKIP_PEBBLE").is_ok_and(|v| v == "1")
}

pub struct Pebble {
    pebble: Child,
    challtestsrv: Child,
    _dir: tempfile::TempDir,
    log: Arc<Mutex<Vec<String>>>,
    /// `https://127.0.0.1:<port>/dir`
    pub directory: String,
    /// The CA of Pebble's own API certificate (not of the certificates it issues).
    pub api_ca_file: PathBuf,
    api_ca_pem: String,
    management: String,
}

/// Below Linux's ephemeral range (32768 and up by default): the kernel never hands these out
/// for port-0 binds or outgoing connections, so a port picked here stays ours until used.
const FIXED_PORTS: std::ops::Range<u16> = 20_000..32_000;
static NEXT_PORT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);

/// A free port for programs that must be told one up front. This is the pick-then-spawn
/// pattern the rest of the harness avoids (it binds port 0 and asks for the address), and it
/// is forced here: Pebble validates a challenge by connecting to the fixed `httpPort` and
/// `tlsPort` of its config, so the server under test must listen on exactly those; and
/// Pebble, challtestsrv and nginx never report a port they bound themselves, so they cannot
/// be given 0. Each call in this process gets a different port; each is checked free by
/// binding it.
pub fn free_tcp_port() -> u16 {
    use std::sync::atomic::Ordering;
    let span = FIXED_PORTS.end - FIXED_PORTS.start;
    // Start where the PID says, so that concurrent test processes rarely meet.
    let _ = NEXT_PORT.compare_exchange(
        0,
        (std::process::id() % u32::from(span)) as u16,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    loop {
        let port = FIXED_PORTS.start + NEXT_PORT.fetch_add(1, Ordering::SeqCst) % span;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

impl Pebble {
    /// Starts Pebble validating TLS-ALPN-01 on `tls_port` and HTTP-01 on `http_port`, issuing
    /// certificates valid for `validity_secs`. `None` when Pebble is missing and
    /// `OIDC_EDGE_SKIP_PEBBLE=1`; a missing Pebble otherwise fails the test.
    pub async fn start(tls_port: u16, http_port: u16, validity_secs: u64) -> Option<Self> {
        if Command::new("pebble").arg("-help").output().is_err() {
            assert!(
                skip_allowed(),
                "pebble is not installed: `apt-get install pebble` (scripts/test does it), or set OIDC_EDGE_SKIP_PEBBLE=1"
            );
            eprintln!("pebble missing: skipped because OIDC_EDGE_SKIP_PEBBLE=1");
            return None;
        }
        crate::support::install_crypto_provider();
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = Pki::new("pebble test CA");
        let wfe = pki.server_for(&["localhost", "127.0.0.1"]);
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).expect("write");
            path
        };
        let api_ca_file = write("ca.pem", &pki.ca_pem);
        let cert = write("wfe.pem", &wfe.cert_pem);
        let key = write("wfe.key", &wfe.key_pem);
        let (api, management, dns, dns_management) = (
            free_tcp_port(),
            free_tcp_port(),
            free_udp_port(),
            free_tcp_port(),
        );
        let config = write(
            "pebble.json",
            &serde_json::json!({ "pebble": {
                "listenAddress": format!("127.0.0.1:{api}"),
                "managementListenAddress": format!("127.0.0.1:{management}"),
                "certificate": cert, "privateKey": key,
                "httpPort": http_port, "tlsPort": tls_port,
                "ocspResponderURL": "", "externalAccountBindingRequired": false,
                "certificateValidityPeriod": validity_secs,
            }})
            .to_string(),
        );
        let challtestsrv = Command::new("pebble-challtestsrv")
            .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
            .args(["-dns01", &format!("127.0.0.1:{dns}")])
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .args(["-management", &format!("127.0.0.1:{dns_management}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn pebble-challtestsrv");
        let mut pebble = Command::new("pebble")
            .arg("-config")
            .arg(&config)
            .args(["-dnsserver", &format!("127.0.0.1:{dns}"), "-strict=false"])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .env("PEBBLE_AUTHZREUSE", "0")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn pebble");
        let log = Arc::new(Mutex::new(Vec::new()));
        for stream in [
            Box::new(pebble.stdout.take().expect("stdout")) as Box<dyn std::io::Read + Send>,
            Box::new(pebble.stderr.take().expect("stderr")),
        ] {
            let sink = Arc::clone(&log);
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    sink.lock().expect("log").push(line);
                }
            });
        }
        let pebble = Self {
            pebble,
            challtestsrv,
            _dir: dir,
            log,
            directory: format!("https://127.0.0.1:{api}/dir"),
            api_ca_file,
            api_ca_pem: pki.ca_pem,
            management: format!("https://127.0.0.1:{management}"),
        };
        let client = pebble.api_client();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !client
            .get(&pebble.directory)
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            assert!(
                Instant::now() < deadline,
                "pebble did not start:\n{}",
                pebble.log().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Some(pebble)
    }

    fn api_client(&self) -> reqwest::Client {
        super::clients::trusting(&self.api_ca_pem)
            .build()
            .expect("client")
    }

    /// The root that signs the certificates Pebble issues: new on every start.
    pub async fn issuing_root_pem(&self) -> String {
        let url = format!("{}/roots/0", self.management);
        let response = self.api_client().get(&url).send().await.expect("GET roots");
        assert_eq!(response.status(), 200);
        response.text().await.expect("root")
    }

    pub fn log(&self) -> Vec<String> {
        self.log.lock().expect("log").clone()
    }

    /// Orders Pebble has received.
    pub fn orders(&self) -> usize {
        self.log()
            .iter()
            .filter(|l| l.contains("POST /order-plz"))
            .count()
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        for child in [&mut self.pebble, &mut self.challtestsrv] {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
