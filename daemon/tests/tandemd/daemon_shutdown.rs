//! Stopping the daemon: running requests finish, new connections are refused, work still running
//! after the drain time is cancelled, and the backend's shutdown hook runs last.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::FutureExt;
use tandemd::chat::ChatBackend;
use tandemd::config::DaemonConfig;
use tandemd::ops::{BuiltBackend, Daemon, Shutdown};

use crate::support::{Behaviour, FakeBackend, client, eventually, hello, settings};

struct Running {
    url: String,
    backend: Arc<FakeBackend>,
    shutdown: Shutdown,
    hook_ran: Arc<AtomicBool>,
    run: tokio::task::JoinHandle<Result<(), tandemd::ops::DaemonError>>,
}

async fn start(backend: FakeBackend, drain_secs: u64) -> Running {
    let backend = Arc::new(backend);
    let hook_ran = Arc::new(AtomicBool::new(false));
    let built = BuiltBackend::new(Arc::clone(&backend) as Arc<dyn ChatBackend>).with_shutdown_hook({
        let hook_ran = Arc::clone(&hook_ran);
        move || async move { hook_ran.store(true, Ordering::SeqCst) }.boxed()
    });
    let mut config = DaemonConfig::default();
    config.server.shutdown_drain_secs = drain_secs;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let shutdown = Shutdown::new();
    let daemon = Daemon::with_backend(&config, settings(), listener, built, shutdown.clone());
    let url = format!("http://{}/v1/chat/completions", daemon.local_addr().unwrap());
    Running { url, backend, shutdown, hook_ran, run: tokio::spawn(daemon.run()) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_running_requests_finish_then_runs_the_hook() {
    let running = start(FakeBackend::echo().with_delay(Duration::from_millis(500)), 30).await;
    let in_flight = tokio::spawn({
        let url = running.url.clone();
        async move { client().post(url).json(&hello()).send().await.unwrap().status() }
    });
    eventually(|| running.backend.request_count() == 1, "the request to reach the backend").await;

    running.shutdown.begin();
    assert_eq!(in_flight.await.unwrap(), 200, "the running request was answered");
    tokio::time::timeout(Duration::from_secs(10), running.run).await.unwrap().unwrap().unwrap();
    assert!(running.hook_ran.load(Ordering::SeqCst), "the shutdown hook ran");
    assert!(!running.backend.all_cancelled());
    assert!(client().post(&running.url).json(&hello()).send().await.is_err(), "no longer accepting");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_still_running_after_the_drain_time_are_cancelled() {
    let running = start(FakeBackend::echo().with_behaviour(Behaviour::Hang), 0).await;
    let in_flight = tokio::spawn({
        let url = running.url.clone();
        async move { client().post(url).json(&hello()).send().await.map(|r| r.status()) }
    });
    eventually(|| running.backend.request_count() == 1, "the request to reach the backend").await;

    running.shutdown.begin();
    tokio::time::timeout(Duration::from_secs(10), running.run).await.unwrap().unwrap().unwrap();
    assert!(running.backend.all_cancelled(), "the hanging generation was cancelled");
    assert!(running.hook_ran.load(Ordering::SeqCst));
    if let Ok(status) = in_flight.await.unwrap() {
        assert_eq!(status, 503, "a cancelled request is told the daemon is shutting down");
    }
}
