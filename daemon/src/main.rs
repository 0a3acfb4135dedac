//! The `tandemd` binary: parses the command line, runs the subcommand (which sets up logging), and
//! maps errors to exit codes (2 for usage, input and configuration errors, 1 for everything else).

use std::process::ExitCode;

use clap::Parser;

mod cli;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(cli::exit_code(&error))
        }
    }
}
