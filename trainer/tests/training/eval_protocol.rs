//! The evaluation protocol on a scripted model: help calls are admitted in test-set order up to the
//! cap, later ones are answered on the device after the tokens before the help tag with the tag
//! banned, and the metrics (overall, local, conditional local, call ratio, random offloading)
//! follow from the definitions.

use std::collections::HashMap;

use tandem_core::tasks::countdown::solve;
use tandem_core::tasks::dataset::TaskRecord;
use tandem_core::tasks::templates::PromptTemplate;
use tandem_train::chat_format::ChatFormat;
use tandem_train::cloud::CachedCloud;
use tandem_train::cloud::cache::CloudCache;
use tandem_train::cloud::solver::SolverCloud;
use tandem_train::eval::{EvalError, EvalSettings, GreedyGenerator, evaluate};
use tandem_train::model::presets::Preset;
use tandem_train::task::{Problem, TaskKind};

use crate::support::{format, problems, tiny_model};

/// Answers each prompt with a fixed response; records every call.
struct Scripted {
    responses: HashMap<Vec<u32>, Vec<u32>>,
    calls: Vec<(usize, usize, Vec<u32>)>,
}

impl GreedyGenerator for Scripted {
    fn generate(
        &mut self,
        prompts: &[Vec<u32>],
        max_new_tokens: usize,
        banned: &[u32],
    ) -> Result<Vec<Vec<u32>>, EvalError> {
        self.calls.push((prompts.len(), max_new_tokens, banned.to_vec()));
        Ok(prompts
            .iter()
            .map(|p| {
                let out =
                    self.responses.get(p).unwrap_or_else(|| panic!("unscripted prompt of {} ids", p.len()));
                assert!(!out.iter().any(|t| banned.contains(t)), "a banned id was scripted");
                out.clone()
            })
            .collect())
    }
}

#[test]
fn help_calls_are_capped_in_arrival_order_and_the_rest_answered_on_the_device() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), Preset::TinyQwen2, 31);
    let format: ChatFormat = format(dir.path(), &model);
    let problems: Vec<Problem> = problems(10, 5)
        .into_iter()
        .map(|p| Problem { record: TaskRecord::from_countdown(&p, None), countdown: Some(p) })
        .collect();
    let template = PromptTemplate::COUNTDOWN;
    let eos = format.end_of_turn();
    let encode = |text: &str, end: bool| {
        let mut ids = format.encode(text).unwrap();
        if end {
            ids.push(eos);
        }
        ids
    };
    let correct = |i: usize| {
        format!(
            "<think>ok</think>\n<answer> {} </answer>",
            solve(problems[i].countdown.as_ref().unwrap()).unwrap()
        )
    };
    let wrong = "<think>guess</think>\n<answer> 1 + 1 </answer>".to_string();
    let help_prefix = "<think>no idea</think>\n";
    // Problem i: 'c' correct, 'w' wrong, 'h' help; for help, the device's answer with the tag banned.
    let plan = ['c', 'h', 'h', 'w', 'h', 'h', 'c', 'h', 'h', 'c'];
    let fallback_correct = [false, false, true, false, false, true, false, false, true, false];
    let mut responses = HashMap::new();
    let mut help_prompts = Vec::new();
    for (i, &kind) in plan.iter().enumerate() {
        let prompt = format.prompt_ids(&template.messages(problems[i].question())).unwrap();
        match kind {
            'c' => {
                responses.insert(prompt, encode(&correct(i), true));
            }
            'w' => {
                responses.insert(prompt, encode(&wrong, true));
            }
            _ => {
                let kept = format.encode(help_prefix).unwrap();
                let mut first = kept.clone();
                first.push(format.help_token().unwrap());
                responses.insert(prompt.clone(), first);
                let resumed: Vec<u32> = prompt.iter().chain(&kept).copied().collect();
                let answer = if fallback_correct[i] { correct(i) } else { wrong.clone() };
                responses.insert(resumed, encode(&answer, true));
                help_prompts.push(i);
            }
        }
    }
    let mut generator = Scripted { responses, calls: Vec::new() };
    let cache = CloudCache::open(&dir.path().join("cache.jsonl")).unwrap();
    let mut cloud = CachedCloud::new(SolverCloud::default(), cache);
    let settings =
        EvalSettings { call_cap: 0.3, max_new_tokens: 64, batch_size: 4, baselines: true, seed: 7 };
    let report =
        evaluate(&mut generator, &format, TaskKind::Countdown, template, &problems, &mut cloud, &settings)
            .unwrap();

    let admitted: Vec<usize> = (0..10).filter(|&i| report.predictions[i].admitted).collect();
    assert_eq!(admitted, [1, 2, 4], "the first three requests, in test-set order");
    assert_eq!(report.help_requests, 6);
    assert_eq!(report.cloud_calls, 3);
    // Local: 0, 6, 9 and the refused 5, 8 (7's fallback is wrong); cloud: 1, 2, 4.
    assert_eq!((report.overall_accuracy, report.local_accuracy), (0.8, 0.5));
    assert!((report.conditional_local_accuracy - 5.0 / 7.0).abs() < 1e-12);
    assert_eq!((report.call_ratio, report.help_request_ratio), (0.3, 0.6));
    assert_eq!(report.cloud_call_accuracy, 1.0);
    assert_eq!(report.local_only_accuracy, Some(0.6));
    assert_eq!(report.cloud_only_accuracy, Some(1.0));
    let random = report.random_offloading.unwrap();
    assert_eq!(random.cloud_calls, 3);
    assert!((random.expected_accuracy - (0.7 * 0.6 + 0.3)).abs() < 1e-12);
    assert!((0.6..=0.9).contains(&random.accuracy));
    // The first pass offers help; the fallback bans the tag and has the budget left after the prefix.
    assert_eq!(generator.calls[0].2, Vec::<u32>::new());
    let kept = format.encode(help_prefix).unwrap().len();
    let fallback = generator.calls.last().unwrap();
    assert_eq!(fallback.2, [format.help_token().unwrap()]);
    assert_eq!(fallback.1, 64 - kept);
    assert!(
        report.predictions[5].fallback_tokens.is_some() && report.predictions[1].fallback_tokens.is_none()
    );
}

#[test]
fn without_the_help_option_nothing_is_offloaded_and_the_tag_is_banned() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), Preset::TinyQwen2, 32);
    let format = format(dir.path(), &model);
    let problems: Vec<Problem> = problems(3, 6)
        .into_iter()
        .map(|p| Problem { record: TaskRecord::from_countdown(&p, None), countdown: Some(p) })
        .collect();
    let template = PromptTemplate::COUNTDOWN.without_help();
    let mut responses = HashMap::new();
    for p in &problems {
        let prompt = format.prompt_ids(&template.messages(p.question())).unwrap();
        responses.insert(prompt, format.encode("<think>x</think><answer> 1 </answer>").unwrap());
    }
    let mut generator = Scripted { responses, calls: Vec::new() };
    let mut cloud =
        CachedCloud::new(SolverCloud::default(), CloudCache::open(&dir.path().join("c.jsonl")).unwrap());
    let settings =
        EvalSettings { call_cap: 0.3, max_new_tokens: 16, batch_size: 8, baselines: false, seed: 0 };
    let report =
        evaluate(&mut generator, &format, TaskKind::Countdown, template, &problems, &mut cloud, &settings)
            .unwrap();
    assert_eq!((report.cloud_calls, report.help_requests), (0, 0));
    assert_eq!(generator.calls[0].2, [format.help_token().unwrap()]);
    assert_eq!(report.overall_accuracy, 0.0);
}
