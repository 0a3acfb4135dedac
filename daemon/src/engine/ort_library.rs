//! Finding and loading `libonnxruntime.so`, once per process.
//!
//! The library is loaded at run time (the `load-dynamic` feature of `ort`), so tandemd builds without
//! ONNX Runtime present. ONNX Runtime's environment can be created only once per process; the first
//! successful load is kept here and shared by every session.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ort::environment::Environment;

use super::error::EngineError;

/// File name of the runtime library looked for next to the executable.
pub const ORT_LIBRARY_FILE: &str = "libonnxruntime.so";
/// Environment variable naming the runtime library (the same one `ort` itself reads).
pub const ORT_DYLIB_ENV: &str = "ORT_DYLIB_PATH";

/// The loaded ONNX Runtime and its process-wide environment.
#[derive(Clone)]
pub struct OrtRuntime {
    library: PathBuf,
    version: String,
    environment: Environment,
}

impl std::fmt::Debug for OrtRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrtRuntime").field("library", &self.library).field("version", &self.version).finish()
    }
}

impl OrtRuntime {
    /// The library file that was loaded.
    pub fn library(&self) -> &Path {
        &self.library
    }

    /// The ONNX Runtime version, such as `1.31.1`, or `unknown` when the library does not say.
    pub fn version(&self) -> &str {
        &self.version
    }

    pub(crate) fn environment(&self) -> &Environment {
        &self.environment
    }
}

static RUNTIME: Mutex<Option<Arc<OrtRuntime>>> = Mutex::new(None);

/// Loads ONNX Runtime on the first call and returns the loaded one on every later call.
///
/// `configured` is the `ort_library` setting. The library is looked for there, then at
/// `$ORT_DYLIB_PATH`, then next to the current executable; the first file that exists is loaded. A
/// failed load can be retried with another path; once one succeeded, later paths are ignored (with a
/// warning when they differ), because a process can hold only one ONNX Runtime.
pub fn load_ort(configured: Option<&Path>) -> Result<Arc<OrtRuntime>, EngineError> {
    let mut slot = RUNTIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(runtime) = slot.as_ref() {
        if let Some(wanted) = configured
            && !same_file(wanted, &runtime.library)
        {
            tracing::warn!(
                wanted = %wanted.display(),
                loaded = %runtime.library.display(),
                "ONNX Runtime is already loaded in this process; keeping the loaded library"
            );
        }
        return Ok(Arc::clone(runtime));
    }

    let env_path = std::env::var_os(ORT_DYLIB_ENV).filter(|v| !v.is_empty()).map(PathBuf::from);
    let exe_dir = std::env::current_exe().ok().and_then(|exe| exe.parent().map(Path::to_path_buf));
    let candidates = candidate_paths(configured, env_path.as_deref(), exe_dir.as_deref());
    let library = pick_existing(&candidates, |p| p.is_file())
        .ok_or_else(|| EngineError::OrtNotFound { looked_at: candidates.clone() })?;
    for skipped in candidates.iter().take_while(|c| **c != library) {
        tracing::warn!(path = %skipped.display(), "no ONNX Runtime library here; trying the next place");
    }

    // The file is known to exist: `ort` would panic on a library it cannot find only when loading
    // implicitly, never through `init_from`, which reports dlopen and version errors.
    let builder = ort::init_from(&library)
        .map_err(|e| EngineError::OrtLoad { path: library.clone(), message: e.to_string() })?;
    let environment = builder
        .with_name("tandemd")
        .with_telemetry(false)
        .build()
        .map_err(EngineError::ort("create its environment"))?;
    let version = version_from_build_info(ort::info())
        .or_else(|| version_from_file_name(&library))
        .unwrap_or_else(|| "unknown".to_string());
    tracing::info!(library = %library.display(), %version, "loaded ONNX Runtime");

    let runtime = Arc::new(OrtRuntime { library, version, environment });
    *slot = Some(Arc::clone(&runtime));
    Ok(runtime)
}

/// The places to look, in order: the configured path, `$ORT_DYLIB_PATH`, next to the executable.
fn candidate_paths(
    configured: Option<&Path>,
    env_path: Option<&Path>,
    exe_dir: Option<&Path>,
) -> Vec<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    let next_to_exe = exe_dir.map(|dir| dir.join(ORT_LIBRARY_FILE));
    for path in [configured.map(Path::to_path_buf), env_path.map(Path::to_path_buf), next_to_exe]
        .into_iter()
        .flatten()
    {
        if !candidates.contains(&path) {
            candidates.push(path);
        }
    }
    candidates
}

fn pick_existing(candidates: &[PathBuf], exists: impl Fn(&Path) -> bool) -> Option<PathBuf> {
    candidates.iter().find(|p| exists(p)).cloned()
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// `ORT Build Info: git-branch=rel-1.31.1, git-commit-id=..., ...` → `1.31.1`.
fn version_from_build_info(info: &str) -> Option<String> {
    let branch = info.split([',', ' ']).find_map(|part| part.trim().strip_prefix("git-branch="))?;
    let version = branch.strip_prefix("rel-").unwrap_or(branch);
    looks_like_version(version).then(|| version.to_string())
}

/// `libonnxruntime.so.1.31.1` (after resolving symlinks) → `1.31.1`.
fn version_from_file_name(library: &Path) -> Option<String> {
    let resolved = library.canonicalize().ok()?;
    let name = resolved.file_name()?.to_str()?;
    let version = name.split_once(".so.")?.1;
    looks_like_version(version).then(|| version.to_string())
}

fn looks_like_version(text: &str) -> bool {
    let parts: Vec<&str> = text.split('.').collect();
    parts.len() >= 2 && parts.iter().all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_configured_path_comes_first_then_the_environment_then_the_executable_dir() {
        let candidates = candidate_paths(
            Some(Path::new("/cfg/lib.so")),
            Some(Path::new("/env/lib.so")),
            Some(Path::new("/bin")),
        );
        assert_eq!(
            candidates,
            vec![
                PathBuf::from("/cfg/lib.so"),
                PathBuf::from("/env/lib.so"),
                PathBuf::from("/bin/libonnxruntime.so")
            ]
        );
    }

    #[test]
    fn the_first_existing_candidate_is_picked() {
        let candidates = candidate_paths(None, Some(Path::new("/env/lib.so")), Some(Path::new("/bin")));
        let picked = pick_existing(&candidates, |p| p.starts_with("/bin"));
        assert_eq!(picked, Some(PathBuf::from("/bin/libonnxruntime.so")));
        assert_eq!(pick_existing(&candidates, |_| false), None);
    }

    #[test]
    fn duplicate_candidates_are_looked_at_once() {
        let candidates = candidate_paths(
            Some(Path::new("/bin/libonnxruntime.so")),
            Some(Path::new("/bin/libonnxruntime.so")),
            Some(Path::new("/bin")),
        );
        assert_eq!(candidates, vec![PathBuf::from("/bin/libonnxruntime.so")]);
    }

    #[test]
    fn the_version_is_read_from_the_build_info() {
        let info = "ORT Build Info: git-branch=rel-1.31.1, git-commit-id=abc123, build type=Release";
        assert_eq!(version_from_build_info(info).as_deref(), Some("1.31.1"));
        assert_eq!(version_from_build_info("ORT Build Info: git-branch=main, x"), None);
    }

    #[test]
    fn the_version_is_read_from_a_versioned_library_name() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("libonnxruntime.so.1.20.1");
        std::fs::write(&real, b"").unwrap();
        let link = dir.path().join("libonnxruntime.so");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert_eq!(version_from_file_name(&link).as_deref(), Some("1.20.1"));
    }

    #[test]
    fn a_missing_library_is_reported_before_anything_is_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let wanted = dir.path().join("nowhere").join("libonnxruntime.so");
        let candidates = candidate_paths(Some(&wanted), None, None);
        assert_eq!(pick_existing(&candidates, |p| p.is_file()), None);
        let text = EngineError::OrtNotFound { looked_at: candidates }.to_string();
        assert!(text.contains(&wanted.display().to_string()), "{text}");
    }
}
