//! What "publicly trusted" means everywhere in oidc-edge: Mozilla's roots (webpki-roots),
//! compiled in, plus the CA certificates a build adds with `OIDC_EDGE_EXTRA_ROOTS` (build.rs;
//! the container image's `EXTRA_ROOTS_PEM` build argument). Never the system store (L9): the
//! scratch image has none, and a host's store would make the same binary trust differently
//! on different machines.

use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;

/// The PEM build.rs checked and copied; empty when the build added nothing.
const EXTRA_ROOTS_PEM: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/extra-roots.pem"));

/// Mozilla's roots and the build's own.
pub fn public() -> RootCertStore {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for cert in CertificateDer::pem_slice_iter(EXTRA_ROOTS_PEM) {
        // build.rs parsed each one as a trust anchor, so neither step can fail here.
        let cert = cert.expect("build.rs checked the PEM");
        roots.add(cert).expect("build.rs checked the root");
    }
    roots
}

/// How many roots the build added to Mozilla's (`--version` says so).
pub fn extra_count() -> usize {
    CertificateDer::pem_slice_iter(EXTRA_ROOTS_PEM).count()
}
