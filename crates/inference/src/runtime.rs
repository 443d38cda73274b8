//! Loading the ONNX Runtime shared library once per process (`ort`'s `load-dynamic`), with an
//! error that says what to run when it is missing or the wrong version.

use std::path::Path;
use std::sync::{Mutex, OnceLock};

use ort::environment::Environment;

use crate::error::{InferenceError, Result};

/// The ONNX Runtime release this crate is built and tested against (the `onnxruntime` wheel pin).
pub const ORT_VERSION: &str = "1.31.1";

/// Where `make setup` puts the library, relative to the repository root.
pub const DEFAULT_DYLIB_PATH: &str = ".cache/onnxruntime/libonnxruntime.so.1.31.1";

static ENVIRONMENT: OnceLock<Environment> = OnceLock::new();
static INIT_LOCK: Mutex<()> = Mutex::new(());

/// Load ONNX Runtime from `path` (once; later calls return the same environment).
///
/// The file is checked before `dlopen` so a missing library is a typed error, not a panic
/// inside `ort`. A library older than 1.31 is refused by `ort` with a version error.
pub fn init_runtime(path: &Path) -> Result<Environment> {
    if let Some(env) = ENVIRONMENT.get() {
        return Ok(env.clone());
    }
    let _guard = INIT_LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(env) = ENVIRONMENT.get() {
        return Ok(env.clone());
    }
    let fail = |reason: String| InferenceError::RuntimeLibrary {
        path: path.to_path_buf(),
        reason,
        expected_version: ORT_VERSION,
    };
    if !path.is_file() {
        return Err(fail("no such file".to_owned()));
    }
    let env = ort::init_from(path)
        .map_err(|e| fail(e.to_string()))?
        .with_name("streamgate")
        .build()
        .map_err(|e| fail(e.to_string()))?;
    Ok(ENVIRONMENT.get_or_init(|| env).clone())
}
