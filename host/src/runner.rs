//! The forward pass, set up once per input shape and run as often as needed.
//!
//! Everything a pass needs is prepared when the [`Runner`] is built: the
//! order nodes run in, a buffer for each tensor they make, the parameter
//! views and prepared data each node is lent, and how each node's batch is
//! split across threads. Running then allocates nothing.
//!
//! Memory: a tensor's buffer is reused by a later tensor of the same type
//! and shape once the first tensor's last reader has run, so a chain or a
//! graph holds about as much as its widest point, not every intermediate.
//! [`Runner::planned_peak_bytes`] says how much the live tensors take at
//! most.
//!
//! Threads: a batch-independent node whose work is large enough has its
//! batch (axis 0) cut into one piece per thread, and each piece runs through
//! the same layer object at once. A one-input node is split along its
//! input's axis 0 (as a chain always was); a node of several inputs is split
//! only along inputs that carry the model's batch (model inputs whose shape
//! starts with the symbol `batch`, and what batch-independent nodes make of
//! them), the others being lent whole. Kernels inside plugins stay on the
//! calling thread, so there is never more than one level of parallelism.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use abi_stable::std_types::RSlice;
use layer_api::abi::{ParamRef, TensorRef};
use layer_api::DType;

use crate::error::Error;
use crate::graph::Source;
use crate::model::Dim;
use crate::params::ParamStore;
use crate::runtime::{
    param_refs, tensor_mut, LayerPlan, Model, ModelLayer, Prepared, PreparedData, TensorSpec,
};
use crate::tensor::{Tensor, TensorView};

/// Below this many floating-point operations per piece, splitting a layer
/// costs more in hand-offs than it gains.
const MIN_FLOPS_PER_THREAD: u64 = 1_000_000;

/// One piece of a split node: rows `[start, end)` of axis 0.
#[derive(Debug, Clone)]
struct Piece {
    /// Per input: its shape and byte range in this piece (the whole tensor
    /// for an input lent whole).
    inputs: Vec<Option<(Vec<usize>, Range<usize>)>>,
    outputs: Vec<(Vec<usize>, Range<usize>)>,
}

/// What sees each node's index, first output and time taken in an
/// observed run.
type LayerObserver<'a> = dyn FnMut(usize, &Tensor, Duration) + 'a;

/// A prepared forward pass of one model for one set of input shapes.
pub struct Runner<'m> {
    model: &'m Model,
    plans: &'m [LayerPlan],
    inputs: Vec<TensorSpec>,
    params: Vec<Vec<ParamRef<'m>>>,
    prepared: Vec<PreparedData<'m>>,
    /// The buffers; each tensor's is `slot_of[source]`.
    slots: Vec<Option<Tensor>>,
    slot_of: BTreeMap<Source, usize>,
    /// Per node: its outputs' buffers, and where each of its inputs is read.
    out_slots: Vec<Vec<usize>>,
    in_feeds: Vec<Vec<Option<Feed>>>,
    /// A node's outputs while it runs (kept for its capacity).
    taken: Vec<Tensor>,
    /// Per node: the pieces its batch is split into (empty: run whole).
    pieces: Vec<Vec<Piece>>,
    pool: Option<Arc<rayon::ThreadPool>>,
    peak_bytes: usize,
}

impl<'m> Runner<'m> {
    /// Prepares `model` for one input of the shape `plans` was made for.
    pub fn new(
        model: &'m Model,
        plans: &'m [LayerPlan],
        params: &'m ParamStore,
        threads: usize,
    ) -> Result<Runner<'m>, Error> {
        let input = plans_input(model, plans);
        Runner::with_inputs(model, plans, params, &[input], threads)
    }

    /// Prepares `model` for inputs described by `inputs` (as `plans` was
    /// made for), with up to `threads` threads: each node's output buffers,
    /// parameter views and prepared data (from `prepare`, once per
    /// parameter set).
    pub fn with_inputs(
        model: &'m Model,
        plans: &'m [LayerPlan],
        params: &'m ParamStore,
        inputs: &[TensorSpec],
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
        let param_bytes = crate::budget::sum(
            plans
                .iter()
                .flat_map(|p| &p.params)
                .filter(|p| p.is_stored())
                .map(|p| crate::budget::shape_bytes(&p.shape, 4)),
        );
        let (slots, slot_of, peak_bytes) = assign_buffers(model, plans, inputs, param_bytes)?;
        let batched = batched_tensors(model, plans, inputs);
        let pieces = (0..model.layers.len())
            .map(|node| split(model, plans, inputs, &batched, node, threads))
            .collect::<Vec<_>>();
        let pool = crate::pool::shared(threads)?;
        let out_slots = (0..model.layers.len())
            .map(|node| {
                (0..plans[node].outputs.len())
                    .map(|output| slot_of[&Source::Node { node, output }])
                    .collect()
            })
            .collect();
        let in_feeds = model
            .graph
            .sources
            .iter()
            .map(|sources| {
                sources
                    .iter()
                    .map(|s| {
                        s.map(|s| match s {
                            Source::Input(i) => Feed::Input(i),
                            other => Feed::Slot(slot_of[&other]),
                        })
                    })
                    .collect()
            })
            .collect();
        Ok(Runner {
            model,
            plans,
            inputs: inputs.to_vec(),
            out_slots,
            in_feeds,
            taken: Vec::new(),
            params: layer_params,
            prepared,
            slots,
            slot_of,
            pieces,
            pool,
            peak_bytes,
        })
    }

    /// The most bytes the model's inputs and live tensors take at once
    /// during a pass, tensors freed after their last reader (as planned).
    pub fn planned_peak_bytes(&self) -> usize {
        self.peak_bytes
    }

    /// Runs every node on `input` (a one-input model) and returns the
    /// first model output.
    pub fn run(&mut self, input: TensorView<'_>) -> Result<&Tensor, Error> {
        self.run_nodes(&[input], None)?;
        Ok(self.output(0))
    }

    /// Like [`run`](Self::run); `after_layer` sees each node's index,
    /// first output and time taken. Only observed runs read the clock: two
    /// reads per node cost tens of nanoseconds, a sizeable part of a
    /// batch-1 layer call.
    pub fn run_observed(
        &mut self,
        input: TensorView<'_>,
        mut after_layer: impl FnMut(usize, &Tensor, Duration),
    ) -> Result<&Tensor, Error> {
        self.run_nodes(&[input], Some(&mut after_layer))?;
        Ok(self.output(0))
    }

    /// Runs every node on `inputs` (one per model input, in declared
    /// order) and returns every model output, in the model's order.
    pub fn run_all(
        &mut self,
        inputs: &[TensorView<'_>],
        after_layer: Option<&mut LayerObserver<'_>>,
    ) -> Result<Vec<&Tensor>, Error> {
        self.run_nodes(inputs, after_layer)?;
        Ok((0..self.model.graph.outputs.len())
            .map(|i| self.output(i))
            .collect())
    }

    fn output(&self, index: usize) -> &Tensor {
        let source = self.model.graph.outputs[index].1;
        self.slots[self.slot_of[&source]]
            .as_ref()
            .expect("outputs stay in their buffers")
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

    fn run_nodes(
        &mut self,
        inputs: &[TensorView<'_>],
        mut after_layer: Option<&mut LayerObserver<'_>>,
    ) -> Result<(), Error> {
        if inputs.len() != self.inputs.len() {
            return Err(Error::Model {
                path: self.model.spec.path.clone(),
                message: format!(
                    "the forward pass was prepared for {} input(s), not {}",
                    self.inputs.len(),
                    inputs.len()
                ),
            });
        }
        for (given, expected) in inputs.iter().zip(&self.inputs) {
            if given.shape != expected.shape.as_slice() {
                return Err(Error::InputShape {
                    expected: expected.shape.clone(),
                    found: given.shape.to_vec(),
                });
            }
            if given.dtype != expected.dtype {
                return Err(Error::InputDtype {
                    expected: expected.dtype,
                    found: given.dtype,
                });
            }
        }
        let model = self.model;
        for &node in &model.graph.order {
            let started = after_layer.is_some().then(Instant::now);
            let layer = &model.layers[node];
            let plan = &self.plans[node];
            if let [out_slot] = self.out_slots[node][..] {
                // One output (the common case): borrow its buffer in place,
                // beside the input buffers, which are other slots.
                let (before, rest) = self.slots.split_at_mut(out_slot);
                let (out, after) = rest.split_first_mut().expect("the slot exists");
                let out = out
                    .as_mut()
                    .expect("a buffer is free when its tensor is made");
                let view = |feed: &Option<Feed>| {
                    feed.map(|f| match f {
                        Feed::Input(i) => inputs[i],
                        Feed::Slot(s) => {
                            let slot = if s < out_slot {
                                &before[s]
                            } else {
                                &after[s - out_slot - 1]
                            };
                            slot.as_ref()
                                .expect("an input is in its buffer until read")
                                .view()
                        }
                    })
                };
                let mut few = [None; 4];
                let mut many = Vec::new();
                let views = gather_views(&self.in_feeds[node], view, &mut few, &mut many);
                out.bytes_mut().fill(0);
                run_node(
                    layer,
                    plan,
                    views,
                    &self.params[node],
                    self.prepared[node].handle,
                    std::slice::from_mut(out),
                    &self.pieces[node],
                    self.pool.as_deref(),
                )?;
                layer.check_outputs(std::slice::from_ref(out))?;
                if let (Some(observe), Some(started)) = (after_layer.as_mut(), started) {
                    observe(node, out, started.elapsed());
                }
                continue;
            }
            // Several outputs: take their buffers out, so that the inputs can
            // be borrowed from the others meanwhile. `taken` keeps its
            // capacity from run to run: nothing is allocated here.
            let mut taken = std::mem::take(&mut self.taken);
            for &slot in &self.out_slots[node] {
                taken.push(
                    self.slots[slot]
                        .take()
                        .expect("a buffer is free when its tensor is made"),
                );
            }
            let result = {
                let slots = &self.slots;
                let view = |feed: &Option<Feed>| {
                    feed.map(|f| match f {
                        Feed::Input(i) => inputs[i],
                        Feed::Slot(s) => slots[s]
                            .as_ref()
                            .expect("an input is in its buffer until read")
                            .view(),
                    })
                };
                let mut few = [None; 4];
                let mut many = Vec::new();
                let views = gather_views(&self.in_feeds[node], view, &mut few, &mut many);
                for out in taken.iter_mut() {
                    out.bytes_mut().fill(0);
                }
                run_node(
                    layer,
                    plan,
                    views,
                    &self.params[node],
                    self.prepared[node].handle,
                    &mut taken,
                    &self.pieces[node],
                    self.pool.as_deref(),
                )
                .and_then(|()| layer.check_outputs(&taken))
            };
            for (&slot, tensor) in self.out_slots[node].iter().zip(taken.drain(..)) {
                self.slots[slot] = Some(tensor);
            }
            self.taken = taken;
            result?;
            if let (Some(observe), Some(started)) = (after_layer.as_mut(), started) {
                let first = self.slots[self.out_slots[node][0]]
                    .as_ref()
                    .expect("just made");
                observe(node, first, started.elapsed());
            }
        }
        Ok(())
    }
}

/// The views of a node's inputs, one per feed: in `few` when there are at
/// most four (no allocation per call), else collected into `many`.
fn gather_views<'v>(
    feeds: &[Option<Feed>],
    view: impl Fn(&Option<Feed>) -> Option<TensorView<'v>>,
    few: &'v mut [Option<TensorView<'v>>; 4],
    many: &'v mut Vec<Option<TensorView<'v>>>,
) -> &'v [Option<TensorView<'v>>] {
    if feeds.len() <= few.len() {
        for (v, f) in few.iter_mut().zip(feeds) {
            *v = view(f);
        }
        &few[..feeds.len()]
    } else {
        *many = feeds.iter().map(view).collect();
        many
    }
}

/// Where a node input is read from in a run.
#[derive(Debug, Clone, Copy)]
enum Feed {
    /// The model input of this index.
    Input(usize),
    /// The buffer of this index.
    Slot(usize),
}

/// The model input `plans` was made for, in a model of one input: as the
/// first node that reads it was planned.
pub(crate) fn plans_input(model: &Model, plans: &[LayerPlan]) -> TensorSpec {
    model
        .graph
        .sources
        .iter()
        .zip(plans)
        .find_map(|(sources, plan)| {
            sources
                .iter()
                .position(|s| *s == Some(Source::Input(0)))
                .and_then(|port| plan.inputs[port].clone())
        })
        .unwrap_or_else(|| TensorSpec::new(DType::F32, &plans[0].input_shape))
}

/// One buffer per tensor, reused by a later tensor of the same type and
/// shape once the earlier one's last reader has run. Returns the buffers,
/// each tensor's buffer, and the planned peak of live bytes (model inputs
/// included). The buffers are laid out first and allocated only once their
/// total, with the `param_bytes` of parameters already held, is known to fit
/// in the memory budget.
#[allow(clippy::type_complexity)]
fn assign_buffers(
    model: &Model,
    plans: &[LayerPlan],
    inputs: &[TensorSpec],
    param_bytes: Option<u128>,
) -> Result<(Vec<Option<Tensor>>, BTreeMap<Source, usize>, usize), Error> {
    // Each output's buffer fits in the memory budget on its own, or the
    // layer that declared it is named.
    for &node in &model.graph.order {
        let layer = &model.layers[node];
        for (name, spec) in layer.signature.outputs.iter().zip(&plans[node].outputs) {
            if let Err(over) = crate::budget::check_shape(&spec.shape, spec.dtype.size()) {
                return Err(Error::Layer {
                    layer: layer.name.clone(),
                    plugin: layer.plugin.name.clone(),
                    message: format!(
                        "output '{name}' of shape {} {over}",
                        crate::budget::shape_text(&spec.shape)
                    ),
                    panicked: false,
                });
            }
        }
    }
    let last_use = model.graph.last_use();
    let dies_at = dying_node_tensors(model, &last_use);
    let mut slots: Vec<TensorSpec> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut slot_of = BTreeMap::new();
    for (step, &node) in model.graph.order.iter().enumerate() {
        for (o, spec) in plans[node].outputs.iter().enumerate() {
            let source = Source::Node { node, output: o };
            let slot = match free.iter().position(|&s| slots[s] == *spec) {
                Some(at) => free.swap_remove(at),
                None => {
                    slots.push(spec.clone());
                    slots.len() - 1
                }
            };
            slot_of.insert(source, slot);
        }
        // Free what this step read last, and outputs nobody reads.
        for source in &dies_at[step] {
            free.push(slot_of[source]);
        }
        for o in 0..plans[node].outputs.len() {
            let source = Source::Node { node, output: o };
            if !last_use.contains_key(&source) {
                free.push(slot_of[&source]);
            }
        }
    }
    let buffer_bytes = crate::budget::sum(
        slots
            .iter()
            .map(|spec| crate::budget::shape_bytes(&spec.shape, spec.dtype.size())),
    );
    let total = buffer_bytes
        .zip(param_bytes)
        .and_then(|(b, p)| b.checked_add(p));
    crate::budget::check(total).map_err(|over| Error::Model {
        path: model.spec.path.clone(),
        message: format!(
            "the forward pass (buffers for {} of the layers' outputs: {} bytes; parameters: \
             {} bytes) {over}",
            slots.len(),
            buffer_bytes.map_or("overflow".to_string(), |b| b.to_string()),
            param_bytes.map_or("overflow".to_string(), |b| b.to_string()),
        ),
    })?;
    let buffers = slots
        .iter()
        .map(|spec| {
            Tensor::zeros(spec.dtype, &spec.shape)
                .map(Some)
                .map_err(|message| Error::Model {
                    path: model.spec.path.clone(),
                    message,
                })
        })
        .collect::<Result<Vec<_>, Error>>()?;
    let peak = planned_peak_bytes(model, plans, inputs);
    Ok((buffers, slot_of, peak))
}

/// The most bytes the model's inputs and live tensors take at once during
/// a pass of `model` planned as `plans` for `inputs`, each tensor freed after
/// its last reader: what [`Runner::planned_peak_bytes`] reports, computed
/// without allocating anything.
pub fn planned_peak_bytes(model: &Model, plans: &[LayerPlan], inputs: &[TensorSpec]) -> usize {
    let last_use = model.graph.last_use();
    let dies_at = dying_node_tensors(model, &last_use);
    // Saturating: each tensor was checked against the memory budget when
    // planned, but a sum of them need not fit.
    let bytes = |spec: &TensorSpec| {
        crate::budget::shape_bytes(&spec.shape, spec.dtype.size())
            .map_or(usize::MAX, |b| usize::try_from(b).unwrap_or(usize::MAX))
    };
    let mut live: usize = inputs.iter().map(bytes).fold(0, usize::saturating_add);
    let mut peak = live;
    for (step, &node) in model.graph.order.iter().enumerate() {
        live = plans[node]
            .outputs
            .iter()
            .map(bytes)
            .fold(live, usize::saturating_add);
        peak = peak.max(live);
        for source in &dies_at[step] {
            live = live.saturating_sub(bytes(model.source_spec(plans, inputs, *source)));
        }
        for (o, spec) in plans[node].outputs.iter().enumerate() {
            if !last_use.contains_key(&Source::Node { node, output: o }) {
                live = live.saturating_sub(bytes(spec));
            }
        }
    }
    peak
}

/// Per step, the node outputs whose last reader runs at that step (model
/// inputs are the caller's, never freed here).
fn dying_node_tensors(model: &Model, last_use: &BTreeMap<Source, usize>) -> Vec<Vec<Source>> {
    let mut dies_at = vec![Vec::new(); model.graph.order.len()];
    for (source, &last) in last_use {
        if let (Source::Node { .. }, Some(step)) = (source, dies_at.get_mut(last)) {
            step.push(*source);
        }
    }
    dies_at
}

/// Which tensors carry the model's batch along axis 0: format-1 input (of
/// rank 2 or more), format-2 inputs whose shape starts with the symbol
/// `batch`, and the outputs of batch-independent nodes that read one and
/// keep its rows.
pub(crate) fn batched_tensors(
    model: &Model,
    plans: &[LayerPlan],
    inputs: &[TensorSpec],
) -> BTreeMap<Source, bool> {
    let mut batched = BTreeMap::new();
    let mut rows = None;
    for (i, declared) in model.spec.inputs.iter().enumerate() {
        let is = match &declared.shape {
            None => inputs[i].shape.len() >= 2,
            Some(dims) => matches!(dims.first(), Some(Dim::Symbol(s)) if s == "batch"),
        };
        if is {
            rows = inputs[i].shape.first().copied();
        }
        batched.insert(Source::Input(i), is);
    }
    for &node in &model.graph.order {
        let reads_batch = model.graph.sources[node]
            .iter()
            .flatten()
            .any(|s| batched.get(s).copied().unwrap_or(false));
        let independent = reads_batch && model.layers[node].batch_independent();
        for (o, spec) in plans[node].outputs.iter().enumerate() {
            let keeps_rows = spec.shape.len() >= 2 && spec.shape.first().copied() == rows;
            batched.insert(Source::Node { node, output: o }, independent && keeps_rows);
        }
    }
    batched
}

/// Decides how a node's batch is split: only batch-independent nodes whose
/// outputs keep the batch axis, with enough work per piece.
fn split(
    model: &Model,
    plans: &[LayerPlan],
    inputs: &[TensorSpec],
    batched: &BTreeMap<Source, bool>,
    node: usize,
    threads: usize,
) -> Vec<Piece> {
    let layer = &model.layers[node];
    let plan = &plans[node];
    let sources = &model.graph.sources[node];
    let specs: Vec<Option<&TensorSpec>> = sources
        .iter()
        .map(|s| s.map(|s| model.source_spec(plans, inputs, s)))
        .collect();
    // Which inputs are cut: a lone input along its axis 0, as chains always
    // were; with several, those carrying the batch.
    let cut: Vec<bool> = if sources.iter().flatten().count() == 1 {
        specs.iter().map(Option::is_some).collect()
    } else {
        sources
            .iter()
            .map(|s| s.is_some_and(|s| batched.get(&s).copied().unwrap_or(false)))
            .collect()
    };
    let Some(rows) = specs
        .iter()
        .zip(&cut)
        .find(|(_, &c)| c)
        .and_then(|(s, _)| s.and_then(|s| s.shape.first().copied()))
    else {
        return Vec::new();
    };
    let all_rows = specs
        .iter()
        .zip(&cut)
        .all(|(s, &c)| !c || s.is_some_and(|s| s.shape.len() >= 2 && s.shape[0] == rows));
    let outputs_keep_rows = plan
        .outputs
        .iter()
        .all(|o| o.shape.len() >= 2 && o.shape[0] == rows);
    if threads < 2 || rows < 2 || !all_rows || !outputs_keep_rows || !layer.batch_independent() {
        return Vec::new();
    }
    let pieces = piece_count(rows, threads, layer.flops(plan));
    if pieces < 2 {
        return Vec::new();
    }
    let row_bytes =
        |spec: &TensorSpec| spec.shape[1..].iter().product::<usize>() * spec.dtype.size();
    let all_bytes = |spec: &TensorSpec| spec.shape.iter().product::<usize>() * spec.dtype.size();
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
                inputs: specs
                    .iter()
                    .zip(&cut)
                    .map(|(spec, &c)| {
                        spec.map(|spec| {
                            if c {
                                let r = row_bytes(spec);
                                (with_rows(&spec.shape), start * r..end * r)
                            } else {
                                (spec.shape.clone(), 0..all_bytes(spec))
                            }
                        })
                    })
                    .collect(),
                outputs: plan
                    .outputs
                    .iter()
                    .map(|spec| {
                        let r = row_bytes(spec);
                        (with_rows(&spec.shape), start * r..end * r)
                    })
                    .collect(),
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
fn run_node(
    layer: &ModelLayer,
    plan: &LayerPlan,
    inputs: &[Option<TensorView<'_>>],
    params: &[ParamRef<'_>],
    prepared: Prepared,
    outputs: &mut [Tensor],
    pieces: &[Piece],
    pool: Option<&rayon::ThreadPool>,
) -> Result<(), Error> {
    if layer.is_isolated() {
        // The worker runs the pieces on its own threads.
        let pieces: Vec<_> = pieces
            .iter()
            .map(|p| crate::isolate::Piece {
                inputs: p.inputs.clone(),
                outputs: p.outputs.clone(),
            })
            .collect();
        let mode = crate::isolate::CallMode {
            lend_threads: match pool {
                Some(pool) if pieces.is_empty() => pool.current_num_threads(),
                _ => 1,
            },
            ..Default::default()
        };
        return layer.forward_isolated(plan, prepared, inputs, outputs, pieces, mode);
    }
    fn input_ref<'a>(
        view: &Option<TensorView<'a>>,
        piece: Option<&'a (Vec<usize>, Range<usize>)>,
    ) -> TensorRef<'a> {
        match view {
            Some(v) => {
                let (shape, bytes) = match piece {
                    Some((shape, range)) => (shape.as_slice(), &v.bytes[range.clone()]),
                    None => (v.shape, v.bytes),
                };
                TensorRef {
                    dtype: v.dtype,
                    shape: RSlice::from_slice(shape),
                    data: RSlice::from_slice(bytes),
                }
            }
            None => crate::runtime::tensor_ref(None),
        }
    }
    let result = match pool {
        Some(pool) if !pieces.is_empty() => {
            let failure: Mutex<Option<Error>> = Mutex::new(None);
            // Each output cut into the pieces' row ranges, in order.
            let mut per_piece: Vec<Vec<&mut [u8]>> = pieces.iter().map(|_| Vec::new()).collect();
            for (o, out) in outputs.iter_mut().enumerate() {
                let mut rest = out.bytes_mut();
                let mut taken = 0;
                for (k, piece) in pieces.iter().enumerate() {
                    let end = piece.outputs[o].1.end;
                    let (y, tail) = rest.split_at_mut(end - taken);
                    rest = tail;
                    taken = end;
                    per_piece[k].push(y);
                }
            }
            // Each piece's outputs, taken by the task that runs it.
            let per_piece: Vec<Mutex<Vec<&mut [u8]>>> =
                per_piece.into_iter().map(Mutex::new).collect();
            crate::pool::run_each(pool, pieces.len(), |k| {
                let piece = &pieces[k];
                let ys =
                    std::mem::take(&mut *per_piece[k].lock().unwrap_or_else(|p| p.into_inner()));
                let refs: Vec<TensorRef<'_>> = inputs
                    .iter()
                    .zip(&piece.inputs)
                    .map(|(v, p)| input_ref(v, p.as_ref()))
                    .collect();
                let mut muts: Vec<_> = ys
                    .into_iter()
                    .zip(&piece.outputs)
                    .zip(plan.outputs.iter())
                    .map(|((y, (shape, _)), spec)| tensor_mut(shape, spec.dtype, y))
                    .collect();
                // Split here, so the pool is not lent as well.
                if let Err(e) = layer.call_forward(prepared, &refs, params, &mut muts, None) {
                    let mut slot = failure.lock().unwrap_or_else(|p| p.into_inner());
                    slot.get_or_insert(e);
                }
            });
            match failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
                Some(e) => Err(e),
                None => Ok(()),
            }
        }
        _ if inputs.len() == 1 && outputs.len() == 1 => {
            // The common case, without an allocation per call.
            let refs = [input_ref(&inputs[0], None)];
            let spec = &plan.outputs[0];
            let mut muts = [tensor_mut(&spec.shape, spec.dtype, outputs[0].bytes_mut())];
            layer.call_forward(prepared, &refs, params, &mut muts, pool)
        }
        _ => {
            let refs: Vec<TensorRef<'_>> = inputs.iter().map(|v| input_ref(v, None)).collect();
            let mut muts: Vec<_> = outputs
                .iter_mut()
                .zip(&plan.outputs)
                .map(|(t, spec)| tensor_mut(&spec.shape, spec.dtype, t.bytes_mut()))
                .collect();
            layer.call_forward(prepared, &refs, params, &mut muts, pool)
        }
    };
    result
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
