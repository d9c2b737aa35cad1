//! `[https.files]`: a PEM certificate chain and key (certbot, cert-manager, a corporate CA),
//! reloaded when the files change and on SIGHUP. A broken replacement keeps the current
//! certificate; open connections are never disturbed (the resolver is consulted per handshake).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::metrics::Metrics;

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
    stamps: std::sync::Mutex<Stamps>,
}

/// What a file looked like: length, mtime and inode, as `FileSource` keys on (L15). Linux
/// mtimes are coarse, so a rewrite within one tick keeps the mtime; it rarely keeps the
/// length too, and an atomic rename always changes the inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: SystemTime,
    inode: u64,
}

#[derive(Debug, Default)]
struct Stamps {
    /// The files of the certificate served now.
    loaded: Option<(Stamp, Stamp)>,
    /// The files of the last failed load: reported once, but retried on every poll.
    failed: Option<Option<(Stamp, Stamp)>>,
}

impl FileCerts {
    pub fn load(cert_file: &Path, key_file: &Path) -> Result<Self, LoadError> {
        let certified = load(cert_file, key_file)?;
        Ok(Self {
            cert_file: cert_file.to_owned(),
            key_file: key_file.to_owned(),
            current: ArcSwap::from_pointee(certified),
            stamps: std::sync::Mutex::new(Stamps {
                loaded: stamps(cert_file, key_file),
                failed: None,
            }),
        })
    }

    /// The certificate now served.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current.load_full()
    }

    /// Reloads when a file changed since the certificate served now was loaded (or always,
    /// with `force`). `Ok(true)`: swapped. A failed load is retried on every call (L15: the
    /// file may have been read half-written, and its final write may keep every stamp), but
    /// reported only once per state of the files.
    pub fn reload(&self, force: bool) -> Result<bool, LoadError> {
        let now = stamps(&self.cert_file, &self.key_file);
        let mut seen = self.stamps.lock().expect("stamp lock");
        if !force && now.is_some() && now == seen.loaded {
            return Ok(false);
        }
        match load(&self.cert_file, &self.key_file) {
            Ok(certified) => {
                self.current.store(Arc::new(certified));
                *seen = Stamps {
                    loaded: now,
                    failed: None,
                };
                Ok(true)
            }
            Err(e) => {
                let reported = !force && seen.failed == Some(now);
                seen.failed = Some(now);
                if reported { Ok(false) } else { Err(e) }
            }
        }
    }
}

/// How often certificate files are checked for changes.
const POLL: Duration = Duration::from_secs(2);

impl FileCerts {
    /// Loads the files and records the certificate's expiry in the metrics.
    pub fn load_observed(
        cert_file: &Path,
        key_file: &Path,
        metrics: &Metrics,
    ) -> Result<Self, LoadError> {
        let certs = Self::load(cert_file, key_file)?;
        certs.observe(metrics);
        Ok(certs)
    }

    /// Reloads the files when they change, until `cancel` fires.
    pub async fn watch(self: Arc<Self>, metrics: Arc<Metrics>, cancel: CancellationToken) {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(POLL) => self.reload_logged(&metrics, false),
            }
        }
    }

    /// [`Self::reload`], logged; a failure keeps the certificate served now. `force` (SIGHUP)
    /// reloads even unchanged files.
    pub fn reload_logged(&self, metrics: &Metrics, force: bool) {
        match self.reload(force) {
            Ok(true) => {
                self.observe(metrics);
                info!("certificate files reloaded");
            }
            Ok(false) => {}
            Err(e) => {
                error!(error = %e, "certificate files not reloaded; still serving the previous certificate")
            }
        }
    }

    fn observe(&self, metrics: &Metrics) {
        if let Some(not_after) = self.current().cert.first().and_then(super::not_after) {
            metrics.set_cert_not_after("https", not_after);
        }
    }
}

fn stamps(cert: &Path, key: &Path) -> Option<(Stamp, Stamp)> {
    use std::os::unix::fs::MetadataExt as _;
    let stamp = |p: &Path| {
        let meta = std::fs::metadata(p).ok()?;
        Some(Stamp {
            len: meta.len(),
            modified: meta.modified().ok()?,
            inode: meta.ino(),
        })
    };
    Some((stamp(cert)?, stamp(key)?))
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    struct Pair {
        cert: String,
        key: String,
    }

    fn pair() -> Pair {
        let key = rcgen::KeyPair::generate().expect("key");
        let params =
            rcgen::CertificateParams::new(vec!["oidc.example.com".to_owned()]).expect("params");
        Pair {
            cert: params.self_signed(&key).expect("cert").pem(),
            key: key.serialize_pem(),
        }
    }

    /// Writes `bytes` with the modification time `mtime`: in place (same inode) or by rename.
    fn write(path: &Path, bytes: &[u8], mtime: SystemTime, in_place: bool) {
        let target = if in_place {
            path.to_owned()
        } else {
            path.with_extension("new")
        };
        std::fs::write(&target, bytes).expect("write");
        std::fs::File::options()
            .write(true)
            .open(&target)
            .and_then(|f| f.set_modified(mtime))
            .expect("set mtime");
        if !in_place {
            std::fs::rename(&target, path).expect("rename");
        }
    }

    fn served(certs: &FileCerts) -> Vec<u8> {
        certs.current().cert[0].to_vec()
    }

    fn der(pem: &str) -> Vec<u8> {
        CertificateDer::from_pem_slice(pem.as_bytes())
            .expect("der")
            .to_vec()
    }

    /// L15: a half-written file read once is retried, and changes that keep the mtime (coarse
    /// timestamps) are still seen through the length and the inode.
    #[test]
    fn reload_retries_a_failed_load_and_keys_on_length_and_inode() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert_file, key_file) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let a = pair();
        write(&cert_file, a.cert.as_bytes(), t, true);
        write(&key_file, a.key.as_bytes(), t, true);
        let certs = FileCerts::load(&cert_file, &key_file).expect("load");
        assert_eq!(served(&certs), der(&a.cert));

        // `cat > cert.pem` caught mid-write: same length, mtime and inode as the final file
        // (mtimes are coarse: the last write lands in the same tick).
        let t = t + Duration::from_secs(60);
        let b = pair();
        write(&key_file, b.key.as_bytes(), t, true);
        let mut torn = b.cert.clone().into_bytes();
        torn[40..80].fill(b'!');
        write(&cert_file, &torn, t, true);
        assert!(certs.reload(false).is_err());
        assert_eq!(certs.reload(false), Ok(false), "retried, reported once");
        assert_eq!(
            served(&certs),
            der(&a.cert),
            "the previous certificate stays"
        );
        write(&cert_file, b.cert.as_bytes(), t, true);
        assert_eq!(certs.reload(false), Ok(true), "retried without SIGHUP");
        assert_eq!(served(&certs), der(&b.cert));
        assert_eq!(certs.reload(false), Ok(false), "nothing changed since");

        // Same mtime and inode, another length.
        let c = pair();
        write(&key_file, c.key.as_bytes(), t, true);
        write(&cert_file, format!("{}\n\n", c.cert).as_bytes(), t, true);
        assert_eq!(certs.reload(false), Ok(true));
        assert_eq!(served(&certs), der(&c.cert));

        // Same mtime and length, another inode (an atomic rename).
        let d = pair();
        let padded = format!("{:\n<width$}", d.cert, width = c.cert.len() + 2);
        write(&key_file, d.key.as_bytes(), t, false);
        write(&cert_file, padded.as_bytes(), t, false);
        assert_eq!(certs.reload(false), Ok(true));
        assert_eq!(served(&certs), der(&d.cert));
    }
}
