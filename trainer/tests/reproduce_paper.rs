//! `scripts/reproduce-paper` end to end on its `--smoke` data (synthetic AGIQA-3K- and
//! AIGCIQA2023-like sets, a tiny random CLIP, 2 epochs): every row of the paper's Tables 1–3 is
//! printed with the paper's numbers exactly as in `scripts/clip-agiqa-paper-tables.tsv`, every
//! row we run has finite correlations, a rerun keeps the finished runs, and the real mode's
//! argument checks answer with a clear error.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("trainer/ sits in the workspace root")
        .to_path_buf()
}

/// The trainer binary, built fresh by cargo for this package's integration tests.
fn agiqa_train() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_agiqa-train"))
}

fn reproduce(bin: &Path, args: &[&str]) -> Output {
    Command::new("bash")
        .arg(workspace_root().join("scripts/reproduce-paper"))
        .args(args)
        .env("AGIQA_TRAIN", bin)
        .output()
        .expect("cannot run scripts/reproduce-paper")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// One row of the paper's tables as the TSV gives it, one cell per rated dimension.
struct PaperRow {
    table: String,
    no: String,
    method: String,
    setting: String,
    /// `(paper PLCC/SRCC/KRCC as printed, or None; our run, or None for "paper only")`.
    cells: Vec<(Option<[String; 3]>, Option<String>)>,
}

fn paper_rows() -> Vec<PaperRow> {
    let tsv = std::fs::read_to_string(workspace_root().join("scripts/clip-agiqa-paper-tables.tsv"))
        .expect("scripts/clip-agiqa-paper-tables.tsv");
    let mut rows: Vec<PaperRow> = Vec::new();
    for line in tsv.lines().filter(|l| !l.starts_with('#')).skip(1) {
        let f: Vec<&str> = line.split('\t').collect();
        assert_eq!(f.len(), 10, "malformed line {line:?}");
        let paper = (f[5] != "-").then(|| [f[5].into(), f[6].into(), f[7].into()]);
        let run = (f[8] != "-").then(|| f[8].to_string());
        match rows.last_mut() {
            Some(r) if (&*r.table, &*r.no, &*r.method, &*r.setting) == (f[0], f[1], f[2], f[3]) => {
                r.cells.push((paper, run))
            }
            _ => rows.push(PaperRow {
                table: f[0].into(),
                no: f[1].into(),
                method: f[2].into(),
                setting: f[3].into(),
                cells: vec![(paper, run)],
            }),
        }
    }
    rows
}

/// Correlation-shaped tokens of a printed row ("0.8978", "-0.0715", "nan"); labels such as
/// "ViT-B/16, 16, 6 adjectives" or "[24]" give none.
fn numbers(line: &str) -> Vec<&str> {
    line.split_whitespace()
        .filter(|t| {
            *t == "nan"
                || (t.parse::<f64>().is_ok()
                    && t.split_once('.').is_some_and(|(_, d)| d.len() == 4))
        })
        .collect()
}

const TITLES: [(&str, &str); 4] = [
    ("table1", "Table 1: "),
    ("table2", "Table 2: "),
    ("table3", "Table 3: "),
    ("extra", "Beyond the paper: "),
];

/// The printed rows of one table: the lines after its title and column headers (the last of
/// which starts with "Methods" or "No."), up to the blank line that ends it.
fn table_lines<'a>(stdout: &'a str, title: &str) -> Vec<&'a str> {
    let lines: Vec<&str> = stdout.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.starts_with(title))
        .unwrap_or_else(|| panic!("no table {title:?} in the output:\n{stdout}"));
    let header = lines[start..]
        .iter()
        .position(|l| l.starts_with("Methods ") || l.starts_with("No. "))
        .unwrap_or_else(|| panic!("no column header under {title:?}"));
    lines[start + header + 1..]
        .iter()
        .take_while(|l| !l.trim().is_empty())
        .copied()
        .collect()
}

fn check_tables(stdout: &str) {
    let rows = paper_rows();
    assert_eq!(rows.len(), 8 + 8 + 1 + 8, "rows of Tables 1, 2, extra, 3");
    for (table, title) in TITLES {
        let expected: Vec<&PaperRow> = rows.iter().filter(|r| r.table == table).collect();
        let printed = table_lines(stdout, title);
        assert_eq!(
            printed.len(),
            expected.len(),
            "rows of {title}:\n{printed:#?}"
        );
        for (row, line) in expected.iter().zip(&printed) {
            if table == "table3" {
                assert!(
                    line.starts_with(&row.no)
                        && line.contains(&row.method)
                        && line.contains(&row.setting),
                    "{title} row {:?} {:?} printed as {line:?}",
                    row.method,
                    row.setting
                );
            } else {
                assert!(line.starts_with(&row.method), "{title}: {line:?}");
            }
            let mut tokens = numbers(line).into_iter();
            for (paper, run) in &row.cells {
                if let Some(paper) = paper {
                    for want in paper {
                        assert_eq!(
                            tokens.next(),
                            Some(want.as_str()),
                            "paper's number in {line:?}"
                        );
                    }
                }
                match run {
                    Some(run) => {
                        for _ in 0..3 {
                            let v: f64 = tokens
                                .next()
                                .unwrap_or_else(|| panic!("run {run}: no number in {line:?}"))
                                .parse()
                                .unwrap_or(f64::NAN);
                            assert!(
                                v.is_finite() && (-1.0..=1.0).contains(&v),
                                "run {run}: {v} in {line:?}"
                            );
                        }
                    }
                    None => assert!(line.contains("paper only"), "{line:?}"),
                }
            }
            assert_eq!(tokens.next(), None, "extra numbers in {line:?}");
        }
    }
}

fn check_results_json(out: &Path) {
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("results.json")).expect("results.json"))
            .expect("results.json parses");
    assert_eq!(json["smoke"], true);
    assert_eq!(json["protocol"]["name"], "paper");
    let mut ours = 0;
    for table in json["tables"].as_array().expect("tables") {
        for row in table["rows"].as_array().expect("rows") {
            for (dimension, cell) in row["cells"].as_object().expect("cells") {
                if cell["run"].is_null() {
                    assert_eq!(cell["status"], "paper only");
                    continue;
                }
                assert_eq!(cell["status"], "done", "{dimension}: {cell}");
                for metric in ["plcc", "srcc", "krcc"] {
                    let v = cell["ours"][metric].as_f64().unwrap_or(f64::NAN);
                    assert!(v.is_finite(), "{} {metric}: {}", cell["run"], cell["ours"]);
                }
                assert!(cell["ours"]["selected_on"][0] == "test", "{cell}");
                ours += 1;
            }
        }
    }
    // 12 runs; the full model fills Table 1 and Table 3's row 0.
    assert_eq!(ours, 13);
    let md = std::fs::read_to_string(out.join("results.md")).expect("results.md");
    assert!(md.contains("| 5 | - (category type) | ViT-B/16, 16, 6 scores | 0.8958 |"));
}

#[test]
fn smoke_run_prints_every_row_and_keeps_finished_runs() {
    let bin = agiqa_train();
    let out = std::env::temp_dir().join(format!("agiqa-reproduce-paper-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let out_arg = out.to_str().expect("UTF-8 temp path");

    let started = Instant::now();
    let first = reproduce(&bin, &["--smoke", "--out", out_arg]);
    let first_secs = started.elapsed().as_secs_f64();
    let stdout = text(&first.stdout);
    assert!(
        first.status.success(),
        "reproduce-paper --smoke failed:\n{stdout}\n{}",
        text(&first.stderr)
    );
    eprintln!("smoke run: {first_secs:.1} s\n{stdout}");
    check_tables(&stdout);
    assert!(stdout.contains("SMOKE RUN"));
    assert!(
        stdout.contains("the best epoch chosen on the TEST set")
            && stdout.contains("OPTIMISTIC")
            && stdout.contains("best epoch selected on the TEST set (paper protocol, optimistic)"),
        "the protocol must be stated"
    );
    check_results_json(&out);
    let table_text = std::fs::read_to_string(out.join("results.txt")).expect("results.txt");

    // A rerun trains nothing and prints the same tables.
    let started = Instant::now();
    let again = reproduce(&bin, &["--smoke", "--out", out_arg]);
    let again_stdout = text(&again.stdout);
    assert!(
        again.status.success(),
        "{again_stdout}{}",
        text(&again.stderr)
    );
    eprintln!("rerun: {:.1} s", started.elapsed().as_secs_f64());
    assert_eq!(again_stdout.matches("kept (finished earlier)").count(), 12);
    assert!(!again_stdout.contains(" training"), "{again_stdout}");
    let table_again = std::fs::read_to_string(out.join("results.txt")).expect("results.txt");
    assert_eq!(table_text, table_again);

    // Other settings in the same folder are refused, not mixed in.
    let other = reproduce(&bin, &["--smoke", "--out", out_arg, "--epochs", "3"]);
    assert_eq!(other.status.code(), Some(2));
    assert!(text(&other.stderr).contains("made with other settings"));
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn real_mode_checks_its_arguments() {
    let dir = std::env::temp_dir().join(format!("agiqa-reproduce-args-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let agiqa3k = dir.join("AGIQA-3K");
    let aigc = dir.join("AIGCIQA2023");
    std::fs::create_dir_all(&agiqa3k).unwrap();
    std::fs::create_dir_all(aigc.join("DATA/MOS")).unwrap();
    std::fs::create_dir_all(aigc.join("Image/allimg")).unwrap();
    for f in [
        "DATA/MOS/mosz1.mat",
        "DATA/MOS/mosz2.mat",
        "DATA/MOS/mosz3.mat",
    ] {
        std::fs::write(aigc.join(f), b"").unwrap();
    }
    let clip = dir.join("ViT-B-16.pt");
    std::fs::write(&clip, b"").unwrap();
    let p = |p: &Path| p.to_str().unwrap().to_string();
    let run = |args: &[String]| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        // The argument checks come before anything needs the binary.
        reproduce(Path::new("/nonexistent/agiqa-train"), &args)
    };
    let base = |a3k: &Path| {
        vec![
            "--agiqa3k".into(),
            p(a3k),
            "--aigciqa2023".into(),
            p(&aigc),
            "--clip".into(),
            p(&clip),
            "--out".into(),
            p(&dir.join("out")),
        ]
    };

    let missing = run(&base(&dir.join("missing")));
    assert_eq!(missing.status.code(), Some(2));
    let err = text(&missing.stderr);
    assert!(
        err.contains("--agiqa3k") && err.contains("no such folder"),
        "{err}"
    );

    let no_csv = run(&base(&agiqa3k));
    assert_eq!(no_csv.status.code(), Some(2));
    assert!(text(&no_csv.stderr).contains("no data.csv"));

    std::fs::write(agiqa3k.join("data.csv"), b"").unwrap();
    let mut dry = base(&agiqa3k);
    dry.push("--dry-run".into());
    let planned = run(&dry);
    let stdout = text(&planned.stdout);
    assert!(
        planned.status.success(),
        "{stdout}{}",
        text(&planned.stderr)
    );
    assert!(stdout.contains(&format!(
        "agiqa-train train --clip {} --dataset agiqa3k:{} --dimension quality --variant zero-shot --protocol paper --epochs 100",
        p(&clip),
        p(&agiqa3k)
    )));
    assert!(stdout.contains("--dimension authenticity"));
    assert!(stdout.contains("needs --clip-vit-b32"));
    assert!(!dir.join("out").exists(), "a dry run writes nothing");

    let mut no_clip = base(&agiqa3k);
    no_clip[5] = p(&dir.join("missing.pt"));
    let err = text(&run(&no_clip).stderr);
    assert!(
        err.contains("--clip") && err.contains("no such file"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
