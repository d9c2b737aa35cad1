//! The last good key set of each issuer on disk, so that a restart during an apiserver outage
//! still serves (DESIGN §4 "Persist").
//!
//! Files are written atomically (temp file, fsync, rename, fsync of the directory): a crash at
//! any point leaves either the old file or the new one. A file read at start is validated like
//! a fetch; a corrupt or tampered one is reported and ignored, never served.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::merge::{Ledger, LedgerEntry};
use super::store::strong_etag;
use super::validate::validate;
use crate::state::write_atomic;

/// 2 adds `confirmed_at` (M3) and per-key `sources` (M4); format 1 files still load, with
/// neither known.
const FORMAT: u32 = 2;
const FORMATS_READ: [u32; 2] = [1, 2];

/// Where one issuer's state lives.
#[derive(Debug, Clone)]
pub struct StateFile {
    path: PathBuf,
    issuer: String,
}

#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("state file {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("state file {path} is corrupt and is ignored: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateDoc {
    format: u32,
    issuer: String,
    /// M3: Unix seconds at which a source last confirmed the set; absent in format 1 and
    /// before any confirmation. Never inferred from the file's mtime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    confirmed_at: Option<u64>,
    keys: Vec<LedgerEntry>,
}

/// What a state file holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Persisted {
    pub ledger: Ledger,
    pub confirmed_at: Option<u64>,
}

impl StateFile {
    /// The file of `issuer` under `dir`: readable name, plus a hash so that no two issuers meet.
    pub fn new(dir: &Path, issuer: &str) -> Self {
        let readable: String = issuer
            .trim_start_matches("https://")
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let etag = strong_etag(issuer.as_bytes());
        let hash: String = etag
            .to_str()
            .unwrap_or_default()
            .trim_matches('"')
            .chars()
            .take(8)
            .collect();
        Self {
            path: dir.join(format!("jwks-{readable}-{hash}.json")),
            issuer: issuer.to_owned(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Loads the persisted ledger: `Ok(None)` when there is none yet.
    pub fn load(&self) -> Result<Option<Ledger>, PersistError> {
        Ok(self.load_state()?.map(|p| p.ledger))
    }

    /// Loads the persisted ledger and confirmation time: `Ok(None)` when there is none yet.
    pub fn load_state(&self) -> Result<Option<Persisted>, PersistError> {
        let bytes = match fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(PersistError::Io {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        self.parse(&bytes)
            .map(Some)
            .map_err(|reason| PersistError::Corrupt {
                path: self.path.clone(),
                reason,
            })
    }

    fn parse(&self, bytes: &[u8]) -> Result<Persisted, String> {
        // Re-validate the keys as if fetched: a private member or a weak key written by
        // anything but us must not be served because it sits in our directory.
        let raw: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        let keys: Vec<&serde_json::Value> = raw
            .get("keys")
            .and_then(|k| k.as_array())
            .ok_or("no \"keys\" array")?
            .iter()
            .map(|entry| entry.get("jwk").ok_or("an entry has no \"jwk\""))
            .collect::<Result<_, _>>()?;
        let as_set =
            serde_json::to_vec(&serde_json::json!({ "keys": keys })).map_err(|e| e.to_string())?;
        let checked = validate(&as_set).map_err(|e| e.to_string())?;
        if let Some(dropped) = checked.dropped.first() {
            return Err(dropped.to_string());
        }
        let doc: StateDoc = serde_json::from_value(raw).map_err(|e| e.to_string())?;
        if !FORMATS_READ.contains(&doc.format) {
            return Err(format!("format {} is not 1 or {FORMAT}", doc.format));
        }
        if doc.issuer != self.issuer {
            return Err(format!("it belongs to issuer {:?}", doc.issuer));
        }
        let mut ledger = Ledger::default();
        for entry in doc.keys {
            if ledger.keys.insert(entry.jwk.kid.clone(), entry).is_some() {
                return Err("a kid appears twice".to_owned());
            }
        }
        Ok(Persisted {
            ledger,
            confirmed_at: doc.confirmed_at,
        })
    }

    /// Writes the ledger atomically. Blocking: call it from `spawn_blocking`.
    pub fn save(&self, ledger: &Ledger) -> Result<(), PersistError> {
        self.save_state(ledger, None)
    }

    /// Writes the ledger and the confirmation time atomically. Blocking.
    pub fn save_state(
        &self,
        ledger: &Ledger,
        confirmed_at: Option<u64>,
    ) -> Result<(), PersistError> {
        let doc = StateDoc {
            format: FORMAT,
            issuer: self.issuer.clone(),
            confirmed_at,
            keys: ledger.keys.values().cloned().collect(),
        };
        let bytes = serde_json::to_vec_pretty(&doc).expect("state serialises");
        write_atomic(&self.path, &bytes).map_err(|source| PersistError::Io {
            path: self.path.clone(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;
    use std::time::Duration;

    use super::*;
    use crate::jwks::merge::merge;

    const K3S: &str = include_str!("../../tests/fixtures/jwks/k3s.json");
    const ISSUER: &str = "https://oidc.example.com/cluster-a";

    fn ledger() -> Ledger {
        let keys = validate(K3S.as_bytes()).expect("fixture").keys;
        merge(
            &[Some(&keys)],
            &Ledger::default(),
            0,
            Duration::from_secs(60),
            100,
        )
        .expect("merge")
    }

    #[test]
    fn round_trips_with_0600_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = StateFile::new(dir.path(), ISSUER);
        assert!(file.path().file_name().is_some_and(|n| {
            n.to_string_lossy()
                .starts_with("jwks-oidc.example.com_cluster-a-")
        }));
        assert_eq!(file.load().expect("no file yet"), None);
        file.save(&ledger()).expect("save");
        assert_eq!(file.load().expect("load"), Some(ledger()));
        let mode = fs::metadata(file.path())
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn corrupt_or_foreign_files_are_refused_with_a_reason() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = StateFile::new(dir.path(), ISSUER);
        file.save(&ledger()).expect("save");
        let good = fs::read_to_string(file.path()).expect("read");
        let cases = [
            (good[..good.len() / 2].to_owned(), "EOF while parsing"),
            (
                good.replacen("\"kty\": \"RSA\"", "\"kty\": \"RSA\", \"d\": \"AQAB\"", 1),
                "PRIVATE KEY MATERIAL",
            ),
            (
                good.replacen(ISSUER, "https://other.example.com", 1),
                "belongs to issuer",
            ),
            (
                good.replacen("\"format\": 2", "\"format\": 9", 1),
                "format 9 is not 1 or 2",
            ),
            ("{}".to_owned(), "no \"keys\" array"),
        ];
        for (content, expected) in cases {
            fs::write(file.path(), &content).expect("write");
            let err = file.load().expect_err(expected).to_string();
            assert!(
                err.contains("is corrupt and is ignored") && err.contains(expected),
                "{err}"
            );
        }
    }
}
