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

use abi_stable::std_types::RStr;
use layer_api::abi::{LayerError, ParamRef, PreparedHandle, TensorRef};
use layer_api::DType;

use crate::error::Error;
use crate::params::ParamStore;
use crate::runtime::{tensor_mut, tensor_ref, LayerPlan, Model, ModelLayer, PreparedData};
use crate::tensor::{Tensor, TensorView};

/// Below this many floating-point operations per piece, splitting a layer
/// costs more in hand-offs than it gains.
const MIN_FLOPS_PER_THREAD: u64 = 1_000_000;

/// One piece of a split layer: rows `[start, end)` of axis 0, as byte
/// ranges of the input and output.
#[derive(Debug, Clone)]
struct Piece {
    input_shape: Vec<usize>,
    output_shape: Vec<usize>,
    input_range: std::ops::Range<usize>,
    output_range: std::ops::Range<usize>,
}

/// What sees each layer's index, output and time taken in an observed run.
type LayerObserver<'a> = dyn FnMut(usize, &Tensor, Duration) + 'a;

/// A prepared forward pass of one model for one input shape.
pub struct Runner<'m> {
    layers: &'m [ModelLayer],
    plans: &'m [LayerPlan],
    params: Vec<Vec<ParamRef<'m>>>,
    prepared: Vec<PreparedData<'m>>,
    outputs: Vec<Tensor>,
    /// Per layer: the pieces its batch is split into (empty: run whole).
    pieces: Vec<Vec<Piece>>,
    pool: Option<rayon::ThreadPool>,
}

impl<'m> Runner<'m> {
    /// Prepares `model` for inputs of the shape `plans` was made for, with
    /// up to `threads` threads: each layer's output buffer, parameter views
    /// and prepared data (from `prepare`, once per parameter set).
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
        let prepared = model
            .layers
            .iter()
            .zip(plans)
            .zip(&layer_params)
            .map(|((layer, plan), refs)| layer.prepare(plan, refs))
            .collect::<Result<Vec<_>, Error>>()?;
        let outputs = plans
            .iter()
            .map(|p| {
                let spec = &p.outputs[0];
                Tensor::zeros(spec.dtype, &spec.shape).map_err(|message| Error::Model {
                    path: model.spec.path.clone(),
                    message,
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
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
            prepared,
            outputs,
            pieces,
            pool,
        })
    }

    /// Runs every layer on `input` and returns the last layer's output.
    pub fn run(&mut self, input: TensorView<'_>) -> Result<&Tensor, Error> {
        self.run_layers(input, None)
    }

    /// Like [`run`](Self::run); `after_layer` sees each layer's index,
    /// output and time taken. Only observed runs read the clock: two reads
    /// per layer cost tens of nanoseconds, a sizeable part of a batch-1
    /// layer call.
    pub fn run_observed(
        &mut self,
        input: TensorView<'_>,
        mut after_layer: impl FnMut(usize, &Tensor, Duration),
    ) -> Result<&Tensor, Error> {
        self.run_layers(input, Some(&mut after_layer))
    }

    /// Frees what the layers prepared, reporting a panic in its `Drop`.
    pub fn close(self) -> Result<(), Error> {
        let mut first = Ok(());
        for prepared in self.prepared {
            let closed = prepared.close();
            if first.is_ok() {
                first = closed;
            }
        }
        first
    }

    fn run_layers(
        &mut self,
        input: TensorView<'_>,
        mut after_layer: Option<&mut LayerObserver<'_>>,
    ) -> Result<&Tensor, Error> {
        let expected = &self.plans[0].input_shape;
        if expected.as_slice() != input.shape {
            return Err(Error::InputShape {
                expected: expected.clone(),
                found: input.shape.to_vec(),
            });
        }
        let expected_dtype = self.plans[0].inputs[0]
            .as_ref()
            .map_or(DType::F32, |s| s.dtype);
        if input.dtype != expected_dtype {
            return Err(Error::InputDtype {
                expected: expected_dtype,
                found: input.dtype,
            });
        }
        for i in 0..self.layers.len() {
            let started = after_layer.is_some().then(Instant::now);
            let (done, rest) = self.outputs.split_at_mut(i);
            let x = match i {
                0 => input,
                _ => done[i - 1].view(),
            };
            let out = &mut rest[0];
            out.bytes_mut().fill(0);
            run_layer(
                &self.layers[i],
                &self.plans[i],
                x,
                &self.params[i],
                self.prepared[i].handle,
                out,
                &self.pieces[i],
                self.pool.as_ref(),
            )?;
            self.layers[i].check_outputs(std::slice::from_ref(&self.outputs[i]))?;
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
    let pieces = piece_count(rows, threads, layer.flops(plan));
    if pieces < 2 {
        return Vec::new();
    }
    let in_dtype = plan.inputs[0].as_ref().map_or(DType::F32, |s| s.dtype);
    let in_row: usize = plan.input_shape[1..].iter().product::<usize>() * in_dtype.size();
    let out_row: usize =
        plan.output_shape[1..].iter().product::<usize>() * plan.outputs[0].dtype.size();
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

#[allow(clippy::too_many_arguments)]
fn run_layer(
    layer: &ModelLayer,
    plan: &LayerPlan,
    input: TensorView<'_>,
    params: &[ParamRef<'_>],
    prepared: PreparedHandle,
    output: &mut Tensor,
    pieces: &[Piece],
    pool: Option<&rayon::ThreadPool>,
) -> Result<(), Error> {
    let in_dtype = input.dtype;
    let out_dtype = output.dtype();
    // Optional inputs after the first are left out in a chain.
    let absent = plan.inputs.len() - 1;
    let call = |in_shape: &[usize], x: &[u8], out_shape: &[usize], y: &mut [u8]| {
        let first = TensorRef {
            dtype: in_dtype,
            shape: abi_stable::std_types::RSlice::from_slice(in_shape),
            data: abi_stable::std_types::RSlice::from_slice(x),
        };
        let mut outputs = [tensor_mut(out_shape, out_dtype, y)];
        if absent == 0 {
            // The common case, without an allocation per call.
            layer.call_forward(prepared, &[first], params, &mut outputs)
        } else {
            let mut inputs = Vec::with_capacity(1 + absent);
            inputs.push(first);
            inputs.extend((0..absent).map(|_| tensor_ref(None)));
            layer.call_forward(prepared, &inputs, params, &mut outputs)
        }
    };
    let x_all = input.bytes;
    let y_all = output.bytes_mut();
    let result = match pool {
        Some(pool) if !pieces.is_empty() => {
            let failure: Mutex<Option<LayerError>> = Mutex::new(None);
            pool.scope(|scope| {
                let mut rest = y_all;
                let mut taken = 0;
                for piece in pieces {
                    let (y, tail) = rest.split_at_mut(piece.output_range.end - taken);
                    rest = tail;
                    taken = piece.output_range.end;
                    let x = &x_all[piece.input_range.clone()];
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
        _ => call(&plan.input_shape, x_all, &plan.output_shape, y_all),
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
                tensor: param_tensor_ref(tensor),
            })
        })
        .collect()
}

fn param_tensor_ref(array: &ndarray::ArrayD<f32>) -> TensorRef<'_> {
    TensorRef {
        dtype: DType::F32,
        shape: abi_stable::std_types::RSlice::from_slice(array.shape()),
        data: abi_stable::std_types::RSlice::from_slice(bytemuck::cast_slice(
            array
                .as_slice()
                .expect("the host keeps every tensor in standard layout"),
        )),
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
