//! `mean`: the mean over some axes, as `torch.mean(x, dim=dims,
//! keepdim=keepdim)`. The sums are computed in `f64`. The reduced axes are
//! removed from the shape, or kept with size 1 when `keepdim` is true: a
//! `(2, 3, 4)` input with `dims = [1]` gives `(2, 4)`, or `(2, 1, 4)`. The
//! mean over an empty axis is NaN, as in PyTorch.
//!
//! Config:
//!
//! * `dims` (required): the axes to average over, a non-empty list without
//!   repeats; negative counts from the end (`-1` the last).
//! * `keepdim` (default false).
//!
//! Backward: each input element gets its output element's gradient divided
//! by the number of elements averaged (in `f64`).
//!
//! Parameters: none.
//!
//! Batch independence (row `i` of the output depends only on row `i` of the
//! input) is claimed unless an axis in `dims` can be axis 0 of a batched
//! input: `0`, or `≤ -2` (`-2` is axis 0 of a rank-2 input). Averaging over
//! axis 0 mixes the rows of a batch, so the host must not split it; write
//! axes as positive numbers (`1` rather than `-2` for a `(b, n, d)` input)
//! to keep the claim. `-1` keeps it: it names axis 0 only of a rank-1
//! input, which has no batch axis.

use layer_api::ndarray::{Axis, IxDyn};
use layer_api::{export_layer, ArrayViewD, ArrayViewMutD, Grads, Layer, Params, INPUT};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeanConfig {
    /// The axes to reduce; negative counts from the end.
    pub dims: Vec<i64>,
    /// Keep the reduced axes with size 1.
    #[serde(default)]
    pub keepdim: bool,
}

pub struct Mean {
    dims: Vec<i64>,
    keepdim: bool,
}

impl Mean {
    /// Whether each axis of an input of rank `rank` is reduced.
    fn reduced(&self, rank: usize) -> Result<Vec<bool>, String> {
        let mut reduced = vec![false; rank];
        for &dim in &self.dims {
            let axis = usize::try_from(if dim < 0 { dim + rank as i64 } else { dim })
                .ok()
                .filter(|&a| a < rank)
                .ok_or_else(|| {
                    format!(
                        "`dims` has {dim}, out of range for an input of rank {rank} (valid: {} \
                         to {})",
                        -(rank as i64),
                        rank as i64 - 1
                    )
                })?;
            if std::mem::replace(&mut reduced[axis], true) {
                return Err(format!(
                    "`dims` {:?} names axis {axis} twice for an input of rank {rank}",
                    self.dims
                ));
            }
        }
        Ok(reduced)
    }
}

impl Layer for Mean {
    const DESCRIPTION: &'static str =
        "the mean over axes `dims` (kept as size 1 if `keepdim`), as torch.mean";
    type Config = MeanConfig;

    fn new(config: MeanConfig) -> Result<Self, String> {
        if config.dims.is_empty() {
            return Err("`dims` must name at least one axis".into());
        }
        for (i, d) in config.dims.iter().enumerate() {
            if config.dims[..i].contains(d) {
                return Err(format!("`dims` {:?} has {d} twice", config.dims));
            }
        }
        Ok(Mean {
            dims: config.dims,
            keepdim: config.keepdim,
        })
    }

    fn output_shape(&self, input_shape: &[usize]) -> Result<Vec<usize>, String> {
        let reduced = self.reduced(input_shape.len())?;
        Ok(input_shape
            .iter()
            .zip(&reduced)
            .filter_map(|(&size, &r)| match (r, self.keepdim) {
                (false, _) => Some(size),
                (true, true) => Some(1),
                (true, false) => None,
            })
            .collect())
    }

    fn batch_independent(&self) -> bool {
        self.dims.iter().all(|&d| d >= 1 || d == -1)
    }

    fn flops(&self, input_shape: &[usize]) -> u64 {
        input_shape.iter().product::<usize>() as u64
    }

    fn forward(
        &self,
        input: ArrayViewD<'_, f32>,
        _params: &Params<'_>,
        mut output: ArrayViewMutD<'_, f32>,
    ) -> Result<(), String> {
        let reduced = self.reduced(input.ndim())?;
        if let Some((outer, count, inner)) = one_block(input.shape(), &reduced) {
            if let (Some(x), Some(y)) = (input.as_slice(), output.as_slice_mut()) {
                mean_of_block(x, (outer, count, inner), y);
                return Ok(());
            }
        }
        // Kept axes first, then the reduced ones: in C order, each output
        // element's inputs are then one contiguous run of `count`.
        let (kept, gone): (Vec<usize>, Vec<usize>) = (0..input.ndim()).partition(|&a| !reduced[a]);
        let count: usize = gone.iter().map(|&a| input.len_of(Axis(a))).product();
        let order: Vec<usize> = kept.into_iter().chain(gone).collect();
        let x = input.permuted_axes(IxDyn(&order));
        let x = x.as_standard_layout();
        let x = x.as_slice().ok_or("the permuted input is not contiguous")?;
        if count == 0 {
            output.fill(f32::NAN);
            return Ok(());
        }
        for (y, run) in output.iter_mut().zip(x.chunks_exact(count)) {
            let sum: f64 = run.iter().map(|&v| f64::from(v)).sum();
            *y = (sum / count as f64) as f32;
        }
        Ok(())
    }

    const BACKWARD: bool = true;

    fn backward(
        &self,
        input: ArrayViewD<'_, f32>,
        _output: ArrayViewD<'_, f32>,
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
        let reduced = self.reduced(input.ndim())?;
        let count: usize = (0..input.ndim())
            .filter(|&a| reduced[a])
            .map(|a| input.len_of(Axis(a)))
            .product();
        // The gradient with the reduced axes kept as size 1 (the same
        // elements in the same order), broadcast back over them.
        let kept: Vec<usize> = input
            .shape()
            .iter()
            .zip(&reduced)
            .map(|(&n, &r)| if r { 1 } else { n })
            .collect();
        let g = grad_output
            .as_standard_layout()
            .into_owned()
            .into_shape_with_order(IxDyn(&kept))
            .map_err(|e| format!("output gradient as {kept:?}: {e}"))?;
        let g = g.mapv(|g| (f64::from(g) / count as f64) as f32);
        let g = g
            .broadcast(dx.raw_dim())
            .ok_or("the output gradient does not broadcast to the input")?;
        dx.assign(&g);
        Ok(())
    }
}

/// When the reduced axes are next to each other and not the last (the mean
/// over a sequence, `(batch, seq, features)` with `dims = [1]`): the input
/// as `(outer, count, inner)`, `count` the reduced axes' elements. The
/// general path would first copy the input transposed.
fn one_block(shape: &[usize], reduced: &[bool]) -> Option<(usize, usize, usize)> {
    let first = reduced.iter().position(|&r| r)?;
    let end = first + reduced[first..].iter().take_while(|&&r| r).count();
    if end == shape.len() || reduced[end..].iter().any(|&r| r) {
        return None;
    }
    let size = |axes: &[usize]| axes.iter().product::<usize>();
    Some((
        size(&shape[..first]),
        size(&shape[first..end]),
        size(&shape[end..]),
    ))
}

/// The mean over the middle axis of a C-order `(outer, count, inner)`
/// array into `(outer, inner)`: each element summed in `f64` over the
/// middle axis in order (the general path's order, so the same bits), a
/// whole contiguous row at a time.
fn mean_of_block(x: &[f32], (outer, count, inner): (usize, usize, usize), y: &mut [f32]) {
    if count == 0 {
        y.fill(f32::NAN);
        return;
    }
    if inner == 0 || outer == 0 {
        return;
    }
    let mut sums = vec![0f64; inner];
    for (block, y) in x
        .chunks_exact(count * inner)
        .zip(y.chunks_exact_mut(inner))
        .take(outer)
    {
        // As `Iterator::sum` starts: an all -0.0 run stays -0.0.
        sums.fill(-0.0);
        for row in block.chunks_exact(inner) {
            for (s, &v) in sums.iter_mut().zip(row) {
                *s += f64::from(v);
            }
        }
        for (y, s) in y.iter_mut().zip(&sums) {
            *y = (s / count as f64) as f32;
        }
    }
}

export_layer!(Mean);

#[cfg(test)]
mod tests {
    use super::*;
    use layer_api::ndarray::{array, ArrayD};
    use layer_api::testing::{self, gradcheck, Harness, Tolerance};
    use layer_api::OUTPUT;

    fn filled(shape: &[usize], seed: usize) -> ArrayD<f32> {
        let n: usize = shape.iter().product();
        let values = (0..n)
            .map(|i| (((i + seed) * 37 % 17) as f32 - 8.0) / 4.0)
            .collect();
        ArrayD::from_shape_vec(IxDyn(shape), values).unwrap()
    }

    fn run(config: &str, x: ArrayD<f32>) -> Result<ArrayD<f32>, String> {
        testing::forward::<Mean>(config, x, &[])
    }

    #[test]
    fn means_by_hand_with_and_without_keepdim() {
        let x = array![[1.0f32, 2.0, 6.0], [4.0, 5.0, 6.0]].into_dyn();
        let y = run(r#"{"dims": [1]}"#, x.clone()).unwrap();
        assert_eq!(y, array![3.0f32, 5.0].into_dyn());
        let y = run(r#"{"dims": [-1], "keepdim": true}"#, x.clone()).unwrap();
        assert_eq!(y, array![[3.0f32], [5.0]].into_dyn());
        let y = run(r#"{"dims": [0]}"#, x.clone()).unwrap();
        assert_eq!(y, array![2.5f32, 3.5, 6.0].into_dyn());
        let y = run(r#"{"dims": [-2, 1], "keepdim": true}"#, x.clone()).unwrap();
        assert_eq!(y, array![[4.0f32]].into_dyn());
        let y = run(r#"{"dims": [0, 1]}"#, x).unwrap();
        assert_eq!(y.shape(), &[] as &[usize]);
        assert_eq!(y[[]], 4.0);
    }

    /// Axes 0 and 2 of a (3, 2, 4, 5) input, given as [-4, 2] and as
    /// [2, 0], against explicit loops.
    #[test]
    fn non_adjacent_and_negative_axes_match_loops() {
        let x = filled(&[3, 2, 4, 5], 1);
        let mut want = ArrayD::<f64>::zeros(IxDyn(&[2, 5]));
        for j in 0..2 {
            for l in 0..5 {
                let mut sum = 0.0f64;
                for i in 0..3 {
                    for k in 0..4 {
                        sum += f64::from(x[[i, j, k, l]]);
                    }
                }
                want[[j, l]] = sum / 12.0;
            }
        }
        for config in [r#"{"dims": [-4, 2]}"#, r#"{"dims": [2, 0]}"#] {
            let y = run(config, x.clone()).unwrap();
            assert_eq!(y.shape(), &[2, 5], "{config}");
            for (g, w) in y.iter().zip(&want) {
                assert!((f64::from(*g) - w).abs() < 1e-6, "{config}: {g} != {w}");
            }
        }
        let kept = run(r#"{"dims": [-4, 2], "keepdim": true}"#, x).unwrap();
        assert_eq!(kept.shape(), &[1, 2, 1, 5]);
        assert_eq!(
            kept.into_shape_with_order(vec![2, 5]).unwrap(),
            want.mapv(|v| v as f32)
        );
    }

    /// A block of middle axes (the mean over a sequence) against loops
    /// summing in order in f64, bit for bit; empty inner or outer parts.
    #[test]
    fn middle_axes_match_ordered_loops_bit_for_bit() {
        let x = filled(&[3, 7, 2, 5], 4);
        // dims [1]: sum over j for each (i, k, l).
        let mut want = Vec::new();
        for i in 0..3 {
            for k in 0..2 {
                for l in 0..5 {
                    let sum = (0..7).fold(-0.0f64, |s, j| s + f64::from(x[[i, j, k, l]]));
                    want.push((sum / 7.0) as f32);
                }
            }
        }
        let y = run(r#"{"dims": [1]}"#, x.clone()).unwrap();
        assert_eq!(y.shape(), &[3, 2, 5]);
        assert_same_bits(y.iter().copied(), want);
        // dims [2, 1]: sum over (j, k) in C order for each (i, l).
        let mut want = Vec::new();
        for i in 0..3 {
            for l in 0..5 {
                let mut sum = -0.0f64;
                for j in 0..7 {
                    for k in 0..2 {
                        sum += f64::from(x[[i, j, k, l]]);
                    }
                }
                want.push((sum / 14.0) as f32);
            }
        }
        let y = run(r#"{"dims": [2, 1]}"#, x).unwrap();
        assert_eq!(y.shape(), &[3, 5]);
        assert_same_bits(y.iter().copied(), want);

        let y = run(r#"{"dims": [1]}"#, ArrayD::zeros(IxDyn(&[2, 3, 0]))).unwrap();
        assert_eq!(y.shape(), &[2, 0]);
        let y = run(r#"{"dims": [1]}"#, ArrayD::zeros(IxDyn(&[0, 3, 4]))).unwrap();
        assert_eq!(y.shape(), &[0, 4]);
        let y = run(
            r#"{"dims": [1]}"#,
            ArrayD::from_elem(IxDyn(&[1, 2, 1]), -0.0f32),
        )
        .unwrap();
        assert_eq!(y[[0, 0]].to_bits(), (-0.0f32).to_bits());
    }

    fn assert_same_bits(got: impl Iterator<Item = f32>, want: Vec<f32>) {
        let got: Vec<u32> = got.map(f32::to_bits).collect();
        let want: Vec<u32> = want.into_iter().map(f32::to_bits).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn an_empty_axis_gives_nan_and_an_empty_batch_gives_nothing() {
        let y = run(r#"{"dims": [1]}"#, ArrayD::zeros(IxDyn(&[2, 0]))).unwrap();
        assert!(y.shape() == [2] && y.iter().all(|v| v.is_nan()), "{y}");
        let y = run(r#"{"dims": [1]}"#, ArrayD::zeros(IxDyn(&[0, 3]))).unwrap();
        assert_eq!(y.shape(), &[0]);
    }

    #[test]
    fn batch_independence_is_claimed_unless_an_axis_can_be_axis_zero() {
        let claims = |dims: &[i64]| {
            Mean {
                dims: dims.to_vec(),
                keepdim: false,
            }
            .batch_independent()
        };
        assert!(claims(&[1]) && claims(&[-1]) && claims(&[1, 2, -1]));
        assert!(!claims(&[0]) && !claims(&[1, -2]) && !claims(&[-3]));
    }

    #[test]
    fn refuses_bad_dims() {
        let x = || filled(&[2, 3], 0);
        let err = run(r#"{"dims": []}"#, x()).unwrap_err();
        assert_eq!(err, "`dims` must name at least one axis");
        let err = run(r#"{"dims": [1, 1]}"#, x()).unwrap_err();
        assert_eq!(err, "`dims` [1, 1] has 1 twice");
        let err = run(r#"{"dims": [1, -1]}"#, x()).unwrap_err();
        assert_eq!(
            err,
            "`dims` [1, -1] names axis 1 twice for an input of rank 2"
        );
        let err = run(r#"{"dims": [2]}"#, x()).unwrap_err();
        assert_eq!(
            err,
            "`dims` has 2, out of range for an input of rank 2 (valid: -2 to 1)"
        );
        let err = run(r#"{"dims": [-3]}"#, x()).unwrap_err();
        assert!(err.starts_with("`dims` has -3, out of range"), "{err}");
        let err = run(r#"{"dim": [1]}"#, x()).unwrap_err();
        assert!(err.contains("unknown field `dim`"), "{err}");
        let err = run(r#"{"dims": 1}"#, x()).unwrap_err();
        assert!(err.contains("expected a sequence"), "{err}");
    }

    fn input_gradient(config: &str, x: ArrayD<f32>, g: ArrayD<f32>) -> ArrayD<f32> {
        let h = Harness::new::<Mean>(config).unwrap();
        let got = h
            .gradients(vec![(INPUT, x.into())], &[], vec![(OUTPUT, g.into())])
            .unwrap();
        got.inputs[0]
            .1
            .clone()
            .unwrap()
            .into_array::<f32>()
            .unwrap()
    }

    #[test]
    fn backward_spreads_each_gradient_over_its_elements_by_hand() {
        // Mean over axis 1 of (2, 3): each row's gradient / 3, for all 3.
        let x = filled(&[2, 3], 0);
        let dx = input_gradient(
            r#"{"dims": [1]}"#,
            x.clone(),
            array![3.0f32, -6.0].into_dyn(),
        );
        assert_eq!(
            dx,
            array![[1.0f32, 1.0, 1.0], [-2.0, -2.0, -2.0]].into_dyn()
        );
        // keepdim, over axis 0: each column's gradient / 2.
        let dx = input_gradient(
            r#"{"dims": [0], "keepdim": true}"#,
            x,
            array![[2.0f32, 4.0, -1.0]].into_dyn(),
        );
        assert_eq!(dx, array![[1.0f32, 2.0, -0.5], [1.0, 2.0, -0.5]].into_dyn());
    }

    #[test]
    fn backward_matches_finite_differences() {
        let x = filled(&[2, 3, 4], 2);
        for config in [
            r#"{"dims": [1]}"#,
            r#"{"dims": [-3, 2], "keepdim": true}"#,
            r#"{"dims": [0, 1, 2]}"#,
        ] {
            let h = Harness::new::<Mean>(config).unwrap();
            gradcheck(&h, vec![(INPUT, x.clone().into())], &[], Tolerance::F32)
                .unwrap_or_else(|e| panic!("{config}: {e}"));
        }
    }
}
