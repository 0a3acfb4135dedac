//! `tandemd update --from URL`: downloads a published bundle into the inactive model slot
//! (resumable, optionally bandwidth-limited), verifies it, and activates it for the next start of
//! `tandemd serve`, which serves it on probation (crash-looping starts revert to the previous
//! slot). Progress goes to stdout, one line per file and per 10% of the bundle.

use std::sync::Mutex;

use tandemd::updater::StageEvent;
use tandemd::updater::command::{UpdateArgs, UpdateOutcome, run_update};

pub fn run(args: UpdateArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let last_decile = Mutex::new(None::<u64>);
    let report = |event: &StageEvent| match event {
        StageEvent::ManifestChecked { bundle, bytes } => {
            println!("bundle {} v{}: {} bytes to fetch", bundle.name, bundle.version, bytes)
        }
        StageEvent::SlotChosen { slot, resumed } => {
            println!("staging into slot {slot}{}", if *resumed { " (resuming)" } else { "" })
        }
        StageEvent::Progress { bundle_bytes, bundle_size, .. } => {
            let decile = bundle_bytes * 10 / (*bundle_size).max(1);
            let mut last = last_decile.lock().expect("progress lock");
            if *last != Some(decile) {
                *last = Some(decile);
                println!("downloaded {bundle_bytes} of {bundle_size} bytes ({}%)", decile * 10);
            }
        }
        StageEvent::Verifying { slot } => println!("verifying slot {slot}"),
        StageEvent::Staged { slot } => println!("slot {slot} holds the verified bundle"),
    };
    match runtime.block_on(run_update(&args, &report))? {
        UpdateOutcome::AlreadyActive(view) => {
            println!("already serving {} v{} from slot {}", view.bundle.name, view.bundle.version, view.slot)
        }
        UpdateOutcome::Staged(staged) => println!(
            "staged {} v{} (not activated: --stage-only)",
            staged.bundle().name,
            staged.bundle().version
        ),
        UpdateOutcome::Activated(view) => println!(
            "activated {} v{} in slot {}: tandemd serves it from its next start (on probation; \
             restart the service to switch now)",
            view.bundle.name, view.bundle.version, view.slot
        ),
    }
    Ok(())
}
