//! An exact Countdown solver posing as the cloud LLM: it reads the question core's
//! [`CountdownProblem::question`] writes, solves it with core's exhaustive solver and answers
//! `<answer> expression </answer>`, through the same OpenAI-compatible `POST /v1/chat/completions` a
//! real cloud model serves. `error_rate` makes a deterministic share of questions (by hash) come
//! back unsolved, to imitate an imperfect cloud.
//!
//! [`SolverCloud`] answers in process (tests); [`SolverServer`] serves it on a socket from a
//! background thread (the CPU experiment, and `tandem-train solver-cloud`).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tandem_core::tasks::countdown::{CountdownProblem, solve};
use tandem_core::tasks::templates::{ANSWER_CLOSE, ANSWER_OPEN};

use super::{CloudError, CloudTransport};

/// The model name the solver answers under.
pub const SOLVER_MODEL: &str = "countdown-solver";
/// What the solver says when it has no solution (or plays wrong).
pub const NO_SOLUTION: &str = "I could not find a solution.";

/// Settings of the solver cloud.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SolverOptions {
    /// Share of questions (chosen by hash, so the same ones every time) answered with no solution.
    pub error_rate: f64,
}

impl Default for SolverOptions {
    fn default() -> Self {
        Self { error_rate: 0.0 }
    }
}

/// The Countdown problem a question describes: the numbers in the first `[…]` and the integer after
/// "value is" (core's wording), else the first integer after the list.
pub fn parse_countdown_question(text: &str) -> Option<CountdownProblem> {
    let open = text.find('[')?;
    let close = open + text[open..].find(']')?;
    let numbers = text[open + 1..close]
        .split(',')
        .map(|n| n.trim().parse::<u32>().ok())
        .collect::<Option<Vec<u32>>>()?;
    let rest = &text[close + 1..];
    let after = rest.find("value is").map_or(rest, |at| &rest[at + "value is".len()..]);
    let start = after.find(|c: char| c.is_ascii_digit() || c == '-')?;
    let digits: String = after[start..]
        .chars()
        .enumerate()
        .take_while(|(i, c)| c.is_ascii_digit() || (*i == 0 && *c == '-'))
        .map(|(_, c)| c)
        .collect();
    let target = digits.parse::<i64>().ok()?;
    (!numbers.is_empty()).then_some(CountdownProblem { numbers, target })
}

/// The solver's answer to a question.
pub fn solver_answer(question: &str, options: SolverOptions) -> String {
    if options.error_rate > 0.0 && hash_fraction(question) < options.error_rate {
        return NO_SOLUTION.to_string();
    }
    match parse_countdown_question(question).and_then(|problem| solve(&problem)) {
        Some(expression) => format!("{ANSWER_OPEN} {expression} {ANSWER_CLOSE}"),
        None => NO_SOLUTION.to_string(),
    }
}

/// A number in [0, 1) fixed by `text`.
fn hash_fraction(text: &str) -> f64 {
    let digest = Sha256::digest(text.as_bytes());
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64
}

/// The solver answering in process.
#[derive(Debug, Clone, Default)]
pub struct SolverCloud {
    /// How it answers.
    pub options: SolverOptions,
}

impl CloudTransport for SolverCloud {
    fn ask_all(&self, questions: &[String]) -> Result<Vec<String>, CloudError> {
        Ok(questions.iter().map(|q| solver_answer(q, self.options)).collect())
    }

    fn model(&self) -> &str {
        SOLVER_MODEL
    }
}

/// The OpenAI-compatible app: `POST /v1/chat/completions` (and `/chat/completions`), `GET /healthz`.
pub fn router(options: SolverOptions) -> axum::Router {
    axum::Router::new()
        .route("/v1/chat/completions", post(completions))
        .route("/chat/completions", post(completions))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(Arc::new(options))
}

async fn completions(
    State(options): State<Arc<SolverOptions>>,
    Json(body): Json<Value>,
) -> Result<Json<Value>, (StatusCode, Json<Value>)> {
    let bad = |message: &str| {
        (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": {"message": message, "type": "invalid_request_error"}})),
        )
    };
    let messages = body.get("messages").and_then(Value::as_array).ok_or_else(|| bad("no messages"))?;
    let question = messages
        .iter()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        .and_then(|m| m.get("content").and_then(Value::as_str))
        .ok_or_else(|| bad("no user message with text content"))?;
    let answer = solver_answer(question, *options);
    let model = body.get("model").and_then(Value::as_str).unwrap_or(SOLVER_MODEL);
    Ok(Json(json!({
        "id": format!("chatcmpl-{}", &hex::encode(Sha256::digest(question.as_bytes()))[..16]),
        "object": "chat.completion",
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": answer},
            "finish_reason": "stop",
        }],
        "usage": {
            "prompt_tokens": question.split_whitespace().count(),
            "completion_tokens": answer.split_whitespace().count(),
            "total_tokens": question.split_whitespace().count() + answer.split_whitespace().count(),
        },
    })))
}

/// The solver served over HTTP from a background thread; stops when dropped.
#[derive(Debug)]
pub struct SolverServer {
    address: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SolverServer {
    /// Binds `address` (port 0 picks a free one) and serves until dropped.
    pub fn spawn(address: SocketAddr, options: SolverOptions) -> Result<Self, CloudError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| CloudError::Setup(e.to_string()))?;
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(address))
            .map_err(|e| CloudError::Setup(format!("binding {address}: {e}")))?;
        let address = listener.local_addr().map_err(|e| CloudError::Setup(e.to_string()))?;
        let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("solver-cloud".into())
            .spawn(move || {
                let served = runtime.block_on(async move {
                    axum::serve(listener, router(options))
                        .with_graceful_shutdown(async {
                            let _ = stopped.await;
                        })
                        .await
                });
                if let Err(error) = served {
                    tracing::error!(%error, "the solver cloud stopped");
                }
            })
            .map_err(|e| CloudError::Setup(e.to_string()))?;
        Ok(Self { address, shutdown: Some(shutdown), thread: Some(thread) })
    }

    /// The bound address.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// The base URL to give an OpenAI-compatible client.
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }
}

impl Drop for SolverServer {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_core::tasks::countdown::{CountdownGenerator, GeneratorConfig};
    use tandem_core::tasks::grading::grade_countdown;

    #[test]
    fn core_questions_parse_back_to_their_problem() {
        let problems = CountdownGenerator::new(GeneratorConfig::default(), 8).unwrap().distinct(50).unwrap();
        for problem in problems {
            assert_eq!(parse_countdown_question(&problem.question()), Some(problem.clone()));
            assert!(grade_countdown(&problem, &solver_answer(&problem.question(), SolverOptions::default())));
        }
        assert_eq!(parse_countdown_question("no numbers here"), None);
    }

    #[test]
    fn the_error_rate_spoils_a_fixed_share_of_questions() {
        let problems = CountdownGenerator::new(GeneratorConfig::default(), 9).unwrap().distinct(400).unwrap();
        let options = SolverOptions { error_rate: 0.2 };
        let spoiled: Vec<bool> =
            problems.iter().map(|p| solver_answer(&p.question(), options) == NO_SOLUTION).collect();
        let count = spoiled.iter().filter(|s| **s).count();
        assert!((50..=110).contains(&count), "{count} of 400");
        let again: Vec<bool> =
            problems.iter().map(|p| solver_answer(&p.question(), options) == NO_SOLUTION).collect();
        assert_eq!(spoiled, again);
    }
}
