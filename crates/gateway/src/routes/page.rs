//! `GET /`: a small chat page, embedded in the binary, that streams a reply with `EventSource`.

use actix_web::{HttpResponse, web};

use crate::http::paths::resource;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/").route(web::get().to(index)));
}

async fn index() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .insert_header((
            "Content-Security-Policy",
            "default-src 'self'; style-src 'self' 'unsafe-inline'; script-src 'self' 'unsafe-inline'",
        ))
        .body(include_str!("../../static/index.html"))
}
