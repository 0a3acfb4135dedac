//! The TensorRT engine cache: one directory per combination of everything a built engine depends on,
//! so an engine is only ever loaded where it was built for.
//!
//! TensorRT engines are not portable: ONNX Runtime's documentation asks to clean the cache whenever
//! the model, ONNX Runtime, TensorRT or the hardware changes, and fp16 and fp32 engines differ. Instead
//! of cleaning, every combination gets its own directory under the configured `engine_cache_dir`,
//! named after its key so that `ls /var/cache/tandem/trt` explains itself:
//! `<model sha256, 16 hex>-ort<version>-trt<version>-<gpu>-<fp16|fp32>`. Keeping old directories makes
//! a rollback to the previous model slot start without a rebuild; `systemctl clean --what=cache
//! tandemd` removes them all.
//!
//! `tandemd prepare` fills a directory ahead of time, driving the engine through the shapes a
//! [`TrtProfile`] covers, and records what it did in [`PREPARED_FILE`]. Detecting the versions and the
//! GPU is best effort: what cannot be found is spelled `unknown`, which still keeps the key stable on
//! one machine.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};
use tandem_core::bundle::{FileDigest, MODEL_FILE};

use super::config::{EngineConfig, ProviderConfig};
use super::error::EngineError;
use super::model_dir::ModelDir;
use super::ort_library::OrtRuntime;
use super::tensorrt_profile::{ProfileShapes, TrtProfile};

/// Written into a cache directory once `tandemd prepare` has built everything in it.
pub const PREPARED_FILE: &str = "prepared.json";

/// Spelling of a version or GPU that could not be detected.
pub const UNKNOWN: &str = "unknown";

/// Hex digits of the model digest kept in a directory name (64 bits: collisions are not a concern
/// among the models one device has seen).
const MODEL_DIGEST_CHARS: usize = 16;

/// Longest GPU name kept in a directory name.
const MAX_GPU_SLUG: usize = 48;

/// Places `libnvinfer.so.*` is looked for besides the ONNX Runtime library's directory and
/// `LD_LIBRARY_PATH`: JetPack (arm64 multiarch), the CUDA toolkit, x86_64 servers.
const TENSORRT_LIBRARY_DIRS: [&str; 6] = [
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/usr/local/cuda/lib64",
    "/usr/local/cuda/targets/aarch64-linux/lib",
    "/usr/lib64",
    "/usr/local/lib",
];

/// Names the board on Jetson (`NVIDIA Jetson AGX Orin Developer Kit`), which tells Orin modules apart
/// where `nvidia-smi` is missing (JetPack 5) or only says `Orin (nvgpu)`.
const DEVICE_TREE_MODEL: &str = "/proc/device-tree/model";

/// Precision TensorRT builds the engine in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrtPrecision {
    /// Half precision (`fp16 = true`).
    Fp16,
    /// Single precision.
    Fp32,
}

impl TrtPrecision {
    /// The precision the provider's `fp16` setting asks for.
    pub fn from_fp16(fp16: bool) -> Self {
        if fp16 { TrtPrecision::Fp16 } else { TrtPrecision::Fp32 }
    }

    /// `fp16` or `fp32`.
    pub fn name(self) -> &'static str {
        match self {
            TrtPrecision::Fp16 => "fp16",
            TrtPrecision::Fp32 => "fp32",
        }
    }
}

/// Everything a built TensorRT engine depends on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrtCacheKey {
    /// Digest of the graph and its external weights ([`model_sha256`]).
    pub model_sha256: String,
    /// ONNX Runtime version, e.g. `1.20.1`.
    pub ort_version: String,
    /// TensorRT version, e.g. `10.3.0`, or [`UNKNOWN`].
    pub tensorrt_version: String,
    /// GPU or board name, e.g. `NVIDIA Jetson AGX Orin Developer Kit`, or [`UNKNOWN`].
    pub gpu: String,
    /// Engine precision.
    pub precision: TrtPrecision,
}

impl TrtCacheKey {
    /// Detects the key for `model` (digest from [`model_sha256`]) on this machine, with the loaded
    /// ONNX Runtime and the provider's precision and device.
    pub fn detect(model_sha256: &str, runtime: &OrtRuntime, fp16: bool, device_id: i32) -> TrtCacheKey {
        let mut dirs: Vec<PathBuf> = runtime.library().parent().map(Path::to_path_buf).into_iter().collect();
        if let Some(paths) = std::env::var_os("LD_LIBRARY_PATH") {
            dirs.extend(std::env::split_paths(&paths).filter(|p| !p.as_os_str().is_empty()));
        }
        dirs.extend(TENSORRT_LIBRARY_DIRS.iter().map(PathBuf::from));
        TrtCacheKey {
            model_sha256: model_sha256.to_string(),
            ort_version: runtime.version().to_string(),
            tensorrt_version: tensorrt_version_in(&dirs).unwrap_or_else(|| UNKNOWN.to_string()),
            gpu: detect_gpu(device_id),
            precision: TrtPrecision::from_fp16(fp16),
        }
    }

    /// The directory name: `<model digest>-ort<version>-trt<version>-<gpu>-<precision>`, made only
    /// of `a-z 0-9 . -`.
    pub fn dir_name(&self) -> String {
        let digest: String = slug(&self.model_sha256).chars().take(MODEL_DIGEST_CHARS).collect();
        let mut gpu = slug(&self.gpu);
        gpu.truncate(MAX_GPU_SLUG);
        let gpu = gpu.trim_end_matches('-');
        format!(
            "{digest}-ort{}-trt{}-{gpu}-{}",
            slug(&self.ort_version),
            slug(&self.tensorrt_version),
            self.precision.name()
        )
    }

    /// This key's directory under `cache_root`. A `cache_root` already named after the key is
    /// returned as it is, so resolving twice never nests.
    pub fn dir_in(&self, cache_root: &Path) -> PathBuf {
        let name = self.dir_name();
        if cache_root.file_name().is_some_and(|last| last == name.as_str()) {
            cache_root.to_path_buf()
        } else {
            cache_root.join(name)
        }
    }
}

/// An engine configuration whose TensorRT cache directories are keyed.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyedEngineConfig {
    /// The configuration, each TensorRT `engine_cache_dir` replaced by its keyed directory.
    pub config: EngineConfig,
    /// Each keyed directory with its key, in provider order.
    pub caches: Vec<(TrtCacheKey, PathBuf)>,
}

/// Replaces every TensorRT `engine_cache_dir` of `config` by its keyed directory for `model` on this
/// machine. `tandemd prepare` builds there; the engine has to resolve the same way when it loads the
/// model, so that both meet in one directory. Idempotent.
pub fn resolve_cache_dirs(
    config: &EngineConfig,
    model: &ModelDir,
    runtime: &OrtRuntime,
) -> Result<KeyedEngineConfig, EngineError> {
    let mut keyed = config.clone();
    let mut caches = Vec::new();
    let mut digest: Option<String> = None;
    for provider in &mut keyed.execution_providers {
        if let ProviderConfig::TensorRt { fp16, engine_cache_dir: Some(root), device_id, .. } = provider {
            let sha256 = match digest.clone() {
                Some(sha256) => sha256,
                None => {
                    let sha256 = model_sha256(model)?;
                    digest = Some(sha256.clone());
                    sha256
                }
            };
            let key = TrtCacheKey::detect(&sha256, runtime, *fp16, *device_id);
            *root = key.dir_in(root);
            caches.push((key, root.clone()));
        }
    }
    Ok(KeyedEngineConfig { config: keyed, caches })
}

/// Digest of the files a TensorRT engine is built from: the decoder graph and its external weights
/// (the files named after the graph, such as `model.onnx.data`). A Tandem bundle's manifest already
/// holds their sha256, so nothing is read; other directories are hashed (seconds per GB).
pub fn model_sha256(model: &ModelDir) -> Result<String, EngineError> {
    let from_manifest = model.manifest.as_ref().and_then(|manifest| {
        let files: Vec<(String, String)> = manifest
            .files
            .iter()
            .filter(|(name, _)| name.starts_with(MODEL_FILE))
            .map(|(name, digest)| (name.clone(), digest.sha256.clone()))
            .collect();
        files.iter().any(|(name, _)| name == MODEL_FILE).then_some(files)
    });
    let files = match from_manifest {
        Some(files) => files,
        None => hash_model_files(&model.model_file)?,
    };
    Ok(combine_digests(&files))
}

/// sha256 of the graph file and of every file next to it whose name extends the graph's name.
fn hash_model_files(model_file: &Path) -> Result<Vec<(String, String)>, EngineError> {
    let io_error = |path: &Path| {
        let path = path.to_path_buf();
        move |cause| EngineError::Io { path, cause }
    };
    let graph_name = model_file.file_name().and_then(|n| n.to_str()).ok_or_else(|| {
        EngineError::Config(format!("{} is not a usable model file name", model_file.display()))
    })?;
    let dir = model_file.parent().unwrap_or(Path::new("."));
    let mut names = vec![graph_name.to_string()];
    for entry in std::fs::read_dir(dir).map_err(io_error(dir))? {
        let entry = entry.map_err(io_error(dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name != graph_name && name.starts_with(graph_name) && entry.path().is_file() {
            names.push(name);
        }
    }
    let mut files = Vec::with_capacity(names.len());
    for name in names {
        let path = dir.join(&name);
        let file = std::fs::File::open(&path).map_err(io_error(&path))?;
        let digest = FileDigest::of_reader(std::io::BufReader::new(file)).map_err(io_error(&path))?;
        files.push((name, digest.sha256));
    }
    Ok(files)
}

/// One digest over `(file name, sha256)` pairs, independent of their order.
fn combine_digests(files: &[(String, String)]) -> String {
    let mut sorted: Vec<&(String, String)> = files.iter().collect();
    sorted.sort();
    let text: String = sorted.iter().map(|(name, sha)| format!("{name}:{sha}\n")).collect();
    FileDigest::of_bytes(text.as_bytes()).sha256
}

/// The TensorRT version from the `libnvinfer.so.*` files in `dirs`, or `None` when there is none.
pub fn tensorrt_version_in(dirs: &[PathBuf]) -> Option<String> {
    let names: Vec<String> = dirs
        .iter()
        .filter_map(|dir| std::fs::read_dir(dir).ok())
        .flat_map(|entries| entries.filter_map(Result::ok))
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect();
    tensorrt_version_from_names(names.iter().map(String::as_str))
}

/// `libnvinfer.so.8.5.2` → `8.5.2`. The most precise name wins (`libnvinfer.so.10` only gives `10`),
/// then the newest.
fn tensorrt_version_from_names<'a>(names: impl IntoIterator<Item = &'a str>) -> Option<String> {
    names
        .into_iter()
        .filter_map(|name| name.strip_prefix("libnvinfer.so."))
        .filter(|version| version.split('.').all(|part| !part.is_empty() && part.parse::<u32>().is_ok()))
        .map(|version| {
            let parts: Vec<u32> = version.split('.').filter_map(|p| p.parse().ok()).collect();
            (parts.len(), parts, version)
        })
        .max()
        .map(|(_, _, version)| version.to_string())
}

/// The GPU's name: the Jetson board from the device tree, else `nvidia-smi`, else [`UNKNOWN`].
pub fn detect_gpu(device_id: i32) -> String {
    if let Some(board) = std::fs::read(DEVICE_TREE_MODEL).ok().and_then(|bytes| jetson_board(&bytes)) {
        return board;
    }
    let smi = Command::new("nvidia-smi")
        .args(["--query-gpu=name", "--format=csv,noheader", "-i", &device_id.to_string()])
        .output();
    match smi {
        Ok(output) if output.status.success() => {
            gpu_from_nvidia_smi(&String::from_utf8_lossy(&output.stdout)).unwrap_or_else(|| UNKNOWN.into())
        }
        _ => UNKNOWN.to_string(),
    }
}

/// The board name in `/proc/device-tree/model` (NUL-terminated), when it is a Jetson.
fn jetson_board(model: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(model);
    let name = text.trim_matches(|c: char| c == '\0' || c.is_whitespace());
    name.to_ascii_lowercase().contains("jetson").then(|| name.to_string())
}

/// The first name `nvidia-smi --query-gpu=name --format=csv,noheader` printed.
fn gpu_from_nvidia_smi(stdout: &str) -> Option<String> {
    stdout.lines().map(str::trim).find(|line| !line.is_empty()).map(str::to_string)
}

/// Lower case, with every run of characters other than `a-z 0-9` turned into one `-` (a `.` is kept
/// after a letter or digit, for versions), never empty.
pub fn slug(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars().flat_map(char::to_lowercase) {
        let after_alphanumeric = out.chars().last().is_some_and(|last| last.is_ascii_alphanumeric());
        if c.is_ascii_alphanumeric() || (c == '.' && after_alphanumeric) {
            out.push(c);
        } else if !out.is_empty() && !out.ends_with('-') {
            out.push('-');
        }
    }
    let trimmed = out.trim_matches(['-', '.']);
    if trimmed.is_empty() { UNKNOWN.to_string() } else { trimmed.to_string() }
}

/// What `tandemd prepare` left in a cache directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreparedCache {
    /// The key the directory is named after.
    pub key: TrtCacheKey,
    /// The sequence lengths the engine was built for.
    pub profile: TrtProfile,
    /// Whether `profile` was given to ONNX Runtime as an explicit profile (`profile_max_tokens`);
    /// such an engine is used for exactly that profile only.
    #[serde(default)]
    pub explicit: bool,
    /// The same as ONNX Runtime's explicit profile strings, for comparing with an engine built
    /// another way.
    pub shapes: ProfileShapes,
    /// The model directory it was prepared from.
    pub model_dir: PathBuf,
    /// The tandemd version that prepared it.
    pub tandemd_version: String,
    /// Seconds the preparation took.
    pub seconds: f64,
}

impl PreparedCache {
    /// The record in `dir`, when a preparation finished there.
    pub fn read(dir: &Path) -> Option<PreparedCache> {
        let text = std::fs::read_to_string(dir.join(PREPARED_FILE)).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Records a finished preparation in `dir` (written to a temporary file first, so a crash never
    /// leaves a record of an unfinished build).
    pub fn write(&self, dir: &Path) -> Result<(), EngineError> {
        let path = dir.join(PREPARED_FILE);
        let partial = dir.join(format!(".{PREPARED_FILE}.partial"));
        let text = serde_json::to_string_pretty(self).map_err(|e| EngineError::Config(e.to_string()))?;
        std::fs::write(&partial, text + "\n")
            .and_then(|()| std::fs::rename(&partial, &path))
            .map_err(|cause| EngineError::Io { path, cause })
    }

    /// Whether this record covers `key` and `profile` (`explicit` or not), so nothing needs
    /// building. An implicit profile's engine serves every shorter profile tuned alike; an explicit
    /// one only its own.
    pub fn covers(&self, key: &TrtCacheKey, profile: &TrtProfile, explicit: bool) -> bool {
        if &self.key != key || self.explicit != explicit {
            return false;
        }
        if explicit {
            self.profile == *profile
        } else {
            self.profile.max_tokens >= profile.max_tokens && self.profile.opt_tokens == profile.opt_tokens
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::model_dir::ModelFormat;

    fn key() -> TrtCacheKey {
        TrtCacheKey {
            model_sha256: "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef".into(),
            ort_version: "1.20.1".into(),
            tensorrt_version: "10.3.0".into(),
            gpu: "NVIDIA Jetson AGX Orin Developer Kit".into(),
            precision: TrtPrecision::Fp16,
        }
    }

    #[test]
    fn the_directory_name_spells_out_every_part_of_the_key() {
        assert_eq!(
            key().dir_name(),
            "0123456789abcdef-ort1.20.1-trt10.3.0-nvidia-jetson-agx-orin-developer-kit-fp16"
        );
    }

    #[test]
    fn a_change_in_any_part_of_the_key_gives_another_directory() {
        let base = key().dir_name();
        let changes: [fn(&mut TrtCacheKey); 5] = [
            |k| k.model_sha256.replace_range(0..1, "f"),
            |k| k.ort_version = "1.22.0".into(),
            |k| k.tensorrt_version = "8.6.2".into(),
            |k| k.gpu = "NVIDIA Jetson Orin Nano Developer Kit".into(),
            |k| k.precision = TrtPrecision::Fp32,
        ];
        for change in changes {
            let mut changed = key();
            change(&mut changed);
            assert_ne!(changed.dir_name(), base, "{changed:?}");
        }
    }

    #[test]
    fn undetected_parts_are_spelled_unknown_and_names_stay_path_safe() {
        let odd =
            TrtCacheKey {
                tensorrt_version: UNKNOWN.into(), gpu: "../../etc/Ünïcode GPU/\0".into(), ..key()
            };
        let name = odd.dir_name();
        assert!(name.contains("-trtunknown-"), "{name}");
        assert!(name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-'));
        assert!(!name.contains(".."), "{name}");
        assert_eq!(slug("  "), UNKNOWN);
        assert_eq!(slug("Orin (nvgpu)"), "orin-nvgpu");
    }

    #[test]
    fn a_long_gpu_name_is_shortened() {
        let long = TrtCacheKey { gpu: "x".repeat(500), ..key() };
        assert!(long.dir_name().len() < 100, "{}", long.dir_name());
    }

    #[test]
    fn resolving_a_directory_twice_does_not_nest() {
        let root = Path::new("/var/cache/tandem/trt");
        let once = key().dir_in(root);
        assert_eq!(once, root.join(key().dir_name()));
        assert_eq!(key().dir_in(&once), once);
    }

    #[test]
    fn the_tensorrt_version_comes_from_the_most_precise_library_name() {
        let names = ["libnvinfer.so", "libnvinfer.so.8", "libnvinfer.so.8.5.2", "libnvinfer_plugin.so.8.5.2"];
        assert_eq!(tensorrt_version_from_names(names).as_deref(), Some("8.5.2"));
        assert_eq!(tensorrt_version_from_names(["libnvinfer.so.10"]).as_deref(), Some("10"));
        assert_eq!(
            tensorrt_version_from_names(["libnvinfer.so.10.3.0", "libnvinfer.so.8.6.2"]).as_deref(),
            Some("10.3.0")
        );
        assert_eq!(tensorrt_version_from_names(["libnvinfer.so.10.x", "libcudart.so.12"]), None);
    }

    #[test]
    fn the_tensorrt_version_is_read_from_library_directories() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("libnvinfer.so.10.3.0"), b"").unwrap();
        std::os::unix::fs::symlink("libnvinfer.so.10.3.0", dir.path().join("libnvinfer.so.10")).unwrap();
        let dirs = [PathBuf::from("/nonexistent"), dir.path().to_path_buf()];
        assert_eq!(tensorrt_version_in(&dirs).as_deref(), Some("10.3.0"));
        assert_eq!(tensorrt_version_in(&[PathBuf::from("/nonexistent")]), None);
    }

    #[test]
    fn a_jetson_is_named_by_its_board_and_other_gpus_by_nvidia_smi() {
        assert_eq!(
            jetson_board(b"NVIDIA Jetson AGX Orin Developer Kit\0").as_deref(),
            Some("NVIDIA Jetson AGX Orin Developer Kit")
        );
        assert_eq!(jetson_board(b"Raspberry Pi 4 Model B Rev 1.4\0"), None);
        assert_eq!(gpu_from_nvidia_smi("NVIDIA H200\n").as_deref(), Some("NVIDIA H200"));
        assert_eq!(gpu_from_nvidia_smi("\n"), None);
    }

    fn plain_model(dir: &Path, files: &[(&str, &[u8])]) -> ModelDir {
        for (name, bytes) in files {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
        ModelDir::inspect(dir).unwrap()
    }

    #[test]
    fn the_model_digest_covers_the_graph_and_its_external_weights_only() {
        let dir = tempfile::tempdir().unwrap();
        let model = plain_model(dir.path(), &[("model.onnx", b"graph"), ("model.onnx.data", b"weights")]);
        let expected = combine_digests(&[
            ("model.onnx".into(), FileDigest::of_bytes(b"graph").sha256),
            ("model.onnx.data".into(), FileDigest::of_bytes(b"weights").sha256),
        ]);
        assert_eq!(model_sha256(&model).unwrap(), expected);

        std::fs::write(dir.path().join("tokenizer.json"), b"{}").unwrap();
        assert_eq!(model_sha256(&model).unwrap(), expected, "the tokenizer does not change the engine");
        std::fs::write(dir.path().join("model.onnx.data"), b"retrained").unwrap();
        assert_ne!(model_sha256(&model).unwrap(), expected, "new weights need a new engine");
    }

    #[test]
    fn a_bundle_digest_comes_from_its_manifest_and_matches_hashing_the_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut model = plain_model(dir.path(), &[("model.onnx", b"graph"), ("model.onnx.data", b"weights")]);
        let from_files = model_sha256(&model).unwrap();
        model.format = ModelFormat::Bundle;
        model.manifest = Some(crate::test_support::tiny_manifest(
            "tiny",
            "1",
            &[("model.onnx", b"graph"), ("model.onnx.data", b"weights"), ("tokenizer.json", b"{}")],
        ));
        // The manifest is trusted (the updater verified it): the files are not read again.
        std::fs::remove_file(dir.path().join("model.onnx.data")).unwrap();
        assert_eq!(model_sha256(&model).unwrap(), from_files);
    }

    #[test]
    fn a_prepared_record_round_trips_and_covers_smaller_profiles_of_the_same_key() {
        let dir = tempfile::tempdir().unwrap();
        let record = PreparedCache {
            key: key(),
            profile: TrtProfile::new(2048, 256).unwrap(),
            explicit: false,
            shapes: ProfileShapes {
                min: "input_ids:1x1".into(),
                opt: "input_ids:1x1".into(),
                max: "input_ids:1x2048".into(),
            },
            model_dir: "/var/lib/tandem/models/current".into(),
            tandemd_version: "0.1.0".into(),
            seconds: 612.5,
        };
        assert_eq!(PreparedCache::read(dir.path()), None);
        record.write(dir.path()).unwrap();
        let read = PreparedCache::read(dir.path()).unwrap();
        assert_eq!(read, record);
        assert!(read.covers(&key(), &TrtProfile::new(1024, 256).unwrap(), false));
        assert!(
            !read.covers(&key(), &TrtProfile::new(4096, 256).unwrap(), false),
            "a longer context needs a build"
        );
        let other = TrtCacheKey { precision: TrtPrecision::Fp32, ..key() };
        assert!(!read.covers(&other, &record.profile, false));
    }

    #[test]
    fn an_explicit_profile_is_covered_only_by_an_engine_built_for_exactly_it() {
        let implicit = PreparedCache {
            key: key(),
            profile: TrtProfile::new(4096, 512).unwrap(),
            explicit: false,
            shapes: ProfileShapes { min: String::new(), opt: String::new(), max: String::new() },
            model_dir: "/var/lib/tandem/models/current".into(),
            tandemd_version: "0.1.0".into(),
            seconds: 1.0,
        };
        let wanted = TrtProfile::new(2048, 512).unwrap();
        assert!(!implicit.covers(&key(), &wanted, true), "an implicit build is not the explicit engine");
        let explicit = PreparedCache { profile: wanted, explicit: true, ..implicit };
        assert!(explicit.covers(&key(), &wanted, true));
        assert!(!explicit.covers(&key(), &TrtProfile::new(1024, 512).unwrap(), true));
        assert!(!explicit.covers(&key(), &TrtProfile::new(1024, 512).unwrap(), false));
    }

    #[test]
    fn a_record_written_before_explicit_profiles_reads_as_implicit() {
        let dir = tempfile::tempdir().unwrap();
        let old = r#"{"key": {"model_sha256": "00", "ort_version": "1.20.1", "tensorrt_version": "10.3.0",
            "gpu": "Orin", "precision": "fp16"}, "profile": {"max_tokens": 4096, "opt_tokens": 512},
            "shapes": {"min": "", "opt": "", "max": ""}, "model_dir": "/m", "tandemd_version": "0.1.0",
            "seconds": 1.0}"#;
        std::fs::write(dir.path().join(PREPARED_FILE), old).unwrap();
        assert!(!PreparedCache::read(dir.path()).unwrap().explicit);
    }
}
