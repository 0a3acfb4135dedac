//! Deployment on a device, checked without one: the systemd units (`systemd-analyze verify` and
//! `security`), the example configurations (through the real loader and `tandemd check-config`),
//! `tandemd prepare` on a machine without a GPU, the ONNX Runtime finder the package's postinst runs,
//! and the Debian package itself (built with cargo-deb from the test's own binary, unpacked into a
//! scratch root, its control data linted, its unit verified against its own files).
//!
//! Needs systemd-analyze, dpkg-deb and cargo-deb; a missing tool fails the test with the command that
//! installs it (scripts/test-deps.sh installs them all).

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tandem_core::bundle::signature::{SigningKey, public_key_file, sign_manifest};
use tandem_core::bundle::{
    BUNDLE_FORMAT_VERSION, BundleManifest, DecoderIo, FileDigest, MANIFEST_FILE, MODEL_FILE,
    ModelArchitecture, TOKENIZER_FILE,
};
use tandemd::config::{CliOverrides, ConfigFile, ConfigSources, DaemonConfig, load};
use tandemd::engine::ProviderConfig;
use tandemd::engine::tensorrt_profile::TrtProfile;
use tandemd::offload::SecretSource;

/// The binaries the units start; stubs stand in for them in the scratch root.
const UNIT_BINARIES: [&str; 3] = ["tandemd", "tandem-fleet", "tandem-train"];
/// Highest `systemd-analyze security` exposure a unit may have.
const MAX_EXPOSURE: f64 = 2.0;
/// The configuration the package installs as /etc/tandem/tandemd.toml.
const PACKAGED_CONFIG: &str = "configs/tandemd-jetson-orin.toml";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the daemon crate lives in the workspace")
        .to_path_buf()
}

fn tandemd() -> &'static str {
    env!("CARGO_BIN_EXE_tandemd")
}

/// The path of `tool`, or a failure that says how to install it.
fn require_tool(tool: &str, install: &str) -> PathBuf {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join(tool))
        .find(|path| path.is_file())
        .unwrap_or_else(|| {
            panic!("{tool} is missing; install it with `{install}` (scripts/test-deps.sh does this for `make test`)")
        })
}

fn systemd_analyze() -> PathBuf {
    require_tool("systemd-analyze", "apt-get install -y systemd")
}

fn run(command: &mut Command) -> Output {
    command.output().unwrap_or_else(|e| panic!("could not run {command:?}: {e}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn write_executable(path: &Path, contents: &str) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, contents).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
}

/// The unit files in systemd/, by file name.
fn unit_files() -> BTreeMap<String, PathBuf> {
    let units: BTreeMap<String, PathBuf> = fs::read_dir(repo().join("systemd"))
        .expect("systemd/ exists")
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "service"))
        .map(|path| (path.file_name().unwrap().to_string_lossy().into_owned(), path))
        .collect();
    assert!(units.contains_key("tandemd.service"), "{units:?}");
    units
}

/// The unit name systemd-analyze checks: an instance for a template.
fn checked_name(file_name: &str) -> String {
    file_name.replace("@.service", "@example.service")
}

/// A scratch root with the units installed where the package puts them and stub binaries at their
/// ExecStart paths (systemd-analyze refuses units whose binaries do not exist).
fn scratch_root(units: &BTreeMap<String, PathBuf>) -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    for binary in UNIT_BINARIES {
        write_executable(&root.path().join("usr/bin").join(binary), "#!/bin/sh\nexit 0\n");
    }
    let unit_dir = root.path().join("lib/systemd/system");
    fs::create_dir_all(&unit_dir).unwrap();
    for (name, path) in units {
        fs::copy(path, unit_dir.join(name)).unwrap();
    }
    root
}

/// `systemd-analyze verify` of `unit` inside `root`: warnings count as failures.
fn verify(root: &Path, unit: &str) -> Output {
    run(Command::new(systemd_analyze())
        .args(["verify", "--man=no", "--recursive-errors=no"])
        .arg(format!("--root={}", root.display()))
        .arg(unit))
}

fn assert_verifies(root: &Path, unit: &str) {
    let output = verify(root, unit);
    assert!(
        output.status.success() && output.stderr.is_empty(),
        "systemd-analyze verify {unit}: {}\n{}",
        output.status,
        text(&output.stderr)
    );
}

/// The "Overall exposure level" `systemd-analyze security --offline=yes` gives `unit`.
fn exposure(root: &Path, unit: &str) -> f64 {
    let output = run(Command::new(systemd_analyze())
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(format!("--root={}", root.display()))
        .arg(unit));
    let stdout = text(&output.stdout);
    let line = stdout
        .lines()
        .find(|line| line.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no exposure level for {unit}:\n{stdout}\n{}", text(&output.stderr)));
    line.split(':')
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|number| number.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the exposure level in {line:?}"))
}

/// `Key=Value` settings of a unit file, in order (keys may repeat).
fn unit_settings(path: &Path) -> Vec<(String, String)> {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#') && !line.starts_with('['))
        .filter_map(|line| line.split_once('='))
        .map(|(key, value)| (key.trim().to_string(), value.trim().to_string()))
        .collect()
}

fn setting<'a>(settings: &'a [(String, String)], key: &str) -> Vec<&'a str> {
    settings.iter().filter(|(k, _)| k == key).map(|(_, v)| v.as_str()).collect()
}

/// The tandemd configurations in configs/: `tandemd-*.toml` (files are named after the program that
/// reads them; `train-*.toml` belong to tandem-train).
fn example_configs() -> Vec<PathBuf> {
    let mut configs: Vec<PathBuf> = fs::read_dir(repo().join("configs"))
        .expect("configs/ exists")
        .map(|entry| entry.unwrap().path())
        .filter(|path| {
            let name = path.file_name().unwrap().to_string_lossy();
            name.starts_with("tandemd-") && name.ends_with(".toml")
        })
        .collect();
    configs.sort();
    assert!(configs.len() >= 3, "{configs:?}");
    configs
}

/// Loads `path` through the real loader, with `model_dir` pointed at an existing directory (the
/// configured one exists only on a device).
fn load_config(path: &Path, model_dir: &Path) -> DaemonConfig {
    let sources = ConfigSources {
        file: ConfigFile::Required(path.to_path_buf()),
        env: Vec::new(),
        overrides: CliOverrides { model_dir: Some(model_dir.to_path_buf()), ..CliOverrides::default() },
    };
    load(&sources).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The systemd credentials a configuration reads.
fn credentials(config: &DaemonConfig) -> Vec<String> {
    let sources =
        [config.server.api_token.as_ref(), config.cloud.https.as_ref().and_then(|h| h.api_key.as_ref())];
    sources
        .into_iter()
        .flatten()
        .filter_map(|source| match source {
            SecretSource::Credential(name) => Some(name.clone()),
            _ => None,
        })
        .collect()
}

/// A credentials directory as systemd would create it, holding every credential the configs use.
fn credentials_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for name in ["cloud-api-key", "api-token"] {
        fs::write(dir.path().join(name), format!("test-{name}\n")).unwrap();
    }
    dir
}

/// `tandemd ARGS` with only the environment a unit would give it (no stray TANDEM_* variables).
fn tandemd_command(binary: &Path, credentials: &Path) -> Command {
    let mut command = Command::new(binary);
    command
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("CREDENTIALS_DIRECTORY", credentials);
    if let Some(ort) = std::env::var_os("ORT_DYLIB_PATH") {
        command.env("ORT_DYLIB_PATH", ort);
    }
    command
}

#[test]
fn every_unit_passes_systemd_analyze_verify() {
    let units = unit_files();
    let root = scratch_root(&units);
    for name in units.keys() {
        assert_verifies(root.path(), &checked_name(name));
    }
}

#[test]
fn a_mistake_in_a_unit_fails_verification() {
    let units = unit_files();
    let root = scratch_root(&units);
    let unit = root.path().join("lib/systemd/system/tandemd.service");
    let broken = fs::read_to_string(&unit).unwrap().replace("WatchdogSec=30s", "WatchdogSecs=30s");
    fs::write(&unit, broken).unwrap();
    let output = verify(root.path(), "tandemd.service");
    assert!(!output.status.success(), "an unknown key must fail: {}", text(&output.stderr));
    assert!(text(&output.stderr).contains("WatchdogSecs"), "{}", text(&output.stderr));

    fs::remove_file(root.path().join("usr/bin/tandemd")).unwrap();
    let output = verify(root.path(), "tandem-fleet.service");
    assert!(output.status.success(), "{}", text(&output.stderr));
    let output = verify(root.path(), "tandemd.service");
    assert!(text(&output.stderr).contains("/usr/bin/tandemd"), "a missing binary must fail too");
}

#[test]
fn every_unit_is_exposed_at_most_2_0() {
    let units = unit_files();
    let root = scratch_root(&units);
    for name in units.keys() {
        let unit = checked_name(name);
        let level = exposure(root.path(), &unit);
        assert!(level <= MAX_EXPOSURE, "{unit}: overall exposure level {level} is above {MAX_EXPOSURE}");
    }
    assert!(exposure(root.path(), "tandemd.service") <= MAX_EXPOSURE);
}

#[test]
fn the_tandemd_unit_runs_the_packaged_binary_with_the_packaged_config() {
    let settings = unit_settings(&repo().join("systemd/tandemd.service"));
    assert_eq!(setting(&settings, "Type"), ["notify"]);
    assert_eq!(setting(&settings, "WatchdogSec"), ["30s"]);
    assert_eq!(setting(&settings, "Restart"), ["on-failure"]);
    assert_eq!(setting(&settings, "ExecStart"), ["/usr/bin/tandemd serve --config /etc/tandem/tandemd.toml"]);
    assert_eq!(
        setting(&settings, "ExecStartPre"),
        ["/usr/bin/tandemd prepare --config /etc/tandem/tandemd.toml"]
    );
    // The prepare step extends the start timeout: systemd must accept its messages.
    assert_eq!(setting(&settings, "NotifyAccess"), ["exec"]);
    // A configuration error (exit 2) is not retried.
    assert_eq!(setting(&settings, "RestartPreventExitStatus"), ["2"]);
}

#[test]
fn the_device_configs_use_the_directories_and_credentials_the_unit_provides() {
    let settings = unit_settings(&repo().join("systemd/tandemd.service"));
    let state = format!("/var/lib/{}", setting(&settings, "StateDirectory")[0]);
    let cache = format!("/var/cache/{}", setting(&settings, "CacheDirectory")[0]);
    let loaded: Vec<String> = setting(&settings, "LoadCredential")
        .iter()
        .map(|spec| spec.split_once(':').expect("LoadCredential=ID:PATH").0.to_string())
        .collect();
    let model = tempfile::tempdir().unwrap();
    for name in ["tandemd-jetson-orin.toml", "tandemd-cpu-device.toml"] {
        let config = load_config(&repo().join("configs").join(name), model.path());
        assert_eq!(config.state_dir, Path::new(&state), "{name}");
        for provider in &config.engine.execution_providers {
            if let ProviderConfig::TensorRt { engine_cache_dir, .. } = provider {
                let dir = engine_cache_dir.as_ref().unwrap_or_else(|| panic!("{name}: no engine_cache_dir"));
                assert!(dir.starts_with(&cache), "{name}: {} is not under {cache}", dir.display());
            }
        }
        for credential in credentials(&config) {
            assert!(loaded.contains(&credential), "{name} reads `{credential}`, the unit loads {loaded:?}");
        }
    }
}

#[test]
fn the_jetson_config_runs_tensorrt_then_cuda_strictly_in_fp16() {
    let model = tempfile::tempdir().unwrap();
    let config = load_config(&repo().join(PACKAGED_CONFIG), model.path());
    let engine = &config.engine;
    assert!(matches!(
        engine.execution_providers.as_slice(),
        [
            ProviderConfig::TensorRt {
                fp16: true,
                engine_cache_dir: Some(_),
                profile_max_tokens: Some(_),
                ..
            },
            ProviderConfig::Cuda { .. }
        ]
    ));
    let profile =
        TrtProfile::of_engine(engine, None).expect("a usable TensorRT profile").expect("an explicit one");
    assert!(profile.max_tokens >= 1024, "long enough for a prompt plus an answer: {profile:?}");
    assert!(engine.strict_providers);
    assert!((1..=12).contains(&engine.intra_threads), "an Orin has 6 to 12 cores");
    assert!(config.cloud.is_enabled() && config.budget.cloud_fraction > 0.0);
}

#[test]
fn every_example_config_loads_and_passes_check_config() {
    let model = tempfile::tempdir().unwrap();
    let secrets = credentials_dir();
    for path in example_configs() {
        load_config(&path, model.path());
        let output = run(tandemd_command(Path::new(tandemd()), secrets.path())
            .arg("check-config")
            .arg("--config")
            .arg(&path)
            .arg("--model")
            .arg(model.path()));
        assert!(
            output.status.success() && text(&output.stdout).starts_with("configuration OK"),
            "{}: {}\n{}",
            path.display(),
            text(&output.stdout),
            text(&output.stderr)
        );
    }
}

#[test]
fn prepare_without_tensorrt_fails_and_says_why() {
    let model = tempfile::tempdir().unwrap();
    let secrets = credentials_dir();
    let output = run(tandemd_command(Path::new(tandemd()), secrets.path())
        .args(["prepare", "--config"])
        .arg(repo().join(PACKAGED_CONFIG))
        .arg("--model")
        .arg(model.path()));
    let stderr = text(&output.stderr);
    assert!(!output.status.success(), "prepare cannot succeed without a GPU: {stderr}");
    assert!(stderr.contains("cannot prepare TensorRT engines") || stderr.contains("TensorRT"), "{stderr}");
    if cfg!(feature = "gpu") {
        assert!(stderr.contains("TensorRT is not available in the loaded ONNX Runtime"), "{stderr}");
    } else {
        assert!(stderr.contains("built without GPU support"), "{stderr}");
        assert_eq!(output.status.code(), Some(2), "{stderr}");
    }
}

#[test]
fn prepare_has_nothing_to_do_without_a_tensorrt_provider() {
    let model = tempfile::tempdir().unwrap();
    let secrets = credentials_dir();
    let output = run(tandemd_command(Path::new(tandemd()), secrets.path())
        .args(["prepare", "--config"])
        .arg(repo().join("configs/tandemd-cpu-device.toml"))
        .arg("--model")
        .arg(model.path()));
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(text(&output.stdout).contains("nothing to prepare"), "{}", text(&output.stdout));
}

#[test]
fn prepare_refuses_an_invalid_config_before_looking_for_a_gpu() {
    let secrets = credentials_dir();
    let output = run(tandemd_command(Path::new(tandemd()), secrets.path())
        .args(["prepare", "--config"])
        .arg(repo().join(PACKAGED_CONFIG))
        .args(["--model", "/nonexistent/model"]));
    assert_eq!(output.status.code(), Some(2));
    assert!(text(&output.stderr).contains("model_dir"), "{}", text(&output.stderr));
}

/// A bundle of a placeholder graph and tokenizer in `dir`, signed by `key`: enough for the trust
/// check, which runs before anything parses the files.
fn write_signed_bundle(dir: &Path, key: &SigningKey) {
    let files = [(MODEL_FILE, &b"graph"[..]), (TOKENIZER_FILE, &b"{}"[..])];
    for (name, bytes) in files {
        fs::write(dir.join(name), bytes).unwrap();
    }
    let mut manifest = BundleManifest {
        format: BUNDLE_FORMAT_VERSION,
        name: "orin-policy".into(),
        version: "3".into(),
        architecture: ModelArchitecture {
            model_type: "qwen2".into(),
            vocab_size: 512,
            hidden_size: 64,
            intermediate_size: 128,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 16,
            context_length: 256,
            tie_word_embeddings: true,
        },
        chat_template: None,
        help_marker: tandem_core::help_marker::HELP_MARKER.into(),
        eos_token_ids: vec![2],
        io: DecoderIo { position_ids: true, kv_dtype: "float16".into(), opset: 17 },
        files: files
            .into_iter()
            .map(|(name, bytes)| (name.to_string(), FileDigest::of_bytes(bytes)))
            .collect(),
        provenance: Default::default(),
        evaluation: Default::default(),
        signature: None,
    };
    sign_manifest(&mut manifest, key);
    fs::write(dir.join(MANIFEST_FILE), manifest.to_json_pretty()).unwrap();
}

/// `tandemd prepare` for the bundle in `model` with a TensorRT provider and `trusted_key` trusted.
fn prepare_trusting(work: &Path, model: &Path, trusted_key: &Path) -> Output {
    let config = work.join("tandemd.toml");
    let text = format!(
        "state_dir = {state:?}\ntrusted_bundle_keys = [{trusted_key:?}]\n\n[engine]\nexecution_providers = \
         [{{ kind = \"tensorrt\", fp16 = true, engine_cache_dir = {cache:?} }}]\n",
        state = work.join("state"),
        cache = work.join("trt"),
    );
    fs::write(&config, text).unwrap();
    let secrets = credentials_dir();
    run(tandemd_command(Path::new(tandemd()), secrets.path())
        .args(["prepare", "--config"])
        .arg(&config)
        .arg("--model")
        .arg(model))
}

#[test]
fn prepare_refuses_a_tampered_bundle_before_looking_for_a_gpu() {
    let work = tempfile::tempdir().unwrap();
    let model = work.path().join("model");
    fs::create_dir(&model).unwrap();
    let key = SigningKey::from_bytes(&[7; 32]);
    write_signed_bundle(&model, &key);
    let trusted = work.path().join("release.pub");
    fs::write(&trusted, public_key_file(&key.verifying_key())).unwrap();

    // Intact, the bundle passes and prepare goes on to need TensorRT, which this machine lacks.
    let intact = prepare_trusting(work.path(), &model, &trusted);
    assert!(text(&intact.stdout).contains("bundle orin-policy v3 verified"), "{}", text(&intact.stdout));
    assert!(!text(&intact.stderr).contains("refusing"), "{}", text(&intact.stderr));

    fs::write(model.join(MODEL_FILE), b"GRAPH").unwrap();
    let tampered = prepare_trusting(work.path(), &model, &trusted);
    let stderr = text(&tampered.stderr);
    assert_eq!(tampered.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("refusing to load bundle orin-policy v3"), "{stderr}");
    assert!(stderr.contains("model.onnx has sha256"), "{stderr}");
    assert!(
        !stderr.contains("TensorRT") && !stderr.contains("GPU"),
        "refused before the GPU checks: {stderr}"
    );
    assert!(!work.path().join("trt").exists(), "nothing was prepared");
}

/// Runs the package's ONNX Runtime finder against a fake root holding `files`.
fn find_onnxruntime(files: &[&str], tegra_release: Option<&str>) -> Output {
    let root = tempfile::tempdir().unwrap();
    for file in files {
        let path = root.path().join(file);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, b"").unwrap();
    }
    if let Some(release) = tegra_release {
        fs::create_dir_all(root.path().join("etc")).unwrap();
        fs::write(root.path().join("etc/nv_tegra_release"), release).unwrap();
    }
    run(Command::new(repo().join("cross/debian/find-onnxruntime")).arg(root.path()))
}

fn gpu_build(dir: &str, version: &str) -> Vec<String> {
    ["libonnxruntime.so.".to_string() + version]
        .into_iter()
        .chain(["shared", "cuda", "tensorrt"].map(|p| format!("libonnxruntime_providers_{p}.so")))
        .map(|name| format!("{dir}/{name}"))
        .collect()
}

#[test]
fn the_onnxruntime_finder_picks_a_gpu_build_of_1_17_or_newer() {
    let mut files = gpu_build("opt/onnxruntime/lib", "1.20.1");
    files.extend(gpu_build("usr/local/lib", "1.16.3"));
    let names: Vec<&str> = files.iter().map(String::as_str).collect();
    let output = find_onnxruntime(&names, None);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_eq!(text(&output.stdout).trim(), "/opt/onnxruntime/lib/libonnxruntime.so.1.20.1");

    let files = gpu_build("usr/local/lib/python3.10/dist-packages/onnxruntime/capi", "1.22.0");
    let names: Vec<&str> = files.iter().map(String::as_str).collect();
    let output = find_onnxruntime(&names, None);
    assert_eq!(
        text(&output.stdout).trim(),
        "/usr/local/lib/python3.10/dist-packages/onnxruntime/capi/libonnxruntime.so.1.22.0"
    );
}

#[test]
fn the_onnxruntime_finder_says_why_it_skips_a_library_and_where_to_get_one() {
    let output = find_onnxruntime(
        &[
            "usr/local/lib/libonnxruntime.so.1.31.1",
            "usr/local/lib/libonnxruntime_providers_shared.so",
            "opt/onnxruntime/lib/libonnxruntime.so.1.16.3",
        ],
        Some("# R36 (release), REVISION: 4.0, GCID: 1, BOARD: generic, EABI: aarch64\n"),
    );
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(output.stdout.is_empty());
    assert!(stderr.contains("1.16.3 is older than 1.17"), "{stderr}");
    assert!(stderr.contains("no libonnxruntime_providers_cuda.so next to it"), "{stderr}");
    assert!(
        stderr.contains("pip3 install onnxruntime-gpu --index-url https://pypi.jetson-ai-lab.io/jp6/cu126"),
        "{stderr}"
    );
    assert!(stderr.contains("dpkg-reconfigure tandemd"), "{stderr}");

    let output = find_onnxruntime(&[], Some("# R35 (release), REVISION: 4.1\n"));
    assert!(text(&output.stderr).contains("https://pypi.jetson-ai-lab.io/jp5/cu114"));
}

#[test]
fn the_onnxruntime_finder_reports_a_usable_library_in_a_home_directory_as_unreadable() {
    let files = gpu_build("home/nvidia/.local/lib/python3.10/site-packages/onnxruntime/capi", "1.20.1");
    let names: Vec<&str> = files.iter().map(String::as_str).collect();
    let output = find_onnxruntime(&names, None);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("ProtectHome=yes") && stderr.contains("/opt/onnxruntime/lib"), "{stderr}");
}

/// Builds the package with cargo-deb from this test's tandemd binary (no compilation): cargo-deb
/// takes `target/release/tandemd` from the target directory it is given.
fn build_deb(work: &Path) -> PathBuf {
    require_tool("cargo-deb", "cargo install --locked cargo-deb --version 3.8.0");
    let target = work.join("target");
    fs::create_dir_all(target.join("release")).unwrap();
    fs::copy(tandemd(), target.join("release/tandemd")).unwrap();
    let deb = work.join("tandemd.deb");
    let output = run(Command::new(env!("CARGO"))
        .current_dir(repo())
        .env("CARGO_TARGET_DIR", &target)
        .args(["deb", "-p", "tandemd", "--no-build", "--no-strip", "--fast", "--quiet", "--output"])
        .arg(&deb));
    assert!(output.status.success(), "cargo deb failed:\n{}\n{}", text(&output.stdout), text(&output.stderr));
    deb
}

fn dpkg_deb(args: &[&str], deb: &Path, dir: Option<&Path>) -> String {
    let mut command = Command::new(require_tool("dpkg-deb", "apt-get install -y dpkg"));
    command.args(args).arg(deb);
    if let Some(dir) = dir {
        command.arg(dir);
    }
    let output = run(&mut command);
    assert!(output.status.success(), "dpkg-deb {args:?}: {}", text(&output.stderr));
    text(&output.stdout)
}

#[test]
fn the_deb_installs_the_files_where_the_unit_expects_them() {
    let work = tempfile::tempdir().unwrap();
    let deb = build_deb(work.path());

    // Control data.
    let fields = dpkg_deb(&["--field"], &deb, None);
    let field = |name: &str| {
        fields
            .lines()
            .find_map(|line| line.strip_prefix(&format!("{name}: ")))
            .unwrap_or_else(|| panic!("no {name} field:\n{fields}"))
            .to_string()
    };
    let host_arch = text(&run(Command::new("dpkg").arg("--print-architecture")).stdout).trim().to_string();
    assert_eq!(field("Package"), "tandemd");
    assert_eq!(field("Architecture"), host_arch);
    assert!(field("Version").starts_with(env!("CARGO_PKG_VERSION")), "{fields}");
    assert!(field("Depends").contains("libc6 (>= 2.31)"), "{fields}");
    assert!(!field("Maintainer").is_empty() && !field("Description").is_empty());

    let control = work.path().join("control");
    dpkg_deb(&["--control"], &deb, Some(&control));
    let conffiles = fs::read_to_string(control.join("conffiles")).expect("a conffiles list");
    assert_eq!(conffiles.lines().collect::<Vec<_>>(), ["/etc/tandem/tandemd.toml"]);
    for script in ["postinst", "prerm", "postrm"] {
        let path = control.join(script);
        let mode = fs::metadata(&path).unwrap_or_else(|_| panic!("no {script}")).permissions().mode();
        assert_eq!(mode & 0o111, 0o111, "{script} must be executable");
        let syntax = run(Command::new("sh").arg("-n").arg(&path));
        assert!(syntax.status.success(), "{script}: {}", text(&syntax.stderr));
    }
    let postinst = fs::read_to_string(control.join("postinst")).unwrap();
    assert!(postinst.contains("/usr/lib/tandemd/find-onnxruntime"));
    assert!(postinst.contains("/etc/systemd/system/tandemd.service.d") && postinst.contains("ort.conf"));
    assert!(postinst.contains("ORT_DYLIB_PATH"));

    // Files, unpacked into a scratch root.
    let root = work.path().join("root");
    dpkg_deb(&["--extract"], &deb, Some(&root));
    for executable in ["usr/bin/tandemd", "usr/lib/tandemd/find-onnxruntime"] {
        let mode = fs::metadata(root.join(executable)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755, "{executable}");
    }
    assert!(root.join("usr/share/doc/tandemd/deploy-jetson.md").is_file());
    assert_eq!(
        fs::read(root.join("lib/systemd/system/tandemd.service")).unwrap(),
        fs::read(repo().join("systemd/tandemd.service")).unwrap()
    );
    assert_eq!(
        fs::read(root.join("etc/tandem/tandemd.toml")).unwrap(),
        fs::read(repo().join(PACKAGED_CONFIG)).unwrap()
    );

    // The unit is valid in the package's own layout: ExecStart= names the packaged binary.
    assert_verifies(&root, "tandemd.service");
    // The packaged binary runs and accepts the packaged configuration.
    let model = tempfile::tempdir().unwrap();
    let secrets = credentials_dir();
    let output = run(tandemd_command(&root.join("usr/bin/tandemd"), secrets.path())
        .arg("check-config")
        .arg("--config")
        .arg(root.join("etc/tandem/tandemd.toml"))
        .arg("--model")
        .arg(model.path()));
    assert!(output.status.success(), "{}", text(&output.stderr));
}
