//! `tandemd serve`: load → validate → build → run (logging is set up right after loading, so that
//! validation's warnings reach the journal). Works without any configuration file:
//! `tandemd serve --model DIR --listen ADDR [--cloud-url URL]`.

use anyhow::Context;
use clap::Args;
use tandemd::ops::{Daemon, init_logging};

use super::config_args::ConfigArgs;

/// Arguments of `tandemd serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    config: ConfigArgs,
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let config = args.config.load()?;
    let output = init_logging(&config.logging).context("could not set up logging")?;
    tracing::debug!(?output, "logging set up");
    config.validate()?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("tandemd")
        .build()
        .context("could not start the async runtime")?;
    runtime.block_on(async move {
        let daemon = Daemon::build(config).await?;
        daemon.run().await
    })?;
    Ok(())
}
