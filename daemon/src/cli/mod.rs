//! Command-line interface of `tandemd`: one subcommand per file.

use std::io::IsTerminal;

use clap::{Parser, Subcommand};
use tandemd::bundle_trust::BundleTrustError;
use tandemd::config::{ConfigError, ValidationError};
use tandemd::engine::EngineError;
use tandemd::ops::LoggingError;
use tracing_subscriber::EnvFilter;

mod check_config;
mod config_args;
mod generate;
mod prepare;
mod print_config;
mod serve;
mod update;

/// The Tandem edge daemon.
#[derive(Debug, Parser)]
#[command(name = "tandemd", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the local OpenAI-compatible API (configuration: /etc/tandem/tandemd.toml or --config,
    /// TANDEM_* variables, flags).
    Serve(serve::ServeArgs),
    /// Check the configuration and print what `serve` would run (exit 2 when invalid).
    CheckConfig(check_config::CheckConfigArgs),
    /// Print the effective configuration as TOML.
    PrintConfig(print_config::PrintConfigArgs),
    /// Generate text from a prompt with a local model (no chat template, no server).
    Generate(generate::GenerateArgs),
    /// Build the TensorRT engines for the configured model ahead of time (the unit runs it before
    /// `serve`; it returns at once when they are already built).
    Prepare(prepare::PrepareArgs),
    /// Download, verify and activate a published model bundle in the inactive A/B slot (served
    /// from the next start, on probation, with the previous slot kept for rollback).
    Update(tandemd::updater::command::UpdateArgs),
}

/// Runs the chosen subcommand. `serve` sets up logging from its configuration; the others log
/// warnings to stderr.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::CheckConfig(args) => {
            init_stderr_logging();
            check_config::run(args)
        }
        Command::PrintConfig(args) => {
            init_stderr_logging();
            print_config::run(args)
        }
        Command::Generate(args) => {
            init_stderr_logging();
            generate::run(args)
        }
        Command::Prepare(args) => {
            init_stderr_logging();
            prepare::run(args)
        }
        Command::Update(args) => {
            init_stderr_logging();
            update::run(args)
        }
    }
}

/// Warnings and errors to stderr (`RUST_LOG` overrides), for the one-shot subcommands.
fn init_stderr_logging() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// 2 when the user can fix the input or configuration, 1 otherwise.
pub fn exit_code(error: &anyhow::Error) -> u8 {
    let user_error = error.chain().any(|cause| {
        cause.downcast_ref::<EngineError>().is_some_and(EngineError::is_user_error)
            || cause.downcast_ref::<generate::UsageError>().is_some()
            || cause.downcast_ref::<BundleTrustError>().is_some()
            || cause.downcast_ref::<ConfigError>().is_some()
            || cause.downcast_ref::<ValidationError>().is_some()
            || cause.downcast_ref::<LoggingError>().is_some()
            || cause.downcast_ref::<tandemd::updater::StartupModelError>().is_some()
    });
    if user_error { 2 } else { 1 }
}
