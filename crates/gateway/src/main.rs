//! The `streamgate` binary: parse settings once, load the models, serve.

use std::process::ExitCode;

use clap::Parser;
use streamgate_gateway::logging::json_logger;
use streamgate_gateway::server::{fatal, load_models, serve};
use streamgate_gateway::settings::Settings;
use streamgate_gateway::state::AppState;

fn main() -> ExitCode {
    let settings = Settings::parse();
    let (logger, _flush_on_exit) = json_logger(settings.log_level);
    if let Err(e) = settings.validate() {
        fatal(&logger, &e.to_string());
        return ExitCode::from(2);
    }
    let models = match load_models(&settings, &logger) {
        Ok(models) => models,
        Err(e) => {
            fatal(&logger, &e);
            return ExitCode::FAILURE;
        }
    };
    // The state is built on the actix system: a shared state backend starts its tasks there.
    actix_web::rt::System::new().block_on(async move {
        let state = match AppState::new(settings, models, logger.clone()) {
            Ok(state) => actix_web::web::Data::new(state),
            Err(e) => {
                fatal(&logger, &e);
                return ExitCode::FAILURE;
            }
        };
        match serve(state).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                fatal(&logger, &format!("server: {e}"));
                ExitCode::FAILURE
            }
        }
    })
}
