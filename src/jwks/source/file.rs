//! `kind = "file"`: a JWKS file on disk.

use std::fs;
use std::path::PathBuf;
use std::time::SystemTime;

use super::{FetchError, Fetched, KeySource, read_capped};

/// `kind = "file"`: a JWKS file, re-read when its length, mtime or inode change.
#[derive(Debug)]
pub struct FileSource {
    path: PathBuf,
    seen: Option<FileStamp>,
}

/// What tells a changed file from an unchanged one without reading it: a rename gives a new
/// inode, a rewrite a new length or mtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FileStamp {
    len: u64,
    modified: Option<SystemTime>,
    inode: u64,
}

impl FileStamp {
    /// The stamp of the file at `path` (through symlinks, as Kubernetes volumes swap them),
    /// or `None` when it cannot be read.
    pub(crate) fn of(path: &std::path::Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt as _;
        let meta = fs::metadata(path).ok()?;
        Some(Self {
            len: meta.len(),
            modified: meta.modified().ok(),
            inode: meta.ino(),
        })
    }
}

impl FileSource {
    pub fn new(path: PathBuf) -> Self {
        Self { path, seen: None }
    }

    fn read(&mut self) -> Result<Fetched, FetchError> {
        use std::os::unix::fs::MetadataExt as _;
        let err = |source| FetchError::File {
            path: self.path.clone(),
            source,
        };
        let mut file = fs::File::open(&self.path).map_err(err)?;
        let meta = file.metadata().map_err(err)?;
        let stamp = FileStamp {
            len: meta.len(),
            modified: meta.modified().ok(),
            inode: meta.ino(),
        };
        if self.seen == Some(stamp) {
            return Ok(Fetched::Unchanged);
        }
        let body = read_capped(&mut file, &self.path)?;
        self.seen = Some(stamp);
        Ok(Fetched::Body {
            body,
            upstream_issuer: None,
        })
    }
}

impl KeySource for FileSource {
    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    async fn fetch_key_set(&mut self) -> Result<Fetched, FetchError> {
        // A JWKS file is small and local; reading it inline is cheaper than a blocking-pool hop.
        self.read()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jwks::source::MAX_BODY_BYTES;

    #[tokio::test]
    async fn file_is_reread_only_when_it_changes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("jwks.json");
        fs::write(&path, b"{\"keys\":[]}").expect("write");
        let mut source = FileSource::new(path.clone());
        assert!(
            matches!(source.fetch_key_set().await, Ok(Fetched::Body { body: b, .. }) if b.as_ref() == b"{\"keys\":[]}")
        );
        assert!(matches!(
            source.fetch_key_set().await,
            Ok(Fetched::Unchanged)
        ));
        // A replacement by rename (what editors and config managers do) has a new inode.
        let next = dir.path().join("next.json");
        fs::write(&next, b"{\"keys\":[1]}").expect("write");
        fs::rename(&next, &path).expect("rename");
        assert!(
            matches!(source.fetch_key_set().await, Ok(Fetched::Body { body: b, .. }) if b.as_ref() == b"{\"keys\":[1]}")
        );
    }

    #[tokio::test]
    async fn missing_and_oversized_files_are_errors_naming_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("jwks.json");
        let mut source = FileSource::new(path.clone());
        let err = source
            .fetch_key_set()
            .await
            .expect_err("missing")
            .to_string();
        assert!(
            err.starts_with(&format!("{}: No such file", path.display())),
            "{err}"
        );
        fs::write(&path, vec![b' '; MAX_BODY_BYTES as usize + 1]).expect("write");
        let err = source.fetch_key_set().await.expect_err("large").to_string();
        assert_eq!(
            err,
            format!("{} is larger than 1048576 bytes", path.display())
        );
    }
}
