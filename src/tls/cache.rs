//! The ACME cache under `state.dir/acme`: the account key and the certificate (with its private
//! key). Unlike rustls-acme's `DirCache`, which writes 0644 files in place (crates-and-acme
//! gotcha 6), the directory is 0700 and every file is written 0600, atomically, so a crash
//! mid-write never leaves a file that breaks the next start.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use aws_lc_rs::digest;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rustls_acme::{AccountCache, CertCache};

use crate::state::{create_state_dir, write_atomic};

/// Cheap to clone: every `AcmeState` the driver builds gets a clone (M1), and they share
/// what the driver reads back.
#[derive(Debug, Clone)]
pub struct AcmeCache {
    dir: PathBuf,
    /// The certificate last loaded or stored (the private key, then the chain): the driver
    /// serves it through its stable resolver (M1).
    latest_cert: Arc<Mutex<Option<Arc<Vec<u8>>>>>,
    /// Writes that failed, by file name, until a retry succeeds (S6). Loads see them first,
    /// so a rebuilt `AcmeState` finds the certificate it would have found on disk.
    pending: Arc<Mutex<BTreeMap<String, Vec<u8>>>>,
}

impl AcmeCache {
    /// Creates `dir` 0700 when missing.
    pub fn new(dir: PathBuf) -> io::Result<Self> {
        create_state_dir(&dir).map_err(io::Error::other)?;
        Ok(Self {
            dir,
            latest_cert: Arc::default(),
            pending: Arc::default(),
        })
    }

    /// The certificate last loaded from or stored to the cache.
    pub fn latest_cert(&self) -> Option<Arc<Vec<u8>>> {
        self.latest_cert.lock().expect("cache lock").clone()
    }

    /// Names depend on the directory URL, so staging and production never mix.
    fn file_name(prefix: &str, parts: &[String], directory_url: &str) -> String {
        let mut ctx = digest::Context::new(&digest::SHA256);
        for part in parts {
            ctx.update(part.as_bytes());
            ctx.update(&[0]);
        }
        ctx.update(directory_url.as_bytes());
        let mut name = String::from(prefix);
        let _ = write!(name, "{}", URL_SAFE_NO_PAD.encode(ctx.finish().as_ref()));
        name
    }

    /// Whether a failed write awaits [`AcmeCache::retry_pending`].
    pub fn has_pending(&self) -> bool {
        !self.pending.lock().expect("cache lock").is_empty()
    }

    /// Tries every failed write again (S6). Returns the kinds stored now (`certificate`,
    /// `account`), or the first error.
    pub async fn retry_pending(&self) -> io::Result<Vec<&'static str>> {
        let pending: Vec<(String, Vec<u8>)> = self
            .pending
            .lock()
            .expect("cache lock")
            .iter()
            .map(|(name, bytes)| (name.clone(), bytes.clone()))
            .collect();
        let mut stored = Vec::new();
        for (name, bytes) in pending {
            self.write(name.clone(), &bytes).await?;
            let mut pending = self.pending.lock().expect("cache lock");
            // Unless a newer write of the same file failed meanwhile.
            if pending.get(&name) == Some(&bytes) {
                pending.remove(&name);
            }
            stored.push(if name.starts_with("cert-") {
                "certificate"
            } else {
                "account"
            });
        }
        Ok(stored)
    }

    async fn read(&self, name: String) -> io::Result<Option<Vec<u8>>> {
        if let Some(bytes) = self.pending.lock().expect("cache lock").get(&name) {
            return Ok(Some(bytes.clone()));
        }
        let path = self.dir.join(name);
        tokio::task::spawn_blocking(move || match std::fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        })
        .await
        .map_err(io::Error::other)?
    }

    async fn write(&self, name: String, bytes: &[u8]) -> io::Result<()> {
        let path = self.dir.join(&name);
        let owned = bytes.to_owned();
        let written = tokio::task::spawn_blocking(move || write_atomic(&path, &owned))
            .await
            .map_err(io::Error::other)?;
        let mut pending = self.pending.lock().expect("cache lock");
        match &written {
            Ok(()) => pending.remove(&name),
            Err(_) => pending.insert(name, bytes.to_owned()),
        };
        written
    }

    fn observe(&self, pem: &[u8]) {
        *self.latest_cert.lock().expect("cache lock") = Some(Arc::new(pem.to_owned()));
    }
}

#[async_trait]
impl CertCache for AcmeCache {
    type EC = io::Error;

    async fn load_cert(
        &self,
        domains: &[String],
        directory_url: &str,
    ) -> Result<Option<Vec<u8>>, io::Error> {
        let cert = self
            .read(Self::file_name("cert-", domains, directory_url))
            .await?;
        if let Some(pem) = &cert {
            self.observe(pem);
        }
        Ok(cert)
    }

    async fn store_cert(
        &self,
        domains: &[String],
        directory_url: &str,
        cert: &[u8],
    ) -> Result<(), io::Error> {
        // rustls-acme deployed it before storing it: it is served whether or not this write
        // succeeds.
        self.observe(cert);
        self.write(Self::file_name("cert-", domains, directory_url), cert)
            .await
    }
}

#[async_trait]
impl AccountCache for AcmeCache {
    type EA = io::Error;

    async fn load_account(
        &self,
        contact: &[String],
        directory_url: &str,
    ) -> Result<Option<Vec<u8>>, io::Error> {
        self.read(Self::file_name("account-", contact, directory_url))
            .await
    }

    async fn store_account(
        &self,
        contact: &[String],
        directory_url: &str,
        account: &[u8],
    ) -> Result<(), io::Error> {
        self.write(Self::file_name("account-", contact, directory_url), account)
            .await
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[tokio::test]
    async fn files_are_0600_in_a_0700_directory_and_round_trip() {
        let state = tempfile::tempdir().expect("tempdir");
        let dir = state.path().join("acme");
        let cache = AcmeCache::new(dir.clone()).expect("cache");
        let mode =
            |p: &std::path::Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        let domains = vec!["oidc.example.com".to_owned()];
        let url = "https://acme.example/dir";
        assert_eq!(cache.load_cert(&domains, url).await.expect("load"), None);
        cache
            .store_cert(&domains, url, b"pem")
            .await
            .expect("store");
        cache
            .store_account(&domains, url, b"key")
            .await
            .expect("store");
        assert_eq!(
            cache
                .load_cert(&domains, url)
                .await
                .expect("load")
                .as_deref(),
            Some(&b"pem"[..])
        );
        assert_eq!(
            cache
                .load_account(&domains, url)
                .await
                .expect("load")
                .as_deref(),
            Some(&b"key"[..])
        );
        assert_eq!(
            cache
                .load_cert(&domains, "https://other/dir")
                .await
                .expect("load"),
            None
        );
        for entry in std::fs::read_dir(&dir).expect("read_dir") {
            let path = entry.expect("entry").path();
            assert_eq!(mode(&path), 0o600, "{}", path.display());
        }
    }

    /// S6: a failed write stays pending, loads see it, and a retry stores it.
    #[tokio::test]
    async fn a_failed_write_is_seen_by_loads_and_stored_by_a_retry() {
        let state = tempfile::tempdir().expect("tempdir");
        let dir = state.path().join("acme");
        let cache = AcmeCache::new(dir.clone()).expect("cache");
        let domains = vec!["oidc.example.com".to_owned()];
        let url = "https://acme.example/dir";
        let name = AcmeCache::file_name("cert-", &domains, url);
        // write_atomic's temporary file cannot be renamed onto a non-empty directory.
        let blocker = dir.join(&name);
        std::fs::create_dir_all(blocker.join("x")).expect("blocker");
        assert!(cache.store_cert(&domains, url, b"pem").await.is_err());
        assert!(cache.has_pending());
        assert_eq!(
            cache
                .load_cert(&domains, url)
                .await
                .expect("load")
                .as_deref(),
            Some(&b"pem"[..])
        );
        assert!(cache.retry_pending().await.is_err());
        assert!(cache.has_pending());
        std::fs::remove_dir_all(&blocker).expect("unblock");
        assert_eq!(cache.retry_pending().await.expect("retry"), ["certificate"]);
        assert!(!cache.has_pending());
        assert_eq!(std::fs::read(dir.join(&name)).expect("stored"), b"pem");
    }
}
