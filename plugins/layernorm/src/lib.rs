//! `layernorm`: layer normalization over the last axis, as
//! `torch.nn.LayerNorm(normalized_shape, eps, elementwise_affine, bias)`:
//! each vector `x` along the last axis becomes
//! `(x - mean(x)) / √(var(x) + eps) · weight + bias`, with the biased
//! variance (divided by the axis' size, as PyTorch). The mean and the
//! variance are computed in `f64`, in two passes, and the rest in `f64`,
//! vectorized (`layer_kernels::elementwise::layer_norm`). Any leading axes
//! are kept.
//!
//! Config:
//!
//! * `normalized_shape`: the size of the last axis, an integer or a list of
//!   one (as `nn.LayerNorm(64)` and `nn.LayerNorm([64])`). Normalizing over
//!   several trailing axes is not supported.
//! * `eps` (default `1e-5`), `elementwise_affine` (default true) and `bias`
//!   (default true, PyTorch ≥ 2.1), as PyTorch's.
//!
//! Parameters, named and shaped as in PyTorch's `state_dict`; a model file
//! may override either default with `"init"`:
//!
//! | parameter | shape | default | present |
//! | --- | --- | --- | --- |
//! | `weight` | `(normalized_shape,)` | `ones` | when `elementwise_affine` |
//! | `bias` | `(normalized_shape,)` | `zeros` | when `elementwise_affine` and `bias` |

use layer_api::ndarray::Ix1;
use layer_api::{
    export_layer, last_axis_features, ArrayViewD, ArrayViewMutD, Init, Layer, ParamSpec, Params,
};
use layer_kernels::elementwise::layer_norm;
use serde::Deserialize;

/// `64` or `[64]`.
#[derive(Debug, Deserialize)]
#[serde(
    untagged,
    expecting = "an integer (the last axis' size) or a list of one integer"
)]
pub enum NormalizedShape {
    Size(usize),
    List(Vec<usize>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerNormConfig {
    pub normalized_shape: NormalizedShape,
    #[serde(default = "default_eps")]
    pub eps: f64,
    #[serde(default = "yes")]
    pub elementwise_affine: bool,
    #[serde(default = "yes")]
    pub bias: bool,
}

fn default_eps() -> f64 {
    1e-5
}

fn yes() -> bool {
    true
}

pub struct LayerNorm {
    features: usize,
    eps: f64,
    weight: bool,
    bias: bool,
}

impl Layer for LayerNorm {
    const DESCRIPTION: &'static str =
        "y = (x - mean) / √(var + eps) · weight + bias over the last axis, as torch.nn.LayerNorm";
    type Config = LayerNormConfig;

    fn new(config: LayerNormConfig) -> Result<Self, String> {
        let features = match config.normalized_shape {
            NormalizedShape::Size(n) => n,
            NormalizedShape::List(list) => match list[..] {
                [n] => n,
                _ => {
                    return Err(format!(
                        "`normalized_shape` {list:?}: only the last axis can be normalized, so \
                         give one size (normalizing over {} axes is not supported)",
                        list.len()
                    ))
                }
            },
        };
        if features == 0 {
            return Err("`normalized_shape` must be at least 1".into());
        }
        if !(config.eps >= 0.0 && config.eps.is_finite()) {
            return Err(format!(
                "`eps` must be a finite number ≥ 0, not {}",
                config.eps
            ));
        }
        Ok(LayerNorm {
            features,
            eps: config.eps,
            weight: config.elementwise_affine,
            bias: config.elementwise_affine && config.bias,
        })
    }

    fn output_shape(&self, input_shape: &[usize]) -> Result<Vec<usize>, String> {
        last_axis_features(input_shape, Some(self.features), "normalized_shape")?;
        Ok(input_shape.to_vec())
    }

    fn params(&self, input_shape: &[usize]) -> Result<Vec<ParamSpec>, String> {
        last_axis_features(input_shape, Some(self.features), "normalized_shape")?;
        let mut specs = Vec::new();
        if self.weight {
            specs.push(ParamSpec::new("weight", [self.features], Init::Ones));
        }
        if self.bias {
            specs.push(ParamSpec::new("bias", [self.features], Init::Zeros));
        }
        Ok(specs)
    }

    fn batch_independent(&self) -> bool {
        true
    }

    fn flops(&self, input_shape: &[usize]) -> u64 {
        // Mean, squared deviations, normalize, scale and shift.
        8 * input_shape.iter().product::<usize>() as u64
    }

    fn forward(
        &self,
        input: ArrayViewD<'_, f32>,
        params: &Params<'_>,
        mut output: ArrayViewMutD<'_, f32>,
    ) -> Result<(), String> {
        let weight = self
            .weight
            .then(|| params.get::<Ix1>("weight"))
            .transpose()?;
        let bias = self.bias.then(|| params.get::<Ix1>("bias")).transpose()?;
        let contiguous = "layernorm needs contiguous tensors (standard layout)";
        let weight = weight
            .as_ref()
            .map(|w| w.as_slice().ok_or(contiguous))
            .transpose()?;
        let bias = bias
            .as_ref()
            .map(|b| b.as_slice().ok_or(contiguous))
            .transpose()?;
        let input = input.as_standard_layout();
        let x = input.as_slice().ok_or(contiguous)?;
        let y = output.as_slice_mut().ok_or(contiguous)?;
        layer_norm(x, y, self.features, weight, bias, self.eps)
    }
}

export_layer!(LayerNorm);

#[cfg(test)]
mod tests {
    use super::*;
    use layer_api::ndarray::{array, ArrayD, IxDyn};
    use layer_api::testing;

    fn filled(shape: &[usize], seed: usize) -> ArrayD<f32> {
        let n: usize = shape.iter().product();
        let values = (0..n)
            .map(|i| (((i + seed) * 37 % 17) as f32 - 8.0) / 4.0)
            .collect();
        ArrayD::from_shape_vec(IxDyn(shape), values).unwrap()
    }

    fn assert_close(got: &ArrayD<f32>, want: &[f64], tol: f64) {
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            assert!((f64::from(*g) - w).abs() <= tol, "{g} != {w}");
        }
    }

    #[test]
    fn normalizes_by_hand_without_affine() {
        // [1, 2, 3, 6]: mean 3, deviations [-2, -1, 0, 3], biased variance
        // (4 + 1 + 0 + 9) / 4 = 3.5; eps 0.5 makes the divisor √4 = 2.
        let x = array![[1.0f32, 2.0, 3.0, 6.0]].into_dyn();
        let config =
            r#"{"normalized_shape": 4, "eps": 0.5, "elementwise_affine": false, "bias": true}"#;
        let y = testing::forward::<LayerNorm>(config, x, &[]).unwrap();
        assert_eq!(y, array![[-1.0f32, -0.5, 0.0, 1.5]].into_dyn());
    }

    #[test]
    fn scales_and_shifts_with_affine_by_hand() {
        // As above, then · [1, 2, 3, 4] + [0, 1, 0, -1].
        let x = array![[1.0f32, 2.0, 3.0, 6.0]].into_dyn();
        let w = array![1.0f32, 2.0, 3.0, 4.0].into_dyn();
        let b = array![0.0f32, 1.0, 0.0, -1.0].into_dyn();
        let y = testing::forward::<LayerNorm>(
            r#"{"normalized_shape": [4], "eps": 0.5}"#,
            x,
            &[("weight", w.clone()), ("bias", b)],
        )
        .unwrap();
        assert_eq!(y, array![[-1.0f32, 0.0, 0.0, 5.0]].into_dyn());
        // Without bias only `weight` is declared.
        let x = array![[1.0f32, 2.0, 3.0, 6.0]].into_dyn();
        let y = testing::forward::<LayerNorm>(
            r#"{"normalized_shape": 4, "eps": 0.5, "bias": false}"#,
            x,
            &[("weight", w)],
        )
        .unwrap();
        assert_eq!(y, array![[-1.0f32, -1.0, 0.0, 6.0]].into_dyn());
    }

    /// PyTorch's formula by explicit loops over a (2, 3, 5) input, with the
    /// default eps.
    #[test]
    fn matches_loops_over_leading_axes() {
        let x = filled(&[2, 3, 5], 0);
        let w = filled(&[5], 3);
        let b = filled(&[5], 7);
        let y = testing::forward::<LayerNorm>(
            r#"{"normalized_shape": 5}"#,
            x.clone(),
            &[("weight", w.clone()), ("bias", b.clone())],
        )
        .unwrap();
        assert_eq!(y.shape(), &[2, 3, 5]);
        let mut want = Vec::new();
        for i in 0..2 {
            for j in 0..3 {
                let row: Vec<f64> = (0..5).map(|k| f64::from(x[[i, j, k]])).collect();
                let mean = row.iter().sum::<f64>() / 5.0;
                let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / 5.0;
                for (k, v) in row.iter().enumerate() {
                    let normed = (v - mean) / (var + 1e-5).sqrt();
                    want.push(normed * f64::from(w[[k]]) + f64::from(b[[k]]));
                }
            }
        }
        assert_close(&y, &want, 1e-6);
    }

    #[test]
    fn a_constant_row_gives_zeros_thanks_to_eps() {
        let x = array![[7.0f32, 7.0, 7.0]].into_dyn();
        let y = testing::forward::<LayerNorm>(
            r#"{"normalized_shape": 3, "elementwise_affine": false}"#,
            x,
            &[],
        )
        .unwrap();
        assert_eq!(y, array![[0.0f32, 0.0, 0.0]].into_dyn());
    }

    #[test]
    fn refuses_bad_configs_and_inputs() {
        let x = || filled(&[2, 4], 0);
        let run = |config: &str| testing::forward::<LayerNorm>(config, x(), &[]).unwrap_err();
        let err = run(r#"{"normalized_shape": 3}"#);
        assert!(
            err.contains("expects 3 input features (config `normalized_shape`)"),
            "{err}"
        );
        let err = run(r#"{"normalized_shape": [2, 4]}"#);
        assert!(err.contains("only the last axis"), "{err}");
        let err = run(r#"{"normalized_shape": 0}"#);
        assert_eq!(err, "`normalized_shape` must be at least 1");
        let err = run(r#"{"normalized_shape": "4"}"#);
        assert!(err.contains("an integer (the last axis' size)"), "{err}");
        let err = run(r#"{"normalized_shape": 4, "eps": -1}"#);
        assert!(err.contains("`eps` must be"), "{err}");
        let err = run(r#"{"normalized_shape": 4, "affine": false}"#);
        assert!(err.contains("unknown field `affine`"), "{err}");
        let err = testing::forward::<LayerNorm>(
            r#"{"normalized_shape": 1}"#,
            ArrayD::zeros(IxDyn(&[])),
            &[],
        )
        .unwrap_err();
        assert!(err.contains("got a scalar"), "{err}");
    }
}
