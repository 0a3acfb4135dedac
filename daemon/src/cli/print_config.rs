//! `tandemd print-config`: the effective configuration (defaults, file, environment and flags
//! merged) as TOML. Not validated, so it also helps to find why a configuration is refused.

use anyhow::Context;
use clap::Args;

use super::config_args::ConfigArgs;

/// Arguments of `tandemd print-config`.
#[derive(Debug, Args)]
pub struct PrintConfigArgs {
    #[command(flatten)]
    config: ConfigArgs,
}

pub fn run(args: PrintConfigArgs) -> anyhow::Result<()> {
    let config = args.config.load()?;
    print!("{}", config.to_toml().context("could not write the configuration as TOML")?);
    Ok(())
}
