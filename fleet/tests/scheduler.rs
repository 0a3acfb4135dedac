//! The retraining scheduler on a real fleet (SQLite): jobs run real commands (the trainer's own
//! binary makes and signs the bundle), fail with their log, are cancelled with their process
//! killed, fire from telemetry rules once, export their dataset, and are marked failed when the
//! fleet restarts under them. The job store queries also run on PostgreSQL.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use tandem_core::protocol::{DeviceTopics, Route, TelemetryEvent, TopicKind};
use tandem_fleet::config::{
    CallRatioRule, FleetConfig, JobTemplate, RunnerKind, SchedulerConfig, StoreConfig,
};
use tandem_fleet::scheduler::FLEET_RESTARTED;
use tandem_fleet::store::{JobOutputs, JobRecord, JobState, Store};

use support::bundle::registry_trusting;
use support::fleet::{TestFleet, http};
use support::mqtt::{Login, TestClient};
use support::postgres::TestPostgres;
use support::telemetry::{event, now_ms, payload};

const TASK_DATA: &str = "{\"prompt\":\"Use 1 2 to make 3\",\"answer\":\"3\"}\n{\"prompt\":\"Use 2 2 to make 4\",\"answer\":\"4\"}\n";

/// `tandem-train`, built by `make test` (or `cargo build -p tandem-train`) before these tests.
fn trainer() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let path = target.join("debug/tandem-train");
    assert!(
        path.exists(),
        "{} is missing: these tests run the trainer's binary; build it first with `cargo build -p tandem-train` \
         (`make test` does)",
        path.display()
    );
    path
}

fn template(name: &str, dir: &Path, commands: &[&str]) -> JobTemplate {
    JobTemplate {
        name: name.into(),
        run_config: dir.join("train.toml"),
        task_data: Vec::new(),
        held_out: Vec::new(),
        model: None,
        overrides: [("run.steps".to_string(), toml::Value::Integer(1))].into_iter().collect(),
        commands: commands.iter().map(|c| c.to_string()).collect(),
        bundle: "{work_dir}/bundle".into(),
        signing_key: None,
        collected_days: 0,
        every_hours: None,
        call_ratio: None,
        new_prompts: None,
    }
}

/// A fleet with a registry trusting a key made by `tandem-train keygen` (`DIR/keys/k.key`), and a
/// scheduler with `templates` (made from the fleet's folder).
async fn fleet_with(templates: impl FnOnce(&Path) -> Vec<JobTemplate>) -> TestFleet {
    fleet_configured(|dir, scheduler| scheduler.template = templates(dir)).await
}

/// As [`fleet_with`], the scheduler's configuration set by `configure`.
async fn fleet_configured(configure: impl FnOnce(&Path, &mut SchedulerConfig)) -> TestFleet {
    TestFleet::start(|config: &mut FleetConfig, dir| {
        let keys = dir.join("keys");
        let made = std::process::Command::new(trainer())
            .args(["keygen", "--name", "k", "--out"])
            .arg(&keys)
            .output()
            .unwrap();
        assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
        std::fs::write(dir.join("task.jsonl"), TASK_DATA).unwrap();
        let train = format!(
            "[run]\nout_dir = \"runs/x\"\nsteps = 100\n\n[task]\nkind = \"countdown\"\ntrain = \"{}\"\n",
            dir.join("task.jsonl").display()
        );
        std::fs::write(dir.join("train.toml"), train).unwrap();
        config.registry = Some(registry_trusting(dir, vec![keys.join("k.pub")]));
        config.scheduler = Some(SchedulerConfig {
            work_dir: dir.join("jobs"),
            runner: Default::default(),
            command_template: None,
            evaluate_interval_secs: 1,
            register: true,
            rollout: false,
            rollout_plan: None,
            log_tail_lines: 20,
            template: Vec::new(),
        });
        configure(dir, config.scheduler.as_mut().unwrap());
    })
    .await
}

async fn submit(fleet: &TestFleet, template: &str) -> Value {
    let response =
        http().post(fleet.api_url("/v1/jobs")).json(&json!({ "template": template })).send().await.unwrap();
    let status = response.status();
    let body: Value = response.json().await.unwrap();
    assert_eq!(status, StatusCode::CREATED, "{body}");
    body
}

/// Polls the job until `done` says so (30 s at most).
async fn wait_for(fleet: &TestFleet, id: &str, done: impl Fn(&Value) -> bool) -> Value {
    for _ in 0..300 {
        let job = fleet.get(&format!("/v1/jobs/{id}"), None).await;
        if done(&job) {
            return job;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("job {id} never got there: {}", fleet.get(&format!("/v1/jobs/{id}"), None).await);
}

fn finished(job: &Value) -> bool {
    !matches!(job["state"].as_str(), Some("queued" | "running"))
}

async fn publish(fleet: &TestFleet, device: &str, events: &[TelemetryEvent]) {
    let mut client = TestClient::connect(fleet.mqtt.unwrap(), Login::as_device(device, None)).await.unwrap();
    let topic = DeviceTopics::new(device).unwrap().topic(TopicKind::Telemetry);
    for chunk in events.chunks(50) {
        client.publish_acked(&topic, payload(device, chunk)).await;
    }
}

fn prompted(device: &str, prompt: &str, cloud_answer: Option<&str>) -> TelemetryEvent {
    let route = if cloud_answer.is_some() { Route::Cloud } else { Route::Local };
    let mut e = event(device, "m@1", now_ms(), route, 100, 200);
    e.prompt = Some(prompt.into());
    e.cloud_answer = cloud_answer.map(Into::into);
    e
}

fn process_alive(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| !stat.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'))
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_on_demand_job_trains_signs_and_registers_its_bundle() {
    let t = trainer().display().to_string();
    let fleet = fleet_with(|dir| {
        let key = dir.join("keys/k.key").display().to_string();
        let commands = [
            // The job's run configuration points at its own run folder and dataset.
            "grep -q 'out_dir = \"{work_dir}/run\"' {config} && grep -q 'train = \"{dataset}\"' {config}"
                .to_string(),
            "grep -q 'steps = 1$' {config}".to_string(),
            format!("{t} init --out {{work_dir}}/ckpt"),
            format!(
                "{t} export --from {{work_dir}}/ckpt --out {{bundle}} --name {{model}} --version {{version}}"
            ),
            format!("{t} sign --key {key} --bundle {{bundle}}"),
        ];
        let commands: Vec<&str> = commands.iter().map(String::as_str).collect();
        vec![JobTemplate { model: Some("tiny".into()), ..template("tiny-job", dir, &commands) }]
    })
    .await;
    let job = submit(&fleet, "tiny-job").await;
    assert_eq!(job["trigger"], "on_demand");
    let id = job["id"].as_str().unwrap();
    let job = wait_for(&fleet, id, finished).await;
    assert_eq!(job["state"], "succeeded", "{}", job["log_tail"].as_str().unwrap());
    assert_eq!(job["model_name"], "tiny");
    let version = job["model_version"].as_str().unwrap();
    assert_eq!(version, "1", "the first whole-number version of the template's model");
    assert_eq!(job["dataset_rows"], 2, "the task data");
    assert!(job["evaluation"].is_object());
    assert!(job["log_tail"].as_str().unwrap().contains("registered tiny version"), "{job}");
    let models = fleet.get("/v1/models", None).await;
    assert!(
        models["models"].as_array().unwrap().iter().any(|m| m["name"] == "tiny" && m["version"] == version)
    );
    let listed = fleet.get("/v1/jobs", None).await;
    assert_eq!(listed["jobs"][0]["id"], id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_command_fails_the_job_with_its_log() {
    let fleet =
        fleet_with(|dir| vec![template("broken", dir, &["echo about to fail >&2; exit 3", "echo never"])])
            .await;
    let id = submit(&fleet, "broken").await["id"].as_str().unwrap().to_string();
    let job = wait_for(&fleet, &id, finished).await;
    assert_eq!(job["state"], "failed");
    assert!(job["reason"].as_str().unwrap().contains("step 1"), "{job}");
    let tail = job["log_tail"].as_str().unwrap();
    assert!(tail.contains("about to fail"), "{tail}");
    assert!(!tail.contains("\nnever"), "{tail}");
    assert_eq!(job["model_version"], Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_runner_runs_each_step_through_its_template() {
    let fleet = fleet_configured(|dir, scheduler| {
        scheduler.runner = RunnerKind::Command;
        scheduler.command_template = Some("env REMOTE_JOB={job_id} sh -c {command}".into());
        scheduler.register = false;
        scheduler.template = vec![template("remote", dir, &["echo \"on $REMOTE_JOB\" > '{work_dir}/out'"])];
    })
    .await;
    let id = submit(&fleet, "remote").await["id"].as_str().unwrap().to_string();
    let job = wait_for(&fleet, &id, finished).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["model_version"], Value::Null, "register = false");
    let out = std::fs::read_to_string(Path::new(job["work_dir"].as_str().unwrap()).join("out")).unwrap();
    assert_eq!(out, format!("on {id}\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_job_kills_its_command_and_a_second_job_waits_for_none() {
    let fleet =
        fleet_with(|dir| vec![template("slow", dir, &["echo $$ > {work_dir}/pid; exec sleep 60"])]).await;
    let id = submit(&fleet, "slow").await["id"].as_str().unwrap().to_string();
    let job = wait_for(&fleet, &id, |j| j["state"] == "running").await;
    let pid_file = Path::new(job["work_dir"].as_str().unwrap()).join("pid");
    let mut pid = String::new();
    for _ in 0..100 {
        pid = std::fs::read_to_string(&pid_file).unwrap_or_default().trim().to_string();
        if !pid.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(process_alive(&pid), "the command runs as {pid}");
    let busy =
        http().post(fleet.api_url("/v1/jobs")).json(&json!({"template": "slow"})).send().await.unwrap();
    assert_eq!(busy.status(), StatusCode::CONFLICT, "one job of a template at a time");

    let cancelled: Value = http()
        .post(fleet.api_url(&format!("/v1/jobs/{id}/cancel")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(cancelled["state"], "cancelled");
    for _ in 0..100 {
        if !process_alive(&pid) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!process_alive(&pid), "the command {pid} was killed");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(fleet.get(&format!("/v1/jobs/{id}"), None).await["state"], "cancelled");
    submit(&fleet, "slow").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_ratio_outside_the_band_starts_one_job_only() {
    let fleet = fleet_with(|dir| {
        let rule =
            CallRatioRule { low: 0.1, high: 0.3, period_secs: 3600, min_events: 20, model_version: None };
        vec![JobTemplate { call_ratio: Some(rule), ..template("ratio", dir, &["exec sleep 60"]) }]
    })
    .await;
    // Inside the band: 2 cloud calls in 10 queries.
    let inside: Vec<_> = (0..30)
        .map(|i| {
            event("robot-1", "m@1", now_ms(), if i % 5 == 0 { Route::Cloud } else { Route::Local }, 100, 200)
        })
        .collect();
    publish(&fleet, "robot-1", &inside).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(fleet.get("/v1/jobs", None).await["jobs"], json!([]), "inside the band: no job");

    let outside: Vec<_> =
        (0..60).map(|_| event("robot-2", "m@2", now_ms(), Route::Cloud, 100, 200)).collect();
    publish(&fleet, "robot-2", &outside).await;
    let mut jobs = Value::Null;
    for _ in 0..100 {
        jobs = fleet.get("/v1/jobs", None).await["jobs"].clone();
        if !jobs.as_array().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(jobs.as_array().unwrap().len(), 1, "{jobs}");
    assert_eq!(jobs[0]["trigger"], "call_ratio");
    assert!(jobs[0]["trigger_detail"].as_str().unwrap().contains("m@2"), "{jobs}");

    // Still outside the band while the job runs: no second job.
    let more: Vec<_> = (0..60).map(|_| event("robot-2", "m@2", now_ms(), Route::Cloud, 100, 200)).collect();
    publish(&fleet, "robot-2", &more).await;
    tokio::time::sleep(Duration::from_millis(3000)).await;
    assert_eq!(fleet.get("/v1/jobs", None).await["jobs"].as_array().unwrap().len(), 1);
    let id = jobs[0]["id"].as_str().unwrap();
    http().post(fleet.api_url(&format!("/v1/jobs/{id}/cancel"))).send().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dataset_holds_task_data_and_opted_in_prompts_once_with_cloud_answers() {
    let fleet = fleet_with(|dir| {
        let commands = ["cp {dataset} {work_dir}/../dataset-copy.jsonl"];
        // No task_data: the run configuration's task.train is the task data.
        vec![template("data", dir, &commands)]
    })
    .await;
    let mut events = vec![
        prompted("robot-1", "What is 6 * 7?", Some("42")),
        prompted("robot-1", "Name a colour", None),
        prompted("robot-1", "What is 6 * 7?", Some("forty-two")),
        prompted("robot-1", "Use 1 2 to make 3", Some("1 + 2")),
    ];
    events.push(event("robot-1", "m@1", now_ms(), Route::Cloud, 100, 200));
    publish(&fleet, "robot-1", &events).await;

    let text = http()
        .get(fleet.api_url("/v1/datasets/export?since=0&template=data"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let records = tandem_core::tasks::dataset::parse_records(&text).unwrap();
    let pairs: Vec<(&str, &str)> = records.iter().map(|r| (r.prompt.as_str(), r.answer.as_str())).collect();
    assert_eq!(
        pairs,
        vec![
            ("Use 1 2 to make 3", "3"),
            ("Use 2 2 to make 4", "4"),
            ("What is 6 * 7?", "42"),
            ("Name a colour", ""),
        ]
    );
    assert_eq!(records[3].meta.as_ref().unwrap()["cloud_answer"], false);

    let later = now_ms() + 60_000;
    let none = http().get(fleet.api_url(&format!("/v1/datasets/export?since={later}"))).send().await.unwrap();
    assert_eq!(none.text().await.unwrap(), "");

    // The job's own dataset is the same.
    let id = submit(&fleet, "data").await["id"].as_str().unwrap().to_string();
    let job = wait_for(&fleet, &id, finished).await;
    assert_eq!(job["dataset_rows"], 4);
    // register = true but the command made no bundle: the job fails, saying so.
    assert_eq!(job["state"], "failed");
    assert!(job["reason"].as_str().unwrap().contains("cannot register"), "{job}");
    let copied = std::fs::read_to_string(fleet.dir.path().join("jobs/dataset-copy.jsonl")).unwrap();
    assert_eq!(copied, text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collected_countdown_prompts_lose_the_templates_words_and_the_held_out_set_stays_out() {
    use tandem_core::tasks::countdown::CountdownProblem;
    use tandem_core::tasks::dataset::{TaskRecord, to_jsonl};
    use tandem_core::tasks::templates::PromptTemplate;
    let evaluation = CountdownProblem { numbers: vec![4, 2], target: 8 };
    let field = CountdownProblem { numbers: vec![9, 3], target: 3 };
    let fleet = fleet_with(|dir| {
        let held_out = dir.join("test.jsonl");
        std::fs::write(&held_out, to_jsonl(&[TaskRecord::from_countdown(&evaluation, None)])).unwrap();
        let commands = ["cp {dataset} {work_dir}/../dataset-copy.jsonl"];
        vec![JobTemplate { held_out: vec![held_out], ..template("held", dir, &commands) }]
    })
    .await;
    let turn = |p: &CountdownProblem| PromptTemplate::COUNTDOWN.user_prompt(&p.question());
    let events = vec![
        prompted("robot-1", &turn(&evaluation), Some("4 * 2")),
        prompted("robot-1", &turn(&field), None),
    ];
    publish(&fleet, "robot-1", &events).await;

    let id = submit(&fleet, "held").await["id"].as_str().unwrap().to_string();
    let job = wait_for(&fleet, &id, finished).await;
    let log = job["log_tail"].as_str().unwrap();
    assert!(
        log.contains("3 records (2 task records, 1 prompts collected from devices; left out: 1 held out"),
        "{log}"
    );
    let copied = std::fs::read_to_string(fleet.dir.path().join("jobs/dataset-copy.jsonl")).unwrap();
    let records = tandem_core::tasks::dataset::parse_records(&copied).unwrap();
    assert_eq!(records.len(), 3);
    assert_eq!(records[2].prompt, field.question(), "the bare question, without the template's words");
    assert_eq!(records[2].to_countdown().unwrap(), field, "verifiable again");
    assert!(records.iter().all(|r| r.prompt != evaluation.question()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_restart_marks_its_running_job_failed() {
    let mut fleet = fleet_with(|dir| vec![template("slow", dir, &["exec sleep 60"])]).await;
    let id = submit(&fleet, "slow").await["id"].as_str().unwrap().to_string();
    wait_for(&fleet, &id, |j| j["state"] == "running").await;
    fleet.restart().await;
    let job = fleet.get(&format!("/v1/jobs/{id}"), None).await;
    assert_eq!(job["state"], "failed");
    assert_eq!(job["reason"], FLEET_RESTARTED);
    assert!(job["finished_ms"].as_i64().is_some());
    submit(&fleet, "slow").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scheduler_routes_need_a_scheduler() {
    let fleet = TestFleet::start(|_, _| {}).await;
    let response = http().get(fleet.api_url("/v1/jobs")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
}

fn job(id: &str, template: &str, created_ms: i64) -> JobRecord {
    JobRecord {
        id: id.into(),
        template: template.into(),
        trigger: "on_demand".into(),
        trigger_detail: "test".into(),
        state: JobState::Queued,
        reason: None,
        created_ms,
        started_ms: None,
        finished_ms: None,
        run_config: "[run]\n".into(),
        work_dir: "/jobs/x".into(),
        log_path: "/jobs/x/job.log".into(),
        dataset_rows: None,
        model_name: None,
        model_version: None,
        rollout_id: None,
        evaluation: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_records_and_rule_aggregates_on_both_databases() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = StoreConfig {
        url: format!("sqlite://{}", dir.path().join("fleet.db").display()),
        ..StoreConfig::default()
    };
    job_store_checks(Store::open(&sqlite).await.expect("SQLite store")).await;
    let postgres = TestPostgres::start();
    let config = StoreConfig { url: postgres.url(), ..StoreConfig::default() };
    job_store_checks(
        Store::open(&config).await.unwrap_or_else(|e| panic!("PostgreSQL: {e}\n{}", postgres.log())),
    )
    .await;
}

async fn job_store_checks(store: Store) {
    assert!(store.insert_job(&job("j1", "a", 1000)).await.unwrap());
    assert!(!store.insert_job(&job("j2", "a", 2000)).await.unwrap(), "one active job per template");
    assert!(store.insert_job(&job("j3", "b", 3000)).await.unwrap());
    assert!(store.start_job("j1", 1500, 7).await.unwrap());
    assert!(!store.start_job("j1", 1600, 7).await.unwrap(), "only a queued job starts");
    let outputs = JobOutputs {
        model_name: Some("tiny".into()),
        model_version: Some("5".into()),
        rollout_id: None,
        evaluation: Some(json!({"accuracy": 0.5})),
    };
    assert!(store.finish_job("j1", JobState::Succeeded, None, &outputs, 1800).await.unwrap());
    assert!(
        !store.finish_job("j1", JobState::Failed, Some("late"), &JobOutputs::default(), 1900).await.unwrap()
    );
    let j1 = store.job("j1").await.unwrap().unwrap();
    assert_eq!(
        (j1.state, j1.started_ms, j1.finished_ms, j1.dataset_rows),
        (JobState::Succeeded, Some(1500), Some(1800), Some(7))
    );
    assert_eq!(j1.model_version.as_deref(), Some("5"));
    assert_eq!(j1.evaluation, Some(json!({"accuracy": 0.5})));
    assert!(store.insert_job(&job("j2", "a", 2000)).await.unwrap(), "a finished job does not block");
    assert_eq!(store.latest_job("a").await.unwrap().unwrap().id, "j2");
    let ids: Vec<String> = store.list_jobs(10).await.unwrap().into_iter().map(|j| j.id).collect();
    assert_eq!(ids, ["j3", "j2", "j1"]);
    assert_eq!(store.fail_active_jobs(FLEET_RESTARTED, 5000).await.unwrap(), 2);
    assert_eq!(store.job("j3").await.unwrap().unwrap().reason.as_deref(), Some(FLEET_RESTARTED));

    let t0 = 1_704_067_200_000_i64;
    let mut events: Vec<TelemetryEvent> = (0..10)
        .map(|i| event("d1", "m@1", (t0 + i) as u64, if i < 4 { Route::Cloud } else { Route::Local }, 10, 20))
        .collect();
    events.push(event("d1", "m@2", (t0 - 10) as u64, Route::Cloud, 10, 20));
    for (i, e) in events.iter_mut().enumerate().take(3) {
        e.prompt = Some(format!("prompt {i}"));
        e.cloud_answer = (i == 0).then(|| "answer".to_string());
    }
    store.insert_events(&events, 10_000).await.unwrap();
    let traffic = store.version_traffic(t0).await.unwrap();
    assert_eq!(traffic.len(), 1);
    assert_eq!((traffic[0].model_version.as_str(), traffic[0].queries, traffic[0].cloud), ("m@1", 10, 4));
    assert_eq!(store.version_traffic(t0 - 100).await.unwrap().len(), 2);
    assert_eq!(store.count_prompts_received_since(9_999).await.unwrap(), 3);
    assert_eq!(store.count_prompts_received_since(10_000).await.unwrap(), 0);
    let first = store.collected_prompts(0, None, 2).await.unwrap();
    assert_eq!(first.len(), 2);
    assert_eq!(first[0].prompt, "prompt 0");
    assert_eq!(first[0].cloud_answer.as_deref(), Some("answer"));
    let rest = store.collected_prompts(0, Some(&first[1].id), 2).await.unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].prompt, "prompt 2");
    store.close().await;
}
