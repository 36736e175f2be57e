//! Spot checks of a CLIP model: embeddings and zero-shot similarities for given images and
//! texts, to compare by eye with the reference implementation on the same weights.

use std::path::{Path, PathBuf};

use agiqa_runtime::preprocess::{DecodeLimits, Preprocessing, Preprocessor};
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::clip::Clip;
use crate::tokenizer::ClipTokenizer;

/// Embeddings and similarities of images against texts.
#[derive(Debug, Serialize)]
pub struct EmbeddingReport {
    pub model: String,
    pub images: Vec<PathBuf>,
    pub texts: Vec<String>,
    /// `[images][E]`, not normalised.
    pub image_embeddings: Vec<Vec<f32>>,
    /// `[texts][E]`, not normalised.
    pub text_embeddings: Vec<Vec<f32>>,
    /// Cosine similarity `[images][texts]`.
    pub cosine: Vec<Vec<f32>>,
    /// Softmax over texts of `logit_scale · cosine`, `[images][texts]`.
    pub zero_shot: Vec<Vec<f32>>,
    pub logit_scale: f64,
}

/// Why a spot check failed.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error(transparent)]
    Image(#[from] agiqa_runtime::preprocess::PreprocessError),
    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),
    #[error("the tokenizer has {tokenizer} tokens but the model's token embedding has {model} rows; pass the model's own tokenizer.json with --tokenizer")]
    VocabularyMismatch { tokenizer: usize, model: i64 },
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
}

fn rows(t: &Tensor) -> Result<Vec<Vec<f32>>, tch::TchError> {
    let t = t.to_kind(Kind::Float).to_device(Device::Cpu).contiguous();
    let cols = t.size()[1] as usize;
    let flat: Vec<f32> = Vec::<f32>::try_from(t.flatten(0, -1))?;
    Ok(flat.chunks(cols.max(1)).map(<[f32]>::to_vec).collect())
}

/// Loads images with the shared preprocessing at the model's resolution: `[N, 3, R, R]`.
pub fn load_images(
    paths: &[PathBuf],
    resolution: i64,
    device: Device,
) -> Result<Tensor, InspectError> {
    let preprocessor = Preprocessor::new(Preprocessing::clip(resolution as u32));
    let mut data = Vec::with_capacity(paths.len() * preprocessor.config().tensor_len());
    for path in paths {
        data.extend(preprocessor.preprocess_file(path, &DecodeLimits::default())?);
    }
    Ok(Tensor::from_slice(&data)
        .view([paths.len() as i64, 3, resolution, resolution])
        .to_device(device))
}

/// Encodes `images` and `texts` and compares them.
pub fn embedding_report(
    clip: &Clip,
    tokenizer: &ClipTokenizer,
    images: &[PathBuf],
    texts: &[String],
    device: Device,
) -> Result<EmbeddingReport, InspectError> {
    let model_vocab = clip.config().text.vocab_size;
    if tokenizer.vocab_size() as i64 > model_vocab {
        return Err(InspectError::VocabularyMismatch {
            tokenizer: tokenizer.vocab_size(),
            model: model_vocab,
        });
    }
    let _guard = tch::no_grad_guard();
    let pixels = load_images(images, clip.config().image_resolution(), device)?;
    let text_refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let ids = Tensor::from_slice(&tokenizer.encode_batch(&text_refs)?)
        .view([texts.len() as i64, crate::tokenizer::CONTEXT_LENGTH as i64])
        .to_device(device);
    let image_features = clip.encode_image(&pixels);
    let text_features = clip.encode_text(&ids);
    let normalise = |t: &Tensor| t / t.norm_scalaropt_dim(2, [-1], true);
    let cosine = normalise(&image_features).matmul(&normalise(&text_features).transpose(0, 1));
    let zero_shot = (&cosine * clip.logit_scale()).softmax(-1, Kind::Float);
    Ok(EmbeddingReport {
        model: clip.config().name(),
        images: images.to_vec(),
        texts: texts.to_vec(),
        image_embeddings: rows(&image_features)?,
        text_embeddings: rows(&text_features)?,
        cosine: rows(&cosine)?,
        zero_shot: rows(&zero_shot)?,
        logit_scale: clip.logit_scale(),
    })
}

impl std::fmt::Display for EmbeddingReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let head = |v: &[f32]| {
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            let first: Vec<String> = v.iter().take(6).map(|x| format!("{x:+.4}")).collect();
            format!(
                "norm {norm:8.4}  [{} …] ({} values)",
                first.join(", "),
                v.len()
            )
        };
        writeln!(
            f,
            "model: {}   logit scale: {:.2}",
            self.model, self.logit_scale
        )?;
        writeln!(f, "\nimage embeddings")?;
        for (path, e) in self.images.iter().zip(&self.image_embeddings) {
            writeln!(f, "  {:<40} {}", short(path), head(e))?;
        }
        writeln!(f, "\ntext embeddings")?;
        for (text, e) in self.texts.iter().zip(&self.text_embeddings) {
            writeln!(f, "  {:<40} {}", format!("{text:?}"), head(e))?;
        }
        for (title, table) in [
            ("cosine similarity", &self.cosine),
            ("zero-shot probability", &self.zero_shot),
        ] {
            writeln!(f, "\n{title} (rows: images, columns: texts)")?;
            write!(f, "  {:<40}", "")?;
            for i in 0..self.texts.len() {
                write!(f, " {:>8}", format!("t{i}"))?;
            }
            writeln!(f)?;
            for (path, row) in self.images.iter().zip(table) {
                write!(f, "  {:<40}", short(path))?;
                for v in row {
                    write!(f, " {v:8.4}")?;
                }
                writeln!(f)?;
            }
        }
        Ok(())
    }
}

fn short(path: &Path) -> String {
    let chars: Vec<char> = path.display().to_string().chars().collect();
    if chars.len() > 40 {
        format!("…{}", chars[chars.len() - 39..].iter().collect::<String>())
    } else {
        chars.into_iter().collect()
    }
}
