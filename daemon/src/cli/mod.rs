//! Command-line interface of `tandemd`: one subcommand per file.

use clap::{Parser, Subcommand};
use tandemd::engine::EngineError;

mod generate;

/// The Tandem edge daemon.
#[derive(Debug, Parser)]
#[command(name = "tandemd", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate text from a prompt with a local model (no chat template, no server).
    Generate(generate::GenerateArgs),
}

/// Runs the chosen subcommand.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Generate(args) => generate::run(args),
    }
}

/// 2 when the user can fix the input or configuration, 1 otherwise.
pub fn exit_code(error: &anyhow::Error) -> u8 {
    let user_error = error.chain().any(|cause| {
        cause.downcast_ref::<EngineError>().is_some_and(EngineError::is_user_error)
            || cause.downcast_ref::<generate::UsageError>().is_some()
    });
    if user_error { 2 } else { 1 }
}
