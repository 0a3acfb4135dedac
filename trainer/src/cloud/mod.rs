//! The cloud during training and evaluation.
//!
//! - [`client`]: an OpenAI-compatible chat-completions client (the request shape of the daemon's
//!   HTTPS offload: the bare question as the only user turn, no system prompt);
//! - [`cache`]: a persistent answer cache, one JSON line per question, so each question is asked at
//!   most once per run (the paper's bound: training cloud cost ≤ dataset size);
//! - [`solver`]: an exact Countdown solver behind the same OpenAI-compatible endpoint, for tests and
//!   CPU experiments, in process or as `tandem-train solver-cloud`.
//!
//! [`CachedCloud`] ties a transport to the cache; trainers and evaluators see a [`CloudOracle`].

pub mod cache;
pub mod client;
pub mod solver;

use cache::{CacheError, CloudCache};

/// Errors getting an answer from the cloud.
#[derive(Debug, thiserror::Error)]
pub enum CloudError {
    #[error("cloud request failed: {0}")]
    Request(String),
    #[error("the cloud's answer is not a valid chat completion: {0}")]
    InvalidResponse(String),
    #[error("the cloud answered HTTP {status}: {body}")]
    HttpStatus { status: u16, body: String },
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("cannot set up the cloud client: {0}")]
    Setup(String),
}

/// Something that answers questions the way the cloud does (deterministically, per the paper).
pub trait CloudTransport {
    /// The answers to `questions`, in order.
    fn ask_all(&self, questions: &[String]) -> Result<Vec<String>, CloudError>;
    /// The model name answers are recorded under.
    fn model(&self) -> &str;
}

/// Counters of cloud use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CloudStats {
    /// Questions sent to the cloud.
    pub queries: u64,
    /// Questions answered from the cache.
    pub cache_hits: u64,
}

/// The cloud as trainers and evaluators use it.
pub trait CloudOracle {
    /// The answers to `questions`, in order. Each distinct question is asked at most once.
    fn answers(&mut self, questions: &[String]) -> Result<Vec<String>, CloudError>;
    /// Use so far.
    fn stats(&self) -> CloudStats;
}

/// A transport behind the persistent cache.
pub struct CachedCloud<T: CloudTransport> {
    transport: T,
    cache: CloudCache,
    stats: CloudStats,
}

impl<T: CloudTransport> std::fmt::Debug for CachedCloud<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedCloud")
            .field("model", &self.transport.model())
            .field("stats", &self.stats)
            .finish()
    }
}

impl<T: CloudTransport> CachedCloud<T> {
    /// Answers from `cache` when it has them, else from `transport` (then cached).
    pub fn new(transport: T, cache: CloudCache) -> Self {
        Self { transport, cache, stats: CloudStats::default() }
    }

    /// The cache.
    pub fn cache(&self) -> &CloudCache {
        &self.cache
    }
}

impl<T: CloudTransport> CloudOracle for CachedCloud<T> {
    fn answers(&mut self, questions: &[String]) -> Result<Vec<String>, CloudError> {
        let model = self.transport.model().to_string();
        let mut missing: Vec<String> = Vec::new();
        for question in questions {
            if self.cache.get(&model, question).is_none() && !missing.contains(question) {
                missing.push(question.clone());
            }
        }
        self.stats.cache_hits += (questions.len() - missing.len()) as u64;
        if !missing.is_empty() {
            let answers = self.transport.ask_all(&missing)?;
            if answers.len() != missing.len() {
                return Err(CloudError::InvalidResponse(format!(
                    "{} answers for {} questions",
                    answers.len(),
                    missing.len()
                )));
            }
            self.stats.queries += missing.len() as u64;
            for (question, answer) in missing.iter().zip(answers) {
                self.cache.insert(&model, question, &answer)?;
            }
        }
        Ok(questions
            .iter()
            .map(|q| self.cache.get(&model, q).expect("every question was answered above").to_string())
            .collect())
    }

    fn stats(&self) -> CloudStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    struct Echo {
        asked: RefCell<Vec<String>>,
    }

    impl CloudTransport for Echo {
        fn ask_all(&self, questions: &[String]) -> Result<Vec<String>, CloudError> {
            self.asked.borrow_mut().extend(questions.iter().cloned());
            Ok(questions.iter().map(|q| format!("answer to {q}")).collect())
        }
        fn model(&self) -> &str {
            "echo"
        }
    }

    #[test]
    fn each_question_is_asked_once_per_run_even_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cloud_cache.jsonl");
        let qs = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let mut cloud =
            CachedCloud::new(Echo { asked: RefCell::default() }, CloudCache::open(&path).unwrap());
        let answers = cloud.answers(&qs(&["a", "b", "a"])).unwrap();
        assert_eq!(answers, ["answer to a", "answer to b", "answer to a"]);
        cloud.answers(&qs(&["b"])).unwrap();
        assert_eq!(*cloud.transport.asked.borrow(), ["a", "b"]);
        assert_eq!(cloud.stats(), CloudStats { queries: 2, cache_hits: 2 });
        drop(cloud);
        let mut reopened =
            CachedCloud::new(Echo { asked: RefCell::default() }, CloudCache::open(&path).unwrap());
        reopened.answers(&qs(&["a", "c"])).unwrap();
        assert_eq!(*reopened.transport.asked.borrow(), ["c"]);
    }
}
