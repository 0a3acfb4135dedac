//! The budget journal files: `budget-<seq>.journal` in the state directory, append-only, one
//! [`BudgetChange`] per record (JSON, framed and checksummed like the telemetry spool's records).
//!
//! A journal is created preallocated: its first [`JournalFile::create`] writes that many zeros and
//! syncs them, so later appends overwrite blocks that already exist and `fdatasync` flushes only
//! data, no size or block-allocation change. (Zeros are written rather than `fallocate`d because
//! ext4 marks fallocated blocks "unwritten" and converting them on the first write is a metadata
//! change the next `fdatasync` would have to commit.) Where the records end is found again by
//! scanning for intact records; zeros are never a record.
//!
//! On reading, an incomplete or damaged record with nothing intact after it is a write torn by a
//! crash: it was never acknowledged (a reservation is acknowledged only after `fdatasync`), so it
//! is ignored. A damaged record followed by intact ones is not something a crash leaves behind (the
//! disk or someone else changed the file), and a change in the middle of the window may be lost: the
//! journal is refused with [`JournalError::Damaged`], never silently skipped, because skipping
//! a lost reservation would under-count spending.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tandem_core::budget::BudgetChange;

use crate::record_frame;

const PREFIX: &str = "budget-";
const SUFFIX: &str = ".journal";
/// Largest record payload accepted when reading (a change is about 70 bytes of JSON).
const MAX_RECORD_BYTES: u64 = 1024;

/// Why a journal could not be read.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error(
        "{path} has a damaged record at byte {offset} followed by intact ones ({detail}), so the \
         budget window cannot be rebuilt without possibly forgetting a cloud call. Keep a copy for \
         diagnosis, then move budget.json and every budget-*.journal out of {dir} to start a fresh \
         budget window (the cloud calls they record are then no longer counted)"
    )]
    Damaged { path: PathBuf, dir: PathBuf, offset: u64, detail: String },
}

/// The journal currently appended to.
#[derive(Debug)]
pub(super) struct JournalFile {
    seq: u64,
    path: PathBuf,
    file: Arc<File>,
    /// Where the next record goes: the end of the intact records.
    end: u64,
}

impl JournalFile {
    /// Creates journal `seq` in `dir`, preallocated with `preallocate` bytes of zeros, and syncs
    /// the file and the directory, so that appends to it change data only.
    pub(super) fn create(dir: &Path, seq: u64, preallocate: u64) -> io::Result<Self> {
        let path = journal_path(dir, seq);
        let mut file =
            OpenOptions::new().read(true).write(true).create(true).truncate(true).mode(0o600).open(&path)?;
        let zeros = vec![0u8; 64 * 1024];
        let mut left = preallocate;
        while left > 0 {
            let n = left.min(zeros.len() as u64) as usize;
            file.write_all(&zeros[..n])?;
            left -= n as u64;
        }
        file.sync_all()?;
        sync_dir(dir)?;
        Ok(Self { seq, path, file: Arc::new(file), end: 0 })
    }

    pub(super) fn seq(&self) -> u64 {
        self.seq
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes of records written so far.
    pub(super) fn len(&self) -> u64 {
        self.end
    }

    /// Writes framed records after the last ones (not synced). On an error nothing is known about
    /// the bytes after the end any more: the caller must stop appending to this journal.
    pub(super) fn write(&mut self, frames: &[u8]) -> io::Result<()> {
        if frames.is_empty() {
            return Ok(());
        }
        self.file.write_all_at(frames, self.end)?;
        self.end += frames.len() as u64;
        Ok(())
    }

    /// Makes everything written so far durable (`fdatasync`).
    pub(super) fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// The file, for syncing without holding the store's lock.
    pub(super) fn handle(&self) -> Arc<File> {
        self.file.clone()
    }
}

/// Appends `change` as one framed record to `out`.
pub(super) fn encode(out: &mut Vec<u8>, change: &BudgetChange) {
    let payload = serde_json::to_vec(change).expect("a budget change serialises");
    record_frame::encode_into(out, &payload);
}

/// The changes in the journal at `path`, in order; a torn tail is ignored with a warning.
pub(super) fn read(path: &Path) -> Result<Vec<BudgetChange>, JournalError> {
    let data = fs::read(path).map_err(|source| JournalError::Read { path: path.to_path_buf(), source })?;
    let damaged = |offset: usize, detail: String| JournalError::Damaged {
        path: path.to_path_buf(),
        dir: path.parent().unwrap_or(Path::new(".")).to_path_buf(),
        offset: offset as u64,
        detail,
    };
    let (offsets, valid) = record_frame::scan(&data, MAX_RECORD_BYTES);
    let tail = &data[valid..];
    if tail.iter().any(|&b| b != 0) {
        if let Some(next) =
            (valid + 1..data.len()).find(|&at| record_frame::decode(&data[at..], MAX_RECORD_BYTES).is_some())
        {
            return Err(damaged(valid, format!("the next intact record is at byte {next}")));
        }
        tracing::warn!(
            journal = %path.display(),
            kept_bytes = valid,
            records = offsets.len(),
            "torn record at the end of the budget journal (a write cut short by a crash); ignored"
        );
    }
    offsets
        .iter()
        .map(|&offset| {
            let at = offset as usize;
            let payload = record_frame::decode(&data[at..], MAX_RECORD_BYTES).expect("scanned as intact");
            serde_json::from_slice(payload)
                .map_err(|e| damaged(at, format!("an intact record that is not a budget change: {e}")))
        })
        .collect()
}

/// The journals in `dir`, by sequence number.
pub(super) fn list(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut journals = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(seq) = name
            .to_str()
            .and_then(|n| n.strip_prefix(PREFIX))
            .and_then(|n| n.strip_suffix(SUFFIX))
            .and_then(|n| n.parse().ok())
        else {
            continue;
        };
        journals.push((seq, entry.path()));
    }
    journals.sort_unstable_by_key(|(seq, _)| *seq);
    Ok(journals)
}

/// Deletes the journals in `dir` numbered below `seq` (a snapshot covers them).
pub(super) fn remove_before(dir: &Path, seq: u64) {
    let journals = match list(dir) {
        Ok(journals) => journals,
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot list old budget journals");
            return;
        }
    };
    for (_, path) in journals.into_iter().filter(|(s, _)| *s < seq) {
        if let Err(e) = fs::remove_file(&path)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(journal = %path.display(), error = %e, "cannot delete an old budget journal");
        }
    }
}

pub(super) fn journal_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{PREFIX}{seq:020}{SUFFIX}"))
}

pub(super) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn journal_with(changes: &[BudgetChange]) -> (tempfile::TempDir, PathBuf, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = JournalFile::create(dir.path(), 1, 4096).unwrap();
        let mut frames = Vec::new();
        for change in changes {
            encode(&mut frames, change);
        }
        journal.write(&frames).unwrap();
        let path = journal.path().to_path_buf();
        (dir, path, frames)
    }

    const CHANGES: [BudgetChange; 3] = [
        BudgetChange::Local { at_ms: 1 },
        BudgetChange::Reserved { id: 0, at_ms: 2, tokens: 30 },
        BudgetChange::Committed { id: 0, at_ms: 3, tokens: 25 },
    ];

    #[test]
    fn appends_keep_the_preallocated_size_and_read_back_in_order() {
        let (_dir, path, _) = journal_with(&CHANGES);
        assert_eq!(fs::metadata(&path).unwrap().len(), 4096);
        assert_eq!(read(&path).unwrap(), CHANGES);
    }

    #[test]
    fn a_torn_tail_record_is_ignored() {
        let (_dir, path, frames) = journal_with(&CHANGES[..2]);
        let mut torn = Vec::new();
        encode(&mut torn, &CHANGES[2]);
        // Only part of the last record reached the disk; the rest of the file is still zeros.
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&torn[..torn.len() / 2], frames.len() as u64).unwrap();
        assert_eq!(read(&path).unwrap(), &CHANGES[..2]);
    }

    #[test]
    fn a_damaged_record_in_the_middle_is_refused_with_advice() {
        let (_dir, path, frames) = journal_with(&CHANGES);
        let mut first = Vec::new();
        encode(&mut first, &CHANGES[0]);
        let mut data = fs::read(&path).unwrap();
        data[first.len() + record_frame::HEADER_BYTES + 3] ^= 0x20;
        fs::write(&path, &data).unwrap();
        let err = read(&path).unwrap_err();
        assert!(matches!(err, JournalError::Damaged { offset, .. } if offset == first.len() as u64), "{err}");
        let message = err.to_string();
        assert!(message.contains("move budget.json and every budget-*.journal"), "{message}");
        assert!(frames.len() > first.len());
    }
}
