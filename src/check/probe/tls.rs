//! TLS facts as a relying party sees them: which protocol versions the server offers, the
//! chain it presents (in order), whether that chain is trusted, and AWS's thumbprint.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_lc_rs::digest;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// What one TLS probe of a host learned.
#[derive(Debug, Clone)]
pub struct TlsFacts {
    pub tls12: bool,
    pub tls13: bool,
    /// The chain as presented, leaf first (DER).
    pub chain: Vec<Vec<u8>>,
    /// `Ok` when the chain verifies against the roots for the host name.
    pub trusted: Result<(), String>,
    /// Why no handshake completed at all, when none did.
    pub unreachable: Option<String>,
}

/// Records the presented chain and the verdict of a real verifier, then lets the handshake
/// finish either way, so that protocol support is learned even from an untrusted server.
#[derive(Debug)]
struct Recorder {
    inner: Arc<WebPkiServerVerifier>,
    seen: Mutex<Option<Seen>>,
}

/// The presented chain (leaf first) and the real verifier's verdict.
type Seen = (Vec<Vec<u8>>, Result<(), String>);

impl ServerCertVerifier for Recorder {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verdict = self
            .inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
            .map(drop)
            .map_err(|e| e.to_string());
        let chain = std::iter::once(end_entity)
            .chain(intermediates)
            .map(|c| c.to_vec())
            .collect();
        *self.seen.lock().expect("recorder lock") = Some((chain, verdict));
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The trust a relying party has: Mozilla's roots, or the given CA.
pub fn roots(ca_pem: Option<&[u8]>) -> anyhow::Result<Arc<RootCertStore>> {
    let roots = match ca_pem {
        Some(pem) => {
            use rustls::pki_types::pem::PemObject as _;
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(pem) {
                roots.add(cert?)?;
            }
            roots
        }
        None => crate::roots::public(),
    };
    Ok(Arc::new(roots))
}

/// Probes `host` at `addr` once with TLS 1.2 only and once with TLS 1.3 only.
pub async fn probe(host: &str, addr: SocketAddr, roots: Arc<RootCertStore>) -> TlsFacts {
    let mut facts = TlsFacts {
        tls12: false,
        tls13: false,
        chain: Vec::new(),
        trusted: Err("no handshake completed".to_owned()),
        unreachable: None,
    };
    for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
        let verifier = Arc::new(Recorder {
            inner: WebPkiServerVerifier::builder(Arc::clone(&roots))
                .build()
                .expect("roots are not empty"),
            seen: Mutex::new(None),
        });
        let mut config = ClientConfig::builder_with_protocol_versions(&[version])
            .dangerous()
            .with_custom_certificate_verifier(Arc::clone(&verifier) as Arc<dyn ServerCertVerifier>)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let name = match ServerName::try_from(host.to_owned()) {
            Ok(name) => name,
            Err(e) => {
                facts.unreachable = Some(format!("{host:?} is not a server name: {e}"));
                return facts;
            }
        };
        let attempt = async {
            let tcp = TcpStream::connect(addr)
                .await
                .map_err(|e| format!("connect {addr}: {e}"))?;
            TlsConnector::from(Arc::new(config))
                .connect(name, tcp)
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        };
        let outcome = tokio::time::timeout(Duration::from_secs(5), attempt)
            .await
            .unwrap_or_else(|_| Err("timed out after 5 s".to_owned()));
        match outcome {
            Ok(()) => {
                if version == &rustls::version::TLS12 {
                    facts.tls12 = true;
                } else {
                    facts.tls13 = true;
                }
                if let Some((chain, verdict)) = verifier.seen.lock().expect("recorder lock").take()
                {
                    facts.chain = chain;
                    facts.trusted = verdict;
                }
                facts.unreachable = None;
            }
            Err(e) if !facts.tls12 && !facts.tls13 => facts.unreachable = Some(e),
            Err(_) => {}
        }
    }
    facts
}

/// AWS's thumbprint: SHA-1 of the last certificate the server presents, the top intermediate
/// ("the last certificate displayed" by `openssl s_client -showcerts`, A-8b), 40 hex digits.
pub fn aws_thumbprint(chain: &[Vec<u8>]) -> Option<String> {
    let top = chain.last()?;
    let hash = digest::digest(&digest::SHA1_FOR_LEGACY_USE_ONLY, top);
    Some(hash.as_ref().iter().map(|b| format!("{b:02x}")).collect())
}

/// A-8c: leaf first, each certificate issued by the next, no duplicates. `Err` says where.
pub fn chain_order(chain: &[Vec<u8>]) -> Result<(), String> {
    let parsed: Vec<_> = chain
        .iter()
        .map(|der| x509_parser::parse_x509_certificate(der).map(|(_, c)| c))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("a certificate does not parse: {e}"))?;
    for (i, pair) in parsed.windows(2).enumerate() {
        if pair[0].issuer() != pair[1].subject() {
            return Err(format!(
                "certificate {i} ({}) is not issued by certificate {} ({})",
                pair[0].subject(),
                i + 1,
                pair[1].subject()
            ));
        }
    }
    for (i, der) in chain.iter().enumerate() {
        if chain[..i].contains(der) {
            return Err(format!("certificate {i} appears twice"));
        }
    }
    Ok(())
}

/// Days until the leaf expires (negative when expired).
pub fn days_left(chain: &[Vec<u8>]) -> Option<i64> {
    let (_, leaf) = x509_parser::parse_x509_certificate(chain.first()?).ok()?;
    let not_after = leaf.validity().not_after.timestamp();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_secs();
    Some((not_after - i64::try_from(now).ok()?).div_euclid(86_400))
}
