//! Waiting for a condition the fleet reaches asynchronously.

use std::time::{Duration, Instant};

/// Polls `check` every 100 ms until it holds; fails the test after 60 s, naming `what`.
pub async fn wait_until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < Duration::from_secs(60), "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
