//! `GET /`: a small chat page, embedded in the binary, that streams a reply with `EventSource`.

use actix_web::{HttpResponse, web};

use crate::routes::method_not_allowed;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/").route(web::get().to(index)).default_service(web::to(method_not_allowed)));
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
