//! Replays the committed, minimised fuzz corpus (`corpus/<target>/`) through the same bodies the
//! fuzzers ran, so that a parser change that panics on any of those inputs fails CI.

use std::path::{Path, PathBuf};
use std::time::Instant;

use agiqa_fuzz::TARGETS;

/// Fewest corpus files each target must have: a corpus that shrank (lost, or never committed)
/// would make the replay pass while testing nothing. Set just under the minimised sizes
/// reported in tests/fuzz/README.md.
const MIN_CORPUS_FILES: &[(&str, usize)] = &[
    ("image", 450),
    ("torch_archive", 300),
    ("mat", 75),
    ("manifest", 240),
    ("metadata", 750),
    ("multipart", 420),
];

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target)
}

fn corpus_files(target: &str) -> Vec<PathBuf> {
    let dir = corpus_dir(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("a readable corpus entry").path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    files
}

#[test]
fn every_target_has_a_minimum_corpus() {
    for (target, _) in TARGETS {
        let min = MIN_CORPUS_FILES
            .iter()
            .find(|(name, _)| name == target)
            .map(|(_, min)| *min)
            .unwrap_or_else(|| panic!("no minimum corpus size for target `{target}`"));
        let found = corpus_files(target).len();
        assert!(
            found >= min,
            "corpus/{target} has {found} files, fewer than {min}: was the corpus lost?"
        );
    }
}

#[test]
fn corpus_replays_without_panics_and_reaches_accepted_inputs() {
    for (target, run) in TARGETS {
        let start = Instant::now();
        let files = corpus_files(target);
        let mut accepted = 0;
        for file in &files {
            let bytes = std::fs::read(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            let outcome = std::panic::catch_unwind(|| run(&bytes));
            match outcome {
                Ok(true) => accepted += 1,
                Ok(false) => {}
                Err(_) => panic!(
                    "{target}: {} panicked (see the message above)",
                    file.display()
                ),
            }
        }
        // Every parser's corpus must reach its success path, or the fuzzing never got deep.
        assert!(
            accepted > 0,
            "{target}: none of {} corpus inputs was accepted",
            files.len()
        );
        println!(
            "{target}: {} inputs, {accepted} accepted, {:.2} s",
            files.len(),
            start.elapsed().as_secs_f64()
        );
    }
}
