//! The options shared by `serve`, `check-config` and `print-config`: which configuration file to
//! read and the flags that override it.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;
use tandemd::config::{CliOverrides, ConfigError, ConfigSources, DaemonConfig, load};

/// Where the configuration comes from.
#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// Configuration file (TOML); must exist. Without it /etc/tandem/tandemd.toml is read when it
    /// exists. TANDEM_* environment variables override the file (TANDEM_SERVER__LISTEN=…).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Model directory to serve (overrides `model_dir`).
    #[arg(long, value_name = "DIR")]
    model: Option<PathBuf>,
    /// Address to listen on, e.g. 127.0.0.1:8080 (overrides `server.listen`).
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// OpenAI-compatible endpoint to offload to (overrides `cloud.https.url`; enables HTTPS offload
    /// with model "default" when the configuration has none).
    #[arg(long, value_name = "URL")]
    cloud_url: Option<String>,
}

impl ConfigArgs {
    /// Loads the configuration from the file, the environment and these flags (not validated).
    pub fn load(&self) -> Result<DaemonConfig, ConfigError> {
        let overrides = CliOverrides {
            model_dir: self.model.clone(),
            listen: self.listen,
            cloud_url: self.cloud_url.clone(),
        };
        load(&ConfigSources::from_process(self.config.clone(), overrides)?)
    }
}
