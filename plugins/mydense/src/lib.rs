//! `mydense`: `y = relu(x · W + b)` with `W` of shape `(in_units, units)` and
//! `b` of shape `(units,)` (the custom-layers chapter's `MyDense`/`MyLinear`).
//! The last input axis holds the features; any leading axes are kept, so an
//! input `(2, 3, 64)` gives `(2, 3, units)`. `in_units` may be left out of the
//! config and is then taken from the input. A NaN stays NaN through the
//! relu, as in PyTorch, rather than becoming 0. `prepare` packs `W` once per
//! parameter set for the kernels' dense product (`layer_kernels::dense`),
//! which adds the bias and the relu to each tile of `y` while it is in
//! registers.
//!
//! Backward: with `gz = g` where `y > 0` (else 0, as torch's relu),
//! `dx = gz · Wᵀ`, `dW = xᵀ · gz` (matrix products) and `db = Σ gz` over the
//! rows.
//!
//! Parameters and their default initializers, as the chapter's `MyLinear`
//! (`torch.randn`); a model file may override either with `"init"`:
//!
//! | parameter | shape | default | fans (Xavier, Kaiming) |
//! | --- | --- | --- | --- |
//! | `weight` | `(in_units, units)` | `normal` (mean 0, std 1) | in `in_units`, out `units` |
//! | `bias` | `(units,)` | `normal` (mean 0, std 1) | in and out `units` |

use layer_api::{
    export_layer, last_axis_features, ArrayViewD, ArrayViewMutD, Grads, Init, Layer, ParamSpec,
    Params, Prepared, INPUT,
};
use layer_kernels::dense::{self, Epilogue, PackedWeights};
use ndarray::{Array2, ArrayView2, Ix1, Ix2, Zip};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MyDenseConfig {
    /// Number of output features.
    pub units: usize,
    /// Number of input features; inferred from the input when absent.
    #[serde(default)]
    pub in_units: Option<usize>,
}

pub struct MyDense {
    units: usize,
    in_units: Option<usize>,
}

impl MyDense {
    /// The number of input features, checked against the config.
    fn in_units(&self, input_shape: &[usize]) -> Result<usize, String> {
        last_axis_features(input_shape, self.in_units, "in_units")
    }
}

impl Layer for MyDense {
    const DESCRIPTION: &'static str = "y = relu(x · W + b), W of shape (in_units, units)";
    type Config = MyDenseConfig;

    fn new(config: MyDenseConfig) -> Result<Self, String> {
        if config.units == 0 {
            return Err("`units` must be at least 1".into());
        }
        if config.in_units == Some(0) {
            return Err("`in_units` must be at least 1 (or left out to infer it)".into());
        }
        Ok(MyDense {
            units: config.units,
            in_units: config.in_units,
        })
    }

    fn output_shape(&self, input_shape: &[usize]) -> Result<Vec<usize>, String> {
        self.in_units(input_shape)?;
        let mut shape = input_shape.to_vec();
        *shape.last_mut().expect("rank checked") = self.units;
        Ok(shape)
    }

    fn params(&self, input_shape: &[usize]) -> Result<Vec<ParamSpec>, String> {
        let in_units = self.in_units(input_shape)?;
        Ok(vec![
            ParamSpec::new("weight", [in_units, self.units], Init::normal(0.0, 1.0))
                .fans(in_units, self.units),
            ParamSpec::new("bias", [self.units], Init::normal(0.0, 1.0)),
        ])
    }

    fn batch_independent(&self) -> bool {
        true
    }

    fn flops(&self, input_shape: &[usize]) -> u64 {
        let Ok(in_units) = self.in_units(input_shape) else {
            return 0;
        };
        let rows: usize = input_shape[..input_shape.len() - 1].iter().product();
        // The product, then bias and relu.
        (2 * rows * in_units * self.units + 2 * rows * self.units) as u64
    }

    /// Packs `W` once per parameter set for the kernels' dense product,
    /// so that no call repacks it (3 MB for 784 → 1024).
    fn prepare(
        &self,
        input_shape: &[usize],
        params: &Params<'_>,
    ) -> Result<Option<Prepared>, String> {
        let in_units = self.in_units(input_shape)?;
        let weight = params.get::<Ix2>("weight")?;
        if weight.dim() != (in_units, self.units) {
            return Err(format!(
                "parameter `weight` has shape {:?}, not {:?}",
                weight.shape(),
                (in_units, self.units)
            ));
        }
        Ok(Some(Box::new(PackedWeights::pack(weight)?)))
    }

    fn forward(
        &self,
        input: ArrayViewD<'_, f32>,
        params: &Params<'_>,
        output: ArrayViewMutD<'_, f32>,
    ) -> Result<(), String> {
        let weight = params.prepared::<PackedWeights>()?;
        let bias = params.get::<Ix1>("bias")?;
        let (in_units, units) = weight.dim();
        if input.shape().last() != Some(&in_units) || units != self.units {
            return Err(format!(
                "the weight was prepared as {in_units} → {units}, but the input has shape {:?}",
                input.shape()
            ));
        }
        // The leading axes, not len / in_units: an input with no features
        // still has its rows.
        let rows: usize = input.shape()[..input.ndim().saturating_sub(1)]
            .iter()
            .product();
        let x = input
            .into_shape_with_order((rows, in_units))
            .map_err(|e| format!("input as ({rows}, {in_units}): {e}"))?;
        let y = output
            .into_shape_with_order((rows, units))
            .map_err(|e| format!("output as ({rows}, {units}): {e}"))?;
        let bias = bias.as_slice().ok_or("the bias is not contiguous")?;
        dense::product(x, weight, y, Epilogue::BiasRelu(bias))
    }

    const BACKWARD: bool = true;

    fn backward(
        &self,
        input: ArrayViewD<'_, f32>,
        output: ArrayViewD<'_, f32>,
        params: &Params<'_>,
        grad_output: ArrayViewD<'_, f32>,
        grads: &mut Grads<'_>,
    ) -> Result<(), String> {
        let weight = params.get::<Ix2>("weight")?;
        let in_units = weight.nrows();
        let rows: usize = input.shape()[..input.ndim().saturating_sub(1)]
            .iter()
            .product();
        let units = self.units;
        let x = as_rows("input", input, rows, in_units)?;
        let y = as_rows("output", output, rows, units)?;
        let g = as_rows("output gradient", grad_output, rows, units)?;
        // The gradient before the relu: passed where it let y through.
        let mut gz = Array2::<f32>::zeros((rows, units));
        Zip::from(&mut gz)
            .and(&y)
            .and(&g)
            .for_each(|gz, &y, &g| *gz = if y > 0.0 { g } else { 0.0 });
        if let Some(dx) = grads.input::<f32>(INPUT)? {
            let dx = dx
                .into_shape_with_order((rows, in_units))
                .map_err(|e| format!("input gradient as ({rows}, {in_units}): {e}"))?;
            layer_kernels::matmul(gz.view(), weight.t(), dx)?;
        }
        if let Some(dw) = grads.param("weight")? {
            let dw = dw
                .into_shape_with_order((in_units, units))
                .map_err(|e| format!("weight gradient as ({in_units}, {units}): {e}"))?;
            layer_kernels::matmul(x.t(), gz.view(), dw)?;
        }
        if let Some(mut db) = grads.param("bias")? {
            let mut sums = vec![0.0f64; units];
            for row in gz.rows() {
                sums.iter_mut()
                    .zip(row)
                    .for_each(|(s, &v)| *s += f64::from(v));
            }
            db.iter_mut().zip(sums).for_each(|(d, s)| *d = s as f32);
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

export_layer!(MyDense);

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

    #[test]
    fn computes_relu_of_x_w_plus_b_by_hand() {
        // x W = [1·1 + 2·3, 1·(-2) + 2·0.5] = [7, -1]; + b = [6.5, -0.5];
        // relu zeroes the second.
        let x = array![[1.0f32, 2.0]].into_dyn();
        let w = array![[1.0f32, -2.0], [3.0, 0.5]].into_dyn();
        let b = array![-0.5f32, 0.5].into_dyn();
        let y = testing::forward::<MyDense>(r#"{"units": 2}"#, x, &[("weight", w), ("bias", b)])
            .unwrap();
        assert_eq!(y, array![[6.5f32, 0.0]].into_dyn());
    }

    #[test]
    fn matches_explicit_loops_and_keeps_leading_axes() {
        let (in_units, units) = (4, 3);
        let x = filled(&[2, 3, in_units], 0);
        let w = filled(&[in_units, units], 5);
        let b = filled(&[units], 11);
        let y = testing::forward::<MyDense>(
            r#"{"units": 3, "in_units": 4}"#,
            x.clone(),
            &[("weight", w.clone()), ("bias", b.clone())],
        )
        .unwrap();
        assert_eq!(y.shape(), &[2, 3, units]);
        let mut zeros = 0;
        for a in 0..2 {
            for r in 0..3 {
                for k in 0..units {
                    let mut sum = f64::from(b[[k]]);
                    for i in 0..in_units {
                        sum += f64::from(x[[a, r, i]]) * f64::from(w[[i, k]]);
                    }
                    let want = sum.max(0.0) as f32;
                    zeros += usize::from(want == 0.0);
                    let got = y[[a, r, k]];
                    assert!(
                        (got - want).abs() < 1e-5,
                        "[{a}, {r}, {k}]: {got} != {want}"
                    );
                }
            }
        }
        assert!(zeros > 0 && zeros < 18, "the case exercises relu both ways");
    }

    #[test]
    fn nan_stays_nan_as_in_torch() {
        // Row 0: a NaN input; row 1: a NaN bias reaches the second unit only;
        // -inf and +inf go through relu as torch's do.
        let x = array![[f32::NAN, 1.0], [1.0, 0.0], [f32::NEG_INFINITY, 0.0]].into_dyn();
        let w = array![[1.0f32, 0.0], [0.0, 1.0]].into_dyn();
        let b = array![0.0f32, f32::NAN].into_dyn();
        let y = testing::forward::<MyDense>(r#"{"units": 2}"#, x, &[("weight", w), ("bias", b)])
            .unwrap();
        assert!(y[[0, 0]].is_nan(), "relu(NaN) = {}", y[[0, 0]]);
        assert!(y[[0, 1]].is_nan() && y[[1, 1]].is_nan(), "{y}");
        assert_eq!(y[[1, 0]], 1.0);
        assert_eq!(y[[2, 0]], 0.0, "relu(-inf) = 0");
        let y = testing::forward::<MyDense>(
            r#"{"units": 1}"#,
            array![[f32::INFINITY]].into_dyn(),
            &[
                ("weight", array![[1.0f32]].into_dyn()),
                ("bias", array![-1.0f32].into_dyn()),
            ],
        )
        .unwrap();
        assert_eq!(y[[0, 0]], f32::INFINITY);
    }

    #[test]
    fn refuses_bad_configs_and_inputs() {
        let x = || filled(&[1, 4], 0);
        let err = testing::forward::<MyDense>(r#"{"units": 0}"#, x(), &[]).unwrap_err();
        assert_eq!(err, "`units` must be at least 1");
        let err =
            testing::forward::<MyDense>(r#"{"units": 2, "in_units": 0}"#, x(), &[]).unwrap_err();
        assert!(err.starts_with("`in_units` must be at least 1"), "{err}");
        let err =
            testing::forward::<MyDense>(r#"{"units": 2, "in_units": 3}"#, x(), &[]).unwrap_err();
        assert!(
            err.contains("expects 3 input features (config `in_units`)"),
            "{err}"
        );
        let err = testing::forward::<MyDense>(r#"{"unit": 2}"#, x(), &[]).unwrap_err();
        assert!(err.contains("unknown field `unit`"), "{err}");
    }

    #[test]
    fn backward_of_a_one_by_two_case_by_hand() {
        // As `computes_relu_of_x_w_plus_b_by_hand`: y = [6.5, 0] (the second
        // unit is cut by the relu). g = [2, 5]: gz = [2, 0], so
        // dx = gz · Wᵀ = [2·1, 2·3] = [2, 6], dW = xᵀ gz = [[2, 0], [4, 0]],
        // db = [2, 0].
        let x = array![[1.0f32, 2.0]].into_dyn();
        let w = array![[1.0f32, -2.0], [3.0, 0.5]].into_dyn();
        let b = array![-0.5f32, 0.5].into_dyn();
        let h = Harness::new::<MyDense>(r#"{"units": 2}"#).unwrap();
        let got = h
            .gradients(
                vec![(INPUT, x.into())],
                &[("weight", w), ("bias", b)],
                vec![(OUTPUT, array![[2.0f32, 5.0]].into_dyn().into())],
            )
            .unwrap();
        let dx = got.inputs[0].1.clone().unwrap();
        assert_eq!(
            dx.into_array::<f32>().unwrap(),
            array![[2.0f32, 6.0]].into_dyn()
        );
        assert_eq!(got.params[0].0, "weight");
        assert_eq!(
            got.params[0].1,
            array![[2.0f32, 0.0], [4.0, 0.0]].into_dyn()
        );
        assert_eq!(got.params[1].0, "bias");
        assert_eq!(got.params[1].1, array![2.0f32, 0.0].into_dyn());
    }

    #[test]
    fn backward_matches_finite_differences_with_leading_axes() {
        let (in_units, units) = (4, 3);
        let x = filled(&[2, 3, in_units], 0);
        let w = filled(&[in_units, units], 5);
        let b = filled(&[units], 11);
        // Every pre-activation x·W + b stays clear of the relu's kink: a
        // step of 1e-2 in one value (all |values| ≤ 1) moves it by ≤ 1e-2.
        let x2 = x.view().into_shape_with_order((6, in_units)).unwrap();
        let w2 = w.view().into_shape_with_order((in_units, units)).unwrap();
        let (mut cut, mut kept) = (0, 0);
        for r in 0..6 {
            for k in 0..units {
                let z: f32 = (0..in_units).map(|i| x2[[r, i]] * w2[[i, k]]).sum::<f32>() + b[[k]];
                assert!(z.abs() > 0.04, "pre-activation {z} too near 0");
                if z > 0.0 {
                    kept += 1;
                } else {
                    cut += 1;
                }
            }
        }
        assert!(cut > 0 && kept > 0, "the case exercises relu both ways");
        let h = Harness::new::<MyDense>(r#"{"units": 3}"#).unwrap();
        gradcheck(
            &h,
            vec![(INPUT, x.into())],
            &[("weight", w), ("bias", b)],
            Tolerance::F32,
        )
        .unwrap();
    }
}
