//! The up-front image check of a dataset load: every image exists and, optionally, decodes with
//! the serving decoder — in parallel on rayon's global pool (the trainer's worker pool, `agiqa_trainer::workers`).

use agiqa_runtime::preprocess::{decode_image_file, DecodeLimits};
use rayon::prelude::*;

use super::{Candidate, Sample};

/// Checks that each image exists and, with `decode`, that it decodes with the serving decoder;
/// each problem is added to its row.
pub(super) fn check_images(candidates: &mut [Candidate], decode: bool) {
    let limits = DecodeLimits::default();
    let check = |sample: &Sample| -> Option<String> {
        if !sample.path.is_file() {
            return Some(format!("image not found: {}", sample.path.display()));
        }
        if !decode {
            return None;
        }
        decode_image_file(&sample.path, &limits)
            .err()
            .map(|e| format!("unreadable image: {e}"))
    };
    candidates.par_iter_mut().for_each(|candidate| {
        if let Some(problem) = check(&candidate.sample) {
            candidate.problems.push(problem);
        }
    });
}
