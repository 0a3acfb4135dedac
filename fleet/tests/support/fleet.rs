//! A fleet running inside the test process, on loopback ports chosen by the OS, with its own
//! temporary SQLite database unless the test sets another store. Its API speaks HTTPS when the test
//! sets `[api.tls]`; [`TestFleet::trusting`] then names the CA its clients trust.

use std::net::SocketAddr;
use std::path::PathBuf;

use tandem_fleet::config::FleetConfig;
use tandem_fleet::serve::RunningFleet;

pub struct TestFleet {
    pub fleet: Option<RunningFleet>,
    pub dir: tempfile::TempDir,
    pub api: SocketAddr,
    pub mqtt: Option<SocketAddr>,
    pub mqtts: Option<SocketAddr>,
    /// CA certificates the test's clients trust for the API's HTTPS (see [`TestFleet::trusting`]).
    pub extra_ca: Vec<reqwest::Certificate>,
    config: FleetConfig,
}

impl TestFleet {
    /// A fleet with anonymous access to the embedded broker, changed by `configure`.
    pub async fn start(configure: impl FnOnce(&mut FleetConfig, &std::path::Path)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = FleetConfig::default();
        config.store.url = format!("sqlite://{}", dir.path().join("fleet.db").display());
        config.mqtt.embedded.listen = Some("127.0.0.1:0".parse().unwrap());
        config.mqtt.embedded.allow_anonymous = true;
        config.api.listen = "127.0.0.1:0".parse().unwrap();
        configure(&mut config, dir.path());
        config.validate().unwrap_or_else(|e| panic!("{e:?}"));
        let fleet = tandem_fleet::serve::start(config.clone()).await.expect("the fleet starts");
        Self {
            api: fleet.api_address,
            mqtt: fleet.mqtt_address,
            mqtts: fleet.mqtts_address,
            fleet: Some(fleet),
            dir,
            extra_ca: Vec::new(),
            config,
        }
    }

    /// The same fleet, its clients trusting the CA certificates in the PEM file `ca`.
    pub fn trusting(mut self, ca: &std::path::Path) -> Self {
        self.extra_ca = reqwest::Certificate::from_pem_bundle(&std::fs::read(ca).unwrap()).unwrap();
        self
    }

    /// A client for the API, trusting `extra_ca` on top of the system roots.
    pub fn client(&self) -> reqwest::Client {
        let _ = rustls::crypto::ring::default_provider().install_default();
        reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(10))
            .tls_certs_merge(self.extra_ca.iter().cloned())
            .build()
            .unwrap()
    }

    /// Stops the fleet and starts it again with the same configuration, database and ports, as
    /// after a crash: everything it knows must come from the database.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.config.api.listen = self.api;
        self.config.mqtt.embedded.listen = self.mqtt;
        let fleet = tandem_fleet::serve::start(self.config.clone()).await.expect("the fleet starts again");
        self.fleet = Some(fleet);
    }

    pub fn api_url(&self, path: &str) -> String {
        let scheme = if self.config.api.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}{path}", self.api)
    }

    pub fn db_path(&self) -> PathBuf {
        self.dir.path().join("fleet.db")
    }

    pub async fn stop(&mut self) {
        if let Some(fleet) = self.fleet.take() {
            fleet.stop().await;
        }
    }

    /// GET `path` (with `token` as bearer when given) as JSON; panics unless 200.
    pub async fn get(&self, path: &str, token: Option<&str>) -> serde_json::Value {
        let mut request = self.client().get(self.api_url(path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.expect("the API answers");
        let status = response.status();
        let text = response.text().await.unwrap();
        assert!(status.is_success(), "GET {path}: {status}\n{text}");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("GET {path}: {e}\n{text}"))
    }

    /// The value of the Prometheus sample `name` (with its labels, e.g. `x_total{reason="y"}`), 0
    /// when absent.
    pub async fn metric(&self, sample: &str) -> f64 {
        let text = self.client().get(self.api_url("/metrics")).send().await.unwrap().text().await.unwrap();
        text.lines()
            .find_map(|line| line.strip_prefix(sample).and_then(|rest| rest.trim().parse().ok()))
            .unwrap_or(0.0)
    }
}

/// An HTTP client for the API.
pub fn http() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().timeout(std::time::Duration::from_secs(10)).build().unwrap()
}
