//! Deliberately broken issuers for the doctor: an HTTPS server whose every answer, header and
//! TLS setting the test chooses (content types, redirects, TLS 1.3 only, expired certificates).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::Response;
use http_body_util::Full;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use super::pki::Leaf;

/// One canned answer.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Answer {
    pub fn json(body: impl Into<String>) -> Self {
        Self {
            status: 200,
            headers: vec![("content-type".into(), "application/json".into())],
            body: body.into(),
        }
    }
}

pub struct BrokenSite {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl BrokenSite {
    /// Serves `answers` by path over TLS with `leaf`; `tls13_only` refuses TLS 1.2.
    pub async fn start(answers: HashMap<String, Answer>, leaf: &Leaf, tls13_only: bool) -> Self {
        crate::support::install_crypto_provider();
        let chain = CertificateDer::pem_slice_iter(leaf.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .expect("chain");
        let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).expect("key");
        let versions: &[&rustls::SupportedProtocolVersion] = if tls13_only {
            &[&rustls::version::TLS13]
        } else {
            &[&rustls::version::TLS13, &rustls::version::TLS12]
        };
        let mut config = rustls::ServerConfig::builder_with_protocol_versions(versions)
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("server config");
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let answers = Arc::new(answers);
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, answers) = (acceptor.clone(), Arc::clone(&answers));
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let answers = Arc::clone(&answers);
                            async move {
                                let answer =
                                    answers.get(req.uri().path()).cloned().unwrap_or(Answer {
                                        status: 404,
                                        headers: Vec::new(),
                                        body: "not found".into(),
                                    });
                                let mut response = Response::builder().status(answer.status);
                                for (name, value) in &answer.headers {
                                    response = response.header(name, value);
                                }
                                Ok::<_, Infallible>(
                                    response
                                        .body(Full::new(Bytes::from(answer.body)))
                                        .expect("response"),
                                )
                            }
                        },
                    );
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
                });
            }
        });
        Self { addr, task }
    }
}

impl Drop for BrokenSite {
    fn drop(&mut self) {
        self.task.abort();
    }
}
