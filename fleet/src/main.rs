//! `tandem-fleet`: the fleet service and its tools. Errors are printed with their causes; the exit
//! code is 2 when the configuration or input is wrong, 1 otherwise.

use std::io::{BufRead, IsTerminal};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use tandem_fleet::broker::acl::mosquitto_acl;
use tandem_fleet::config::{FleetConfig, load_config};
use tandem_fleet::devices_file::{MIN_PASSWORD_CHARS, hash_password};
use tandem_fleet::loadgen::{FollowOptions, LoadOptions, SinkOptions, run_load_until, run_sink};
use tracing_subscriber::EnvFilter;

/// The Tandem fleet service.
#[derive(Debug, Parser)]
#[command(name = "tandem-fleet", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the fleet: broker (or external broker client), ingest, gateway, API and dashboard.
    Serve(ConfigArgs),
    /// Check the configuration and say what `serve` would run (exit 2 when invalid).
    CheckConfig(ConfigArgs),
    /// Print the effective configuration as TOML.
    PrintConfig(ConfigArgs),
    /// Hash a device password (read from stdin) for the devices file.
    HashPassword,
    /// Print a Mosquitto acl_file with the fleet's topic rules.
    MosquittoAcl {
        /// The fleet's own MQTT user name.
        #[arg(long, default_value = "tandem-fleet")]
        fleet_user: String,
    },
    /// Simulate devices publishing telemetry (and offload requests) over MQTT; prints a JSON report.
    Loadgen(LoadArgs),
    /// Subscribe to every device's telemetry and only count it (the broker's ceiling); prints JSON.
    Sink(SinkArgs),
    /// The model registry (`[registry]` in the configuration).
    Registry {
        #[command(subcommand)]
        command: RegistryCommand,
    },
    /// Retraining jobs (`[scheduler]` in the configuration), through the running fleet's API.
    Jobs {
        #[command(subcommand)]
        command: JobsCommand,
    },
}

#[derive(Debug, Subcommand)]
enum JobsCommand {
    /// Start a job of a template on the running fleet and wait for it, printing its state and log
    /// as it goes, then the job as JSON; exit 0 when it succeeded, 1 otherwise.
    Run {
        #[command(flatten)]
        config: ConfigArgs,
        /// The job template (`[[scheduler.template]]` name).
        #[arg(long)]
        template: String,
        /// Set a key of the run configuration: `--set run.steps=200` (the value is TOML; text
        /// that is not TOML is taken as a string).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// The fleet's API (default: http:// and api.listen of the configuration).
        #[arg(long)]
        url: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum RegistryCommand {
    /// Verify a signed bundle folder on this host (files, sizes, sha256, signature against
    /// registry.trusted_keys), copy it into registry.dir and record it; prints the record as JSON.
    Add {
        #[command(flatten)]
        config: ConfigArgs,
        /// The bundle folder (manifest.json and the files it lists).
        #[arg(long)]
        bundle: PathBuf,
    },
    /// Print every registered bundle as JSON.
    List(ConfigArgs),
}

#[derive(Debug, clap::Args)]
struct ConfigArgs {
    /// The configuration file (default: /etc/tandem/fleet.toml when it exists, else built-in defaults).
    #[arg(long)]
    config: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct LoadArgs {
    /// Broker address, `mqtt://HOST:PORT` or `HOST:PORT`.
    #[arg(long)]
    url: String,
    /// Simulated devices.
    #[arg(long, default_value_t = 100)]
    devices: usize,
    /// Device id prefix.
    #[arg(long, default_value = "sim-")]
    device_prefix: String,
    /// Password of every simulated device (user name = device id).
    #[arg(long)]
    password: Option<String>,
    /// Telemetry events per second over all devices (0: as fast as the broker acknowledges).
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Events per message.
    #[arg(long, default_value_t = 10)]
    batch: usize,
    /// Seconds of publishing.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds to wait afterwards for outstanding acknowledgements.
    #[arg(long, default_value_t = 30.0)]
    drain: f64,
    /// Unacknowledged messages per device, at most.
    #[arg(long, default_value_t = 16)]
    max_in_flight: usize,
    /// Offload requests per second over all devices.
    #[arg(long, default_value_t = 0.0)]
    offload_rate: f64,
    /// Model version in the events.
    #[arg(long, default_value = "sim-model@1")]
    model_version: String,
    /// Append the id of every acknowledged event to this file.
    #[arg(long)]
    acked_ids: Option<PathBuf>,
    /// Act on model assignments like tandemd's updater: download and verify the bundle, report
    /// downloading → verifying → active, then send telemetry from the new version.
    #[arg(long)]
    follow_assignments: bool,
    /// With --follow-assignments: report the states without downloading anything.
    #[arg(long, requires = "follow_assignments")]
    skip_download: bool,
    /// With --follow-assignments: bundle downloads in progress at once over all devices.
    #[arg(long, default_value_t = 32)]
    download_concurrency: usize,
    /// With --follow-assignments: a public key file (`NAME.pub`) the manifest's signature must
    /// verify against (repeatable; none: the signature is not checked, the manifest's sha256 is).
    #[arg(long = "trusted-key", value_name = "FILE")]
    trusted_keys: Vec<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct SinkArgs {
    /// Broker address, `mqtt://HOST:PORT` or `HOST:PORT`.
    #[arg(long)]
    url: String,
    /// Stop after this many seconds without a message.
    #[arg(long, default_value_t = 3.0)]
    idle: f64,
    /// Stop after this many seconds in any case.
    #[arg(long, default_value_t = 600.0)]
    limit: f64,
    /// Create this file once subscribed.
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(if matches!(cli.command, Command::Serve(_)) { "info" } else { "warn" })
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match run(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("tandem-fleet: {error:#}");
            let user_error = error.chain().any(|cause| {
                cause.is::<tandem_fleet::config::ConfigError>()
                    || cause.is::<InvalidConfig>()
                    || cause.is::<tandem_fleet::devices_file::DevicesFileError>()
                    || cause.is::<tandem_fleet::registry::RegistryError>()
            });
            ExitCode::from(if user_error { 2 } else { 1 })
        }
    }
}

/// The configuration failed validation (reported already).
#[derive(Debug, thiserror::Error)]
#[error("the configuration is not valid")]
struct InvalidConfig;

fn load_valid(args: &ConfigArgs) -> anyhow::Result<FleetConfig> {
    let config = load_config(args.config.as_deref())?;
    if let Err(errors) = config.validate() {
        for error in &errors {
            eprintln!("error: {error}");
        }
        return Err(InvalidConfig.into());
    }
    Ok(config)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the async runtime")
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve(args) => {
            let config = load_valid(&args)?;
            runtime()?.block_on(serve(config))?;
        }
        Command::CheckConfig(args) => {
            let config = load_valid(&args)?;
            println!("configuration is valid");
            println!("store: {}", config.store.url);
            match config.mqtt.mode {
                tandem_fleet::config::MqttMode::Embedded => {
                    let broker = &config.mqtt.embedded;
                    println!("mqtt: embedded broker on {:?} (TLS {:?})", broker.listen, broker.tls_listen);
                }
                tandem_fleet::config::MqttMode::External => {
                    let external = config.mqtt.external.as_ref().expect("validated");
                    println!("mqtt: client of {} as {}", external.url, external.client_id);
                }
            }
            if let Some(path) = &config.devices_file {
                let devices = tandem_fleet::devices_file::Devices::load(path)?;
                println!("devices file: {} ({} devices)", path.display(), devices.groups().len());
            }
            match &config.api.tls {
                Some(tls) => {
                    // The files are read only here and at start, not by `validate` (plain data).
                    if let Err(error) = tandem_fleet::api::tls::acceptor(tls) {
                        eprintln!("error: api.tls: {error}");
                        return Err(InvalidConfig.into());
                    }
                    println!("api: https://{} (certificate {})", config.api.listen, tls.cert_file.display());
                }
                None => println!("api: http://{}", config.api.listen),
            }
            println!("gateway: {} upstream endpoint(s)", config.gateway.upstream.len());
        }
        Command::PrintConfig(args) => {
            let config = load_config(args.config.as_deref())?;
            print!("{}", config.to_toml());
        }
        Command::HashPassword => {
            let mut line = String::new();
            std::io::stdin().lock().read_line(&mut line).context("cannot read the password from stdin")?;
            let password = line.trim_end_matches(['\r', '\n']);
            if password.chars().count() < MIN_PASSWORD_CHARS {
                eprintln!(
                    "the password must be at least {MIN_PASSWORD_CHARS} characters (generate one, e.g. `openssl rand -base64 24`)"
                );
                return Ok(ExitCode::from(2));
            }
            println!("{}", hash_password(password));
        }
        Command::MosquittoAcl { fleet_user } => print!("{}", mosquitto_acl(&fleet_user)),
        Command::Loadgen(args) => {
            let options = LoadOptions {
                broker: host_port(&args.url)?,
                devices: args.devices,
                device_prefix: args.device_prefix,
                password: args.password,
                rate: args.rate,
                batch: args.batch.max(1),
                duration: Duration::from_secs_f64(args.duration),
                drain: Duration::from_secs_f64(args.drain),
                max_in_flight: args.max_in_flight.max(1),
                offload_rate: args.offload_rate,
                model_version: args.model_version,
                follow: if args.follow_assignments {
                    let trusted_keys = args
                        .trusted_keys
                        .iter()
                        .map(|path| {
                            let text = std::fs::read_to_string(path)
                                .with_context(|| format!("cannot read {}", path.display()))?;
                            tandem_core::bundle::signature::parse_public_key(&text)
                                .with_context(|| format!("{} is not a public key file", path.display()))
                        })
                        .collect::<anyhow::Result<_>>()?;
                    Some(FollowOptions {
                        download: !args.skip_download,
                        download_concurrency: args.download_concurrency.max(1),
                        trusted_keys,
                    })
                } else {
                    None
                },
                acked_ids: args.acked_ids,
            };
            // SIGINT or SIGTERM: stop publishing, drain, and still print the report.
            let report = runtime()?.block_on(async move {
                let stop = tokio_util::sync::CancellationToken::new();
                let on_signal = stop.clone();
                tokio::spawn(async move {
                    let Ok(mut term) =
                        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => {}
                        _ = term.recv() => {}
                    }
                    on_signal.cancel();
                });
                run_load_until(options, stop).await
            })?;
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        Command::Sink(args) => {
            let address = host_port(&args.url)?;
            let (host, port) = address.rsplit_once(':').context("HOST:PORT")?;
            let options = SinkOptions {
                host: host.to_string(),
                port: port.parse().context("the port")?,
                idle: Duration::from_secs_f64(args.idle),
                limit: Duration::from_secs_f64(args.limit),
            };
            let report = runtime()?.block_on(async move {
                let (ready, subscribed) = tokio::sync::oneshot::channel();
                let ready_file = args.ready_file.clone();
                tokio::spawn(async move {
                    if subscribed.await.is_ok()
                        && let Some(path) = ready_file
                    {
                        let _ = std::fs::write(path, b"subscribed\n");
                    }
                });
                run_sink(options, ready).await
            });
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        Command::Registry { command } => registry(command)?,
        Command::Jobs { command: JobsCommand::Run { config, template, overrides, url } } => {
            let config = load_valid(&config)?;
            return runtime()?.block_on(jobs_run(&config, &template, &overrides, url));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `jobs run`: POST /v1/jobs, then GET /v1/jobs/{id} every second until the job ends.
async fn jobs_run(
    config: &FleetConfig,
    template: &str,
    overrides: &[String],
    url: Option<String>,
) -> anyhow::Result<ExitCode> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let base = url.unwrap_or_else(|| {
        let mut address = config.api.listen;
        if address.ip().is_unspecified() {
            address.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        format!("http://{address}")
    });
    let base = base.trim_end_matches('/').to_string();
    let token = config.api.token.as_ref().map(tandemd::offload::read_secret).transpose()?;
    let mut set = serde_json::Map::new();
    for item in overrides {
        let (key, value) =
            item.split_once('=').with_context(|| format!("--set {item}: expected KEY=VALUE"))?;
        let value: toml::Value = toml::from_str::<toml::Table>(&format!("v = {value}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(value.to_string()));
        set.insert(key.to_string(), serde_json::to_value(value)?);
    }
    let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build()?;
    let authorized = |request: reqwest::RequestBuilder| match &token {
        Some(token) => request.bearer_auth(token.expose()),
        None => request,
    };
    let body = serde_json::json!({ "template": template, "overrides": set });
    let response = authorized(client.post(format!("{base}/v1/jobs")).json(&body))
        .send()
        .await
        .with_context(|| format!("cannot reach the fleet at {base}"))?;
    let status = response.status();
    let job: serde_json::Value = response.json().await.context("the fleet's answer is not JSON")?;
    if !status.is_success() {
        bail!("the fleet refused the job ({status}): {}", job["error"].as_str().unwrap_or("no reason given"));
    }
    let id = job["id"].as_str().context("the fleet's answer has no job id")?.to_string();
    eprintln!("job {id} ({template}): queued");
    let (mut state, mut tail) = (String::from("queued"), Vec::<String>::new());
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let response = authorized(client.get(format!("{base}/v1/jobs/{id}"))).send().await;
        let job: serde_json::Value = match response {
            Ok(response) if response.status().is_success() => response.json().await?,
            Ok(response) => bail!("GET /v1/jobs/{id}: {}", response.status()),
            Err(error) => {
                eprintln!("cannot reach the fleet ({error}); trying again");
                continue;
            }
        };
        let now: Vec<String> = job["log_tail"].as_str().unwrap_or("").lines().map(str::to_string).collect();
        for line in new_lines(&tail, &now) {
            eprintln!("  | {line}");
        }
        tail = now;
        let current = job["state"].as_str().unwrap_or("unknown").to_string();
        if current != state {
            let reason = job["reason"].as_str().map(|r| format!(": {r}")).unwrap_or_default();
            eprintln!("job {id}: {current}{reason}");
            state = current;
        }
        if !matches!(state.as_str(), "queued" | "running") {
            println!("{}", serde_json::to_string_pretty(&job)?);
            return Ok(if state == "succeeded" { ExitCode::SUCCESS } else { ExitCode::from(1) });
        }
    }
}

/// The lines of `now` (a log's tail) after those already shown in `before` (its earlier tail).
fn new_lines<'a>(before: &[String], now: &'a [String]) -> &'a [String] {
    let overlap = (0..=before.len().min(now.len()))
        .rev()
        .find(|&k| before[before.len() - k..] == now[..k])
        .unwrap_or(0);
    &now[overlap..]
}

fn registry(command: RegistryCommand) -> anyhow::Result<()> {
    let args = match &command {
        RegistryCommand::Add { config, .. } | RegistryCommand::List(config) => config,
    };
    let config = load_valid(args)?;
    let Some(registry_config) = &config.registry else {
        return Err(InvalidConfig).context("the configuration has no [registry] section");
    };
    runtime()?.block_on(async {
        let store = tandem_fleet::store::Store::open(&config.store).await?;
        let result = match command {
            RegistryCommand::Add { bundle, .. } => {
                let registry =
                    tandem_fleet::registry::Registry::open(registry_config, config.registry_s3.as_ref())?;
                let registered = registry.register(&store, &bundle).await;
                registered.map(|r| {
                    let mut value = serde_json::to_value(&r.model).expect("records serialise");
                    value["created"] = r.created.into();
                    value
                })
            }
            RegistryCommand::List(_) => {
                let models = store.list_models().await?;
                Ok(serde_json::json!({ "models": models }))
            }
        };
        store.close().await;
        println!("{}", serde_json::to_string_pretty(&result?)?);
        anyhow::Ok(())
    })
}

fn host_port(url: &str) -> anyhow::Result<String> {
    let rest = url.strip_prefix("mqtt://").unwrap_or(url).trim_end_matches('/');
    if !rest.contains(':') {
        bail!("`{url}`: expected mqtt://HOST:PORT");
    }
    Ok(rest.to_string())
}

async fn serve(config: FleetConfig) -> anyhow::Result<()> {
    let fleet = tandem_fleet::serve::start(config).await?;
    let shutdown = fleet.shutdown_token();
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot listen for SIGTERM")?;
    // tandem-fleet.service is Type=notify with a watchdog: ready once every listener is bound.
    tandemd::ops::notify_ready("serving");
    let watchdog = tandemd::ops::spawn_watchdog(shutdown.clone().cancelled_owned());
    tokio::select! {
        _ = terminate.recv() => tracing::info!("SIGTERM: stopping"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted: stopping"),
        () = shutdown.cancelled() => {}
    }
    tandemd::ops::notify_stopping("stopping");
    fleet.stop().await;
    if let Some(watchdog) = watchdog {
        watchdog.abort();
    }
    Ok(())
}
