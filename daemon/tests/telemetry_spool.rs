//! The telemetry spool and shipper, on real files and processes: round trips, reopen, torn tails,
//! the size bound with its persistent drop counter, the single-writer lock, a full disk (a tiny
//! tmpfs in a private mount namespace), SIGKILL at random moments, and shipping batches to a real
//! HTTP server with failures, retries and a final flush.

use std::collections::HashSet;
use std::hash::{BuildHasher, Hasher};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::StatusCode;
use axum::routing::post;
use tandem_core::protocol::{
    PROTOCOL_VERSION, Route, TelemetryBatch, TelemetryBudget, TelemetryEvent, TokenCounts,
};
use tandemd::telemetry::{
    FlushError, FsyncPolicy, HttpsTelemetryPublisher, PublishError, SpoolError, TelemetryConfig,
    TelemetryPublisher, TelemetryShipper, TelemetrySpool, TelemetryTransport,
};
use uuid::Uuid;

/// Set in a re-executed copy of this binary that appends until it is killed.
const CRASH_CHILD_DIR: &str = "TANDEM_SPOOL_CRASH_CHILD_DIR";
/// Set in a re-executed copy of this binary that runs inside a private mount namespace.
const DISK_FULL_CHILD: &str = "TANDEM_SPOOL_DISK_FULL_CHILD";
/// Segment size used by the crash test (small, so segments roll and get deleted often).
const CRASH_SEGMENT_BYTES: u64 = 4096;

fn event(n: u64) -> TelemetryEvent {
    TelemetryEvent {
        id: Uuid::now_v7(),
        device_id: "robot-7".into(),
        model_version: "1.2.0".into(),
        at_ms: 1_700_000_000_000 + n,
        route: Route::Local,
        help_requested: n.is_multiple_of(3),
        help_probability: Some(0.125),
        local_tokens: TokenCounts { prompt: 20, completion: 30 },
        local_latency_ms: 250,
        cloud_tokens: TokenCounts::default(),
        cloud_latency_ms: 0,
        transport: None,
        budget: TelemetryBudget { cloud_share: 0.25, calls_available: 4 },
        error_class: None,
        prompt: None,
        local_answer: None,
        cloud_answer: None,
    }
}

fn config(max_spool_bytes: u64) -> TelemetryConfig {
    TelemetryConfig {
        transport: TelemetryTransport::None,
        spool_dir: None,
        max_spool_bytes,
        fsync: FsyncPolicy::Always,
        fsync_interval_ms: 1000,
        batch_max_events: 100,
        flush_interval_ms: 1000,
        include_text: false,
    }
}

/// Opens a spool, waiting briefly while it reads as locked: a child process that other tests in
/// this binary fork shares our open files (and so the spool's `flock`) until it execs.
fn open(dir: &Path, config: &TelemetryConfig, segment_bytes: Option<u64>) -> TelemetrySpool {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let result = match segment_bytes {
            Some(bytes) => TelemetrySpool::open_with_segment_bytes(dir, config, bytes),
            None => TelemetrySpool::open(dir, config),
        };
        match result {
            Err(SpoolError::Locked { .. }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            result => return result.expect("open the spool"),
        }
    }
}

fn ids(events: &[TelemetryEvent]) -> Vec<Uuid> {
    events.iter().map(|e| e.id).collect()
}

fn append_all(spool: &mut TelemetrySpool, count: u64) -> Vec<Uuid> {
    (0..count)
        .map(|n| {
            let event = event(n);
            spool.append(&event).expect("append");
            event.id
        })
        .collect()
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("list")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    files.sort();
    files
}

#[test]
fn appended_events_are_peeked_oldest_first_and_removed_only_by_ack() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut spool = open(dir.path(), &config(1 << 20), None);
    let appended = append_all(&mut spool, 5);

    assert_eq!(ids(&spool.peek(3).expect("peek")), appended[..3]);
    assert_eq!(ids(&spool.peek(3).expect("peek again")), appended[..3], "peek does not remove");
    spool.ack(2).expect("ack");
    assert_eq!(ids(&spool.peek(10).expect("peek rest")), appended[2..]);
    assert_eq!(spool.stats().events, 3);
    assert_eq!(spool.stats().dropped, 0);
}

#[test]
fn acks_of_one_peek_may_be_split_but_not_exceed_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut spool = open(dir.path(), &config(1 << 20), None);
    let appended = append_all(&mut spool, 6);
    spool.peek(4).expect("peek");
    spool.ack(1).expect("ack 1");
    spool.ack(2).expect("ack 2");
    assert!(matches!(spool.ack(2), Err(SpoolError::AckBeyondPeek { requested: 2, peeked: 1 })));
    spool.ack(1).expect("ack last");
    assert_eq!(ids(&spool.peek(10).expect("peek")), appended[4..]);
}

#[test]
fn unacknowledged_events_survive_reopen_and_acknowledged_ones_stay_gone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let appended = {
        let mut spool = open(dir.path(), &config(1 << 20), Some(1024));
        let appended = append_all(&mut spool, 20);
        assert_eq!(spool.peek(7).expect("peek").len(), 7);
        spool.ack(7).expect("ack");
        appended
    };
    assert!(segment_files(dir.path()).len() > 2, "the test spans several segments");

    let mut spool = open(dir.path(), &config(1 << 20), Some(1024));
    assert_eq!(spool.stats().events, 13);
    assert_eq!(ids(&spool.peek(100).expect("peek")), appended[7..]);
}

#[test]
fn fully_acknowledged_segments_are_deleted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut spool = open(dir.path(), &config(1 << 20), Some(1024));
    append_all(&mut spool, 30);
    let before = spool.stats().bytes;
    let n = spool.peek(30).expect("peek").len();
    spool.ack(n).expect("ack");
    assert!(segment_files(dir.path()).len() == 1, "only the active segment remains");
    assert!(spool.stats().bytes < before);
    assert_eq!(spool.stats().events, 0);
}

#[test]
fn torn_tail_is_cut_off_on_open_and_earlier_events_survive() {
    let dir = tempfile::tempdir().expect("tempdir");
    let appended = {
        let mut spool = open(dir.path(), &config(1 << 20), None);
        append_all(&mut spool, 5)
    };
    let last = segment_files(dir.path()).pop().expect("a segment");
    let len = std::fs::metadata(&last).expect("meta").len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&last)
        .expect("open seg")
        .set_len(len - 7)
        .expect("truncate");

    let mut spool = open(dir.path(), &config(1 << 20), None);
    assert_eq!(ids(&spool.peek(100).expect("peek")), appended[..4]);
    let later = event(99);
    spool.append(&later).expect("append after repair");
    drop(spool);

    let mut spool = open(dir.path(), &config(1 << 20), None);
    let mut expected = appended[..4].to_vec();
    expected.push(later.id);
    assert_eq!(ids(&spool.peek(100).expect("peek")), expected);
}

#[test]
fn garbage_after_the_last_record_is_cut_off_on_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let appended = {
        let mut spool = open(dir.path(), &config(1 << 20), None);
        append_all(&mut spool, 3)
    };
    let last = segment_files(dir.path()).pop().expect("a segment");
    let mut file = std::fs::OpenOptions::new().append(true).open(&last).expect("open seg");
    file.write_all(&[0x30, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef, b'{', b'"']).expect("garbage");
    drop(file);

    let mut spool = open(dir.path(), &config(1 << 20), None);
    assert_eq!(ids(&spool.peek(100).expect("peek")), appended);
}

#[test]
fn full_spool_drops_the_oldest_events_and_counts_them_across_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let max = 8192;
    let (appended, stats) = {
        let mut spool = open(dir.path(), &config(max), Some(1024));
        let appended = append_all(&mut spool, 100);
        (appended, spool.stats())
    };
    assert!(stats.bytes <= max, "{stats:?}");
    assert!(stats.dropped > 0, "{stats:?}");
    assert_eq!(stats.events + stats.dropped, 100, "every event is either kept or counted as dropped");
    let on_disk: u64 =
        segment_files(dir.path()).iter().map(|p| std::fs::metadata(p).expect("meta").len()).sum();
    assert!(on_disk <= max, "segment files hold {on_disk} bytes");

    let mut spool = open(dir.path(), &config(max), Some(1024));
    assert_eq!(spool.stats(), stats, "the dropped counter is persistent");
    let kept = ids(&spool.peek(1000).expect("peek"));
    assert_eq!(kept, appended[appended.len() - kept.len()..], "the newest events are the ones kept");
}

#[test]
fn events_dropped_while_a_batch_is_in_flight_are_not_acknowledged_twice() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut spool = open(dir.path(), &config(8192), Some(1024));
    append_all(&mut spool, 10);
    let in_flight = spool.peek(5).expect("peek");
    let later = append_all(&mut spool, 40); // overflows: the peeked events are dropped meanwhile
    spool.ack(in_flight.len()).expect("ack");
    let left = ids(&spool.peek(1000).expect("peek"));
    assert_eq!(left, later[later.len() - left.len()..]);
    // The peeked events were dropped already; acknowledging them must not remove five more.
    assert_eq!(spool.stats().events + spool.stats().dropped, 50);
}

#[test]
fn interval_policy_defers_fsync_until_the_interval_has_passed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = TelemetryConfig { fsync: FsyncPolicy::Interval, fsync_interval_ms: 200, ..config(1 << 20) };
    let mut spool = open(dir.path(), &cfg, None);
    spool.append(&event(0)).expect("append");
    assert!(!spool.sync_due(), "nothing is due right after opening");
    std::thread::sleep(Duration::from_millis(250));
    assert!(spool.sync_due(), "the appended event waits for its fsync");
    spool.sync().expect("sync");
    assert!(!spool.sync_due());
    spool.append(&event(1)).expect("append");
    assert!(!spool.sync_due(), "the next fsync is an interval away");
    assert_eq!(spool.stats().events, 2);
}

#[test]
fn spool_in_use_by_another_process_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _first = open(dir.path(), &config(1 << 20), None);
    let error = TelemetrySpool::open(dir.path(), &config(1 << 20)).expect_err("second open");
    assert!(matches!(error, SpoolError::Locked { .. }), "{error}");
}

#[test]
fn too_small_bound_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    assert!(matches!(TelemetrySpool::open(dir.path(), &config(100)), Err(SpoolError::TooSmall(100))));
}

#[test]
fn oversized_event_is_refused_without_touching_the_spool() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut spool = open(dir.path(), &config(4096), None);
    let mut big = event(0);
    big.prompt = Some("x".repeat(5000));
    assert!(matches!(spool.append(&big), Err(SpoolError::EventTooLarge { .. })));
    assert_eq!(spool.stats().events, 0);
}

/// Runs the body of `disk_full_is_reported_and_leaves_the_spool_intact` in a private user and
/// mount namespace, where a 64 KiB tmpfs can be mounted without privileges.
#[test]
fn disk_full_is_reported_and_leaves_the_spool_intact() {
    if std::env::var_os(DISK_FULL_CHILD).is_some() {
        disk_full_child();
        return;
    }
    let exe = std::env::current_exe().expect("current exe");
    let output = Command::new("unshare")
        .args(["--user", "--map-root-user", "--mount"])
        .arg(exe)
        .args([
            "--exact",
            "disk_full_is_reported_and_leaves_the_spool_intact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(DISK_FULL_CHILD, "1")
        .output();
    let output = output.unwrap_or_else(|e| {
        panic!("cannot run unshare (util-linux) for a private tmpfs: {e}; the full-disk test needs it")
    });
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "disk-full child failed:\n{stdout}\n{stderr}");
    let summary = stdout.lines().find(|l| l.contains("DISK FULL CHECKED"));
    assert!(summary.is_some(), "{stdout}");
    eprintln!("{}", summary.unwrap_or_default());
}

fn disk_full_child() {
    let mount_point = tempfile::tempdir().expect("tempdir");
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k", "tandem-test"])
        .arg(mount_point.path())
        .status()
        .is_ok_and(|s| s.success());
    assert!(mounted, "cannot mount a 64 KiB tmpfs inside the private mount namespace");
    let dir = mount_point.path().join("spool");
    let mut spool = open(&dir, &config(1 << 20), Some(4096));
    let mut appended = Vec::new();
    let error = loop {
        let event = event(appended.len() as u64);
        match spool.append(&event) {
            Ok(()) => appended.push(event.id),
            Err(error) => break error,
        }
        assert!(appended.len() < 100_000, "a 64 KiB tmpfs never filled up");
    };
    assert!(error.is_disk_full(), "expected DiskFull, got {error}");
    assert!(error.to_string().contains("free disk space"), "{error}");
    assert!(appended.len() > 10, "only {} events fit", appended.len());
    // A second failure changes nothing either.
    assert!(spool.append(&event(0)).expect_err("still full").is_disk_full());
    drop(spool);

    // No partly written record was left behind: everything reported appended is there, intact.
    let mut spool = open(&dir, &config(1 << 20), Some(4096));
    assert_eq!(ids(&spool.peek(100_000).expect("peek")), appended);

    // Acknowledging frees whole segments, after which appends work again.
    let n = spool.peek(appended.len() / 2).expect("peek").len();
    let _ = spool.ack(n); // may fail to persist the cursor on the full disk; events are then resent
    spool.append(&event(1)).expect("append after space was freed");
    println!("DISK FULL CHECKED ({} events filled 64 KiB)", appended.len());
}

/// Entry point of the re-executed writer in `appended_events_survive_sigkill_exactly_once_in_order`;
/// does nothing in a normal test run.
#[test]
fn crash_child_appends_until_killed() {
    let Some(dir) = std::env::var_os(CRASH_CHILD_DIR) else { return };
    let mut spool = open(Path::new(&dir), &config(64 << 20), Some(CRASH_SEGMENT_BYTES));
    let mut out = std::io::stdout().lock();
    for n in 0u64.. {
        let event = event(n);
        spool.append(&event).expect("append");
        writeln!(out, "appended {}", event.id).expect("stdout");
        out.flush().expect("stdout");
        if n % 37 == 36 {
            let peeked = spool.peek(10).expect("peek").len();
            writeln!(out, "acking {peeked}").expect("stdout");
            out.flush().expect("stdout");
            spool.ack(peeked).expect("ack");
            writeln!(out, "acked {peeked}").expect("stdout");
            out.flush().expect("stdout");
        }
    }
}

/// A random number from the std hasher's random keys (no extra dependency).
fn random_below(bound: u64) -> u64 {
    std::collections::hash_map::RandomState::new().build_hasher().finish() % bound.max(1)
}

#[test]
fn appended_events_survive_sigkill_exactly_once_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = std::env::current_exe().expect("current exe");
    let mut believed: Vec<Uuid> = Vec::new();
    let mut total_reported = 0;
    for round in 0..6 {
        let mut child = Command::new(&exe)
            .args(["--exact", "crash_child_appends_until_killed", "--nocapture", "--test-threads=1"])
            .env(CRASH_CHILD_DIR, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn writer");
        let mut stdout = child.stdout.take().expect("stdout");
        let reader = std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = stdout.read_to_end(&mut bytes);
            bytes
        });
        // Round 0 is killed almost at once (possibly while opening), the others at random moments.
        let delay = if round == 0 { 5 } else { 20 + random_below(400) };
        std::thread::sleep(Duration::from_millis(delay));
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");
        let bytes = reader.join().expect("reader");

        // Only complete lines count: a line cut by the kill was not reported.
        let text = String::from_utf8_lossy(&bytes);
        let complete = match text.rfind('\n') {
            Some(end) => &text[..end],
            None => "",
        };
        let mut reported = Vec::new();
        let mut acked = 0usize;
        let mut acking = 0usize;
        // libtest prints `test crash_child_appends_until_killed ... ` before the child's first line.
        let after =
            |line: &str, marker: &str| line.find(marker).map(|at| line[at + marker.len()..].to_string());
        for line in complete.lines() {
            if let Some(id) = after(line, "appended ") {
                reported.push(Uuid::parse_str(&id).expect("uuid"));
            } else if let Some(n) = after(line, "acking ") {
                acking = n.parse().expect("count");
            } else if let Some(n) = after(line, "acked ") {
                acked += n.parse::<usize>().expect("count");
                acking = 0;
            }
        }
        total_reported += reported.len();

        let mut spool = open(dir.path(), &config(64 << 20), Some(CRASH_SEGMENT_BYTES));
        let found = ids(&spool.peek(1_000_000).expect("peek"));
        let unique: HashSet<&Uuid> = found.iter().collect();
        assert_eq!(unique.len(), found.len(), "round {round}: an event is present twice");

        let expected: Vec<Uuid> = believed.iter().chain(&reported).copied().collect();
        // An ack in flight at the kill may or may not have landed; an append in flight may have.
        let consistent = [acked, acked + acking].iter().any(|&skip| {
            skip <= expected.len()
                && found.len() >= expected.len() - skip
                && found[..expected.len() - skip] == expected[skip..]
                && found.len() - (expected.len() - skip) <= 1
        });
        if !consistent {
            let skip = acked.min(expected.len());
            let first_difference = found.iter().zip(&expected[skip..]).position(|(a, b)| a != b);
            let found_at = |id: &Uuid| expected.iter().position(|e| e == id);
            panic!(
                "round {round} (killed after {delay} ms): spool holds {} events, expected {} reported \
                 minus {acked} acknowledged (+{acking} in flight); first difference at {first_difference:?}; \
                 found[0] is expected[{:?}], last found is expected[{:?}]",
                found.len(),
                expected.len(),
                found.first().and_then(found_at),
                found.last().and_then(found_at),
            );
        }
        eprintln!(
            "round {round}: killed after {delay} ms, {} appends and {acked} acks reported, {acking} in flight, \
             {} events in the spool",
            reported.len(),
            found.len()
        );
        believed = found;
    }
    assert!(total_reported > 50, "the writer appended only {total_reported} events in all rounds");
}

/// The fleet side of the shipper tests: stores accepted batches, refuses the first `fail_first`.
#[derive(Clone, Default)]
struct Fleet {
    batches: Arc<Mutex<Vec<TelemetryBatch>>>,
    attempts: Arc<Mutex<u32>>,
}

impl Fleet {
    async fn serve(&self, fail_first: u32) -> String {
        let fleet = self.clone();
        let app = Router::new().route(
            "/telemetry",
            post(move |axum::Json(batch): axum::Json<TelemetryBatch>| {
                let fleet = fleet.clone();
                async move {
                    let attempt = {
                        let mut attempts = fleet.attempts.lock().expect("attempts");
                        *attempts += 1;
                        *attempts
                    };
                    if attempt <= fail_first {
                        return StatusCode::SERVICE_UNAVAILABLE;
                    }
                    fleet.batches.lock().expect("batches").push(batch);
                    StatusCode::NO_CONTENT
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        format!("http://{addr}/telemetry")
    }

    fn received(&self) -> Vec<Uuid> {
        self.batches.lock().expect("batches").iter().flat_map(|b| b.events.iter().map(|e| e.id)).collect()
    }

    fn batch_sizes(&self) -> Vec<usize> {
        self.batches.lock().expect("batches").iter().map(|b| b.events.len()).collect()
    }
}

fn shipper_config(batch_max_events: usize, flush_interval_ms: u64) -> TelemetryConfig {
    TelemetryConfig { batch_max_events, flush_interval_ms, ..config(1 << 20) }
}

fn publisher(url: &str) -> Arc<dyn TelemetryPublisher> {
    Arc::new(HttpsTelemetryPublisher::new(url, Duration::from_secs(2)).expect("publisher"))
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn shipper_delivers_recorded_events_in_batches_and_removes_them_from_the_spool() {
    let fleet = Fleet::default();
    let url = fleet.serve(0).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = shipper_config(4, 50);
    let spool = open(dir.path(), &cfg, None);
    let shipper = TelemetryShipper::start(spool, Some(publisher(&url)), "robot-7", &cfg).expect("start");
    let handle = shipper.handle();
    let events: Vec<TelemetryEvent> = (0..10).map(event).collect();
    for e in &events {
        handle.record(e.clone());
    }

    wait_until("the fleet has every event", || fleet.received().len() >= 10).await;
    wait_until("the spool is empty", || handle.stats().spool.events == 0).await;
    assert_eq!(fleet.received(), ids(&events), "in order, once each");
    assert!(fleet.batch_sizes().iter().all(|&n| n <= 4), "{:?}", fleet.batch_sizes());
    let batches = fleet.batches.lock().expect("batches").clone();
    assert!(batches.iter().all(|b| b.v == PROTOCOL_VERSION && b.device_id == "robot-7"));
    // The counter is bumped after the acknowledged events leave the spool.
    wait_until("every event is counted as shipped", || handle.stats().shipped == 10).await;
    shipper.shutdown(Duration::from_secs(2)).await.expect("shutdown");
}

#[tokio::test]
async fn failed_publishes_keep_events_until_the_fleet_accepts_them() {
    let fleet = Fleet::default();
    let url = fleet.serve(2).await;
    let dir = tempfile::tempdir().expect("tempdir");
    // Hour-long interval: only explicit flushes ship, so the test controls every attempt.
    let cfg = shipper_config(100, 3_600_000);
    let spool = open(dir.path(), &cfg, None);
    let shipper = TelemetryShipper::start(spool, Some(publisher(&url)), "robot-7", &cfg).expect("start");
    let handle = shipper.handle();
    let events: Vec<TelemetryEvent> = (0..10).map(event).collect();
    for e in &events {
        handle.append(e.clone()).await.expect("append");
    }

    for _ in 0..2 {
        let error = handle.flush(Duration::from_secs(5)).await.expect_err("fleet refuses");
        assert!(matches!(error, FlushError::Publish(PublishError::Rejected(_))), "{error}");
        assert_eq!(handle.stats().spool.events, 10, "nothing is dropped on a failed publish");
        assert_eq!(handle.stats().spool.dropped, 0);
    }
    assert_eq!(handle.flush(Duration::from_secs(5)).await.expect("fleet accepts"), 10);
    assert_eq!(fleet.received(), ids(&events));
    assert_eq!(handle.stats().spool.events, 0);
    shipper.shutdown(Duration::from_secs(2)).await.expect("shutdown");
}

#[tokio::test]
async fn shutdown_flushes_everything_pending_once() {
    let fleet = Fleet::default();
    let url = fleet.serve(0).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = shipper_config(3, 3_600_000);
    let spool = open(dir.path(), &cfg, None);
    let shipper = TelemetryShipper::start(spool, Some(publisher(&url)), "robot-7", &cfg).expect("start");
    let handle = shipper.handle();
    let events: Vec<TelemetryEvent> = (0..7).map(event).collect();
    for e in &events {
        handle.record(e.clone());
    }
    shipper.shutdown(Duration::from_secs(5)).await.expect("final flush");
    assert_eq!(fleet.received(), ids(&events));
    assert_eq!(handle.stats().shipped, 7);
    assert_eq!(handle.stats().spool.events, 0);
}

#[tokio::test]
async fn unreachable_fleet_leaves_events_in_the_spool_for_the_next_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = shipper_config(100, 50);
    let dead = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        format!("http://{}/telemetry", listener.local_addr().expect("addr"))
    };
    let events: Vec<TelemetryEvent> = (0..5).map(event).collect();
    {
        let spool = open(dir.path(), &cfg, None);
        let shipper = TelemetryShipper::start(spool, Some(publisher(&dead)), "robot-7", &cfg).expect("start");
        let handle = shipper.handle();
        for e in &events {
            handle.append(e.clone()).await.expect("append");
        }
        let error = shipper.shutdown(Duration::from_secs(5)).await.expect_err("fleet down");
        assert!(matches!(error, FlushError::Publish(PublishError::Disconnected(_))), "{error}");
        assert_eq!(handle.stats().spool.events, 5);
    }
    let fleet = Fleet::default();
    let url = fleet.serve(0).await;
    // Every handle is gone, so the writer thread releases the spool (the helper waits for it).
    let spool = open(dir.path(), &cfg, None);
    let shipper = TelemetryShipper::start(spool, Some(publisher(&url)), "robot-7", &cfg).expect("restart");
    assert_eq!(shipper.shutdown(Duration::from_secs(5)).await.expect("flush"), 5);
    assert_eq!(fleet.received(), ids(&events));
}

#[tokio::test]
async fn without_a_publisher_events_stay_in_the_spool() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = shipper_config(2, 20);
    let spool = open(dir.path(), &cfg, None);
    let shipper = TelemetryShipper::start(spool, None, "robot-7", &cfg).expect("start");
    let handle = shipper.handle();
    for n in 0..4 {
        handle.append(event(n)).await.expect("append");
    }
    assert_eq!(handle.flush(Duration::from_secs(2)).await.expect("flush"), 0);
    assert_eq!(handle.stats().spool.events, 4);
    shipper.shutdown(Duration::from_secs(2)).await.expect("shutdown");
}

#[tokio::test]
async fn shutdown_is_bounded_when_the_fleet_never_answers() {
    let app = Router::new().route(
        "/telemetry",
        post(|| async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            StatusCode::NO_CONTENT
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}/telemetry", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = shipper_config(1, 10);
    let spool = open(dir.path(), &cfg, None);
    let slow: Arc<dyn TelemetryPublisher> =
        Arc::new(HttpsTelemetryPublisher::new(&url, Duration::from_secs(30)).expect("publisher"));
    let shipper = TelemetryShipper::start(spool, Some(slow), "robot-7", &cfg).expect("start");
    let handle = shipper.handle();
    handle.append(event(0)).await.expect("append");
    tokio::time::sleep(Duration::from_millis(100)).await; // the task is now waiting on the fleet

    let started = Instant::now();
    let error = shipper.shutdown(Duration::from_millis(500)).await.expect_err("fleet hangs");
    assert!(matches!(error, FlushError::Timeout { pending: 1 }), "{error}");
    assert!(started.elapsed() < Duration::from_millis(1500), "took {:?}", started.elapsed());
    assert_eq!(handle.stats().spool.events, 1, "the unacknowledged event stays in the spool");
}
