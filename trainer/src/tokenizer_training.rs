//! Training a byte-level BPE tokenizer for the models Tandem creates itself (no tokenizer comes
//! from a hub): Qwen-style special tokens, byte fallback through the byte-level alphabet, so every
//! string round-trips.

use std::path::Path;

use tandem_core::help_marker::{HELP_CLOSE_TAG, HELP_OPEN_TAG};
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, TokenizerBuilder};

/// Ends a document; also the EOS token of models Tandem creates.
pub const END_OF_TEXT: &str = "<|endoftext|>";
/// Opens a chat turn.
pub const IM_START: &str = "<|im_start|>";
/// Closes a chat turn.
pub const IM_END: &str = "<|im_end|>";
/// Special tokens, in id order (ids 0 to 4). The help marker's tags are single tokens, so the
/// policy's choice to ask for help is one token: its probability is the decision probability, a
/// bias on its logit steers the choice, and banning it forbids asking.
pub const SPECIAL_TOKENS: [&str; 5] = [END_OF_TEXT, IM_START, IM_END, HELP_OPEN_TAG, HELP_CLOSE_TAG];

/// ChatML, the chat template of the Qwen family, written into `tokenizer_config.json` of the
/// models Tandem creates.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + \
    message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}\
    {{ '<|im_start|>assistant\\n' }}{% endif %}";

/// The `tokenizer_config.json` of the models Tandem creates: chat template and special tokens.
pub fn tokenizer_config_json() -> String {
    serde_json::to_string_pretty(&serde_json::json!({
        "chat_template": CHATML_TEMPLATE,
        "eos_token": IM_END,
        "pad_token": END_OF_TEXT,
        "bos_token": null,
        "add_bos_token": false,
        "model_max_length": 32768,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }))
    .expect("static JSON serialises")
}

/// Text the default tokenizer is trained on: arithmetic, chat scaffolding and plain English.
pub const DEFAULT_CORPUS: &str = include_str!("../assets/tokenizer-corpus.txt");

/// Errors training or saving a tokenizer.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerTrainingError {
    #[error("vocab_size {0} is too small: a byte-level tokenizer needs at least 256 + 5 special tokens")]
    VocabTooSmall(usize),
    #[error("training the tokenizer failed: {0}")]
    Train(String),
    #[error("writing {path}: {message}")]
    Save { path: String, message: String },
}

/// Trains a byte-level BPE with at most `vocab_size` tokens on `corpus` and writes `tokenizer.json`.
pub fn train_bpe_tokenizer(
    corpus: &str,
    vocab_size: usize,
    out: &Path,
) -> Result<(), TokenizerTrainingError> {
    if vocab_size < 256 + SPECIAL_TOKENS.len() {
        return Err(TokenizerTrainingError::VocabTooSmall(vocab_size));
    }
    let mut trainer = BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(vocab_size)
        .min_frequency(2)
        .special_tokens(SPECIAL_TOKENS.iter().map(|t| AddedToken::from(t.to_string(), true)).collect())
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let byte_level = ByteLevel::new(false, true, true);
    let mut tokenizer = TokenizerBuilder::<BPE, NormalizerWrapper, ByteLevel, ByteLevel, ByteLevel>::new()
        .with_model(BPE::default())
        .with_normalizer(None)
        .with_pre_tokenizer(Some(byte_level))
        .with_post_processor(Some(byte_level))
        .with_decoder(Some(byte_level))
        .build()
        .map_err(|e| TokenizerTrainingError::Train(e.to_string()))?;
    tokenizer
        .train(&mut trainer, corpus.lines().filter(|l| !l.trim().is_empty()))
        .map_err(|e| TokenizerTrainingError::Train(e.to_string()))?;
    tokenizer
        .save(out, true)
        .map_err(|e| TokenizerTrainingError::Save { path: out.display().to_string(), message: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trained_tokenizer_round_trips_text_and_keeps_special_ids() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        train_bpe_tokenizer(DEFAULT_CORPUS, 400, &path).unwrap();
        let tok = tokenizers::Tokenizer::from_file(&path).unwrap();
        assert!(tok.get_vocab_size(true) <= 400);
        for (id, special) in SPECIAL_TOKENS.iter().enumerate() {
            assert_eq!(tok.token_to_id(special), Some(id as u32));
        }
        let marker = tok.encode(tandem_core::help_marker::HELP_MARKER, false).unwrap();
        assert_eq!(marker.get_ids()[0], 3, "the opening tag is one token");
        let text = "Using 3, 7, 25: (25 - 7) * 3 = 54 — ünïcode ✓";
        let enc = tok.encode(text, false).unwrap();
        assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), text);
    }

    #[test]
    fn too_small_a_vocabulary_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = train_bpe_tokenizer(DEFAULT_CORPUS, 100, &dir.path().join("t.json")).unwrap_err();
        assert!(err.to_string().contains("at least"));
    }
}
