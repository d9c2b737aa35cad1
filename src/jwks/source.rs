//! Where key sets come from. Each source yields raw bytes; validation happens once, downstream.

use std::fs;
use std::io::{self, Read as _};
use std::path::PathBuf;
use std::time::SystemTime;

use bytes::Bytes;

/// No JWK set of a real cluster comes near this; a bigger answer is refused unread (DESIGN §4).
pub const MAX_BODY_BYTES: u64 = 1024 * 1024;

/// What one fetch produced.
#[derive(Debug)]
pub enum Fetched {
    /// A new body to validate, and the `issuer` the upstream's own discovery document claims
    /// (apiservers only).
    Body {
        body: Bytes,
        upstream_issuer: Option<String>,
    },
    /// The source is unchanged since the last fetch: keep its last result.
    Unchanged,
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{path}: {source}")]
    File { path: PathBuf, source: io::Error },
    #[error("{what} is larger than {MAX_BODY_BYTES} bytes")]
    TooLarge { what: String },
    #[error("token file {path} is empty")]
    EmptyToken { path: PathBuf },
    #[error("GET {url}: {}", error_chain(source))]
    Http { url: String, source: reqwest::Error },
    #[error(
        "GET {url}: answered {status} with Location {location:?}; redirects are never followed"
    )]
    Redirect {
        url: String,
        status: http::StatusCode,
        location: String,
    },
    /// The credentials or CA changed on disk and could not be loaded (L1); retried at the
    /// next fetch.
    #[error("{0}")]
    Setup(#[from] super::remote::SetupError),
    #[error("GET {url}: answered {status}{hint}")]
    Status {
        url: String,
        status: http::StatusCode,
        hint: &'static str,
    },
}

/// An error and its causes on one line: reqwest hides the useful part ("invalid peer
/// certificate: UnknownIssuer") in the source chain.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        let next = e.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        cause = e.source();
    }
    text
}

/// Every kind of source, for the refresher (static dispatch, no boxing).
#[derive(Debug)]
pub enum AnySource {
    File(FileSource),
    /// Boxed: a remote source carries its client and what it was built from (L1).
    Remote(Box<super::remote::RemoteSource>),
}

impl AnySource {
    /// The fetcher of one configured source.
    pub fn from_config(
        kind: &crate::config::SourceKind,
        timeout: std::time::Duration,
    ) -> anyhow::Result<Self> {
        use super::remote::RemoteSource;
        use crate::config::SourceKind;
        Ok(match kind {
            SourceKind::File { path } => AnySource::File(FileSource::new(path.clone())),
            SourceKind::Apiserver(api) => {
                AnySource::Remote(Box::new(RemoteSource::apiserver(api, timeout)?))
            }
            SourceKind::Url { url, ca_file } => {
                AnySource::Remote(Box::new(RemoteSource::url(url, ca_file.as_ref(), timeout)?))
            }
        })
    }
}

impl KeySource for AnySource {
    fn describe(&self) -> String {
        match self {
            AnySource::File(s) => s.describe(),
            AnySource::Remote(s) => s.describe(),
        }
    }

    async fn fetch_key_set(&mut self) -> Result<Fetched, FetchError> {
        match self {
            AnySource::File(s) => s.fetch_key_set().await,
            AnySource::Remote(s) => s.fetch_key_set().await,
        }
    }
}

/// A source of key sets, driven by the refresher.
pub trait KeySource: Send {
    /// What the logs call this source (a path or a URL).
    fn describe(&self) -> String;

    fn fetch_key_set(&mut self) -> impl Future<Output = Result<Fetched, FetchError>> + Send;
}

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
        let mut body = Vec::new();
        file.by_ref()
            .take(MAX_BODY_BYTES + 1)
            .read_to_end(&mut body)
            .map_err(err)?;
        if body.len() as u64 > MAX_BODY_BYTES {
            return Err(FetchError::TooLarge {
                what: self.path.display().to_string(),
            });
        }
        self.seen = Some(stamp);
        Ok(Fetched::Body {
            body: Bytes::from(body),
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
