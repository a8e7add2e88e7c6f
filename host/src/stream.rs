//! Running a model on an input in chunks of rows, so that memory does not
//! grow with the input.
//!
//! This is only sound when every layer is batch-independent (output row `i`
//! depends on input row `i` alone) and keeps the batch axis: then running
//! the rows in chunks gives, row for row, what running them all at once
//! gives. A chunk never has a single row unless the whole input has one:
//! kernels take a dedicated path for one row whose rounding differs in the
//! last bits, and chunking must not change the result.

use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use layer_api::DType;
use ndarray::ArrayD;

use crate::error::Error;
use crate::npy::NpyRowReader;
use crate::params::ParamStore;
use crate::runner::Runner;
use crate::runtime::{LayerPlan, Model, ModelLayer};
use crate::tensor::{Tensor, TensorView};

/// Bytes the default chunk's buffers (its input rows and every layer's
/// output rows) take: small enough that memory stays flat, large enough
/// that per-chunk costs (mapping, hand-offs to threads) vanish.
const DEFAULT_CHUNK_BYTES: usize = 8 << 20;

/// Why an input cannot be processed in chunks of rows.
#[derive(Clone, Copy)]
pub enum Unchunkable<'m> {
    /// The input has no batch axis to cut (rank 0 or 1: axis 0 is the
    /// features).
    NoBatchAxis,
    /// This layer's output rows depend on other rows (or it does not keep
    /// the number of rows).
    Layer(&'m ModelLayer),
    /// Rows are streamed as float32: the model must take and give float32.
    NotFloat32,
    /// Streaming reads one input and writes one output.
    SeveralTensors,
    /// This node's outputs do not keep the batch's rows (or it reads no
    /// tensor that carries the batch).
    Rows(&'m ModelLayer),
}

impl std::fmt::Display for Unchunkable<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unchunkable::NoBatchAxis => {
                write!(
                    f,
                    "the input has no batch axis (its rank is below 2, or, in a graph, its \
                     declared shape does not start with the symbol `batch`)"
                )
            }
            Unchunkable::Layer(layer) => write!(
                f,
                "layer '{}' ({}) is not batch-independent",
                layer.name, layer.plugin.name
            ),
            Unchunkable::Rows(layer) => write!(
                f,
                "layer '{}' ({}) does not keep the batch's rows",
                layer.name, layer.plugin.name
            ),
            Unchunkable::SeveralTensors => write!(
                f,
                "streaming reads one input file and writes one output, and this model has \
                 several inputs or outputs"
            ),
            Unchunkable::NotFloat32 => write!(
                f,
                "streaming reads and writes float32 rows, and this model's input or output \
                 is of another element type"
            ),
        }
    }
}

/// Whether an input planned as `plans` may be processed in chunks of rows,
/// and if not, what prevents it.
pub fn check_chunkable<'m>(model: &'m Model, plans: &[LayerPlan]) -> Result<(), Unchunkable<'m>> {
    if model.spec.inputs.len() != 1 || model.graph.outputs.len() != 1 {
        return Err(Unchunkable::SeveralTensors);
    }
    let input = crate::runner::plans_input(model, plans);
    if input.shape.len() < 2 {
        return Err(Unchunkable::NoBatchAxis);
    }
    let output = model.source_spec(
        plans,
        std::slice::from_ref(&input),
        model.graph.outputs[0].1,
    );
    if input.dtype != DType::F32 || output.dtype != DType::F32 {
        return Err(Unchunkable::NotFloat32);
    }
    let batched = crate::runner::batched_tensors(model, plans, std::slice::from_ref(&input));
    if model.spec.format == 2 && !batched[&crate::graph::Source::Input(0)] {
        return Err(Unchunkable::NoBatchAxis);
    }
    for &node in &model.graph.order {
        let layer = &model.layers[node];
        let keeps_rows = (0..plans[node].outputs.len())
            .all(|output| batched[&crate::graph::Source::Node { node, output }]);
        if !layer.batch_independent() {
            return Err(Unchunkable::Layer(layer));
        }
        if !keeps_rows {
            return Err(Unchunkable::Rows(layer));
        }
    }
    Ok(())
}

/// Rows per chunk when the user does not say: the chunk's input and every
/// layer's output together take about [`DEFAULT_CHUNK_BYTES`] (or a quarter
/// of a smaller memory budget), and at least two rows.
pub fn default_batch_size(plans: &[LayerPlan]) -> usize {
    // Saturating: every shape was checked to be addressable when planned,
    // but their sum need not be.
    let row_elements = |shape: &[usize]| {
        shape
            .iter()
            .skip(1)
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .unwrap_or(usize::MAX)
    };
    let per_row = plans.iter().map(|p| row_elements(&p.output_shape)).fold(
        plans.first().map_or(0, |p| row_elements(&p.input_shape)),
        usize::saturating_add,
    );
    // A budget under 32 MiB takes a quarter of it instead.
    let chunk_bytes = DEFAULT_CHUNK_BYTES.min((crate::budget::limit() / 4) as usize);
    (chunk_bytes / per_row.max(1).saturating_mul(4)).max(2)
}

/// The chunks of `rows` rows, `batch_size` each, in order. The last chunk
/// takes what is left, and absorbs a remainder of one row, so that no chunk
/// has a single row unless `rows` is 1.
pub fn chunk_ranges(rows: usize, batch_size: usize) -> Vec<Range<usize>> {
    let batch_size = batch_size.max(2);
    let mut ranges = Vec::with_capacity(rows.div_ceil(batch_size));
    let mut start = 0;
    while start < rows {
        let left = rows - start;
        let end = if left <= batch_size + 1 {
            rows
        } else {
            start + batch_size
        };
        ranges.push(start..end);
        start = end;
    }
    ranges
}

/// Runs `model` on the rows of `input` in the chunks [`chunk_ranges`] gives,
/// with the parameters `params` loaded for the whole input's `plans`.
/// `after_layer` sees each chunk's rows, each layer, its output and the
/// time it took; `on_output` gets each chunk's rows and the model's output
/// for them, in order.
#[allow(clippy::too_many_arguments)]
pub fn run_in_chunks(
    model: &Model,
    plans: &[LayerPlan],
    params: &ParamStore,
    input: &mut NpyRowReader,
    input_path: &Path,
    batch_size: usize,
    threads: usize,
    mut after_layer: impl FnMut(&Range<usize>, &ModelLayer, &Tensor, Duration),
    mut on_output: impl FnMut(&Range<usize>, &ArrayD<f32>) -> Result<(), Error>,
) -> Result<(), Error> {
    let shape = input.shape().to_vec();
    let ranges = chunk_ranges(shape[0], batch_size);
    let (Some(first), Some(last)) = (ranges.first(), ranges.last()) else {
        return Ok(());
    };
    // One runner for the full chunks and one for the last, shorter one.
    let full_plans = plans_for_rows(model, plans, &shape, first.len())?;
    let last_plans = plans_for_rows(model, plans, &shape, last.len())?;
    let mut full = Runner::new(model, &full_plans, params, threads)?;
    // Streaming reads float32 rows: the first layer must take them as they are.
    if full_plans[0].inputs[0].as_ref().map(|s| s.dtype) != Some(DType::F32) {
        return Err(Error::Model {
            path: model.spec.path.clone(),
            message: "streams only models whose first layer takes float32 input".to_string(),
        });
    }
    let mut short = if last.len() == first.len() {
        None
    } else {
        Some(Runner::new(model, &last_plans, params, threads)?)
    };
    let mut chunk_shape = shape.clone();
    for rows in &ranges {
        let runner = match &mut short {
            Some(short) if rows.len() != first.len() => short,
            _ => &mut full,
        };
        chunk_shape[0] = rows.len();
        let values = input.rows(rows.clone()).map_err(|source| Error::Npy {
            path: input_path.to_path_buf(),
            source,
        })?;
        let view = TensorView {
            dtype: DType::F32,
            shape: &chunk_shape,
            bytes: bytemuck::cast_slice(values),
        };
        let output = runner.run_observed(view, |i, out, elapsed| {
            after_layer(rows, &model.layers[i], out, elapsed)
        })?;
        let output = output.as_f32().ok_or_else(|| Error::Model {
            path: model.spec.path.clone(),
            message: format!(
                "streams only float32 outputs; this model's is {}",
                output.dtype()
            ),
        })?;
        on_output(rows, output)?;
    }
    Ok(())
}

/// The plans for a chunk of `rows` rows of an input of `shape`, checked to
/// use the parameters planned for the whole input (`whole`): those are the
/// ones loaded or initialized; and to make the outputs planned for the
/// whole input, cut to the chunk's rows: a layer whose `output_shape`
/// answers differently from one call to the next is refused here, naming
/// it, rather than writing rows of another shape.
fn plans_for_rows(
    model: &Model,
    whole: &[LayerPlan],
    shape: &[usize],
    rows: usize,
) -> Result<Vec<LayerPlan>, Error> {
    let mut chunk_shape = shape.to_vec();
    chunk_shape[0] = rows;
    let plans = model.plan(&chunk_shape)?;
    for ((layer, chunk), whole) in model.layers.iter().zip(&plans).zip(whole) {
        if chunk.params != whole.params {
            return Err(Error::Layer {
                layer: layer.name.clone(),
                plugin: layer.plugin.name.clone(),
                message: "says it is batch-independent but declares parameters that depend \
                          on the number of rows; it must declare the same ones for any batch"
                    .to_string(),
                panicked: false,
            });
        }
        for (name, (chunk, whole)) in layer
            .signature
            .outputs
            .iter()
            .zip(chunk.outputs.iter().zip(&whole.outputs))
        {
            let mut expected = whole.shape.clone();
            if let Some(first) = expected.first_mut() {
                *first = rows;
            }
            if chunk.dtype != whole.dtype || chunk.shape != expected {
                return Err(Error::Layer {
                    layer: layer.name.clone(),
                    plugin: layer.plugin.name.clone(),
                    message: format!(
                        "output '{name}' was planned as {} {} for the whole input, which makes \
                         {} {} for a chunk of {rows} rows, but the layer now plans {} {}: its \
                         output shape must depend on its input's shape alone, the same on \
                         every call",
                        whole.dtype,
                        crate::budget::shape_text(&whole.shape),
                        whole.dtype,
                        crate::budget::shape_text(&expected),
                        chunk.dtype,
                        crate::budget::shape_text(&chunk.shape),
                    ),
                    panicked: false,
                });
            }
        }
    }
    Ok(plans)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_every_row_and_never_hold_one_alone() {
        assert_eq!(chunk_ranges(10, 4), vec![0..4, 4..8, 8..10]);
        assert_eq!(chunk_ranges(9, 4), vec![0..4, 4..9]);
        assert_eq!(chunk_ranges(8, 4), vec![0..4, 4..8]);
        assert_eq!(chunk_ranges(5, 4), vec![0..5]);
        assert_eq!(chunk_ranges(3, 100), vec![0..3]);
        assert_eq!(chunk_ranges(1, 4), vec![0..1]);
        assert_eq!(chunk_ranges(0, 4), Vec::<Range<usize>>::new());
        // A batch size of one would make single-row chunks: two is the least.
        assert_eq!(chunk_ranges(5, 1), vec![0..2, 2..5]);
    }
}
