//! The OpenAI chat-completions wire format Tandem speaks to a cloud LLM, in one place for the
//! daemon's HTTPS offload, the fleet's gateway and the trainer's cloud client: where the endpoint is
//! under a base URL, and how an answer is read out of a response body (leniently: string or
//! text-part content, optional model and usage).

use serde_json::Value;

/// The endpoint's path appended to a bare base URL.
pub const COMPLETIONS_PATH: &str = "/v1/chat/completions";

/// Characters of an unparseable body quoted in an error.
const ERROR_BODY_CHARS: usize = 200;

/// The chat-completions path for a base URL's path: kept when it already ends with
/// `/chat/completions`, `/chat/completions` appended to one ending in `/v1`, otherwise
/// [`COMPLETIONS_PATH`] appended.
pub fn completions_path(base_path: &str) -> String {
    let path = base_path.trim_end_matches('/');
    if path.ends_with("/chat/completions") {
        path.to_string()
    } else if path.ends_with("/v1") {
        format!("{path}/chat/completions")
    } else {
        format!("{path}{COMPLETIONS_PATH}")
    }
}

/// What a chat-completion response says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    /// The first choice's message content (text parts joined).
    pub content: String,
    /// The model that answered, when the body names it.
    pub model: Option<String>,
    /// Prompt tokens from `usage` (0 when absent).
    pub prompt_tokens: u32,
    /// Completion tokens from `usage` (0 when absent).
    pub completion_tokens: u32,
}

/// Why a response body holds no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidCompletion(pub String);

/// Reads a chat-completion body: the first choice's message content (a string, or an array of text
/// parts), the model and the usage counts. An `error` object, a refusal, or no text is an error.
pub fn parse_completion(body: &[u8]) -> Result<Completion, InvalidCompletion> {
    let invalid = |what: String| InvalidCompletion(what);
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        let snippet: String = String::from_utf8_lossy(body).chars().take(ERROR_BODY_CHARS).collect();
        invalid(format!("not JSON ({e}): {snippet:?}"))
    })?;
    if let Some(error) = value.get("error").filter(|e| !e.is_null()) {
        let message =
            error.get("message").and_then(Value::as_str).map_or_else(|| error.to_string(), String::from);
        return Err(invalid(format!("the body is an error: {message}")));
    }
    let choices =
        value.get("choices").and_then(Value::as_array).ok_or_else(|| invalid("no `choices` array".into()))?;
    let choice = choices.first().ok_or_else(|| invalid("`choices` is empty".into()))?;
    let message = choice.get("message").ok_or_else(|| invalid("the first choice has no `message`".into()))?;
    let content = match message.get("content") {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(parts)) => {
            let texts: Vec<&str> = parts
                .iter()
                .filter(|part| part.get("type").and_then(Value::as_str).is_none_or(|t| t == "text"))
                .filter_map(|part| part.get("text").and_then(Value::as_str))
                .collect();
            if texts.is_empty() {
                return Err(invalid("the message content has no text part".into()));
            }
            texts.concat()
        }
        _ => {
            let refusal = message.get("refusal").and_then(Value::as_str);
            return Err(invalid(match refusal {
                Some(refusal) => format!("the model refused: {refusal}"),
                None => "the first choice's message has no text content".into(),
            }));
        }
    };
    let usage = value.get("usage");
    let count = |field: &str| {
        usage
            .and_then(|u| u.get(field))
            .and_then(Value::as_u64)
            .map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX))
    };
    Ok(Completion {
        content,
        model: value.get("model").and_then(Value::as_str).map(String::from),
        prompt_tokens: count("prompt_tokens"),
        completion_tokens: count("completion_tokens"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_paths_get_the_chat_completions_endpoint() {
        assert_eq!(completions_path(""), "/v1/chat/completions");
        assert_eq!(completions_path("/"), "/v1/chat/completions");
        assert_eq!(completions_path("/openai/v1/"), "/openai/v1/chat/completions");
        assert_eq!(completions_path("/v1/chat/completions"), "/v1/chat/completions");
    }

    #[test]
    fn content_model_and_usage_are_read_and_missing_ones_default() {
        let body = br#"{"model":"m","choices":[{"message":{"content":[{"type":"text","text":"a"},{"text":"b"}]}}],"usage":{"prompt_tokens":3,"completion_tokens":4}}"#;
        let parsed = parse_completion(body).unwrap();
        assert_eq!((parsed.content.as_str(), parsed.model.as_deref()), ("ab", Some("m")));
        assert_eq!((parsed.prompt_tokens, parsed.completion_tokens), (3, 4));
        let bare = parse_completion(br#"{"choices":[{"message":{"content":"42"}}]}"#).unwrap();
        assert_eq!((bare.content.as_str(), bare.model, bare.prompt_tokens), ("42", None, 0));
    }

    #[test]
    fn errors_refusals_and_bodies_without_text_are_invalid() {
        for (body, says) in [
            (&br#"{"error":{"message":"quota"}}"#[..], "quota"),
            (br#"{"choices":[{"message":{"refusal":"no"}}]}"#, "refused: no"),
            (br#"{"choices":[]}"#, "empty"),
            (b"<html>", "not JSON"),
        ] {
            let error = parse_completion(body).unwrap_err().to_string();
            assert!(error.contains(says), "{error}");
        }
    }
}
