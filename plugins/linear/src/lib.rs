//! `linear`: `torch.nn.Linear` exactly: `y = x · Wᵀ + b` with `W` of shape
//! `(out_features, in_features)` and `b` of shape `(out_features,)`, no
//! activation. `"bias": false` leaves `b` out, as `nn.Linear(…, bias=False)`
//! does, so a `state_dict` of `nn.Sequential(nn.Linear(…), …)` saved with
//! safetensors loads as it is. The last input axis holds the features; any
//! leading axes are kept. `in_features` may be left out of the config and is
//! then taken from the input. `prepare` packs `Wᵀ` once per parameter set,
//! in the panels the kernels' dense product reads (`layer_kernels::dense`),
//! so that no call repacks it.
//!
//! Backward: `dx = g · W`, `dW = gᵀ · x` (matrix products, on the raw
//! `(out_features, in_features)` weight) and `db = Σ g` over the rows.
//!
//! Parameters and their default initializers, PyTorch's; a model file may
//! override either with `"init"`:
//!
//! | parameter | shape | default | fans (Xavier, Kaiming) |
//! | --- | --- | --- | --- |
//! | `weight` | `(out_features, in_features)` | `kaiming_uniform` (fan in, gain `√(1/3)`): uniform on `±1/√in_features`, as `kaiming_uniform_(a = √5)` | in `in_features`, out `out_features` |
//! | `bias` (unless `"bias": false`) | `(out_features,)` | `uniform` on `±1/√in_features` | in and out `out_features` |

use layer_api::{
    export_layer, last_axis_features, ArrayViewD, ArrayViewMutD, FanMode, Grads, Init, Layer,
    ParamSpec, Params, Prepared, INPUT,
};
use layer_kernels::dense::{self, Epilogue, PackedWeights};
use ndarray::{ArrayView2, Ix1, Ix2};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinearConfig {
    /// Number of output features.
    pub out_features: usize,
    /// Number of input features; inferred from the input when absent.
    #[serde(default)]
    pub in_features: Option<usize>,
    /// Whether the layer adds a bias (default true, as in PyTorch).
    #[serde(default = "yes")]
    pub bias: bool,
}

fn yes() -> bool {
    true
}

pub struct Linear {
    out_features: usize,
    in_features: Option<usize>,
    bias: bool,
}

impl Linear {
    /// The number of input features, checked against the config.
    fn in_features(&self, input_shape: &[usize]) -> Result<usize, String> {
        last_axis_features(input_shape, self.in_features, "in_features")
    }
}

impl Layer for Linear {
    const DESCRIPTION: &'static str =
        "y = x · Wᵀ + b, W of shape (out_features, in_features), as torch.nn.Linear";
    type Config = LinearConfig;

    fn new(config: LinearConfig) -> Result<Self, String> {
        if config.out_features == 0 {
            return Err("`out_features` must be at least 1".into());
        }
        if config.in_features == Some(0) {
            return Err("`in_features` must be at least 1 (or left out to infer it)".into());
        }
        Ok(Linear {
            out_features: config.out_features,
            in_features: config.in_features,
            bias: config.bias,
        })
    }

    fn output_shape(&self, input_shape: &[usize]) -> Result<Vec<usize>, String> {
        self.in_features(input_shape)?;
        let mut shape = input_shape.to_vec();
        *shape.last_mut().expect("rank checked") = self.out_features;
        Ok(shape)
    }

    fn params(&self, input_shape: &[usize]) -> Result<Vec<ParamSpec>, String> {
        let in_features = self.in_features(input_shape)?;
        let bound = 1.0 / (in_features as f32).sqrt();
        let mut specs = vec![ParamSpec::new(
            "weight",
            [self.out_features, in_features],
            Init::KaimingUniform {
                mode: FanMode::FanIn,
                gain: (1.0f32 / 3.0).sqrt(),
            },
        )
        .fans(in_features, self.out_features)];
        if self.bias {
            specs.push(ParamSpec::new(
                "bias",
                [self.out_features],
                Init::uniform(-bound, bound),
            ));
        }
        Ok(specs)
    }

    fn batch_independent(&self) -> bool {
        true
    }

    fn flops(&self, input_shape: &[usize]) -> u64 {
        let Some((&in_features, leading)) = input_shape.split_last() else {
            return 0;
        };
        let rows: usize = leading.iter().product();
        let bias = if self.bias {
            rows * self.out_features
        } else {
            0
        };
        (2 * rows * in_features * self.out_features + bias) as u64
    }

    fn prepare(
        &self,
        input_shape: &[usize],
        params: &Params<'_>,
    ) -> Result<Option<Prepared>, String> {
        let in_features = self.in_features(input_shape)?;
        let weight = params.get::<Ix2>("weight")?;
        let expected = (self.out_features, in_features);
        if weight.dim() != expected {
            return Err(format!(
                "parameter `weight` has shape {:?}, not {expected:?}",
                weight.shape()
            ));
        }
        Ok(Some(Box::new(PackedWeights::pack(weight.t())?)))
    }

    fn forward(
        &self,
        input: ArrayViewD<'_, f32>,
        params: &Params<'_>,
        output: ArrayViewMutD<'_, f32>,
    ) -> Result<(), String> {
        // `Wᵀ`, packed: shape (in_features, out_features).
        let weight = params.prepared::<PackedWeights>()?;
        let (in_features, out_features) = weight.dim();
        if input.shape().last() != Some(&in_features) || out_features != self.out_features {
            return Err(format!(
                "the weight was prepared as {in_features} → {out_features}, but the input has \
                 shape {:?}",
                input.shape()
            ));
        }
        // The leading axes, not len / in_features: an input with no
        // features still has its rows.
        let rows: usize = input.shape()[..input.ndim().saturating_sub(1)]
            .iter()
            .product();
        let x = input
            .into_shape_with_order((rows, in_features))
            .map_err(|e| format!("input as ({rows}, {in_features}): {e}"))?;
        let y = output
            .into_shape_with_order((rows, out_features))
            .map_err(|e| format!("output as ({rows}, {out_features}): {e}"))?;
        let bias = if self.bias {
            Some(params.get::<Ix1>("bias")?)
        } else {
            None
        };
        let epilogue = match &bias {
            Some(b) => Epilogue::Bias(b.as_slice().ok_or("the bias is not contiguous")?),
            None => Epilogue::None,
        };
        dense::product(x, weight, y, epilogue)
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
        // The raw (out_features, in_features) weight: dx = g · W reads it
        // row-major as it is.
        let weight = params.get::<Ix2>("weight")?;
        let (out_features, in_features) = weight.dim();
        let rows: usize = input.shape()[..input.ndim().saturating_sub(1)]
            .iter()
            .product();
        let x = as_rows("input", input, rows, in_features)?;
        let g = as_rows("output gradient", grad_output, rows, out_features)?;
        if let Some(dx) = grads.input::<f32>(INPUT)? {
            let dx = dx
                .into_shape_with_order((rows, in_features))
                .map_err(|e| format!("input gradient as ({rows}, {in_features}): {e}"))?;
            layer_kernels::matmul(g, weight, dx)?;
        }
        if let Some(dw) = grads.param("weight")? {
            let dw = dw
                .into_shape_with_order((out_features, in_features))
                .map_err(|e| format!("weight gradient as ({out_features}, {in_features}): {e}"))?;
            layer_kernels::matmul(g.t(), x, dw)?;
        }
        if self.bias {
            if let Some(mut db) = grads.param("bias")? {
                let mut sums = vec![0.0f64; out_features];
                for row in g.rows() {
                    sums.iter_mut()
                        .zip(row)
                        .for_each(|(s, &v)| *s += f64::from(v));
                }
                db.iter_mut().zip(sums).for_each(|(d, s)| *d = s as f32);
            }
        }
        Ok(())
    }
}

/// `a` as a matrix of `rows` rows of `cols`.
fn as_rows<'a>(
    what: &str,
    a: ArrayViewD<'a, f32>,
    rows: usize,
    cols: usize,
) -> Result<ArrayView2<'a, f32>, String> {
    a.into_shape_with_order((rows, cols))
        .map_err(|e| format!("{what} as ({rows}, {cols}): {e}"))
}

export_layer!(Linear);

#[cfg(test)]
mod tests {
    use super::*;
    use layer_api::ndarray::{array, ArrayD, IxDyn};
    use layer_api::testing::{self, gradcheck, Harness, Tolerance};
    use layer_api::OUTPUT;

    fn filled(shape: &[usize], seed: usize) -> ArrayD<f32> {
        let n: usize = shape.iter().product();
        let values = (0..n)
            .map(|i| (((i + seed) * 37 % 17) as f32 - 8.0) / 8.0)
            .collect();
        ArrayD::from_shape_vec(IxDyn(shape), values).unwrap()
    }

    /// torch.nn.Linear: `y[.., o] = Σ_i x[.., i] W[o, i] + b[o]`, by loops.
    fn torch_linear(x: &ArrayD<f32>, w: &ArrayD<f32>, b: Option<&ArrayD<f32>>) -> Vec<f32> {
        let (out_features, in_features) = (w.shape()[0], w.shape()[1]);
        let x = x.as_slice().unwrap();
        let mut y = Vec::new();
        for row in x.chunks(in_features) {
            for o in 0..out_features {
                let mut sum = b.map_or(0.0, |b| f64::from(b[[o]]));
                for (i, &xi) in row.iter().enumerate() {
                    sum += f64::from(xi) * f64::from(w[[o, i]]);
                }
                y.push(sum as f32);
            }
        }
        y
    }

    fn assert_close(got: &ArrayD<f32>, want: &[f32]) {
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-5, "{g} != {w}");
        }
    }

    #[test]
    fn computes_x_w_transposed_plus_b_by_hand() {
        // W rows are outputs: y0 = 1·1 + 2·2 + 0.5 = 5.5, y1 = 1·(-1) + 2·0 - 1 = -2
        // (no activation, so the negative stays).
        let x = array![[1.0f32, 2.0]].into_dyn();
        let w = array![[1.0f32, 2.0], [-1.0, 0.0]].into_dyn();
        let b = array![0.5f32, -1.0].into_dyn();
        let y =
            testing::forward::<Linear>(r#"{"out_features": 2}"#, x, &[("weight", w), ("bias", b)])
                .unwrap();
        assert_eq!(y, array![[5.5f32, -2.0]].into_dyn());
    }

    #[test]
    fn matches_torch_linear_and_keeps_leading_axes() {
        let x = filled(&[2, 3, 5], 0);
        let w = filled(&[4, 5], 3);
        let b = filled(&[4], 9);
        let y = testing::forward::<Linear>(
            r#"{"out_features": 4, "in_features": 5}"#,
            x.clone(),
            &[("weight", w.clone()), ("bias", b.clone())],
        )
        .unwrap();
        assert_eq!(y.shape(), &[2, 3, 4]);
        assert_close(&y, &torch_linear(&x, &w, Some(&b)));
    }

    #[test]
    fn without_bias_declares_and_adds_none() {
        let x = filled(&[3, 5], 1);
        let w = filled(&[2, 5], 7);
        // Only `weight` is given: a declared `bias` would fail for want of a value.
        let y = testing::forward::<Linear>(
            r#"{"out_features": 2, "bias": false}"#,
            x.clone(),
            &[("weight", w.clone())],
        )
        .unwrap();
        assert_close(&y, &torch_linear(&x, &w, None));
    }

    #[test]
    fn refuses_bad_configs_and_inputs() {
        let x = || filled(&[1, 4], 0);
        let err = testing::forward::<Linear>(r#"{"out_features": 0}"#, x(), &[]).unwrap_err();
        assert_eq!(err, "`out_features` must be at least 1");
        let err = testing::forward::<Linear>(r#"{"out_features": 2, "in_features": 0}"#, x(), &[])
            .unwrap_err();
        assert!(err.starts_with("`in_features` must be at least 1"), "{err}");
        let err = testing::forward::<Linear>(r#"{"out_features": 2, "in_features": 3}"#, x(), &[])
            .unwrap_err();
        assert!(
            err.contains("expects 3 input features (config `in_features`)"),
            "{err}"
        );
        let err =
            testing::forward::<Linear>(r#"{"out_features": 2, "bias": 1}"#, x(), &[]).unwrap_err();
        assert!(err.contains("expected a boolean"), "{err}");
    }

    #[test]
    fn backward_of_a_one_by_two_case_by_hand() {
        // W = [[1, 2], [-1, 0]] (rows are outputs), x = [1, 2], g = [3, -1]:
        // dx = g · W = [3·1 - 1·(-1), 3·2 - 1·0] = [4, 6];
        // dW = gᵀ x = [[3, 6], [-1, -2]]; db = g.
        let x = array![[1.0f32, 2.0]].into_dyn();
        let w = array![[1.0f32, 2.0], [-1.0, 0.0]].into_dyn();
        let b = array![0.5f32, -1.0].into_dyn();
        let h = Harness::new::<Linear>(r#"{"out_features": 2}"#).unwrap();
        let got = h
            .gradients(
                vec![(INPUT, x.into())],
                &[("weight", w), ("bias", b)],
                vec![(OUTPUT, array![[3.0f32, -1.0]].into_dyn().into())],
            )
            .unwrap();
        let dx = got.inputs[0].1.clone().unwrap();
        assert_eq!(
            dx.into_array::<f32>().unwrap(),
            array![[4.0f32, 6.0]].into_dyn()
        );
        assert_eq!(got.params[0].0, "weight");
        assert_eq!(
            got.params[0].1,
            array![[3.0f32, 6.0], [-1.0, -2.0]].into_dyn()
        );
        assert_eq!(got.params[1].0, "bias");
        assert_eq!(got.params[1].1, array![3.0f32, -1.0].into_dyn());
    }

    #[test]
    fn backward_matches_finite_differences_with_and_without_bias() {
        let x = filled(&[2, 3, 5], 0);
        let w = filled(&[4, 5], 3);
        let b = filled(&[4], 9);
        let h = Harness::new::<Linear>(r#"{"out_features": 4}"#).unwrap();
        gradcheck(
            &h,
            vec![(INPUT, x.clone().into())],
            &[("weight", w.clone()), ("bias", b)],
            Tolerance::F32,
        )
        .unwrap();
        let h = Harness::new::<Linear>(r#"{"out_features": 4, "bias": false}"#).unwrap();
        gradcheck(
            &h,
            vec![(INPUT, x.into())],
            &[("weight", w)],
            Tolerance::F32,
        )
        .unwrap();
    }
}
