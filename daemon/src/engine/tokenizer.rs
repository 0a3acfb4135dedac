//! The model's `tokenizer.json` (Hugging Face `tokenizers`): text to ids and back.

use std::path::{Path, PathBuf};

use tokenizers::Tokenizer;

use super::error::EngineError;
use super::generator::TextDecoder;

/// A loaded tokenizer.
pub struct TextTokenizer {
    inner: Tokenizer,
    path: PathBuf,
    token_count: usize,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("path", &self.path)
            .field("token_count", &self.token_count)
            .finish()
    }
}

impl TextTokenizer {
    /// Loads `tokenizer.json`.
    pub fn load(path: &Path) -> Result<TextTokenizer, EngineError> {
        let inner = Tokenizer::from_file(path)
            .map_err(|e| EngineError::TokenizerLoad { path: path.to_path_buf(), message: e.to_string() })?;
        // Added tokens may sit above the base vocabulary, so count up to the largest id.
        let largest = inner.get_vocab(true).values().copied().max().map_or(0, |id| id as usize + 1);
        let token_count = largest.max(inner.get_vocab_size(true));
        Ok(TextTokenizer { inner, path: path.to_path_buf(), token_count })
    }

    /// The file it was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Ids of `text` as-is: no chat template and no BOS or other special tokens added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        let encoding = self.inner.encode(text, false).map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Refuses a tokenizer that can produce ids the model has no logits for.
    pub fn check_vocab(&self, model_vocab: usize) -> Result<(), EngineError> {
        if self.token_count > model_vocab {
            return Err(EngineError::VocabMismatch { tokenizer_tokens: self.token_count, model_vocab });
        }
        Ok(())
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }
}

impl TextDecoder for TextTokenizer {
    fn decode(&self, ids: &[u32]) -> Result<String, EngineError> {
        self.inner.decode(ids, false).map_err(|e| EngineError::Tokenizer(e.to_string()))
    }

    fn token_count(&self) -> usize {
        self.token_count
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A word-level tokenizer of four words plus one added special token (which gets id 4).
    const TOKENIZER_JSON: &str = r#"{
      "version": "1.0", "truncation": null, "padding": null,
      "added_tokens": [{"id": 9, "content": "<eos>", "single_word": false, "lstrip": false, "rstrip": false,
                        "normalized": false, "special": true}],
      "normalizer": null,
      "pre_tokenizer": {"type": "Whitespace"},
      "post_processor": null,
      "decoder": null,
      "model": {"type": "WordLevel", "vocab": {"hello": 0, "world": 1, "[UNK]": 2, "again": 3}, "unk_token": "[UNK]"}
    }"#;

    fn load() -> TextTokenizer {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        std::fs::write(&path, TOKENIZER_JSON).unwrap();
        TextTokenizer::load(&path).unwrap()
    }

    #[test]
    fn text_is_encoded_without_added_special_tokens() {
        let tokenizer = load();
        assert_eq!(tokenizer.encode("hello world again").unwrap(), [0, 1, 3]);
    }

    #[test]
    fn the_token_count_includes_added_tokens() {
        let tokenizer = load();
        assert_eq!(tokenizer.token_count(), 5);
        assert!(tokenizer.check_vocab(5).is_ok());
        let err = tokenizer.check_vocab(4).unwrap_err().to_string();
        assert!(
            err.contains("5 tokens") && err.contains("have 4") && err.contains("different models"),
            "{err}"
        );
    }

    #[test]
    fn a_file_that_is_not_a_tokenizer_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        std::fs::write(&path, "{\"not\": \"a tokenizer\"}").unwrap();
        let err = TextTokenizer::load(&path).unwrap_err().to_string();
        assert!(err.contains("tokenizer.json"), "{err}");
    }
}
