//! CLIP's byte-level BPE tokenizer, as the `tokenizers` crate runs it from a Hugging Face
//! `tokenizer.json`, plus the text cleaning and truncation of OpenAI's reference tokenizer.
//!
//! The project embeds the real CLIP vocabulary (49408 tokens, built from OpenAI's
//! `bpe_simple_vocab_16e6.txt.gz`) so that prompts tokenize with no file to download.

use std::io::Read;
use std::path::{Path, PathBuf};

/// CLIP's context length: every tokenized text is exactly this many ids.
pub const CONTEXT_LENGTH: usize = 77;

const EMBEDDED_TOKENIZER_GZ: &[u8] = include_bytes!("../assets/clip-tokenizer.json.gz");

/// Why a tokenizer could not be loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot read tokenizer {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("tokenizer {path} is not a valid Hugging Face tokenizer.json: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("tokenizer {path} lacks CLIP's special token {token}")]
    MissingSpecialToken { path: PathBuf, token: &'static str },
    #[error("cannot tokenize {text:?}: {reason}")]
    Encode { text: String, reason: String },
}

/// CLIP tokenizer: start/end tokens, lower-casing and cleaning as CLIP does, 77 ids.
pub struct ClipTokenizer {
    inner: tokenizers::Tokenizer,
    start_id: u32,
    end_id: u32,
    source: PathBuf,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("source", &self.source)
            .field("vocab_size", &self.vocab_size())
            .finish()
    }
}

impl ClipTokenizer {
    /// The embedded CLIP tokenizer (OpenAI's vocabulary; identical ids to `clip.tokenize`).
    pub fn embedded() -> Result<Self, TokenizerError> {
        let source = PathBuf::from("<embedded clip-tokenizer.json.gz>");
        let json = gunzip(EMBEDDED_TOKENIZER_GZ).map_err(|source_err| TokenizerError::Read {
            path: source.clone(),
            source: source_err,
        })?;
        Self::from_json_bytes(&json, source)
    }

    /// Loads a Hugging Face `tokenizer.json` (plain or `.gz`), or the one inside a model folder.
    pub fn from_file(path: &Path) -> Result<Self, TokenizerError> {
        let file = if path.is_dir() {
            path.join("tokenizer.json")
        } else {
            path.to_path_buf()
        };
        let read_err = |source| TokenizerError::Read {
            path: file.clone(),
            source,
        };
        let raw = std::fs::read(&file).map_err(read_err)?;
        let json = if raw.starts_with(&[0x1f, 0x8b]) {
            gunzip(&raw).map_err(read_err)?
        } else {
            raw
        };
        Self::from_json_bytes(&json, file.clone())
    }

    fn from_json_bytes(json: &[u8], source: PathBuf) -> Result<Self, TokenizerError> {
        let inner = tokenizers::Tokenizer::from_bytes(json).map_err(|e| TokenizerError::Parse {
            path: source.clone(),
            reason: e.to_string(),
        })?;
        let special = |token: &'static str| {
            inner
                .token_to_id(token)
                .ok_or_else(|| TokenizerError::MissingSpecialToken {
                    path: source.clone(),
                    token,
                })
        };
        Ok(ClipTokenizer {
            start_id: special("<|startoftext|>")?,
            end_id: special("<|endoftext|>")?,
            inner,
            source,
        })
    }

    /// Id of `<|startoftext|>`.
    pub fn start_id(&self) -> u32 {
        self.start_id
    }

    /// Id of `<|endoftext|>`; the text encoder pools at this token.
    pub fn end_id(&self) -> u32 {
        self.end_id
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// BPE ids of a text, without start/end tokens and without truncation.
    pub fn bpe_ids(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let cleaned = clean_text(text);
        let encoding =
            self.inner
                .encode(cleaned.as_str(), false)
                .map_err(|e| TokenizerError::Encode {
                    text: text.to_string(),
                    reason: e.to_string(),
                })?;
        Ok(encoding.get_ids().to_vec())
    }

    /// `[SOT] bpe… [EOT] 0…` in exactly [`CONTEXT_LENGTH`] ids. Longer texts are truncated
    /// keeping the end token last, as OpenAI's `tokenize(truncate=True)` and open_clip do.
    pub fn encode(&self, text: &str) -> Result<Vec<i64>, TokenizerError> {
        let bpe = self.bpe_ids(text)?;
        let mut ids = Vec::with_capacity(CONTEXT_LENGTH);
        ids.push(i64::from(self.start_id));
        ids.extend(bpe.iter().take(CONTEXT_LENGTH - 2).map(|&id| i64::from(id)));
        ids.push(i64::from(self.end_id));
        ids.resize(CONTEXT_LENGTH, 0);
        Ok(ids)
    }

    /// [`ClipTokenizer::encode`] for several texts, row-major `[texts.len(), 77]`.
    pub fn encode_batch(&self, texts: &[&str]) -> Result<Vec<i64>, TokenizerError> {
        let mut out = Vec::with_capacity(texts.len() * CONTEXT_LENGTH);
        for text in texts {
            out.extend(self.encode(text)?);
        }
        Ok(out)
    }
}

/// CLIP's `basic_clean` + `whitespace_clean` without ftfy: HTML entities unescaped twice (as
/// the reference does), runs of whitespace collapsed to one space, ends trimmed. Lower-casing
/// and NFC are the tokenizer.json normalizer's job.
pub fn clean_text(text: &str) -> String {
    let once = html_escape::decode_html_entities(text);
    let twice = html_escape::decode_html_entities(&once);
    twice.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn gunzip(bytes: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes).read_to_end(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_tokenizer_has_clip_specials() {
        let tok = ClipTokenizer::embedded().unwrap();
        assert_eq!(tok.vocab_size(), 49408);
        assert_eq!(tok.start_id(), 49406);
        assert_eq!(tok.end_id(), 49407);
    }

    #[test]
    fn long_text_keeps_the_end_token_last() {
        let tok = ClipTokenizer::embedded().unwrap();
        let ids = tok.encode(&"word ".repeat(200)).unwrap();
        assert_eq!(ids.len(), CONTEXT_LENGTH);
        assert_eq!(ids[0], 49406);
        assert_eq!(ids[CONTEXT_LENGTH - 1], 49407);
    }

    #[test]
    fn cleaning_unescapes_and_collapses() {
        assert_eq!(clean_text("  fish &amp;amp; \t chips\n"), "fish & chips");
    }

    #[test]
    fn missing_file_names_the_file() {
        let err = ClipTokenizer::from_file(Path::new("/nowhere/tokenizer.json")).unwrap_err();
        assert!(err.to_string().contains("/nowhere/tokenizer.json"), "{err}");
    }
}
