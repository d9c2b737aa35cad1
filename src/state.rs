//! Files oidc-edge keeps for itself (the last good key sets, the ACME account and
//! certificates) and files it writes for others (`render`'s documents): one private
//! directory, and writes that a crash never leaves half done.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

/// The state directory could not be created or used.
#[derive(Debug, thiserror::Error)]
#[error("state directory {path}: {source}")]
pub struct DirError {
    pub path: PathBuf,
    pub source: io::Error,
}

/// Creates the state directory (0700: it will hold the ACME account key too) if missing, and
/// tightens an existing one to 0700 (L10): a directory made by hand or by a packaging script is
/// often 0755. chmod(2) succeeds only for the owner, so a directory that belongs to someone else
/// is left as it is (we can still use it if its mode lets us).
pub fn create_state_dir(dir: &Path) -> Result<(), DirError> {
    use std::os::unix::fs::PermissionsExt as _;
    let err = |source| DirError {
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

    use super::*;

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
}
