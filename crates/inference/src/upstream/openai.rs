//! The OpenAI-compatible wire format as model servers speak it: the request body for
//! `/chat/completions` (a conversation) or `/completions` (a raw prompt), and what one `data:`
//! payload of their stream means. vLLM, TGI's Messages API, llama.cpp's server, Ollama and the
//! OpenAI API all send `chat.completion.chunk` objects; they differ in what else they add
//! (`reasoning_content` or `reasoning` deltas, `timings`, an empty first delta, usage in a
//! chunk of its own or beside the finish reason), which is read where present and ignored
//! otherwise. Anything that is not JSON is an error, never a panic.

use serde::Deserialize;
use serde_json::{Value, json};

use crate::chat::ChatMessage;
use crate::generator::{FinishReason, GenerationRequest, Usage};

/// The path under the upstream's base URL and the JSON body for `request`.
pub fn request_body(request: &GenerationRequest, model: &str) -> (&'static str, Value) {
    let sampling = request.sampling();
    let mut body = json!({
        "model": model,
        "stream": true,
        "stream_options": {"include_usage": true},
        "max_tokens": request.max_tokens(),
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
    });
    let path = match request.messages() {
        Some(messages) => {
            body["messages"] = json!(messages.iter().map(message_json).collect::<Vec<_>>());
            "/chat/completions"
        }
        None => {
            body["prompt"] = json!(request.prompt());
            "/completions"
        }
    };
    if let Some(seed) = sampling.seed {
        body["seed"] = json!(seed);
    }
    if sampling.top_k > 0 {
        body["top_k"] = json!(sampling.top_k); // vLLM, TGI, llama.cpp read it; OpenAI ignores it
    }
    if (sampling.repetition_penalty - 1.0).abs() > f64::EPSILON {
        body["repetition_penalty"] = json!(sampling.repetition_penalty);
    }
    if !request.stop().is_empty() {
        body["stop"] = json!(request.stop());
    }
    (path, body)
}

fn message_json(m: &ChatMessage) -> Value {
    json!({"role": m.role, "content": m.content})
}

/// What one upstream `data:` payload says.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Chunk {
    /// Answer text (`delta.content`, or `text` of a completion).
    pub content: String,
    /// Reasoning text (`delta.reasoning_content`, or `delta.reasoning`).
    pub reasoning: String,
    pub finish: Option<FinishReason>,
    pub usage: Option<Usage>,
}

/// One payload of the stream.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    Chunk(Chunk),
    /// `[DONE]`: the stream is complete.
    Done,
    /// An error the upstream reported in the stream (`{"error": …}`).
    Error(String),
}

#[derive(Deserialize)]
struct WireChunk {
    #[serde(default)]
    choices: Vec<WireChoice>,
    usage: Option<WireUsage>,
    error: Option<Value>,
}

#[derive(Deserialize)]
struct WireChoice {
    delta: Option<WireDelta>,
    /// `/completions` streams put the text here.
    text: Option<String>,
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct WireDelta {
    content: Option<String>,
    reasoning_content: Option<String>,
    reasoning: Option<String>,
}

#[derive(Deserialize)]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: usize,
    #[serde(default)]
    completion_tokens: usize,
}

/// How a finish reason the upstream names is reported: `length` is `length`; everything else that
/// ends an answer (`stop`, `eos_token`, `tool_calls`, `content_filter`, …) is `stop`.
fn finish_reason(name: &str) -> FinishReason {
    match name {
        "length" | "max_tokens" => FinishReason::Length,
        _ => FinishReason::Stop,
    }
}

/// Read one payload. `Err` is a payload that is not what an OpenAI-compatible stream sends.
pub fn parse(data: &str) -> Result<Payload, String> {
    let data = data.trim();
    if data == "[DONE]" {
        return Ok(Payload::Done);
    }
    let wire: WireChunk = serde_json::from_str(data).map_err(|e| {
        let shown: String = data.chars().take(80).collect();
        format!("a stream event is not a JSON chunk ({e}): {shown}")
    })?;
    if let Some(error) = wire.error {
        let message = error
            .get("message")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .unwrap_or_else(|| error.to_string());
        return Ok(Payload::Error(message));
    }
    let mut chunk = Chunk {
        usage: wire
            .usage
            .map(|u| Usage { prompt_tokens: u.prompt_tokens, completion_tokens: u.completion_tokens }),
        ..Chunk::default()
    };
    if let Some(choice) = wire.choices.into_iter().next() {
        if let Some(delta) = choice.delta {
            chunk.content = delta.content.unwrap_or_default();
            chunk.reasoning = delta.reasoning_content.or(delta.reasoning).unwrap_or_default();
        }
        if let Some(text) = choice.text {
            chunk.content.push_str(&text);
        }
        chunk.finish = choice.finish_reason.as_deref().map(finish_reason);
    }
    Ok(Payload::Chunk(chunk))
}

/// An upstream's error body (`{"error": {"message": …}}`, `{"error": "…"}`, `{"message": …}`,
/// TGI's `{"error": "…", "error_type": …}`), or the text itself, cut short.
pub fn error_message(body: &str) -> String {
    let from_json = serde_json::from_str::<Value>(body).ok().and_then(|v| {
        let e = v.get("error").unwrap_or(&v);
        e.get("message").and_then(Value::as_str).or_else(|| e.as_str()).map(str::to_owned)
    });
    let message = from_json.unwrap_or_else(|| body.trim().to_owned());
    message.chars().take(300).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::SamplingParams;

    #[test]
    fn a_conversation_goes_to_chat_completions_and_a_prompt_to_completions() {
        let sampling = SamplingParams { temperature: 0.0, seed: Some(7), ..SamplingParams::default() };
        let plain = GenerationRequest::new("Once", 8, sampling.clone(), vec!["\n".into()])
            .unwrap_or_else(|e| unreachable!("{e}"));
        let (path, body) = request_body(&plain, "m");
        assert_eq!(path, "/completions");
        assert_eq!(body["prompt"], "Once");
        assert_eq!(body["stream_options"]["include_usage"], true);
        assert_eq!((body["max_tokens"].as_u64(), body["seed"].as_u64()), (Some(8), Some(7)));
        assert_eq!(body["stop"], json!(["\n"]));
        let chat = plain.with_messages(vec![ChatMessage::new("user", "Hi")]);
        let (path, body) = request_body(&chat, "m");
        assert_eq!(path, "/chat/completions");
        assert_eq!(body["messages"], json!([{"role": "user", "content": "Hi"}]));
        assert!(body.get("prompt").is_none());
    }

    #[test]
    fn payloads_parse_or_fail_without_panicking() {
        let content = parse(r#"{"choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}"#);
        assert_eq!(content, Ok(Payload::Chunk(Chunk { content: "Hi".into(), ..Chunk::default() })));
        let reasoning = parse(r#"{"choices":[{"delta":{"reasoning_content":"hmm"}}]}"#);
        assert!(matches!(reasoning, Ok(Payload::Chunk(Chunk { ref reasoning, .. })) if reasoning == "hmm"));
        let usage =
            parse(r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":5,"total_tokens":8}}"#);
        let expected = Usage { prompt_tokens: 3, completion_tokens: 5 };
        assert!(matches!(usage, Ok(Payload::Chunk(Chunk { usage: Some(u), .. })) if u == expected));
        assert_eq!(parse(" [DONE] "), Ok(Payload::Done));
        assert_eq!(parse(r#"{"error":{"message":"boom"}}"#), Ok(Payload::Error("boom".into())));
        for bad in ["", "{", "not json", "[1,2]", "\"text\"", r#"{"choices":"x"}"#] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        assert_eq!(error_message(r#"{"error":{"message":"too long"}}"#), "too long");
        assert_eq!(
            error_message(r#"{"error":"Input validation error","error_type":"validation"}"#),
            "Input validation error"
        );
        assert_eq!(error_message("plain text"), "plain text");
    }
}
