//! Synthetic datasets in the real on-disk formats, whose MOS is a known function of controlled
//! distortions: for end-to-end runs and tests where the real images cannot be downloaded.
//!
//! Every image is one of [`REFERENCE_SCENES`] procedural scenes
//! ([`crate::synthetic_images::procedural_scene`]), `size` wide and
//! `size·3/4` high (not square, so resizing and cropping matter), with
//! - a primary distortion of a uniformly drawn kind and severity `s1 ~ U[0, 1]`, and
//! - with probability 1/2, a mild secondary distortion of another kind, `s2 ~ U[0, 0.3]`.
//!
//! Severity `s` maps to parameters strong enough to survive a 224-px resize: blur sigma `4·s` px,
//! Gaussian noise sigma `40·s` levels, JPEG quality `round(95 − 90·s)`, colour shift `80·s` levels.
//!
//! For each rated dimension, the impairment is `d = min(1, Σ w_dim(kind)·s)` over the applied
//! distortions, with the weights of [`weight`]:
//!
//! | kind   | quality | alignment / correspondence | authenticity |
//! |--------|---------|----------------------------|--------------|
//! | blur   | 1.0     | 1.0                        | 0.3          |
//! | noise  | 1.0     | 0.3                        | 0.8          |
//! | jpeg   | 1.0     | 0.6                        | 0.3          |
//! | colour | 1.0     | 0.2                        | 1.0          |
//!
//! and the MOS is `clip(top·(1 − d)^1.2 + noise, scale)`:
//! AGIQA-3K-like `top = 4.5`, noise `N(0, 0.1²)`, scale 0–5;
//! AIGCIQA2023-like `25 + 50·(1 − d)^1.2 + N(0, 2²)`, scale 0–100 (the real range is about 26–74).
//!
//! Everything derives from `seed` and the image index, so output is identical for a seed whatever
//! the thread count. Each dataset folder also gets `README.txt` (these formulas) and
//! `distortions.csv` (the ground truth per image).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use agiqa_runtime::csv_line::csv_line;
use image::RgbImage;
use rayon::prelude::*;

use super::aigciqa2023;
use super::mat::{write_mat_file, MatVariable};
use super::split::AGIQA3K_REFERENCE_SPLIT_CSV;
use super::DataError;
use crate::synthetic_images::{procedural_scene, Distortion, SplitMix64};

/// What to generate.
#[derive(Clone, Debug)]
pub struct SynthOptions {
    /// Number of images.
    pub images: usize,
    /// Image width in pixels; the height is `size·3/4`.
    pub size: u32,
    pub seed: u64,
    /// Distortion kinds to draw from (a subset of [`KINDS`]); all four by default.
    pub kinds: Vec<&'static str>,
}

impl Default for SynthOptions {
    fn default() -> Self {
        SynthOptions {
            images: 300,
            size: 256,
            seed: 0,
            kinds: KINDS.to_vec(),
        }
    }
}

/// The distortion kinds, in the order they are drawn.
pub const KINDS: [&str; 4] = ["blur", "noise", "jpeg", "colour"];

/// The distortion kinds named in `names` (all of [`KINDS`] when empty), or an error naming the
/// unknown one.
pub fn parse_kinds(names: &[String]) -> Result<Vec<&'static str>, DataError> {
    if names.is_empty() {
        return Ok(KINDS.to_vec());
    }
    names
        .iter()
        .map(|k| {
            KINDS
                .iter()
                .find(|known| **known == k.trim())
                .copied()
                .ok_or_else(|| DataError::Spec {
                    spec: k.clone(),
                    reason: format!("unknown distortion kind; one of {}", KINDS.join(", ")),
                })
        })
        .collect()
}

/// Distinct clean scenes. Like the classic IQA databases (a few reference images, each under
/// many distortions), every scene appears many times, so the quality signal is the distortion,
/// not the content: a small frozen encoder with random weights can then learn it.
pub const REFERENCE_SCENES: usize = 24;

/// Images per prompt in the AGIQA-3K-like set (the real one has about 10).
pub const IMAGES_PER_PROMPT: usize = 5;

/// The weight of distortion `kind` in the impairment of `dimension` (see the module table).
pub fn weight(dimension: &str, kind: &str) -> f64 {
    match (dimension, kind) {
        ("alignment" | "correspondence", "blur") => 1.0,
        ("alignment" | "correspondence", "noise") => 0.3,
        ("alignment" | "correspondence", "jpeg") => 0.6,
        ("alignment" | "correspondence", "colour") => 0.2,
        ("authenticity", "blur") => 0.3,
        ("authenticity", "noise") => 0.8,
        ("authenticity", "jpeg") => 0.3,
        ("authenticity", "colour") => 1.0,
        _ => 1.0,
    }
}

/// The distortion of `kind` at severity `s ∈ [0, 1]`.
pub fn distortion(kind: &str, s: f64) -> Distortion {
    let s = s.clamp(0.0, 1.0);
    match kind {
        "blur" => Distortion::Blur((4.0 * s) as f32),
        "noise" => Distortion::Noise((40.0 * s) as f32),
        "jpeg" => Distortion::Jpeg((95.0 - 90.0 * s).round() as u8),
        _ => Distortion::ColourShift((80.0 * s) as f32),
    }
}

/// Ground truth for one generated image.
#[derive(Clone, Debug, PartialEq)]
pub struct SynthRecord {
    /// File name (AGIQA-3K) or index (AIGCIQA2023), as the loader's `Sample::name`.
    pub name: String,
    pub prompt: Option<String>,
    /// `(kind, severity)` in the order applied.
    pub distortions: Vec<(&'static str, f64)>,
    /// `(dimension, MOS)` as written to the dataset files.
    pub mos: Vec<(&'static str, f64)>,
}

impl SynthRecord {
    /// `min(1, Σ weight·severity)` for `dimension`.
    pub fn impairment(&self, dimension: &str) -> f64 {
        self.distortions
            .iter()
            .map(|&(kind, s)| weight(dimension, kind) * s)
            .sum::<f64>()
            .min(1.0)
    }

    /// The MOS of `dimension`.
    pub fn mos_of(&self, dimension: &str) -> Option<f64> {
        self.mos.iter().find(|m| m.0 == dimension).map(|m| m.1)
    }
}

/// What was written.
#[derive(Clone, Debug)]
pub struct SynthSummary {
    pub dir: PathBuf,
    /// `(width, height)` of every image.
    pub image_size: (u32, u32),
    /// Distinct prompts (0 for AIGCIQA2023-like, which has none).
    pub prompts: usize,
    pub records: Vec<SynthRecord>,
}

const SUBJECTS: [&str; 20] = [
    "a red car on a bridge",
    "statue of a man",
    "a tray of sushi",
    "a lighthouse at dusk",
    "two cats on a sofa",
    "a castle in the mountains",
    "a bowl of fruit",
    "an astronaut riding a horse",
    "a city street in the rain",
    "a sailing boat",
    "a robot reading a book",
    "a forest path in autumn",
    "a portrait of an old woman",
    "a cup of coffee",
    "a dragon over a village",
    "a bicycle against a wall",
    "a snowy cabin",
    "a jazz band on stage",
    "a field of sunflowers",
    "a spaceship landing",
];

const STYLES: [&str; 8] = [
    "realistic",
    "anime",
    "oil painting",
    "watercolor",
    "sci-fi",
    "baroque",
    "pixel art",
    "abstract",
];

/// `(prompt, style)` number `p`: subjects × styles, then numbered variants.
fn prompt(p: usize) -> (String, &'static str) {
    let style = STYLES[(p / SUBJECTS.len()) % STYLES.len()];
    let round = p / (SUBJECTS.len() * STYLES.len());
    let subject = SUBJECTS[p % SUBJECTS.len()];
    let text = if round == 0 {
        format!("{subject}, {style} style")
    } else {
        format!("{subject} #{round}, {style} style")
    };
    (text, style)
}

/// The seeded draws for image `index`: distortions, MOS noise, scene seed.
struct Draw {
    distortions: Vec<(&'static str, f64)>,
    rng: SplitMix64,
}

fn draw(seed: u64, index: usize, kinds: &[&'static str]) -> Draw {
    let mut rng = SplitMix64::new(seed ^ (index as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
    rng.next_u64();
    let n = kinds.len().max(1) as u64;
    let first = (rng.next_u64() % n) as usize;
    let mut distortions = vec![(kinds[first], f64::from(rng.uniform()))];
    if rng.uniform() < 0.5 && n > 1 {
        let second = (first + 1 + (rng.next_u64() % (n - 1)) as usize) % n as usize;
        distortions.push((kinds[second], 0.3 * f64::from(rng.uniform())));
    }
    Draw { distortions, rng }
}

/// The clean reference scenes, rendered once.
fn reference_scenes(seed: u64, width: u32, height: u32) -> Vec<RgbImage> {
    (0..REFERENCE_SCENES)
        .map(|i| procedural_scene(seed.wrapping_add(i as u64 * 7919), width, height))
        .collect()
}

fn render(clean: &RgbImage, distortions: &[(&str, f64)], noise_seed: u64) -> RgbImage {
    let mut image = clean.clone();
    for (i, &(kind, s)) in distortions.iter().enumerate() {
        image = distortion(kind, s).apply(&image, noise_seed.wrapping_add(i as u64));
    }
    image
}

/// `top·(1 − d)^1.2 + sigma·N(0,1) + offset`, clipped to `scale`.
fn mos_value(
    d: f64,
    offset: f64,
    top: f64,
    sigma: f64,
    scale: (f64, f64),
    rng: &mut SplitMix64,
) -> f64 {
    (offset + top * (1.0 - d).powf(1.2) + sigma * f64::from(rng.normal())).clamp(scale.0, scale.1)
}

fn write_err(path: &Path, e: impl std::fmt::Display) -> DataError {
    DataError::Write {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

fn create_dir(path: &Path) -> Result<(), DataError> {
    std::fs::create_dir_all(path).map_err(|e| write_err(path, e))
}

fn write_text(path: &Path, text: &str) -> Result<(), DataError> {
    std::fs::write(path, text).map_err(|e| write_err(path, e))
}

/// Runs `job(index)` for every index on the trainer's worker pool ([`crate::workers`]) and
/// returns the results in index order; the first error wins.
fn parallel<T: Send>(
    n: usize,
    job: impl Fn(usize) -> Result<T, DataError> + Sync + Send,
) -> Result<Vec<T>, DataError> {
    (0..n).into_par_iter().map(job).collect()
}

fn image_size(options: &SynthOptions) -> (u32, u32) {
    let width = options.size.max(8);
    (width, (width * 3 / 4).max(6))
}

/// The real AGIQA-3K names, in data.csv order, from the embedded reference split.
fn real_agiqa3k_names() -> Vec<&'static str> {
    AGIQA3K_REFERENCE_SPLIT_CSV
        .lines()
        .skip(1)
        .filter_map(|l| l.split(',').next())
        .collect()
}

/// Writes an AGIQA-3K-like dataset into `dir`: `data.csv` with the real columns and JPEG images
/// beside it. The first 2982 images take the real names (`AttnGAN_normal_000.jpg`, ...), so the
/// reference split applies; later ones are `synthetic_normal_{i}.jpg`. Prompts cycle through a
/// vocabulary, [`IMAGES_PER_PROMPT`] images each; all images of a prompt share one scene, prompt
/// `p` showing reference scene `p mod` [`REFERENCE_SCENES`].
pub fn write_agiqa3k_like(dir: &Path, options: &SynthOptions) -> Result<SynthSummary, DataError> {
    create_dir(dir)?;
    let (width, height) = image_size(options);
    let names = real_agiqa3k_names();
    let prompts = options.images.div_ceil(IMAGES_PER_PROMPT).max(1);
    let scenes = reference_scenes(options.seed, width, height);
    let records = parallel(options.images, |i| {
        let name = names
            .get(i)
            .map(|n| n.to_string())
            .unwrap_or_else(|| format!("synthetic_normal_{i:05}.jpg"));
        let p = i % prompts;
        let Draw {
            distortions,
            mut rng,
        } = draw(options.seed, i, &options.kinds);
        let image = render(&scenes[p % REFERENCE_SCENES], &distortions, rng.next_u64());
        let path = dir.join(&name);
        let file = std::fs::File::create(&path).map_err(|e| write_err(&path, e))?;
        let encoder =
            image::codecs::jpeg::JpegEncoder::new_with_quality(std::io::BufWriter::new(file), 95);
        image
            .write_with_encoder(encoder)
            .map_err(|e| write_err(&path, e))?;
        let mut record = SynthRecord {
            name,
            prompt: Some(prompt(p).0),
            distortions,
            mos: Vec::new(),
        };
        for dimension in ["quality", "alignment"] {
            let d = record.impairment(dimension);
            let mos = mos_value(d, 0.0, 4.5, 0.1, (0.0, 5.0), &mut rng);
            // Keep exactly what data.csv will hold.
            let written: f64 = format!("{mos:.9}").parse().unwrap_or(mos);
            record.mos.push((dimension, written));
        }
        Ok(record)
    })?;

    let mut csv =
        String::from("name,prompt,adj1,adj2,style,mos_quality,std_quality,mos_align,std_align\n");
    for (i, r) in records.iter().enumerate() {
        let (text, style) = prompt(i % prompts);
        csv.push_str(&csv_line([
            r.name.clone(),
            text,
            String::new(),
            String::new(),
            format!("{style} style"),
            format!("{:.9}", r.mos_of("quality").unwrap_or(0.0)),
            "0.1".into(),
            format!("{:.9}", r.mos_of("alignment").unwrap_or(0.0)),
            "0.1".into(),
        ]));
    }
    write_text(&dir.join("data.csv"), &csv)?;
    write_ground_truth(dir, &records)?;
    write_text(
        &dir.join("README.txt"),
        &readme("AGIQA-3K", options, width, height),
    )?;
    Ok(SynthSummary {
        dir: dir.to_path_buf(),
        image_size: (width, height),
        prompts,
        records,
    })
}

/// Writes an AIGCIQA2023-like dataset into `dir`: `DATA/MOS/mosz1.mat` (quality), `mosz2.mat`
/// (authenticity), `mosz3.mat` (correspondence), each a compressed Level 5 MAT-file with a
/// `1 × images` double `MOSz` on the 0–100 scale, and `Image/allimg/{i}.png`.
pub fn write_aigciqa2023_like(
    dir: &Path,
    options: &SynthOptions,
) -> Result<SynthSummary, DataError> {
    let mos_dir = dir.join("DATA").join("MOS");
    create_dir(&mos_dir)?;
    create_dir(&dir.join("Image").join("allimg"))?;
    let (width, height) = image_size(options);
    let dimensions: Vec<&'static str> = aigciqa2023::DIMENSIONS.iter().map(|d| d.0).collect();
    let scenes = reference_scenes(options.seed, width, height);
    let records = parallel(options.images, |i| {
        let Draw {
            distortions,
            mut rng,
        } = draw(options.seed, i, &options.kinds);
        let image = render(&scenes[i % REFERENCE_SCENES], &distortions, rng.next_u64());
        let path = aigciqa2023::image_path(dir, i);
        let file = std::fs::File::create(&path).map_err(|e| write_err(&path, e))?;
        let encoder = image::codecs::png::PngEncoder::new_with_quality(
            std::io::BufWriter::new(file),
            image::codecs::png::CompressionType::Fast,
            image::codecs::png::FilterType::Adaptive,
        );
        image
            .write_with_encoder(encoder)
            .map_err(|e| write_err(&path, e))?;
        let mut record = SynthRecord {
            name: i.to_string(),
            prompt: None,
            distortions,
            mos: Vec::new(),
        };
        for &dimension in &dimensions {
            let d = record.impairment(dimension);
            record.mos.push((
                dimension,
                mos_value(d, 25.0, 50.0, 2.0, aigciqa2023::SCALE, &mut rng),
            ));
        }
        Ok(record)
    })?;
    for (dimension, file) in aigciqa2023::DIMENSIONS {
        let values: Vec<f64> = records
            .iter()
            .map(|r| r.mos_of(dimension).unwrap_or(0.0))
            .collect();
        let variable = MatVariable {
            name: aigciqa2023::MOS_VARIABLE.to_string(),
            dims: vec![1, values.len()],
            class: "double",
            values,
        };
        write_mat_file(&mos_dir.join(file), &[variable], true)?;
    }
    write_ground_truth(dir, &records)?;
    write_text(
        &dir.join("README.txt"),
        &readme("AIGCIQA2023", options, width, height),
    )?;
    Ok(SynthSummary {
        dir: dir.to_path_buf(),
        image_size: (width, height),
        prompts: 0,
        records,
    })
}

/// `distortions.csv`: name, the distortions with severity and parameter, and every MOS.
fn write_ground_truth(dir: &Path, records: &[SynthRecord]) -> Result<(), DataError> {
    let dimensions: Vec<&str> = records
        .first()
        .map(|r| r.mos.iter().map(|m| m.0).collect())
        .unwrap_or_default();
    let mut csv =
        String::from("name,distortion,severity,parameter,distortion2,severity2,parameter2");
    for d in &dimensions {
        let _ = write!(csv, ",mos_{d}");
    }
    csv.push('\n');
    for r in records {
        let name = csv_line([&r.name]);
        csv.push_str(name.strip_suffix('\n').unwrap_or(&name));
        for k in 0..2 {
            match r.distortions.get(k) {
                Some(&(kind, s)) => {
                    let parameter = match distortion(kind, s) {
                        Distortion::Blur(v) | Distortion::Noise(v) | Distortion::ColourShift(v) => {
                            f64::from(v)
                        }
                        Distortion::Jpeg(q) => f64::from(q),
                    };
                    let _ = write!(csv, ",{kind},{s:.6},{parameter:.4}");
                }
                None => csv.push_str(",,,"),
            }
        }
        for m in &r.mos {
            let _ = write!(csv, ",{:.9}", m.1);
        }
        csv.push('\n');
    }
    write_text(&dir.join("distortions.csv"), &csv)
}

fn readme(format: &str, options: &SynthOptions, width: u32, height: u32) -> String {
    let scale = if format == "AGIQA-3K" {
        "MOS = clip(4.5 * (1 - d)^1.2 + N(0, 0.1^2), 0, 5)   (dimensions: quality, alignment)"
    } else {
        "MOS = clip(25 + 50 * (1 - d)^1.2 + N(0, 2^2), 0, 100)   (dimensions: quality, authenticity, correspondence)"
    };
    format!(
        "SYNTHETIC {format}-like dataset written by agiqa_trainer::data::synthetic_dataset (not real data).\n\
         images: {images}, {width}x{height} px, seed {seed}\n\
         \n\
         Each image is a procedural scene with a primary distortion (kind uniform over blur, noise,\n\
         jpeg, colour; severity s1 ~ U[0,1]) and, with probability 1/2, a secondary distortion of\n\
         another kind (s2 ~ U[0,0.3]). Parameters: blur sigma = 4*s px, noise sigma = 40*s levels,\n\
         JPEG quality = round(95 - 90*s), colour shift = 80*s levels (red up, blue down).\n\
         \n\
         Impairment per dimension: d = min(1, sum over distortions of w(dimension, kind) * s)\n\
         weights      blur  noise  jpeg  colour\n\
         quality      1.0   1.0    1.0   1.0\n\
         alignment /\n\
         correspondence 1.0 0.3    0.6   0.2\n\
         authenticity 0.3   0.8    0.3   1.0\n\
         \n\
         {scale}\n\
         \n\
         distortions.csv lists every image's distortions, severities, parameters and MOS.\n",
        images = options.images,
        seed = options.seed,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_are_deterministic_and_cover_every_kind() {
        let a: Vec<_> = (0..200).map(|i| draw(5, i, &KINDS).distortions).collect();
        let b: Vec<_> = (0..200).map(|i| draw(5, i, &KINDS).distortions).collect();
        assert_eq!(a, b);
        assert_ne!(
            a,
            (0..200)
                .map(|i| draw(6, i, &KINDS).distortions)
                .collect::<Vec<_>>()
        );
        for kind in KINDS {
            assert!(a.iter().filter(|d| d[0].0 == kind).count() > 25, "{kind}");
        }
        let seconds = a.iter().filter(|d| d.len() == 2).count();
        assert!((70..130).contains(&seconds), "{seconds}");
        assert!(a
            .iter()
            .all(|d| d.len() < 2 || (d[1].0 != d[0].0 && d[1].1 <= 0.3)));
    }

    #[test]
    fn severity_parameters_reach_the_documented_extremes() {
        assert_eq!(distortion("blur", 1.0), Distortion::Blur(4.0));
        assert_eq!(distortion("noise", 0.5), Distortion::Noise(20.0));
        assert_eq!(distortion("jpeg", 0.0), Distortion::Jpeg(95));
        assert_eq!(distortion("jpeg", 1.0), Distortion::Jpeg(5));
        assert_eq!(distortion("colour", 1.0), Distortion::ColourShift(80.0));
        assert_eq!(prompt(0).0, "a red car on a bridge, realistic style");
        assert_eq!(prompt(160).0, "a red car on a bridge #1, realistic style");
    }
}
