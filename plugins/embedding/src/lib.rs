//! `embedding`: a lookup table, as `torch.nn.Embedding(num_embeddings,
//! embedding_dim, padding_idx)`: each index `i` of the input becomes row `i`
//! of `weight`.
//!
//! * input: `input`, `int64` or `int32`, any shape (a scalar too);
//! * output: `output`, `float32`, of shape `input.shape + (embedding_dim,)`.
//!
//! An index outside `[0, num_embeddings)` is an error naming the index, its
//! position in the input and the bound.
//!
//! Config: `num_embeddings` and `embedding_dim` (both at least 1), and
//! `padding_idx` (optional, in `[-num_embeddings, num_embeddings)` as
//! PyTorch checks it; a negative one counts from the end). In PyTorch
//! `padding_idx` zeroes that row when the layer is created and keeps
//! gradients from it; here it does the second (see backward below), and at
//! inference the row is looked up like any other. A `state_dict` carries
//! PyTorch's zero row; a weight this host initializes is `normal`
//! throughout (an initializer fills a whole tensor), so that row is not zero
//! unless loaded. `max_norm` (which rewrites rows during `forward`),
//! `scale_grad_by_freq` and `sparse` are not accepted.
//!
//! Backward (the layer offers it): the input holds integer indices, so it
//! has no gradient. The gradient of `weight` is sparse by rows: for each
//! index `i` of the input, the gradient of its output row is added into row
//! `i` of the weight's gradient, so an index that occurs several times
//! accumulates all of its rows' gradients, and rows no index read are left
//! untouched (zero). Rows equal to `padding_idx` get no gradient even
//! though `forward` reads them, as in PyTorch: the padding row stays what
//! it was through training. An index out of range is the same error as in
//! `forward`.
//!
//! The parameter, named and laid out as in PyTorch's `state_dict`; a model
//! file may override its default with `"init"`:
//!
//! | parameter | shape | default | fans (Xavier, Kaiming) |
//! | --- | --- | --- | --- |
//! | `weight` | `(num_embeddings, embedding_dim)` | `normal` (mean 0, std 1), as PyTorch | in `embedding_dim`, out `num_embeddings` (PyTorch's rule) |

use layer_api::ndarray::{ArrayView2, ArrayViewD, ArrayViewMut2, Dimension, Ix2};
use layer_api::{
    export_layer, DType, Grads, Init, Inputs, MultiLayer, Outputs, ParamSpec, Params, Plan, Probe,
    ProbeInput, Signature, TensorInfo,
};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddingConfig {
    /// Rows of the table: valid indices are `0..num_embeddings`.
    pub num_embeddings: usize,
    /// Length of each row.
    pub embedding_dim: usize,
    /// The row that gets no gradient (negative: counted from the end); no
    /// effect at inference.
    #[serde(default)]
    pub padding_idx: Option<i64>,
}

pub struct Embedding {
    rows: usize,
    dim: usize,
    /// `padding_idx` made non-negative: the row that gets no gradient.
    padding: Option<usize>,
}

/// Calls `each(k, row)` for the `k`-th index (in C order) and the row it
/// names, or fails on the first index outside `[0, rows)`.
fn rows_of<T: Copy + Into<i64>>(
    indices: ArrayViewD<'_, T>,
    rows: usize,
    mut each: impl FnMut(usize, usize),
) -> Result<(), String> {
    for (k, (position, &index)) in indices.indexed_iter().enumerate() {
        let index: i64 = index.into();
        let row = usize::try_from(index)
            .ok()
            .filter(|&r| r < rows)
            .ok_or_else(|| {
                format!(
                    "index {index} at position {:?} is out of range: the embedding has {rows} \
                     rows (valid indices 0..{})",
                    position.slice(),
                    rows - 1
                )
            })?;
        each(k, row);
    }
    Ok(())
}

/// Copies `weight[index]` into row `k` of `out` for the `k`-th index.
fn lookup<T: Copy + Into<i64>>(
    indices: ArrayViewD<'_, T>,
    weight: ArrayView2<'_, f32>,
    mut out: ArrayViewMut2<'_, f32>,
) -> Result<(), String> {
    rows_of(indices, weight.nrows(), |k, row| {
        out.row_mut(k).assign(&weight.row(row))
    })
}

/// Adds row `k` of `grad_out` into row `index` of `grad_weight` for the
/// `k`-th index, except where `index` is the padding row.
fn scatter_add<T: Copy + Into<i64>>(
    indices: ArrayViewD<'_, T>,
    grad_out: ArrayView2<'_, f32>,
    mut grad_weight: ArrayViewMut2<'_, f32>,
    padding: Option<usize>,
) -> Result<(), String> {
    let rows = grad_weight.nrows();
    rows_of(indices, rows, |k, row| {
        if Some(row) != padding {
            let mut into = grad_weight.row_mut(row);
            into += &grad_out.row(k);
        }
    })
}

impl MultiLayer for Embedding {
    const DESCRIPTION: &'static str =
        "output[…] = weight[input[…]], weight (num_embeddings, embedding_dim), as torch.nn.Embedding";
    type Config = EmbeddingConfig;

    fn new(config: EmbeddingConfig) -> Result<Self, String> {
        let (rows, dim) = (config.num_embeddings, config.embedding_dim);
        if rows == 0 {
            return Err("`num_embeddings` must be at least 1".into());
        }
        if dim == 0 {
            return Err("`embedding_dim` must be at least 1".into());
        }
        let padding = match config.padding_idx {
            None => None,
            Some(p) => {
                let n = rows as i64;
                if !(-n..n).contains(&p) {
                    return Err(format!(
                        "`padding_idx` {p} must be within [-{n}, {n}) (`num_embeddings` is {n})"
                    ));
                }
                // [-n, n) to [0, n): a negative index counts from the end.
                Some(p.rem_euclid(n) as usize)
            }
        };
        Ok(Embedding { rows, dim, padding })
    }

    fn signature(&self) -> Signature {
        Signature::new()
            .input("input", [DType::I64, DType::I32])
            .output("output")
    }

    fn plan(&self, inputs: &[Option<TensorInfo>]) -> Result<Plan, String> {
        let [Some(input)] = inputs else {
            return Err("takes one input, `input`".into());
        };
        let mut shape = input.shape.clone();
        shape.push(self.dim);
        Ok(
            Plan::new([TensorInfo::new(DType::F32, shape)]).params(vec![ParamSpec::new(
                "weight",
                [self.rows, self.dim],
                Init::normal(0.0, 1.0),
            )]),
        )
    }

    fn batch_independent(&self) -> bool {
        true
    }

    fn probes(&self) -> Vec<Probe> {
        // Index type left open: check-plugin tries int64 and int32.
        let rows = self.rows as i64;
        [&[4, 6][..], &[7], &[3, 2, 5], &[0, 4], &[]]
            .iter()
            .map(|shape| Probe::new([Some(ProbeInput::new(shape.to_vec()).range(0, rows))]))
            .collect()
    }

    fn forward(
        &self,
        inputs: &Inputs<'_>,
        params: &Params<'_>,
        outputs: &mut Outputs<'_>,
    ) -> Result<(), String> {
        let weight = params.get::<Ix2>("weight")?;
        let output = outputs.take::<f32>("output")?;
        let count = output.len() / self.dim;
        let out = output
            .into_shape_with_order((count, self.dim))
            .map_err(|e| format!("output as ({count}, {}): {e}", self.dim))?;
        match inputs.dtype("input")? {
            Some(DType::I32) => lookup(inputs.get::<i32>("input")?, weight, out),
            _ => lookup(inputs.get::<i64>("input")?, weight, out),
        }
    }

    const BACKWARD: bool = true;

    fn backward(
        &self,
        inputs: &Inputs<'_>,
        _outputs: &Inputs<'_>,
        _params: &Params<'_>,
        grad_outputs: &Inputs<'_>,
        grads: &mut Grads<'_>,
    ) -> Result<(), String> {
        // The input is integer indices: it has no gradient to give.
        let Some(grad_weight) = grads.param("weight")? else {
            return Ok(());
        };
        let grad_weight = grad_weight
            .into_dimensionality::<Ix2>()
            .map_err(|e| format!("the gradient of `weight`: {e}"))?;
        if grad_weight.dim() != (self.rows, self.dim) {
            return Err(format!(
                "the gradient of `weight` has shape {:?}, not (num_embeddings, embedding_dim) \
                 = ({}, {})",
                grad_weight.shape(),
                self.rows,
                self.dim
            ));
        }
        let grad_output = grad_outputs.get::<f32>("output")?;
        let count = grad_output.len() / self.dim;
        let grad_out = grad_output
            .into_shape_with_order((count, self.dim))
            .map_err(|e| format!("output gradient as ({count}, {}): {e}", self.dim))?;
        match inputs.dtype("input")? {
            Some(DType::I32) => scatter_add(
                inputs.get::<i32>("input")?,
                grad_out,
                grad_weight,
                self.padding,
            ),
            _ => scatter_add(
                inputs.get::<i64>("input")?,
                grad_out,
                grad_weight,
                self.padding,
            ),
        }
    }
}

export_layer!(Embedding);

#[cfg(test)]
mod tests {
    use super::*;
    use layer_api::ndarray::{array, ArrayD, IxDyn};
    use layer_api::testing::{gradcheck, Harness, Tensor, Tolerance};

    /// A (rows, dim) table whose entry [r, c] is r + c / 10, so every row
    /// says which it is.
    fn table(rows: usize, dim: usize) -> ArrayD<f32> {
        ArrayD::from_shape_fn(IxDyn(&[rows, dim]), |ix| ix[0] as f32 + ix[1] as f32 / 10.0)
    }

    fn config(rows: usize, dim: usize) -> String {
        format!(r#"{{"num_embeddings": {rows}, "embedding_dim": {dim}}}"#)
    }

    fn run(config: &str, input: Tensor, weight: ArrayD<f32>) -> Result<ArrayD<f32>, String> {
        let harness = Harness::new::<Embedding>(config)?;
        let mut out = harness.run(vec![("input", input)], &[("weight", weight)])?;
        out.pop().unwrap().1.into_array::<f32>()
    }

    #[test]
    fn looks_up_rows_for_either_index_type() {
        let want = array![
            [[2.0f32, 2.1, 2.2], [0.0, 0.1, 0.2]],
            [[4.0, 4.1, 4.2], [2.0, 2.1, 2.2]]
        ]
        .into_dyn();
        for input in [
            Tensor::from(array![[2i64, 0], [4, 2]].into_dyn()),
            Tensor::from(array![[2i32, 0], [4, 2]].into_dyn()),
        ] {
            let y = run(&config(5, 3), input, table(5, 3)).unwrap();
            assert_eq!(y, want);
        }
    }

    #[test]
    fn appends_embedding_dim_to_any_shape() {
        let y = run(&config(5, 2), array![3i64].into_dyn().into(), table(5, 2)).unwrap();
        assert_eq!(y, array![[3.0f32, 3.1]].into_dyn());
        let scalar = Tensor::from(ArrayD::from_elem(IxDyn(&[]), 1i64));
        let y = run(&config(5, 2), scalar, table(5, 2)).unwrap();
        assert_eq!(y, array![1.0f32, 1.1].into_dyn());
        let empty = Tensor::from(ArrayD::<i32>::zeros(IxDyn(&[0, 4])));
        let y = run(&config(5, 2), empty, table(5, 2)).unwrap();
        assert_eq!(y.shape(), &[0, 4, 2]);
    }

    #[test]
    fn an_index_out_of_range_is_an_error_naming_it_where_and_the_bound() {
        let mut input = ArrayD::<i64>::zeros(IxDyn(&[2, 4]));
        input[[1, 3]] = 1000;
        let err = run(&config(1000, 2), input.into(), table(1000, 2)).unwrap_err();
        assert_eq!(
            err,
            "index 1000 at position [1, 3] is out of range: the embedding has 1000 rows \
             (valid indices 0..999)"
        );
        let err = run(
            &config(3, 2),
            array![0i32, -1].into_dyn().into(),
            table(3, 2),
        )
        .unwrap_err();
        assert!(
            err.starts_with("index -1 at position [1] is out of range"),
            "{err}"
        );
    }

    #[test]
    fn padding_idx_is_accepted_and_the_row_used_as_loaded() {
        let config = r#"{"num_embeddings": 4, "embedding_dim": 2, "padding_idx": -1}"#;
        let y = run(config, array![3i64, 0].into_dyn().into(), table(4, 2)).unwrap();
        assert_eq!(y, array![[3.0f32, 3.1], [0.0, 0.1]].into_dyn());
    }

    #[test]
    fn refuses_bad_configs() {
        let err = |config: &str| Harness::new::<Embedding>(config).err().unwrap();
        assert_eq!(err(&config(0, 2)), "`num_embeddings` must be at least 1");
        assert_eq!(err(&config(2, 0)), "`embedding_dim` must be at least 1");
        assert_eq!(
            err(r#"{"num_embeddings": 4, "embedding_dim": 2, "padding_idx": 4}"#),
            "`padding_idx` 4 must be within [-4, 4) (`num_embeddings` is 4)"
        );
        let e = err(r#"{"num_embeddings": 4, "embedding_dim": 2, "max_norm": 1.0}"#);
        assert!(e.contains("unknown field `max_norm`"), "{e}");
    }

    #[test]
    fn probes_stay_in_range() {
        let layer = Embedding {
            rows: 7,
            dim: 2,
            padding: None,
        };
        for probe in layer.probes() {
            assert_eq!(probe.inputs[0].as_ref().unwrap().range, (0, 7));
        }
    }

    /// The weight's gradient for `input` and `grad_output`, and that the
    /// input (integer indices) got none.
    fn weight_gradient(config: &str, input: Tensor, grad_output: ArrayD<f32>) -> ArrayD<f32> {
        let harness = Harness::new::<Embedding>(config).unwrap();
        let got = harness
            .gradients(
                vec![("input", input)],
                &[("weight", table(5, 2))],
                vec![("output", grad_output.into())],
            )
            .unwrap();
        assert_eq!(got.inputs.len(), 1);
        assert!(got.inputs[0].1.is_none(), "an index input has no gradient");
        assert_eq!(got.params.len(), 1);
        assert_eq!(got.params[0].0, "weight");
        got.params[0].1.clone()
    }

    #[test]
    fn repeated_indices_accumulate_and_the_padding_row_gets_no_gradient() {
        // Indices [[1, 3], [1, 0]] with padding_idx 0; output gradient rows
        // g0 = (1, 2), g1 = (10, 20), g2 = (100, 200), g3 = (1000, 2000).
        // Row 1 is read twice: g0 + g2 = (101, 202); row 3 once: g1; row 0
        // is the padding row: zero although it was read; rows 2 and 4 were
        // not read: zero.
        let grad_output = array![
            [[1.0f32, 2.0], [10.0, 20.0]],
            [[100.0, 200.0], [1000.0, 2000.0]]
        ]
        .into_dyn();
        let want = array![
            [0.0f32, 0.0],
            [101.0, 202.0],
            [0.0, 0.0],
            [10.0, 20.0],
            [0.0, 0.0]
        ]
        .into_dyn();
        let padded = r#"{"num_embeddings": 5, "embedding_dim": 2, "padding_idx": 0}"#;
        for input in [
            Tensor::from(array![[1i64, 3], [1, 0]].into_dyn()),
            Tensor::from(array![[1i32, 3], [1, 0]].into_dyn()),
        ] {
            let got = weight_gradient(padded, input, grad_output.clone());
            assert_eq!(got, want);
        }
        // padding_idx -5 names the same row 0; without padding_idx row 0
        // gets g3.
        let from_end = r#"{"num_embeddings": 5, "embedding_dim": 2, "padding_idx": -5}"#;
        let input = Tensor::from(array![[1i64, 3], [1, 0]].into_dyn());
        assert_eq!(
            weight_gradient(from_end, input.clone(), grad_output.clone()),
            want
        );
        let mut unpadded = want.clone();
        unpadded[[0, 0]] = 1000.0;
        unpadded[[0, 1]] = 2000.0;
        assert_eq!(weight_gradient(&config(5, 2), input, grad_output), unpadded);
    }

    #[test]
    fn a_scalar_index_and_an_empty_input_give_one_row_and_no_rows() {
        let scalar = Tensor::from(ArrayD::from_elem(IxDyn(&[]), 4i64));
        let got = weight_gradient(&config(5, 2), scalar, array![3.0f32, -1.5].into_dyn());
        let mut want = ArrayD::<f32>::zeros(IxDyn(&[5, 2]));
        want[[4, 0]] = 3.0;
        want[[4, 1]] = -1.5;
        assert_eq!(got, want);
        let empty = Tensor::from(ArrayD::<i32>::zeros(IxDyn(&[0, 3])));
        let got = weight_gradient(
            &config(5, 2),
            empty,
            ArrayD::<f32>::zeros(IxDyn(&[0, 3, 2])),
        );
        assert_eq!(got, ArrayD::<f32>::zeros(IxDyn(&[5, 2])));
    }

    #[test]
    fn gradients_for_an_index_out_of_range_are_an_error_naming_it() {
        let harness = Harness::new::<Embedding>(&config(3, 2)).unwrap();
        // The harness runs forward first, which refuses the index; backward
        // checks with the same code and message (the harness cannot call
        // backward alone), so the error names the index either way.
        let err = harness
            .gradients(
                vec![("input", array![0i64, 3].into_dyn().into())],
                &[("weight", table(3, 2))],
                vec![],
            )
            .unwrap_err();
        assert!(
            err.starts_with("index 3 at position [1] is out of range"),
            "{err}"
        );
    }

    #[test]
    fn gradcheck_of_the_weight() {
        // Repeated indices, with and without a padding row that the input
        // does not use (a used padding row's gradient is zero by design,
        // which finite differences of forward would not give).
        let input = array![[2i64, 0, 2], [4, 1, 2]].into_dyn();
        let weight = ArrayD::from_shape_fn(IxDyn(&[6, 3]), |ix| {
            ((ix[0] * 3 + ix[1]) * 7 % 11) as f32 / 11.0 - 0.5
        });
        for config in [
            r#"{"num_embeddings": 6, "embedding_dim": 3}"#,
            r#"{"num_embeddings": 6, "embedding_dim": 3, "padding_idx": 5}"#,
        ] {
            let harness = Harness::new::<Embedding>(config).unwrap();
            gradcheck(
                &harness,
                vec![("input", input.clone().into())],
                &[("weight", weight.clone())],
                Tolerance::F32,
            )
            .unwrap();
        }
    }
}
