//! From chat messages to token ids and back, the way the daemon does it: the checkpoint's Hugging Face
//! chat template (Jinja, rendered with minijinja; ChatML when there is none), encoded as-is with
//! `tokenizer.json`. Also the ids that end a device response: end-of-sequence tokens and the help
//! marker's opening tag, a single token in Tandem's tokenizers.

use std::path::{Path, PathBuf};

use minijinja::{Environment, ErrorKind, context};
use tandem_core::help_marker::HELP_OPEN_TAG;
use tandem_core::protocol::ChatMessage;
use tokenizers::Tokenizer;

/// ChatML, the Qwen family's format, for checkpoints without a chat template.
const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + \
    message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}\
    {{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Errors loading or applying a chat format.
#[derive(Debug, thiserror::Error)]
pub enum ChatFormatError {
    #[error("{path}: {message}")]
    Load { path: PathBuf, message: String },
    #[error("the chat template does not compile: {0}")]
    Template(String),
    #[error("rendering the chat template failed: {0}")]
    Render(String),
    #[error("tokenizing failed: {0}")]
    Tokenize(String),
    #[error(
        "the tokenizer has no end-of-sequence token: set eos_token_id in config.json or eos_token in tokenizer_config.json"
    )]
    NoEos,
}

/// A checkpoint's tokenizer and chat template.
pub struct ChatFormat {
    env: Environment<'static>,
    tokenizer: Tokenizer,
    eos_ids: Vec<u32>,
    end_of_turn: u32,
    help_token: Option<u32>,
}

impl std::fmt::Debug for ChatFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatFormat")
            .field("eos_ids", &self.eos_ids)
            .field("help_token", &self.help_token)
            .finish()
    }
}

impl ChatFormat {
    /// Loads `tokenizer.json` and `tokenizer_config.json` (chat template, `eos_token`) from a checkpoint
    /// folder; `config_eos` are the model config's end-of-sequence ids.
    pub fn load(dir: &Path, config_eos: &[u32]) -> Result<Self, ChatFormatError> {
        let tokenizer_path = dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&tokenizer_path)
            .map_err(|e| ChatFormatError::Load { path: tokenizer_path, message: e.to_string() })?;
        let config_path = dir.join("tokenizer_config.json");
        let tokenizer_config: serde_json::Value = if config_path.is_file() {
            let text = std::fs::read_to_string(&config_path)
                .map_err(|e| ChatFormatError::Load { path: config_path.clone(), message: e.to_string() })?;
            serde_json::from_str(&text)
                .map_err(|e| ChatFormatError::Load { path: config_path.clone(), message: e.to_string() })?
        } else {
            serde_json::Value::Null
        };
        let template = tokenizer_config.get("chat_template").and_then(|t| t.as_str()).map(str::to_string);
        let eos_token = special_token_text(tokenizer_config.get("eos_token"));
        Self::new(tokenizer, template.as_deref(), eos_token.as_deref(), config_eos)
    }

    /// A format from its parts; `eos_token` is the chat template's end-of-turn token text.
    pub fn new(
        tokenizer: Tokenizer,
        template: Option<&str>,
        eos_token: Option<&str>,
        config_eos: &[u32],
    ) -> Result<Self, ChatFormatError> {
        let mut env = Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |message: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
        });
        env.add_template_owned("chat", template.unwrap_or(CHATML).to_string())
            .map_err(|e| ChatFormatError::Template(format!("{e:#}")))?;
        let end_of_turn = eos_token.and_then(|t| tokenizer.token_to_id(t));
        let mut eos_ids: Vec<u32> = end_of_turn.into_iter().chain(config_eos.iter().copied()).collect();
        eos_ids.dedup();
        let end_of_turn =
            end_of_turn.or_else(|| config_eos.first().copied()).ok_or(ChatFormatError::NoEos)?;
        let help_token = tokenizer.token_to_id(HELP_OPEN_TAG);
        Ok(Self { env, tokenizer, eos_ids, end_of_turn, help_token })
    }

    /// The prompt text for `messages`, ending where the assistant's answer begins.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String, ChatFormatError> {
        let template = self.env.get_template("chat").map_err(|e| ChatFormatError::Render(e.to_string()))?;
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => true,
                bos_token => "",
                eos_token => "",
            })
            .map_err(|e| ChatFormatError::Render(format!("{e:#}")))
    }

    /// The prompt ids for `messages`.
    pub fn prompt_ids(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, ChatFormatError> {
        self.encode(&self.render(messages)?)
    }

    /// Ids of `text` as-is (special tokens in the text are recognised, none are added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ChatFormatError> {
        self.tokenizer
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| ChatFormatError::Tokenize(e.to_string()))
    }

    /// Text of `ids` with special tokens kept (the help tag stays visible), end-of-sequence ids dropped.
    pub fn decode(&self, ids: &[u32]) -> Result<String, ChatFormatError> {
        let kept: Vec<u32> = ids.iter().copied().filter(|id| !self.eos_ids.contains(id)).collect();
        self.tokenizer.decode(&kept, false).map_err(|e| ChatFormatError::Tokenize(e.to_string()))
    }

    /// Ids that end a response.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// The token that ends an assistant turn, appended to supervised completions.
    pub fn end_of_turn(&self) -> u32 {
        self.end_of_turn
    }

    /// The help marker's opening tag, when it is a single token.
    pub fn help_token(&self) -> Option<u32> {
        self.help_token
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }
}

/// `eos_token` is either a string or an `AddedToken` object with a `content` field.
fn special_token_text(value: Option<&serde_json::Value>) -> Option<String> {
    match value? {
        serde_json::Value::String(text) => Some(text.clone()),
        other => other.get("content").and_then(|c| c.as_str()).map(str::to_string),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer_training::{DEFAULT_CORPUS, IM_END, tokenizer_config_json, train_bpe_tokenizer};

    #[test]
    fn prompts_render_as_chatml_and_the_help_tag_is_one_token() {
        let dir = tempfile::tempdir().unwrap();
        train_bpe_tokenizer(DEFAULT_CORPUS, 400, &dir.path().join("tokenizer.json")).unwrap();
        std::fs::write(dir.path().join("tokenizer_config.json"), tokenizer_config_json()).unwrap();
        let format = ChatFormat::load(dir.path(), &[0]).unwrap();
        let messages = vec![ChatMessage { role: "user".into(), content: "2+2?".into() }];
        assert_eq!(
            format.render(&messages).unwrap(),
            "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
        );
        let im_end = format.tokenizer().token_to_id(IM_END).unwrap();
        assert_eq!(format.end_of_turn(), im_end);
        assert_eq!(format.eos_ids(), &[im_end, 0]);
        assert_eq!(format.help_token(), Some(3));
        let ids = format.encode("<think>ok</think><unknown>").unwrap();
        assert_eq!(*ids.last().unwrap(), 3);
        let mut with_eos = ids.clone();
        with_eos.push(im_end);
        assert_eq!(format.decode(&with_eos).unwrap(), "<think>ok</think><unknown>");
    }
}
