//! `[https.files]`: a PEM certificate chain and key (certbot, cert-manager, a corporate CA),
//! reloaded when the files change and on SIGHUP. A broken replacement keeps the current
//! certificate; open connections are never disturbed (the resolver is consulted per handshake).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Why a certificate and key could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct LoadError(pub String);

/// Reads and checks a certificate chain and its key.
pub fn load(cert_file: &Path, key_file: &Path) -> Result<CertifiedKey, LoadError> {
    let chain = CertificateDer::pem_file_iter(cert_file)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| LoadError(format!("{}: {e}", cert_file.display())))?;
    if chain.is_empty() {
        return Err(LoadError(format!(
            "{}: no PEM certificate",
            cert_file.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| LoadError(format!("{}: {e}", key_file.display())))?;
    let signing = rustls::crypto::aws_lc_rs::sign::any_supported_type(&key)
        .map_err(|e| LoadError(format!("{}: {e}", key_file.display())))?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|e| {
        LoadError(format!(
            "{} does not match the certificate in {}: {e}",
            key_file.display(),
            cert_file.display()
        ))
    })?;
    Ok(certified)
}

/// The current certificate, swapped whole on reload.
#[derive(Debug)]
pub struct FileCerts {
    cert_file: PathBuf,
    key_file: PathBuf,
    current: ArcSwap<CertifiedKey>,
    stamp: std::sync::Mutex<Option<(SystemTime, SystemTime)>>,
}

impl FileCerts {
    pub fn load(cert_file: &Path, key_file: &Path) -> Result<Self, LoadError> {
        let certified = load(cert_file, key_file)?;
        Ok(Self {
            cert_file: cert_file.to_owned(),
            key_file: key_file.to_owned(),
            current: ArcSwap::from_pointee(certified),
            stamp: std::sync::Mutex::new(stamps(cert_file, key_file)),
        })
    }

    /// The certificate now served.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current.load_full()
    }

    /// Reloads when a file's mtime changed (or always, with `force`). `Ok(true)`: swapped.
    pub fn reload(&self, force: bool) -> Result<bool, LoadError> {
        let now = stamps(&self.cert_file, &self.key_file);
        let mut seen = self.stamp.lock().expect("stamp lock");
        if !force && now == *seen {
            return Ok(false);
        }
        // Remember the stamp even on failure: a broken file is reported once, not every poll.
        *seen = now;
        let certified = load(&self.cert_file, &self.key_file)?;
        self.current.store(Arc::new(certified));
        Ok(true)
    }
}

fn stamps(cert: &Path, key: &Path) -> Option<(SystemTime, SystemTime)> {
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    Some((modified(cert)?, modified(key)?))
}

impl ResolvesServerCert for FileCerts {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

impl super::CertState for FileCerts {
    fn not_after(&self) -> Option<SystemTime> {
        self.current().cert.first().and_then(super::not_after)
    }
}
