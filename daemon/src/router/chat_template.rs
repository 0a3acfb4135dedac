//! Rendering chat messages into the model's prompt with its Hugging Face Jinja chat template.

use minijinja::{Environment, ErrorKind, context};
use tandem_core::protocol::ChatMessage;

/// Used when a model has no chat template: ChatML, the Qwen family's format.
const FALLBACK_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + \
    message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}\
    {{ '<|im_start|>assistant\\n' }}{% endif %}";

/// A chat template that failed to compile or render.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("the model's chat template does not compile: {0}")]
    Compile(String),
    #[error("rendering the chat template failed: {0}")]
    Render(String),
}

/// A compiled chat template.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
}

impl ChatTemplate {
    /// Compiles `source`, or ChatML when the model has no template.
    pub fn new(source: Option<&str>) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |message: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
        });
        env.add_template_owned("chat", source.unwrap_or(FALLBACK_TEMPLATE).to_string())
            .map_err(|e| TemplateError::Compile(format!("{e:#}")))?;
        Ok(Self { env })
    }

    /// The prompt for `messages`, ending where the assistant's answer begins.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String, TemplateError> {
        let template = self.env.get_template("chat").map_err(|e| TemplateError::Render(e.to_string()))?;
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => true,
                bos_token => "",
                eos_token => "",
            })
            .map_err(|e| TemplateError::Render(format!("{e:#}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(text: &str) -> ChatMessage {
        ChatMessage { role: "user".into(), content: text.into() }
    }

    #[test]
    fn models_without_a_template_get_chatml() {
        let t = ChatTemplate::new(None).unwrap();
        assert_eq!(
            t.render(&[user("hi")]).unwrap(),
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn hugging_face_templates_with_python_methods_render() {
        // The shape of real templates: python string methods, raise_exception, loop variables.
        let source = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}\
            {% for m in messages %}[{{ m['role'] | upper }}] {{ m['content'].strip() }}{% if not loop.last %}\n{% endif %}{% endfor %}\
            {% if add_generation_prompt %}\n[ASSISTANT]{% endif %}";
        let t = ChatTemplate::new(Some(source)).unwrap();
        assert_eq!(t.render(&[user("  2+2?  ")]).unwrap(), "[USER] 2+2?\n[ASSISTANT]");
        let err = t.render(&[ChatMessage { role: "assistant".into(), content: "x".into() }]).unwrap_err();
        assert!(err.to_string().contains("first must be user"), "{err}");
    }

    #[test]
    fn a_broken_template_is_reported_at_load() {
        assert!(ChatTemplate::new(Some("{% for %}")).is_err());
    }
}
