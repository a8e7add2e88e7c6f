//! `layernorm`: layer normalization over the last axis, as
//! `torch.nn.LayerNorm(normalized_shape, eps, elementwise_affine, bias)`:
//! each vector `x` along the last axis becomes
//! `(x - mean(x)) / √(var(x) + eps) · weight + bias`, with the biased
//! variance (divided by the axis' size, as PyTorch). The mean and the
//! variance are computed in `f64`, in two passes, and the rest in `f64`,
//! vectorized (`layer_kernels::elementwise::layer_norm`). Any leading axes
//! are kept.
//!
//! Backward, in `f64` with the statistics recomputed as the forward's:
//! `dx = (ĝ - mean(ĝ) - x̂ · mean(ĝ ⊙ x̂)) / √(var + eps)` with
//! `ĝ = g ⊙ weight` and `x̂` the normalized input; `dweight = Σ g ⊙ x̂` and
//! `dbias = Σ g` over the rows.
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
    export_layer, last_axis_features, ArrayViewD, ArrayViewMutD, Grads, Init, Layer, ParamSpec,
    Params, INPUT,
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

    const BACKWARD: bool = true;

    fn backward(
        &self,
        input: ArrayViewD<'_, f32>,
        _output: ArrayViewD<'_, f32>,
        params: &Params<'_>,
        grad_output: ArrayViewD<'_, f32>,
        grads: &mut Grads<'_>,
    ) -> Result<(), String> {
        let n = self.features;
        let weight = self
            .weight
            .then(|| params.get::<Ix1>("weight"))
            .transpose()?
            .map(|w| w.iter().map(|&v| f64::from(v)).collect::<Vec<f64>>());
        let mut dx = grads.input::<f32>(INPUT)?;
        let mut dweight = self
            .weight
            .then(|| grads.param("weight"))
            .transpose()?
            .flatten();
        let mut dbias = self
            .bias
            .then(|| grads.param("bias"))
            .transpose()?
            .flatten();
        let contiguous = "layernorm needs contiguous tensors (standard layout)";
        let input = input.as_standard_layout();
        let x = input.as_slice().ok_or(contiguous)?;
        let grad_output = grad_output.as_standard_layout();
        let g = grad_output.as_slice().ok_or(contiguous)?;
        let mut dx = dx
            .as_mut()
            .map(|d| d.as_slice_mut().ok_or(contiguous))
            .transpose()?;
        let (mut sum_gx, mut sum_g) = (vec![0.0f64; n], vec![0.0f64; n]);
        let (mut normed, mut scaled) = (vec![0.0f64; n], vec![0.0f64; n]);
        for (row, (x, g)) in x.chunks_exact(n).zip(g.chunks_exact(n)).enumerate() {
            let mean = x.iter().map(|&v| f64::from(v)).sum::<f64>() / n as f64;
            let var = x
                .iter()
                .map(|&v| (f64::from(v) - mean).powi(2))
                .sum::<f64>()
                / n as f64;
            let rstd = 1.0 / (var + self.eps).sqrt();
            for k in 0..n {
                let gk = f64::from(g[k]);
                normed[k] = (f64::from(x[k]) - mean) * rstd;
                scaled[k] = weight.as_ref().map_or(gk, |w| gk * w[k]);
                sum_gx[k] += gk * normed[k];
                sum_g[k] += gk;
            }
            if let Some(dx) = dx.as_mut() {
                let mean_scaled = scaled.iter().sum::<f64>() / n as f64;
                let mean_scaled_normed =
                    scaled.iter().zip(&normed).map(|(s, h)| s * h).sum::<f64>() / n as f64;
                for (k, d) in dx[row * n..(row + 1) * n].iter_mut().enumerate() {
                    *d = (rstd * (scaled[k] - mean_scaled - normed[k] * mean_scaled_normed)) as f32;
                }
            }
        }
        if let Some(dweight) = dweight.as_mut() {
            dweight
                .iter_mut()
                .zip(&sum_gx)
                .for_each(|(d, &s)| *d = s as f32);
        }
        if let Some(dbias) = dbias.as_mut() {
            dbias
                .iter_mut()
                .zip(&sum_g)
                .for_each(|(d, &s)| *d = s as f32);
        }
        Ok(())
    }
}

export_layer!(LayerNorm);

#[cfg(test)]
mod tests {
    use super::*;
    use layer_api::ndarray::{array, ArrayD, IxDyn};
    use layer_api::testing::{self, gradcheck, Harness, Tolerance};
    use layer_api::OUTPUT;

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

    #[test]
    fn backward_by_hand_without_affine() {
        // x = [0, 1, 2]: mean 1, variance 2/3, eps 0, so rstd = √(3/2) and
        // x̂ = √(3/2) [-1, 0, 1]. g = [0, 1, 0]: mean(g) = 1/3 and
        // mean(g x̂) = 0, so dx = √(3/2) (g - 1/3) = √(3/2) [-1/3, 2/3, -1/3].
        let config = r#"{"normalized_shape": 3, "eps": 0, "elementwise_affine": false}"#;
        let h = Harness::new::<LayerNorm>(config).unwrap();
        let got = h
            .gradients(
                vec![(INPUT, array![[0.0f32, 1.0, 2.0]].into_dyn().into())],
                &[],
                vec![(OUTPUT, array![[0.0f32, 1.0, 0.0]].into_dyn().into())],
            )
            .unwrap();
        let dx = got.inputs[0]
            .1
            .clone()
            .unwrap()
            .into_array::<f32>()
            .unwrap();
        let r = 1.5f64.sqrt();
        assert_close(&dx, &[-r / 3.0, 2.0 * r / 3.0, -r / 3.0], 1e-6);
        assert!(got.params.is_empty());
    }

    #[test]
    fn parameter_gradients_by_hand() {
        // As above, x̂ = √(3/2) [-1, 0, 1]; over two equal rows, with
        // g = [1, 2, 3] each: dbias = 2 g, dweight = 2 g x̂ = 2√(3/2) [-1, 0, 3].
        let x = array![[0.0f32, 1.0, 2.0], [0.0, 1.0, 2.0]].into_dyn();
        let g = array![[1.0f32, 2.0, 3.0], [1.0, 2.0, 3.0]].into_dyn();
        let h = Harness::new::<LayerNorm>(r#"{"normalized_shape": 3, "eps": 0}"#).unwrap();
        let got = h
            .gradients(
                vec![(INPUT, x.into())],
                &[
                    ("weight", array![1.0f32, 1.0, 1.0].into_dyn()),
                    ("bias", array![0.0f32, 0.0, 0.0].into_dyn()),
                ],
                vec![(OUTPUT, g.into())],
            )
            .unwrap();
        let r = 1.5f64.sqrt();
        assert_eq!(got.params[0].0, "weight");
        assert_close(&got.params[0].1, &[-2.0 * r, 0.0, 6.0 * r], 1e-6);
        assert_eq!(got.params[1].0, "bias");
        assert_close(&got.params[1].1, &[2.0, 4.0, 6.0], 0.0);
    }

    #[test]
    fn backward_matches_finite_differences_in_every_configuration() {
        // Rows of spread values (variance ≫ the step² of the differences),
        // so that the f32 forward's rounding stays within tolerance.
        let x = filled(&[2, 3, 5], 0).mapv(|v| 2.0 * v);
        let w = filled(&[5], 3);
        let b = filled(&[5], 7);
        let cases = [
            (
                r#"{"normalized_shape": 5}"#,
                vec![("weight", w.clone()), ("bias", b)],
            ),
            (
                r#"{"normalized_shape": 5, "bias": false}"#,
                vec![("weight", w)],
            ),
            (
                r#"{"normalized_shape": 5, "elementwise_affine": false}"#,
                vec![],
            ),
        ];
        for (config, params) in cases {
            let h = Harness::new::<LayerNorm>(config).unwrap();
            gradcheck(&h, vec![(INPUT, x.clone().into())], &params, Tolerance::F32)
                .unwrap_or_else(|e| panic!("{config}: {e}"));
        }
    }
}
