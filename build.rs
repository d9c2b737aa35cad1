//! Roots a build adds to Mozilla's (the container image's `EXTRA_ROOTS_PEM` build argument,
//! a corporate or private CA): `OIDC_EDGE_EXTRA_ROOTS` names a PEM file of CA certificates,
//! compiled in beside webpki-roots, the same way as those. Unset, nothing is added.

use std::path::PathBuf;

fn main() {
    println!("cargo::rerun-if-env-changed=OIDC_EDGE_EXTRA_ROOTS");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"))
        .join("extra-roots.pem");
    let pem = match std::env::var_os("OIDC_EDGE_EXTRA_ROOTS").filter(|p| !p.is_empty()) {
        Some(path) => {
            let path = PathBuf::from(path);
            println!("cargo::rerun-if-changed={}", path.display());
            let pem = std::fs::read(&path)
                .unwrap_or_else(|e| panic!("OIDC_EDGE_EXTRA_ROOTS={}: {e}", path.display()));
            check(&pem).unwrap_or_else(|e| panic!("OIDC_EDGE_EXTRA_ROOTS={}: {e}", path.display()));
            pem
        }
        None => Vec::new(),
    };
    std::fs::write(&out, pem).expect("write OUT_DIR/extra-roots.pem");
}

/// Every PEM section a CA certificate that rustls can take as a root: a bad file fails the
/// build, never a fetch in production.
fn check(pem: &[u8]) -> Result<(), String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject as _;
    let mut count = 0;
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| format!("not valid PEM: {e}"))?;
        webpki::anchor_from_trusted_cert(&cert)
            .map_err(|e| format!("certificate {} is not a usable root: {e:?}", count + 1))?;
        count += 1;
    }
    if count == 0 {
        return Err("contains no PEM certificate".to_owned());
    }
    Ok(())
}
