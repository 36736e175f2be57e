//! The shared metrics against scipy on fixed vectors with ties
//! (tests/fixtures/metrics/scipy.json, written by scripts/make-fixtures).

use agiqa_runtime::metrics::{
    kendall_tau_b, pearson, plcc_logistic, spearman, Correlations, Logistic4, MetricsError,
};
use serde::Deserialize;

#[derive(Deserialize)]
struct Fixture {
    pairs: Vec<Pair>,
    /// n = 3 and degenerate cases; `null` where scipy answers NaN (constant input).
    small: Vec<SmallPair>,
}

#[derive(Deserialize)]
struct SmallPair {
    name: String,
    pred: Vec<f64>,
    mos: Vec<f64>,
    pearson: Option<f64>,
    spearman: Option<f64>,
    kendall_tau_b: Option<f64>,
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

#[test]
fn small_ties_and_constant_inputs_match_scipy_and_never_crash() {
    let fixture = fixture();
    assert!(fixture.small.iter().any(|p| p.mos.len() == 3));
    assert!(fixture.small.iter().any(|p| p.pearson.is_none()));
    for p in &fixture.small {
        let ours =
            Correlations::compute(&p.pred, &p.mos).unwrap_or_else(|e| panic!("{}: {e}", p.name));
        for (what, ours, theirs) in [
            ("PLCC", ours.plcc, p.pearson),
            ("SRCC", ours.srcc, p.spearman),
            ("KRCC", ours.krcc, p.kendall_tau_b),
        ] {
            match theirs {
                // Constant input: scipy's NaN, reported as NaN (JSON null), not an error.
                None => assert!(ours.is_nan(), "{} {what}: ours {ours}, scipy NaN", p.name),
                Some(theirs) => assert!(
                    (ours - theirs).abs() < 1e-12,
                    "{} {what}: ours {ours}, scipy {theirs}",
                    p.name
                ),
            }
        }
    }
}

#[test]
fn too_few_and_non_finite_inputs_are_clear_errors() {
    assert_eq!(
        Correlations::compute(&[1.0, 2.0], &[2.0, 1.0]),
        Err(MetricsError::TooFew(2))
    );
    for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let err = Correlations::compute(&[1.0, 2.0, 3.0, 4.0], &[1.0, 2.0, bad, 4.0])
            .unwrap_err()
            .to_string();
        assert!(err.contains("MOS of row 3"), "{err}");
    }
}
