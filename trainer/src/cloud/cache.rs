//! The persistent cloud-answer cache: a JSON-lines file under the run directory, one
//! `{"key", "model", "question", "answer"}` object per question, keyed by the SHA-256 of the model name
//! and the question. Entries are appended with one `write` of a whole line on a file opened for
//! appending, then flushed to disk, so a crash can leave at most a torn last line; opening the file
//! drops such a line (it is simply asked again).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Errors reading or appending to the cache file.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cloud cache {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cloud cache {path}, line {line}: {source}")]
    Corrupt { path: PathBuf, line: usize, source: serde_json::Error },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    key: String,
    model: String,
    question: String,
    answer: String,
}

/// Cloud answers by model and question, persisted as JSON lines.
#[derive(Debug)]
pub struct CloudCache {
    path: PathBuf,
    file: File,
    answers: HashMap<String, String>,
}

impl CloudCache {
    /// Opens (or creates) the cache at `path`, loading every complete entry.
    pub fn open(path: &Path) -> Result<Self, CacheError> {
        let io = |source| CacheError::Io { path: path.to_path_buf(), source };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        let mut answers = HashMap::new();
        if path.is_file() {
            let text = std::fs::read_to_string(path).map_err(io)?;
            let complete = text.rfind('\n').map_or(0, |at| at + 1);
            if complete < text.len() {
                tracing::warn!(path = %path.display(), "dropping a torn last line of the cloud cache");
                let file = OpenOptions::new().write(true).open(path).map_err(io)?;
                file.set_len(complete as u64).map_err(io)?;
            }
            for (index, line) in text[..complete].lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let entry: Entry = serde_json::from_str(line).map_err(|source| CacheError::Corrupt {
                    path: path.to_path_buf(),
                    line: index + 1,
                    source,
                })?;
                answers.insert(entry.key, entry.answer);
            }
        }
        let file = OpenOptions::new().create(true).append(true).open(path).map_err(io)?;
        Ok(Self { path: path.to_path_buf(), file, answers })
    }

    /// The cached answer of `model` to `question`.
    pub fn get(&self, model: &str, question: &str) -> Option<&str> {
        self.answers.get(&key(model, question)).map(String::as_str)
    }

    /// Records an answer: appended to the file and flushed to disk before returning.
    pub fn insert(&mut self, model: &str, question: &str, answer: &str) -> Result<(), CacheError> {
        let key = key(model, question);
        let entry = Entry {
            key: key.clone(),
            model: model.to_string(),
            question: question.to_string(),
            answer: answer.to_string(),
        };
        let mut line = serde_json::to_string(&entry).expect("cache entries serialise");
        line.push('\n');
        let io = |source| CacheError::Io { path: self.path.clone(), source };
        self.file.write_all(line.as_bytes()).map_err(io)?;
        self.file.sync_data().map_err(io)?;
        self.answers.insert(key, answer.to_string());
        Ok(())
    }

    /// How many answers the cache holds.
    pub fn len(&self) -> usize {
        self.answers.len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.answers.is_empty()
    }
}

fn key(model: &str, question: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(model.as_bytes());
    hasher.update([0u8]);
    hasher.update(question.as_bytes());
    hex::encode(hasher.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_survive_reopening_and_a_torn_last_line_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.jsonl");
        let mut cache = CloudCache::open(&path).unwrap();
        cache.insert("m", "q1", "a1").unwrap();
        cache.insert("m", "q2", "a2\nwith a newline").unwrap();
        drop(cache);
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(br#"{"key":"abc","model":"m","quest"#).unwrap();
        drop(file);
        let mut cache = CloudCache::open(&path).unwrap();
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.get("m", "q2"), Some("a2\nwith a newline"));
        assert_eq!(cache.get("other-model", "q1"), None, "answers are per model");
        cache.insert("m", "q3", "a3").unwrap();
        drop(cache);
        let cache = CloudCache::open(&path).unwrap();
        assert_eq!(cache.get("m", "q3"), Some("a3"));
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 3);
    }
}
