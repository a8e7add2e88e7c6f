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
//! product, in a GEMM rather than a triple loop.
//!
//! The parameter and its default initializer; a model file may override it
//! with `"init"`. PyTorch has no such layer to copy a default from: a standard
//! deviation of `1 / in_units` keeps `y` of the order of `|x|²` whatever
//! `in_units` is.
//!
//! | parameter | shape | default | fans (Xavier, Kaiming) |
//! | --- | --- | --- | --- |
//! | `weight` | `(in_units, in_units, units)` | `normal` (mean 0, std `1 / in_units`) | in `in_units²`, out `units` |

use layer_api::{export_layer, ArrayViewD, ArrayViewMutD, Init, Layer, ParamSpec, Params};
use ndarray::{linalg::general_mat_mul, s, Array2, ArrayView3, ArrayViewMut2, Ix3};
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
        let Some(&features) = input_shape.last() else {
            return Err(
                "needs an input of rank 1 or more, whose last axis holds the \
                        features; got a scalar"
                    .into(),
            );
        };
        match self.in_units {
            Some(expected) if expected != features => Err(format!(
                "expects {expected} input features (config `in_units`), but the input's \
                 last axis has {features} (input shape {input_shape:?})"
            )),
            _ => Ok(features),
        }
    }
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

impl Layer for TensorReduction {
    const NAME: &'static str = "tensor_reduction";
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

    fn forward(
        &self,
        input: ArrayViewD<'_, f32>,
        params: &Params<'_>,
        mut output: ArrayViewMutD<'_, f32>,
    ) -> Result<(), String> {
        let weight = params.get::<Ix3>("weight")?;
        let in_units = weight.dim().0;
        let folded = fold_symmetric(weight);
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
            general_mat_mul(1.0, &outer_block, &folded, 0.0, &mut y_block);
        }
        Ok(())
    }
}

export_layer!(TensorReduction);
