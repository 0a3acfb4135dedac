//! The JSON the chat endpoint answers with: `chat.completion` objects and, when streaming,
//! `chat.completion.chunk` objects, each with Tandem's routing details in a `tandem` object.

use serde::Serialize;

use crate::chat::ChatOutcome;

/// Identifies one completion in responses and logs: `chatcmpl-<UUIDv7>`.
#[derive(Debug, Clone)]
pub struct CompletionMeta {
    /// `chatcmpl-…`.
    pub id: String,
    /// Unix time in seconds when the request arrived.
    pub created: u64,
    /// The served model's id.
    pub model: String,
}

impl CompletionMeta {
    /// A fresh id for a request to `model`.
    pub fn new(model: String) -> Self {
        let created =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        Self { id: format!("chatcmpl-{}", uuid::Uuid::now_v7()), created, model }
    }
}

/// Which path answered and how, in every final response (`tandem` field).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TandemInfo {
    /// `local`, `cloud` or `local_fallback`.
    pub route: &'static str,
    /// Probability the model gave to asking for help at its decision point.
    pub help_probability: Option<f32>,
    /// The cloud model that answered, when the cloud did.
    pub cloud_model: Option<String>,
    /// Why a help request was answered on the device, when it was.
    pub fallback_reason: Option<String>,
    /// Milliseconds generating on the device.
    pub local_ms: u64,
    /// Milliseconds waiting for the cloud.
    pub cloud_ms: u64,
    /// Id of the telemetry event recorded for this request (absent without telemetry).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
}

impl TandemInfo {
    /// The routing details of `outcome`.
    pub fn of(outcome: &ChatOutcome) -> Self {
        Self {
            route: outcome.route.as_str(),
            help_probability: outcome.help_probability,
            cloud_model: outcome.cloud_model.clone(),
            fallback_reason: outcome.fallback_reason.clone(),
            local_ms: outcome.local_ms,
            cloud_ms: outcome.cloud_ms,
            event_id: outcome.event_id.map(|id| id.to_string()),
        }
    }
}

/// Token counts, OpenAI style.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
}

impl Usage {
    /// The counts of `outcome`.
    pub fn of(outcome: &ChatOutcome) -> Self {
        Self {
            prompt_tokens: outcome.prompt_tokens,
            completion_tokens: outcome.completion_tokens,
            total_tokens: outcome.prompt_tokens.saturating_add(outcome.completion_tokens),
        }
    }
}

/// A non-streaming answer.
#[derive(Debug, Serialize)]
pub struct ChatCompletion<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: [Choice<'a>; 1],
    usage: Usage,
    tandem: TandemInfo,
}

#[derive(Debug, Serialize)]
struct Choice<'a> {
    index: u32,
    message: AssistantMessage<'a>,
    finish_reason: &'static str,
    logprobs: Option<()>,
}

#[derive(Debug, Serialize)]
struct AssistantMessage<'a> {
    role: &'static str,
    content: &'a str,
}

impl<'a> ChatCompletion<'a> {
    /// The answer to the request `meta` describes.
    pub fn new(meta: &'a CompletionMeta, outcome: &'a ChatOutcome) -> Self {
        Self {
            id: &meta.id,
            object: "chat.completion",
            created: meta.created,
            model: &meta.model,
            choices: [Choice {
                index: 0,
                message: AssistantMessage { role: "assistant", content: &outcome.content },
                finish_reason: outcome.finish.as_str(),
                logprobs: None,
            }],
            usage: Usage::of(outcome),
            tandem: TandemInfo::of(outcome),
        }
    }
}

/// One server-sent event of a streaming answer.
#[derive(Debug, Serialize)]
pub struct ChatCompletionChunk<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: Vec<ChunkChoice<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Usage>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tandem: Option<TandemInfo>,
}

#[derive(Debug, Serialize)]
struct ChunkChoice<'a> {
    index: u32,
    delta: Delta<'a>,
    finish_reason: Option<&'static str>,
    logprobs: Option<()>,
}

#[derive(Debug, Default, Serialize)]
struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
}

impl<'a> ChatCompletionChunk<'a> {
    fn with_choice(meta: &'a CompletionMeta, choice: ChunkChoice<'a>) -> Self {
        Self {
            id: &meta.id,
            object: "chat.completion.chunk",
            created: meta.created,
            model: &meta.model,
            choices: vec![choice],
            usage: None,
            tandem: None,
        }
    }

    /// The first chunk: the assistant role, no text yet.
    pub fn role(meta: &'a CompletionMeta) -> Self {
        let delta = Delta { role: Some("assistant"), content: Some("") };
        Self::with_choice(meta, ChunkChoice { index: 0, delta, finish_reason: None, logprobs: None })
    }

    /// A piece of the answer.
    pub fn content(meta: &'a CompletionMeta, text: &'a str) -> Self {
        let delta = Delta { role: None, content: Some(text) };
        Self::with_choice(meta, ChunkChoice { index: 0, delta, finish_reason: None, logprobs: None })
    }

    /// The last chunk of the choice: why it ended and which route answered.
    pub fn finish(meta: &'a CompletionMeta, outcome: &ChatOutcome) -> Self {
        let choice = ChunkChoice {
            index: 0,
            delta: Delta::default(),
            finish_reason: Some(outcome.finish.as_str()),
            logprobs: None,
        };
        Self { tandem: Some(TandemInfo::of(outcome)), ..Self::with_choice(meta, choice) }
    }

    /// With `stream_options.include_usage`: the token counts, no choices.
    pub fn usage(meta: &'a CompletionMeta, outcome: &ChatOutcome) -> Self {
        Self { choices: Vec::new(), usage: Some(Usage::of(outcome)), ..Self::role(meta) }
    }
}
