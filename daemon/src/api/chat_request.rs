//! Parsing `POST /v1/chat/completions` bodies into a [`ChatRequest`], field by field, so that every
//! error names the parameter at fault (`param` in the error body).

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use tandem_core::protocol::ChatMessage;

use super::error::ApiError;
use crate::chat::ChatRequest;
use crate::config::GenerationDefaults;

/// Roles a message may have.
const ROLES: [&str; 3] = ["system", "user", "assistant"];

/// Highest temperature accepted (as OpenAI).
const MAX_TEMPERATURE: f32 = 2.0;

/// A validated request and the API-level options that do not reach the backend.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedChatRequest {
    /// What the backend answers.
    pub chat: ChatRequest,
    /// `stream`: answer with server-sent events.
    pub stream: bool,
    /// `stream_options.include_usage`: send a usage chunk before `[DONE]`.
    pub include_usage: bool,
    /// `model` as sent (any name is accepted).
    pub model: Option<String>,
}

/// Parses and validates a request body; `defaults` fill what the request leaves out.
pub fn parse_chat_request(body: &[u8], defaults: &GenerationDefaults) -> Result<ParsedChatRequest, ApiError> {
    let text = std::str::from_utf8(body).map_err(|_| ApiError::invalid_utf8())?;
    let value: Value = serde_json::from_str(text).map_err(ApiError::invalid_json)?;
    let Value::Object(object) = value else {
        return Err(ApiError::invalid_json("the body must be a JSON object"));
    };

    let mut model = None;
    let mut messages = None;
    let mut max_tokens = None;
    let mut max_completion_tokens = None;
    let mut temperature = None;
    let mut top_p = None;
    let mut top_k = None;
    let mut seed = None;
    let mut stop = Vec::new();
    let mut stream = false;
    let mut include_usage = false;
    for (key, value) in object {
        // `null` means "not given" for every optional parameter (some clients send them).
        if value.is_null() && key != "messages" && is_known(&key) {
            continue;
        }
        match key.as_str() {
            "model" => model = Some(field::<String>(&key, value)?),
            "messages" => messages = Some(parse_messages(value)?),
            "max_tokens" => max_tokens = Some(positive(&key, field::<u32>(&key, value)?)?),
            "max_completion_tokens" => {
                max_completion_tokens = Some(positive(&key, field::<u32>(&key, value)?)?)
            }
            "temperature" => {
                let t = field::<f32>(&key, value)?;
                if !(0.0..=MAX_TEMPERATURE).contains(&t) {
                    return Err(ApiError::invalid_value(
                        key,
                        format!("temperature must be in [0, 2], got {t}"),
                    ));
                }
                temperature = Some(t);
            }
            "top_p" => {
                let p = field::<f32>(&key, value)?;
                if !(p > 0.0 && p <= 1.0) {
                    return Err(ApiError::invalid_value(key, format!("top_p must be in (0, 1], got {p}")));
                }
                top_p = Some(p);
            }
            "top_k" => top_k = Some(field::<u32>(&key, value)?),
            "seed" => seed = Some(parse_seed(&key, value)?),
            "stop" => stop = parse_stop(value)?,
            "stream" => stream = field::<bool>(&key, value)?,
            "stream_options" => include_usage = parse_stream_options(value)?,
            "n" => {
                let n = field::<u32>(&key, value)?;
                if n != 1 {
                    return Err(ApiError::invalid_value(key, format!("only n = 1 is supported, got {n}")));
                }
            }
            "user" => {
                field::<String>(&key, value)?;
            }
            _ => return Err(ApiError::unknown_parameter(key)),
        }
    }
    let messages = messages.ok_or_else(|| ApiError::missing_parameter("messages"))?;
    if include_usage && !stream {
        return Err(ApiError::invalid_value(
            "stream_options",
            "stream_options is only allowed with stream = true",
        ));
    }
    let chat = ChatRequest {
        messages,
        max_tokens: Some(max_completion_tokens.or(max_tokens).unwrap_or(defaults.max_tokens)),
        temperature: temperature.or(defaults.temperature),
        top_p,
        top_k,
        seed,
        stop,
    };
    Ok(ParsedChatRequest { chat, stream, include_usage, model })
}

fn is_known(key: &str) -> bool {
    matches!(
        key,
        "model"
            | "messages"
            | "max_tokens"
            | "max_completion_tokens"
            | "temperature"
            | "top_p"
            | "top_k"
            | "seed"
            | "stop"
            | "stream"
            | "stream_options"
            | "n"
            | "user"
    )
}

/// Deserialises one parameter; the error names it.
fn field<T: DeserializeOwned>(param: &str, value: Value) -> Result<T, ApiError> {
    serde_json::from_value(value)
        .map_err(|e| ApiError::invalid_type(param, format!("invalid `{param}`: {e}")))
}

fn positive(param: &str, n: u32) -> Result<u32, ApiError> {
    if n == 0 {
        return Err(ApiError::invalid_value(param, format!("`{param}` must be at least 1")));
    }
    Ok(n)
}

/// Any JSON integer; negative seeds are accepted (OpenAI allows them) and reinterpreted as u64.
fn parse_seed(param: &str, value: Value) -> Result<u64, ApiError> {
    match &value {
        Value::Number(n) if n.is_u64() || n.is_i64() => {
            Ok(n.as_u64().or_else(|| n.as_i64().map(i64::cast_unsigned)).unwrap_or_default())
        }
        _ => Err(ApiError::invalid_type(param, format!("`{param}` must be an integer, got {value}"))),
    }
}

fn parse_stop(value: Value) -> Result<Vec<String>, ApiError> {
    let stops = match value {
        Value::String(s) => vec![s],
        Value::Array(items) => items
            .into_iter()
            .enumerate()
            .map(|(i, item)| field::<String>(&format!("stop[{i}]"), item))
            .collect::<Result<_, _>>()?,
        other => {
            return Err(ApiError::invalid_type(
                "stop",
                format!("`stop` must be a string or an array of strings, got {other}"),
            ));
        }
    };
    if stops.iter().any(String::is_empty) {
        return Err(ApiError::invalid_value("stop", "stop strings must not be empty"));
    }
    Ok(stops)
}

fn parse_stream_options(value: Value) -> Result<bool, ApiError> {
    let Value::Object(options) = value else {
        return Err(ApiError::invalid_type("stream_options", "`stream_options` must be an object"));
    };
    let mut include_usage = false;
    for (key, value) in options {
        match key.as_str() {
            "include_usage" => {
                include_usage = value.is_null() || field::<bool>("stream_options.include_usage", value)?;
            }
            _ => return Err(ApiError::unknown_parameter(format!("stream_options.{key}"))),
        }
    }
    Ok(include_usage)
}

fn parse_messages(value: Value) -> Result<Vec<ChatMessage>, ApiError> {
    let Value::Array(items) = value else {
        return Err(ApiError::invalid_type("messages", "`messages` must be an array of messages"));
    };
    if items.is_empty() {
        return Err(ApiError::invalid_value("messages", "`messages` must contain at least one message"));
    }
    let messages = items
        .into_iter()
        .enumerate()
        .map(|(i, item)| parse_message(i, item))
        .collect::<Result<Vec<_>, _>>()?;
    let last = messages.len() - 1;
    if messages[last].role != "user" {
        return Err(ApiError::invalid_value(
            format!("messages[{last}].role"),
            "the last message must be the user's (role `user`): it is the query being answered",
        ));
    }
    Ok(messages)
}

fn parse_message(index: usize, value: Value) -> Result<ChatMessage, ApiError> {
    let param = |key: &str| format!("messages[{index}].{key}");
    let Value::Object(object) = value else {
        return Err(ApiError::invalid_type(format!("messages[{index}]"), "each message must be an object"));
    };
    let mut role = None;
    let mut content = None;
    for (key, value) in object {
        match key.as_str() {
            "role" => role = Some(field::<String>(&param("role"), value)?),
            "content" => content = Some(parse_content(&param("content"), value)?),
            "name" if value.is_null() => {}
            "name" => {
                field::<String>(&param("name"), value)?;
            }
            _ => return Err(ApiError::unknown_parameter(param(&key))),
        }
    }
    let role = role.ok_or_else(|| ApiError::missing_parameter(&param("role")))?;
    if !ROLES.contains(&role.as_str()) {
        return Err(ApiError::invalid_value(
            param("role"),
            format!("unsupported role `{role}`; use one of {}", ROLES.join(", ")),
        ));
    }
    let content = content.ok_or_else(|| ApiError::missing_parameter(&param("content")))?;
    if content.trim().is_empty() {
        return Err(ApiError::invalid_value(param("content"), "message content must not be empty"));
    }
    Ok(ChatMessage { role, content })
}

/// A string, or an array of `{"type": "text", "text": …}` parts joined with newlines.
fn parse_content(param: &str, value: Value) -> Result<String, ApiError> {
    match value {
        Value::String(text) => Ok(text),
        Value::Array(parts) => {
            let texts = parts
                .into_iter()
                .enumerate()
                .map(|(i, part)| parse_text_part(&format!("{param}[{i}]"), part))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(texts.join("\n"))
        }
        other => Err(ApiError::invalid_type(
            param,
            format!("content must be a string or an array of text parts, got {other}"),
        )),
    }
}

fn parse_text_part(param: &str, value: Value) -> Result<String, ApiError> {
    let Value::Object(mut part) = value else {
        return Err(ApiError::invalid_type(param, "each content part must be an object"));
    };
    let kind = take_string(&mut part, param, "type")?;
    if kind != "text" {
        return Err(ApiError::invalid_value(
            format!("{param}.type"),
            format!("only text content parts are supported, got `{kind}`"),
        ));
    }
    let text = take_string(&mut part, param, "text")?;
    if let Some(key) = part.keys().next() {
        return Err(ApiError::unknown_parameter(format!("{param}.{key}")));
    }
    Ok(text)
}

fn take_string(object: &mut Map<String, Value>, param: &str, key: &str) -> Result<String, ApiError> {
    let name = format!("{param}.{key}");
    let value = object.remove(key).ok_or_else(|| ApiError::missing_parameter(&name))?;
    field(&name, value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<ParsedChatRequest, ApiError> {
        parse_chat_request(json.as_bytes(), &GenerationDefaults::default())
    }

    fn param_of(json: &str) -> (u16, String, Option<String>) {
        let error = parse(json).unwrap_err();
        let body = serde_json::to_value(error.body()).unwrap();
        (
            error.status().as_u16(),
            error.code().to_string(),
            body["error"]["param"].as_str().map(str::to_string),
        )
    }

    #[test]
    fn a_minimal_request_gets_the_configured_defaults() {
        let parsed = parse(r#"{"messages":[{"role":"user","content":"hi"}]}"#).unwrap();
        assert_eq!(parsed.chat.max_tokens, Some(256));
        assert_eq!(parsed.chat.temperature, None);
        assert!(!parsed.stream);
        assert_eq!(parsed.chat.messages, [ChatMessage { role: "user".into(), content: "hi".into() }]);
    }

    #[test]
    fn every_supported_parameter_is_read() {
        let parsed = parse(
            r#"{"model":"m","messages":[{"role":"system","content":"be brief"},
                {"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}],"name":"u"}],
                "max_tokens":5,"max_completion_tokens":7,"temperature":0.5,"top_p":0.9,"top_k":40,
                "seed":-1,"stop":["x","y"],"stream":true,"stream_options":{"include_usage":true},
                "n":1,"user":"someone","presence_penalty":null}"#,
        );
        // `presence_penalty` is unknown even when null.
        assert!(parsed.is_err());
        let parsed = parse(
            r#"{"model":"m","messages":[{"role":"system","content":"be brief"},
                {"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}],"name":"u"}],
                "max_tokens":5,"max_completion_tokens":7,"temperature":0.5,"top_p":0.9,"top_k":40,
                "seed":-1,"stop":["x","y"],"stream":true,"stream_options":{"include_usage":true},
                "n":1,"user":"someone"}"#,
        )
        .unwrap();
        assert_eq!(parsed.model.as_deref(), Some("m"));
        assert_eq!(parsed.chat.messages[1].content, "a\nb");
        assert_eq!(parsed.chat.max_tokens, Some(7), "max_completion_tokens wins");
        assert_eq!(
            (parsed.chat.temperature, parsed.chat.top_p, parsed.chat.top_k),
            (Some(0.5), Some(0.9), Some(40))
        );
        assert_eq!(parsed.chat.seed, Some(u64::MAX));
        assert_eq!(parsed.chat.stop, ["x", "y"]);
        assert!(parsed.stream && parsed.include_usage);
    }

    #[test]
    fn a_single_stop_string_and_nulls_are_accepted() {
        let parsed =
            parse(r#"{"messages":[{"role":"user","content":"q"}],"stop":"END","temperature":null,"n":null}"#)
                .unwrap();
        assert_eq!(parsed.chat.stop, ["END"]);
    }

    #[test]
    fn errors_name_the_parameter_at_fault() {
        let cases = [
            (
                r#"{"messages":[{"role":"user","content":"q"}],"frequency_penalty":1}"#,
                "unknown_parameter",
                "frequency_penalty",
            ),
            (
                r#"{"messages":[{"role":"user","content":"q","tool_calls":[]}]}"#,
                "unknown_parameter",
                "messages[0].tool_calls",
            ),
            (r#"{"messages":[]}"#, "invalid_value", "messages"),
            (r#"{"model":"m"}"#, "missing_required_parameter", "messages"),
            (r#"{"messages":[{"role":"user","content":""}]}"#, "invalid_value", "messages[0].content"),
            (r#"{"messages":[{"role":"tool","content":"x"}]}"#, "invalid_value", "messages[0].role"),
            (
                r#"{"messages":[{"role":"user","content":"q"},{"role":"assistant","content":"a"}]}"#,
                "invalid_value",
                "messages[1].role",
            ),
            (
                r#"{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{}}]}]}"#,
                "invalid_value",
                "messages[0].content[0].type",
            ),
            (r#"{"messages":[{"role":"user","content":"q"}],"n":2}"#, "invalid_value", "n"),
            (
                r#"{"messages":[{"role":"user","content":"q"}],"max_tokens":"many"}"#,
                "invalid_type",
                "max_tokens",
            ),
            (r#"{"messages":[{"role":"user","content":"q"}],"max_tokens":0}"#, "invalid_value", "max_tokens"),
            (
                r#"{"messages":[{"role":"user","content":"q"}],"temperature":3}"#,
                "invalid_value",
                "temperature",
            ),
            (r#"{"messages":[{"role":"user","content":"q"}],"top_p":0}"#, "invalid_value", "top_p"),
            (r#"{"messages":[{"role":"user","content":"q"}],"stop":[""]}"#, "invalid_value", "stop"),
            (
                r#"{"messages":[{"role":"user","content":"q"}],"stream_options":{"x":1},"stream":true}"#,
                "unknown_parameter",
                "stream_options.x",
            ),
        ];
        for (json, code, param) in cases {
            let (status, got_code, got_param) = param_of(json);
            assert_eq!(status, 400, "{json}");
            assert_eq!((got_code.as_str(), got_param.as_deref()), (code, Some(param)), "{json}");
        }
    }

    #[test]
    fn malformed_json_and_bad_utf8_are_distinguished() {
        assert_eq!(parse("{").unwrap_err().code(), "invalid_json");
        assert_eq!(parse("[1]").unwrap_err().code(), "invalid_json");
        let error =
            parse_chat_request(b"{\"messages\":\"\xff\"}", &GenerationDefaults::default()).unwrap_err();
        assert_eq!(error.code(), "invalid_utf8");
    }
}
