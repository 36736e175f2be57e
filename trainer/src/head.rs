//! The reference's regressor: `Dropout(p) → Linear(in → hidden) → ReLU → Dropout(p) →
//! Linear(hidden → 1)`, on the flattened `[image; text_1 … text_K]` features (paper §3.2.4).

use tch::nn::init::{FanInOut, NonLinearity, NormalOrUniform};
use tch::nn::{self, Init};
use tch::Tensor;

/// The paper's hidden width (`7 * 512 → 512 → 1`).
pub const DEFAULT_HIDDEN: i64 = 512;

/// The reference's dropout probability, before each linear layer.
pub const DEFAULT_DROPOUT: f64 = 0.5;

/// Two-layer MLP from concatenated CLIP features to a score in MOS units.
///
/// Variables: `fc1.{weight,bias}` (`[hidden, in]`, `[hidden]`) and `fc2.{weight,bias}`
/// (`[1, hidden]`, `[1]`) under the path given to [`QualityHead::new`].
#[derive(Debug)]
pub struct QualityHead {
    fc1: nn::Linear,
    fc2: nn::Linear,
    dropout: f64,
}

/// PyTorch's `nn.Linear` initialisation: weights kaiming-uniform with `a = √5`, i.e. bound
/// `gain·√(3 / fan_in)` with `gain = √(2 / (1 + a²)) = √(1/3)`, so `±1/√fan_in`; bias
/// `±1/√fan_in`. tch's default `nn::linear` uses the ReLU gain (a bound √6 times larger).
fn torch_linear(path: nn::Path, in_dim: i64, out_dim: i64) -> nn::Linear {
    let config = nn::LinearConfig {
        ws_init: Init::Kaiming {
            dist: NormalOrUniform::Uniform,
            fan: FanInOut::FanIn,
            non_linearity: NonLinearity::ExplicitGain((1f64 / 3.).sqrt()),
        },
        // `None`: tch draws the bias from ±1/√in_dim, as PyTorch does.
        bs_init: None,
        bias: true,
    };
    nn::linear(path, in_dim, out_dim, config)
}

impl QualityHead {
    /// `in_dim` is `(K + 1)·E`; the reference uses `hidden = 512`, `dropout = 0.5`.
    ///
    /// # Panics
    /// When `in_dim` or `hidden` is not positive or `dropout` is outside `[0, 1)`; callers
    /// validate user configuration first (see `ModelConfig::validate`).
    pub fn new(path: &nn::Path, in_dim: i64, hidden: i64, dropout: f64) -> QualityHead {
        assert!(in_dim > 0 && hidden > 0, "head sizes must be positive");
        assert!(
            (0. ..1.).contains(&dropout),
            "dropout {dropout} outside [0, 1)"
        );
        QualityHead {
            fc1: torch_linear(path / "fc1", in_dim, hidden),
            fc2: torch_linear(path / "fc2", hidden, 1),
            dropout,
        }
    }

    /// `[N, in]` → `[N]` scores; dropout is active only when `train`.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        x.dropout(self.dropout, train)
            .linear(&self.fc1.ws, self.fc1.bs.as_ref())
            .relu()
            .dropout(self.dropout, train)
            .linear(&self.fc2.ws, self.fc2.bs.as_ref())
            .squeeze_dim(-1)
    }

    /// The first layer, `[hidden, in]`. On the concatenated input its product splits as
    /// `W[:, ..E]·image + (W[:, E..]·text + b)`: the bracket is a constant once trained.
    pub fn fc1(&self) -> &nn::Linear {
        &self.fc1
    }

    /// The output layer, `[1, hidden]`.
    pub fn fc2(&self) -> &nn::Linear {
        &self.fc2
    }

    pub fn dropout(&self) -> f64 {
        self.dropout
    }

    pub fn in_dim(&self) -> i64 {
        self.fc1.ws.size()[1]
    }

    pub fn hidden(&self) -> i64 {
        self.fc1.ws.size()[0]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn head(in_dim: i64, hidden: i64, dropout: f64) -> (nn::VarStore, QualityHead) {
        let vs = nn::VarStore::new(Device::Cpu);
        let head = QualityHead::new(&(vs.root() / "head"), in_dim, hidden, dropout);
        (vs, head)
    }

    #[test]
    fn variables_are_named_and_shaped_as_the_reference() {
        let (vs, head) = head(7 * 512, 512, 0.5);
        let shapes: Vec<(String, Vec<i64>)> = {
            let mut v: Vec<_> = vs
                .variables()
                .into_iter()
                .map(|(n, t)| (n, t.size()))
                .collect();
            v.sort();
            v
        };
        let expected = [
            ("head.fc1.bias", vec![512]),
            ("head.fc1.weight", vec![512, 3584]),
            ("head.fc2.bias", vec![1]),
            ("head.fc2.weight", vec![1, 512]),
        ];
        let expected: Vec<(String, Vec<i64>)> = expected
            .into_iter()
            .map(|(n, s)| (n.to_string(), s))
            .collect();
        assert_eq!(shapes, expected);
        assert_eq!((head.in_dim(), head.hidden()), (3584, 512));
    }

    #[test]
    fn initialisation_matches_pytorch_linear() {
        tch::manual_seed(0);
        let (_, head) = head(3584, 512, 0.5);
        for (layer, fan_in) in [(head.fc1(), 3584f64), (head.fc2(), 512.)] {
            let bound = 1. / fan_in.sqrt();
            let ws = &layer.ws;
            let bs = layer.bs.as_ref().unwrap();
            for t in [ws, bs] {
                let max = t.abs().max().double_value(&[]);
                assert!(max <= bound, "max {max} > bound {bound}");
            }
            // Uniform(±b) has std b/√3: tch's ReLU-gain default would give √6 times more.
            let std = ws.std(true).double_value(&[]);
            let expected = bound / 3f64.sqrt();
            assert!(
                (std / expected - 1.).abs() < 0.05,
                "std {std} vs {expected}"
            );
        }
    }

    #[test]
    fn forward_shapes_and_dropout_only_in_training() {
        let (_, head) = head(24, 8, 0.5);
        let x = Tensor::randn([5, 24], (Kind::Float, Device::Cpu));
        let eval = head.forward_t(&x, false);
        assert_eq!(eval.size(), [5]);
        assert!(eval.equal(&head.forward_t(&x, false)));
        // Matches the plain MLP when dropout is off.
        let manual = x
            .matmul(&head.fc1().ws.tr())
            .g_add(head.fc1().bs.as_ref().unwrap())
            .relu()
            .matmul(&head.fc2().ws.tr())
            .g_add(head.fc2().bs.as_ref().unwrap())
            .squeeze_dim(-1);
        assert!(eval.allclose(&manual, 1e-5, 1e-6, false));
        let a = head.forward_t(&x, true);
        let b = head.forward_t(&x, true);
        assert!(!a.equal(&b), "dropout should randomise training passes");
    }
}
