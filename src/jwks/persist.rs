//! The last good key set of each issuer on disk, so that a restart during an apiserver outage
//! still serves (DESIGN §4 "Persist").
//!
//! Files are written atomically (temp file, fsync, rename, fsync of the directory): a crash at
//! any point leaves either the old file or the new one. A file read at start is validated like
//! a fetch; a corrupt or tampered one is reported and ignored, never served.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::merge::{Ledger, LedgerEntry};
use super::validate::validate;
use crate::http::headers::strong_etag;

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
    #[error("state directory {path}: {source}")]
    Dir { path: PathBuf, source: io::Error },
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

/// Creates the state directory (0700: it will hold the ACME account key too) if missing, and
/// tightens an existing one to 0700 (L10): a directory made by hand or by a packaging script is
/// often 0755. chmod(2) succeeds only for the owner, so a directory that belongs to someone else
/// is left as it is (we can still use it if its mode lets us).
pub fn create_state_dir(dir: &Path) -> Result<(), PersistError> {
    use std::os::unix::fs::PermissionsExt as _;
    let err = |source| PersistError::Dir {
        path: dir.to_owned(),
        source,
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(err)?;
    let mode = fs::metadata(dir).map_err(err)?.permissions().mode();
    if mode & 0o077 != 0 {
        match fs::set_permissions(dir, fs::Permissions::from_mode(mode & 0o7700)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {}
            Err(e) => return Err(err(e)),
        }
    }
    Ok(())
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

/// Temp file in the same directory, fsync, rename over the target, fsync the directory.
///
/// L10: the temp name is unique (pid, a per-process counter and a random part) and created with
/// O_EXCL, so two processes sharing a state or ACME directory never write into one temp file
/// and rename a mix of both; a leftover or a symlink at a temp name is never followed. A failed
/// write removes its temp file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_atomic_mode(path, bytes, 0o600)
}

/// [`write_atomic`] for a public document (`render`'s output): created 0644 (less the umask),
/// like the plain write it replaces, so that a web server running as another user can read
/// it (L6).
pub fn write_public(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_atomic_mode(path, bytes, 0o644)
}

fn write_atomic_mode(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("state");
    let (tmp, mut file) = create_temp(dir, name, mode)?;
    let written = (|| {
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    File::open(dir)?.sync_all()
}

/// A new file `.{name}.{pid}.{unique}.tmp` in `dir`, created with `mode` and O_EXCL.
fn create_temp(dir: &Path, name: &str, mode: u32) -> io::Result<(PathBuf, File)> {
    use std::hash::{BuildHasher as _, Hasher as _};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let pid = std::process::id();
    let mut attempt = 0;
    loop {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        let tmp = dir.join(format!(".{name}.{pid}.{:016x}.tmp", hasher.finish()));
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
        {
            Ok(file) => return Ok((tmp, file)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < 8 => attempt += 1,
            Err(e) => return Err(e),
        }
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
    fn state_dir_is_created_0700() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("a/b");
        create_state_dir(&state).expect("create");
        let mode = fs::metadata(&state).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }

    #[test]
    fn an_existing_state_dir_is_tightened_to_0700() {
        // L10: a directory created 0755 by hand or by an older version still ends up 0700.
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        fs::create_dir(&state).expect("mkdir");
        fs::set_permissions(&state, fs::Permissions::from_mode(0o755)).expect("chmod");
        create_state_dir(&state).expect("create");
        let mode = fs::metadata(&state).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }

    #[test]
    fn a_leftover_at_the_old_fixed_temp_name_does_not_block_writes() {
        // L10: the temp name is unique per write, so nothing at `.NAME.tmp` (another process's
        // temp file, a leftover, a directory) is truncated, renamed or in the way.
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("state.json");
        let fixed = dir.path().join(".state.json.tmp");
        fs::create_dir(&fixed).expect("blocker");
        fs::write(fixed.join("other"), b"theirs").expect("write");
        write_atomic(&target, b"ours").expect("write_atomic");
        assert_eq!(fs::read(&target).expect("read"), b"ours");
        assert_eq!(fs::read(fixed.join("other")).expect("read"), b"theirs");
        let mut names: Vec<String> = fs::read_dir(dir.path())
            .expect("ls")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [".state.json.tmp", "state.json"],
            "no temp file left behind"
        );
    }

    #[test]
    fn a_failed_write_leaves_no_temp_file_behind() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("state.json");
        // rename(2) cannot replace a non-empty directory: the write fails after the temp file.
        fs::create_dir(&target).expect("blocker");
        fs::write(target.join("x"), b"x").expect("write");
        let err = write_atomic(&target, b"ours").expect_err("blocked");
        assert_eq!(err.kind(), io::ErrorKind::IsADirectory, "{err}");
        let names: Vec<String> = fs::read_dir(dir.path())
            .expect("ls")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["state.json"]);
    }

    #[test]
    fn concurrent_writers_never_mix_their_bytes() {
        // L10: two processes sharing a directory each write whole files; the survivor is one of
        // them, never an interleaving.
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("state.json");
        let a = vec![b'a'; 256 * 1024];
        let b = vec![b'b'; 200 * 1024];
        std::thread::scope(|scope| {
            for bytes in [&a, &b] {
                let target = &target;
                scope.spawn(move || {
                    for _ in 0..20 {
                        write_atomic(target, bytes).expect("write_atomic");
                    }
                });
            }
        });
        let survivor = fs::read(&target).expect("read");
        assert!(
            survivor == a || survivor == b,
            "mixed: {} bytes",
            survivor.len()
        );
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
