//! Crash-safe file replacement: write a temporary file, fsync it, rename it over the target, fsync
//! the directory. A reader sees the old file or the new one, never a torn one; a torn temporary file
//! left by a crash is removed by [`discard_torn`].

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().expect("a file path").to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Replaces `path` with `bytes` atomically and durably.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let temp = temp_path(path);
    {
        let mut file = File::create(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
    }
    fs::rename(&temp, path)?;
    sync_dir(path.parent().expect("a file path has a parent"))
}

/// Flushes a directory's entries (new, renamed or removed files) to disk.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Removes the temporary file an interrupted [`write_atomic`] of `path` left; true when one was there.
pub(crate) fn discard_torn(path: &Path) -> io::Result<bool> {
    match fs::remove_file(temp_path(path)) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_atomic_replaces_the_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert!(!temp_path(&path).exists());
    }

    #[test]
    fn a_torn_temporary_is_discarded_and_the_old_file_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        write_atomic(&path, b"old").unwrap();
        fs::write(temp_path(&path), b"{\"half").unwrap();
        assert!(discard_torn(&path).unwrap());
        assert!(!discard_torn(&path).unwrap());
        assert_eq!(fs::read(&path).unwrap(), b"old");
    }
}
