//! `GET /api/openapi.json`: the OpenAPI 3.1 document, generated from the same wire types that
//! parse and validate requests (utoipa), then completed from this server's settings: the model
//! versions it serves, the prompt and `max_tokens` limits, and the statuses the HTTP layer can
//! answer on any route (401 with API keys, 403 for a foreign origin, 429). `GET /api/docs`: a
//! self-contained page that renders it (no CDN, works offline).

use actix_web::{HttpResponse, web};
use serde_json::{Value, json};
use utoipa::OpenApi;

use crate::error::{ErrorBody, ErrorCode, ErrorDetail};
use crate::http::paths::resource;
use crate::protocols::{ai_sdk, completions, native, openai, wire};
use crate::routes::{health, models, streams};
use crate::settings::Settings;
use crate::state::AppState;

#[derive(OpenApi)]
#[openapi(
    info(title = "streamgate", description = "Stream model output as server-sent events. Each configured model \
        version is served under /api/{version}/ (e.g. v1 and v2 side by side)."),
    paths(
        native::stream_post, native::stream_get, native::complete,
        models::list, models::describe, health::live, health::ready,
        ai_sdk::chat, ai_sdk::resume_chat, openai::chat_completions, completions::completions, openai::list_models, streams::resume_stream,
    ),
    components(schemas(
        ErrorBody, ErrorDetail, ErrorCode, native::InferenceRequest, native::InferenceResponse,
        native::TokenEventSchema, native::FinishEventSchema, native::UsageSchema, native::NativeEvent, wire::Stop, models::ModelDescription, health::HealthStatus, health::UpstreamHealth,
        ai_sdk::UiChatRequest, ai_sdk::UiMessage, ai_sdk::UiPart, ai_sdk::UiStreamPart,
        openai::ChatCompletion, openai::ChatCompletionChunk, openai::ChatStreamEvent,
        openai::ChatCompletionRequest, completions::CompletionRequest, completions::TextCompletion, openai::ChatMessageIn, openai::MessageContent, openai::ContentPart, openai::StreamOptions,
    )),
    tags((name = "inference", description = "Generate text"), (name = "models"), (name = "health"),
        (name = "ai-sdk", description = "The AI SDK UI message stream protocol (useChat)"),
        (name = "openai", description = "OpenAI-compatible chat and text completions"))
)]
pub struct ApiDoc;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/api/openapi.json").route(web::get().to(openapi_json)))
        .service(resource("/api/docs").route(web::get().to(docs_page)));
}

async fn openapi_json(state: web::Data<AppState>) -> HttpResponse {
    let versions: Vec<&str> = state.models.versions().collect();
    HttpResponse::Ok().json(document(&state.settings, &versions))
}

async fn docs_page() -> HttpResponse {
    HttpResponse::Ok().content_type("text/html; charset=utf-8").body(include_str!("../../static/docs.html"))
}

/// The document this server serves: the generated one with the settings' bounds filled in.
pub fn document(settings: &Settings, versions: &[&str]) -> Value {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_else(|_| json!({}));
    let bounds = [
        ("prompt", "maxLength", json!(settings.max_prompt_bytes)),
        ("max_tokens", "maximum", json!(settings.max_tokens_limit)),
        ("max_completion_tokens", "maximum", json!(settings.max_tokens_limit)),
        ("seed", "maximum", json!(u64::MAX)),
        ("after", "maximum", json!(u64::MAX)),
    ];
    if let Some(schemas) = doc.pointer_mut("/components/schemas").and_then(Value::as_object_mut) {
        for schema in schemas.values_mut() {
            for (field, key, value) in &bounds {
                if let Some(property) = schema.pointer_mut(&format!("/properties/{field}")) {
                    set_bound(property, key, value.clone());
                }
            }
        }
        for request in ["ChatCompletionRequest", "CompletionRequest"] {
            if let Some(model) = schemas.get_mut(request).and_then(|s| s.pointer_mut("/properties/model")) {
                model["enum"] = json!(versions);
            }
        }
    }
    let keys_on = settings.api_keys_file.is_some() || settings.api_keys.iter().any(|k| !k.trim().is_empty());
    let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) else { return doc };
    for operations in paths.values_mut().filter_map(Value::as_object_mut) {
        for operation in operations.values_mut() {
            for parameter in
                operation.get_mut("parameters").and_then(Value::as_array_mut).into_iter().flatten()
            {
                let name = parameter["name"].as_str().unwrap_or_default().to_owned();
                if parameter["in"] == "path" && name == "version" {
                    parameter["schema"]["enum"] = json!(versions);
                }
                if let Some((_, key, value)) = bounds.iter().find(|(field, ..)| *field == name) {
                    set_bound(&mut parameter["schema"], key, value.clone());
                }
                if parameter["in"] == "query" && name == "prompt" {
                    let chars = wire::MAX_QUERY_PROMPT_CHARS.min(settings.max_prompt_bytes);
                    parameter["schema"]["maxLength"] = json!(chars);
                }
            }
            let Some(responses) = operation.get_mut("responses").and_then(Value::as_object_mut) else {
                continue;
            };
            for content in responses.values_mut().filter_map(|r| r.get_mut("content")) {
                if let Some(events) = content.get_mut("text/event-stream") {
                    let each = events["schema"].take();
                    events["schema"] = sse_event(each);
                }
            }
            let mut layer = vec![
                ("403", "The request's Origin is not allowed (CORS)"),
                ("429", "Rate limited (RateLimit-* and Retry-After headers)"),
            ];
            if keys_on {
                layer.push(("401", "A valid API key is required (Authorization: Bearer …)"));
            }
            for (status, description) in layer {
                responses.entry(status).or_insert_with(|| {
                    json!({"description": description,
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}})
                });
            }
        }
    }
    drop_integer_formats(&mut doc);
    doc
}

/// The schema of one server-sent event whose `data` is JSON matching `each`, or `[DONE]`
/// (OpenAPI 3.1 reads a `text/event-stream` schema as one event).
fn sse_event(each: Value) -> Value {
    json!({
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {"anyOf": [
                {"const": "[DONE]"},
                {"type": "string", "contentMediaType": "application/json", "contentSchema": each},
            ]},
        },
    })
}

/// `format: int32/int64` on integers says signed bounds the fields do not have; the real bounds
/// are `minimum`/`maximum`.
fn drop_integer_formats(schema: &mut Value) {
    match schema {
        Value::Object(map) => {
            let integer = match map.get("type") {
                Some(Value::String(t)) => t == "integer",
                Some(Value::Array(types)) => types.iter().any(|t| t == "integer"),
                _ => false,
            };
            if integer {
                map.remove("format");
            }
            map.values_mut().for_each(drop_integer_formats);
        }
        Value::Array(items) => items.iter_mut().for_each(drop_integer_formats),
        _ => {}
    }
}

/// Set `key` on a schema, or on the non-null branch of a nullable one (`type: [T, "null"]`
/// needs no branch; `oneOf` does).
fn set_bound(schema: &mut Value, key: &str, value: Value) {
    match schema.get_mut("oneOf").and_then(Value::as_array_mut) {
        Some(branches) => {
            for branch in branches.iter_mut().filter(|b| b["type"] != "null") {
                branch[key] = value.clone();
            }
        }
        None => schema[key] = value,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn the_document_carries_the_settings_bounds_and_versions() {
        let settings =
            Settings::parse_from(["streamgate", "--max-prompt-bytes", "1000", "--max-tokens-limit", "77"]);
        let doc = document(&settings, &["v1", "v2"]);
        let request = &doc["components"]["schemas"]["InferenceRequest"]["properties"];
        assert_eq!(request["prompt"]["maxLength"], 1000);
        assert_eq!(request["prompt"]["minLength"], 1);
        assert_eq!(request["max_tokens"]["maximum"], 77);
        assert_eq!(request["max_tokens"]["minimum"], 1);
        let chat = &doc["components"]["schemas"]["ChatCompletionRequest"]["properties"];
        assert_eq!(chat["model"]["enum"], json!(["v1", "v2"]));
        assert_eq!(chat["max_completion_tokens"]["maximum"], 77);
        let stream = &doc["paths"]["/api/{version}/inference/stream"];
        let version =
            stream["post"]["parameters"].as_array().and_then(|p| p.iter().find(|p| p["name"] == "version"));
        assert_eq!(version.map(|v| v["schema"]["enum"].clone()), Some(json!(["v1", "v2"])));
        let query = stream["get"]["parameters"].as_array().cloned().unwrap_or_default();
        let stop = query.iter().find(|p| p["name"] == "stop").map(|p| p["schema"]["maxLength"].clone());
        assert_eq!(stop, Some(json!(crate::generation::MAX_STOP_CHARS)), "the literal in InferenceQuery");
        for status in ["400", "403", "404", "413", "415", "422", "429", "503"] {
            assert!(stream["post"]["responses"].get(status).is_some(), "POST stream documents {status}");
        }
        assert!(stream["post"]["responses"].get("401").is_none(), "no API keys, no 401");
        let codes = &doc["components"]["schemas"]["ErrorCode"]["enum"];
        for code in ErrorCode::ALL {
            assert!(
                codes.as_array().is_some_and(|c| c.contains(&json!(code.as_str()))),
                "{code:?} documented"
            );
        }
    }
}
