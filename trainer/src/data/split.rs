//! Train / validation / test splits and the protocols they follow.
//!
//! - [`reference_split`]: the CLIP-AGIQA authors' split (AGIQA-3K 2385 / 597, AIGCIQA2023
//!   1920 / 480), embedded from `trainer/assets/splits/`. It has no validation part: the
//!   reference code selects the best epoch on the test set, so its numbers are optimistic. It also
//!   puts images of one prompt on both sides (267 of AGIQA-3K's 300 prompts).
//! - [`random_split`] / [`repeated_splits`]: seeded random splits, by default 70 / 10 / 20, with
//!   model selection on the validation part; optionally grouped so that all images of a prompt
//!   land in the same part (no prompt leakage).
//! - [`manifest_split`]: the parts a manifest's `split` column assigns.

use std::collections::HashMap;

use super::{DataError, Dataset, SplitPart};
use crate::config::ProtocolConfig;
use crate::synthetic_images::SplitMix64;

/// The authors' AGIQA-3K split: `name,split` with `train`/`test`.
pub const AGIQA3K_REFERENCE_SPLIT_CSV: &str =
    include_str!("../../assets/splits/agiqa3k_reference_split.csv");
/// The authors' AIGCIQA2023 split with the real quality MOS: `index,mos,split`.
pub const AIGCIQA2023_REFERENCE_SPLIT_QUALITY_CSV: &str =
    include_str!("../../assets/splits/aigciqa2023_reference_split_quality.csv");
/// The same split with the real authenticity MOS: `index,mos,split`.
pub const AIGCIQA2023_REFERENCE_SPLIT_AUTHENTICITY_CSV: &str =
    include_str!("../../assets/splits/aigciqa2023_reference_split_authenticity.csv");

/// The honest default: 70 % train, 10 % validation (model selection), 20 % test.
pub const DEFAULT_FRACTIONS: (f64, f64, f64) = (0.7, 0.1, 0.2);

/// How a split was made.
#[derive(Clone, Debug, PartialEq)]
pub enum Protocol {
    /// The authors' split; no validation part, so model selection happens on the test set and
    /// the reported numbers are optimistic.
    PaperReference,
    /// A seeded random split with these (normalised) fractions.
    Random {
        train: f64,
        val: f64,
        test: f64,
        grouped_by_prompt: bool,
    },
    /// The parts given by a manifest's `split` column.
    Manifest,
}

/// Indices into [`Dataset::samples`], each part sorted ascending and disjoint from the others.
#[derive(Clone, Debug, PartialEq)]
pub struct Split {
    pub train: Vec<usize>,
    pub val: Vec<usize>,
    pub test: Vec<usize>,
    pub protocol: Protocol,
    /// The seed of a random split.
    pub seed: Option<u64>,
    /// One line for logs and result tables, e.g.
    /// `random 70/10/20 grouped by prompt, seed 3 (2087/298/597)`.
    pub label: String,
}

impl Split {
    /// `(train, val, test)` sizes.
    pub fn sizes(&self) -> (usize, usize, usize) {
        (self.train.len(), self.val.len(), self.test.len())
    }

    /// The part model selection should use: validation when there is one, else (reference
    /// protocol) the test part, as the authors did.
    pub fn selection(&self) -> &[usize] {
        if self.val.is_empty() {
            &self.test
        } else {
            &self.val
        }
    }
}

/// Parses an embedded `key,...,split` CSV into `key → part`. The files are checked by tests,
/// so a malformed line here is a build defect; it is skipped rather than panicking.
fn embedded_parts(csv: &str) -> HashMap<&str, SplitPart> {
    csv.lines()
        .skip(1)
        .filter_map(|line| {
            let key = line.split(',').next()?;
            let part = line.rsplit(',').next()?.trim().parse().ok()?;
            Some((key.trim(), part))
        })
        .collect()
}

/// The authors' split for AGIQA-3K (matched by image name) or AIGCIQA2023 (matched by image index;
/// the same split for every dimension). Samples dropped by `skip_bad` are simply absent; a sample
/// the split does not know is an error.
pub fn reference_split(dataset: &Dataset) -> Result<Split, DataError> {
    let (parts, title) = match dataset.name.as_str() {
        "agiqa3k" => (embedded_parts(AGIQA3K_REFERENCE_SPLIT_CSV), "AGIQA-3K"),
        "aigciqa2023" => (
            embedded_parts(AIGCIQA2023_REFERENCE_SPLIT_QUALITY_CSV),
            "AIGCIQA2023",
        ),
        other => {
            return Err(DataError::NoReferenceSplit {
                dataset: other.to_string(),
            })
        }
    };
    let assigned: Vec<Option<SplitPart>> = dataset
        .samples
        .iter()
        .map(|s| parts.get(s.name.as_str()).copied())
        .collect();
    let mut split = from_parts(&assigned, dataset, &format!("{title} reference split"))?;
    split.protocol = Protocol::PaperReference;
    split.label = format!(
        "paper reference split ({}/{} train/test, no validation: model selection on test is optimistic)",
        split.train.len(),
        split.test.len()
    );
    Ok(split)
}

/// The parts of a manifest's `split` column; every sample must have one.
pub fn manifest_split(dataset: &Dataset) -> Result<Split, DataError> {
    let assigned: Vec<Option<SplitPart>> = dataset.samples.iter().map(|s| s.split).collect();
    let mut split = from_parts(&assigned, dataset, "manifest `split` column")?;
    split.label = format!(
        "manifest split ({}/{}/{})",
        split.train.len(),
        split.val.len(),
        split.test.len()
    );
    Ok(split)
}

fn from_parts(
    assigned: &[Option<SplitPart>],
    dataset: &Dataset,
    what: &str,
) -> Result<Split, DataError> {
    let missing: Vec<String> = assigned
        .iter()
        .zip(&dataset.samples)
        .filter(|(p, _)| p.is_none())
        .map(|(_, s)| s.name.clone())
        .collect();
    if !missing.is_empty() {
        return Err(DataError::SplitMismatch {
            what: what.to_string(),
            missing,
        });
    }
    let pick = |want: SplitPart| -> Vec<usize> {
        (0..assigned.len())
            .filter(|&i| assigned[i] == Some(want))
            .collect()
    };
    Ok(Split {
        train: pick(SplitPart::Train),
        val: pick(SplitPart::Val),
        test: pick(SplitPart::Test),
        protocol: Protocol::Manifest,
        seed: None,
        label: String::new(),
    })
}

/// Normalised fractions: negative or non-finite entries count as 0; all-zero falls back to
/// [`DEFAULT_FRACTIONS`].
fn normalise(fractions: (f64, f64, f64)) -> (f64, f64, f64) {
    let clean = |f: f64| if f.is_finite() && f > 0.0 { f } else { 0.0 };
    let (a, b, c) = (clean(fractions.0), clean(fractions.1), clean(fractions.2));
    let sum = a + b + c;
    if sum <= 0.0 {
        DEFAULT_FRACTIONS
    } else {
        (a / sum, b / sum, c / sum)
    }
}

/// A seeded random split with `fractions` = (train, val, test) (normalised to sum to 1).
///
/// Part sizes are `round(n·test)` and `round(n·val)`, the rest train. With `grouped_by_prompt`,
/// the prompt groups (a sample without a prompt is its own group) are shuffled and each goes to
/// the part its midpoint falls in, so sizes are met within half a group per boundary and no
/// prompt appears in two parts. Deterministic for a seed on every platform.
pub fn random_split(
    dataset: &Dataset,
    fractions: (f64, f64, f64),
    grouped_by_prompt: bool,
    seed: u64,
) -> Split {
    let (f_train, f_val, f_test) = normalise(fractions);
    let n = dataset.samples.len();
    let n_test = (n as f64 * f_test).round() as usize;
    let n_val = ((n as f64 * f_val).round() as usize).min(n - n_test);

    // Groups in order of first appearance, so the result does not depend on hash order.
    let groups: Vec<Vec<usize>> = if grouped_by_prompt {
        let mut index: HashMap<&str, usize> = HashMap::new();
        let mut groups: Vec<Vec<usize>> = Vec::new();
        for (i, sample) in dataset.samples.iter().enumerate() {
            match sample.prompt.as_deref() {
                Some(prompt) => {
                    let g = *index.entry(prompt).or_insert_with(|| {
                        groups.push(Vec::new());
                        groups.len() - 1
                    });
                    groups[g].push(i);
                }
                None => groups.push(vec![i]),
            }
        }
        groups
    } else {
        (0..n).map(|i| vec![i]).collect()
    };
    let mut order: Vec<usize> = (0..groups.len()).collect();
    shuffle(&mut order, seed);

    let (mut train, mut val, mut test) = (Vec::new(), Vec::new(), Vec::new());
    let mut placed = 0usize;
    for g in order {
        let members = &groups[g];
        // Twice the midpoint, to stay in integers.
        let mid2 = 2 * placed + members.len();
        let part = if mid2 <= 2 * n_test && n_test > 0 {
            &mut test
        } else if mid2 <= 2 * (n_test + n_val) && n_val > 0 {
            &mut val
        } else {
            &mut train
        };
        part.extend_from_slice(members);
        placed += members.len();
    }
    for part in [&mut train, &mut val, &mut test] {
        part.sort_unstable();
    }
    let percent = |f: f64| (f * 100.0).round() as u32;
    let label = format!(
        "random {}/{}/{}{}, seed {seed} ({}/{}/{})",
        percent(f_train),
        percent(f_val),
        percent(f_test),
        if grouped_by_prompt {
            " grouped by prompt"
        } else {
            ""
        },
        train.len(),
        val.len(),
        test.len()
    );
    Split {
        train,
        val,
        test,
        protocol: Protocol::Random {
            train: f_train,
            val: f_val,
            test: f_test,
            grouped_by_prompt,
        },
        seed: Some(seed),
        label,
    }
}

/// Fisher–Yates with SplitMix64: the same permutation for a seed on every platform.
fn shuffle(items: &mut [usize], seed: u64) {
    let mut rng = SplitMix64::new(seed);
    for i in (1..items.len()).rev() {
        // Modulo bias is below 2^-40 for any realistic dataset size.
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        items.swap(i, j);
    }
}

/// `k` random splits with seeds `base_seed, base_seed + 1, ...`, for mean ± std over repeats.
pub fn repeated_splits(
    dataset: &Dataset,
    k: usize,
    fractions: (f64, f64, f64),
    grouped_by_prompt: bool,
    base_seed: u64,
) -> Vec<Split> {
    (0..k)
        .map(|i| {
            let mut split = random_split(
                dataset,
                fractions,
                grouped_by_prompt,
                base_seed.wrapping_add(i as u64),
            );
            split.label = format!("{} [repeat {}/{k}]", split.label, i + 1);
            split
        })
        .collect()
}

/// The splits a protocol asks for.
pub fn splits_for(
    dataset: &Dataset,
    protocol: &ProtocolConfig,
    seed: u64,
) -> Result<Vec<Split>, DataError> {
    Ok(match protocol {
        ProtocolConfig::Paper => vec![reference_split(dataset)?],
        ProtocolConfig::Manifest => vec![manifest_split(dataset)?],
        ProtocolConfig::Random {
            train,
            val,
            test,
            repeats,
            grouped_by_prompt,
        } => repeated_splits(
            dataset,
            *repeats,
            (*train, *val, *test),
            *grouped_by_prompt,
            seed,
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Sample;

    fn dataset(n: usize, prompts: usize) -> Dataset {
        Dataset {
            name: "manifest".into(),
            dimension: "quality".into(),
            scale: (0.0, 5.0),
            samples: (0..n)
                .map(|i| Sample {
                    path: format!("{i}.png").into(),
                    mos: 1.0,
                    prompt: (prompts > 0).then(|| format!("p{}", i % prompts.max(1))),
                    name: format!("{i}.png"),
                    split: None,
                })
                .collect(),
            root: ".".into(),
        }
    }

    #[test]
    fn embedded_reference_csvs_have_the_papers_sizes_and_agree() {
        let agiqa = embedded_parts(AGIQA3K_REFERENCE_SPLIT_CSV);
        let count = |m: &HashMap<&str, SplitPart>, p| m.values().filter(|&&v| v == p).count();
        assert_eq!(
            (
                count(&agiqa, SplitPart::Train),
                count(&agiqa, SplitPart::Test)
            ),
            (2385, 597)
        );
        let quality = embedded_parts(AIGCIQA2023_REFERENCE_SPLIT_QUALITY_CSV);
        let authenticity = embedded_parts(AIGCIQA2023_REFERENCE_SPLIT_AUTHENTICITY_CSV);
        assert_eq!(
            (
                count(&quality, SplitPart::Train),
                count(&quality, SplitPart::Test)
            ),
            (1920, 480)
        );
        assert_eq!(quality, authenticity);
    }

    #[test]
    fn ungrouped_sizes_are_exact_and_parts_cover_everything_once() {
        let ds = dataset(1000, 0);
        let s = random_split(&ds, DEFAULT_FRACTIONS, false, 1);
        assert_eq!(s.sizes(), (700, 100, 200));
        let mut all: Vec<usize> = s
            .train
            .iter()
            .chain(&s.val)
            .chain(&s.test)
            .copied()
            .collect();
        all.sort_unstable();
        assert_eq!(all, (0..1000).collect::<Vec<_>>());
        assert_eq!(s.label, "random 70/10/20, seed 1 (700/100/200)");
        // Unnormalised fractions are normalised.
        assert_eq!(random_split(&ds, (7.0, 1.0, 2.0), false, 1), s);
        assert_eq!(
            random_split(&ds, (0.8, 0.0, 0.2), false, 1).sizes(),
            (800, 0, 200)
        );
    }
}
