//! `TelemetrySpool`: the bounded, crash-safe, append-only disk queue every telemetry event goes
//! through before it leaves the device.
//!
//! Layout of the spool directory:
//! - `00000000000000000001.seg`, … — segments, written append-only. Each record is framed as
//!   `len: u32 LE | crc32(len ‖ payload): u32 LE | payload` (`record_frame`) where the
//!   payload is the event as JSON.
//!   Only the newest segment (the active one) is written to.
//! - `cursor` — `{"segment":S,"offset":O,"dropped":D}`: the first event not yet acknowledged by the
//!   fleet is the record at byte `O` of segment `S` (earlier segments are fully acknowledged), and
//!   `D` events were dropped so far. Replaced atomically (write `cursor.tmp`, fsync, rename, fsync
//!   the directory).
//! - `lock` — held (`flock`) while the spool is open, so two daemons never share a spool.
//!
//! Crash safety: a record is acknowledged to the caller only after `write` returned (and, with
//! `fsync = "always"`, after `fdatasync`), so a killed process never loses it. A record torn by a
//! crash fails its length or CRC check and is cut off, with a warning, when the spool is opened.
//! Events leave the spool only through [`TelemetrySpool::ack`] (the fleet has them) or, when the
//! spool is full, by dropping the oldest segment, which is counted persistently and logged.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tandem_core::protocol::TelemetryEvent;

use super::{FsyncPolicy, TelemetryConfig};
use crate::record_frame::{self, HEADER_BYTES};

/// Largest event payload (JSON) accepted.
pub const MAX_EVENT_BYTES: u64 = 4 * 1024 * 1024;
/// Smallest `max_spool_bytes` accepted.
pub const MIN_SPOOL_BYTES: u64 = 4096;
const SEGMENT_SUFFIX: &str = ".seg";
const CURSOR_FILE: &str = "cursor";
const CURSOR_TMP_FILE: &str = "cursor.tmp";
const LOCK_FILE: &str = "lock";

/// Why a spool operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("telemetry.max_spool_bytes = {0} is too small; it must be at least {MIN_SPOOL_BYTES} bytes")]
    TooSmall(u64),
    #[error(
        "the telemetry spool {dir} is in use by another process (its lock file is held); stop the \
         other tandemd or give this one its own telemetry.spool_dir"
    )]
    Locked { dir: PathBuf },
    #[error(
        "no space left while writing {path}: {source}; free disk space or lower telemetry.max_spool_bytes"
    )]
    DiskFull { path: PathBuf, source: io::Error },
    #[error("telemetry spool: cannot {op} {path}: {source}")]
    Io { op: &'static str, path: PathBuf, source: io::Error },
    #[error("a telemetry event of {size} bytes is larger than the spool accepts ({limit} bytes)")]
    EventTooLarge { size: u64, limit: u64 },
    #[error("a telemetry event cannot be stored as JSON: {0}")]
    Encode(String),
    #[error("ack of {requested} events, but only {peeked} were peeked and not yet acknowledged")]
    AckBeyondPeek { requested: usize, peeked: usize },
}

impl SpoolError {
    /// Whether this is the disk (or quota) being full.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, SpoolError::DiskFull { .. })
    }
}

fn io_error(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> SpoolError {
    move |source| match source.kind() {
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => {
            SpoolError::DiskFull { path: path.to_path_buf(), source }
        }
        _ => SpoolError::Io { op, path: path.to_path_buf(), source },
    }
}

/// What the spool holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpoolStats {
    /// Events not yet acknowledged by the fleet.
    pub events: u64,
    /// Bytes of the segment files on disk (what `max_spool_bytes` bounds).
    pub bytes: u64,
    /// Events dropped, over the spool's whole life, because it was full (or a record was unreadable).
    pub dropped: u64,
}

/// The persisted acknowledgement cursor.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Cursor {
    segment: u64,
    offset: u64,
    dropped: u64,
}

/// One segment file and the byte offset of each record in it.
#[derive(Debug)]
struct Segment {
    seq: u64,
    path: PathBuf,
    len: u64,
    /// Spool-wide index of the first record (indices count from the oldest record at open).
    first: u64,
    offsets: Vec<u64>,
}

impl Segment {
    fn end(&self) -> u64 {
        self.first + self.offsets.len() as u64
    }
}

/// The events handed out by the last `peek` and not yet acknowledged.
#[derive(Debug, Clone, Copy)]
struct Peeked {
    from: u64,
    count: usize,
}

/// The spool; see the module documentation. Not shared between threads by itself: the shipper
/// keeps it behind a mutex.
pub struct TelemetrySpool {
    dir: PathBuf,
    fsync: FsyncPolicy,
    fsync_interval: Duration,
    max_bytes: u64,
    segment_bytes: u64,
    /// Oldest first; never empty; the last one is the active segment `writer` appends to.
    segments: VecDeque<Segment>,
    writer: File,
    /// A failed write could not be undone; the next append starts a new segment so the torn bytes
    /// stay at the end of their segment (where opening the spool cuts them off).
    roll_before_next: bool,
    /// Index of the oldest unacknowledged record.
    head: u64,
    dropped: u64,
    disk_bytes: u64,
    peeked: Option<Peeked>,
    unsynced: bool,
    last_sync: Instant,
    _lock: File,
}

impl std::fmt::Debug for TelemetrySpool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TelemetrySpool").field("dir", &self.dir).field("stats", &self.stats()).finish()
    }
}

impl TelemetrySpool {
    /// Opens (or creates) the spool in `dir`, repairing a torn tail, with the size, fsync policy
    /// and interval of `config` (its `spool_dir` is not read: the caller resolves the directory).
    pub fn open(dir: &Path, config: &TelemetryConfig) -> Result<Self, SpoolError> {
        Self::open_with_segment_bytes(dir, config, default_segment_bytes(config.max_spool_bytes))
    }

    /// [`TelemetrySpool::open`] with segments of about `segment_bytes` each (the unit in which a
    /// full spool drops its oldest events; the default is 1/16 of `max_spool_bytes`).
    pub fn open_with_segment_bytes(
        dir: &Path,
        config: &TelemetryConfig,
        segment_bytes: u64,
    ) -> Result<Self, SpoolError> {
        if config.max_spool_bytes < MIN_SPOOL_BYTES {
            return Err(SpoolError::TooSmall(config.max_spool_bytes));
        }
        // Events may carry prompts and answers (when the operator opted in): owner-only.
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_error("create the directory", dir))?;
        let lock = lock_dir(dir)?;
        let tmp = dir.join(CURSOR_TMP_FILE);
        if let Err(e) = fs::remove_file(&tmp)
            && e.kind() != io::ErrorKind::NotFound
        {
            return Err(io_error("remove", &tmp)(e));
        }
        let cursor = read_cursor(dir);

        let mut segments = VecDeque::new();
        let mut next_index = 0;
        for (seq, path) in list_segments(dir)? {
            if seq < cursor.segment {
                // Fully acknowledged (or dropped); its deletion was interrupted.
                remove_segment_file(&path);
                continue;
            }
            let (offsets, len) = scan_segment(&path)?;
            let count = offsets.len() as u64;
            segments.push_back(Segment { seq, path, len, first: next_index, offsets });
            next_index += count;
        }

        let head = segments
            .iter()
            .find(|s| s.seq == cursor.segment)
            .map_or(0, |s| s.first + s.offsets.iter().take_while(|&&o| o < cursor.offset).count() as u64);

        // Empty segments before the last hold nothing (a roll interrupted by a crash).
        let last_seq = segments.back().map(|s| s.seq);
        segments.retain(|s| {
            let keep = !s.offsets.is_empty() || Some(s.seq) == last_seq;
            if !keep {
                remove_segment_file(&s.path);
            }
            keep
        });

        let segment_bytes = segment_bytes.max(1);
        // A cursor past the end of the last segment (its tail was lost in a power failure) must not
        // cover records appended now: such a segment is not appended to.
        let appendable =
            |s: &&Segment| s.len < segment_bytes && !(s.seq == cursor.segment && cursor.offset > s.len);
        let (writer, new_segment) = match segments.back().filter(appendable) {
            Some(last) => {
                let file =
                    OpenOptions::new().append(true).open(&last.path).map_err(io_error("open", &last.path))?;
                (file, None)
            }
            None => {
                let seq = last_seq.unwrap_or(0).max(cursor.segment) + 1;
                let path = segment_path(dir, seq);
                let file = create_segment_file(&path)?;
                (file, Some(Segment { seq, path, len: 0, first: next_index, offsets: Vec::new() }))
            }
        };
        if let Some(segment) = new_segment {
            segments.push_back(segment);
            if config.fsync != FsyncPolicy::Never {
                sync_dir(dir)?;
            }
        }

        let disk_bytes = segments.iter().map(|s| s.len).sum();
        let mut spool = Self {
            dir: dir.to_path_buf(),
            fsync: config.fsync,
            fsync_interval: Duration::from_millis(config.fsync_interval_ms),
            max_bytes: config.max_spool_bytes,
            segment_bytes,
            segments,
            writer,
            roll_before_next: false,
            head,
            dropped: cursor.dropped,
            disk_bytes,
            peeked: None,
            unsynced: false,
            last_sync: Instant::now(),
            _lock: lock,
        };
        spool.delete_acked_segments();
        // A smaller max_spool_bytes than last time applies at once.
        spool.make_room(0)?;
        let canonical = spool.position_of(spool.head);
        if (cursor.segment, cursor.offset, cursor.dropped) != (canonical.0, canonical.1, spool.dropped)
            || !dir.join(CURSOR_FILE).exists()
        {
            // Best effort (a full disk must not keep the spool closed): the old cursor still
            // means the same events, and it never points past the end of the active segment.
            if let Err(e) = spool.persist_cursor() {
                tracing::warn!(error = %e, "cannot update the telemetry spool cursor; keeping the old one");
            }
        }
        let stats = spool.stats();
        tracing::info!(
            dir = %dir.display(),
            events = stats.events,
            bytes = stats.bytes,
            dropped = stats.dropped,
            "telemetry spool opened"
        );
        Ok(spool)
    }

    /// The spool directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends `event`. When this returns `Ok` the event survives a crash of the process, and with
    /// `fsync = "always"` also a power failure. When the spool is full the oldest segment is dropped
    /// first (counted in `dropped`, with a warning). A full disk is [`SpoolError::DiskFull`] and
    /// leaves the spool as it was. If only the final fsync fails, the error is returned but the
    /// event stays in the spool.
    pub fn append(&mut self, event: &TelemetryEvent) -> Result<(), SpoolError> {
        let frame = encode_frame(event, self.max_bytes)?;
        let frame_len = frame.len() as u64;
        let active_len = self.active().len;
        if self.roll_before_next || (active_len > 0 && active_len + frame_len > self.segment_bytes) {
            self.roll()?;
        }
        self.make_room(frame_len)?;

        let offset = self.active().len;
        if let Err(error) = self.writer.write_all(&frame) {
            if let Err(undo) = self.writer.set_len(offset) {
                tracing::warn!(
                    segment = %self.active().path.display(),
                    error = %undo,
                    "cannot cut off a partly written telemetry record; continuing in a new segment"
                );
                self.roll_before_next = true;
            }
            return Err(io_error("append to", &self.active().path)(error));
        }
        let active = self.active_mut();
        active.offsets.push(offset);
        active.len += frame_len;
        self.disk_bytes += frame_len;
        self.unsynced = true;
        match self.fsync {
            FsyncPolicy::Always => self.sync(),
            FsyncPolicy::Interval if self.last_sync.elapsed() >= self.fsync_interval => self.sync(),
            FsyncPolicy::Interval | FsyncPolicy::Never => Ok(()),
        }
    }

    /// Up to `max_events` of the oldest unacknowledged events, oldest first; they stay in the spool
    /// until [`TelemetrySpool::ack`]. A record that no longer decodes (disk corruption) is dropped,
    /// counted and logged when it reaches the head of the queue.
    pub fn peek(&mut self, max_events: usize) -> Result<Vec<TelemetryEvent>, SpoolError> {
        let mut events = Vec::new();
        let mut index = self.head;
        let mut unreadable = 0u64;
        'segments: while events.len() < max_events && index < self.tail() {
            let Some(position) = self.segments.iter().position(|s| index < s.end()) else { break };
            let segment = &self.segments[position];
            let count = (max_events - events.len()).min((segment.end() - index) as usize);
            let records = self.read_records(position, (index - segment.first) as usize, count)?;
            for record in records {
                match record {
                    Ok(event) => events.push(event),
                    Err(reason) if events.is_empty() => {
                        tracing::warn!(
                            dir = %self.dir.display(),
                            %reason,
                            "unreadable telemetry record dropped"
                        );
                        unreadable += 1;
                        self.head = index + 1;
                    }
                    // Ship the good ones first; the next peek drops this one.
                    Err(_) => break 'segments,
                }
                index += 1;
            }
        }
        if unreadable > 0 {
            self.dropped += unreadable;
            self.persist_cursor()?;
            self.delete_acked_segments();
        }
        self.peeked = Some(Peeked { from: self.head, count: events.len() });
        Ok(events)
    }

    /// Removes the first `n` events of the last [`TelemetrySpool::peek`] (the fleet acknowledged
    /// them). Events of that peek dropped meanwhile (spool full) are not counted twice. Acks of
    /// one peek may be split (`ack(2)` then `ack(3)` after peeking 5).
    pub fn ack(&mut self, n: usize) -> Result<(), SpoolError> {
        if n == 0 {
            return Ok(());
        }
        let peeked = self.peeked.unwrap_or(Peeked { from: self.head, count: 0 });
        if n > peeked.count {
            return Err(SpoolError::AckBeyondPeek { requested: n, peeked: peeked.count });
        }
        let target = peeked.from + n as u64;
        self.peeked = Some(Peeked { from: target, count: peeked.count - n });
        if target <= self.head {
            return Ok(());
        }
        self.head = target;
        let persisted = self.persist_cursor();
        // Deleting fully acknowledged segments needs no cursor update (a cursor pointing at a
        // deleted segment means "from the next one on"), and on a full disk it frees the space
        // the cursor update needs next time.
        self.delete_acked_segments();
        persisted
    }

    /// Flushes appended events to stable storage now (for `fsync = "interval"`; a no-op when
    /// nothing is pending).
    pub fn sync(&mut self) -> Result<(), SpoolError> {
        if self.unsynced {
            let path = &self.active().path;
            self.writer.sync_data().map_err(io_error("fsync", path))?;
            self.unsynced = false;
        }
        self.last_sync = Instant::now();
        Ok(())
    }

    /// Whether an interval fsync is due (events appended, not yet synced, interval passed).
    pub fn sync_due(&self) -> bool {
        self.unsynced && self.last_sync.elapsed() >= self.fsync_interval
    }

    /// Events waiting, bytes on disk, and events dropped so far.
    pub fn stats(&self) -> SpoolStats {
        SpoolStats { events: self.tail() - self.head, bytes: self.disk_bytes, dropped: self.dropped }
    }

    fn active(&self) -> &Segment {
        self.segments.back().expect("the spool always has an active segment")
    }

    fn active_mut(&mut self) -> &mut Segment {
        self.segments.back_mut().expect("the spool always has an active segment")
    }

    fn tail(&self) -> u64 {
        self.active().end()
    }

    /// Starts a new active segment.
    fn roll(&mut self) -> Result<(), SpoolError> {
        if self.fsync != FsyncPolicy::Never {
            self.sync()?;
        }
        let seq = self.active().seq + 1;
        let path = segment_path(&self.dir, seq);
        let file = create_segment_file(&path)?;
        let first = self.tail();
        self.writer = file;
        self.segments.push_back(Segment { seq, path, len: 0, first, offsets: Vec::new() });
        self.roll_before_next = false;
        self.unsynced = false;
        self.delete_acked_segments();
        if self.fsync != FsyncPolicy::Never {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// Drops oldest segments until `needed` more bytes fit under `max_spool_bytes`.
    fn make_room(&mut self, needed: u64) -> Result<(), SpoolError> {
        while self.disk_bytes + needed > self.max_bytes {
            if self.segments.len() == 1 {
                if self.active().len == 0 {
                    break;
                }
                self.roll()?;
            }
            self.drop_oldest_segment()?;
        }
        Ok(())
    }

    fn drop_oldest_segment(&mut self) -> Result<(), SpoolError> {
        let oldest = &self.segments[0];
        let lost = oldest.end().saturating_sub(self.head.max(oldest.first));
        let new_head = self.head.max(oldest.end());
        // The cursor moves past the segment before the file goes: a crash in between leaves a
        // segment that the next open deletes as acknowledged.
        self.write_cursor(self.position_of(new_head), self.dropped + lost)?;
        self.head = new_head;
        self.dropped += lost;
        if let Some(segment) = self.segments.pop_front() {
            self.disk_bytes -= segment.len;
            remove_segment_file(&segment.path);
        }
        if lost > 0 {
            tracing::warn!(
                dir = %self.dir.display(),
                dropped_now = lost,
                dropped_total = self.dropped,
                max_spool_bytes = self.max_bytes,
                "telemetry spool full: dropped the oldest events"
            );
        }
        Ok(())
    }

    /// Deletes segments before the active one whose records are all acknowledged.
    fn delete_acked_segments(&mut self) {
        while self.segments.len() > 1 && self.segments[0].end() <= self.head {
            if let Some(segment) = self.segments.pop_front() {
                self.disk_bytes -= segment.len;
                remove_segment_file(&segment.path);
            }
        }
    }

    /// The (segment, byte offset) of record `index`, or the end of the active segment when
    /// `index` is past the last record.
    fn position_of(&self, index: u64) -> (u64, u64) {
        for segment in &self.segments {
            if index >= segment.first && index < segment.end() {
                return (segment.seq, segment.offsets[(index - segment.first) as usize]);
            }
        }
        let active = self.active();
        (active.seq, active.len)
    }

    fn persist_cursor(&self) -> Result<(), SpoolError> {
        self.write_cursor(self.position_of(self.head), self.dropped)
    }

    fn write_cursor(&self, (segment, offset): (u64, u64), dropped: u64) -> Result<(), SpoolError> {
        let tmp = self.dir.join(CURSOR_TMP_FILE);
        let path = self.dir.join(CURSOR_FILE);
        let data = serde_json::to_vec(&Cursor { segment, offset, dropped })
            .map_err(|e| SpoolError::Encode(e.to_string()))?;
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_error("create", &tmp))?;
        file.write_all(&data).map_err(io_error("write", &tmp))?;
        if self.fsync != FsyncPolicy::Never {
            file.sync_all().map_err(io_error("fsync", &tmp))?;
        }
        drop(file);
        fs::rename(&tmp, &path).map_err(io_error("rename over", &path))?;
        if self.fsync != FsyncPolicy::Never {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// Reads `count` records of segment number `position` from its record `local` on.
    fn read_records(
        &self,
        position: usize,
        local: usize,
        count: usize,
    ) -> Result<Vec<Result<TelemetryEvent, String>>, SpoolError> {
        let segment = &self.segments[position];
        let begin = segment.offsets[local];
        let end = segment.offsets.get(local + count).copied().unwrap_or(segment.len);
        let file = File::open(&segment.path).map_err(io_error("open", &segment.path))?;
        let mut buf = vec![0u8; usize::try_from(end - begin).unwrap_or(usize::MAX)];
        file.read_exact_at(&mut buf, begin).map_err(io_error("read", &segment.path))?;
        Ok(segment.offsets[local..local + count]
            .iter()
            .map(|&offset| {
                let at = usize::try_from(offset - begin).unwrap_or(usize::MAX);
                let payload = buf.get(at..).and_then(decode_frame).ok_or("length or CRC mismatch")?;
                serde_json::from_slice(payload).map_err(|e| e.to_string())
            })
            .collect())
    }
}

impl Drop for TelemetrySpool {
    fn drop(&mut self) {
        if self.fsync == FsyncPolicy::Interval
            && let Err(e) = self.sync()
        {
            tracing::warn!(error = %e, "telemetry spool: final fsync failed");
        }
    }
}

/// Segment size for a spool bound: 1/16 of it, at least 4 KiB, at most 8 MiB and a quarter of the
/// bound, so that dropping one segment frees a small part of a full spool.
fn default_segment_bytes(max_spool_bytes: u64) -> u64 {
    (max_spool_bytes / 16).clamp(4096, 8 * 1024 * 1024).min(max_spool_bytes / 4).max(1)
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:020}{SEGMENT_SUFFIX}"))
}

fn create_segment_file(path: &Path) -> Result<File, SpoolError> {
    OpenOptions::new().append(true).create_new(true).mode(0o600).open(path).map_err(io_error("create", path))
}

fn remove_segment_file(path: &Path) {
    if let Err(e) = fs::remove_file(path)
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(path = %path.display(), error = %e, "cannot delete an old telemetry spool segment");
    }
}

fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_error("fsync the directory", dir))
}

fn lock_dir(dir: &Path) -> Result<File, SpoolError> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(io_error("open", &path))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(fs::TryLockError::WouldBlock) => Err(SpoolError::Locked { dir: dir.to_path_buf() }),
        Err(fs::TryLockError::Error(e)) => Err(io_error("lock", &path)(e)),
    }
}

/// The cursor, or the start of the spool when there is none or it is unreadable (then events are
/// sent again, which the fleet tolerates: it drops duplicates by id).
fn read_cursor(dir: &Path) -> Cursor {
    let path = dir.join(CURSOR_FILE);
    match fs::read(&path) {
        Ok(data) => serde_json::from_slice(&data).unwrap_or_else(|e| {
            tracing::warn!(
                path = %path.display(),
                error = %e,
                "unreadable telemetry spool cursor; unacknowledged state restarts from the oldest segment"
            );
            Cursor::default()
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Cursor::default(),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read the telemetry spool cursor");
            Cursor::default()
        }
    }
}

/// Segment files in `dir`, by sequence number.
fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, SpoolError> {
    let mut segments = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_error("list", dir))? {
        let entry = entry.map_err(io_error("list", dir))?;
        let name = entry.file_name();
        let Some(seq) =
            name.to_str().and_then(|n| n.strip_suffix(SEGMENT_SUFFIX)).and_then(|n| n.parse().ok())
        else {
            continue;
        };
        segments.push((seq, entry.path()));
    }
    segments.sort_unstable_by_key(|(seq, _)| *seq);
    Ok(segments)
}

/// Reads a segment, returns the offset of each intact record and the length of the intact
/// prefix; anything after it (a record torn by a crash) is cut off the file, with a warning.
fn scan_segment(path: &Path) -> Result<(Vec<u64>, u64), SpoolError> {
    let data = fs::read(path).map_err(io_error("read", path))?;
    let (offsets, valid) = scan_frames(&data);
    if valid < data.len() {
        tracing::warn!(
            segment = %path.display(),
            kept_bytes = valid,
            cut_bytes = data.len() - valid,
            records = offsets.len(),
            "torn or corrupt record at the end of a telemetry spool segment; cut off"
        );
        let file = OpenOptions::new().write(true).open(path).map_err(io_error("open", path))?;
        file.set_len(valid as u64).map_err(io_error("truncate", path))?;
        file.sync_all().map_err(io_error("fsync", path))?;
    }
    Ok((offsets, valid as u64))
}

/// Offsets of consecutive intact records from the start of `data`, and where they end.
fn scan_frames(data: &[u8]) -> (Vec<u64>, usize) {
    record_frame::scan(data, MAX_EVENT_BYTES)
}

/// The payload of the record at the start of `buf`, if it is complete and its CRC matches.
fn decode_frame(buf: &[u8]) -> Option<&[u8]> {
    record_frame::decode(buf, MAX_EVENT_BYTES)
}

/// Frames `event`; refuses events that are too large or that would not decode again.
fn encode_frame(event: &TelemetryEvent, max_spool_bytes: u64) -> Result<Vec<u8>, SpoolError> {
    let payload = serde_json::to_vec(event).map_err(|e| SpoolError::Encode(e.to_string()))?;
    // A value JSON cannot carry (a NaN becomes `null`) would make the stored record unreadable.
    serde_json::from_slice::<TelemetryEvent>(&payload)
        .map_err(|e| SpoolError::Encode(format!("it would not read back: {e}")))?;
    let frame_len = (HEADER_BYTES + payload.len()) as u64;
    let limit = MAX_EVENT_BYTES.min(max_spool_bytes);
    if payload.len() as u64 > MAX_EVENT_BYTES || frame_len > max_spool_bytes {
        return Err(SpoolError::EventTooLarge { size: frame_len, limit });
    }
    Ok(record_frame::encode(&payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_stops_at_a_torn_or_corrupt_record() {
        let event = sample_event();
        let frame = encode_frame(&event, u64::MAX).expect("frame");
        let mut data = [frame.clone(), frame.clone()].concat();
        assert_eq!(scan_frames(&data), (vec![0, frame.len() as u64], data.len()));
        data.extend_from_slice(&frame[..frame.len() - 3]);
        assert_eq!(scan_frames(&data).1, 2 * frame.len());
        // A flipped payload byte in the second record invalidates it and everything after it.
        data[frame.len() + HEADER_BYTES + 5] ^= 0x40;
        assert_eq!(scan_frames(&data), (vec![0], frame.len()));
        // Zeros (a preallocated but unwritten tail) are not records.
        assert_eq!(scan_frames(&[0u8; 64]), (vec![], 0));
    }

    #[test]
    fn event_that_would_not_read_back_is_refused_at_append() {
        let mut event = sample_event();
        event.budget.cloud_share = f64::NAN;
        assert!(matches!(encode_frame(&event, u64::MAX), Err(SpoolError::Encode(_))));
    }

    #[test]
    fn segment_size_is_a_small_part_of_the_bound() {
        assert_eq!(default_segment_bytes(64 * 1024 * 1024), 4 * 1024 * 1024);
        assert_eq!(default_segment_bytes(8192), 2048);
        assert_eq!(default_segment_bytes(1 << 40), 8 * 1024 * 1024);
    }

    fn sample_event() -> TelemetryEvent {
        use tandem_core::protocol::{Route, TelemetryBudget, TokenCounts};
        TelemetryEvent {
            id: uuid::Uuid::now_v7(),
            device_id: "dev-1".into(),
            model_version: "1.0.0".into(),
            at_ms: 1,
            route: Route::Local,
            help_requested: false,
            help_probability: Some(0.25),
            local_tokens: TokenCounts { prompt: 3, completion: 4 },
            local_latency_ms: 5,
            cloud_tokens: TokenCounts::default(),
            cloud_latency_ms: 0,
            transport: None,
            budget: TelemetryBudget { cloud_share: 0.1, calls_available: 2 },
            error_class: None,
            prompt: None,
            local_answer: None,
            cloud_answer: None,
        }
    }
}
