//! The store on both of its databases: SQLite (a temporary file) and PostgreSQL (a private cluster
//! started by the test). Every test runs the same assertions on each.

mod support;

use std::future::Future;

use tandem_core::protocol::{Route, TelemetryBudget, TelemetryEvent, TokenCounts, Transport};
use tandem_fleet::config::StoreConfig;
use tandem_fleet::store::{DeviceStatusUpdate, EventFilter, GroupBy, StatsQuery, Store};
use uuid::Uuid;

use support::postgres::TestPostgres;

const HOUR: i64 = 3_600_000;
const DAY: i64 = 24 * HOUR;
/// 2024-01-01T00:00:00Z: every test event is placed relative to it.
const T0: i64 = 1_704_067_200_000;

/// Runs `test` on a fresh SQLite store and a fresh PostgreSQL store.
async fn on_both<F, Fut>(test: F)
where
    F: Fn(Store) -> Fut,
    Fut: Future<Output = ()>,
{
    let dir = tempfile::tempdir().unwrap();
    let sqlite = StoreConfig {
        url: format!("sqlite://{}", dir.path().join("fleet.db").display()),
        ..StoreConfig::default()
    };
    test(Store::open(&sqlite).await.expect("SQLite store")).await;

    let postgres = TestPostgres::start();
    let config = StoreConfig { url: postgres.url(), ..StoreConfig::default() };
    test(Store::open(&config).await.unwrap_or_else(|e| panic!("PostgreSQL store: {e}\n{}", postgres.log())))
        .await;
}

fn event(
    device: &str,
    model: &str,
    at_ms: i64,
    route: Route,
    local_ms: u32,
    cloud_ms: u32,
) -> TelemetryEvent {
    let cloud = route == Route::Cloud;
    TelemetryEvent {
        id: Uuid::now_v7(),
        device_id: device.into(),
        model_version: model.into(),
        at_ms: at_ms as u64,
        route,
        help_requested: route != Route::Local,
        help_probability: Some(if route == Route::Local { 0.125 } else { 0.875 }),
        local_tokens: TokenCounts { prompt: 10, completion: 20 },
        local_latency_ms: local_ms,
        cloud_tokens: if cloud { TokenCounts { prompt: 10, completion: 30 } } else { TokenCounts::default() },
        cloud_latency_ms: cloud_ms,
        transport: cloud.then_some(Transport::Mqtt),
        budget: TelemetryBudget { cloud_share: 0.25, calls_available: 2 },
        error_class: (route == Route::LocalFallback).then(|| "budget_ratio".to_string()),
        prompt: None,
        local_answer: None,
        cloud_answer: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_delivered_twice_is_stored_once() {
    on_both(|store| async move {
        let first: Vec<_> = (0..10).map(|i| event("d1", "m1", T0 + i, Route::Local, 100, 0)).collect();
        let outcome = store.insert_events(&first, T0).await.unwrap();
        assert_eq!(outcome.inserted.len(), 10);
        let mut again = first.clone();
        again.extend((0..5).map(|i| event("d1", "m1", T0 + 100 + i, Route::Local, 100, 0)));
        again.push(again[0].clone()); // a duplicate inside one batch, too
        let outcome = store.insert_events(&again, T0 + 1).await.unwrap();
        assert_eq!(outcome.inserted.len(), 5, "only the new events are inserted");
        assert!(first.iter().all(|e| !outcome.inserted.contains(&e.id)));
        assert_eq!(store.count_events().await.unwrap(), 15);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_read_back_exactly_as_sent_page_by_page() {
    on_both(|store| async move {
        let mut sent: Vec<_> = (0..25)
            .map(|i| {
                let route = [Route::Local, Route::Cloud, Route::LocalFallback][i % 3];
                let mut e = event(if i % 2 == 0 { "d1" } else { "d2" }, "m1", T0 + i as i64, route, 90, 700);
                if i == 4 {
                    e.prompt = Some("what is 6 × 7? \u{1F916}".into());
                    e.local_answer = Some("42".into());
                    e.cloud_answer = Some("forty-two".into());
                    e.help_probability = None;
                }
                e
            })
            .collect();
        store.insert_events(&sent, T0 + 1000).await.unwrap();
        sent.sort_by_key(|e| e.id);

        let mut read = Vec::new();
        let mut after = None;
        let mut pages = 0;
        loop {
            let page = store.list_events(&EventFilter::default(), after, 10).await.unwrap();
            pages += 1;
            assert!(page.events.iter().all(|e| e.received_ms == T0 + 1000));
            read.extend(page.events.into_iter().map(|e| e.event));
            match page.next_after {
                Some(id) => after = Some(id),
                None => break,
            }
        }
        assert_eq!(pages, 3);
        assert_eq!(read, sent, "every event once, in id order, field for field");

        let filter =
            EventFilter { device: Some("d2".into()), route: Some(Route::Cloud), ..Default::default() };
        let page = store.list_events(&filter, None, 100).await.unwrap();
        let expected: Vec<_> =
            sent.iter().filter(|e| e.device_id == "d2" && e.route == Route::Cloud).collect();
        assert_eq!(page.events.len(), expected.len());
        assert!(page.events.iter().all(|e| e.event.device_id == "d2" && e.event.route == Route::Cloud));
    })
    .await;
}

/// d1 and d2 (group "north") run m1; d3 (group "south") runs m2. In hour 0: d1 answers 6 locally
/// (100 ms) and 2 via the cloud (local 200 ms, cloud 1200 ms); d2 answers 2 locally (300 ms). In
/// hour 1: d3 answers 3 locally (50 ms), 1 via the cloud (local 60 ms, cloud 2500 ms) and 1
/// falls back (70 ms).
fn known_workload() -> Vec<TelemetryEvent> {
    let mut events = Vec::new();
    for i in 0..6 {
        events.push(event("d1", "m1", T0 + i, Route::Local, 100, 0));
    }
    for i in 0..2 {
        events.push(event("d1", "m1", T0 + 10 + i, Route::Cloud, 200, 1200));
    }
    for i in 0..2 {
        events.push(event("d2", "m1", T0 + 20 + i, Route::Local, 300, 0));
    }
    for i in 0..3 {
        events.push(event("d3", "m2", T0 + HOUR + i, Route::Local, 50, 0));
    }
    events.push(event("d3", "m2", T0 + HOUR + 10, Route::Cloud, 60, 2500));
    events.push(event("d3", "m2", T0 + HOUR + 20, Route::LocalFallback, 70, 0));
    events
}

async fn load_known_workload(store: &Store) {
    let groups = [("d1", "north"), ("d2", "north"), ("d3", "south")];
    store.sync_device_groups(&groups.map(|(d, g)| (d.to_string(), Some(g.to_string())))).await.unwrap();
    store.insert_events(&known_workload(), T0 + 2 * HOUR).await.unwrap();
}

fn query(group_by: GroupBy, bucket_ms: Option<i64>) -> StatsQuery {
    StatsQuery {
        from_ms: T0,
        to_ms: T0 + 2 * HOUR,
        bucket_ms,
        group_by,
        device: None,
        model_version: None,
        group: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statistics_of_a_known_workload() {
    on_both(|store| async move {
        load_known_workload(&store).await;

        let report = store.stats(&query(GroupBy::None, None)).await.unwrap();
        assert_eq!(report.rows.len(), 1);
        let t = &report.totals;
        assert_eq!(
            (t.queries, t.local, t.cloud, t.local_fallback, t.help_requested, t.errors),
            (15, 11, 3, 1, 4, 1)
        );
        assert!((t.call_ratio - 3.0 / 15.0).abs() < 1e-12, "{}", t.call_ratio);
        assert_eq!((t.local_prompt_tokens, t.local_completion_tokens), (150, 300));
        assert_eq!((t.cloud_prompt_tokens, t.cloud_completion_tokens), (30, 90));
        assert!((t.budget_share_avg - 0.25).abs() < 1e-12);
        let local = t.local_latency_ms.unwrap();
        // 15 local latencies sorted: 50,50,50,60,70,100×6,200,200,300,300.
        assert_eq!((local.count, local.p50, local.p90, local.p99, local.max), (15, 100, 300, 300, 300));
        let cloud = t.cloud_latency_ms.unwrap();
        assert_eq!((cloud.count, cloud.p50, cloud.max), (3, 1200, 2500));
        assert_eq!(report.rows[0], report.totals);

        let by_device = store.stats(&query(GroupBy::Device, None)).await.unwrap();
        let rows: Vec<_> = by_device.rows.iter().map(|r| (r.key.as_str(), r.queries, r.cloud)).collect();
        assert_eq!(rows, vec![("d1", 8, 2), ("d2", 2, 0), ("d3", 5, 1)]);
        assert!((by_device.rows[0].call_ratio - 0.25).abs() < 1e-12);

        let by_model = store.stats(&query(GroupBy::ModelVersion, None)).await.unwrap();
        let rows: Vec<_> =
            by_model.rows.iter().map(|r| (r.key.as_str(), r.queries, r.help_requested)).collect();
        assert_eq!(rows, vec![("m1", 10, 2), ("m2", 5, 2)]);

        let by_group = store.stats(&query(GroupBy::Group, Some(HOUR))).await.unwrap();
        let rows: Vec<_> =
            by_group.rows.iter().map(|r| (r.bucket_start_ms, r.key.as_str(), r.queries)).collect();
        assert_eq!(rows, vec![(T0, "north", 10), (T0 + HOUR, "south", 5)]);

        let mut only_south = query(GroupBy::None, None);
        only_south.group = Some("south".into());
        let report = store.stats(&only_south).await.unwrap();
        assert_eq!((report.totals.queries, report.totals.cloud), (5, 1));
        let mut only_d2 = query(GroupBy::None, None);
        only_d2.device = Some("d2".into());
        assert_eq!(store.stats(&only_d2).await.unwrap().totals.queries, 2);
        let mut first_hour = query(GroupBy::None, None);
        first_hour.to_ms = T0 + HOUR;
        assert_eq!(store.stats(&first_hour).await.unwrap().totals.queries, 10);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_rolls_old_events_up_without_changing_the_numbers() {
    on_both(|store| async move {
        load_known_workload(&store).await;
        let recent: Vec<_> =
            (0..4).map(|i| event("d1", "m1", T0 + 40 * DAY + i, Route::Local, 10, 0)).collect();
        store.insert_events(&recent, T0 + 40 * DAY).await.unwrap();
        let all = StatsQuery { to_ms: T0 + 41 * DAY, ..query(GroupBy::Device, Some(HOUR)) };
        let before = store.stats(&all).await.unwrap();
        let copy = store.list_events(&EventFilter::default(), None, 1).await.unwrap().events[0].event.clone();

        let report = store.apply_retention(T0 + 30 * DAY, T0, None).await.unwrap();
        assert_eq!(report.events_rolled_up, 15);
        assert_eq!(store.count_events().await.unwrap(), 4, "only the recent raw events are left");
        assert_eq!(store.stats(&all).await.unwrap(), before, "roll-ups answer for the deleted events");

        // A copy of a rolled-up event (its device never saw the acknowledgement) is a duplicate.
        let outcome = store.insert_events(std::slice::from_ref(&copy), T0 + 41 * DAY).await.unwrap();
        assert!(outcome.inserted.is_empty(), "a rolled-up event came back");
        assert_eq!(store.stats(&all).await.unwrap(), before);

        // A device that was offline for weeks delivers an old event after the roll-up: it counts.
        let late = event("d2", "m1", T0 + 30, Route::Cloud, 300, 900);
        store.insert_events(std::slice::from_ref(&late), T0 + 41 * DAY).await.unwrap();
        let after = store.stats(&all).await.unwrap();
        assert_eq!(after.totals.queries, before.totals.queries + 1);
        assert_eq!(after.totals.cloud, before.totals.cloud + 1);

        // Running again rolls the late event up too and changes nothing else.
        assert_eq!(store.apply_retention(T0 + 30 * DAY, T0, None).await.unwrap().events_rolled_up, 1);
        assert_eq!(store.stats(&all).await.unwrap(), after);

        let report = store.apply_retention(T0 + 30 * DAY, T0, Some(T0 + HOUR)).await.unwrap();
        assert_eq!(report.rollups_deleted, 2, "the hour-0 roll-ups of d1 and d2 are past their own horizon");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_status_groups_and_model_versions_are_tracked() {
    on_both(|store| async move {
        let update = |online, at_ms| DeviceStatusUpdate::presence("d1", online, at_ms);
        store.update_device_status(&[update(true, T0 + 10)]).await.unwrap();
        store.update_device_status(&[update(false, T0 + 5)]).await.unwrap();
        store.insert_events(&[event("d1", "m2", T0 + 50, Route::Local, 1, 0)], T0 + 60).await.unwrap();
        store.insert_events(&[event("d1", "m1", T0 + 40, Route::Local, 1, 0)], T0 + 70).await.unwrap();
        store.sync_device_groups(&[("d1".into(), Some("lab".into())), ("d9".into(), None)]).await.unwrap();

        let devices = store.list_devices().await.unwrap();
        assert_eq!(devices.len(), 2);
        let d1 = &devices[0];
        assert_eq!(d1.status, "online", "an older status message does not win");
        assert_eq!(d1.model_version.as_deref(), Some("m2"), "the model of the latest event");
        assert_eq!(d1.group.as_deref(), Some("lab"));
        assert_eq!((d1.first_seen_ms, d1.last_seen_ms), (Some(T0 + 10), Some(T0 + 70)));
        assert_eq!((devices[1].id.as_str(), devices[1].status.as_str()), ("d9", "unknown"));

        store.update_device_status(&[update(false, T0 + 80)]).await.unwrap();
        assert_eq!(store.list_devices().await.unwrap()[0].status, "offline");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_rollouts_and_update_reports_are_recorded_and_observed() {
    use tandem_core::protocol::{UpdateReport, UpdateState};
    use tandem_fleet::rollout::{RolloutPlan, RolloutStage, RolloutStatus};
    use tandem_fleet::store::{AssignmentRow, ModelRecord, RolloutChange, RolloutRecord};

    on_both(|store| async move {
        let model = |version: &str, at| ModelRecord {
            name: "tiny".into(),
            version: version.into(),
            manifest_sha256: format!("{version:0>64}"),
            size_bytes: 10,
            files: 2,
            key_id: "k".into(),
            registered_at_ms: at,
            evaluation: serde_json::json!({ "accuracy": 0.5 }),
            provenance: serde_json::json!({}),
        };
        assert!(store.insert_model(&model("1", T0)).await.unwrap());
        assert!(store.insert_model(&model("2", T0 + 1)).await.unwrap());
        assert!(!store.insert_model(&model("2", T0 + 2)).await.unwrap(), "a version is recorded once");
        assert_eq!(store.model("tiny", "2").await.unwrap().unwrap(), model("2", T0 + 1));
        assert_eq!(store.list_models().await.unwrap().len(), 2);

        let with_report = |device: &str, state, at_ms| DeviceStatusUpdate {
            model_version: Some("1".into()),
            update: Some(UpdateReport { version: "2".into(), state, detail: Some("why".into()), at_ms: 1 }),
            ..DeviceStatusUpdate::presence(device, true, at_ms)
        };
        store.update_device_status(&[with_report("d1", UpdateState::Active, T0 + 10)]).await.unwrap();
        store.update_device_status(&[DeviceStatusUpdate::presence("d1", false, T0 + 20)]).await.unwrap();
        store.update_device_status(&[DeviceStatusUpdate::presence("d2", true, T0 + 20)]).await.unwrap();
        let d1 = store.list_devices().await.unwrap().remove(0);
        assert_eq!(d1.reported_version.as_deref(), Some("1"), "a last will keeps what the device said");
        let update = d1.update.expect("the report is kept");
        assert_eq!((update.state.as_str(), update.received_ms), ("active", T0 + 10));

        let plan = RolloutPlan {
            stages: vec![RolloutStage { percent: 100.0, soak_secs: 0, min_healthy: 1.0 }],
            gates: Default::default(),
            group: None,
        };
        let rollout = RolloutRecord {
            id: "r1".into(),
            model_name: "tiny".into(),
            version: "2".into(),
            rollback_version: "1".into(),
            plan,
            status: RolloutStatus::Running,
            stage: 0,
            stage_started_ms: T0,
            reason: None,
            waiting: None,
            superseded_by: None,
            created_ms: T0,
            updated_ms: T0,
        };
        store.insert_rollout(&rollout, &[]).await.unwrap();
        let assign = |device: &str, version: &str| AssignmentRow {
            device_id: device.into(),
            rollout_id: Some("r1".into()),
            bundle_name: "tiny".into(),
            version: version.into(),
            assigned_at_ms: T0 + 5,
            payload: format!("{{\"version\":\"{version}\"}}"),
        };
        let change = RolloutChange {
            expect_status: RolloutStatus::Running,
            status: RolloutStatus::Running,
            stage: 0,
            stage_started_ms: T0,
            reason: None,
            waiting: Some("soaking".into()),
            reached: vec![assign("d1", "2")],
            rolled_back: Vec::new(),
            at_ms: T0 + 5,
        };
        assert!(store.apply_rollout_change("r1", &change).await.unwrap());
        let stale = RolloutChange { expect_status: RolloutStatus::Paused, ..change.clone() };
        assert!(
            !store.apply_rollout_change("r1", &stale).await.unwrap(),
            "a change on a stale status is refused"
        );

        let mut events: Vec<_> =
            (0..4).map(|i| event("d1", "2", T0 + 30 + i, Route::Local, 100 + i as u32, 0)).collect();
        events[0].error_class = Some("timeout".into());
        events[1].error_class = Some("budget_ratio".into());
        events[2].route = Route::Cloud;
        events.push(event("d1", "1", T0 + 40, Route::Local, 100, 0));
        store.insert_events(&events, T0 + 50).await.unwrap();
        let (devices, health) =
            store.rollout_observations(&store.rollout("r1").await.unwrap().unwrap()).await.unwrap();
        assert_eq!(devices.len(), 2);
        assert_eq!(
            (devices[0].id.as_str(), devices[0].assigned_at_ms, devices[0].events),
            ("d1", Some(T0 + 5), 4)
        );
        assert_eq!(devices[0].report.as_ref().unwrap().state, UpdateState::Active);
        assert_eq!((devices[1].id.as_str(), devices[1].assigned_at_ms), ("d2", None));
        assert_eq!(
            (health.events, health.errors, health.cloud),
            (4, 1, 1),
            "a budget refusal is not an error"
        );
        assert_eq!(health.p50_local_ms, Some(100));

        let halt = RolloutChange {
            status: RolloutStatus::Halted,
            reason: Some("bad".into()),
            waiting: None,
            reached: Vec::new(),
            rolled_back: vec![assign("d1", "1")],
            at_ms: T0 + 60,
            ..change
        };
        assert!(store.apply_rollout_change("r1", &halt).await.unwrap());
        let recorded = store.rollout("r1").await.unwrap().unwrap();
        assert_eq!((recorded.status, recorded.reason.as_deref()), (RolloutStatus::Halted, Some("bad")));
        assert_eq!(store.rollout_devices("r1").await.unwrap(), [("d1".to_string(), T0 + 5, Some(T0 + 60))]);
        assert_eq!(store.assignment("d1").await.unwrap().unwrap().version, "1");
        assert_eq!(store.all_assignments().await.unwrap().len(), 1);
        assert!(store.active_rollouts().await.unwrap().is_empty());
    })
    .await;
}
