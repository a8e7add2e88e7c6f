//! `softmax`: `y = exp(x - max) / Σ exp(x - max)` along one axis, as
//! `torch.nn.Softmax(dim)`: every vector along that axis becomes positive
//! values summing to 1. Subtracting the vector's maximum keeps `exp` from
//! overflowing; `exp` and the sum are computed in `f64`, vectorized
//! (`layer_kernels::elementwise::softmax`). Any input shape of
//! rank 1 or more; the output has the same.
//!
//! Config: `dim` (required, as PyTorch recommends), the axis: `0` is the
//! first, negative counts from the end (`-1` the last).
//!
//! Backward: `dx = y ⊙ (g - Σ g ⊙ y)` along the axis, the sum in `f64`.
//!
//! Parameters: none.
//!
//! Batch independence (row `i` of the output depends only on row `i` of the
//! input) is claimed unless `dim` can name axis 0 of a batched input: `dim =
//! 0`, or `dim ≤ -2` (`-2` is axis 0 of a rank-2 input). Such a softmax
//! mixes the rows of a batch, so the host must not split it; write the
//! axis as a positive number (`1` rather than `-2` for a `(b, n, d)` input)
//! to keep the claim. `dim = -1` keeps it: it names axis 0 only of a rank-1
//! input, which has no batch axis. `flops` is 0 (unknown) whenever the
//! axis is axis 0, so the host never splits such an input across threads.
//!
//! A NaN in a vector makes all of it NaN, and a vector of only `-∞` gives
//! NaN, as in PyTorch.

use layer_api::ndarray::{Axis, Zip};
use layer_api::{export_layer, ArrayViewD, ArrayViewMutD, Grads, Layer, Params, INPUT};
use layer_kernels::elementwise::softmax;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SoftmaxConfig {
    /// The axis; negative counts from the end.
    pub dim: i64,
}

pub struct Softmax {
    dim: i64,
}

impl Softmax {
    /// `dim` as an axis of an input of rank `rank`.
    fn axis(&self, rank: usize) -> Result<usize, String> {
        let resolved = if self.dim < 0 {
            self.dim + rank as i64
        } else {
            self.dim
        };
        usize::try_from(resolved)
            .ok()
            .filter(|&a| a < rank)
            .ok_or_else(|| {
                format!(
                    "`dim` {} is out of range for an input of rank {rank} (valid: {} to {})",
                    self.dim,
                    -(rank as i64),
                    rank as i64 - 1
                )
            })
    }
}

/// Softmax of one vector `x` into `y`.
impl Layer for Softmax {
    const DESCRIPTION: &'static str =
        "y = exp(x - max) / Σ exp(x - max) along axis `dim`, as torch.nn.Softmax";
    type Config = SoftmaxConfig;

    fn new(config: SoftmaxConfig) -> Result<Self, String> {
        Ok(Softmax { dim: config.dim })
    }

    fn output_shape(&self, input_shape: &[usize]) -> Result<Vec<usize>, String> {
        self.axis(input_shape.len())?;
        Ok(input_shape.to_vec())
    }

    fn batch_independent(&self) -> bool {
        self.dim >= 1 || self.dim == -1
    }

    fn flops(&self, input_shape: &[usize]) -> u64 {
        match self.axis(input_shape.len()) {
            // Max, subtract, exp, sum, divide; exp counted as one.
            Ok(axis) if axis > 0 => 6 * input_shape.iter().product::<usize>() as u64,
            _ => 0,
        }
    }

    fn forward(
        &self,
        input: ArrayViewD<'_, f32>,
        _params: &Params<'_>,
        mut output: ArrayViewMutD<'_, f32>,
    ) -> Result<(), String> {
        let axis = self.axis(input.ndim())?;
        let len = input.shape()[axis];
        if input.is_empty() {
            return Ok(());
        }
        if axis + 1 == input.ndim() {
            if let (Some(x), Some(y)) = (input.as_slice(), output.as_slice_mut()) {
                return softmax(x, y, len);
            }
        }
        // Along another axis (or, against the host's promise, strided
        // tensors): one vector at a time, through contiguous copies.
        let (mut x, mut y) = (vec![0.0f32; len], vec![0.0f32; len]);
        let mut result = Ok(());
        Zip::from(input.lanes(Axis(axis)))
            .and(output.lanes_mut(Axis(axis)))
            .for_each(|lane_x, mut lane_y| {
                if result.is_ok() {
                    x.iter_mut().zip(lane_x).for_each(|(x, &v)| *x = v);
                    result = softmax(&x, &mut y, len);
                    lane_y.iter_mut().zip(&y).for_each(|(out, &v)| *out = v);
                }
            });
        result
    }

    const BACKWARD: bool = true;

    fn backward(
        &self,
        input: ArrayViewD<'_, f32>,
        output: ArrayViewD<'_, f32>,
        _params: &Params<'_>,
        grad_output: ArrayViewD<'_, f32>,
        grads: &mut Grads<'_>,
    ) -> Result<(), String> {
        let Some(mut dx) = grads.input::<f32>(INPUT)? else {
            return Ok(());
        };
        if input.is_empty() {
            return Ok(());
        }
        let axis = Axis(self.axis(input.ndim())?);
        Zip::from(dx.lanes_mut(axis))
            .and(output.lanes(axis))
            .and(grad_output.lanes(axis))
            .for_each(|mut dx, y, g| {
                let dot: f64 = y
                    .iter()
                    .zip(&g)
                    .map(|(&y, &g)| f64::from(y) * f64::from(g))
                    .sum();
                Zip::from(&mut dx).and(&y).and(&g).for_each(|d, &y, &g| {
                    *d = (f64::from(y) * (f64::from(g) - dot)) as f32;
                });
            });
        Ok(())
    }
}

export_layer!(Softmax);

#[cfg(test)]
mod tests {
    use super::*;
    use layer_api::ndarray::{array, ArrayD, IxDyn};
    use layer_api::testing::{self, gradcheck, Harness, Tolerance};
    use layer_api::OUTPUT;

    fn filled(shape: &[usize], seed: usize) -> ArrayD<f32> {
        let n: usize = shape.iter().product();
        let values = (0..n)
            .map(|i| (((i + seed) * 37 % 17) as f32 - 8.0) / 3.0)
            .collect();
        ArrayD::from_shape_vec(IxDyn(shape), values).unwrap()
    }

    fn run(dim: i64, x: ArrayD<f32>) -> Result<ArrayD<f32>, String> {
        testing::forward::<Softmax>(&format!(r#"{{"dim": {dim}}}"#), x, &[])
    }

    #[test]
    fn last_axis_by_hand() {
        // [0, 1]: 1 / (1 + e) and e / (1 + e). Shifting every value by the
        // same amount (1000, which would overflow exp unshifted) changes
        // nothing.
        let y = run(-1, array![[0.0f32, 1.0], [1000.0, 1001.0]].into_dyn()).unwrap();
        let want = [0.268_941_42f32, 0.731_058_6, 0.268_941_42, 0.731_058_6];
        for (g, w) in y.iter().zip(want) {
            assert!((g - w).abs() < 1e-7, "{g} != {w}");
        }
    }

    /// Softmax along axis 1 of a (2, 3, 4) input, against a loop that
    /// exponentiates without the shift (fine for these small values).
    #[test]
    fn a_middle_axis_matches_a_loop() {
        let x = filled(&[2, 3, 4], 0);
        for dim in [1, -2] {
            let y = run(dim, x.clone()).unwrap();
            for i in 0..2 {
                for k in 0..4 {
                    let total: f64 = (0..3).map(|j| f64::from(x[[i, j, k]]).exp()).sum();
                    for j in 0..3 {
                        let want = f64::from(x[[i, j, k]]).exp() / total;
                        let got = f64::from(y[[i, j, k]]);
                        assert!(
                            (got - want).abs() < 1e-7,
                            "[{i}, {j}, {k}]: {got} != {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn axis_zero_mixes_the_rows() {
        let x = array![[1.0f32, 0.0], [1.0, 0.0]].into_dyn();
        let y = run(0, x).unwrap();
        assert_eq!(y, array![[0.5f32, 0.5], [0.5, 0.5]].into_dyn());
    }

    #[test]
    fn batch_independence_is_claimed_unless_dim_can_be_axis_zero() {
        let claims = |dim: i64| Softmax { dim }.batch_independent();
        assert!(claims(1) && claims(3) && claims(-1));
        assert!(!claims(0) && !claims(-2) && !claims(-3));
    }

    #[test]
    fn nan_spreads_over_its_vector_only() {
        let y = run(1, array![[1.0f32, f32::NAN], [0.0, 0.0]].into_dyn()).unwrap();
        assert!(y[[0, 0]].is_nan() && y[[0, 1]].is_nan(), "{y}");
        assert_eq!((y[[1, 0]], y[[1, 1]]), (0.5, 0.5));
        let y = run(1, array![[f32::NAN, 1.0]].into_dyn()).unwrap();
        assert!(y.iter().all(|v| v.is_nan()), "{y}");
        let y = run(
            -1,
            array![f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY].into_dyn(),
        )
        .unwrap();
        assert_eq!(y, array![0.0f32, 1.0, 0.0].into_dyn());
        let y = run(-1, array![f32::NEG_INFINITY, f32::NEG_INFINITY].into_dyn()).unwrap();
        assert!(y.iter().all(|v| v.is_nan()), "{y}");
    }

    #[test]
    fn refuses_axes_out_of_range_and_a_missing_dim() {
        let err = run(2, filled(&[3, 2], 0)).unwrap_err();
        assert_eq!(
            err,
            "`dim` 2 is out of range for an input of rank 2 (valid: -2 to 1)"
        );
        let err = run(-3, filled(&[3, 2], 0)).unwrap_err();
        assert!(err.starts_with("`dim` -3 is out of range"), "{err}");
        assert!(run(0, ArrayD::zeros(IxDyn(&[]))).is_err());
        let err = testing::forward::<Softmax>("{}", filled(&[2], 0), &[]).unwrap_err();
        assert!(err.contains("missing field `dim`"), "{err}");
    }

    #[test]
    fn backward_by_hand() {
        // y = [1/2, 1/2] (x = [0, 0]), g = [1, 0]: Σ g y = 1/2, so
        // dx = [1/2 · 1/2, 1/2 · (-1/2)] = [1/4, -1/4]. Along axis 0 of a
        // (2, 1) input, the same.
        for (dim, x, g) in [
            (-1, array![[0.0f32, 0.0]], array![[1.0f32, 0.0]]),
            (0, array![[0.0f32], [0.0]], array![[1.0f32], [0.0]]),
        ] {
            let h = Harness::new::<Softmax>(&format!(r#"{{"dim": {dim}}}"#)).unwrap();
            let got = h
                .gradients(
                    vec![(INPUT, x.into_dyn().into())],
                    &[],
                    vec![(OUTPUT, g.into_dyn().into())],
                )
                .unwrap();
            let dx = got.inputs[0]
                .1
                .clone()
                .unwrap()
                .into_array::<f32>()
                .unwrap();
            assert_eq!(dx.iter().copied().collect::<Vec<_>>(), [0.25, -0.25]);
        }
    }

    #[test]
    fn backward_matches_finite_differences_along_each_axis() {
        let x = filled(&[2, 3, 4], 1);
        for dim in [-1, 1, 0] {
            let h = Harness::new::<Softmax>(&format!(r#"{{"dim": {dim}}}"#)).unwrap();
            gradcheck(&h, vec![(INPUT, x.clone().into())], &[], Tolerance::F32)
                .unwrap_or_else(|e| panic!("dim {dim}: {e}"));
        }
    }
}
