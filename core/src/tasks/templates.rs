//! Prompt templates: the paper's Template I (Countdown) and Template II (MATH) in our own wording,
//! each with and without the option to ask for help, rendered as chat messages.
//!
//! Structure kept from the paper: Template I asks for reasoning in `<think>` tags and the final answer
//! in `<answer>` tags at the end, and allows ending with the help marker when no solution was found;
//! Template II asks for numbered steps and a `\boxed{}` answer, and for the help marker once a number
//! of steps has passed without a solution. The variants without help (for the task-tuning baselines)
//! drop exactly that sentence. The marker text comes from [`crate::help_marker::HELP_MARKER`].
//!
//! Rendering stops at chat messages; applying the tokenizer's chat template is the daemon's job.
//! The cloud is asked the bare question, with no system prompt ([`cloud_messages`]).

use std::num::NonZeroU32;

use serde::{Deserialize, Serialize};

use crate::help_marker::HELP_MARKER;
use crate::protocol::ChatMessage;

/// Opens the reasoning in Template I.
pub const THINK_OPEN: &str = "<think>";
/// Closes the reasoning in Template I.
pub const THINK_CLOSE: &str = "</think>";
/// Opens the final answer in Template I.
pub const ANSWER_OPEN: &str = "<answer>";
/// Closes the final answer in Template I.
pub const ANSWER_CLOSE: &str = "</answer>";

/// Steps before Template II asks for help, as in the paper.
pub const DEFAULT_MAX_STEPS: NonZeroU32 = NonZeroU32::new(6).unwrap();

/// What every template's user turn adds after the question.
const USER_TURN_SUFFIX: &str = "\nWork through it step by step.";

/// The question inside a user turn made by [`PromptTemplate::user_prompt`] (devices record the user
/// turn they were sent, so prompts collected from a fleet carry the template's words); any other
/// text is returned as it is, trimmed.
pub fn question_of_user_turn(user_turn: &str) -> &str {
    let trimmed = user_turn.trim();
    trimmed.strip_suffix(USER_TURN_SUFFIX.trim_start()).map_or(trimmed, str::trim_end)
}

/// A prompt template.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "template", rename_all = "snake_case", deny_unknown_fields)]
pub enum PromptTemplate {
    /// Template I (Countdown): reasoning in `<think>`, answer in `<answer>`.
    ThinkAnswer {
        /// Whether the model may end with the help marker.
        offers_help: bool,
    },
    /// Template II (MATH): numbered steps, answer in `\boxed{}`.
    NumberedSteps {
        /// Whether the model may end with the help marker.
        offers_help: bool,
        /// Steps after which an unsolved problem is handed to the cloud.
        max_steps: NonZeroU32,
    },
}

impl PromptTemplate {
    /// Template I with the help option (the collaborative policy).
    pub const COUNTDOWN: Self = Self::ThinkAnswer { offers_help: true };
    /// Template II with the help option after [`DEFAULT_MAX_STEPS`] steps.
    pub const MATH: Self = Self::NumberedSteps { offers_help: true, max_steps: DEFAULT_MAX_STEPS };

    /// Whether the template offers the help marker.
    pub fn offers_help(&self) -> bool {
        match *self {
            Self::ThinkAnswer { offers_help } | Self::NumberedSteps { offers_help, .. } => offers_help,
        }
    }

    /// The same template without the help option, for the baselines that never ask.
    pub fn without_help(self) -> Self {
        match self {
            Self::ThinkAnswer { .. } => Self::ThinkAnswer { offers_help: false },
            Self::NumberedSteps { max_steps, .. } => Self::NumberedSteps { offers_help: false, max_steps },
        }
    }

    /// The system prompt.
    pub fn system_prompt(&self) -> String {
        match *self {
            Self::ThinkAnswer { offers_help } => {
                let mut prompt = format!(
                    "You are a careful assistant who reasons before answering. First work through the \
                     problem inside {THINK_OPEN} {THINK_CLOSE} tags. Then, at the very end of your reply, \
                     give only the final expression inside {ANSWER_OPEN} {ANSWER_CLOSE} tags, for example \
                     {ANSWER_OPEN} (8 - 2) * 4 {ANSWER_CLOSE}."
                );
                if offers_help {
                    prompt.push_str(&format!(
                        " If you have reasoned carefully and still have no solution, you may instead end \
                         your reply by asking for help with exactly: {HELP_MARKER}"
                    ));
                }
                prompt
            }
            Self::NumberedSteps { offers_help, max_steps } => {
                let mut prompt = String::from(
                    "You will be given a math problem. Solve it one step at a time, numbering the steps \
                     (Step 1: ..., Step 2: ..., and so on). Write the final answer inside \\boxed{}.",
                );
                if offers_help {
                    prompt.push_str(&format!(
                        " If you have not solved the problem within {max_steps} steps, stop there and reply \
                         with exactly: {HELP_MARKER}"
                    ));
                }
                prompt
            }
        }
    }

    /// The user turn for `question`.
    pub fn user_prompt(&self, question: &str) -> String {
        format!("{}{USER_TURN_SUFFIX}", question.trim_end())
    }

    /// The system and user messages for `question`.
    pub fn messages(&self, question: &str) -> Vec<ChatMessage> {
        vec![message("system", self.system_prompt()), message("user", self.user_prompt(question))]
    }
}

/// What the cloud is asked: the original question alone, with no system prompt (as in the paper).
pub fn cloud_messages(question: &str) -> Vec<ChatMessage> {
    vec![message("user", question.to_string())]
}

fn message(role: &str, content: String) -> ChatMessage {
    ChatMessage { role: role.to_string(), content }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::help_marker::{HELP_CLOSE_TAG, HELP_OPEN_TAG, HelpMarker};

    const ALL: [PromptTemplate; 2] = [PromptTemplate::COUNTDOWN, PromptTemplate::MATH];

    #[test]
    fn the_question_comes_back_out_of_every_templates_user_turn() {
        let question = "Using the numbers [3, 5], write an expression whose value is 8.";
        for template in ALL {
            assert_eq!(question_of_user_turn(&template.user_prompt(question)), question);
        }
        assert_eq!(question_of_user_turn("  What is 2 + 2?\n"), "What is 2 + 2?");
    }

    #[test]
    fn templates_with_help_contain_the_exact_marker() {
        for template in ALL {
            let system = template.system_prompt();
            assert!(template.offers_help());
            assert!(system.ends_with(HELP_MARKER), "{system}");
            assert_eq!(system.matches(HELP_MARKER).count(), 1, "{system}");
            assert!(HelpMarker::find_in(&system).is_some());
        }
    }

    #[test]
    fn templates_without_help_never_mention_it() {
        for template in ALL.map(PromptTemplate::without_help) {
            assert!(!template.offers_help());
            let system = template.system_prompt();
            for text in [system.as_str(), &template.user_prompt("What is 1 + 1?")] {
                assert!(!text.contains(HELP_OPEN_TAG) && !text.contains(HELP_CLOSE_TAG), "{text}");
                assert!(!text.to_lowercase().contains("assistance"), "{text}");
                assert!(!text.to_lowercase().contains("help"), "{text}");
            }
        }
    }

    #[test]
    fn the_no_help_variant_differs_only_by_the_help_sentence() {
        for template in ALL {
            let with = template.system_prompt();
            let without = template.without_help().system_prompt();
            assert!(with.starts_with(&without), "{with}\n{without}");
        }
    }

    #[test]
    fn template_one_asks_for_think_and_answer_tags() {
        let system = PromptTemplate::COUNTDOWN.system_prompt();
        for tag in [THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE] {
            assert!(system.contains(tag), "{tag} missing from {system}");
        }
    }

    #[test]
    fn template_two_asks_for_numbered_steps_a_boxed_answer_and_help_after_n_steps() {
        let system = PromptTemplate::MATH.system_prompt();
        assert!(system.contains("Step 1:") && system.contains("\\boxed{}"), "{system}");
        assert!(system.contains("within 6 steps"), "{system}");
        let three =
            PromptTemplate::NumberedSteps { offers_help: true, max_steps: NonZeroU32::new(3).unwrap() };
        assert!(three.system_prompt().contains("within 3 steps"));
    }

    #[test]
    fn messages_are_a_system_turn_then_the_question() {
        let messages = PromptTemplate::COUNTDOWN.messages("Make 24 from [3, 3, 8, 8].");
        let roles: Vec<_> = messages.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user"]);
        assert!(messages[1].content.starts_with("Make 24 from [3, 3, 8, 8].\n"));
        let cloud = cloud_messages("Make 24 from [3, 3, 8, 8].");
        assert_eq!(
            cloud,
            [ChatMessage { role: "user".into(), content: "Make 24 from [3, 3, 8, 8].".into() }]
        );
    }

    #[test]
    fn templates_are_configured_by_name() {
        let parsed: PromptTemplate =
            serde_json::from_str(r#"{"template":"numbered_steps","offers_help":false,"max_steps":4}"#)
                .unwrap();
        assert_eq!(
            parsed,
            PromptTemplate::NumberedSteps { offers_help: false, max_steps: NonZeroU32::new(4).unwrap() }
        );
        assert!(
            serde_json::from_str::<PromptTemplate>(
                r#"{"template":"numbered_steps","offers_help":true,"max_steps":0}"#
            )
            .is_err()
        );
        assert!(
            serde_json::from_str::<PromptTemplate>(
                r#"{"template":"think_answer","offers_help":true,"typo":1}"#
            )
            .is_err()
        );
        let round = serde_json::to_string(&PromptTemplate::COUNTDOWN).unwrap();
        assert_eq!(serde_json::from_str::<PromptTemplate>(&round).unwrap(), PromptTemplate::COUNTDOWN);
    }
}
