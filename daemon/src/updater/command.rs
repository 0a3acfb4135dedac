//! The operator's manual update, `tandemd update --from URL`: stage a published bundle into the
//! inactive slot of a stopped daemon's state directory and activate it for the next start. This
//! module holds its arguments and body; the `cli` subcommand that calls [`run_update`] is a separate
//! step. The daemon itself will use the same [`Updater`] for fleet assignments.

use std::num::NonZeroU64;
use std::path::PathBuf;

use reqwest::Url;

use super::download::{DownloadError, DownloadOptions};
use super::fleet_link::FleetCredentials;
use super::probation::ProbationPolicy;
use super::slots::{SlotView, Slots, SlotsError, StagedBundle};
use super::stage::{Assignment, StageError, StageEvent, Staged, Updater};
use crate::bundle_trust::{BundleTrustError, load_trusted_keys};
use crate::offload::{CaFileError, SecretError, SecretSource, read_ca_file, read_secret};

/// Arguments of `tandemd update`.
#[derive(Debug, Clone, clap::Args)]
pub struct UpdateArgs {
    /// Where the bundle is published: the folder URL holding its manifest.json and files.
    #[arg(long, value_name = "URL")]
    pub from: Url,
    /// The daemon's state directory (`state_dir` in its configuration); the slots live in `slots/`.
    #[arg(long, value_name = "DIR")]
    pub state_dir: PathBuf,
    /// A public key (`.pub` from `tandem-train keygen`) the bundle must be signed by; repeatable.
    #[arg(long = "trusted-key", value_name = "FILE")]
    pub trusted_keys: Vec<PathBuf>,
    /// Refuse the bundle unless its manifest has this version.
    #[arg(long)]
    pub version: Option<String>,
    /// Refuse the bundle unless its manifest.json has this sha256.
    #[arg(long, value_name = "HEX")]
    pub manifest_sha256: Option<String>,
    /// Download at most this many bytes per second.
    #[arg(long, value_name = "BYTES_PER_SECOND")]
    pub limit_rate: Option<NonZeroU64>,
    /// Download and verify into the inactive slot without activating it.
    #[arg(long)]
    pub stage_only: bool,
    /// Install the bundle even if this device rolled it back before.
    #[arg(long)]
    pub force: bool,
    /// The device id to authenticate as (HTTP Basic, with `--password-file`), for a fleet
    /// registry that requires device credentials.
    #[arg(long, value_name = "ID", requires = "password_file", conflicts_with = "token_file")]
    pub device_id: Option<String>,
    /// File whose first line is that device's password (its `[mqtt] password_file`).
    #[arg(long, value_name = "FILE", requires = "device_id")]
    pub password_file: Option<PathBuf>,
    /// File whose first line is a bearer token to send instead (the fleet's operator token).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// CA certificates (PEM) to trust on top of the system roots, for a fleet whose HTTPS
    /// certificate comes from a private CA (the daemon's `updater.ca_file`).
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
}

impl UpdateArgs {
    /// The credentials the flags name, read from their files.
    fn credentials(&self) -> Result<Option<FleetCredentials>, SecretError> {
        let read = |path: &PathBuf| read_secret(&SecretSource::File(path.clone()));
        if let Some(path) = &self.token_file {
            return Ok(Some(FleetCredentials::Token(read(path)?)));
        }
        match (&self.device_id, &self.password_file) {
            (Some(id), Some(path)) => {
                Ok(Some(FleetCredentials::Device { id: id.clone(), password: read(path)? }))
            }
            _ => Ok(None),
        }
    }
}

/// How `tandemd update` ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpdateOutcome {
    /// The active slot already runs the bundle.
    AlreadyActive(SlotView),
    /// The bundle is staged but not active (`--stage-only`).
    Staged(StagedBundle),
    /// The bundle is active (on probation) from the next start of tandemd.
    Activated(SlotView),
}

/// Why `tandemd update` failed.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    /// The trusted keys could not be read.
    #[error(transparent)]
    Keys(#[from] BundleTrustError),
    /// The slot store could not be opened or written.
    #[error(transparent)]
    Slots(#[from] SlotsError),
    /// The HTTP client could not be built.
    #[error(transparent)]
    Download(#[from] DownloadError),
    /// The bundle could not be staged.
    #[error(transparent)]
    Stage(#[from] StageError),
    /// `--password-file` or `--token-file` could not be read.
    #[error("the fleet credentials: {0}")]
    Credentials(#[from] SecretError),
    /// `--ca-file` could not be read.
    #[error("--ca-file: {0}")]
    CaFile(#[from] CaFileError),
}

/// Runs `tandemd update`; `on_event` hears about progress.
pub async fn run_update(
    args: &UpdateArgs,
    on_event: &(dyn Fn(&StageEvent) + Send + Sync),
) -> Result<UpdateOutcome, UpdateError> {
    let trusted = load_trusted_keys(&args.trusted_keys)?;
    if trusted.is_empty() {
        tracing::warn!(
            "no --trusted-key given: the bundle's files are checked against its manifest, but nobody vouches for the manifest"
        );
    }
    let slots = Slots::open(&args.state_dir, trusted)?;
    for recovery in slots.recovered() {
        tracing::warn!(?recovery, "recovered from an interrupted run");
    }
    let options = DownloadOptions {
        bandwidth_limit: args.limit_rate,
        credentials: args.credentials()?,
        extra_ca: args.ca_file.as_deref().map(read_ca_file).transpose()?.unwrap_or_default(),
        ..DownloadOptions::default()
    };
    let mut updater = Updater::new(slots, options)?;
    let assignment = Assignment {
        url: args.from.clone(),
        version: args.version.clone(),
        manifest_sha256: args.manifest_sha256.clone(),
        retry_rejected: args.force,
    };
    Ok(match updater.stage(&assignment, on_event).await? {
        Staged::AlreadyActive(view) => UpdateOutcome::AlreadyActive(view),
        Staged::Ready(staged) if args.stage_only => UpdateOutcome::Staged(staged),
        Staged::Ready(staged) => {
            UpdateOutcome::Activated(updater.slots_mut().activate(&staged, ProbationPolicy::default())?)
        }
    })
}
