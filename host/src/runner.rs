//! The forward pass, set up once per input shape and run as often as needed.
//!
//! Everything a pass needs is prepared when the [`Runner`] is built: each
//! layer's output buffer, the parameter views it is lent, and how its batch
//! is split across threads. Running then allocates nothing.
//!
//! Threads: a batch-independent layer whose work is large enough has its
//! batch (axis 0) cut into one piece per thread, and each piece runs through
//! the same layer object at once. Kernels inside plugins stay on the calling
//! thread, so there is never more than one level of parallelism. Layers that
//! are not batch-independent (`centered`) run whole, on one thread.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use abi_stable::std_types::{RSlice, RStr};
use layer_api::abi::{LayerError, ParamRef, TensorRef};
use ndarray::{ArrayD, ArrayViewD, IxDyn};

use crate::error::Error;
use crate::params::ParamStore;
use crate::runtime::{LayerPlan, Model, ModelLayer};

/// Below this many floating-point operations per piece, splitting a layer
/// costs more in hand-offs than it gains.
const MIN_FLOPS_PER_THREAD: u64 = 1_000_000;

/// One piece of a split layer: rows `[start, end)` of axis 0.
#[derive(Debug, Clone)]
struct Piece {
    input_shape: Vec<usize>,
    output_shape: Vec<usize>,
    input_range: std::ops::Range<usize>,
    output_range: std::ops::Range<usize>,
}

/// What sees each layer's index, output and time taken in an observed run.
type LayerObserver<'a> = dyn FnMut(usize, &ArrayD<f32>, Duration) + 'a;

/// A prepared forward pass of one model for one input shape.
pub struct Runner<'m> {
    layers: &'m [ModelLayer],
    plans: &'m [LayerPlan],
    params: Vec<Vec<ParamRef<'m>>>,
    outputs: Vec<ArrayD<f32>>,
    /// Per layer: the pieces its batch is split into (empty: run whole).
    pieces: Vec<Vec<Piece>>,
    pool: Option<rayon::ThreadPool>,
}

impl<'m> Runner<'m> {
    /// Prepares `model` for inputs of the shape `plans` was made for, with
    /// up to `threads` threads.
    pub fn new(
        model: &'m Model,
        plans: &'m [LayerPlan],
        params: &'m ParamStore,
        threads: usize,
    ) -> Result<Runner<'m>, Error> {
        let threads = threads.max(1);
        let layer_params = plans
            .iter()
            .map(|plan| param_refs(plan, params))
            .collect::<Result<Vec<_>, Error>>()?;
        let outputs = plans
            .iter()
            .map(|p| ArrayD::zeros(IxDyn(&p.output_shape)))
            .collect();
        let pieces = model
            .layers
            .iter()
            .zip(plans)
            .map(|(layer, plan)| split(layer, plan, threads))
            .collect::<Vec<_>>();
        let pool = if pieces.iter().any(|p| !p.is_empty()) {
            Some(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .thread_name(|i| format!("layer-worker-{i}"))
                    .build()
                    .map_err(|e| Error::Threads(e.to_string()))?,
            )
        } else {
            None
        };
        Ok(Runner {
            layers: &model.layers,
            plans,
            params: layer_params,
            outputs,
            pieces,
            pool,
        })
    }

    /// Runs every layer on `input` and returns the last layer's output.
    pub fn run(&mut self, input: ArrayViewD<'_, f32>) -> Result<&ArrayD<f32>, Error> {
        self.run_layers(input, None)
    }

    /// Like [`run`](Self::run); `after_layer` sees each layer's index,
    /// output and time taken. Only observed runs read the clock: two reads
    /// per layer cost tens of nanoseconds, a sizeable part of a batch-1
    /// layer call.
    pub fn run_observed(
        &mut self,
        input: ArrayViewD<'_, f32>,
        mut after_layer: impl FnMut(usize, &ArrayD<f32>, Duration),
    ) -> Result<&ArrayD<f32>, Error> {
        self.run_layers(input, Some(&mut after_layer))
    }

    fn run_layers(
        &mut self,
        input: ArrayViewD<'_, f32>,
        mut after_layer: Option<&mut LayerObserver<'_>>,
    ) -> Result<&ArrayD<f32>, Error> {
        let expected = &self.plans[0].input_shape;
        if expected.as_slice() != input.shape() {
            return Err(Error::InputShape {
                expected: expected.clone(),
                found: input.shape().to_vec(),
            });
        }
        let input = input.as_standard_layout();
        for i in 0..self.layers.len() {
            let started = after_layer.is_some().then(Instant::now);
            let (done, rest) = self.outputs.split_at_mut(i);
            let x = match i {
                0 => input.as_slice(),
                _ => done[i - 1].as_slice(),
            }
            .expect("standard layout");
            let out = &mut rest[0];
            out.fill(0.0);
            run_layer(
                &self.layers[i],
                &self.plans[i],
                x,
                &self.params[i],
                out.as_slice_mut().expect("owned arrays are contiguous"),
                &self.pieces[i],
                self.pool.as_ref(),
            )?;
            if let (Some(observe), Some(started)) = (after_layer.as_mut(), started) {
                observe(i, &self.outputs[i], started.elapsed());
            }
        }
        Ok(self.outputs.last().expect("a model has at least one layer"))
    }
}

/// Decides how a layer's batch is split: only batch-independent layers
/// whose output keeps the batch axis, with enough work per piece.
fn split(layer: &ModelLayer, plan: &LayerPlan, threads: usize) -> Vec<Piece> {
    let (Some(&rows), Some(&out_rows)) = (plan.input_shape.first(), plan.output_shape.first())
    else {
        return Vec::new();
    };
    if threads < 2 || rows < 2 || rows != out_rows || !layer.batch_independent() {
        return Vec::new();
    }
    let pieces = piece_count(rows, threads, layer.flops(&plan.input_shape));
    if pieces < 2 {
        return Vec::new();
    }
    let in_row: usize = plan.input_shape[1..].iter().product();
    let out_row: usize = plan.output_shape[1..].iter().product();
    (0..pieces)
        .map(|k| {
            let start = rows * k / pieces;
            let end = rows * (k + 1) / pieces;
            let with_rows = |shape: &[usize]| {
                let mut s = shape.to_vec();
                s[0] = end - start;
                s
            };
            Piece {
                input_shape: with_rows(&plan.input_shape),
                output_shape: with_rows(&plan.output_shape),
                input_range: start * in_row..end * in_row,
                output_range: start * out_row..end * out_row,
            }
        })
        .collect()
}

/// How many pieces a batch of `rows` rows is cut into for `threads`
/// threads when the layer does `flops` operations on it. Pieces have at
/// least two rows: kernels may take a dedicated path for a single row whose
/// rounding differs, and splitting must not change bits.
fn piece_count(rows: usize, threads: usize, flops: u64) -> usize {
    threads
        .min(rows / 2)
        .min((flops / MIN_FLOPS_PER_THREAD).max(1) as usize)
}

fn run_layer(
    layer: &ModelLayer,
    plan: &LayerPlan,
    input: &[f32],
    params: &[ParamRef<'_>],
    output: &mut [f32],
    pieces: &[Piece],
    pool: Option<&rayon::ThreadPool>,
) -> Result<(), Error> {
    let call = |in_shape: &[usize], x: &[f32], out_shape: &[usize], y: &mut [f32]| {
        layer.call_forward(in_shape, x, params, out_shape, y)
    };
    let result = match pool {
        Some(pool) if !pieces.is_empty() => {
            let failure: Mutex<Option<LayerError>> = Mutex::new(None);
            pool.scope(|scope| {
                let mut rest = output;
                let mut taken = 0;
                for piece in pieces {
                    let (y, tail) = rest.split_at_mut(piece.output_range.end - taken);
                    rest = tail;
                    taken = piece.output_range.end;
                    let x = &input[piece.input_range.clone()];
                    let failure = &failure;
                    let call = &call;
                    scope.spawn(move |_| {
                        if let Err(e) = call(&piece.input_shape, x, &piece.output_shape, y) {
                            let mut slot = failure.lock().unwrap_or_else(|p| p.into_inner());
                            slot.get_or_insert(e);
                        }
                    });
                }
            });
            match failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
                Some(e) => Err(e),
                None => Ok(()),
            }
        }
        _ => call(&plan.input_shape, input, &plan.output_shape, output),
    };
    result.map_err(|e| layer.error(e))
}

/// The parameters a layer's plan names, as the views its forward call takes.
pub(crate) fn param_refs<'a>(
    plan: &'a LayerPlan,
    params: &'a ParamStore,
) -> Result<Vec<ParamRef<'a>>, Error> {
    plan.params
        .iter()
        .map(|p| {
            let tensor = params.get(&p.stored_as).ok_or_else(|| Error::Param {
                name: p.name.clone(),
                message: "no value was loaded or initialized for it".to_string(),
            })?;
            Ok(ParamRef {
                name: RStr::from_str(&p.local_name),
                tensor: tensor_ref(tensor),
            })
        })
        .collect()
}

fn tensor_ref(array: &ArrayD<f32>) -> TensorRef<'_> {
    TensorRef {
        shape: RSlice::from_slice(array.shape()),
        data: RSlice::from_slice(
            array
                .as_slice()
                .expect("the host keeps every tensor in standard layout"),
        ),
    }
}

/// The number of threads to use when the user does not say: every core.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_split_only_with_enough_rows_and_work() {
        // The 784 -> 1024 layer at 16 rows, as tests/threads.rs runs it: split.
        assert_eq!(piece_count(16, 2, 2 * 16 * 784 * 1024), 2);
        // Never a one-row piece, never more pieces than threads.
        assert_eq!(piece_count(3, 2, u64::MAX), 1);
        assert_eq!(piece_count(4, 2, u64::MAX), 2);
        assert_eq!(piece_count(1000, 2, u64::MAX), 2);
        assert_eq!(piece_count(1000, 1, u64::MAX), 1);
        // The seed MLP's first layer at batch 64 is too little work.
        assert_eq!(piece_count(64, 2, 2 * 64 * 64 * 8), 1);
        // Unknown work (0 FLOPs) is not split.
        assert_eq!(piece_count(1000, 2, 0), 1);
    }
}
