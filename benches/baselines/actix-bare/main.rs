//! The floor for an SSE gateway in Rust: a bare actix-web handler streaming the same mock tokens
//! (`streamgate_inference::MockEngine`, so the token timing is identical) with the same wire format,
//! and nothing else — no validation beyond JSON parsing, no rate limiting, CORS, logs or metrics.
//! `benches/run.sh` runs it beside streamgate and the FastAPI baseline, so the cost of streamgate's
//! own layers can be read as a ratio to this.

use std::time::Duration;

use actix_web::{App, HttpResponse, HttpServer, web};
use clap::Parser;
use futures_util::StreamExt;
use streamgate_inference::{
    FinishReason, GenerationEvent, GenerationRequest, Generator, MockConfig, MockEngine, SamplingParams,
    Usage,
};

#[derive(Parser)]
#[command(about = "Bare actix-web SSE server with the mock token source (a benchmark baseline)")]
struct Args {
    #[arg(long, default_value_t = 8002)]
    port: u16,
    #[arg(long, default_value_t = 64)]
    mock_tokens: usize,
    #[arg(long, default_value_t = 0)]
    mock_interval_ms: u64,
    /// HTTP worker threads (0 = the cores this process may run on).
    #[arg(long, default_value_t = 0)]
    workers: usize,
    #[arg(long, default_value_t = 16_384)]
    listen_backlog: u32,
}

#[derive(serde::Deserialize)]
struct InferenceRequest {
    prompt: String,
    #[serde(default = "default_max_tokens")]
    max_tokens: usize,
}

#[derive(serde::Serialize)]
struct Token<'a> {
    index: usize,
    text: &'a str,
}

#[derive(serde::Serialize)]
struct Finish {
    finish_reason: FinishReason,
    usage: Usage,
}

fn default_max_tokens() -> usize {
    256
}

async fn stream(engine: web::Data<MockEngine>, body: web::Json<InferenceRequest>) -> HttpResponse {
    let body = body.into_inner();
    let request =
        GenerationRequest::new(body.prompt, body.max_tokens.max(1), SamplingParams::default(), vec![]);
    let tokens = match request {
        Ok(request) => engine.generate(request).await,
        Err(e) => Err(e),
    };
    let tokens = match tokens {
        Ok(tokens) => tokens,
        Err(e) => return HttpResponse::BadRequest().body(e.to_string()),
    };
    let events = tokens
        .map(|event| {
            // Each event serialized straight into its own buffer: `data: <json>\n\n`.
            let mut line = Vec::with_capacity(64);
            line.extend_from_slice(b"data: ");
            let written = match event {
                Ok(GenerationEvent::Token { index, text, .. }) => {
                    serde_json::to_writer(&mut line, &Token { index, text: &text })
                }
                Ok(GenerationEvent::Finished { reason, usage }) => {
                    serde_json::to_writer(&mut line, &Finish { finish_reason: reason, usage })
                }
                Ok(GenerationEvent::Reasoning { text }) => {
                    serde_json::to_writer(&mut line, &serde_json::json!({"reasoning": text}))
                }
                Err(e) => serde_json::to_writer(&mut line, &serde_json::json!({"error": e.to_string()})),
            };
            line.extend_from_slice(b"\n\n");
            written.map(|()| web::Bytes::from(line)).map_err(actix_web::error::ErrorInternalServerError)
        })
        .chain(futures_util::stream::once(async { Ok(web::Bytes::from_static(b"data: [DONE]\n\n")) }));
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("Cache-Control", "no-cache"))
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(events)
}

#[actix_web::main]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let config =
        MockConfig { tokens: args.mock_tokens, interval: Duration::from_millis(args.mock_interval_ms) };
    let engine = web::Data::new(MockEngine::new(config).map_err(std::io::Error::other)?);
    let mut server = HttpServer::new(move || {
        App::new().app_data(engine.clone()).route("/api/v1/inference/stream", web::post().to(stream))
    })
    .backlog(args.listen_backlog);
    if args.workers > 0 {
        server = server.workers(args.workers);
    }
    server.bind(("127.0.0.1", args.port))?.run().await
}
