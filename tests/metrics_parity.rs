//! The shared metrics against scipy on fixed vectors with ties
//! (tests/fixtures/metrics/scipy.json, written by scripts/make-fixtures).

use agiqa_runtime::metrics::{kendall_tau_b, pearson, plcc_logistic, spearman, Logistic4};
use serde::Deserialize;

#[derive(Deserialize)]
struct Fixture {
    pairs: Vec<Pair>,
}

#[derive(Deserialize)]
struct Pair {
    name: String,
    pred: Vec<f64>,
    mos: Vec<f64>,
    pearson: f64,
    spearman: f64,
    kendall_tau_b: f64,
    logistic4: Logistic,
}

#[derive(Deserialize)]
struct Logistic {
    params: [f64; 4],
    plcc: f64,
}

fn fixture() -> Fixture {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/metrics/scipy.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("scipy.json"))
        .expect("fixture format")
}

#[test]
fn correlations_match_scipy() {
    let fixture = fixture();
    assert!(fixture.pairs.len() >= 3);
    for p in &fixture.pairs {
        let close = |ours: f64, theirs: f64, what: &str| {
            assert!(
                (ours - theirs).abs() < 1e-12,
                "{} {what}: ours {ours}, scipy {theirs}",
                p.name
            )
        };
        close(pearson(&p.pred, &p.mos), p.pearson, "PLCC");
        close(spearman(&p.pred, &p.mos), p.spearman, "SRCC");
        close(
            kendall_tau_b(&p.pred, &p.mos),
            p.kendall_tau_b,
            "KRCC (tau-b)",
        );
    }
}

#[test]
fn logistic_plcc_matches_scipy_curve_fit() {
    for p in &fixture().pairs {
        let fit = Logistic4::fit(&p.pred, &p.mos);
        let ours = plcc_logistic(&p.pred, &p.mos);
        // Different optimisers stop at slightly different points of a flat optimum.
        assert!(
            (ours - p.logistic4.plcc).abs() < 1e-6,
            "{}: ours {ours}, scipy {}",
            p.name,
            p.logistic4.plcc
        );
        let [b1, b2, b3, b4] = p.logistic4.params;
        let theirs = Logistic4 { b1, b2, b3, b4 };
        let max_gap = p
            .pred
            .iter()
            .map(|&x| (fit.eval(x) - theirs.eval(x)).abs())
            .fold(0.0, f64::max);
        assert!(
            max_gap < 1e-3,
            "{}: fitted curves differ by {max_gap}",
            p.name
        );
    }
}
