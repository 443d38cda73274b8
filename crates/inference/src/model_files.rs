//! Reading a model folder in Hugging Face / Optimum layout: `model.onnx`, `tokenizer.json`,
//! and, where present, `config.json`, `generation_config.json` and `tokenizer_config.json`
//! (end-of-sequence ids, context length, chat template).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use crate::error::{InferenceError, Result};

/// What generation needs to know about a model, beyond the ONNX graph itself.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub dir: PathBuf,
    pub onnx_path: PathBuf,
    /// `model_mixed.onnx`, when the folder has one: the fused layout's graph that runs decode rows
    /// and a prompt chunk in one pass (scripts/model_prep/llama_fused.py, `mixed=True`).
    pub mixed_onnx_path: Option<PathBuf>,
    pub tokenizer_path: PathBuf,
    /// A display name: `_name_or_path` from config.json, else the folder name.
    pub name: String,
    /// Tokens that end generation (union of all the files' `eos_token_id` / `eos_token`).
    pub eos_token_ids: BTreeSet<u32>,
    /// `eos_token` from tokenizer_config.json, resolved to an id once the tokenizer is loaded.
    pub eos_token_text: Option<String>,
    /// Maximum positions (prompt + generated), when a file says.
    pub context_length: Option<usize>,
    /// Jinja chat template from tokenizer_config.json, when present.
    pub chat_template: Option<String>,
    pub bos_token_text: Option<String>,
    /// `num_key_value_heads` / `head_dim` from config.json, a fallback when the graph's
    /// input shapes are symbolic.
    pub config_kv_heads: Option<usize>,
    pub config_head_dim: Option<usize>,
}

#[derive(Deserialize, Default)]
struct ConfigJson {
    #[serde(rename = "_name_or_path")]
    name_or_path: Option<String>,
    eos_token_id: Option<Value>,
    max_position_embeddings: Option<usize>,
    num_key_value_heads: Option<usize>,
    num_attention_heads: Option<usize>,
    hidden_size: Option<usize>,
    head_dim: Option<usize>,
}

#[derive(Deserialize, Default)]
struct GenerationConfigJson {
    eos_token_id: Option<Value>,
}

#[derive(Deserialize, Default)]
struct TokenizerConfigJson {
    chat_template: Option<Value>,
    eos_token: Option<Value>,
    bos_token: Option<Value>,
    model_max_length: Option<f64>,
}

impl ModelFiles {
    /// Read the folder; `model.onnx` and `tokenizer.json` are required, the JSON configs optional.
    pub fn read(dir: &Path) -> Result<Self> {
        let fail = |reason: String| InferenceError::ModelFiles { path: dir.to_path_buf(), reason };
        if !dir.is_dir() {
            return Err(fail("not a directory (prepare the default model with `make setup`)".into()));
        }
        let onnx_path = dir.join("model.onnx");
        let tokenizer_path = dir.join("tokenizer.json");
        for required in [&onnx_path, &tokenizer_path] {
            if !required.is_file() {
                return Err(fail(format!("missing {}", file_name(required))));
            }
        }
        let mixed_onnx_path = Some(dir.join("model_mixed.onnx")).filter(|p| p.is_file());
        let config: ConfigJson = read_optional_json(dir, "config.json")?;
        let generation: GenerationConfigJson = read_optional_json(dir, "generation_config.json")?;
        let tokenizer_config: TokenizerConfigJson = read_optional_json(dir, "tokenizer_config.json")?;

        let mut eos_token_ids = BTreeSet::new();
        collect_ids(config.eos_token_id.as_ref(), &mut eos_token_ids);
        collect_ids(generation.eos_token_id.as_ref(), &mut eos_token_ids);

        // tokenizer_config's model_max_length is often a huge sentinel (1e30) when unknown.
        let tokenizer_max =
            tokenizer_config.model_max_length.filter(|n| *n >= 1.0 && *n <= 16_777_216.0).map(|n| n as usize);
        let head_dim = config.head_dim.or_else(|| match (config.hidden_size, config.num_attention_heads) {
            (Some(h), Some(n)) if n > 0 => Some(h / n),
            _ => None,
        });
        Ok(Self {
            name: config.name_or_path.filter(|n| !n.is_empty()).unwrap_or_else(|| {
                dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
            }),
            dir: dir.to_path_buf(),
            onnx_path,
            mixed_onnx_path,
            tokenizer_path,
            eos_token_ids,
            eos_token_text: token_text(tokenizer_config.eos_token.as_ref()),
            bos_token_text: token_text(tokenizer_config.bos_token.as_ref()),
            context_length: config.max_position_embeddings.or(tokenizer_max),
            chat_template: chat_template(tokenizer_config.chat_template.as_ref()),
            config_kv_heads: config.num_key_value_heads,
            config_head_dim: head_dim,
        })
    }
}

fn file_name(p: &Path) -> String {
    p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

fn read_optional_json<T: for<'de> Deserialize<'de> + Default>(dir: &Path, name: &str) -> Result<T> {
    let path = dir.join(name);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| InferenceError::ModelFiles {
            path: dir.to_path_buf(),
            reason: format!("{name}: {e}"),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(e) => Err(InferenceError::ModelFiles { path: dir.to_path_buf(), reason: format!("{name}: {e}") }),
    }
}

/// `eos_token_id` may be a number or a list of numbers.
fn collect_ids(value: Option<&Value>, into: &mut BTreeSet<u32>) {
    match value {
        Some(Value::Number(n)) => into.extend(n.as_u64().and_then(|n| u32::try_from(n).ok())),
        Some(Value::Array(items)) => {
            for item in items {
                collect_ids(Some(item), into);
            }
        }
        _ => {}
    }
}

/// Special tokens are a string or an `AddedToken` object with a `content` field.
fn token_text(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_owned),
        _ => None,
    }
}

/// `chat_template` is a string, or a list of `{name, template}` of which "default" is used.
fn chat_template(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(s) => Some(s.clone()),
        Value::Array(items) => items
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template"))
            .and_then(Value::as_str)
            .map(str::to_owned),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eos_ids_accept_numbers_and_lists() {
        let mut ids = BTreeSet::new();
        collect_ids(Some(&serde_json::json!([2, 0, "x", -1])), &mut ids);
        collect_ids(Some(&serde_json::json!(7)), &mut ids);
        assert_eq!(ids.into_iter().collect::<Vec<_>>(), vec![0, 2, 7]);
    }

    #[test]
    fn special_tokens_accept_strings_and_objects() {
        assert_eq!(token_text(Some(&serde_json::json!("<eos>"))).as_deref(), Some("<eos>"));
        assert_eq!(token_text(Some(&serde_json::json!({"content": "</s>"}))).as_deref(), Some("</s>"));
        assert_eq!(token_text(Some(&serde_json::json!(3))), None);
    }

    #[test]
    fn missing_folder_is_a_typed_error() {
        let err = ModelFiles::read(Path::new("/nonexistent/streamgate-model")).err();
        assert!(matches!(err, Some(InferenceError::ModelFiles { .. })), "{err:?}");
    }

    #[test]
    fn bad_json_names_the_file() {
        let dir = std::env::temp_dir().join(format!("sg-bad-json-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok();
        std::fs::write(dir.join("model.onnx"), b"x").ok();
        std::fs::write(dir.join("tokenizer.json"), b"{}").ok();
        std::fs::write(dir.join("config.json"), b"{not json").ok();
        let err = ModelFiles::read(&dir).err().map(|e| e.to_string()).unwrap_or_default();
        std::fs::remove_dir_all(&dir).ok();
        assert!(err.contains("config.json"), "{err}");
    }
}
