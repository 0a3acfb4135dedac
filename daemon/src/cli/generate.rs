//! `tandemd generate`: load a model directory and generate from one prompt, printing the text, the
//! token ids and the timings (or one JSON object with `--json`).

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::{ArgGroup, Args};
use serde::Serialize;
use tandem_core::generation::{Decoding, SamplingParams};
use tandemd::bundle_trust::{load_trusted_keys, verify_model_dir};
use tandemd::engine::{Engine, EngineConfig, FinishReason, Generation, GenerationParams, ProviderConfig};

/// Arguments of `tandemd generate`.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("input").required(true).args(["prompt", "prompt_ids"])))]
pub struct GenerateArgs {
    /// Model directory: a Tandem bundle, an onnxruntime-genai folder or a plain optimum/torch export.
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// Load the model only if it is a Tandem bundle signed by this public key (NAME.pub from
    /// `tandem-train keygen`) with every file intact; repeat to trust several keys. Without it the
    /// model is loaded unverified.
    #[arg(long = "trusted-key", value_name = "FILE")]
    trusted_keys: Vec<PathBuf>,
    /// Prompt text, encoded as-is (no chat template, no BOS token).
    #[arg(long)]
    prompt: Option<String>,
    /// Prompt as comma-separated token ids, e.g. `1,2,3` (works without a tokenizer).
    #[arg(long, value_name = "IDS", value_parser = parse_ids)]
    prompt_ids: Option<TokenIds>,
    /// Most tokens to generate.
    #[arg(long, value_name = "N")]
    max_new_tokens: usize,
    /// Pick the most likely token each step (the default without --temperature).
    #[arg(long, conflicts_with_all = ["temperature", "top_p", "top_k"])]
    greedy: bool,
    /// Sample with this temperature (> 0) instead of greedy decoding.
    #[arg(long, value_name = "T")]
    temperature: Option<f32>,
    /// Nucleus sampling: keep the most likely tokens up to this total probability, in (0, 1].
    #[arg(long, value_name = "P", requires = "temperature")]
    top_p: Option<f32>,
    /// Keep only the K most likely tokens (0 keeps all).
    #[arg(long, value_name = "K", requires = "temperature")]
    top_k: Option<usize>,
    /// Seed of the sampler; the same seed gives the same text.
    #[arg(long, value_name = "S", default_value_t = 0)]
    seed: u64,
    /// Stop when this text appears (repeatable); it is cut from the output.
    #[arg(long = "stop", value_name = "STR")]
    stop: Vec<String>,
    /// Execution providers in order of preference, e.g. `tensorrt,cuda,cpu`.
    #[arg(long, value_name = "LIST", default_value = "cpu")]
    providers: String,
    /// Fail instead of falling back when a requested GPU provider cannot be used.
    #[arg(long)]
    strict_providers: bool,
    /// Threads inside one operator (0 lets ONNX Runtime decide).
    #[arg(long, value_name = "N", default_value_t = 0)]
    threads: usize,
    /// Path of libonnxruntime.so (else $ORT_DYLIB_PATH, else next to tandemd).
    #[arg(long, value_name = "PATH")]
    ort_library: Option<PathBuf>,
    /// Keep generating through end-of-sequence tokens until --max-new-tokens (for benchmarks).
    #[arg(long)]
    ignore_eos: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// Token ids from the command line.
#[derive(Debug, Clone)]
struct TokenIds(Vec<u32>);

fn parse_ids(text: &str) -> Result<TokenIds, String> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<u32>().map_err(|_| format!("`{s}` is not a token id (a non-negative integer)")))
        .collect::<Result<Vec<_>, _>>()
        .map(TokenIds)
}

/// A command-line input the user has to fix (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(String);

/// The `--json` output.
#[derive(Debug, Serialize)]
struct JsonOutput<'a> {
    text: &'a str,
    ids: &'a [u32],
    ttft_ms: f64,
    decode_tok_s: Option<f64>,
    provider: &'a str,
    finish_reason: FinishReason,
    prompt_tokens: usize,
    ort_version: &'a str,
    /// Peak resident memory of this process, MB (Linux).
    peak_rss_mb: Option<f64>,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let config = EngineConfig {
        ort_library: args.ort_library.clone(),
        execution_providers: ProviderConfig::parse_list(&args.providers)?,
        strict_providers: args.strict_providers,
        intra_threads: args.threads,
        ..EngineConfig::default()
    };
    let decoding = match args.temperature {
        None => Decoding::Greedy,
        Some(temperature) => Decoding::Sample(SamplingParams {
            temperature,
            top_k: args.top_k.unwrap_or(0),
            top_p: args.top_p.unwrap_or(1.0),
            seed: args.seed,
        }),
    };
    let params = GenerationParams {
        max_new_tokens: args.max_new_tokens,
        decoding,
        stop_strings: args.stop.clone(),
        ignore_eos: args.ignore_eos,
        ..GenerationParams::greedy(args.max_new_tokens)
    };
    // Parameters are checked before the (slow) model load.
    decoding.validate().map_err(tandemd::engine::EngineError::from)?;

    if !args.trusted_keys.is_empty() {
        let trusted = load_trusted_keys(&args.trusted_keys)?;
        verify_model_dir(&args.model, &trusted)?;
    }
    let mut engine = Engine::load(&args.model, &config)
        .with_context(|| format!("could not load the model in {}", args.model.display()))?;
    let prompt = match (&args.prompt, &args.prompt_ids) {
        (_, Some(TokenIds(ids))) => ids.clone(),
        (Some(text), None) => engine.encode(text).context("could not tokenize the prompt")?,
        (None, None) => return Err(UsageError("give --prompt or --prompt-ids".to_string()).into()),
    };

    let generation = if args.json {
        generate(&mut engine, prompt, &params, |_| {})?
    } else {
        let mut stdout = std::io::stdout().lock();
        let generation = generate(&mut engine, prompt, &params, |delta| {
            // A closed stdout (`| head`) must not abort generation; the summary below reports it.
            let _ = stdout.write_all(delta.as_bytes()).and_then(|()| stdout.flush());
        })?;
        drop(stdout);
        generation
    };

    let provider = &engine.provider_report().active;
    let ttft_ms = generation.time_to_first_token.as_secs_f64() * 1000.0;
    if args.json {
        let output = JsonOutput {
            text: &generation.text,
            ids: &generation.ids,
            ttft_ms,
            decode_tok_s: generation.decode_tokens_per_second,
            provider,
            finish_reason: generation.finish_reason,
            prompt_tokens: generation.prompt_tokens,
            ort_version: engine.runtime().version(),
            peak_rss_mb: peak_rss_mb(),
        };
        println!("{}", serde_json::to_string(&output)?);
    } else {
        let ids = generation.ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
        let decode =
            generation.decode_tokens_per_second.map_or("n/a".to_string(), |r| format!("{r:.1} tok/s"));
        println!();
        println!("---");
        println!("ids: {ids}");
        println!("finish: {}", finish_name(generation.finish_reason));
        println!("prompt tokens: {}", generation.prompt_tokens);
        println!("ttft: {ttft_ms:.2} ms");
        println!("decode: {decode}");
        println!("provider: {provider} (ONNX Runtime {})", engine.runtime().version());
    }
    Ok(())
}

fn generate(
    engine: &mut Engine,
    prompt: Vec<u32>,
    params: &GenerationParams,
    mut on_text: impl FnMut(&str),
) -> anyhow::Result<Generation> {
    let mut generations = engine
        .generate(&[prompt], params, |event| on_text(&event.text_delta))
        .context("generation failed")?;
    generations.pop().context("no generation was returned")
}

/// Peak resident set size of this process (`VmHWM`), where /proc is available.
fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn finish_name(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Eos => "end of sequence",
        FinishReason::StopString => "stop string",
        FinishReason::Length => "max_new_tokens reached",
        FinishReason::Cancelled => "cancelled",
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: GenerateArgs,
    }

    fn parse(line: &[&str]) -> Result<GenerateArgs, clap::Error> {
        Wrapper::try_parse_from(std::iter::once("generate").chain(line.iter().copied())).map(|w| w.args)
    }

    #[test]
    fn prompt_ids_are_parsed_from_a_comma_list() {
        let args = parse(&["--model", "m", "--prompt-ids", "5, 17,42", "--max-new-tokens", "3"]).unwrap();
        assert_eq!(args.prompt_ids.unwrap().0, [5, 17, 42]);
        assert!(parse(&["--model", "m", "--prompt-ids", "5,x", "--max-new-tokens", "3"]).is_err());
    }

    #[test]
    fn a_prompt_or_prompt_ids_is_required_but_not_both() {
        assert!(parse(&["--model", "m", "--max-new-tokens", "3"]).is_err());
        assert!(
            parse(&["--model", "m", "--prompt", "a", "--prompt-ids", "1", "--max-new-tokens", "3"]).is_err()
        );
    }

    #[test]
    fn greedy_conflicts_with_sampling_options_and_top_p_needs_a_temperature() {
        assert!(
            parse(&[
                "--model",
                "m",
                "--prompt",
                "a",
                "--max-new-tokens",
                "3",
                "--greedy",
                "--temperature",
                "0.7"
            ])
            .is_err()
        );
        assert!(
            parse(&["--model", "m", "--prompt", "a", "--max-new-tokens", "3", "--top-p", "0.9"]).is_err()
        );
        let args = parse(&[
            "--model",
            "m",
            "--prompt",
            "a",
            "--max-new-tokens",
            "3",
            "--temperature",
            "0.7",
            "--top-p",
            "0.9",
            "--stop",
            "x",
            "--stop",
            "y",
        ])
        .unwrap();
        assert_eq!((args.temperature, args.top_p), (Some(0.7), Some(0.9)));
        assert_eq!(args.stop, ["x", "y"]);
    }
}
