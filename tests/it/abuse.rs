//! Hostile clients, all at once against one server with its default limits (issue 9):
//! thousands of connections that stall before or inside the TLS handshake or drip their
//! headers, oversized headers, HTTP/2 stream floods and rapid resets, pipelined floods (read
//! and unread), requests with endless bodies, and floods of refused pushes and pushes whose
//! bodies drip in (issue 18). Meanwhile an ordinary client fetches both
//! documents over HTTPS (kept-alive and fresh connections) and plain HTTP: every answer must
//! be a 200 with the right bytes, and the server's memory must stay bounded.
//!
//! Short by default (5 s, 2000 stalled connections). The long run whose figures go in the
//! session note: `OIDC_EDGE_ABUSE_SECS=600 OIDC_EDGE_ABUSE_CONNS=3000 cargo test --release
//! abuse -- --nocapture`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::support::clients::{builder, https_client, https_url, plain_client, tls_config};
use crate::support::config::{ISSUER, Source, TestConfig};
use crate::support::metrics::{metric, proc_status_kib, scrape};
use crate::support::pki::Pki;
use crate::support::process::Binary;
use crate::support::signer::{ClusterKey, token_claims};
use crate::support::{HTTPS_DOMAIN, K3S, Scratch, install_crypto_provider};

/// Peak RSS the server may reach under the whole attack. Measured: see the session note; a
/// stalled connection costs a few KiB, so thousands fit well inside this.
const PEAK_RSS_BOUND_KIB: u64 = 192 * 1024;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{name}={v:?}")))
        .unwrap_or(default)
}

/// What the attackers achieved: the test fails if an attack did not happen.
#[derive(Default)]
struct Tally {
    /// Attacker connections open now, and the most at once.
    held: Open,
    /// Attacker connections opened in all.
    opened: AtomicU64,
    /// Attacker connections the server closed (deadline, limit, or GOAWAY).
    dropped: AtomicU64,
    answered_431: AtomicU64,
    /// Body-carrying requests that got a final answer before the server closed.
    bodies_answered: AtomicU64,
    pipelined_200: AtomicU64,
    h2_streams_200: AtomicU64,
    h2_resets_sent: AtomicU64,
    h2_goaways: AtomicU64,
    /// Pushes answered 401 or 403 (no usable token, a key the edge does not trust).
    pushes_refused: AtomicU64,
    /// Pushes with a trusted token whose bodies drip in, answered or cut off.
    slow_pushes: AtomicU64,
}

impl Tally {
    fn opened(&self) -> Held<'_> {
        self.opened.fetch_add(1, Ordering::Relaxed);
        self.held.enter()
    }

    fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// Connections open now, and the most at once.
#[derive(Default)]
struct Open {
    now: AtomicU64,
    peak: AtomicU64,
}

impl Open {
    fn enter(&self) -> Held<'_> {
        let now = self.now.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak.fetch_max(now, Ordering::Relaxed);
        Held(self)
    }
}

/// One open attacker connection, counted in [`Open`] while it lives.
struct Held<'a>(&'a Open);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.now.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Connects, retrying while the server's backlog is full (it stops accepting at its cap).
async fn connect(addr: SocketAddr, until: Instant) -> Option<TcpStream> {
    while Instant::now() < until {
        match timeout(Duration::from_secs(2), TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => return Some(stream),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    None
}

/// Reads and discards until the peer closes or `until`; true when the peer closed.
async fn drain_until_closed(stream: &mut TcpStream, until: Instant) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        let left = until.saturating_duration_since(Instant::now());
        match timeout(left, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

/// The start of a ClientHello that announces 256 bytes and sends 11: a handshake that stalls
/// inside TLS rather than before it.
const PARTIAL_CLIENT_HELLO: &[u8] = &[
    0x16, 0x03, 0x01, 0x01, 0x00, 0x01, 0x00, 0x00, 0xfc, 0x03, 0x03,
];

/// Opens a connection, sends `first`, then says nothing; reconnects when dropped.
async fn stall(addr: SocketAddr, first: &'static [u8], tally: Arc<Tally>, until: Instant) {
    while let Some(mut stream) = connect(addr, until).await {
        let _held = tally.opened();
        let _ = stream.write_all(first).await;
        if drain_until_closed(&mut stream, until).await {
            tally.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Sends a request line and then one header byte a second, never finishing the headers.
async fn drip_headers(addr: SocketAddr, tally: Arc<Tally>, until: Instant) {
    while let Some(mut stream) = connect(addr, until).await {
        let _held = tally.opened();
        let head = format!("GET /openid/v1/jwks HTTP/1.1\r\nHost: {HTTPS_DOMAIN}\r\nX-Drip: ");
        if stream.write_all(head.as_bytes()).await.is_err() {
            continue;
        }
        let mut buf = [0u8; 512];
        loop {
            if Instant::now() >= until {
                return;
            }
            match timeout(Duration::from_secs(1), stream.read(&mut buf)).await {
                // The server answered (408) or closed: the drip was cut off.
                Ok(_) => {
                    tally.dropped.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Err(_) => {
                    if stream.write_all(b"a").await.is_err() {
                        tally.dropped.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                }
            }
        }
    }
}

/// 20 KiB of headers, over and over: each must get 431 and a closed connection.
async fn oversized_headers(addr: SocketAddr, tally: Arc<Tally>, until: Instant) {
    let request = format!(
        "GET /openid/v1/jwks HTTP/1.1\r\nHost: {HTTPS_DOMAIN}\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20 * 1024)
    );
    while let Some(mut stream) = connect(addr, until).await {
        let _held = tally.opened();
        let _ = stream.write_all(request.as_bytes()).await;
        let mut head = [0u8; 12];
        if matches!(
            timeout(Duration::from_secs(5), stream.read_exact(&mut head)).await,
            Ok(Ok(_))
        ) && &head == b"HTTP/1.1 431"
        {
            tally.answered_431.fetch_add(1, Ordering::Relaxed);
        }
        if drain_until_closed(&mut stream, until).await {
            tally.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A POST with a 1 GB Content-Length whose body streams in as fast as the server takes it,
/// then a chunked body that never ends: each is answered (405) and cut off.
async fn endless_bodies(addr: SocketAddr, tally: Arc<Tally>, until: Instant) {
    let heads = [
        format!(
            "POST /openid/v1/jwks HTTP/1.1\r\nHost: {HTTPS_DOMAIN}\r\nContent-Length: 1000000000\r\n\r\n"
        ),
        format!(
            "POST /openid/v1/jwks HTTP/1.1\r\nHost: {HTTPS_DOMAIN}\r\nTransfer-Encoding: chunked\r\n\r\n"
        ),
    ];
    let chunk = vec![b'x'; 64 * 1024];
    let framed = [
        format!("{:x}\r\n", chunk.len()).into_bytes(),
        chunk.clone(),
        b"\r\n".to_vec(),
    ]
    .concat();
    for round in 0.. {
        let Some(mut stream) = connect(addr, until).await else {
            return;
        };
        let _held = tally.opened();
        let chunked = round % 2 == 1;
        let _ = stream
            .write_all(heads[usize::from(chunked)].as_bytes())
            .await;
        let (mut reader, mut writer) = stream.split();
        let body = if chunked { &framed } else { &chunk };
        let feed = async { while writer.write_all(body).await.is_ok() {} };
        let mut head = [0u8; 12];
        let left = until.saturating_duration_since(Instant::now());
        tokio::select! {
            () = feed => {}
            read = timeout(left, reader.read_exact(&mut head)) => {
                if matches!(read, Ok(Ok(_))) && head.starts_with(b"HTTP/1.1 ") {
                    tally.bodies_answered.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        if drain_until_closed(&mut stream, until).await {
            tally.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

const PUSH_PATH: &str = "/.oidc-edge/v1/jwks";

/// Invalid pushes as fast as the server answers them, on one kept-alive HTTPS client: no
/// token, a token that is no JWT, a token of a key the edge does not publish. Each must be
/// refused before its body is read.
async fn push_flood(
    ca_pem: String,
    https: SocketAddr,
    stranger: String,
    tally: Arc<Tally>,
    until: Instant,
) {
    let client = https_client(&ca_pem, https).build().expect("client");
    let url = https_url(https, PUSH_PATH);
    let body = Bytes::from(vec![b'{'; 512 * 1024]);
    for round in 0u64.. {
        if Instant::now() >= until {
            return;
        }
        let mut request = client.put(&url).body(body.clone());
        match round % 3 {
            0 => {}
            1 => request = request.bearer_auth("not-a-jwt"),
            _ => request = request.bearer_auth(&stranger),
        }
        if let Ok(response) = request.send().await
            && matches!(response.status().as_u16(), 401 | 403)
        {
            tally.pushes_refused.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A push with a token the edge trusts whose 100 kB body comes in a byte a second: it holds
/// a connection and a handler until the body deadline, never a document request.
async fn slow_push(
    connector: TlsConnector,
    https: SocketAddr,
    token: String,
    tally: Arc<Tally>,
    until: Instant,
) {
    while Instant::now() < until {
        let Some(tcp) = connect(https, until).await else {
            return;
        };
        let _held = tally.opened();
        let name = ServerName::try_from(HTTPS_DOMAIN).expect("name");
        let Ok(mut stream) = connector.connect(name, tcp).await else {
            continue;
        };
        let head = format!(
            "PUT {PUSH_PATH} HTTP/1.1\r\nHost: {HTTPS_DOMAIN}\r\nAuthorization: Bearer {token}\r\nContent-Length: 100000\r\n\r\n"
        );
        if stream.write_all(head.as_bytes()).await.is_err() {
            continue;
        }
        tally.slow_pushes.fetch_add(1, Ordering::Relaxed);
        while Instant::now() < until && stream.write_all(b"{").await.is_ok() {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// 500 pipelined GETs in one write, read back in full, again and again on one connection.
/// With `read == false` the responses are never read: the server must block on that one
/// connection, not buffer without bound.
async fn pipelined(addr: SocketAddr, read: bool, tally: Arc<Tally>, until: Instant) {
    const DEPTH: usize = 500;
    let batch =
        format!("GET /openid/v1/jwks HTTP/1.1\r\nHost: {HTTPS_DOMAIN}\r\n\r\n").repeat(DEPTH);
    while let Some(mut stream) = connect(addr, until).await {
        let _held = tally.opened();
        loop {
            if Instant::now() >= until {
                return;
            }
            let left = until.saturating_duration_since(Instant::now());
            if !read {
                // Writes until both sides' buffers are full, then waits for the deadline.
                let _ = timeout(left, async {
                    while stream.write_all(batch.as_bytes()).await.is_ok() {}
                })
                .await;
                return;
            }
            if stream.write_all(batch.as_bytes()).await.is_err() {
                break;
            }
            let needle = b"HTTP/1.1 200 OK\r\n";
            let (mut seen, mut carry) = (0, Vec::new());
            let mut buf = vec![0u8; 64 * 1024];
            while seen < DEPTH {
                let Ok(Ok(n @ 1..)) = timeout(Duration::from_secs(10), stream.read(&mut buf)).await
                else {
                    tally.dropped.fetch_add(1, Ordering::Relaxed);
                    return;
                };
                carry.extend_from_slice(&buf[..n]);
                seen += carry.windows(needle.len()).filter(|w| w == needle).count();
                let keep = carry.len().saturating_sub(needle.len() - 1);
                carry.drain(..keep);
            }
            tally
                .pipelined_200
                .fetch_add(DEPTH as u64, Ordering::Relaxed);
        }
    }
}

fn h2_connector(ca_pem: &str) -> TlsConnector {
    tls_connector(ca_pem, b"h2")
}

async fn h2_connect(
    connector: &TlsConnector,
    addr: SocketAddr,
    until: Instant,
) -> Option<h2::client::SendRequest<Bytes>> {
    h2_open(connector, addr, until)
        .await
        .map(|(sender, _)| sender)
}

/// An HTTP/2 connection, and its task, which ends when the server closes the connection.
async fn h2_open(
    connector: &TlsConnector,
    addr: SocketAddr,
    until: Instant,
) -> Option<(
    h2::client::SendRequest<Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
)> {
    let tcp = connect(addr, until).await?;
    let name = ServerName::try_from(HTTPS_DOMAIN).expect("name");
    let tls: TlsStream<TcpStream> = connector.connect(name, tcp).await.ok()?;
    let (sender, connection) = h2::client::handshake(tls).await.ok()?;
    Some((sender, tokio::spawn(connection)))
}

fn h2_get() -> http::Request<()> {
    http::Request::get(format!("https://{HTTPS_DOMAIN}/openid/v1/jwks"))
        .body(())
        .expect("request")
}

/// 200 concurrent streams on one connection (the server admits 64 at a time), read in full.
async fn h2_stream_flood(
    connector: TlsConnector,
    addr: SocketAddr,
    tally: Arc<Tally>,
    until: Instant,
) {
    while let Some(sender) = h2_connect(&connector, addr, until).await {
        let _held = tally.opened();
        while Instant::now() < until {
            let streams: Vec<_> = (0..200)
                .map(|_| {
                    let sender = sender.clone();
                    tokio::spawn(async move {
                        let (response, _) = sender
                            .ready()
                            .await
                            .ok()?
                            .send_request(h2_get(), true)
                            .ok()?;
                        let response = response.await.ok()?;
                        let ok = response.status() == 200;
                        let mut body = response.into_body();
                        while let Some(Ok(data)) = body.data().await {
                            let _ = body.flow_control().release_capacity(data.len());
                        }
                        Some(ok)
                    })
                })
                .collect();
            let mut failed = false;
            for stream in streams {
                match stream.await {
                    Ok(Some(true)) => {
                        tally.h2_streams_200.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => failed = true,
                }
            }
            if failed {
                break;
            }
        }
    }
}

/// CVE-2023-44487: open a stream and reset it at once, as fast as possible. The server must
/// answer with GOAWAY and close, and the attacker reconnects.
async fn h2_rapid_reset(
    connector: TlsConnector,
    addr: SocketAddr,
    tally: Arc<Tally>,
    until: Instant,
) {
    while let Some(sender) = h2_connect(&connector, addr, until).await {
        let _held = tally.opened();
        loop {
            if Instant::now() >= until {
                return;
            }
            let sent = match sender.clone().ready().await {
                Ok(mut ready) => ready.send_request(h2_get(), true),
                Err(e) => Err(e),
            };
            match sent {
                Ok((_, mut stream)) => {
                    stream.send_reset(h2::Reason::CANCEL);
                    tally.h2_resets_sent.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    if e.is_go_away() || e.reason().is_some() {
                        tally.h2_goaways.fetch_add(1, Ordering::Relaxed);
                    }
                    tally.dropped.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            }
            // Let the connection task write the frames out.
            tokio::task::yield_now().await;
        }
    }
}

/// The documents as served before the attack: every answer during it must be these bytes.
struct Expected {
    discovery: String,
    jwks: String,
}

impl Expected {
    async fn fetch(http: SocketAddr) -> Self {
        let plain = plain_client(http);
        let get = |path: &'static str| {
            let request = plain.get(format!("http://{HTTPS_DOMAIN}:{}{path}", http.port()));
            async move {
                request
                    .send()
                    .await
                    .expect("GET")
                    .text()
                    .await
                    .expect("body")
            }
        };
        Self {
            discovery: get("/.well-known/openid-configuration").await,
            jwks: get("/openid/v1/jwks").await,
        }
    }

    fn for_url(&self, url: &str) -> &str {
        if url.ends_with("/openid/v1/jwks") {
            &self.jwks
        } else {
            &self.discovery
        }
    }
}

/// What the ordinary client saw.
struct Ordinary {
    latencies: Vec<Duration>,
    /// The slowest answer on a fresh HTTPS connection, a kept-alive one, and plain HTTP.
    slowest: [Duration; 3],
    failures: Vec<String>,
}

/// Both documents, as a relying party fetches them: over a kept-alive HTTPS client, a fresh
/// HTTPS connection every fifth round, and plain HTTP, 50 rounds a second.
async fn ordinary_client(
    expected: Expected,
    ca_pem: String,
    https: SocketAddr,
    http: SocketAddr,
    until: Instant,
) -> Ordinary {
    // From its own address, so that the server's debug log tells its connections apart.
    let local = std::net::IpAddr::from([127, 0, 0, 2]);
    let kept = https_client(&ca_pem, https)
        .local_address(local)
        .build()
        .expect("client");
    let plain = builder()
        .resolve(HTTPS_DOMAIN, http)
        .local_address(local)
        .build()
        .expect("client");
    let mut seen = Ordinary {
        latencies: Vec::new(),
        slowest: [Duration::ZERO; 3],
        failures: Vec::new(),
    };
    for round in 0u64.. {
        if Instant::now() >= until {
            break;
        }
        let fresh;
        let (client, url) = match round % 5 {
            0 => {
                fresh = https_client(&ca_pem, https)
                    .local_address(local)
                    .build()
                    .expect("client");
                (
                    &fresh,
                    https_url(https, "/.well-known/openid-configuration"),
                )
            }
            1 | 3 => (&kept, https_url(https, "/openid/v1/jwks")),
            2 => (
                &plain,
                format!("http://{HTTPS_DOMAIN}:{}/openid/v1/jwks", http.port()),
            ),
            _ => (&kept, https_url(https, "/.well-known/openid-configuration")),
        };
        let started = Instant::now();
        let answer = async {
            let response = client
                .get(&url)
                .send()
                .await
                .map_err(|e| format!("{e:?}"))?;
            let status = response.status();
            let body = response.text().await.map_err(|e| format!("{e:?}"))?;
            Ok::<_, String>((status, body))
        };
        match answer.await {
            Ok((status, body)) if status == 200 && body == expected.for_url(&url) => {
                let took = started.elapsed();
                let kind = match round % 5 {
                    0 => 0,
                    2 => 2,
                    _ => 1,
                };
                seen.slowest[kind] = seen.slowest[kind].max(took);
                seen.latencies.push(took);
            }
            Ok((status, body)) => seen.failures.push(format!("{url}: {status} {body:.80}")),
            Err(e) => seen.failures.push(format!("{url}: {e}")),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    seen
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((sorted.len() as f64) * p).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// One abuse run: how many connections of each stalling kind it holds open, and whether the
/// floods (431s, bodies, pipelining, HTTP/2 streams and resets) run too.
#[derive(Debug, Clone, Copy)]
struct Attack {
    /// Connect to the HTTPS listener and send nothing.
    silent: u64,
    /// Send the first bytes of a ClientHello, then nothing.
    partial_hello: u64,
    /// Send plain-HTTP headers one byte a second.
    drips: u64,
    floods: bool,
    /// Fewer answers a second than this means the ordinary client was starved.
    ordinary_per_sec: u64,
}

impl Attack {
    fn total(self) -> u64 {
        self.silent + self.partial_hello + self.drips
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_clients_do_not_starve_an_ordinary_one() {
    // The default [limits] are what must hold: 2000 stalled connections, under the 4096 cap.
    let n = env_or("OIDC_EDGE_ABUSE_CONNS", 2000);
    let attack = Attack {
        silent: n / 2,
        partial_hello: n / 4,
        drips: n / 4,
        floods: true,
        ordinary_per_sec: 10,
    };
    abuse("default limits", &[], attack).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_clients_beyond_the_connection_cap_make_room_for_real_ones() {
    // Four times more silent connections than the cap: each new connection closes the
    // oldest silent one, so the ordinary client always gets in. Clients that send bytes
    // stay below the cap (they are bounded by the deadlines instead). The evicted reconnect
    // at once, so the server spends its CPU on accepting and closing, and the ordinary
    // client's new connections queue behind theirs in the kernel: its latency is reported
    // (the session note has the figures), its answers must all be right.
    let n = env_or("OIDC_EDGE_ABUSE_CONNS", 2000) / 2;
    let attack = Attack {
        silent: n,
        partial_hello: n / 16,
        drips: n / 16,
        floods: false,
        ordinary_per_sec: 1,
    };
    let cap = i64::try_from(n / 4).expect("cap");
    let what = format!("max_connections = {cap}");
    abuse(&what, &[("max_connections", cap)], attack).await;
}

/// Both runs load the machine: one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `attack` for `OIDC_EDGE_ABUSE_SECS` (5 s), with `limits` set in the `[limits]` section,
/// and an ordinary client throughout.
async fn abuse(what: &str, limits: &[(&str, i64)], attack: Attack) {
    let _alone = ONE_AT_A_TIME.lock().await;
    let conns = attack.total();
    install_crypto_provider();
    let secs = env_or("OIDC_EDGE_ABUSE_SECS", 5);
    // Each attacker holds a socket here and one in the server; other tests run alongside.
    let open_files = rlimit::increase_nofile_limit(u64::MAX).expect("RLIMIT_NOFILE");
    assert!(
        open_files >= 4 * conns + 2048,
        "the open-file limit is {open_files}: raise it (ulimit -Hn) to run {conns} connections"
    );
    let pki = Pki::new("test public CA");
    let leaf = pki.server_for(&[HTTPS_DOMAIN]);
    let scratch = Scratch::new();
    // The issuer also takes pushes, signed by a key its file source lists (issue 18).
    let (trusted, stranger) = (ClusterKey::new("trusted"), ClusterKey::new("stranger"));
    let audience = format!("https://{HTTPS_DOMAIN}{PUSH_PATH}");
    let subject = "system:serviceaccount:oidc-edge:pusher";
    let claims = |key: &ClusterKey| key.sign(&token_claims(ISSUER, &audience, subject, 3600));
    let (trusted_token, stranger_token) = (claims(&trusted), claims(&stranger));
    let mut with_trusted: serde_json::Value = serde_json::from_str(K3S).expect("K3S");
    with_trusted["keys"]
        .as_array_mut()
        .expect("keys")
        .push(trusted.jwk.clone());
    let config = limits
        .iter()
        .fold(
            TestConfig::https_files(&scratch, &leaf),
            |config, (key, value)| config.set(&format!("limits.{key}"), *value),
        )
        .source(
            Source::new("push")
                .set("audience", audience.as_str())
                .set("subject", subject),
        )
        .set("log.access", false)
        .write(&scratch);
    scratch.write("jwks.json", &with_trusted.to_string());
    let mut server = Binary::start(&config);
    let (https, http) = (server.listening("https"), server.addr);
    let pid = server.pid();
    let expected = Expected::fetch(http).await;
    assert!(expected.jwks.contains("\"keys\""), "{}", expected.jwks);

    let started = Instant::now();
    let until = started + Duration::from_secs(secs);
    let tally = Arc::new(Tally::default());
    let connector = h2_connector(&pki.ca_pem);
    let mut attackers = Vec::new();
    let mut spawn = |attack: std::pin::Pin<Box<dyn Future<Output = ()> + Send>>| {
        attackers.push(tokio::spawn(attack));
    };
    // Interleaved, so that each kind is spread over the whole ramp-up.
    for i in 0..conns {
        let tally = Arc::clone(&tally);
        if i % 4 == 0 && i / 4 < attack.drips {
            spawn(Box::pin(drip_headers(http, tally, until)));
        } else if i % 4 == 1 && i / 4 < attack.partial_hello {
            spawn(Box::pin(stall(https, PARTIAL_CLIENT_HELLO, tally, until)));
        } else {
            spawn(Box::pin(stall(https, b"", tally, until)));
        }
    }
    for _ in 0..if attack.floods { 2 } else { 0 } {
        spawn(Box::pin(oversized_headers(http, Arc::clone(&tally), until)));
        spawn(Box::pin(endless_bodies(http, Arc::clone(&tally), until)));
        spawn(Box::pin(pipelined(http, true, Arc::clone(&tally), until)));
        spawn(Box::pin(pipelined(http, false, Arc::clone(&tally), until)));
        spawn(Box::pin(h2_stream_flood(
            connector.clone(),
            https,
            Arc::clone(&tally),
            until,
        )));
        spawn(Box::pin(h2_rapid_reset(
            connector.clone(),
            https,
            Arc::clone(&tally),
            until,
        )));
        spawn(Box::pin(push_flood(
            pki.ca_pem.clone(),
            https,
            stranger_token.clone(),
            Arc::clone(&tally),
            until,
        )));
        for _ in 0..8 {
            spawn(Box::pin(slow_push(
                tls_connector(&pki.ca_pem, b"http/1.1"),
                https,
                trusted_token.clone(),
                Arc::clone(&tally),
                until,
            )));
        }
    }
    let sampler = tokio::spawn(async move {
        let mut peak = 0;
        while Instant::now() < until {
            peak = peak.max(proc_status_kib(pid, "VmRSS"));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        peak
    });
    let ordinary = ordinary_client(expected, pki.ca_pem.clone(), https, http, until).await;
    for attacker in attackers {
        attacker.await.expect("attacker");
    }
    let peak_rss = sampler.await.expect("sampler");
    let hwm = proc_status_kib(pid, "VmHWM");

    let mut latencies = ordinary.latencies.clone();
    latencies.sort();
    let t = |c: &AtomicU64| Tally::get(c);
    println!(
        "abuse ({what}) for {secs} s: {} attacker connections opened, {} held at peak, {} dropped by the server; \
         431s {}, body requests answered {}, pipelined 200s {}, h2 stream 200s {}, h2 resets {} \
         and GOAWAYs {}, pushes refused {}, slow pushes {}; ordinary client {} requests ok, {} failed, p50 {:?} p99 {:?} max {:?} \
         (slowest fresh HTTPS {:?}, kept-alive HTTPS {:?}, plain {:?}); server RSS peak {} KiB sampled, VmHWM {} KiB",
        t(&tally.opened),
        t(&tally.held.peak),
        t(&tally.dropped),
        t(&tally.answered_431),
        t(&tally.bodies_answered),
        t(&tally.pipelined_200),
        t(&tally.h2_streams_200),
        t(&tally.h2_resets_sent),
        t(&tally.h2_goaways),
        t(&tally.pushes_refused),
        t(&tally.slow_pushes),
        latencies.len(),
        ordinary.failures.len(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or_default(),
        ordinary.slowest[0],
        ordinary.slowest[1],
        ordinary.slowest[2],
        peak_rss,
        hwm,
    );
    assert!(ordinary.failures.is_empty(), "{:#?}", ordinary.failures);
    assert!(
        latencies.len() as u64 >= secs * attack.ordinary_per_sec,
        "the ordinary client barely ran"
    );
    // Every attack happened: otherwise this test proves nothing.
    assert!(
        t(&tally.held.peak) >= conns * 9 / 10,
        "only {} held",
        t(&tally.held.peak)
    );
    if !attack.floods {
        // Beyond the cap, the server made room again and again.
        assert!(
            t(&tally.dropped) >= conns,
            "only {} closed",
            t(&tally.dropped)
        );
    }
    for (what, counter) in [
        ("431 answers", &tally.answered_431),
        ("answered bodies", &tally.bodies_answered),
        ("pipelined 200s", &tally.pipelined_200),
        ("h2 stream 200s", &tally.h2_streams_200),
        ("rapid-reset GOAWAYs", &tally.h2_goaways),
        ("refused pushes", &tally.pushes_refused),
        ("slow pushes", &tally.slow_pushes),
    ] {
        assert!(!attack.floods || t(counter) > 0, "no {what}");
    }
    assert!(hwm < PEAK_RSS_BOUND_KIB, "peak RSS {hwm} KiB");
}

/// HTTP/2 connections that made one request and then idle: at the cap the idlest gives way
/// to a new client at once, and all close gracefully after `idle_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_http2_connections_give_way_at_the_cap_and_close_after_idle_timeout() {
    install_crypto_provider();
    let _alone = ONE_AT_A_TIME.lock().await;
    let pki = Pki::new("test public CA");
    let scratch = Scratch::new();
    let config = TestConfig::https_files(&scratch, &pki.server_for(&[HTTPS_DOMAIN]))
        .set("limits.max_connections", 20)
        .set("limits.idle_timeout", "4s")
        .write(&scratch);
    let mut server = Binary::start(&config);
    let https = server.listening("https");
    let connector = h2_connector(&pki.ca_pem);
    let until = Instant::now() + Duration::from_secs(30);
    let mut idle = Vec::new();
    for _ in 0..20 {
        let (sender, task) = h2_open(&connector, https, until).await.expect("h2");
        let (response, _) = sender
            .clone()
            .ready()
            .await
            .expect("ready")
            .send_request(h2_get(), true)
            .expect("send");
        assert_eq!(response.await.expect("response").status(), 200);
        idle.push((sender, task));
    }
    // The listener is full of proven, idle connections: a new client still gets in at once.
    let started = Instant::now();
    let fresh = https_client(&pki.ca_pem, https).build().expect("client");
    let response = fresh
        .get(https_url(https, "/openid/v1/jwks"))
        .send()
        .await
        .expect("GET with the listener full");
    assert_eq!(response.status(), 200);
    let admitted_in = started.elapsed();
    // At once, not after a slot frees up at idle_timeout (4 s).
    assert!(admitted_in < Duration::from_secs(2), "{admitted_in:?}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let closed = idle.iter().filter(|(_, task)| task.is_finished()).count();
    assert_eq!(closed, 1, "one idle connection made room");
    // After idle_timeout (4 s, with slack), the server has closed every idle one.
    let deadline = Instant::now() + Duration::from_secs(10);
    while idle.iter().any(|(_, task)| !task.is_finished()) {
        assert!(
            Instant::now() < deadline,
            "idle HTTP/2 connections still open"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("admitted at the cap in {admitted_in:?}; idle connections closed after idle_timeout");
}

/// What the clients that stop reading achieved, per kind.
#[derive(Default)]
struct StallTally {
    opened: AtomicU64,
    /// Connections that got a request in and then stopped reading.
    stalled: AtomicU64,
    /// Of those, the ones the server closed.
    closed: AtomicU64,
    /// Stalled connections open now, and the most at once.
    held: Open,
}

impl StallTally {
    fn stalled(&self) -> Held<'_> {
        self.stalled.fetch_add(1, Ordering::Relaxed);
        self.held.enter()
    }
}

/// A TLS connection (ALPN `alpn`) or plain TCP, as one stream type.
type AnyStream = tokio_util::either::Either<TcpStream, TlsStream<TcpStream>>;

async fn open_stream(
    addr: SocketAddr,
    tls: Option<&TlsConnector>,
    recv_buffer: Option<u32>,
    until: Instant,
) -> Option<AnyStream> {
    let tcp = loop {
        if Instant::now() >= until {
            return None;
        }
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        if let Some(size) = recv_buffer {
            socket.set_recv_buffer_size(size).expect("SO_RCVBUF");
        }
        match timeout(Duration::from_secs(2), socket.connect(addr)).await {
            Ok(Ok(tcp)) => break tcp,
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    match tls {
        None => Some(tokio_util::either::Either::Left(tcp)),
        Some(connector) => {
            let name = ServerName::try_from(HTTPS_DOMAIN).expect("name");
            let tls = timeout(Duration::from_secs(5), connector.connect(name, tcp))
                .await
                .ok()?
                .ok()?;
            Some(tokio_util::either::Either::Right(tls))
        }
    }
}

/// HTTP/2 with `SETTINGS_INITIAL_WINDOW_SIZE = 0`: one request, whose headers arrive and whose
/// body never can; PINGs are answered. Reconnects when the server closes.
async fn h2_zero_window(
    addr: SocketAddr,
    tls: Option<TlsConnector>,
    tally: Arc<StallTally>,
    until: Instant,
) {
    while let Some(io) = open_stream(addr, tls.as_ref(), None, until).await {
        tally.opened.fetch_add(1, Ordering::Relaxed);
        let Ok((sender, connection)) = h2::client::Builder::new()
            .initial_window_size(0)
            .handshake::<_, Bytes>(io)
            .await
        else {
            continue;
        };
        let mut connection = tokio::spawn(connection);
        let response = async {
            let (response, _) = sender
                .ready()
                .await
                .ok()?
                .send_request(h2_get(), true)
                .ok()?;
            response.await.ok()
        };
        let left = until.saturating_duration_since(Instant::now());
        let Ok(Some(response)) = timeout(left, response).await else {
            connection.abort();
            continue;
        };
        let _held = tally.stalled();
        let _unread = response.into_body();
        let left = until.saturating_duration_since(Instant::now());
        if timeout(left, &mut connection).await.is_ok() {
            tally.closed.fetch_add(1, Ordering::Relaxed);
        } else {
            connection.abort();
        }
    }
}

/// HTTP/1.1 with a 2 KiB receive buffer: 200 pipelined GETs at a time, never a byte read.
/// Stalled once a write blocks; closed when a write fails.
async fn h1_slow_reader(
    addr: SocketAddr,
    tls: Option<TlsConnector>,
    tally: Arc<StallTally>,
    until: Instant,
) {
    let batch = format!("GET /openid/v1/jwks HTTP/1.1\r\nHost: {HTTPS_DOMAIN}\r\n\r\n").repeat(200);
    while let Some(mut io) = open_stream(addr, tls.as_ref(), Some(2048), until).await {
        tally.opened.fetch_add(1, Ordering::Relaxed);
        let mut held = None;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            match timeout(
                left.min(Duration::from_millis(500)),
                io.write_all(batch.as_bytes()),
            )
            .await
            {
                Ok(Ok(())) => {}
                Err(_) => {
                    // Blocked: the server's answers fill both buffers and nobody reads them.
                    held.get_or_insert_with(|| tally.stalled());
                }
                Ok(Err(_)) => {
                    if held.is_some() {
                        tally.closed.fetch_add(1, Ordering::Relaxed);
                    }
                    break;
                }
            }
        }
    }
}

fn tls_connector(ca_pem: &str, alpn: &[u8]) -> TlsConnector {
    TlsConnector::from(tls_config(ca_pem, alpn))
}

/// H1 of the reliability review: clients that stop reading (HTTP/2 at window zero, HTTP/1.1
/// pipelining into a full receive buffer), twice `max_connections` of them on each public
/// listener, over TLS and plain. Each response that makes no progress ends its connection at
/// `send_timeout`, and at the cap a stalled one is dropped for a new client at once, so an
/// ordinary client beside them gets ≥ 99 % of its answers (rounded to whole requests), right,
/// within 2 s.
///
/// Long mode: `OIDC_EDGE_ABUSE_SECS=600 cargo test --release --test it stop_reading -- --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_stop_reading_cannot_hold_the_listeners() {
    install_crypto_provider();
    let _alone = ONE_AT_A_TIME.lock().await;
    let secs = env_or("OIDC_EDGE_ABUSE_SECS", 8);
    let cap = env_or("OIDC_EDGE_STALL_CAP", 20);
    let pki = Pki::new("test public CA");
    let scratch = Scratch::new();
    let config = TestConfig::https_files(&scratch, &pki.server_for(&[HTTPS_DOMAIN]))
        .set("log.access", false)
        .set("limits.max_connections", i64::try_from(cap).expect("cap"))
        .set("limits.send_timeout", "3s")
        .write(&scratch);
    let mut server = Binary::start(&config);
    let (https, http) = (server.listening("https"), server.addr);
    let pid = server.pid();
    let expected = Expected::fetch(http).await;
    let until = Instant::now() + Duration::from_secs(secs);
    let kinds = [
        ("h2 window 0 over TLS", https),
        ("h1 slow reader over TLS", https),
        ("h2c window 0", http),
        ("h1 slow reader", http),
    ];
    let tallies: Vec<Arc<StallTally>> = kinds.iter().map(|_| Arc::default()).collect();
    let mut attackers = Vec::new();
    for i in 0..cap {
        for (k, (_, addr)) in kinds.iter().enumerate() {
            let (addr, tally) = (*addr, Arc::clone(&tallies[k]));
            attackers.push(match k {
                0 => tokio::spawn(h2_zero_window(
                    addr,
                    Some(h2_connector(&pki.ca_pem)),
                    tally,
                    until,
                )),
                1 => tokio::spawn(h1_slow_reader(
                    addr,
                    Some(tls_connector(&pki.ca_pem, b"http/1.1")),
                    tally,
                    until,
                )),
                2 => tokio::spawn(h2_zero_window(addr, None, tally, until)),
                _ => tokio::spawn(h1_slow_reader(addr, None, tally, until)),
            });
        }
        if i % 10 == 9 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Let the stalled clients fill both listeners before the ordinary client starts.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let ordinary = ordinary_client(expected, pki.ca_pem.clone(), https, http, until).await;
    for attacker in attackers {
        attacker.await.expect("attacker");
    }
    let hwm = proc_status_kib(pid, "VmHWM");
    let scrape = scrape(server.admin).await;
    let closed = |listener: &str, reason: &str| {
        metric(
            &scrape,
            "oidc_edge_connections_closed_by_limit_total",
            &[("listener", listener), ("reason", reason)],
        )
    };

    let mut latencies = ordinary.latencies.clone();
    latencies.sort();
    let attempts = latencies.len() + ordinary.failures.len();
    let in_time = latencies
        .iter()
        .filter(|l| **l <= Duration::from_secs(2))
        .count();
    let t = |c: &AtomicU64| c.load(Ordering::Relaxed);
    for ((what, _), tally) in kinds.iter().zip(&tallies) {
        println!(
            "{what}: {} opened, {} stalled ({} at once at peak), {} of them closed by the server",
            t(&tally.opened),
            t(&tally.stalled),
            t(&tally.held.peak),
            t(&tally.closed)
        );
    }
    let reasons = [
        "send_timeout",
        "make_room",
        "close_deadline",
        "first_request_timeout",
        "refused_at_cap",
    ];
    for listener in ["https", "http"] {
        let figures: Vec<String> = reasons
            .iter()
            .map(|r| format!("{r} {}", closed(listener, r)))
            .collect();
        println!("{listener} listener closed: {}", figures.join(", "));
    }
    println!(
        "stop-reading attack for {secs} s, max_connections {cap}: ordinary client {attempts} requests, \
         {in_time} answered right within 2 s, {} failed, p50 {:?} p99 {:?} max {:?} (slowest fresh \
         HTTPS {:?}, kept-alive HTTPS {:?}, plain {:?}); server VmHWM {hwm} KiB",
        ordinary.failures.len(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or_default(),
        ordinary.slowest[0],
        ordinary.slowest[1],
        ordinary.slowest[2],
    );
    // At most 1 % missed, rounded up to a whole request: the 8 s debug run makes about 50
    // requests, where one reset (an idle kept-alive connection closed at the cap as the client
    // reuses it) is a sample, not a rate: CI saw 46 of 47 and 51 of 52. The long release mode
    // measures the rate (13 885 of 13 886 in 600 s, session 6).
    let missed = attempts - in_time;
    assert!(
        missed <= attempts.div_ceil(100),
        "only {in_time} of {attempts} answered within 2 s: {:#?}",
        ordinary.failures
    );
    // At least one request a second: its rate falls with the attackers' number (800 in the
    // long run of record: 4 a second, each waiting behind them in the accept queue).
    assert!(attempts as u64 >= secs, "the ordinary client barely ran");
    // Every attack happened: otherwise this test proves nothing.
    for ((what, _), tally) in kinds.iter().zip(&tallies) {
        assert!(t(&tally.stalled) > 0, "{what}: never stalled a connection");
        assert!(t(&tally.closed) > 0, "{what}: the server never closed one");
    }
    for listener in ["https", "http"] {
        assert!(
            closed(listener, "make_room") > 0.0,
            "{listener}: no room was made"
        );
    }
    assert!(hwm < PEAK_RSS_BOUND_KIB, "peak RSS {hwm} KiB");
}
