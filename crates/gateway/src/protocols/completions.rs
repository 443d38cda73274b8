//! OpenAI's text completions: `POST /v1/completions`, streamed (`text_completion` chunks) or one
//! `text_completion`. The prompt is raw text in the model's own format (no chat template), which
//! is what vLLM, TGI and llama.cpp serve there, and what another streamgate's remote upstream
//! (`openai+URL`) sends for a request that is not a conversation.

use std::time::Instant;

use actix_web::{HttpRequest, HttpResponse, web};
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::json;
use streamgate_inference::{FinishReason, Usage};
use utoipa::ToSchema;
use utoipa::openapi::RefOr;
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};

use crate::error::{ApiError, ErrorStyle};
use crate::generation::{GenerationInput, PromptInput, ValidGeneration};
use crate::http::paths::resource;
use crate::protocols::openai::{OpenAiError, StreamOptions, finish_reason, sampling, unix_now, usage_json};
use crate::protocols::wire::{self, BodyGenerationErrors, Stop};
use crate::sse::EventFormat;
use crate::state::AppState;

/// The request body of `POST /v1/completions`. As on `/v1/chat/completions`, fields streamgate
/// does not use are accepted and ignored; `n` must be 1, `echo` false, and `suffix` and
/// `logprobs` absent (they would change the answer, so they are refused rather than ignored).
#[derive(Debug, Deserialize, ToSchema)]
#[schema(example = json!({"model": "v1", "prompt": "1, 2, 3, 4,", "max_tokens": 8, "stream": true}))]
pub struct CompletionRequest {
    /// A configured model version, e.g. `v1` (see `GET /v1/models`).
    pub model: String,
    /// Text already in the model's prompt format (no chat template is applied). One string: a list
    /// of prompts (or of token ids) is refused.
    #[schema(min_length = 1)]
    pub prompt: String,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    /// 1..=`--max-tokens-limit` (default `--default-max-tokens`).
    #[serde(default, deserialize_with = "wire::opt_u32")]
    #[schema(minimum = 1)]
    pub max_tokens: Option<u32>,
    /// 0 to 2. Default 1.
    #[schema(minimum = 0.0, maximum = 2.0)]
    pub temperature: Option<f64>,
    /// (0, 1]. Default 1.
    #[schema(exclusive_minimum = 0.0, maximum = 1.0)]
    pub top_p: Option<f64>,
    #[serde(default, deserialize_with = "wire::opt_u64")]
    #[schema(minimum = 0)]
    pub seed: Option<u64>,
    #[schema(schema_with = wire::stop_schema)]
    pub stop: Option<Stop>,
    /// Only 1 is supported.
    #[serde(default, deserialize_with = "wire::opt_u32")]
    #[schema(minimum = 1, maximum = 1)]
    pub n: Option<u32>,
    /// Only `false` is supported.
    #[serde(default)]
    #[schema(schema_with = false_only)]
    pub echo: bool,
    /// Not supported: absent or null.
    #[schema(schema_with = null_only)]
    pub suffix: Option<serde_json::Value>,
    /// Not supported: absent or null.
    #[schema(schema_with = null_only)]
    pub logprobs: Option<serde_json::Value>,
}

/// `text_completion`: the non-streamed answer, and (with one choice, or none and the usage) each
/// streamed event.
#[derive(Serialize, ToSchema)]
pub struct TextCompletion {
    pub id: String,
    #[schema(pattern = "^text_completion$")]
    pub object: String,
    pub created: u64,
    pub model: String,
    /// `{"index": 0, "text": …, "finish_reason", "logprobs": null}`.
    #[schema(value_type = Vec<Object>, max_items = 1)]
    pub choices: Vec<serde_json::Value>,
    #[schema(value_type = Option<Object>)]
    pub usage: Option<serde_json::Value>,
}

fn null_only() -> impl Into<RefOr<Schema>> {
    ObjectBuilder::new().schema_type(Type::Null)
}

fn false_only() -> impl Into<RefOr<Schema>> {
    ObjectBuilder::new().schema_type(Type::Boolean).enum_values(Some([false]))
}

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/v1/completions").route(web::post().to(completions)));
}

fn refuse(message: &str) -> OpenAiError {
    ApiError::InvalidRequest(message.into()).into()
}

/// Text completions, streamed (`stream: true`) or not.
#[utoipa::path(post, path = "/v1/completions", tag = "openai", request_body = CompletionRequest,
    responses(
        (status = 200, description = "`text_completion`, or with `stream: true` an event stream of `text_completion` objects ending with `data: [DONE]`",
            content((TextCompletion = "application/json"), (TextCompletion = "text/event-stream"))),
        BodyGenerationErrors))]
pub async fn completions(
    state: web::Data<AppState>,
    body: web::Json<CompletionRequest>,
    req: HttpRequest,
) -> Result<HttpResponse, OpenAiError> {
    let started = Instant::now();
    let body = body.into_inner();
    if body.n.is_some_and(|n| n != 1) {
        return Err(refuse("only n = 1 is supported"));
    }
    if body.echo {
        return Err(refuse("echo is not supported"));
    }
    if body.suffix.as_ref().is_some_and(|s| !s.is_null())
        || body.logprobs.as_ref().is_some_and(|l| !l.is_null())
    {
        return Err(refuse("suffix and logprobs are not supported"));
    }
    let input = GenerationInput {
        prompt: PromptInput::Text(body.prompt),
        max_tokens: body.max_tokens,
        sampling: sampling(body.temperature, body.top_p, body.seed),
        stop: Stop::into_vec(body.stop),
    };
    let generation = ValidGeneration::new(&state, &body.model, input, &req)?;
    let id = format!("cmpl-{:024x}", rand::rng().random::<u128>() >> 32);
    let created = unix_now();
    if !body.stream {
        let done = generation.collect(&state).await?;
        return Ok(HttpResponse::Ok().json(json!({
            "id": id, "object": "text_completion", "created": created, "model": body.model,
            "choices": [{"index": 0, "text": done.text, "finish_reason": done.finish_reason, "logprobs": null}],
            "usage": usage_json(done.usage),
        })));
    }
    let format = CompletionFormat {
        id,
        created,
        model: body.model,
        include_usage: body.stream_options.is_some_and(|o| o.include_usage),
    };
    Ok(generation.stream(&state, format, &req, started).await?)
}

/// `text_completion` events: text deltas, the finish reason, usage if asked.
pub struct CompletionFormat {
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
}

#[derive(Serialize)]
struct Event<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: serde_json::Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<serde_json::Value>,
}

impl CompletionFormat {
    fn event(&self, choices: serde_json::Value, usage: Option<serde_json::Value>) -> Option<String> {
        serde_json::to_string(&Event {
            id: &self.id,
            object: "text_completion",
            created: self.created,
            model: &self.model,
            choices,
            usage,
        })
        .ok()
    }
}

impl EventFormat for CompletionFormat {
    fn token(&mut self, _index: usize, text: &str) -> Option<String> {
        if text.is_empty() {
            return None;
        }
        self.event(json!([{"index": 0, "text": text, "finish_reason": null, "logprobs": null}]), None)
    }

    /// Text completions have no place for reasoning: it is not sent.
    fn reasoning(&mut self, _text: &str) -> Vec<String> {
        Vec::new()
    }

    fn finish(&mut self, reason: FinishReason, usage: Usage) -> Vec<String> {
        let choice =
            json!([{"index": 0, "text": "", "finish_reason": finish_reason(reason), "logprobs": null}]);
        let mut out: Vec<String> = self.event(choice, None).into_iter().collect();
        if self.include_usage {
            out.extend(self.event(json!([]), Some(usage_json(usage))));
        }
        out
    }

    fn error(&mut self, error: &ApiError) -> Vec<String> {
        vec![error.to_json(ErrorStyle::OpenAi)]
    }

    /// No `id:` lines, for the same reason as chat completions (OpenAI's Python SDK).
    fn event_ids(&self) -> bool {
        false
    }
}
