//! The one `create_app`, used by `main` and by every test: the HTTP layer's middleware (request
//! log outermost, then CORS, then client identity and rate limits), extractor limits that turn
//! malformed input into JSON errors, the protocols' and the operational routes, and a JSON 404.

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceFactory, ServiceRequest, ServiceResponse};
use actix_web::middleware::from_fn;
use actix_web::{App, web};

use crate::error::ApiError;
use crate::http::cors::cors_middleware;
use crate::http::paths::{error_for, not_found};
use crate::http::rate_limit::client_middleware;
use crate::http::request_log::request_log_middleware;
use crate::state::AppState;
use crate::{protocols, routes};

pub fn create_app(
    state: web::Data<AppState>,
) -> App<
    impl ServiceFactory<
        ServiceRequest,
        Config = (),
        Response = ServiceResponse<impl MessageBody>,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    let json = web::JsonConfig::default()
        .limit(state.settings.max_body_bytes)
        .content_type_required(true)
        .content_type(|mime| mime.subtype() == "json" || mime.suffix().is_some_and(|s| s == "json"))
        .error_handler(|err, req| error_for(req.path(), ApiError::from(err)));
    let query =
        web::QueryConfig::default().error_handler(|err, req| error_for(req.path(), ApiError::from(err)));
    let payload = web::PayloadConfig::default().limit(state.settings.max_body_bytes);
    App::new()
        .app_data(state.origin_policy.clone())
        .app_data(state.client_gate.clone())
        .app_data(state.access_log.clone())
        .app_data(state)
        .app_data(json)
        .app_data(query)
        .app_data(payload)
        .wrap(from_fn(client_middleware))
        .wrap(from_fn(cors_middleware))
        .wrap(from_fn(request_log_middleware))
        .configure(protocols::configure)
        .configure(routes::configure)
        .default_service(web::to(not_found))
}
