//! The OpenAI-compatible client against the solver cloud served over HTTP: answers arrive, are
//! graded correct, and each question crosses the network once per run (the cache persists).

use tandem_core::tasks::grading::grade_countdown;
use tandem_train::cloud::cache::CloudCache;
use tandem_train::cloud::client::{HttpCloud, HttpCloudConfig};
use tandem_train::cloud::solver::{SOLVER_MODEL, SolverOptions, SolverServer};
use tandem_train::cloud::{CachedCloud, CloudOracle, CloudTransport};

use crate::support::problems;

#[test]
fn the_http_client_gets_solver_answers_and_asks_each_question_once() {
    let server = SolverServer::spawn(([127, 0, 0, 1], 0).into(), SolverOptions::default()).unwrap();
    let problems = problems(6, 3);
    let questions: Vec<String> = problems.iter().map(|p| p.question()).collect();
    let client = HttpCloud::new(HttpCloudConfig::new(server.url(), SOLVER_MODEL)).unwrap();
    let direct = client.ask_all(&questions).unwrap();
    for (problem, answer) in problems.iter().zip(&direct) {
        assert!(grade_countdown(problem, answer), "{answer}");
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cloud_cache.jsonl");
    let mut cloud = CachedCloud::new(client, CloudCache::open(&path).unwrap());
    let mut doubled = questions.clone();
    doubled.extend(questions.iter().cloned());
    assert_eq!(cloud.answers(&doubled).unwrap()[..6], direct[..]);
    assert_eq!(cloud.stats().queries, 6);
    drop(cloud);
    let client = HttpCloud::new(HttpCloudConfig::new(server.url(), SOLVER_MODEL)).unwrap();
    let mut reopened = CachedCloud::new(client, CloudCache::open(&path).unwrap());
    reopened.answers(&questions).unwrap();
    assert_eq!(reopened.stats().queries, 0, "a restarted run asks nothing it asked before");
}

#[test]
fn an_unreachable_cloud_is_an_error_not_a_wrong_answer() {
    let server = SolverServer::spawn(([127, 0, 0, 1], 0).into(), SolverOptions::default()).unwrap();
    let url = server.url();
    drop(server);
    let mut config = HttpCloudConfig::new(url, SOLVER_MODEL);
    config.attempts = 1;
    config.timeout_ms = 2_000;
    let client = HttpCloud::new(config).unwrap();
    assert!(client.ask_all(&["Using the numbers [1, 2], write …".to_string()]).is_err());
}
