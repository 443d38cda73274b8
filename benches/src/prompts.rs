//! Prompts of an exact token length, cut from a text with the model's own tokenizer (the long-
//! prompt runs of `engine-bench` and `batching-bench`).

use std::path::Path;

use streamgate_inference::model_files::ModelFiles;
use streamgate_inference::tokenizer::TextTokenizer;

pub type AnyError = Box<dyn std::error::Error + Send + Sync>;

/// The first `n` tokens of `file` (repeated if short) as text, and its token count re-encoded.
pub fn long_prompt(model: &Path, file: &Path, n: usize) -> Result<(String, usize), AnyError> {
    let tokenizer = TextTokenizer::from_file(&ModelFiles::read(model)?.tokenizer_path)?;
    let text = std::fs::read_to_string(file)?;
    let mut ids = tokenizer.encode(&text)?;
    while ids.len() < n && !ids.is_empty() {
        ids.extend_from_within(..);
    }
    ids.truncate(n);
    let prompt = tokenizer.decode(&ids)?;
    let count = tokenizer.encode(&prompt)?.len();
    Ok((prompt, count))
}
