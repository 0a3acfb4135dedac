//! The shipped run configurations parse and validate, and mistakes are refused with a reason.

use std::path::PathBuf;

use tandem_train::run::RunConfig;

fn configs_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../configs")
}

#[test]
fn shipped_training_configs_parse_and_validate() {
    for name in ["train-countdown.toml", "train-math.toml"] {
        let path = configs_dir().join(name);
        let config = RunConfig::load(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(RunConfig::parse(&text).unwrap(), config);
    }
}

#[test]
fn an_unknown_key_is_an_error_naming_it() {
    let text = std::fs::read_to_string(configs_dir().join("train-countdown.toml")).unwrap();
    let typo = text.replacen("[rollout]\n", "[rollout]\ngroup_sise = 4\n", 1);
    assert_ne!(typo, text, "the config has a [rollout] section");
    let err = RunConfig::parse(&typo).unwrap_err();
    assert!(err.contains("group_sise"), "{err}");
}

#[test]
fn values_that_cannot_work_are_refused_with_the_reason() {
    let text = std::fs::read_to_string(configs_dir().join("train-countdown.toml")).unwrap();
    let mut config = RunConfig::parse(&text).unwrap();
    config.rollout.as_mut().unwrap().group_size = 1;
    assert!(config.validate().unwrap_err().to_string().contains("group_size"));
    let mut config = RunConfig::parse(&text).unwrap();
    config.task.reward =
        Some(tandem_core::tasks::reward::RewardWeights { alpha_a: 0.25, alpha_c: 1.0, alpha_f: 0.0 });
    assert!(config.validate().unwrap_err().to_string().contains("alpha_a"));
    let mut config = RunConfig::parse(&text).unwrap();
    config.cloud = None;
    assert!(config.validate().unwrap_err().to_string().contains("cloud"));
}

#[test]
fn the_cpu_experiment_configs_parse_and_validate() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/results/countdown-cpu/configs");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        RunConfig::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        names.push(path.file_name().unwrap().to_string_lossy().into_owned());
    }
    names.sort();
    assert_eq!(names, ["gapg.toml", "grpo.toml", "sft.toml"]);
}
