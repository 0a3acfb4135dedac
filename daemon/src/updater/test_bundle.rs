//! Small synthetic bundles for the updater's unit tests: real manifests with real digests, optionally
//! signed, placed into slots the way staging would.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use tandem_core::bundle::signature::{SigningKey, sign_manifest};
use tandem_core::bundle::{FileDigest, MANIFEST_FILE, MODEL_FILE, TOKENIZER_FILE};

use super::slots::{Slots, StagedBundle, StagingStart};
use super::state::BundleId;
use crate::test_support::tiny_manifest;

/// Writes bundle `version` (its files differ per version) into `dir`; returns its id.
pub(crate) fn write_bundle(dir: &Path, version: &str, key: Option<&SigningKey>) -> BundleId {
    fs::create_dir_all(dir).unwrap();
    let files: BTreeMap<&str, Vec<u8>> = BTreeMap::from([
        (MODEL_FILE, format!("graph of version {version}").into_bytes()),
        (TOKENIZER_FILE, b"{}".to_vec()),
    ]);
    for (name, bytes) in &files {
        fs::write(dir.join(name), bytes).unwrap();
    }
    let listed: Vec<(&str, &[u8])> = files.iter().map(|(name, bytes)| (*name, bytes.as_slice())).collect();
    let mut manifest = tiny_manifest("tiny", version, &listed);
    if let Some(key) = key {
        sign_manifest(&mut manifest, key);
    }
    let text = manifest.to_json_pretty();
    fs::write(dir.join(MANIFEST_FILE), &text).unwrap();
    BundleId {
        name: "tiny".into(),
        version: version.into(),
        manifest_sha256: FileDigest::of_bytes(text.as_bytes()).sha256,
    }
}

/// Stages bundle `version` into `slots` without a download: the state-file steps of staging, with
/// the files written directly.
pub(crate) fn stage_locally(slots: &mut Slots, version: &str, key: Option<&SigningKey>) -> StagedBundle {
    let scratch = tempfile::tempdir().unwrap();
    let bundle = write_bundle(scratch.path(), version, key);
    let (slot, dir, start) = slots.begin_staging(&bundle).unwrap();
    if start != StagingStart::AlreadyReady {
        for entry in fs::read_dir(scratch.path()).unwrap() {
            let entry = entry.unwrap();
            fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
        }
    }
    slots.mark_ready(slot, &bundle).unwrap()
}
