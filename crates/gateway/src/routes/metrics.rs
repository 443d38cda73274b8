//! `GET /metrics`: Prometheus text exposition.

use actix_web::{HttpResponse, web};

use crate::app::AppState;
use crate::routes::resource;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/metrics").route(web::get().to(metrics)));
}

async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(state.metrics.render(&state.models))
}
