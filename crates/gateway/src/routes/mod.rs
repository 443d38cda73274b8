//! The operational routes, one module each: the chat page (`/`), the API description
//! (`/api/openapi.json`, `/api/docs`), `/metrics`, the models (`/api/models`,
//! `/api/{version}/models`), health (`/api/{version}/health/{live,ready}`) and resuming a stream
//! (`/api/{version}/streams/{id}`). The generation
//! routes belong to their wire formats, in [`crate::protocols`].

pub mod health;
pub mod metrics;
pub mod models;
pub mod openapi;
pub mod page;
pub mod streams;

use actix_web::web;

pub fn configure(cfg: &mut web::ServiceConfig) {
    page::configure(cfg);
    openapi::configure(cfg);
    metrics::configure(cfg);
    health::configure(cfg);
    models::configure(cfg);
    streams::configure(cfg);
}
