//! CoOp's prompt learner with one *unified* context shared by every quality category (the
//! paper's §3.2.1): `[SOT] [LC]_1 … [LC]_M [category tokens] [.] [EOT] [pad…]`.
//!
//! Built exactly as CoOp builds it: the string `"X X … X {category}."` is tokenized and embedded
//! with CLIP's frozen token embedding; the SOT embedding (prefix) and everything after the `X`s
//! (suffix: category tokens, ".", EOT, padding) are kept as frozen buffers, and the learnable
//! context is spliced in at positions `1..=M`.

use serde::{Deserialize, Serialize};
use tch::nn::{self, Init};
use tch::{Kind, Tensor};

use crate::clip::Clip;
use crate::tokenizer::{ClipTokenizer, TokenizerError};

/// The paper's number of context tokens (`N_CTX = 16` in the reference).
pub const DEFAULT_CONTEXT_LEN: usize = 16;

/// The reference's context initialisation: `nn.init.normal_(ctx, std=0.02)`.
pub const DEFAULT_CONTEXT_STD: f64 = 0.02;

/// How the learnable context vectors start.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ContextInit {
    /// `N(0, std²)` per element: the configuration behind the paper's numbers (std 0.02).
    Random { std: f64 },
    /// CoOp's `CTX_INIT`: the phrase's token embeddings become the context (e.g. `"a photo of
    /// a"`). As in CoOp, the context length is then the phrase's length and the configured
    /// length is ignored; unlike CoOp (which counts space-separated words) the length is the
    /// phrase's number of BPE tokens, so a word split into several tokens is copied whole.
    /// Underscores are read as spaces, as CoOp does.
    Phrase(String),
}

impl Default for ContextInit {
    fn default() -> Self {
        ContextInit::Random {
            std: DEFAULT_CONTEXT_STD,
        }
    }
}

/// Why a prompt learner could not be built.
#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    #[error("no quality categories given; name at least one (e.g. the preset `adjectives6`)")]
    NoCategories,
    #[error("quality category #{index} is empty; give every category at least one word")]
    EmptyCategory { index: usize },
    #[error("the context length must be at least 1 (the paper uses 16)")]
    ZeroContext,
    #[error(
        "context init phrase is empty; give a phrase such as \"a photo of a\" or use random init"
    )]
    EmptyPhrase,
    #[error("context init std must be finite and non-negative, got {0} (the paper uses 0.02)")]
    InvalidStd(f64),
    #[error(
        "prompt {prompt:?} needs {tokens} tokens (SOT + {context_len} context + category + \".\" \
         + EOT) but CLIP's text context holds {limit}; shorten the category or the context"
    )]
    TooLong {
        prompt: String,
        tokens: usize,
        limit: usize,
        context_len: usize,
    },
    #[error(
        "token id {id} of prompt {prompt:?} is outside CLIP's vocabulary of {vocab_size}; \
         the tokenizer does not belong to this CLIP"
    )]
    VocabularyMismatch {
        prompt: String,
        id: i64,
        vocab_size: i64,
    },
    #[error(
        "prompt {prompt:?} did not tokenize as SOT followed by {context_len} placeholder tokens; \
         does the category start with punctuation that merges with \"X\"?"
    )]
    UnexpectedLayout { prompt: String, context_len: usize },
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
}

/// The learnable context and the frozen pieces of the K prompts around it.
#[derive(Debug)]
pub struct PromptLearner {
    /// `[M, W]`, the only trainable tensor (var `ctx` under the given path).
    ctx: Tensor,
    /// `[K, 1, W]` SOT embedding.
    prefix: Tensor,
    /// `[K, L - 1 - M, W]` category tokens, ".", EOT and padding embeddings.
    suffix: Tensor,
    /// `[K]` i64, position of EOT in each prompt.
    eot_positions: Tensor,
    /// `[K, L]` i64, the placeholder prompts' token ids.
    token_ids: Tensor,
    /// Last EOT position + 1: the text tower is causal, so the padding after every EOT cannot
    /// change a pooled feature and is not run (≈ 4× less work than 77 tokens for the paper's
    /// prompts).
    used_len: i64,
    categories: Vec<String>,
    prompts: Vec<String>,
}

impl PromptLearner {
    /// Creates `ctx` under `path` (so under `prompt/` it is named `prompt.ctx`) on `clip`'s
    /// device, and the frozen prefix/suffix buffers from `clip`'s token embedding.
    pub fn new(
        path: &nn::Path,
        clip: &Clip,
        tokenizer: &ClipTokenizer,
        categories: &[String],
        context_len: usize,
        init: &ContextInit,
    ) -> Result<PromptLearner, PromptError> {
        if categories.is_empty() {
            return Err(PromptError::NoCategories);
        }
        if let Some(index) = categories.iter().position(|c| c.trim().is_empty()) {
            return Err(PromptError::EmptyCategory { index });
        }
        let text = &clip.config().text;
        let limit = usize::try_from(text.context_length).unwrap_or(0);
        let device = clip.device();

        // CoOp: a phrase fixes the context length to its own length.
        let phrase_ids = match init {
            ContextInit::Random { std } if !std.is_finite() || *std < 0. => {
                return Err(PromptError::InvalidStd(*std))
            }
            ContextInit::Random { .. } => None,
            ContextInit::Phrase(phrase) => {
                let phrase = phrase.replace('_', " ");
                let ids = tokenizer.bpe_ids(&phrase)?;
                if ids.is_empty() {
                    return Err(PromptError::EmptyPhrase);
                }
                if let Some(&id) = ids.iter().find(|&&id| i64::from(id) >= text.vocab_size) {
                    return Err(PromptError::VocabularyMismatch {
                        prompt: phrase,
                        id: i64::from(id),
                        vocab_size: text.vocab_size,
                    });
                }
                Some((phrase, ids))
            }
        };
        let context_len = phrase_ids
            .as_ref()
            .map_or(context_len, |(_, ids)| ids.len());
        if context_len == 0 {
            return Err(PromptError::ZeroContext);
        }

        let placeholder = vec!["X"; context_len].join(" ");
        let mut prompts = Vec::with_capacity(categories.len());
        let mut ids = Vec::with_capacity(categories.len() * limit);
        let mut eot = Vec::with_capacity(categories.len());
        for category in categories {
            let prompt = format!("{placeholder} {}.", category.replace('_', " "));
            let bpe = tokenizer.bpe_ids(&prompt)?;
            if bpe.len() + 2 > limit {
                return Err(PromptError::TooLong {
                    tokens: bpe.len() + 2,
                    prompt,
                    limit,
                    context_len,
                });
            }
            let mut row = tokenizer.encode(&prompt)?;
            row.truncate(limit);
            if row[1..=context_len].iter().any(|&id| id != row[1]) {
                return Err(PromptError::UnexpectedLayout {
                    prompt,
                    context_len,
                });
            }
            if let Some(&id) = row.iter().find(|&&id| id < 0 || id >= text.vocab_size) {
                return Err(PromptError::VocabularyMismatch {
                    prompt,
                    id,
                    vocab_size: text.vocab_size,
                });
            }
            // EOT is the highest id of the vocabulary: CLIP pools at the argmax.
            let (position, _) = row
                .iter()
                .enumerate()
                .max_by_key(|&(i, &id)| (id, std::cmp::Reverse(i)))
                .unwrap_or((0, &0));
            eot.push(position as i64);
            ids.extend(row);
            prompts.push(prompt);
        }

        let k = categories.len() as i64;
        let m = context_len as i64;
        let token_ids = Tensor::from_slice(&ids)
            .view([k, limit as i64])
            .to_device(device);
        let (prefix, suffix) = tch::no_grad(|| {
            let embedded = clip.embed_tokens(&token_ids).to_kind(Kind::Float);
            (
                embedded.narrow(1, 0, 1).copy(),
                embedded.narrow(1, 1 + m, limit as i64 - 1 - m).copy(),
            )
        });

        let ctx = match (init, phrase_ids) {
            (ContextInit::Random { std }, _) => path.var(
                "ctx",
                &[m, text.width],
                Init::Randn {
                    mean: 0.,
                    stdev: *std,
                },
            ),
            (ContextInit::Phrase(_), Some((phrase, _))) => {
                let phrase_row = Tensor::from_slice(&tokenizer.encode(&phrase)?)
                    .narrow(0, 0, 1 + m)
                    .unsqueeze(0);
                let vectors = tch::no_grad(|| {
                    clip.embed_tokens(&phrase_row)
                        .to_kind(Kind::Float)
                        .get(0)
                        .narrow(0, 1, m)
                });
                path.var_copy("ctx", &vectors)
            }
            (ContextInit::Phrase(_), None) => unreachable!("phrase ids are computed for phrases"),
        };

        let used_len = eot.iter().max().map_or(limit as i64, |&e| e + 1);
        Ok(PromptLearner {
            used_len,
            ctx,
            prefix,
            suffix,
            eot_positions: Tensor::from_slice(&eot).to_device(device),
            token_ids,
            categories: categories.to_vec(),
            prompts,
        })
    }

    /// The K prompts' text features `[K, E]`, not L2-normalised; gradients reach only the
    /// context. Independent of the images: compute once per step.
    pub fn forward(&self, clip: &Clip) -> Tensor {
        let embedded = self.splice(self.used_len);
        clip.encode_text_embedded(&embedded, &self.eot_positions)
    }

    /// The spliced prompts `[K, L, W]` (L = CLIP's 77): prefix, context (shared), suffix.
    pub fn embedded(&self) -> Tensor {
        self.splice(self.token_ids.size()[1])
    }

    /// The first `len` positions of the spliced prompts, `[K, len, W]`.
    fn splice(&self, len: i64) -> Tensor {
        let (k, _, width) = self.suffix.size3().expect("suffix is [K, L', W]");
        let m = self.ctx.size()[0];
        let ctx = self.ctx.unsqueeze(0).expand([k, m, width], false);
        let suffix = self.suffix.narrow(1, 0, len - 1 - m);
        Tensor::cat(&[&self.prefix, &ctx, &suffix], 1)
    }

    /// The learnable context `[M, W]`.
    pub fn context(&self) -> &Tensor {
        &self.ctx
    }

    /// M, the number of context tokens actually used (a phrase init sets it).
    pub fn context_len(&self) -> usize {
        self.ctx.size()[0] as usize
    }

    pub fn categories(&self) -> &[String] {
        &self.categories
    }

    /// The placeholder prompts as tokenized, `"X X … X {category}."`.
    pub fn prompts(&self) -> &[String] {
        &self.prompts
    }

    /// `[K, L]` i64 token ids of the placeholder prompts.
    pub fn token_ids(&self) -> &Tensor {
        &self.token_ids
    }

    /// `[K]` i64 EOT positions, where the text encoder pools.
    pub fn eot_positions(&self) -> &Tensor {
        &self.eot_positions
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clip::ClipConfig;
    use std::sync::OnceLock;
    use tch::Device;

    pub(crate) fn tiny_clip(seed: i64) -> Clip {
        Clip::random(&ClipConfig::preset("tiny").unwrap(), seed, Device::Cpu)
    }

    fn tokenizer() -> &'static ClipTokenizer {
        static TOKENIZER: OnceLock<ClipTokenizer> = OnceLock::new();
        TOKENIZER.get_or_init(|| ClipTokenizer::embedded().unwrap())
    }

    fn strings(words: &[&str]) -> Vec<String> {
        words.iter().map(|w| w.to_string()).collect()
    }

    fn learner(
        clip: &Clip,
        categories: &[&str],
        m: usize,
        init: &ContextInit,
    ) -> Result<(nn::VarStore, PromptLearner), PromptError> {
        let vs = nn::VarStore::new(clip.device());
        let learner = PromptLearner::new(
            &(vs.root() / "prompt"),
            clip,
            tokenizer(),
            &strings(categories),
            m,
            init,
        )?;
        Ok((vs, learner))
    }

    #[test]
    fn spliced_prompts_match_clip_embeddings_outside_the_context() {
        let clip = tiny_clip(0);
        // "very good" and "low-quality" are several BPE tokens.
        let categories = ["bad", "very good", "low-quality", "4"];
        for m in [8, 16, 32] {
            let (vs, learner) = learner(&clip, &categories, m, &ContextInit::default()).unwrap();
            assert_eq!(vs.variables().len(), 1);
            assert_eq!(vs.variables()["prompt.ctx"].size(), [m as i64, 256]);
            let embedded = learner.embedded();
            assert_eq!(embedded.size(), [4, 77, 256]);
            let reference = clip.embed_tokens(learner.token_ids());
            let m = m as i64;
            let outside =
                |t: &Tensor| Tensor::cat(&[t.narrow(1, 0, 1), t.narrow(1, 1 + m, 77 - 1 - m)], 1);
            assert!(outside(&embedded).equal(&outside(&reference)));
            // The context sits at 1..=M, the same for every category.
            let ctx = embedded.narrow(1, 1, m);
            for k in 0..4 {
                assert!(ctx.get(k).equal(learner.context()));
            }
            for (k, category) in categories.iter().enumerate() {
                let category_tokens = tokenizer().bpe_ids(category).unwrap().len() as i64;
                // SOT, ctx, category, ".", then EOT.
                let eot = 1 + m + category_tokens + 1;
                assert_eq!(learner.eot_positions().int64_value(&[k as i64]), eot);
                let ids = learner.token_ids().get(k as i64);
                assert_eq!(ids.int64_value(&[eot]), i64::from(tokenizer().end_id()));
                assert_eq!(ids.argmax(0, false).int64_value(&[]), eot);
            }
        }
        let multi = tokenizer().bpe_ids("low-quality").unwrap().len();
        assert_eq!(multi, 3, "test needs a multi-token category");
    }

    #[test]
    fn prompts_longer_than_the_text_context_are_refused() {
        let clip = tiny_clip(1);
        // "very good" is 2 tokens: 2 + M + 3 ≤ 77 ⇔ M ≤ 72.
        assert_eq!(tokenizer().bpe_ids("very good").unwrap().len(), 2);
        let (_, fits) = learner(&clip, &["very good"], 72, &ContextInit::default()).unwrap();
        assert_eq!(fits.eot_positions().int64_value(&[0]), 76);
        let err = learner(&clip, &["bad", "very good"], 73, &ContextInit::default()).unwrap_err();
        match &err {
            PromptError::TooLong { tokens, limit, .. } => assert_eq!((*tokens, *limit), (78, 77)),
            other => panic!("expected TooLong, got {other:?}"),
        }
        assert!(err.to_string().contains("shorten"), "{err}");
        assert!(matches!(
            learner(&clip, &[], 16, &ContextInit::default()),
            Err(PromptError::NoCategories)
        ));
        assert!(matches!(
            learner(&clip, &["good", " "], 16, &ContextInit::default()),
            Err(PromptError::EmptyCategory { index: 1 })
        ));
        assert!(matches!(
            learner(&clip, &["good"], 0, &ContextInit::default()),
            Err(PromptError::ZeroContext)
        ));
        assert!(matches!(
            learner(&clip, &["good"], 4, &ContextInit::Random { std: -1. }),
            Err(PromptError::InvalidStd(_))
        ));
        assert!(matches!(
            learner(&clip, &["good"], 4, &ContextInit::Phrase("  ".into())),
            Err(PromptError::EmptyPhrase)
        ));
    }

    #[test]
    fn phrase_init_copies_the_phrase_embeddings_and_sets_the_length() {
        let clip = tiny_clip(2);
        let phrase = "a photo of a";
        let init = ContextInit::Phrase(phrase.into());
        // The configured 16 is overridden by the phrase's 4 tokens, as in CoOp.
        let (_, learner) = learner(&clip, &["bad", "good"], 16, &init).unwrap();
        assert_eq!(learner.context_len(), 4);
        let ids = Tensor::from_slice(&tokenizer().encode(phrase).unwrap()).unsqueeze(0);
        let expected = clip.embed_tokens(&ids).get(0).narrow(0, 1, 4);
        assert!(learner.context().equal(&expected));
        assert!(learner.context().requires_grad());
        // The spliced prompt is then exactly CLIP's embedding of "a photo of a good.".
        let text = Tensor::from_slice(&tokenizer().encode("a photo of a good.").unwrap());
        let direct = clip.embed_tokens(&text.unsqueeze(0)).get(0);
        assert!(learner.embedded().get(1).equal(&direct));
        let features = learner.forward(&clip).get(1);
        let reference = clip.encode_text(&text.unsqueeze(0)).get(0);
        assert!(features.allclose(&reference, 1e-5, 1e-5, false));
    }

    #[test]
    fn features_skip_the_padding_without_changing_the_result() {
        let clip = tiny_clip(5);
        let (_, learner) =
            learner(&clip, &["bad", "very good"], 16, &ContextInit::default()).unwrap();
        // "very good": SOT + 16 + 2 + "." → EOT at 20, so 21 of 77 positions run.
        assert_eq!(learner.used_len, 21);
        let full = clip.encode_text_embedded(&learner.embedded(), learner.eot_positions());
        let features = learner.forward(&clip);
        let diff = (&features - &full).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "max difference {diff}");
    }

    #[test]
    fn random_init_has_the_requested_spread() {
        let clip = tiny_clip(3);
        let (_, learner) = learner(&clip, &["good"], 32, &ContextInit::default()).unwrap();
        let std = learner.context().std(true).double_value(&[]);
        assert!((std - 0.02).abs() < 0.002, "std {std}");
        assert!(learner.context().mean(Kind::Float).double_value(&[]).abs() < 0.002);
    }

    #[test]
    fn gradients_reach_the_context_and_no_clip_weight() {
        let clip = tiny_clip(4);
        let (_, learner) = learner(&clip, &["bad", "good"], 8, &ContextInit::default()).unwrap();
        let features = learner.forward(&clip);
        assert_eq!(features.size(), [2, 256]);
        features.square().sum(Kind::Float).backward();
        let grad = learner.context().grad();
        assert!(grad.abs().sum(Kind::Float).double_value(&[]) > 0.);
        for (name, weight) in clip.named_tensors() {
            assert!(!weight.requires_grad(), "{name} requires grad");
            assert!(!weight.grad().defined(), "{name} received a gradient");
        }
    }
}
