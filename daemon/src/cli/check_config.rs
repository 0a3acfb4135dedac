//! `tandemd check-config`: loads and validates the configuration, then prints "configuration OK"
//! and what `serve` would run. Nothing is bound or loaded.

use std::fmt::Write;

use clap::Args;
use tandemd::config::DaemonConfig;
use tandemd::telemetry::TelemetryTransport;

use super::config_args::ConfigArgs;

/// Arguments of `tandemd check-config`.
#[derive(Debug, Args)]
pub struct CheckConfigArgs {
    #[command(flatten)]
    config: ConfigArgs,
}

pub fn run(args: CheckConfigArgs) -> anyhow::Result<()> {
    let config = args.config.load()?;
    config.validate()?;
    print!("{}", summary(&config));
    Ok(())
}

/// How model updates happen, in words.
fn updates(config: &DaemonConfig) -> String {
    let updater = &config.updater;
    if !updater.enabled {
        return "off (serve loads what `tandemd update` installed, at its next start)".to_string();
    }
    let mut sources = Vec::new();
    if updater.mqtt && config.mqtt.is_some() {
        sources.push("the MQTT assignment topic".to_string());
    }
    if let Some(url) = &updater.poll_url {
        sources.push(format!("polling {url} every {} s", updater.poll_interval_secs));
    }
    let limit = updater.bandwidth_limit.map_or("unlimited".to_string(), |b| format!("{b} B/s"));
    format!(
        "following {} while serving; download {limit}; probe {} tokens, then swap; probation: {} passing \
         probes every {} s commit",
        sources.join(" and "),
        updater.probe_max_tokens,
        updater.probation.probes_to_commit,
        updater.health_probe_interval_secs
    )
}

/// "configuration OK" and one line per part that will run.
fn summary(config: &DaemonConfig) -> String {
    let mut out = String::from("configuration OK\n");
    let model = config.model_dir.as_ref().map_or("(none)".to_string(), |dir| dir.display().to_string());
    let providers = config.engine.execution_providers.iter().map(ToString::to_string).collect::<Vec<_>>();
    let auth = if config.server.api_token.is_some() { "bearer token" } else { "none" };
    let offload = if config.cloud.is_enabled() {
        let transports = config
            .cloud
            .transport_order()
            .iter()
            .map(|t| match t {
                tandem_core::protocol::Transport::Https => {
                    let https = config.cloud.https.as_ref();
                    format!(
                        "https {} (model {})",
                        https.map_or("", |h| h.url.as_str()),
                        https.map_or("", |h| h.model.as_str())
                    )
                }
                tandem_core::protocol::Transport::Mqtt => "mqtt via the fleet gateway".to_string(),
            })
            .collect::<Vec<_>>();
        format!(
            "{}; budget {:.0}% of queries",
            transports.join(", then "),
            config.budget.cloud_fraction * 100.0
        )
    } else {
        "off (every query is answered on the device)".to_string()
    };
    let telemetry = match &config.telemetry.transport {
        TelemetryTransport::Mqtt => "mqtt".to_string(),
        TelemetryTransport::Https { url } => format!("https {url}"),
        TelemetryTransport::None => "spool only".to_string(),
    };
    let _ = writeln!(out, "  device:    {}", config.device_id);
    let _ = writeln!(out, "  model:     {model} on {}", providers.join(" → "));
    let _ = writeln!(
        out,
        "  listen:    http://{} (auth: {auth}, queue {})",
        config.server.listen, config.server.max_queue
    );
    let _ = writeln!(out, "  offload:   {offload}");
    let _ = writeln!(out, "  telemetry: {telemetry}");
    let _ = writeln!(out, "  updates:   {}", updates(config));
    if let Some(mqtt) = &config.mqtt {
        let _ = writeln!(out, "  mqtt:      {}", mqtt.url);
    }
    let _ = writeln!(out, "  state dir: {}", config.state_dir.display());
    out
}
