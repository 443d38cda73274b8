//! Chat prompts: the model's own Jinja chat template (`chat_template` in tokenizer_config.json),
//! rendered with minijinja, or ChatML when the model has none.

use minijinja::{Environment, Error, ErrorKind, context};
use serde::Serialize;

use crate::error::{InferenceError, Result};

/// ChatML, used when a model folder has no chat template (documented in docs/models.md).
pub const DEFAULT_CHAT_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + \
     message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: content.into() }
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compile `template` (or the default). Fails when the model's template does not parse.
    pub fn new(template: Option<&str>, bos_token: Option<&str>, eos_token: Option<&str>) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        // Hugging Face templates call raise_exception() to reject unsupported conversations.
        env.add_function("raise_exception", |message: String| -> std::result::Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, message))
        });
        env.add_template_owned("chat", template.unwrap_or(DEFAULT_CHAT_TEMPLATE).to_owned()).map_err(
            |e| InferenceError::InvalidRequest(format!("the model's chat template does not compile: {e}")),
        )?;
        Ok(Self {
            env,
            bos_token: bos_token.unwrap_or_default().to_owned(),
            eos_token: eos_token.unwrap_or_default().to_owned(),
        })
    }

    /// Render a conversation, ending with the assistant's turn opened.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String> {
        if messages.is_empty() {
            return Err(InferenceError::InvalidRequest("messages must not be empty".into()));
        }
        let template =
            self.env.get_template("chat").map_err(|e| InferenceError::InvalidRequest(e.to_string()))?;
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => true,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(|e| InferenceError::InvalidRequest(format!("chat template: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_template_is_chatml() {
        let t = ChatTemplate::new(None, None, None).unwrap_or_else(|e| unreachable!("{e}"));
        let out = t.render(&[ChatMessage::new("user", "hi")]).unwrap_or_default();
        assert_eq!(out, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
    }

    #[test]
    fn smollm2_style_template_adds_its_default_system_prompt() {
        let tpl = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are helpful<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";
        let t = ChatTemplate::new(Some(tpl), None, None).unwrap_or_else(|e| unreachable!("{e}"));
        let out = t.render(&[ChatMessage::new("user", "What is 2+2?")]).unwrap_or_default();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are helpful<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn raise_exception_becomes_a_request_error() {
        let t = ChatTemplate::new(Some("{{ raise_exception('roles must alternate') }}"), None, None)
            .unwrap_or_else(|e| unreachable!("{e}"));
        let err = t.render(&[ChatMessage::new("user", "x")]).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("roles must alternate"), "{err}");
    }

    #[test]
    fn a_broken_template_is_an_error() {
        assert!(ChatTemplate::new(Some("{% for %}"), None, None).is_err());
    }
}
