//! A tap between a publisher and a real S3 store (SeaweedFS): it passes each request through
//! and records its method, path and headers, so that tests see what went on the wire (the
//! order of writes, that an unchanged document is not rewritten, that no header trips R2).
//! It can also answer as a failing store does, which a real store cannot be made to do on
//! demand: S3's own 500 `InternalError` body, or a request that never gets an answer.
//!
//! One request per upstream connection (`Connection: close` is added), so responses are
//! copied through to their end without being parsed.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the tap does with the next requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// To the store and back.
    Pass,
    /// `500 InternalError`, as S3 answers when it has a problem.
    Fail500,
    /// Read the request, never answer.
    Hang,
}

/// One request as the publisher sent it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    /// Lowercased names.
    pub headers: Vec<(String, String)>,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Debug)]
pub struct S3Tap {
    pub addr: SocketAddr,
    mode: Arc<Mutex<Mode>>,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
}

const S3_INTERNAL_ERROR: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>InternalError</Code><Message>We encountered an internal error. Please try again.</Message></Error>";

impl S3Tap {
    pub fn start(store: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        listener.set_nonblocking(true).expect("nonblocking");
        let tap = Self {
            addr,
            mode: Arc::new(Mutex::new(Mode::Pass)),
            seen: Arc::default(),
            stop: Arc::default(),
        };
        let (mode, seen, stop) = (
            Arc::clone(&tap.mode),
            Arc::clone(&tap.seen),
            Arc::clone(&tap.stop),
        );
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        conn.set_nonblocking(false).expect("blocking");
                        let (mode, seen, stop) =
                            (Arc::clone(&mode), Arc::clone(&seen), Arc::clone(&stop));
                        std::thread::spawn(move || serve(conn, store, &mode, &seen, &stop));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        tap
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.mode.lock().expect("mode") = mode;
    }

    /// Every request so far, and forget them.
    pub fn take(&self) -> Vec<Seen> {
        std::mem::take(&mut *self.seen.lock().expect("seen"))
    }
}

impl Drop for S3Tap {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// The PUTs among `seen`, as `PUT path`.
pub fn puts(seen: &[Seen]) -> Vec<String> {
    seen.iter()
        .filter(|s| s.method == "PUT")
        .map(|s| format!("PUT {}", s.path))
        .collect()
}

fn serve(
    client: TcpStream,
    store: SocketAddr,
    mode: &Mutex<Mode>,
    seen: &Mutex<Vec<Seen>>,
    stop: &AtomicBool,
) {
    let mut reader = BufReader::new(client.try_clone().expect("clone"));
    let mut client = client;
    loop {
        let mut head = Vec::new();
        loop {
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let end = line == "\r\n";
            head.push(line);
            if end {
                break;
            }
        }
        let mut request_line = head[0].split_whitespace();
        let method = request_line.next().unwrap_or_default().to_owned();
        let path = request_line.next().unwrap_or_default().to_owned();
        let headers: Vec<(String, String)> = head[1..head.len() - 1]
            .iter()
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let seen_request = Seen {
            method,
            path,
            headers,
        };
        assert!(
            seen_request.header("transfer-encoding").is_none(),
            "the tap reads Content-Length bodies only: {seen_request:?}"
        );
        let length: usize = seen_request
            .header("content-length")
            .map_or(0, |v| v.parse().expect("content-length"));
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        seen.lock().expect("seen").push(seen_request);
        // Copied out: the lock must not be held while hanging.
        let current = *mode.lock().expect("mode");
        match current {
            Mode::Pass => {}
            Mode::Fail500 => {
                let answer = format!(
                    "HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\r\n{S3_INTERNAL_ERROR}",
                    S3_INTERNAL_ERROR.len()
                );
                if client.write_all(answer.as_bytes()).is_err() {
                    return;
                }
                continue;
            }
            Mode::Hang => {
                while !stop.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(20));
                }
                return;
            }
        }
        let Ok(mut upstream) = TcpStream::connect(store) else {
            return;
        };
        let mut forwarded = String::new();
        for line in &head[..head.len() - 1] {
            if !line.to_ascii_lowercase().starts_with("connection:") {
                forwarded.push_str(line);
            }
        }
        forwarded.push_str("Connection: close\r\n\r\n");
        if upstream.write_all(forwarded.as_bytes()).is_err() || upstream.write_all(&body).is_err() {
            return;
        }
        let _ = std::io::copy(&mut upstream, &mut client);
        // The store closed its side after one response: so does the tap.
        let _ = client.shutdown(Shutdown::Both);
        return;
    }
}

/// TLS in front of a plain endpoint, with `leaf` (for 127.0.0.1): the STS that object_store
/// asks for web-identity credentials must be https (s3-publish-facts §1), and SeaweedFS's
/// STS listens on plain HTTP. Bytes are copied both ways; stops with its runtime's task.
#[derive(Debug)]
pub struct TlsFront {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl TlsFront {
    pub async fn start(target: SocketAddr, leaf: &super::pki::Leaf) -> Self {
        use rustls_pki_types::pem::PemObject as _;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        let chain = CertificateDer::pem_slice_iter(leaf.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .expect("chain");
        let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).expect("key");
        let tls = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    let Ok(mut plain) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                });
            }
        });
        Self { addr, task }
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}
