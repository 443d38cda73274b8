//! The Hugging Face tokenizer (`tokenizer.json`) and incremental detokenization that never emits
//! broken UTF-8: a character whose bytes are split across tokens is held until it is complete.

use std::path::Path;
use std::sync::Arc;

use crate::error::{InferenceError, Result};

/// A loaded `tokenizer.json`, cheap to clone.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Arc<tokenizers::Tokenizer>,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer").field("vocab_size", &self.vocab_size()).finish()
    }
}

impl TextTokenizer {
    pub fn from_file(path: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| InferenceError::ModelFiles {
            path: path.to_path_buf(),
            reason: format!("tokenizer.json: {e}"),
        })?;
        Ok(Self { inner: Arc::new(inner) })
    }

    /// Encode text. Special-token strings in the text (e.g. `<|im_start|>` produced by a chat
    /// template) become their special ids; no BOS/EOS is added beyond what the tokenizer's
    /// post-processor adds.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self.inner.encode(text, true).map_err(InferenceError::tokenizer)?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Decode ids to text, skipping special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(InferenceError::tokenizer)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// Turns a growing list of token ids into text deltas.
///
/// It decodes a short window of recent tokens twice (with and without the newest one) and emits
/// the difference only when the window does not end in U+FFFD, the replacement character a
/// byte-level decoder produces for an incomplete UTF-8 sequence. This is the approach of
/// text-generation-inference; it also handles tokenizers whose decoders change earlier text
/// (e.g. SentencePiece's leading-space rule), because the window keeps one token of context.
#[derive(Debug, Default)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl IncrementalDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a token; return the text that is now complete (possibly empty).
    pub fn push(&mut self, tokenizer: &TextTokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let window = tokenizer.decode(&self.ids[self.prefix_offset..])?;
        if window.len() > prefix.len()
            && !window.ends_with('\u{FFFD}')
            && let Some(delta) = window.get(prefix.len()..)
        {
            let delta = delta.to_owned();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            return Ok(delta);
        }
        Ok(String::new())
    }

    /// Text still held back at the end of generation (an incomplete character decodes lossily).
    pub fn flush(&mut self, tokenizer: &TextTokenizer) -> Result<String> {
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let window = tokenizer.decode(&self.ids[self.prefix_offset..])?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok(window.get(prefix.len()..).map(str::to_owned).unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::tiny_model_dir;

    fn tiny() -> TextTokenizer {
        match TextTokenizer::from_file(&tiny_model_dir().join("tokenizer.json")) {
            Ok(t) => t,
            Err(e) => unreachable!("tiny tokenizer must load: {e}"),
        }
    }

    fn stream_text(tok: &TextTokenizer, ids: &[u32]) -> Vec<String> {
        let mut decoder = IncrementalDecoder::new();
        let mut pieces: Vec<String> =
            ids.iter().map(|&id| decoder.push(tok, id).unwrap_or_default()).collect();
        pieces.push(decoder.flush(tok).unwrap_or_default());
        pieces
    }

    #[test]
    fn multibyte_characters_are_never_split() {
        let tok = tiny();
        for text in ["é", "中文", "🦀", "Café 中文 🚀 done", "👍🏽 naïve déjà vu"] {
            let ids = tok.encode(text).unwrap_or_default();
            let pieces = stream_text(&tok, &ids);
            for piece in &pieces {
                assert!(!piece.contains('\u{FFFD}'), "piece {piece:?} of {text:?} holds a broken character");
            }
            assert_eq!(pieces.concat(), text);
        }
    }

    #[test]
    fn a_split_character_is_held_until_complete() {
        let tok = tiny();
        let ids = tok.encode("中").unwrap_or_default();
        assert!(ids.len() >= 2, "中 must span tokens in the tiny vocabulary: {ids:?}");
        let pieces = stream_text(&tok, &ids);
        assert!(pieces[..ids.len() - 1].iter().all(String::is_empty), "{pieces:?}");
        assert_eq!(pieces[ids.len() - 1], "中");
    }

    #[test]
    fn an_incomplete_tail_is_flushed_lossily() {
        let tok = tiny();
        let ids = tok.encode("中").unwrap_or_default();
        let mut decoder = IncrementalDecoder::new();
        let first = decoder.push(&tok, ids[0]).unwrap_or_default();
        assert_eq!(first, "");
        assert_eq!(decoder.flush(&tok).unwrap_or_default(), "\u{FFFD}");
    }

    #[test]
    fn special_tokens_map_to_their_ids() {
        let tok = tiny();
        let ids = tok.encode("<|im_start|>user").unwrap_or_default();
        assert_eq!(Some(ids[0]), tok.token_to_id("<|im_start|>"));
        assert_eq!(tok.decode(&ids).unwrap_or_default(), "user");
    }
}
