//! IQA correlation metrics, computed by training (model selection, reports, plots); the
//! runtime only carries each head's results in the model metadata ([`crate::metadata::HeadInfo`]).
//!
//! PLCC is plain Pearson (as pyiqa and IPCE report it); the PLCC after the standard 4-parameter
//! logistic mapping (VQEG) is reported beside it. SRCC uses average ranks for ties and KRCC is
//! Kendall's tau-b, both as scipy computes them.

use serde::{Deserialize, Serialize};

/// Why correlations could not be computed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MetricsError {
    #[error("predictions ({predictions}) and MOS ({mos}) differ in length")]
    LengthMismatch { predictions: usize, mos: usize },
    #[error("need at least 3 samples, got {0}")]
    TooFew(usize),
    /// `index` is 0-based; the message names the 1-based row.
    #[error("the {which} of row {} is not finite ({value}); metrics need finite scores", .index + 1)]
    NotFinite {
        which: &'static str,
        index: usize,
        value: f64,
    },
}

/// The correlations reported for a model on a set of images. A correlation is NaN when the
/// predictions are constant (JSON has no NaN: it is written as `null` and read back as NaN).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Correlations {
    /// Pearson linear correlation of raw predictions and MOS.
    #[serde(deserialize_with = "nan_from_null")]
    pub plcc: f64,
    /// Spearman rank correlation (average ranks for ties).
    #[serde(deserialize_with = "nan_from_null")]
    pub srcc: f64,
    /// Kendall's tau-b.
    #[serde(deserialize_with = "nan_from_null")]
    pub krcc: f64,
    /// Pearson correlation after fitting the 4-parameter logistic from predictions to MOS.
    #[serde(deserialize_with = "nan_from_null")]
    pub plcc_logistic: f64,
    /// Number of samples.
    pub n: usize,
}

/// serde_json writes non-finite floats as `null`; read them back as NaN.
pub fn nan_from_null<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(deserializer)?.unwrap_or(f64::NAN))
}

impl Correlations {
    /// Computes every metric of `predictions` against `mos`.
    pub fn compute(predictions: &[f64], mos: &[f64]) -> Result<Self, MetricsError> {
        validate(predictions, mos)?;
        Ok(Correlations {
            plcc: pearson(predictions, mos),
            srcc: spearman(predictions, mos),
            krcc: kendall_tau_b(predictions, mos),
            plcc_logistic: plcc_logistic(predictions, mos),
            n: mos.len(),
        })
    }
}

fn validate(predictions: &[f64], mos: &[f64]) -> Result<(), MetricsError> {
    if predictions.len() != mos.len() {
        return Err(MetricsError::LengthMismatch {
            predictions: predictions.len(),
            mos: mos.len(),
        });
    }
    if mos.len() < 3 {
        return Err(MetricsError::TooFew(mos.len()));
    }
    for (which, values) in [("prediction", predictions), ("MOS", mos)] {
        if let Some((index, &value)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(MetricsError::NotFinite {
                which,
                index,
                value,
            });
        }
    }
    Ok(())
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// Pearson correlation; NaN when either input is constant (as scipy).
pub fn pearson(x: &[f64], y: &[f64]) -> f64 {
    let (mx, my) = (mean(x), mean(y));
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        let (dx, dy) = (a - mx, b - my);
        sxy += dx * dy;
        sxx += dx * dx;
        syy += dy * dy;
    }
    (sxy / (sxx * syy).sqrt()).clamp(-1.0, 1.0)
}

/// Ranks starting at 1, ties sharing their average rank (scipy's `rankdata(method="average")`).
pub fn average_ranks(v: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..v.len()).collect();
    order.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
    let mut ranks = vec![0.0; v.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && v[order[j + 1]] == v[order[i]] {
            j += 1;
        }
        let rank = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            ranks[k] = rank;
        }
        i = j + 1;
    }
    ranks
}

/// Spearman rank correlation with average ranks for ties.
pub fn spearman(x: &[f64], y: &[f64]) -> f64 {
    pearson(&average_ranks(x), &average_ranks(y))
}

/// Kendall's tau-b: `(C − D) / sqrt((n0 − n1)(n0 − n2))`, ties counted per variable.
/// O(n²): 3000 images take milliseconds, and the direct form is easy to trust.
pub fn kendall_tau_b(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len();
    let (mut concordant, mut discordant, mut ties_x, mut ties_y) = (0i64, 0i64, 0i64, 0i64);
    for i in 0..n {
        for j in (i + 1)..n {
            let dx = x[i] - x[j];
            let dy = y[i] - y[j];
            if dx == 0.0 && dy == 0.0 {
                ties_x += 1;
                ties_y += 1;
            } else if dx == 0.0 {
                ties_x += 1;
            } else if dy == 0.0 {
                ties_y += 1;
            } else if (dx > 0.0) == (dy > 0.0) {
                concordant += 1;
            } else {
                discordant += 1;
            }
        }
    }
    let n0 = (n * (n - 1) / 2) as i64;
    let denom = (((n0 - ties_x) as f64) * ((n0 - ties_y) as f64)).sqrt();
    (concordant - discordant) as f64 / denom
}

/// Parameters of the 4-parameter logistic `f(x) = (b1 − b2) / (1 + exp(−(x − b3)/|b4|)) + b2`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Logistic4 {
    pub b1: f64,
    pub b2: f64,
    pub b3: f64,
    pub b4: f64,
}

impl Logistic4 {
    pub fn eval(&self, x: f64) -> f64 {
        (self.b1 - self.b2) / (1.0 + (-(x - self.b3) / self.b4.abs()).exp()) + self.b2
    }

    /// Least-squares fit from predictions to MOS (Levenberg–Marquardt), started where IQA
    /// papers start scipy's `curve_fit`: `[max(mos), min(mos), mean(pred), std(pred)/4]`.
    pub fn fit(pred: &[f64], mos: &[f64]) -> Logistic4 {
        let std = {
            let m = mean(pred);
            (pred.iter().map(|p| (p - m).powi(2)).sum::<f64>() / pred.len() as f64).sqrt()
        };
        let mut p = [
            mos.iter().cloned().fold(f64::MIN, f64::max),
            mos.iter().cloned().fold(f64::MAX, f64::min),
            mean(pred),
            if std > 0.0 { std / 4.0 } else { 0.5 },
        ];
        let sse = |p: &[f64; 4]| -> f64 {
            let f = Logistic4 {
                b1: p[0],
                b2: p[1],
                b3: p[2],
                b4: p[3],
            };
            pred.iter()
                .zip(mos)
                .map(|(x, y)| (f.eval(*x) - y).powi(2))
                .sum()
        };
        let mut lambda = 1e-3;
        let mut current = sse(&p);
        for _ in 0..500 {
            // Normal equations J^T J δ = J^T r with analytic derivatives.
            let mut jtj = [[0.0f64; 4]; 4];
            let mut jtr = [0.0f64; 4];
            let s = p[3].abs().max(1e-12);
            for (x, y) in pred.iter().zip(mos) {
                let e = (-(x - p[2]) / s).exp();
                let d = 1.0 + e;
                let f = (p[0] - p[1]) / d + p[1];
                let g = [
                    1.0 / d,
                    1.0 - 1.0 / d,
                    -(p[0] - p[1]) * e / (d * d) / s,
                    -(p[0] - p[1]) * e * (x - p[2]) / (d * d * s * s) * p[3].signum(),
                ];
                let r = y - f;
                for a in 0..4 {
                    jtr[a] += g[a] * r;
                    for b in 0..4 {
                        jtj[a][b] += g[a] * g[b];
                    }
                }
            }
            let mut improved = false;
            for _ in 0..20 {
                let mut m = jtj;
                for (a, row) in m.iter_mut().enumerate() {
                    row[a] += lambda * jtj[a][a].max(1e-12);
                }
                let Some(delta) = solve4(m, jtr) else { break };
                let candidate = [
                    p[0] + delta[0],
                    p[1] + delta[1],
                    p[2] + delta[2],
                    p[3] + delta[3],
                ];
                let value = sse(&candidate);
                if value.is_finite() && value < current {
                    let gain = (current - value) / current.max(1e-300);
                    p = candidate;
                    current = value;
                    lambda = (lambda / 10.0).max(1e-12);
                    improved = gain > 1e-15;
                    break;
                }
                lambda *= 10.0;
            }
            if !improved {
                break;
            }
        }
        Logistic4 {
            b1: p[0],
            b2: p[1],
            b3: p[2],
            b4: p[3],
        }
    }
}

/// Solves a 4×4 system by Gaussian elimination with partial pivoting.
fn solve4(mut a: [[f64; 4]; 4], mut b: [f64; 4]) -> Option<[f64; 4]> {
    for col in 0..4 {
        let pivot = (col..4).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))?;
        if a[pivot][col].abs() < 1e-300 {
            return None;
        }
        a.swap(col, pivot);
        b.swap(col, pivot);
        let pivot_row = a[col];
        for row in (col + 1)..4 {
            let factor = a[row][col] / pivot_row[col];
            for (value, pivot_value) in a[row].iter_mut().zip(pivot_row).skip(col) {
                *value -= factor * pivot_value;
            }
            b[row] -= factor * b[col];
        }
    }
    let mut x = [0.0; 4];
    for row in (0..4).rev() {
        let tail: f64 = ((row + 1)..4).map(|k| a[row][k] * x[k]).sum();
        x[row] = (b[row] - tail) / a[row][row];
    }
    Some(x)
}

/// PLCC after mapping predictions through the fitted 4-parameter logistic.
pub fn plcc_logistic(pred: &[f64], mos: &[f64]) -> f64 {
    let f = Logistic4::fit(pred, mos);
    let mapped: Vec<f64> = pred.iter().map(|&x| f.eval(x)).collect();
    pearson(&mapped, mos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perfect_and_reversed_orders() {
        let x = [1.0, 2.0, 3.0, 4.0, 5.0];
        let y = [2.0, 4.0, 6.0, 8.0, 10.0];
        let c = Correlations::compute(&x, &y).unwrap();
        assert!((c.plcc - 1.0).abs() < 1e-12 && (c.srcc - 1.0).abs() < 1e-12);
        assert!((c.krcc - 1.0).abs() < 1e-12);
        let r: Vec<f64> = y.iter().rev().cloned().collect();
        assert!((kendall_tau_b(&x, &r) + 1.0).abs() < 1e-12);
    }

    #[test]
    fn constant_predictions_survive_a_json_round_trip() {
        let c = Correlations::compute(&[1.0, 1.0, 1.0], &[1.0, 2.0, 3.0]).unwrap();
        assert!(c.plcc.is_nan());
        let back: Correlations = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert!(back.plcc.is_nan() && back.srcc.is_nan());
        assert_eq!(back.n, 3);
    }

    #[test]
    fn ties_get_average_ranks() {
        assert_eq!(
            average_ranks(&[10.0, 20.0, 10.0, 30.0]),
            vec![1.5, 3.0, 1.5, 4.0]
        );
    }

    #[test]
    fn tau_b_with_ties_matches_hand_count() {
        // x ties on (0,1); pairs: C = 4, D = 1, ties_x = 1, ties_y = 0, n0 = 6.
        let x = [1.0, 1.0, 2.0, 3.0];
        let y = [1.0, 2.0, 4.0, 3.0];
        let expected = (4.0 - 1.0) / ((5.0f64) * 6.0).sqrt();
        assert!((kendall_tau_b(&x, &y) - expected).abs() < 1e-12);
    }

    #[test]
    fn logistic_fit_linearises_a_sigmoid() {
        let truth = Logistic4 {
            b1: 5.0,
            b2: 1.0,
            b3: 0.3,
            b4: 0.2,
        };
        let pred: Vec<f64> = (0..60).map(|i| i as f64 / 60.0).collect();
        let mos: Vec<f64> = pred.iter().map(|&x| truth.eval(x)).collect();
        assert!(pearson(&pred, &mos) < 0.99);
        assert!((plcc_logistic(&pred, &mos) - 1.0).abs() < 1e-6);
    }

    #[test]
    fn bad_input_is_reported() {
        assert_eq!(
            Correlations::compute(&[1.0, 2.0], &[1.0]),
            Err(MetricsError::LengthMismatch {
                predictions: 2,
                mos: 1
            })
        );
        assert!(matches!(
            Correlations::compute(&[1.0, f64::NAN, 2.0], &[1.0, 2.0, 3.0]),
            Err(MetricsError::NotFinite {
                which: "prediction",
                index: 1,
                ..
            })
        ));
    }
}
