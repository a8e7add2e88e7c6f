//! Training through plugins: a forward pass that keeps every tensor, the
//! host's loss, then each layer's `backward` (interface 1.2) in reverse
//! order, gradients summed where a tensor or a parameter is used twice, and
//! the host's optimizer.
//!
//! Which parameters train is decided from the graph before anything runs:
//! a parameter trains when its layer offers `backward` and a path of layers
//! that offer `backward` leads from the layer to the model's output. Every
//! other parameter is frozen, with the reason ([`Frozen`]).

pub mod data;
pub mod loss;
pub mod optim;
pub mod plot;

use std::collections::{BTreeMap, BTreeSet};

use layer_api::abi::{TensorMut, TensorRef};
use layer_api::DType;
use ndarray::ArrayD;

use crate::error::Error;
use crate::graph::Source;
use crate::params::ParamStore;
use crate::runtime::{param_refs, LayerPlan, Model, PreparedData};
use crate::tensor::Tensor;

pub use loss::Loss;

/// A parameter that does not train, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Frozen {
    pub name: String,
    pub why: String,
    /// A shared parameter that trains through its other uses.
    pub partial: bool,
}

/// What training needs of a model: which output the loss reads, and which
/// parameters train.
pub struct Trainer<'m> {
    pub model: &'m Model,
    /// The stored names of the parameters that train.
    pub trainable: BTreeSet<String>,
    pub frozen: Vec<Frozen>,
    /// Per node: whether it runs `backward` at all.
    differentiated: Vec<bool>,
    output: Source,
    buffers: Buffers,
    /// Lent to every layer call: training runs each step as one batch, so
    /// the layers spread their products over the threads themselves.
    pool: Option<std::sync::Arc<rayon::ThreadPool>>,
}

/// Gradient buffers kept from step to step. A step needs the same large
/// buffers each time (7 MB for the 784 MLP); taken anew from the system
/// they came back as fresh pages, faulted in and zeroed by the kernel: a
/// fifth of a step's time went to that.
#[derive(Default)]
struct Buffers {
    free: std::sync::Mutex<Vec<Vec<f32>>>,
}

impl Buffers {
    /// A zeroed array of `shape`, in a kept buffer of that size if any.
    fn zeros(&self, shape: &[usize]) -> ArrayD<f32> {
        let n: usize = shape.iter().product();
        let kept = {
            let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
            free.iter()
                .position(|b| b.len() == n)
                .map(|i| free.swap_remove(i))
        };
        let values = match kept {
            Some(mut b) => {
                b.fill(0.0);
                b
            }
            None => vec![0.0; n],
        };
        ArrayD::from_shape_vec(ndarray::IxDyn(shape), values).expect("n elements")
    }

    /// Keeps `array`'s buffer for a later [`Buffers::zeros`].
    fn keep(&self, array: ArrayD<f32>) {
        let (values, _) = array.into_raw_vec_and_offset();
        self.free
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(values);
    }
}

/// The outcome of one forward and backward pass on a minibatch.
pub struct Pass {
    pub loss: f64,
    /// The gradient of the loss for each trainable parameter, by stored
    /// name (summed over every layer that shares it).
    pub grads: BTreeMap<String, ArrayD<f32>>,
}

/// Every tensor a forward pass computed, and what each layer prepared
/// (taken by `backward`, in reverse order).
type Forward<'m> = (BTreeMap<Source, Tensor>, Vec<Option<PreparedData<'m>>>);

fn is_float(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::F64 | DType::F16 | DType::BF16)
}

impl<'m> Trainer<'m> {
    /// The threads lent to the layers, for the optimizer's step too.
    pub fn pool(&self) -> Option<&rayon::ThreadPool> {
        self.pool.as_deref()
    }

    /// Decides what trains, from the graph and `plans` (any batch size);
    /// layers may use `threads` threads in each call.
    pub fn new(
        model: &'m Model,
        plans: &[LayerPlan],
        threads: usize,
    ) -> Result<Trainer<'m>, Error> {
        let invalid = |message: String| Error::Model {
            path: model.spec.path.clone(),
            message,
        };
        let [(_, output)] = model.graph.outputs.as_slice() else {
            return Err(invalid(format!(
                "training needs a model with one output for the loss; this one has {} ({})",
                model.graph.outputs.len(),
                model
                    .graph
                    .outputs
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        };
        if let Some(layer) = model.layers.iter().find(|l| l.is_isolated()) {
            return Err(invalid(format!(
                "layer '{}' runs isolated; training runs every layer in the host's process \
                 (leave out --isolate and the model's \"isolate\")",
                layer.name
            )));
        }
        // Backwards from the output: which tensors a gradient reaches, and
        // the first forward-only layer that stops it.
        let n = model.layers.len();
        let mut reached: BTreeSet<Source> = BTreeSet::from([*output]);
        let mut differentiated = vec![false; n];
        // Per node whose outputs get no gradient: the forward-only layer
        // downstream that stops it, if any.
        let mut blocked_by: Vec<Option<usize>> = vec![None; n];
        for &node in model.graph.order.iter().rev() {
            let layer = &model.layers[node];
            let outputs_reached = (0..layer.signature.outputs.len())
                .any(|output| reached.contains(&Source::Node { node, output }));
            if outputs_reached && layer.has_backward() {
                differentiated[node] = true;
                for (source, port) in model.graph.sources[node].iter().zip(&plans[node].inputs) {
                    if let (Some(source), Some(spec)) = (source, port) {
                        if is_float(spec.dtype) {
                            reached.insert(*source);
                        }
                    }
                }
            } else {
                let stopper = if outputs_reached { Some(node) } else { None };
                for source in model.graph.sources[node].iter().flatten() {
                    if let Source::Node { node: from, .. } = *source {
                        if blocked_by[from].is_none() {
                            blocked_by[from] = stopper.or(blocked_by[node]);
                        }
                    }
                }
            }
        }
        let mut trainable = BTreeSet::new();
        let mut frozen = Vec::new();
        for (node, plan) in plans.iter().enumerate() {
            let layer = &model.layers[node];
            for p in &plan.params {
                if differentiated[node] {
                    trainable.insert(p.stored_as.clone());
                    continue;
                }
                let why = if !layer.has_backward() {
                    format!(
                        "layer '{}' (plugin '{}') is forward-only: its plugin offers no backward",
                        layer.name, layer.plugin.name
                    )
                } else if let Some(stop) = blocked_by[node] {
                    let s = &model.layers[stop];
                    format!(
                        "its gradient would pass through layer '{}' (plugin '{}'), which is \
                         forward-only",
                        s.name, s.plugin.name
                    )
                } else {
                    "no gradient reaches it from the model's output".to_string()
                };
                frozen.push(Frozen {
                    name: p.name.clone(),
                    why,
                    partial: false,
                });
            }
        }
        // A shared parameter trains if any of its users does; the uses a
        // gradient cannot reach are then left out of its sum, and said so.
        for f in &mut frozen {
            let stored = plans
                .iter()
                .flat_map(|p| &p.params)
                .find(|p| p.name == f.name)
                .map(|p| p.stored_as.clone());
            if let Some(stored) = stored.filter(|s| trainable.contains(s)) {
                f.why = if stored == f.name {
                    format!(
                        "it trains through the layers that share it, but its own layer's use \
                         adds nothing to its gradient, because {}",
                        f.why
                    )
                } else {
                    format!(
                        "it shares '{stored}', which trains through its other uses, but this \
                         use adds nothing to its gradient, because {}",
                        f.why
                    )
                };
                f.partial = true;
            }
        }
        Ok(Trainer {
            model,
            trainable,
            frozen,
            differentiated,
            output: *output,
            buffers: Buffers::default(),
            pool: crate::pool::shared(threads)?,
        })
    }

    /// The forward pass on `inputs` (the model's, converted to the types
    /// `plans` were made for), keeping every tensor; what each layer
    /// prepared is returned to be reused by `backward`.
    fn forward<'p>(
        &self,
        plans: &[LayerPlan],
        params: &'p ParamStore,
        inputs: &[Tensor],
    ) -> Result<Forward<'m>, Error>
    where
        'm: 'p,
    {
        let model = self.model;
        let mut values: BTreeMap<Source, Tensor> = BTreeMap::new();
        let mut prepared: Vec<Option<PreparedData<'m>>> =
            (0..model.layers.len()).map(|_| None).collect();
        for &node in &model.graph.order {
            let layer = &model.layers[node];
            let plan = &plans[node];
            let refs = param_refs(plan, params)?;
            let data = layer.prepare(plan, &refs)?;
            let mut outputs = plan
                .outputs
                .iter()
                .map(|spec| {
                    Tensor::zeros(spec.dtype, &spec.shape).map_err(|m| layer_error(layer, m))
                })
                .collect::<Result<Vec<_>, _>>()?;
            {
                let input_refs: Vec<TensorRef<'_>> = model.graph.sources[node]
                    .iter()
                    .map(|s| crate::runtime::tensor_ref(s.map(|s| lookup(&values, inputs, s))))
                    .collect();
                let mut muts: Vec<TensorMut<'_>> = outputs
                    .iter_mut()
                    .zip(&plan.outputs)
                    .map(|(t, spec)| {
                        crate::runtime::tensor_mut(&spec.shape, spec.dtype, t.bytes_mut())
                    })
                    .collect();
                layer.call_forward(
                    data.handle,
                    &input_refs,
                    &refs,
                    &mut muts,
                    self.pool.as_deref(),
                )?;
            }
            layer.check_outputs(&outputs)?;
            for (output, t) in outputs.into_iter().enumerate() {
                values.insert(Source::Node { node, output }, t);
            }
            prepared[node] = Some(data);
        }
        Ok((values, prepared))
    }

    /// The model's output on `inputs`, and the loss against `target`.
    pub fn evaluate(
        &self,
        plans: &[LayerPlan],
        params: &ParamStore,
        inputs: &[Tensor],
        target: &Tensor,
        loss: Loss,
    ) -> Result<f64, Error> {
        let (mut values, prepared) = self.forward(plans, params, inputs)?;
        for data in prepared.into_iter().flatten() {
            data.close()?;
        }
        let output = take_output(&mut values, inputs, self.output);
        loss.value(&output, target).map_err(|m| self.loss_error(m))
    }

    /// One forward and backward pass: the loss on `inputs` against
    /// `target`, and the gradient of every trainable parameter.
    pub fn pass(
        &self,
        plans: &[LayerPlan],
        params: &ParamStore,
        inputs: &[Tensor],
        target: &Tensor,
        loss: Loss,
    ) -> Result<Pass, Error> {
        let model = self.model;
        let (values, mut prepared) = self.forward(plans, params, inputs)?;
        let output = lookup(&values, inputs, self.output);
        let (value, grad) = loss
            .value_and_grad(output, target)
            .map_err(|m| self.loss_error(m))?;
        let mut grads_of: BTreeMap<Source, ArrayD<f32>> = BTreeMap::from([(self.output, grad)]);
        let mut param_grads: BTreeMap<String, ArrayD<f32>> = BTreeMap::new();
        for &node in model.graph.order.iter().rev() {
            let data = prepared[node].take().expect("every node was prepared");
            if !self.differentiated[node] {
                data.close()?;
                continue;
            }
            let layer = &model.layers[node];
            let plan = &plans[node];
            let refs = param_refs(plan, params)?;
            let n_outputs = plan.outputs.len();
            let output_tensors: Vec<&Tensor> = (0..n_outputs)
                .map(|output| &values[&Source::Node { node, output }])
                .collect();
            // A float output nobody differentiates gets zeros; others none.
            let output_grads: Vec<Option<Tensor>> = (0..n_outputs)
                .map(|output| {
                    let spec = &plan.outputs[output];
                    match grads_of.remove(&Source::Node { node, output }) {
                        Some(g) => Ok(Some(
                            Tensor::F32(g)
                                .convert(spec.dtype)
                                .map_err(|m| layer_error(layer, m))?,
                        )),
                        None if is_float(spec.dtype) => Tensor::zeros(spec.dtype, &spec.shape)
                            .map(Some)
                            .map_err(|m| layer_error(layer, m)),
                        None => Ok(None),
                    }
                })
                .collect::<Result<_, Error>>()?;
            let sources = &model.graph.sources[node];
            let mut input_grads: Vec<Option<Tensor>> = sources
                .iter()
                .zip(&plan.inputs)
                .map(|(source, spec)| match (source, spec) {
                    (Some(Source::Node { .. }), Some(spec)) if is_float(spec.dtype) => {
                        Tensor::zeros(spec.dtype, &spec.shape)
                            .map(Some)
                            .map_err(|m| layer_error(layer, m))
                    }
                    _ => Ok(None),
                })
                .collect::<Result<_, Error>>()?;
            let mut pgrads: Vec<Option<Tensor>> = plan
                .params
                .iter()
                .map(|p| {
                    self.trainable
                        .contains(&p.stored_as)
                        .then(|| Tensor::F32(self.buffers.zeros(&p.shape)))
                })
                .collect();
            {
                let input_refs = crate::runtime::tensor_refs(
                    sources
                        .iter()
                        .map(|s| s.map(|s| lookup(&values, inputs, s))),
                );
                let output_refs =
                    crate::runtime::tensor_refs(output_tensors.iter().map(|t| Some(*t)));
                let grad_refs =
                    crate::runtime::tensor_refs(output_grads.iter().map(Option::as_ref));
                let input_shapes = crate::runtime::grad_shapes(&input_grads);
                let param_shapes = crate::runtime::grad_shapes(&pgrads);
                let mut input_muts = crate::runtime::grad_muts(&mut input_grads, &input_shapes);
                let mut param_muts = crate::runtime::grad_muts(&mut pgrads, &param_shapes);
                layer.call_backward(
                    data.handle,
                    &input_refs,
                    &refs,
                    &output_refs,
                    &grad_refs,
                    &mut input_muts,
                    &mut param_muts,
                    self.pool.as_deref(),
                )?;
            }
            data.close()?;
            for (source, grad) in sources.iter().zip(input_grads) {
                let (Some(source), Some(grad)) = (source, grad) else {
                    continue;
                };
                let grad = match grad.convert(DType::F32) {
                    Ok(Tensor::F32(a)) => a,
                    _ => {
                        return Err(layer_error(
                            layer,
                            "an input gradient is not a float".into(),
                        ))
                    }
                };
                accumulate(&mut grads_of, *source, grad);
            }
            for (p, grad) in plan.params.iter().zip(pgrads) {
                if let Some(Tensor::F32(grad)) = grad {
                    check_finite(layer, &p.local_name, &grad)?;
                    match param_grads.get_mut(&p.stored_as) {
                        Some(sum) => *sum += &grad,
                        None => {
                            param_grads.insert(p.stored_as.clone(), grad);
                        }
                    }
                }
            }
        }
        Ok(Pass {
            loss: value,
            grads: param_grads,
        })
    }

    /// Takes back the gradients of a [`Pass`] once the optimizer used them,
    /// to reuse their buffers in the next.
    pub fn recycle(&self, grads: BTreeMap<String, ArrayD<f32>>) {
        for grad in grads.into_values() {
            self.buffers.keep(grad);
        }
    }

    fn loss_error(&self, message: String) -> Error {
        Error::Model {
            path: self.model.spec.path.clone(),
            message: format!("the loss: {message}"),
        }
    }
}

fn layer_error(layer: &crate::runtime::ModelLayer, message: String) -> Error {
    Error::Layer {
        layer: layer.name.clone(),
        plugin: layer.plugin.name.clone(),
        message,
        panicked: false,
    }
}

/// A gradient that is NaN or infinite would spoil every parameter it
/// reaches: name the layer and parameter instead.
fn check_finite(
    layer: &crate::runtime::ModelLayer,
    name: &str,
    grad: &ArrayD<f32>,
) -> Result<(), Error> {
    match grad.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(i) => Err(layer_error(
            layer,
            format!(
                "backward wrote {} into the gradient of parameter '{name}' (element {i}); \
                 lower --lr or check the data",
                grad.as_slice().map_or(f32::NAN, |s| s[i])
            ),
        )),
    }
}

fn accumulate(grads: &mut BTreeMap<Source, ArrayD<f32>>, source: Source, grad: ArrayD<f32>) {
    match grads.get_mut(&source) {
        Some(sum) => *sum += &grad,
        None => {
            grads.insert(source, grad);
        }
    }
}

fn lookup<'a>(
    values: &'a BTreeMap<Source, Tensor>,
    inputs: &'a [Tensor],
    source: Source,
) -> &'a Tensor {
    match source {
        Source::Input(i) => &inputs[i],
        node => &values[&node],
    }
}

fn take_output(values: &mut BTreeMap<Source, Tensor>, inputs: &[Tensor], source: Source) -> Tensor {
    match source {
        Source::Input(i) => inputs[i].clone(),
        node => values.remove(&node).expect("every node ran"),
    }
}
