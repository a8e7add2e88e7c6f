//! `tensor_reduction`: `y_k = Σ_ij W_ijk x_i x_j` with `W` of shape
//! `(in_units, in_units, units)`: the custom-layers chapter's first exercise.
//! The last input axis holds the features; any leading axes are kept, so an
//! input `(2, 3, in_units)` gives `(2, 3, units)`. `in_units` may be left out
//! of the config and is then taken from the input.
//!
//! Because `x_i x_j = x_j x_i`, only the pairs `i ≤ j` are needed: the layer
//! folds `W` into `V` of shape `(in_units (in_units + 1) / 2, units)` with
//! `V_(ij)k = W_ijk + W_jik` (`W_iik` on the diagonal), builds the upper
//! triangle of each row's outer product `x ⊗ x`, and multiplies the two with
//! one matrix product per block of rows: half the work of the full outer
//! product, in a GEMM rather than a triple loop. The fold is done once per
//! set of parameters, in `prepare`; every `forward` uses the folded `V`.
//!
//! Backward: `dx_m = Σ_jk (W_mjk + W_jmk) x_j g_k` and
//! `dW_ijk = Σ_rows x_i x_j g_k`, each as matrix products over blocks of
//! rows (of the outer products `x ⊗ g` and `x ⊗ x`).
//!
//! The parameter and its default initializer; a model file may override it
//! with `"init"`. PyTorch has no such layer to copy a default from: a standard
//! deviation of `1 / in_units` keeps `y` of the order of `|x|²` whatever
//! `in_units` is.
//!
//! | parameter | shape | default | fans (Xavier, Kaiming) |
//! | --- | --- | --- | --- |
//! | `weight` | `(in_units, in_units, units)` | `normal` (mean 0, std `1 / in_units`) | in `in_units²`, out `units` |

use layer_api::{
    export_layer, last_axis_features, ArrayViewD, ArrayViewMutD, Grads, Init, Layer, ParamSpec,
    Params, Prepared, INPUT,
};
use ndarray::{linalg::general_mat_mul, s, Array2, ArrayView2, ArrayView3, ArrayViewMut2, Ix3};
use serde::Deserialize;

/// Rows per matrix product: keeps the outer-product buffer near 1 MiB for
/// `in_units = 64` instead of growing with the batch.
const ROWS_PER_BLOCK: usize = 128;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorReductionConfig {
    /// Number of output features.
    pub units: usize,
    /// Number of input features; inferred from the input when absent.
    #[serde(default)]
    pub in_units: Option<usize>,
}

pub struct TensorReduction {
    units: usize,
    in_units: Option<usize>,
}

impl TensorReduction {
    /// The number of input features, checked against the config.
    fn in_units(&self, input_shape: &[usize]) -> Result<usize, String> {
        last_axis_features(input_shape, self.in_units, "in_units")
    }
}

/// What `prepare` derives from `W`: `V`, the weight folded over its two
/// input axes, for `in_units` input features.
struct Folded {
    in_units: usize,
    weight: Array2<f32>,
}

/// `W` folded over its two input axes: row `(i, j)` for `i ≤ j`, in the
/// order the outer-product rows are built.
fn fold_symmetric(w: ArrayView3<'_, f32>) -> Array2<f32> {
    let (n, _, units) = w.dim();
    let mut folded = Array2::zeros((n * (n + 1) / 2, units));
    let mut pair = 0;
    for i in 0..n {
        folded.row_mut(pair).assign(&w.slice(s![i, i, ..]));
        pair += 1;
        for j in i + 1..n {
            let mut row = folded.row_mut(pair);
            row.assign(&w.slice(s![i, j, ..]));
            row += &w.slice(s![j, i, ..]);
            pair += 1;
        }
    }
    folded
}

/// Writes `x_i x_j` for `i ≤ j` into `pairs`, in `fold_symmetric`'s order.
fn upper_outer_product(x: &[f32], pairs: &mut [f32]) {
    let mut start = 0;
    for (i, &xi) in x.iter().enumerate() {
        let rest = &x[i..];
        for (p, &xj) in pairs[start..start + rest.len()].iter_mut().zip(rest) {
            *p = xi * xj;
        }
        start += rest.len();
    }
}

/// Writes `a_i b_j` for every `i` and `j`, row-major, into `out`.
fn outer_product(a: &[f32], b: &[f32], out: &mut [f32]) {
    for (&ai, out) in a.iter().zip(out.chunks_exact_mut(b.len())) {
        for (o, &bj) in out.iter_mut().zip(b) {
            *o = ai * bj;
        }
    }
}

/// `W` plus `W` with its two input axes swapped, as `(in_units, in_units ·
/// units)`: row `m` holds `W_mjk + W_jmk` at column `j · units + k`.
fn symmetrized(w: ArrayView3<'_, f32>) -> Array2<f32> {
    let (n, _, units) = w.dim();
    let mut sum = w.as_standard_layout().into_owned();
    sum += &w.permuted_axes([1, 0, 2]);
    sum.into_shape_with_order((n, n * units))
        .expect("an owned standard-layout array takes any shape of its length")
}

impl Layer for TensorReduction {
    const DESCRIPTION: &'static str =
        "y_k = Σ_ij W_ijk x_i x_j, W of shape (in_units, in_units, units)";
    type Config = TensorReductionConfig;

    fn new(config: TensorReductionConfig) -> Result<Self, String> {
        if config.units == 0 {
            return Err("`units` must be at least 1".into());
        }
        if config.in_units == Some(0) {
            return Err("`in_units` must be at least 1 (or left out to infer it)".into());
        }
        Ok(TensorReduction {
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
        Ok(vec![ParamSpec::new(
            "weight",
            [in_units, in_units, self.units],
            Init::normal(0.0, 1.0 / in_units as f32),
        )
        .fans(in_units * in_units, self.units)])
    }

    fn batch_independent(&self) -> bool {
        true
    }

    fn flops(&self, input_shape: &[usize]) -> u64 {
        let Some((&n, leading)) = input_shape.split_last() else {
            return 0;
        };
        let rows: usize = leading.iter().product();
        let pairs = n * (n + 1) / 2;
        // The upper outer product, then its product with the folded weight.
        (rows * pairs + 2 * rows * pairs * self.units) as u64
    }

    fn prepare(
        &self,
        input_shape: &[usize],
        params: &Params<'_>,
    ) -> Result<Option<Prepared>, String> {
        let in_units = self.in_units(input_shape)?;
        let weight = params.get::<Ix3>("weight")?;
        let expected = (in_units, in_units, self.units);
        if weight.dim() != expected {
            return Err(format!(
                "parameter `weight` has shape {:?}, not {expected:?}",
                weight.shape()
            ));
        }
        Ok(Some(Box::new(Folded {
            in_units,
            weight: fold_symmetric(weight),
        })))
    }

    fn forward(
        &self,
        input: ArrayViewD<'_, f32>,
        params: &Params<'_>,
        mut output: ArrayViewMutD<'_, f32>,
    ) -> Result<(), String> {
        let Folded {
            in_units,
            weight: folded,
        } = params.prepared::<Folded>()?;
        let in_units = *in_units;
        if input.shape().last() != Some(&in_units) {
            return Err(format!(
                "the weight was prepared for {in_units} input features, but the input has \
                 shape {:?}",
                input.shape()
            ));
        }
        let x = input
            .as_slice()
            .ok_or("the host lent an input that is not contiguous")?;
        let y = output
            .as_slice_mut()
            .ok_or("the host lent an output that is not contiguous")?;
        let pairs = folded.nrows();
        let mut outer = Array2::<f32>::zeros((ROWS_PER_BLOCK.min(y.len() / self.units), pairs));
        for (x_block, y_block) in x
            .chunks(ROWS_PER_BLOCK * in_units)
            .zip(y.chunks_mut(ROWS_PER_BLOCK * self.units))
        {
            let rows = y_block.len() / self.units;
            let mut outer_block = outer.slice_mut(s![..rows, ..]);
            let buffer = outer_block
                .as_slice_mut()
                .expect("leading rows of a standard-layout array are contiguous");
            for (x_row, pair_row) in x_block.chunks(in_units).zip(buffer.chunks_mut(pairs)) {
                upper_outer_product(x_row, pair_row);
            }
            let mut y_block = ArrayViewMut2::from_shape((rows, self.units), y_block)
                .map_err(|e| format!("output block as ({rows}, {}): {e}", self.units))?;
            general_mat_mul(1.0, &outer_block, folded, 0.0, &mut y_block);
        }
        Ok(())
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
        let weight = params.get::<Ix3>("weight")?;
        let (n, _, units) = weight.dim();
        let input = input.as_standard_layout();
        let grad_output = grad_output.as_standard_layout();
        let contiguous = "tensor_reduction needs contiguous tensors (standard layout)";
        let x = input.as_slice().ok_or(contiguous)?;
        let g = grad_output.as_slice().ok_or(contiguous)?;
        let rows = g.len() / units;
        if x.len() != rows * n {
            return Err(format!(
                "the input has shape {:?}, not {rows} rows of the weight's {n} input features",
                input.shape()
            ));
        }
        if rows == 0 || n == 0 {
            // Nothing to sum: the gradients are empty or stay zero.
            return Ok(());
        }
        let block_rows = ROWS_PER_BLOCK.min(rows);
        if let Some(mut dx) = grads.input::<f32>(INPUT)? {
            let dx = dx.as_slice_mut().ok_or(contiguous)?;
            let sym = symmetrized(weight);
            // dx (rows, n) = P (rows, n · units) · symᵀ, P_r = x_r ⊗ g_r.
            let mut p = Array2::<f32>::zeros((block_rows, n * units));
            for ((x, g), dx) in x
                .chunks(ROWS_PER_BLOCK * n)
                .zip(g.chunks(ROWS_PER_BLOCK * units))
                .zip(dx.chunks_mut(ROWS_PER_BLOCK * n))
            {
                let block = g.len() / units;
                let mut p = p.slice_mut(s![..block, ..]);
                let buffer = p.as_slice_mut().expect("leading rows are contiguous");
                for ((x, g), out) in x
                    .chunks(n)
                    .zip(g.chunks(units))
                    .zip(buffer.chunks_mut(n * units))
                {
                    outer_product(x, g, out);
                }
                let mut dx = ArrayViewMut2::from_shape((block, n), dx)
                    .map_err(|e| format!("input gradient block as ({block}, {n}): {e}"))?;
                general_mat_mul(1.0, &p, &sym.t(), 0.0, &mut dx);
            }
        }
        if let Some(dw) = grads.param("weight")? {
            let mut dw = dw
                .into_shape_with_order((n * n, units))
                .map_err(|e| format!("weight gradient as ({}, {units}): {e}", n * n))?;
            // dW (n · n, units) = Σ over blocks of Qᵀ · G, Q_r = x_r ⊗ x_r,
            // added block by block to the buffer, which starts at zero.
            let mut q = Array2::<f32>::zeros((block_rows, n * n));
            for (x, g) in x
                .chunks(ROWS_PER_BLOCK * n)
                .zip(g.chunks(ROWS_PER_BLOCK * units))
            {
                let block = g.len() / units;
                let mut q = q.slice_mut(s![..block, ..]);
                let buffer = q.as_slice_mut().expect("leading rows are contiguous");
                for (x, out) in x.chunks(n).zip(buffer.chunks_mut(n * n)) {
                    outer_product(x, x, out);
                }
                let g = ArrayView2::from_shape((block, units), g)
                    .map_err(|e| format!("output gradient block as ({block}, {units}): {e}"))?;
                general_mat_mul(1.0, &q.t(), &g, 1.0, &mut dw);
            }
        }
        Ok(())
    }
}

export_layer!(TensorReduction);

#[cfg(test)]
mod tests {
    use super::*;
    use layer_api::ndarray::{array, ArrayD, IxDyn};
    use layer_api::testing::{self, gradcheck, Harness, Tolerance};
    use layer_api::{INPUT, OUTPUT};

    fn filled(shape: &[usize], seed: usize) -> ArrayD<f32> {
        let n: usize = shape.iter().product();
        let values = (0..n)
            .map(|i| (((i + seed) * 37 % 17) as f32 - 8.0) / 8.0)
            .collect();
        ArrayD::from_shape_vec(IxDyn(shape), values).unwrap()
    }

    /// The textbook triple sum `y_k = Σ_i Σ_j W_ijk x_i x_j` for every row,
    /// in f64, over the full (unfolded) `W`.
    fn triple_sum(x: &ArrayD<f32>, w: &ArrayD<f32>) -> Vec<f32> {
        let (n, units) = (w.shape()[0], w.shape()[2]);
        let mut y = Vec::new();
        for row in x.as_slice().unwrap().chunks(n) {
            for k in 0..units {
                let mut sum = 0.0f64;
                for i in 0..n {
                    for j in 0..n {
                        sum += f64::from(w[[i, j, k]]) * f64::from(row[i]) * f64::from(row[j]);
                    }
                }
                y.push(sum as f32);
            }
        }
        y
    }

    fn assert_close(got: &ArrayD<f32>, want: &[f32]) {
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-4, "{g} != {w}");
        }
    }

    #[test]
    fn computes_the_reduction_by_hand() {
        // 1·1·1 + 2·1·2 + 3·2·1 + 4·2·2 = 27.
        let x = array![[1.0f32, 2.0]].into_dyn();
        let w = array![[[1.0f32], [2.0]], [[3.0], [4.0]]].into_dyn();
        let y =
            testing::forward::<TensorReduction>(r#"{"units": 1}"#, x, &[("weight", w)]).unwrap();
        assert_eq!(y, array![[27.0f32]].into_dyn());
    }

    #[test]
    fn folding_adds_the_mirrored_weights_off_the_diagonal() {
        let w = array![[[1.0f32, 10.0], [2.0, 20.0]], [[3.0, 30.0], [4.0, 40.0]]];
        // Rows (0, 0), (0, 1), (1, 1): W_00, W_01 + W_10, W_11.
        assert_eq!(
            fold_symmetric(w.view()),
            array![[1.0f32, 10.0], [5.0, 50.0], [4.0, 40.0]]
        );
    }

    #[test]
    fn the_prepared_fold_matches_the_triple_sum_and_keeps_leading_axes() {
        let x = filled(&[2, 3, 4], 0);
        let w = filled(&[4, 4, 3], 5);
        let y = testing::forward::<TensorReduction>(
            r#"{"units": 3, "in_units": 4}"#,
            x.clone(),
            &[("weight", w.clone())],
        )
        .unwrap();
        assert_eq!(y.shape(), &[2, 3, 3]);
        assert_close(&y, &triple_sum(&x, &w));
    }

    #[test]
    fn one_layer_serves_any_batch_size_including_more_than_a_block() {
        let harness = Harness::new::<TensorReduction>(r#"{"units": 2}"#).unwrap();
        let w = filled(&[3, 3, 2], 1);
        for rows in [0, 1, ROWS_PER_BLOCK + 3] {
            let x = filled(&[rows, 3], rows);
            let mut outputs = harness
                .run(vec![(INPUT, x.clone().into())], &[("weight", w.clone())])
                .unwrap();
            let y = outputs.pop().unwrap().1.into_array::<f32>().unwrap();
            assert_eq!(y.shape(), &[rows, 2]);
            assert_close(&y, &triple_sum(&x, &w));
        }
        harness.close().unwrap();
    }

    #[test]
    fn forward_without_preparation_says_so() {
        let layer = TensorReduction::new(TensorReductionConfig {
            units: 1,
            in_units: None,
        })
        .unwrap();
        let x = filled(&[1, 2], 0);
        let mut y = ArrayD::<f32>::zeros(IxDyn(&[1, 1]));
        let err = layer
            .forward(x.view(), &Params::new(&[]), y.view_mut())
            .unwrap_err();
        assert!(err.contains("nothing was prepared"), "{err}");
    }

    #[test]
    fn refuses_bad_configs_and_inputs() {
        let x = || filled(&[1, 4], 0);
        let err = testing::forward::<TensorReduction>(r#"{"units": 0}"#, x(), &[]).unwrap_err();
        assert_eq!(err, "`units` must be at least 1");
        let err = testing::forward::<TensorReduction>(r#"{"units": 2, "in_units": 0}"#, x(), &[])
            .unwrap_err();
        assert!(err.starts_with("`in_units` must be at least 1"), "{err}");
        let err = testing::forward::<TensorReduction>(r#"{"units": 2, "in_units": 3}"#, x(), &[])
            .unwrap_err();
        assert!(
            err.contains("expects 3 input features (config `in_units`)"),
            "{err}"
        );
    }

    #[test]
    fn backward_by_hand() {
        // As `computes_the_reduction_by_hand`: y = x0² + 5 x0 x1 + 4 x1²
        // (W = [[1, 2], [3, 4]]) at x = [1, 2], with g = 3:
        // dy/dx0 = 2 x0 + 5 x1 = 12, dy/dx1 = 5 x0 + 8 x1 = 21, so
        // dx = [36, 63]; dW_ij = g x_i x_j = [[3, 6], [6, 12]].
        let x = array![[1.0f32, 2.0]].into_dyn();
        let w = array![[[1.0f32], [2.0]], [[3.0], [4.0]]].into_dyn();
        let h = Harness::new::<TensorReduction>(r#"{"units": 1}"#).unwrap();
        let got = h
            .gradients(
                vec![(INPUT, x.into())],
                &[("weight", w)],
                vec![(OUTPUT, array![[3.0f32]].into_dyn().into())],
            )
            .unwrap();
        let dx = got.inputs[0].1.clone().unwrap();
        assert_eq!(
            dx.into_array::<f32>().unwrap(),
            array![[36.0f32, 63.0]].into_dyn()
        );
        assert_eq!(
            got.params[0].1,
            array![[[3.0f32], [6.0]], [[6.0], [12.0]]].into_dyn()
        );
    }

    #[test]
    fn backward_matches_finite_differences_with_leading_axes() {
        let x = filled(&[2, 3, 4], 0);
        let w = filled(&[4, 4, 3], 5);
        let h = Harness::new::<TensorReduction>(r#"{"units": 3}"#).unwrap();
        gradcheck(
            &h,
            vec![(INPUT, x.into())],
            &[("weight", w)],
            Tolerance::F32,
        )
        .unwrap();
    }

    #[test]
    fn backward_over_more_than_a_block_matches_the_sums() {
        // dW_ijk = Σ_r x_ri x_rj g_rk and dx_rm = Σ_jk (W_mjk + W_jmk) x_rj g_rk,
        // by loops, over a batch of several blocks.
        let (rows, n, units) = (2 * ROWS_PER_BLOCK + 5, 3, 2);
        let x = filled(&[rows, n], 1);
        let w = filled(&[n, n, units], 2);
        let g = filled(&[rows, units], 3);
        let h = Harness::new::<TensorReduction>(r#"{"units": 2}"#).unwrap();
        let got = h
            .gradients(
                vec![(INPUT, x.clone().into())],
                &[("weight", w.clone())],
                vec![(OUTPUT, g.clone().into())],
            )
            .unwrap();
        let dx = got.inputs[0]
            .1
            .clone()
            .unwrap()
            .into_array::<f32>()
            .unwrap();
        let dw = &got.params[0].1;
        for i in 0..n {
            for j in 0..n {
                for k in 0..units {
                    let want: f64 = (0..rows)
                        .map(|r| f64::from(x[[r, i]]) * f64::from(x[[r, j]]) * f64::from(g[[r, k]]))
                        .sum();
                    let got = f64::from(dw[[i, j, k]]);
                    assert!(
                        (got - want).abs() < 1e-3,
                        "dW[{i}, {j}, {k}]: {got} != {want}"
                    );
                }
            }
        }
        for r in 0..rows {
            for m in 0..n {
                let mut want = 0.0f64;
                for j in 0..n {
                    for k in 0..units {
                        let s = f64::from(w[[m, j, k]]) + f64::from(w[[j, m, k]]);
                        want += s * f64::from(x[[r, j]]) * f64::from(g[[r, k]]);
                    }
                }
                let got = f64::from(dx[[r, m]]);
                assert!((got - want).abs() < 1e-5, "dx[{r}, {m}]: {got} != {want}");
            }
        }
    }
}
