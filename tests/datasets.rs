//! Datasets on their real formats: the real AGIQA-3K `data.csv` (with generated stand-in images,
//! since the real ones cannot be downloaded here), AIGCIQA2023 MAT-files holding the real MOS,
//! scipy-written MAT-files, manifests, the paper's reference splits, random splits and the
//! synthetic generators.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Instant;

use agiqa_runtime::metrics::spearman;
use agiqa_trainer::data::mat::{read_mat_file, write_mat_file, MatError, MatVariable};
use agiqa_trainer::data::split::{
    manifest_split, random_split, reference_split, repeated_splits,
    AIGCIQA2023_REFERENCE_SPLIT_AUTHENTICITY_CSV, AIGCIQA2023_REFERENCE_SPLIT_QUALITY_CSV,
    DEFAULT_FRACTIONS,
};
use agiqa_trainer::data::synthetic_dataset::{
    write_agiqa3k_like, write_aigciqa2023_like, SynthOptions,
};
use agiqa_trainer::data::{
    load_dataset, DataError, Dataset, DatasetSpec, LoadOptions, Protocol, Split,
};

const REAL_ROWS: usize = 2982;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

fn real_data_csv() -> PathBuf {
    fixtures().join("datasets").join("agiqa3k_data.csv")
}

/// A fresh, empty folder for one test.
fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("agiqa-datasets-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn tiny_jpeg() -> Vec<u8> {
    let image = image::RgbImage::from_fn(8, 8, |x, y| {
        image::Rgb([(x * 30) as u8, (y * 30) as u8, 90])
    });
    let mut bytes = Vec::new();
    image
        .write_with_encoder(image::codecs::jpeg::JpegEncoder::new_with_quality(
            &mut bytes, 90,
        ))
        .unwrap();
    bytes
}

fn tiny_png() -> Vec<u8> {
    let mut bytes = Vec::new();
    image::RgbImage::from_pixel(8, 6, image::Rgb([10, 200, 30]))
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .unwrap();
    bytes
}

/// The real data.csv with an 8x8 JPEG under every real name.
fn make_real_agiqa3k(dir: &Path) {
    std::fs::copy(real_data_csv(), dir.join("data.csv")).unwrap();
    let jpeg = tiny_jpeg();
    let text = std::fs::read_to_string(real_data_csv()).unwrap();
    for line in text.lines().skip(1) {
        let name = line.split(',').next().unwrap();
        std::fs::write(dir.join(name), &jpeg).unwrap();
    }
}

/// The real AGIQA-3K (quality) loaded once with full image checks; shared by the split tests.
fn real_agiqa3k() -> &'static Dataset {
    static DATASET: OnceLock<Dataset> = OnceLock::new();
    DATASET.get_or_init(|| {
        let dir = temp_dir("real-agiqa3k");
        make_real_agiqa3k(&dir);
        let start = Instant::now();
        let (dataset, report) =
            load_dataset(&DatasetSpec::Agiqa3k(dir.clone()), &LoadOptions::default()).unwrap();
        eprintln!(
            "loaded and decoded {} AGIQA-3K rows in {:.2?}",
            dataset.samples.len(),
            start.elapsed()
        );
        assert!(report.skipped.is_empty());
        dataset
    })
}

fn assert_partition(split: &Split, n: usize) {
    let mut all: Vec<usize> = split
        .train
        .iter()
        .chain(&split.val)
        .chain(&split.test)
        .copied()
        .collect();
    all.sort_unstable();
    assert_eq!(all, (0..n).collect::<Vec<_>>(), "{}", split.label);
}

#[test]
fn real_agiqa3k_data_csv_loads_with_both_dimensions() {
    let dataset = real_agiqa3k();
    assert_eq!(
        (dataset.name.as_str(), dataset.dimension.as_str()),
        ("agiqa3k", "quality")
    );
    assert_eq!(dataset.scale, (0.0, 5.0));
    assert_eq!(dataset.samples.len(), REAL_ROWS);
    let mos = dataset.mos();
    let (lo, hi) = mos
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &m| (a.min(m), b.max(m)));
    assert_eq!((lo, hi), (0.0, 4.488740784));
    let mean = mos.iter().sum::<f64>() / mos.len() as f64;
    assert!((mean - 2.50).abs() < 0.01, "mean {mean}");
    let first = &dataset.samples[0];
    assert_eq!(first.name, "AttnGAN_normal_000.jpg");
    assert_eq!(first.mos, 0.965602553);
    assert_eq!(first.prompt.as_deref(), Some("statue of a man"));
    assert_eq!(
        dataset.samples[60].prompt.as_deref(),
        Some("artwork with only triangles, anime style")
    );
    let prompts: HashSet<_> = dataset.samples.iter().map(|s| s.prompt.clone()).collect();
    assert_eq!(prompts.len(), 300);

    let options = LoadOptions {
        dimension: Some("alignment".into()),
        check_images: false,
        ..LoadOptions::default()
    };
    let (aligned, _) = load_dataset(&DatasetSpec::Agiqa3k(dataset.root.clone()), &options).unwrap();
    assert_eq!(aligned.dimension, "alignment");
    assert_eq!(aligned.samples[0].mos, 0.40889324);
    let options = LoadOptions {
        dimension: Some("authenticity".into()),
        ..LoadOptions::default()
    };
    let err = load_dataset(&DatasetSpec::Agiqa3k(dataset.root.clone()), &options)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`authenticity`") && err.contains("valid dimensions: quality, alignment"),
        "{err}"
    );
}

#[test]
fn agiqa3k_reference_split_reproduces_2385_597_from_the_real_data_csv() {
    let dataset = real_agiqa3k();
    let split = reference_split(dataset).unwrap();
    assert_eq!(split.sizes(), (2385, 0, 597));
    assert_eq!(split.protocol, Protocol::PaperReference);
    assert!(split.label.contains("optimistic"), "{}", split.label);
    assert_partition(&split, REAL_ROWS);
    // First two rows of the embedded CSV: AttnGAN_normal_000 test, _001 train.
    assert!(split.test.contains(&0) && split.train.contains(&1));
    assert_eq!(split.selection(), &split.test[..]);
}

#[test]
fn grouped_random_splits_never_share_a_prompt_and_respect_fractions() {
    let dataset = real_agiqa3k();
    let prompt_of = |i: &usize| dataset.samples[*i].prompt.clone().unwrap();
    for seed in 0..5 {
        let split = random_split(dataset, DEFAULT_FRACTIONS, true, seed);
        assert_partition(&split, REAL_ROWS);
        let parts: Vec<HashSet<String>> = [&split.train, &split.val, &split.test]
            .iter()
            .map(|p| p.iter().map(prompt_of).collect())
            .collect();
        assert!(
            parts[0].is_disjoint(&parts[1])
                && parts[0].is_disjoint(&parts[2])
                && parts[1].is_disjoint(&parts[2])
        );
        // Within half a prompt group (<= 10 images) of the target at each boundary.
        let (train, val, test) = split.sizes();
        assert!((test as i64 - 596).abs() <= 10, "{}", split.label);
        assert!((val as i64 - 298).abs() <= 15, "{}", split.label);
        assert_eq!(train + val + test, REAL_ROWS);
        assert!(split.label.contains("grouped by prompt"), "{}", split.label);
    }
    // Ungrouped: exact sizes, and prompts do leak (the point of grouping).
    let split = random_split(dataset, DEFAULT_FRACTIONS, false, 0);
    assert_eq!(split.sizes(), (2088, 298, 596));
    let train: HashSet<String> = split.train.iter().map(prompt_of).collect();
    assert!(split.test.iter().map(prompt_of).any(|p| train.contains(&p)));
}

#[test]
fn same_seed_same_split_different_seeds_differ() {
    let dataset = real_agiqa3k();
    for grouped in [false, true] {
        let a = random_split(dataset, (0.6, 0.2, 0.2), grouped, 11);
        assert_eq!(a, random_split(dataset, (0.6, 0.2, 0.2), grouped, 11));
        let b = random_split(dataset, (0.6, 0.2, 0.2), grouped, 12);
        assert_ne!(a.test, b.test);
        assert_eq!(a.seed, Some(11));
    }
    let repeats = repeated_splits(dataset, 3, DEFAULT_FRACTIONS, true, 100);
    assert_eq!(repeats.len(), 3);
    assert_eq!(repeats[1], {
        let mut s = random_split(dataset, DEFAULT_FRACTIONS, true, 101);
        s.label = format!("{} [repeat 2/3]", s.label);
        s
    });
    assert_ne!(repeats[0].test, repeats[2].test);
}

#[test]
fn bad_agiqa3k_rows_are_all_listed_in_one_error_or_skipped() {
    let dir = temp_dir("bad-agiqa3k");
    make_real_agiqa3k(&dir);
    let text = std::fs::read_to_string(real_data_csv()).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    // File line numbers are index + 1 (the header is line 1).
    let name_at =
        |lines: &[String], line: usize| lines[line - 1].split(',').next().unwrap().to_string();
    std::fs::remove_file(dir.join(name_at(&lines, 5))).unwrap();
    std::fs::write(
        dir.join(name_at(&lines, 9)),
        b"\xff\xd8\xff\xe0 truncated jpeg",
    )
    .unwrap();
    let set_quality = |line: &mut String, value: &str| {
        let mut fields: Vec<&str> = line.split(',').collect();
        fields[5] = value;
        *line = fields.join(",");
    };
    set_quality(&mut lines[19], "NaN"); // line 20
    set_quality(&mut lines[29], ""); // line 30
    set_quality(&mut lines[39], "5.5"); // line 40
    set_quality(&mut lines[49], "good"); // line 50
    lines.push(lines[2].clone()); // line 2984 duplicates line 3
    std::fs::write(dir.join("data.csv"), lines.join("\n") + "\n").unwrap();

    let spec = DatasetSpec::Agiqa3k(dir.clone());
    let err = load_dataset(&spec, &LoadOptions::default()).unwrap_err();
    let DataError::InvalidRows { file, rows } = &err else {
        panic!("expected InvalidRows, got {err}");
    };
    assert_eq!(file, &dir.join("data.csv"));
    let listed: Vec<usize> = rows.iter().map(|r| r.row).collect();
    assert_eq!(listed, vec![5, 9, 20, 30, 40, 50, 2984]);
    let message = err.to_string();
    for expected in [
        "7 invalid row(s)",
        "row 5 (AttnGAN_normal_003.jpg): image not found",
        "row 9 (AttnGAN_normal_007.jpg): unreadable image",
        "row 20 (AttnGAN_normal_018.jpg): mos_quality is NaN",
        "row 30 (AttnGAN_normal_028.jpg): empty mos_quality",
        "row 40 (AttnGAN_normal_038.jpg): score 5.5 outside the scale 0–5",
        "row 50 (AttnGAN_normal_048.jpg): mos_quality `good` is not a number",
        "row 2984 (AttnGAN_normal_001.jpg): duplicate id, first seen in row 3",
        "skip_bad",
    ] {
        assert!(
            message.contains(expected),
            "missing `{expected}` in:\n{message}"
        );
    }

    // Without decoding, the corrupt image passes; the missing one still fails.
    let options = LoadOptions {
        check_images: false,
        skip_bad: true,
        ..LoadOptions::default()
    };
    let (dataset, report) = load_dataset(&spec, &options).unwrap();
    assert_eq!(
        report.skipped.iter().map(|r| r.row).collect::<Vec<_>>(),
        vec![5, 20, 30, 40, 50, 2984]
    );
    assert_eq!(dataset.samples.len(), REAL_ROWS - 5);

    let options = LoadOptions {
        skip_bad: true,
        ..LoadOptions::default()
    };
    let (dataset, report) = load_dataset(&spec, &options).unwrap();
    assert_eq!(report.skipped.len(), 7);
    assert_eq!(dataset.samples.len(), REAL_ROWS - 6);
    assert!(dataset
        .samples
        .iter()
        .all(|s| s.mos.is_finite() && s.name != "AttnGAN_normal_007.jpg"));
    // The reference split still applies to what is left.
    let split = reference_split(&dataset).unwrap();
    assert_eq!(split.train.len() + split.test.len(), REAL_ROWS - 6);

    // A missing column is named, with the columns found.
    let without: Vec<String> = text
        .lines()
        .map(|l| l.replace(",mos_quality,", ",quality_score,"))
        .collect();
    std::fs::write(dir.join("data.csv"), without.join("\n")).unwrap();
    let err = load_dataset(&spec, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("missing column(s) mos_quality") && err.contains("quality_score"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

fn embedded_mos(csv: &str) -> (Vec<f64>, Vec<String>) {
    csv.lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f[1].parse::<f64>().unwrap(), f[2].to_string())
        })
        .unzip()
}

#[test]
fn aigciqa2023_real_mos_round_trip_through_our_mat_writer() {
    let dir = temp_dir("aigciqa2023");
    let (quality, parts) = embedded_mos(AIGCIQA2023_REFERENCE_SPLIT_QUALITY_CSV);
    let (authenticity, _) = embedded_mos(AIGCIQA2023_REFERENCE_SPLIT_AUTHENTICITY_CSV);
    assert_eq!(quality.len(), 2400);
    let correspondence: Vec<f64> = quality.iter().rev().copied().collect();
    let mos_dir = dir.join("DATA/MOS");
    std::fs::create_dir_all(&mos_dir).unwrap();
    std::fs::create_dir_all(dir.join("Image/allimg")).unwrap();
    let variable = |values: &[f64], dims: Vec<usize>| MatVariable {
        name: "MOSz".into(),
        dims,
        class: "double",
        values: values.to_vec(),
    };
    write_mat_file(
        &mos_dir.join("mosz1.mat"),
        &[variable(&quality, vec![1, 2400])],
        true,
    )
    .unwrap();
    write_mat_file(
        &mos_dir.join("mosz2.mat"),
        &[variable(&authenticity, vec![2400, 1])],
        false,
    )
    .unwrap();
    write_mat_file(
        &mos_dir.join("mosz3.mat"),
        &[variable(&correspondence, vec![2400, 1])],
        true,
    )
    .unwrap();
    let png = tiny_png();
    for i in 0..2400 {
        std::fs::write(dir.join(format!("Image/allimg/{i}.png")), &png).unwrap();
    }
    let spec: DatasetSpec = format!("aigciqa2023:{}", dir.display()).parse().unwrap();
    for (dimension, expected) in [
        (None, &quality),
        (Some("authenticity"), &authenticity),
        (Some("correspondence"), &correspondence),
    ] {
        let options = LoadOptions {
            dimension: dimension.map(str::to_string),
            ..LoadOptions::default()
        };
        let (dataset, report) = load_dataset(&spec, &options).unwrap();
        assert!(report.skipped.is_empty());
        assert_eq!(dataset.dimension, dimension.unwrap_or("quality"));
        assert_eq!(dataset.scale, (0.0, 100.0));
        assert_eq!(
            &dataset.mos(),
            expected,
            "{dimension:?}: values must be bit-exact"
        );
        assert_eq!(dataset.samples[17].path, dir.join("Image/allimg/17.png"));
        assert_eq!(dataset.samples[17].name, "17");
        let split = reference_split(&dataset).unwrap();
        assert_eq!(split.sizes(), (1920, 0, 480));
        for &i in &split.test {
            assert_eq!(parts[i], "test");
        }
    }
    let err = load_dataset(
        &spec,
        &LoadOptions {
            dimension: Some("quallity".into()),
            ..LoadOptions::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("quality, authenticity, correspondence"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn scipy_written_mat_files_are_read_exactly() {
    let dir = fixtures().join("mat");
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let (quality, _) = embedded_mos(AIGCIQA2023_REFERENCE_SPLIT_QUALITY_CSV);
    let (authenticity, _) = embedded_mos(AIGCIQA2023_REFERENCE_SPLIT_AUTHENTICITY_CSV);
    let files = expected["files"].as_object().unwrap();
    assert_eq!(files.len(), 5);
    for (name, spec) in files {
        let path = dir.join(name);
        if spec.get("error").is_some() {
            let err = read_mat_file(&path).unwrap_err();
            assert!(matches!(err, MatError::V73 { .. }), "{name}: {err}");
            let message = DataError::from(err).to_string();
            assert!(
                message.contains(name) && message.contains("re-save"),
                "{message}"
            );
            continue;
        }
        let file = read_mat_file(&path).unwrap_or_else(|e| panic!("{e}"));
        let variables = spec["variables"].as_object().unwrap();
        assert_eq!(file.variables.len(), variables.len(), "{name}");
        for (var, want) in variables {
            let got = file.get(var).unwrap();
            assert_eq!(got.class, want["class"].as_str().unwrap(), "{name}/{var}");
            let dims: Vec<usize> = want["dims"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            assert_eq!(got.dims, dims, "{name}/{var}");
            let values: Vec<f64> = match want.get("values") {
                Some(v) => v
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap())
                    .collect(),
                None if want["values_from"]["csv"]
                    .as_str()
                    .unwrap()
                    .contains("quality") =>
                {
                    quality.clone()
                }
                None => authenticity.clone(),
            };
            assert_eq!(got.values, values, "{name}/{var}");
        }
        let unsupported: Vec<&str> = spec["unsupported"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(
            file.unsupported
                .iter()
                .map(|u| u.0.as_str())
                .collect::<Vec<_>>(),
            unsupported,
            "{name}"
        );
        for var in unsupported {
            let err = file.get(var).unwrap_err().to_string();
            assert!(
                err.contains(name) && err.contains(var) && err.contains("char"),
                "{err}"
            );
        }
    }
}

#[test]
fn manifests_in_csv_and_jsonl_load_with_relative_paths_and_splits() {
    let dir = temp_dir("manifest");
    std::fs::create_dir_all(dir.join("img")).unwrap();
    let png = tiny_png();
    for i in 0..10 {
        std::fs::write(dir.join(format!("img/{i}.png")), &png).unwrap();
    }
    let mut csv = String::from("# scale: 1,5\npath,mos,split,prompt\n");
    let parts = [
        "train", "train", "train", "train", "train", "train", "val", "val", "test", "test",
    ];
    for (i, part) in parts.iter().enumerate() {
        csv.push_str(&format!(
            "img/{i}.png,{},{part},\"p{}, style\"\n",
            1.0 + i as f64 * 0.4,
            i / 2
        ));
    }
    std::fs::write(dir.join("m.csv"), &csv).unwrap();
    let mut jsonl = String::new();
    for (i, part) in parts.iter().enumerate() {
        jsonl.push_str(&format!(
            "{{\"path\": \"img/{i}.png\", \"score\": {}, \"split\": \"{part}\"}}\n",
            1.0 + i as f64 * 0.4
        ));
    }
    std::fs::write(dir.join("m.jsonl"), &jsonl).unwrap();

    for file in ["m.csv", "m.jsonl"] {
        let spec: DatasetSpec = dir.join(file).display().to_string().parse().unwrap();
        let (dataset, _) = load_dataset(&spec, &LoadOptions::default()).unwrap();
        assert_eq!(
            (dataset.name.as_str(), dataset.dimension.as_str()),
            ("manifest", "quality")
        );
        assert_eq!(dataset.samples.len(), 10, "{file}");
        assert_eq!(dataset.samples[3].path, dir.join("img/3.png"));
        assert_eq!(dataset.samples[3].name, "img/3.png");
        assert!((dataset.samples[9].mos - 4.6).abs() < 1e-12);
        // Declared in the CSV; observed for the JSONL.
        let scale = if file == "m.csv" {
            (1.0, 5.0)
        } else {
            (1.0, 1.0 + 9.0 * 0.4)
        };
        assert!(
            (dataset.scale.0 - scale.0).abs() < 1e-12 && (dataset.scale.1 - scale.1).abs() < 1e-12,
            "{file}: {:?}",
            dataset.scale
        );
        let split = manifest_split(&dataset).unwrap();
        assert_eq!(split.sizes(), (6, 2, 2));
        assert_eq!(split.protocol, Protocol::Manifest);
        assert_eq!(split.test, vec![8, 9]);
        let err = reference_split(&dataset).unwrap_err().to_string();
        assert!(err.contains("no reference split"), "{err}");
    }
    let (csv_dataset, _) = load_dataset(
        &DatasetSpec::Manifest(dir.join("m.csv")),
        &LoadOptions::default(),
    )
    .unwrap();
    assert_eq!(csv_dataset.samples[2].prompt.as_deref(), Some("p1, style"));
    let grouped = random_split(&csv_dataset, (0.6, 0.2, 0.2), true, 3);
    let pair_of = |i: &usize| i / 2;
    let test_pairs: HashSet<usize> = grouped.test.iter().map(pair_of).collect();
    assert!(grouped
        .train
        .iter()
        .all(|i| !test_pairs.contains(&pair_of(i))));

    // Every bad JSONL line at once; then skipped.
    let bad = "{\"path\": \"img/0.png\", \"score\": 2}\n\
               {\"path\": \"img/1.png\"}\n\
               not json\n\
               {\"path\": \"img/missing.png\", \"score\": 3}\n\
               {\"path\": \"img/2.png\", \"score\": 2, \"split\": \"dev\"}\n\
               {\"path\": \"img/3.png\", \"score\": null}\n";
    std::fs::write(dir.join("bad.jsonl"), bad).unwrap();
    let spec = DatasetSpec::Manifest(dir.join("bad.jsonl"));
    let err = load_dataset(&spec, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    for expected in [
        "5 invalid row(s)",
        "row 2 (img/1.png): no `score` (or `mos`)",
        "row 3: invalid JSON",
        "row 4 (img/missing.png): image not found",
        "row 5 (img/2.png): split `dev` is not one of train, val, test",
        "row 6 (img/3.png): empty score",
    ] {
        assert!(err.contains(expected), "missing `{expected}` in:\n{err}");
    }
    let (dataset, report) = load_dataset(
        &spec,
        &LoadOptions {
            skip_bad: true,
            ..LoadOptions::default()
        },
    )
    .unwrap();
    assert_eq!((dataset.samples.len(), report.skipped.len()), (1, 5));
    let err = manifest_split(
        &load_dataset(
            &DatasetSpec::Manifest(dir.join("m.csv")),
            &LoadOptions::default(),
        )
        .unwrap()
        .0,
    )
    .map(|s| s.sizes());
    assert!(err.is_ok());

    std::fs::write(dir.join("noscore.csv"), "path,quality\nimg/0.png,3\n").unwrap();
    let err = load_dataset(
        &DatasetSpec::Manifest(dir.join("noscore.csv")),
        &LoadOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("missing column(s) score (or mos)") && err.contains("path, quality"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn synthetic_agiqa3k_like_loads_and_its_mos_follows_severity() {
    let dir = temp_dir("synth-agiqa3k");
    let options = SynthOptions {
        images: 150,
        size: 96,
        seed: 4,
        ..Default::default()
    };
    let start = Instant::now();
    let summary = write_agiqa3k_like(&dir, &options).unwrap();
    eprintln!(
        "wrote 150 AGIQA-3K-like 96x72 images in {:.2?}",
        start.elapsed()
    );
    assert_eq!(summary.image_size, (96, 72));
    assert_eq!(summary.prompts, 30);
    let (dataset, _) =
        load_dataset(&DatasetSpec::Agiqa3k(dir.clone()), &LoadOptions::default()).unwrap();
    assert_eq!(dataset.samples.len(), 150);
    let decoded = image::open(&dataset.samples[0].path).unwrap();
    assert_eq!((decoded.width(), decoded.height()), (96, 72));
    assert_eq!(dataset.samples[0].name, "AttnGAN_normal_000.jpg");
    for (sample, record) in dataset.samples.iter().zip(&summary.records) {
        assert_eq!(sample.name, record.name);
        assert_eq!(Some(sample.mos), record.mos_of("quality"));
        assert_eq!(sample.prompt, record.prompt);
    }
    for dimension in ["quality", "alignment"] {
        let impairment: Vec<f64> = summary
            .records
            .iter()
            .map(|r| r.impairment(dimension))
            .collect();
        let mos: Vec<f64> = summary
            .records
            .iter()
            .map(|r| r.mos_of(dimension).unwrap())
            .collect();
        let rho = spearman(&impairment, &mos);
        assert!(rho < -0.95, "{dimension}: SRCC(impairment, MOS) = {rho}");
        assert!(mos.iter().all(|m| (0.0..=5.0).contains(m)));
    }
    // Alignment ignores colour shifts much more than quality does, so the dimensions differ.
    let quality: Vec<f64> = summary
        .records
        .iter()
        .map(|r| r.mos_of("quality").unwrap())
        .collect();
    let alignment: Vec<f64> = summary
        .records
        .iter()
        .map(|r| r.mos_of("alignment").unwrap())
        .collect();
    assert!(spearman(&quality, &alignment) < 0.9);
    // Real names, so the paper's split applies; prompts group 5 images each.
    assert_eq!(
        reference_split(&dataset).unwrap().train.len()
            + reference_split(&dataset).unwrap().test.len(),
        150
    );
    let mut per_prompt: HashMap<&str, usize> = HashMap::new();
    for s in &dataset.samples {
        *per_prompt.entry(s.prompt.as_deref().unwrap()).or_default() += 1;
    }
    assert!(per_prompt.values().all(|&n| n == 5));
    let readme = std::fs::read_to_string(dir.join("README.txt")).unwrap();
    assert!(readme.contains("4.5 * (1 - d)^1.2") && readme.contains("seed 4"));
    // Deterministic: a second run writes the same data.csv.
    let again = temp_dir("synth-agiqa3k-again");
    write_agiqa3k_like(&again, &options).unwrap();
    assert_eq!(
        std::fs::read(dir.join("data.csv")).unwrap(),
        std::fs::read(again.join("data.csv")).unwrap()
    );
    std::fs::remove_dir_all(&dir).ok();
    std::fs::remove_dir_all(&again).ok();
}

#[test]
fn synthetic_aigciqa2023_like_loads_every_dimension() {
    let dir = temp_dir("synth-aigciqa2023");
    let summary = write_aigciqa2023_like(
        &dir,
        &SynthOptions {
            images: 120,
            size: 64,
            seed: 9,
            ..Default::default()
        },
    )
    .unwrap();
    for dimension in ["quality", "authenticity", "correspondence"] {
        let options = LoadOptions {
            dimension: Some(dimension.into()),
            ..LoadOptions::default()
        };
        let (dataset, _) = load_dataset(&DatasetSpec::Aigciqa2023(dir.clone()), &options).unwrap();
        assert_eq!(dataset.samples.len(), 120);
        let expected: Vec<f64> = summary
            .records
            .iter()
            .map(|r| r.mos_of(dimension).unwrap())
            .collect();
        assert_eq!(dataset.mos(), expected, "{dimension}");
        assert!(
            expected.iter().all(|m| (20.0..=80.0).contains(m)),
            "{dimension}"
        );
        let impairment: Vec<f64> = summary
            .records
            .iter()
            .map(|r| r.impairment(dimension))
            .collect();
        let rho = spearman(&impairment, &expected);
        assert!(rho < -0.9, "{dimension}: SRCC(impairment, MOS) = {rho}");
        // Only the first 120 indices exist, all in the reference split.
        assert_eq!(
            reference_split(&dataset).unwrap().sizes().0
                + reference_split(&dataset).unwrap().sizes().2,
            120
        );
    }
    let mat = read_mat_file(&dir.join("DATA/MOS/mosz2.mat")).unwrap();
    assert_eq!(mat.get("MOSz").unwrap().dims, vec![1, 120]);
    std::fs::remove_dir_all(&dir).ok();
}

/// Timings quoted in the data module's report; run with
/// `cargo test -p agiqa-tests --test datasets -- --ignored --nocapture`.
#[test]
#[ignore]
fn timing_synthetic_1000_and_validating_3000() {
    let dir = temp_dir("timing");
    let start = Instant::now();
    write_agiqa3k_like(
        &dir,
        &SynthOptions {
            images: 1000,
            size: 256,
            seed: 1,
            ..Default::default()
        },
    )
    .unwrap();
    eprintln!(
        "write_agiqa3k_like: 1000 images 256x192 in {:.2?}",
        start.elapsed()
    );
    let start = Instant::now();
    write_aigciqa2023_like(
        &dir.join("aigciqa"),
        &SynthOptions {
            images: 1000,
            size: 256,
            seed: 1,
            ..Default::default()
        },
    )
    .unwrap();
    eprintln!(
        "write_aigciqa2023_like: 1000 images 256x192 in {:.2?}",
        start.elapsed()
    );
    let big = dir.join("big");
    write_agiqa3k_like(
        &big,
        &SynthOptions {
            images: REAL_ROWS,
            size: 256,
            seed: 2,
            ..Default::default()
        },
    )
    .unwrap();
    let start = Instant::now();
    let (dataset, _) = load_dataset(&DatasetSpec::Agiqa3k(big), &LoadOptions::default()).unwrap();
    eprintln!(
        "load + decode {} JPEGs 256x192: {:.2?}",
        dataset.samples.len(),
        start.elapsed()
    );
    std::fs::remove_dir_all(&dir).ok();
}
