//! The embedded CLIP tokenizer against the reference tokenizer (open_clip / OpenAI `clip`), on
//! the strings in tests/fixtures/tokenizer/ids.json (written by scripts/make-fixtures).

use std::path::Path;

use agiqa_trainer::tokenizer::{ClipTokenizer, CONTEXT_LENGTH};
use serde::Deserialize;

#[derive(Deserialize)]
struct Case {
    text: String,
    ids: Vec<i64>,
}

fn cases() -> Vec<Case> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tokenizer/ids.json");
    let raw = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&raw).expect("ids.json is a list of {text, ids}")
}

fn check(tokenizer: &ClipTokenizer) {
    let cases = cases();
    assert!(
        cases.len() >= 20,
        "expected the full string set, found {}",
        cases.len()
    );
    let mut mismatches = Vec::new();
    for case in &cases {
        assert_eq!(case.ids.len(), CONTEXT_LENGTH);
        let ours = tokenizer.encode(&case.text).unwrap();
        if ours != case.ids {
            mismatches.push(format!(
                "{:?}\n  ours: {:?}\n  ref:  {:?}",
                case.text, ours, case.ids
            ));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of {} differ:\n{}",
        mismatches.len(),
        cases.len(),
        mismatches.join("\n")
    );
}

#[test]
fn embedded_tokenizer_matches_reference_ids() {
    check(&ClipTokenizer::embedded().unwrap());
}

/// The same vocabulary loaded as a plain Hugging Face tokenizer.json file gives the same ids.
#[test]
fn tokenizer_json_file_matches_reference_ids() {
    let gz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../trainer/assets/clip-tokenizer.json.gz");
    let dir = std::env::temp_dir().join(format!("agiqa-tokenizer-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut json = Vec::new();
    std::io::Read::read_to_end(
        &mut flate2::read::GzDecoder::new(std::fs::File::open(&gz).unwrap()),
        &mut json,
    )
    .unwrap();
    std::fs::write(dir.join("tokenizer.json"), json).unwrap();
    check(&ClipTokenizer::from_file(&dir).unwrap());
    std::fs::remove_dir_all(&dir).ok();
}
