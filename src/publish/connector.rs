//! The HTTP client object_store uses for a target: Mozilla's roots compiled in (plus the
//! target's `ca_file`), like every other "publicly trusted" in oidc-edge (L9). object_store's
//! own client trusts the system store through rustls-platform-verifier, which has nothing to
//! load in the scratch image: there every publish would fail before the first request.

use std::sync::Arc;
use std::time::Duration;

use object_store::client::{HttpClient, HttpConnector};
use object_store::{ClientConfigKey, ClientOptions};
use rustls::RootCertStore;

use crate::jwks::source::remote::tls_config;

#[derive(Debug)]
pub(super) struct PublicRoots {
    roots: Arc<RootCertStore>,
    timeout: Duration,
    connect_timeout: Duration,
}

impl PublicRoots {
    /// Mozilla's roots, and `extra` (PEM certificates).
    pub(super) fn new(
        extra: Option<&[u8]>,
        timeout: Duration,
        connect_timeout: Duration,
    ) -> Result<Self, String> {
        use rustls_pki_types::CertificateDer;
        use rustls_pki_types::pem::PemObject as _;
        let mut roots = crate::roots::public();
        if let Some(pem) = extra {
            let mut added = 0;
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| format!("not valid PEM: {e}"))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("not a CA certificate: {e}"))?;
                added += 1;
            }
            if added == 0 {
                return Err("contains no PEM certificate".to_owned());
            }
        }
        Ok(Self {
            roots: Arc::new(roots),
            timeout,
            connect_timeout,
        })
    }
}

impl PublicRoots {
    /// Mozilla's roots and the extra CA.
    pub(super) fn roots(&self) -> &Arc<RootCertStore> {
        &self.roots
    }

    /// A client that fetches as a relying party does: the same roots, no proxy, no
    /// redirects, no decompression, `timeout` for the whole fetch.
    pub(super) fn relying_party(&self, timeout: Duration) -> Result<reqwest::Client, String> {
        reqwest::Client::builder()
            .user_agent(concat!("oidc-edge/", env!("CARGO_PKG_VERSION")))
            .tls_backend_preconfigured(tls_config(Arc::clone(&self.roots)))
            .timeout(timeout)
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| e.to_string())
    }
}

impl HttpConnector for PublicRoots {
    fn connect(&self, options: &ClientOptions) -> object_store::Result<HttpClient> {
        // object_store turns plain HTTP off for token exchanges (STS) whatever the target says.
        let allow_http = options
            .get_config_value(&ClientConfigKey::AllowHttp)
            .is_some_and(|v| v == "true");
        let client = reqwest::Client::builder()
            .user_agent(concat!("oidc-edge/", env!("CARGO_PKG_VERSION")))
            .tls_backend_preconfigured(tls_config(Arc::clone(&self.roots)))
            .timeout(self.timeout)
            .connect_timeout(self.connect_timeout)
            // As object_store's own client: HTTP/1.1, and no redirects to follow blindly.
            .http1_only()
            .redirect(reqwest::redirect::Policy::none())
            .https_only(!allow_http)
            .build()
            .map_err(|e| object_store::Error::Generic {
                store: "HTTP",
                source: Box::new(e),
            })?;
        Ok(HttpClient::new(client))
    }
}
