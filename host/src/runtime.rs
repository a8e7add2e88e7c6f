//! A model made runnable: each layer's plugin resolved and its layer object
//! created, element types, shapes and parameters planned for an input
//! before any computation, then the forward pass, layer by layer.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use abi_stable::std_types::{RSlice, RSliceMut, RStr, RVec};
use layer_api::abi::{
    LayerError, LayerHandle, ParamRef, PreparedHandle, ProbeCase, TensorMut, TensorRef,
};
use layer_api::{DType, Init};

use crate::error::Error;
use crate::graph::{Graph, Source};
use crate::isolate::{self, CallError, Reply, Request, Worker};
use crate::model::{Dim, ModelSpec};
use crate::params::{ParamInfo, ParamStore};
use crate::registry::{self, LoadedPlugin, PluginRegistry};
use crate::tensor::{Tensor, TensorView};

pub use crate::plan::{InputPort, LayerPlan, Signature, TensorSpec};

/// The plugin a layer comes from, as messages and summaries name it.
#[derive(Debug, Clone)]
pub struct PluginMeta {
    pub name: String,
    pub version: String,
}

/// Where a layer's code runs.
enum Link {
    /// In the host's process: the loaded library and the layer object,
    /// `None` once destroyed. Every call holds the read lock, so
    /// [`ModelLayer::close`] (the write lock) waits for calls in flight and
    /// no call can reach a destroyed layer.
    InProcess {
        plugin: &'static LoadedPlugin,
        handle: RwLock<Option<LayerHandle>>,
    },
    /// In a worker process ([`crate::isolate`]), as its layer `id`.
    Isolated {
        worker: Arc<Worker>,
        id: u64,
        closed: AtomicBool,
    },
}

/// A layer whose plugin is loaded and whose layer object exists.
pub struct ModelLayer {
    pub name: String,
    pub plugin: PluginMeta,
    pub signature: Signature,
    link: Link,
}

/// What a layer prepared from one parameter set, wherever it runs.
#[derive(Debug, Clone, Copy)]
pub enum Prepared {
    InProcess(PreparedHandle),
    /// The worker's id for it.
    Isolated(u64),
}

impl Prepared {
    const NONE: Prepared = Prepared::InProcess(PreparedHandle::NONE);
}

/// What a layer prepared from one parameter set; freed when dropped.
pub struct PreparedData<'a> {
    layer: &'a ModelLayer,
    pub(crate) handle: Prepared,
}

impl PreparedData<'_> {
    /// Frees the prepared data now, reporting a panic in its `Drop`.
    pub fn close(mut self) -> Result<(), Error> {
        let handle = std::mem::replace(&mut self.handle, Prepared::NONE);
        self.layer.drop_prepared(handle)
    }
}

impl Drop for PreparedData<'_> {
    fn drop(&mut self) {
        let handle = std::mem::replace(&mut self.handle, Prepared::NONE);
        // Reached only on an error path already being reported.
        let _ = self.layer.drop_prepared(handle);
    }
}

/// A plan as a layer answers it, before the host checks it.
struct RawPlan {
    outputs: Vec<(DType, Vec<usize>)>,
    params: Vec<isolate::ParamDecl>,
}

/// A model ready to plan and run: its nodes' layers, and its wiring.
pub struct Model {
    pub spec: ModelSpec,
    /// One per node, in the model file's order.
    pub layers: Vec<ModelLayer>,
    pub graph: Graph,
}

impl ModelLayer {
    /// Creates the layer called `name` from `plugin` with `config`, in the
    /// host's process.
    pub fn new(
        name: &str,
        plugin: &'static LoadedPlugin,
        config: &serde_json::Value,
    ) -> Result<ModelLayer, Error> {
        let handle = plugin.create(config).map_err(|e| Error::Layer {
            layer: name.to_string(),
            plugin: plugin.name.clone(),
            message: format!("invalid config {config}: {}", e.message),
            panicked: e.panicked,
        })?;
        let layer = ModelLayer {
            name: name.to_string(),
            plugin: PluginMeta {
                name: plugin.name.clone(),
                version: plugin.version.clone(),
            },
            signature: Signature {
                inputs: Vec::new(),
                outputs: Vec::new(),
            },
            link: Link::InProcess {
                plugin,
                handle: RwLock::new(Some(handle)),
            },
        };
        layer.with_signature()
    }

    /// Creates the layer called `name` with `config` in `worker`, which
    /// runs the plugin `meta` describes.
    pub fn new_isolated(
        name: &str,
        meta: PluginMeta,
        worker: Arc<Worker>,
        config: &serde_json::Value,
    ) -> Result<ModelLayer, Error> {
        let layer_error = |message: String, panicked| Error::Layer {
            layer: name.to_string(),
            plugin: meta.name.clone(),
            message,
            panicked,
        };
        let request = Request::Create {
            config: config.to_string(),
        };
        let id = match worker.call(&request, &[], "create") {
            Ok(Reply::Created(id)) => id,
            Err(CallError::Layer { panicked, message }) => {
                return Err(layer_error(
                    format!("invalid config {config}: {message}"),
                    panicked,
                ))
            }
            Err(CallError::Worker { message, stderr }) => {
                return Err(Error::Worker {
                    layer: name.to_string(),
                    plugin: meta.name.clone(),
                    message,
                    stderr,
                })
            }
            Ok(other) => {
                let CallError::Worker { message, stderr } = isolate::unexpected(other) else {
                    unreachable!("an answer other than Failed")
                };
                return Err(Error::Worker {
                    layer: name.to_string(),
                    plugin: meta.name.clone(),
                    message,
                    stderr,
                });
            }
        };
        let layer = ModelLayer {
            name: name.to_string(),
            plugin: meta,
            signature: Signature {
                inputs: Vec::new(),
                outputs: Vec::new(),
            },
            link: Link::Isolated {
                worker,
                id,
                closed: AtomicBool::new(false),
            },
        };
        layer.with_signature()
    }

    /// Whether the layer runs in a worker process.
    pub fn is_isolated(&self) -> bool {
        matches!(self.link, Link::Isolated { .. })
    }

    /// Asks the layer for its signature, and checks it.
    fn with_signature(mut self) -> Result<ModelLayer, Error> {
        self.signature = match &self.link {
            Link::InProcess { plugin, .. } => {
                let signature = self
                    .with_handle(|h| (plugin.core.signature)(h).into_result())?
                    .map_err(|e| self.error(e))?;
                Signature {
                    inputs: signature
                        .inputs
                        .iter()
                        .map(|p| InputPort {
                            name: p.name.to_string(),
                            optional: p.optional,
                            dtypes: p.dtypes.to_vec(),
                        })
                        .collect(),
                    outputs: signature
                        .outputs
                        .iter()
                        .map(|p| p.name.to_string())
                        .collect(),
                }
            }
            Link::Isolated { id, .. } => {
                match self.remote(&Request::Signature { layer: *id }, "signature")? {
                    Reply::Signature { inputs, outputs } => Signature {
                        inputs: inputs
                            .into_iter()
                            .map(|p| InputPort {
                                name: p.name,
                                optional: p.optional,
                                dtypes: p.dtypes.into_iter().map(DType).collect(),
                            })
                            .collect(),
                        outputs: outputs.into_iter().map(|p| p.name).collect(),
                    },
                    other => return Err(self.call_error(isolate::unexpected(other))),
                }
            }
        };
        self.check_signature()?;
        Ok(self)
    }

    /// One request to the layer's worker (an isolated layer only).
    fn remote(&self, request: &Request, during: &str) -> Result<Reply, Error> {
        match &self.link {
            Link::Isolated { worker, .. } => worker
                .call(request, &[], during)
                .map_err(|e| self.call_error(e)),
            Link::InProcess { .. } => Err(self.plain_error(format!(
                "asked for a worker call ({during}) in process (a bug in the host)"
            ))),
        }
    }

    fn call_error(&self, e: CallError) -> Error {
        match e {
            CallError::Layer { panicked, message } => Error::Layer {
                layer: self.name.clone(),
                plugin: self.plugin.name.clone(),
                message,
                panicked,
            },
            CallError::Worker { message, stderr } => Error::Worker {
                layer: self.name.clone(),
                plugin: self.plugin.name.clone(),
                message,
                stderr,
            },
        }
    }

    fn check_signature(&self) -> Result<(), Error> {
        let s = &self.signature;
        let refuse = |message: String| Err(self.plain_error(message));
        if s.inputs.is_empty() || s.outputs.is_empty() {
            return refuse("declares no inputs or no outputs".into());
        }
        for input in &s.inputs {
            if input.dtypes.is_empty() {
                return refuse(format!("input '{}' accepts no element type", input.name));
            }
            if let Some(bad) = input.dtypes.iter().find(|d| !d.is_known()) {
                return refuse(format!(
                    "input '{}' accepts {bad}, an element type this host does not know",
                    input.name
                ));
            }
        }
        let mut names: Vec<&str> = s.inputs.iter().map(|p| p.name.as_str()).collect();
        names.extend(s.outputs.iter().map(String::as_str));
        let mut sorted = names.clone();
        sorted.sort_unstable();
        if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
            return refuse(format!("declares two inputs or outputs called '{}'", w[0]));
        }
        Ok(())
    }

    /// Calls `f` with the layer object, or refuses once it is destroyed
    /// (an in-process layer only).
    fn with_handle<R>(&self, f: impl FnOnce(&LayerHandle) -> R) -> Result<R, Error> {
        let Link::InProcess { handle, .. } = &self.link else {
            return Err(self.plain_error("asked for in-process (a bug in the host)".to_string()));
        };
        let guard = handle.read().unwrap_or_else(|p| p.into_inner());
        match guard.as_ref() {
            Some(handle) => Ok(f(handle)),
            None => {
                Err(self
                    .plain_error("was used after it was closed (a bug in the host)".to_string()))
            }
        }
    }

    pub(crate) fn error(&self, e: LayerError) -> Error {
        Error::Layer {
            layer: self.name.clone(),
            plugin: self.plugin.name.clone(),
            message: e.message.into_string(),
            panicked: e.panicked,
        }
    }

    fn plain_error(&self, message: String) -> Error {
        Error::Layer {
            layer: self.name.clone(),
            plugin: self.plugin.name.clone(),
            message,
            panicked: false,
        }
    }

    /// The element type a chain feeds this layer when given `offered`: that
    /// type if the first input accepts it, else the first input's preferred
    /// type.
    pub fn input_dtype_for(&self, offered: DType) -> DType {
        let accepted = &self.signature.inputs[0].dtypes;
        if accepted.contains(&offered) {
            offered
        } else {
            accepted[0]
        }
    }

    /// Floating-point operations of one forward pass (0: the layer does not
    /// say, or its plugin predates `flops`).
    pub fn flops(&self, plan: &LayerPlan) -> u64 {
        match &self.link {
            Link::InProcess { plugin, .. } => match plugin.table.flops() {
                Some(flops) => self
                    .with_handle(|h| flops(h, RSlice::from_slice(&plan.descs())))
                    .unwrap_or(0),
                None => 0,
            },
            Link::Isolated { worker, id, .. } if worker.has_flops => {
                let request = Request::Flops {
                    layer: *id,
                    inputs: specs(plan),
                };
                match self.remote(&request, "flops") {
                    Ok(Reply::Flops(n)) => n,
                    _ => 0,
                }
            }
            Link::Isolated { .. } => 0,
        }
    }

    /// Whether the layer may process a batch in separate pieces. A layer
    /// whose answer fails claims nothing.
    pub fn batch_independent(&self) -> bool {
        match &self.link {
            Link::InProcess { plugin, .. } => matches!(
                self.with_handle(|h| (plugin.core.batch_independent)(h).into_result()),
                Ok(Ok(true))
            ),
            Link::Isolated { id, .. } => matches!(
                self.remote(
                    &Request::BatchIndependent { layer: *id },
                    "batch_independent"
                ),
                Ok(Reply::Bool(true))
            ),
        }
    }

    /// The inputs the layer asks `check-plugin` to try.
    pub fn probes(&self) -> Result<Vec<ProbeCase>, Error> {
        match &self.link {
            Link::InProcess { plugin, .. } => self
                .with_handle(|h| (plugin.core.probes)(h).into_result())?
                .map(|p| p.into_vec())
                .map_err(|e| self.error(e)),
            Link::Isolated { id, .. } => {
                match self.remote(&Request::Probes { layer: *id }, "probes")? {
                    Reply::Probes(cases) => Ok(cases
                        .into_iter()
                        .map(|inputs| ProbeCase {
                            inputs: inputs
                                .into_iter()
                                .map(|i| {
                                    i.map(|i| layer_api::abi::ProbeInput {
                                        shape: RVec::from(i.shape),
                                        dtype: DType(i.dtype),
                                        low: i.low,
                                        high: i.high,
                                    })
                                    .into()
                                })
                                .collect(),
                        })
                        .collect()),
                    other => Err(self.call_error(isolate::unexpected(other))),
                }
            }
        }
    }

    /// The layer's raw answer to `plan` for `plan.inputs`.
    fn raw_plan(&self, plan: &LayerPlan) -> Result<RawPlan, Error> {
        match &self.link {
            Link::InProcess { plugin, .. } => {
                let answer = self
                    .with_handle(|h| {
                        (plugin.core.plan)(h, RSlice::from_slice(&plan.descs())).into_result()
                    })?
                    .map_err(|e| self.error(e))?;
                Ok(RawPlan {
                    outputs: answer
                        .outputs
                        .iter()
                        .map(|o| (o.dtype, o.shape.to_vec()))
                        .collect(),
                    params: answer.params.iter().map(isolate::ParamDecl::from).collect(),
                })
            }
            Link::Isolated { id, .. } => {
                let request = Request::Plan {
                    layer: *id,
                    inputs: specs(plan),
                };
                match self.remote(&request, "plan")? {
                    Reply::Plan { outputs, params } => Ok(RawPlan {
                        outputs: outputs
                            .into_iter()
                            .map(|o| (DType(o.dtype), o.shape))
                            .collect(),
                        params,
                    }),
                    other => Err(self.call_error(isolate::unexpected(other))),
                }
            }
        }
    }

    /// The layer's plan for a chain: one input of `shape`, of the first
    /// input's preferred element type.
    pub fn plan(&self, input_shape: &[usize]) -> Result<LayerPlan, Error> {
        let dtype = self.signature.inputs[0].dtypes[0];
        self.plan_chain(TensorSpec::new(dtype, input_shape))
    }

    /// The layer's plan for a chain: `input` to its first input, the others
    /// (which must be optional) left out.
    pub fn plan_chain(&self, input: TensorSpec) -> Result<LayerPlan, Error> {
        let mut inputs = vec![Some(input)];
        inputs.extend(self.signature.inputs[1..].iter().map(|_| None));
        self.plan_inputs(inputs)
    }

    /// The layer's outputs and parameters for `inputs` (one per declared
    /// input, `None` to leave an optional one out), checked against its
    /// signature first.
    pub fn plan_inputs(&self, inputs: Vec<Option<TensorSpec>>) -> Result<LayerPlan, Error> {
        let s = &self.signature;
        if inputs.len() != s.inputs.len() {
            return Err(self.plain_error(format!(
                "takes {} inputs ({}), but was given {}",
                s.inputs.len(),
                s.inputs
                    .iter()
                    .map(|p| p.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                inputs.len()
            )));
        }
        for (port, given) in s.inputs.iter().zip(&inputs) {
            match given {
                None if !port.optional => {
                    return Err(self.plain_error(format!(
                        "input '{}' is required but was not given",
                        port.name
                    )))
                }
                Some(spec) if !port.dtypes.contains(&spec.dtype) => {
                    return Err(self.plain_error(format!(
                        "input '{}' accepts {}, not {}",
                        port.name,
                        dtype_list(&port.dtypes),
                        spec.dtype
                    )))
                }
                _ => {}
            }
        }
        let mut plan = LayerPlan {
            inputs,
            outputs: Vec::new(),
            input_shape: Vec::new(),
            output_shape: Vec::new(),
            params: Vec::new(),
        };
        let answer = self.raw_plan(&plan)?;
        if answer.outputs.len() != s.outputs.len() {
            return Err(self.plain_error(format!(
                "declares {} outputs but planned {}",
                s.outputs.len(),
                answer.outputs.len()
            )));
        }
        for (name, (dtype, shape)) in s.outputs.iter().zip(answer.outputs.iter()) {
            if !dtype.is_known() {
                return Err(self.plain_error(format!(
                    "output '{name}' is of element type {dtype}, which this host does not know"
                )));
            }
            // Its size, counted exactly, must be one an array can have. It
            // is compared with the memory budget where its buffer is made
            // (`Runner`): a streamed run never holds it whole.
            if let Err(over) = crate::budget::check_addressable(shape, dtype.size()) {
                return Err(self.plain_error(format!(
                    "output '{name}' of shape {} {over}",
                    crate::budget::shape_text(shape)
                )));
            }
            plan.outputs.push(TensorSpec::new(*dtype, shape));
        }
        for decl in answer.params {
            let local_name = decl.name;
            let dtype = DType(decl.dtype);
            if dtype != DType::F32 {
                return Err(self.plain_error(format!(
                    "parameter '{local_name}' is {dtype}; this host keeps float32 parameters only"
                )));
            }
            let shape = decl.shape;
            if let Err(over) = crate::budget::check_shape(&shape, DType::F32.size()) {
                return Err(self.plain_error(format!(
                    "parameter '{local_name}' of shape {} {over}",
                    crate::budget::shape_text(&shape)
                )));
            }
            let init = match serde_json::from_str::<Init>(&decl.init) {
                Ok(init) => init,
                // No value is drawn for a parameter without elements.
                Err(_) if shape.contains(&0) => Init::Zeros,
                // serde_json writes an infinity or NaN as null.
                Err(_) if decl.init.contains("null") => {
                    return Err(self.plain_error(format!(
                        "parameter '{local_name}' of shape {} declares a default initializer \
                         holding a number that is not finite (infinite or NaN, written as \
                         null; e.g. a bound divided by an axis of size 0): {}",
                        crate::budget::shape_text(&shape),
                        decl.init
                    )))
                }
                Err(e) => {
                    return Err(self.plain_error(format!(
                        "parameter '{local_name}' declares an invalid default initializer: {e}"
                    )))
                }
            };
            let name = format!("{}.{}", self.name, local_name);
            plan.params.push(ParamInfo {
                stored_as: name.clone(),
                name,
                layer: self.name.clone(),
                local_name,
                shape,
                fan_in: decl.fan_in,
                fan_out: decl.fan_out,
                init,
            });
        }
        plan.input_shape = plan.inputs[0]
            .as_ref()
            .map(|s| s.shape.clone())
            .unwrap_or_default();
        plan.output_shape = plan.outputs[0].shape.clone();
        Ok(plan)
    }

    /// Lets the layer derive read-only data from its parameters, once per
    /// parameter set (nothing, for a plugin that predates `prepare`).
    pub fn prepare(
        &self,
        plan: &LayerPlan,
        params: &[ParamRef<'_>],
    ) -> Result<PreparedData<'_>, Error> {
        let handle = match &self.link {
            Link::InProcess { plugin, .. } => Prepared::InProcess(match plugin.table.prepare() {
                Some(prepare) if plugin.table.drop_prepared().is_some() => self
                    .with_handle(|h| {
                        prepare(
                            h,
                            RSlice::from_slice(&plan.descs()),
                            RSlice::from_slice(params),
                        )
                        .into_result()
                    })?
                    .map_err(|e| self.error(e))?,
                _ => PreparedHandle::NONE,
            }),
            // The worker keeps the parameters with what it prepared, and
            // uses them for every forward call with it.
            Link::Isolated { worker, id, .. } => {
                let params: Vec<(String, u32, &[usize], &[u8])> = params
                    .iter()
                    .map(|p| {
                        (
                            p.name.to_string(),
                            p.tensor.dtype.0,
                            p.tensor.shape.as_slice(),
                            p.tensor.data.as_slice(),
                        )
                    })
                    .collect();
                Prepared::Isolated(
                    worker
                        .prepare(*id, specs(plan), &params)
                        .map_err(|e| self.call_error(e))?,
                )
            }
        };
        Ok(PreparedData {
            layer: self,
            handle,
        })
    }

    fn drop_prepared(&self, handle: Prepared) -> Result<(), Error> {
        match (&self.link, handle) {
            (Link::InProcess { plugin, .. }, Prepared::InProcess(handle)) => {
                if handle.0.is_null() {
                    return Ok(());
                }
                match plugin.table.drop_prepared() {
                    Some(drop_prepared) => self
                        .with_handle(|h| drop_prepared(h, handle).into_result())?
                        .map_err(|e| self.error(e)),
                    None => Ok(()),
                }
            }
            (Link::Isolated { id, closed, .. }, Prepared::Isolated(prepared)) => {
                if closed.load(Ordering::Acquire) {
                    return Ok(());
                }
                let request = Request::DropPrepared {
                    layer: *id,
                    prepared,
                };
                self.remote(&request, "drop_prepared").map(drop)
            }
            _ => Ok(()),
        }
    }

    /// Runs the layer once, on one thread, on `inputs` (one per declared
    /// input, shaped as `plan` says), with its parameters prepared for this
    /// call alone. Each output starts as `fill` gives it, so that `host
    /// check-plugin` can see which elements the layer wrote.
    pub fn run_once(
        &self,
        plan: &LayerPlan,
        inputs: &[Option<&Tensor>],
        params: &ParamStore,
        fill: impl Fn(&mut Tensor),
    ) -> Result<Vec<Tensor>, Error> {
        self.run_once_lent(plan, inputs, params, fill, 1)
    }

    /// [`ModelLayer::run_once`] with a pool of `threads` threads lent to
    /// the call (interface 1.3; in its worker, for an isolated layer).
    pub fn run_once_lent(
        &self,
        plan: &LayerPlan,
        inputs: &[Option<&Tensor>],
        params: &ParamStore,
        fill: impl Fn(&mut Tensor),
        threads: usize,
    ) -> Result<Vec<Tensor>, Error> {
        let refs = param_refs(plan, params)?;
        let prepared = self.prepare(plan, &refs)?;
        let mut outputs = self.filled_outputs(plan, &fill)?;
        let standard = standard_inputs(inputs);
        let input_refs: Vec<TensorRef<'_>> =
            standard.iter().map(|t| tensor_ref(t.as_ref())).collect();
        if self.is_isolated() {
            let views: Vec<Option<TensorView<'_>>> = standard
                .iter()
                .map(|t| t.as_ref().map(Tensor::view))
                .collect();
            self.forward_isolated(
                plan,
                prepared.handle,
                &views,
                &mut outputs,
                Vec::new(),
                isolate::CallMode {
                    prefill: true,
                    together: false,
                    lend_threads: threads,
                },
            )?;
        } else {
            let mut output_muts: Vec<TensorMut<'_>> = outputs
                .iter_mut()
                .zip(&plan.outputs)
                .map(|(t, spec)| tensor_mut(&spec.shape, spec.dtype, t.bytes_mut()))
                .collect();
            let pool = crate::pool::shared(threads)?;
            self.call_forward(
                prepared.handle,
                &input_refs,
                &refs,
                &mut output_muts,
                pool.as_deref(),
            )?;
        }
        prepared.close()?;
        self.check_outputs(&outputs)?;
        Ok(outputs)
    }

    /// Runs the layer `n` times at once on the same inputs: `n` threads
    /// released into `forward` together (in its worker, for an isolated
    /// layer), each run's outputs starting as `fill` gives them. What
    /// `check-plugin`'s `threads` check compares with one run.
    pub fn run_together(
        &self,
        plan: &LayerPlan,
        inputs: &[Option<&Tensor>],
        params: &ParamStore,
        n: usize,
        fill: impl Fn(&mut Tensor) + Sync,
    ) -> Result<Vec<Vec<Tensor>>, Error> {
        let Link::Isolated { worker, id, .. } = &self.link else {
            let barrier = std::sync::Barrier::new(n);
            return std::thread::scope(|scope| {
                let handles: Vec<_> = (0..n)
                    .map(|_| {
                        scope.spawn(|| {
                            barrier.wait();
                            self.run_once(plan, inputs, params, &fill)
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join().unwrap_or_else(|_| {
                            Err(self.plain_error("a thread running it panicked".to_string()))
                        })
                    })
                    .collect()
            });
        };
        let refs = param_refs(plan, params)?;
        let prepared = self.prepare(plan, &refs)?;
        let Prepared::Isolated(prepared_id) = prepared.handle else {
            return Err(self.plain_error("prepared in process while isolated (a bug)".into()));
        };
        let template = self.filled_outputs(plan, &fill)?;
        let standard = standard_inputs(inputs);
        let views: Vec<Option<TensorView<'_>>> = standard
            .iter()
            .map(|t| t.as_ref().map(Tensor::view))
            .collect();
        // One buffer per output holding the `n` runs' copies one after the
        // other; run `k` writes the `k`-th, the inputs whole.
        let mut buffers: Vec<Vec<u8>> = template.iter().map(|t| t.bytes().repeat(n)).collect();
        let pieces = (0..n)
            .map(|k| isolate::Piece {
                inputs: vec![None; inputs.len()],
                outputs: template
                    .iter()
                    .zip(&plan.outputs)
                    .map(|(t, spec)| {
                        let len = t.bytes().len();
                        (spec.shape.clone(), k * len..(k + 1) * len)
                    })
                    .collect(),
            })
            .collect();
        let mut outputs: Vec<(u32, &[usize], &mut [u8])> = buffers
            .iter_mut()
            .zip(&plan.outputs)
            .map(|(b, spec)| (spec.dtype.0, spec.shape.as_slice(), b.as_mut_slice()))
            .collect();
        let mode = isolate::CallMode {
            prefill: true,
            together: true,
            lend_threads: 1,
        };
        worker
            .forward(*id, prepared_id, &views, &mut outputs, pieces, mode)
            .map_err(|e| self.call_error(e))?;
        prepared.close()?;
        let runs = (0..n)
            .map(|k| {
                template
                    .iter()
                    .zip(&buffers)
                    .map(|(t, b)| {
                        let len = t.bytes().len();
                        let mut copy = t.clone();
                        copy.bytes_mut().copy_from_slice(&b[k * len..(k + 1) * len]);
                        copy
                    })
                    .collect::<Vec<_>>()
            })
            .collect::<Vec<_>>();
        for run in &runs {
            self.check_outputs(run)?;
        }
        Ok(runs)
    }

    /// New outputs as `plan` declares them, each as `fill` leaves it.
    fn filled_outputs(
        &self,
        plan: &LayerPlan,
        fill: &impl Fn(&mut Tensor),
    ) -> Result<Vec<Tensor>, Error> {
        plan.outputs
            .iter()
            .map(|spec| {
                let mut t =
                    Tensor::zeros(spec.dtype, &spec.shape).map_err(|m| self.plain_error(m))?;
                fill(&mut t);
                Ok(t)
            })
            .collect()
    }

    /// Refuses boolean outputs holding bytes other than 0 and 1.
    pub(crate) fn check_outputs(&self, outputs: &[Tensor]) -> Result<(), Error> {
        for (name, t) in self.signature.outputs.iter().zip(outputs) {
            t.check_bool()
                .map_err(|m| self.plain_error(format!("output '{name}': {m}")))?;
        }
        Ok(())
    }

    /// One in-process `forward` call through the plugin boundary: the
    /// single place the host lends its own tensors to a layer, and `pool`
    /// (if any) for the layer to spread this call's work over (see
    /// [`crate::pool`]).
    pub(crate) fn call_forward(
        &self,
        prepared: Prepared,
        inputs: &[TensorRef<'_>],
        params: &[ParamRef<'_>],
        outputs: &mut [TensorMut<'_>],
        pool: Option<&rayon::ThreadPool>,
    ) -> Result<(), Error> {
        let (Link::InProcess { plugin, handle }, Prepared::InProcess(prepared)) =
            (&self.link, prepared)
        else {
            return Err(self.plain_error(
                "was called in process while isolated (a bug in the host)".to_string(),
            ));
        };
        let guard = handle.read().unwrap_or_else(|p| p.into_inner());
        let Some(handle) = guard.as_ref() else {
            return Err(
                self.plain_error("was used after it was closed (a bug in the host)".to_string())
            );
        };
        crate::pool::lending(&plugin.table, pool, || {
            (plugin.core.forward)(
                handle,
                prepared,
                RSlice::from_slice(inputs),
                RSlice::from_slice(params),
                RSliceMut::from_mut_slice(outputs),
            )
        })
        .into_result()
        .map_err(|e| self.error(e))
    }

    /// Whether the layer can be trained through: its plugin offers
    /// `backward` (interface 1.2) and it runs in the host's process.
    pub fn has_backward(&self) -> bool {
        match &self.link {
            Link::InProcess { plugin, .. } => plugin.table.backward().is_some(),
            Link::Isolated { .. } => false,
        }
    }

    /// Whether the layer's plugin offers `backward` (interface 1.2),
    /// wherever the layer runs (for training, see [`ModelLayer::has_backward`]).
    pub fn offers_backward(&self) -> bool {
        match &self.link {
            Link::InProcess { plugin, .. } => plugin.table.backward().is_some(),
            Link::Isolated { worker, .. } => worker.has_backward,
        }
    }

    /// `check-plugin`'s gradcheck ([`crate::gradcheck`]) of an isolated
    /// layer, run in its worker: `backward` against central differences of
    /// `forward` at `inputs` (shaped as `plan` says) and `params`, with
    /// loss weights drawn from `seed`.
    pub fn gradcheck(
        &self,
        plan: &LayerPlan,
        inputs: &[Option<&Tensor>],
        params: &ParamStore,
        seed: u64,
    ) -> Result<crate::gradcheck::GradReport, Error> {
        let Link::Isolated { worker, id, .. } = &self.link else {
            return Err(self.plain_error(
                "gradcheck runs a layer in its worker process, but this one runs in process \
                 (a bug in the host)"
                    .to_string(),
            ));
        };
        let refs = param_refs(plan, params)?;
        let params: Vec<(String, u32, &[usize], &[u8])> = refs
            .iter()
            .map(|p| {
                (
                    p.name.to_string(),
                    p.tensor.dtype.0,
                    p.tensor.shape.as_slice(),
                    p.tensor.data.as_slice(),
                )
            })
            .collect();
        let standard = standard_inputs(inputs);
        let views: Vec<Option<TensorView<'_>>> = standard
            .iter()
            .map(|t| t.as_ref().map(Tensor::view))
            .collect();
        let outputs = plan
            .outputs
            .iter()
            .map(|o| isolate::Spec {
                dtype: o.dtype.0,
                shape: o.shape.clone(),
            })
            .collect();
        worker
            .gradcheck(*id, &views, &params, outputs, seed)
            .map_err(|e| self.call_error(e))
    }

    /// One in-process `backward` call: the gradients of the `forward` call
    /// that was given `inputs`, `params` and `prepared` and wrote `outputs`,
    /// for `output_grads`; see [`layer_api::abi::PluginTable::backward`].
    /// `pool`: as for `forward`.
    #[allow(clippy::too_many_arguments)]
    pub fn call_backward(
        &self,
        prepared: Prepared,
        inputs: &[TensorRef<'_>],
        params: &[ParamRef<'_>],
        outputs: &[TensorRef<'_>],
        output_grads: &[TensorRef<'_>],
        input_grads: &mut [TensorMut<'_>],
        param_grads: &mut [TensorMut<'_>],
        pool: Option<&rayon::ThreadPool>,
    ) -> Result<(), Error> {
        let (Link::InProcess { plugin, handle }, Prepared::InProcess(prepared)) =
            (&self.link, prepared)
        else {
            return Err(self.plain_error(
                "runs in a worker process; training runs layers in the host's process \
                 (leave out --isolate and the model's \"isolate\")"
                    .to_string(),
            ));
        };
        let Some(backward) = plugin.table.backward() else {
            return Err(self.plain_error(format!(
                "plugin '{}' {} offers no backward (it is forward-only)",
                self.plugin.name, self.plugin.version
            )));
        };
        let guard = handle.read().unwrap_or_else(|p| p.into_inner());
        let Some(handle) = guard.as_ref() else {
            return Err(
                self.plain_error("was used after it was closed (a bug in the host)".to_string())
            );
        };
        crate::pool::lending(&plugin.table, pool, || {
            backward(
                handle,
                prepared,
                RSlice::from_slice(inputs),
                RSlice::from_slice(params),
                RSlice::from_slice(outputs),
                RSlice::from_slice(output_grads),
                RSliceMut::from_mut_slice(input_grads),
                RSliceMut::from_mut_slice(param_grads),
            )
        })
        .into_result()
        .map_err(|e| self.error(e))
    }

    /// One `forward` call of an isolated layer, run in its worker (`pieces`
    /// on the worker's threads); the worker uses the parameters it was
    /// given with `prepared`. `mode`: see [`Worker::forward`].
    pub(crate) fn forward_isolated(
        &self,
        plan: &LayerPlan,
        prepared: Prepared,
        inputs: &[Option<TensorView<'_>>],
        outputs: &mut [Tensor],
        pieces: Vec<isolate::Piece>,
        mode: isolate::CallMode,
    ) -> Result<(), Error> {
        let (Link::Isolated { worker, id, .. }, Prepared::Isolated(prepared)) =
            (&self.link, prepared)
        else {
            return Err(self.plain_error(
                "was called isolated while in process (a bug in the host)".to_string(),
            ));
        };
        let mut outputs: Vec<(u32, &[usize], &mut [u8])> = outputs
            .iter_mut()
            .zip(&plan.outputs)
            .map(|(t, spec)| (spec.dtype.0, spec.shape.as_slice(), t.bytes_mut()))
            .collect();
        worker
            .forward(*id, prepared, inputs, &mut outputs, pieces, mode)
            .map_err(|e| self.call_error(e))
    }

    /// Destroys the layer object, reporting a panic in its `Drop`; waits
    /// for calls in flight. Later calls are refused with an error.
    pub fn close(&self) -> Result<(), Error> {
        let result = match &self.link {
            Link::InProcess { plugin, handle } => {
                let taken = handle.write().unwrap_or_else(|p| p.into_inner()).take();
                let Some(handle) = taken else {
                    return Ok(());
                };
                (plugin.core.drop_layer)(handle)
                    .into_result()
                    .map_err(|e| self.error(e))
            }
            Link::Isolated { id, closed, .. } => {
                if closed.swap(true, Ordering::AcqRel) {
                    return Ok(());
                }
                self.remote(&Request::DropLayer { layer: *id }, "drop_layer")
                    .map(drop)
            }
        };
        result.map_err(|mut error| {
            if let Error::Layer { message, .. } = &mut error {
                *message = format!("while being dropped: {message}");
            }
            error
        })
    }
}

/// Copies of `inputs` in standard (C) layout, as a layer is lent them.
fn standard_inputs(inputs: &[Option<&Tensor>]) -> Vec<Option<Tensor>> {
    inputs
        .iter()
        .map(|t| t.map(|t| t.clone().into_standard()))
        .collect()
}

/// The inputs of `plan` as a worker request gives them.
fn specs(plan: &LayerPlan) -> Vec<Option<isolate::Spec>> {
    plan.inputs
        .iter()
        .map(|i| {
            i.as_ref().map(|s| isolate::Spec {
                dtype: s.dtype.0,
                shape: s.shape.clone(),
            })
        })
        .collect()
}

impl Drop for ModelLayer {
    fn drop(&mut self) {
        // Reached on error paths; `close` is the way that reports.
        let _ = self.close();
    }
}

/// The parameters a layer's plan names, as the views its forward call takes.
pub fn param_refs<'a>(
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

/// A tensor lent to a layer (`None`: an optional input left out).
pub(crate) fn tensor_ref(t: Option<&Tensor>) -> TensorRef<'_> {
    match t {
        Some(t) => TensorRef {
            dtype: t.dtype(),
            shape: RSlice::from_slice(t.shape()),
            data: RSlice::from_slice(t.bytes()),
        },
        None => TensorRef {
            dtype: DType::ABSENT,
            shape: RSlice::from_slice(&[]),
            data: RSlice::from_slice(&[]),
        },
    }
}

/// An output lent to a layer: `t`'s bytes, described by `shape` (the
/// plan's, which is `t`'s own or, for a piece of a batch, its rows').
pub(crate) fn tensor_mut<'a>(
    shape: &'a [usize],
    dtype: DType,
    data: &'a mut [u8],
) -> TensorMut<'a> {
    TensorMut {
        dtype,
        shape: RSlice::from_slice(shape),
        data: RSliceMut::from_mut_slice(data),
    }
}

/// Tensors lent to a layer for reading, in order (`None`: absent).
pub(crate) fn tensor_refs<'a>(
    tensors: impl IntoIterator<Item = Option<&'a Tensor>>,
) -> Vec<TensorRef<'a>> {
    tensors.into_iter().map(tensor_ref).collect()
}

/// The shape of each gradient buffer (empty for one not wanted): what
/// [`grad_muts`] lends them with.
pub(crate) fn grad_shapes(grads: &[Option<Tensor>]) -> Vec<Vec<usize>> {
    grads
        .iter()
        .map(|t| t.as_ref().map_or(Vec::new(), |t| t.shape().to_vec()))
        .collect()
}

/// Gradient buffers lent to `backward`, each described by its shape from
/// [`grad_shapes`]; one not wanted (`None`) is lent absent.
pub(crate) fn grad_muts<'a>(
    grads: &'a mut [Option<Tensor>],
    shapes: &'a [Vec<usize>],
) -> Vec<TensorMut<'a>> {
    grads
        .iter_mut()
        .zip(shapes)
        .map(|(t, shape)| match t {
            Some(t) => {
                let dtype = t.dtype();
                tensor_mut(shape, dtype, t.bytes_mut())
            }
            None => tensor_mut(&[], DType::ABSENT, &mut []),
        })
        .collect()
}

/// Checks the given inputs' shapes against a format-2 model's declared
/// ones: ranks and sizes equal, and each symbol one size throughout.
fn check_declared_shapes(spec: &ModelSpec, inputs: &[TensorSpec]) -> Result<(), String> {
    let mut symbols: std::collections::BTreeMap<&str, (usize, &str)> = Default::default();
    for (declared, given) in spec.inputs.iter().zip(inputs) {
        let Some(dims) = &declared.shape else {
            continue;
        };
        let shown =
            crate::print::format_shape(&given.shape.iter().map(|&d| Some(d)).collect::<Vec<_>>());
        if dims.len() != given.shape.len() {
            return Err(format!(
                "input '{}' has shape {shown}, but the model declares {} axes ({})",
                declared.name,
                dims.len(),
                dims.iter()
                    .map(|d| match d {
                        Dim::Size(n) => n.to_string(),
                        Dim::Symbol(s) => s.clone(),
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        for (axis, (dim, &size)) in dims.iter().zip(&given.shape).enumerate() {
            match dim {
                Dim::Size(n) if *n != size => {
                    return Err(format!(
                        "input '{}' has shape {shown}, but the model declares axis {axis} to be \
                         {n}",
                        declared.name
                    ))
                }
                Dim::Symbol(s) => match symbols.get(s.as_str()) {
                    Some(&(known, first)) if known != size => {
                        return Err(format!(
                            "input '{}' has {s} = {size} (axis {axis}), but input '{first}' has \
                             {s} = {known}; \"{s}\" must be one size in every input",
                            declared.name
                        ))
                    }
                    None => {
                        symbols.insert(s, (size, &declared.name));
                    }
                    _ => {}
                },
                _ => {}
            }
        }
    }
    Ok(())
}

/// `float32 or int64`: the element types a port accepts, for messages.
pub(crate) fn dtype_list(dtypes: &[DType]) -> String {
    dtypes
        .iter()
        .map(|d| d.name())
        .collect::<Vec<_>>()
        .join(" or ")
}

impl Model {
    /// Resolves every layer's plugin, creates its layer from its config,
    /// and resolves the model's wiring against the layers' signatures.
    pub fn load(spec: ModelSpec, registry: &PluginRegistry) -> Result<Model, Error> {
        let mut layers = Vec::with_capacity(spec.layers.len());
        let isolate_all = isolate::settings().all;
        // One worker per plugin library, shared by the layers it runs.
        let mut workers: HashMap<std::path::PathBuf, (PluginMeta, Arc<Worker>)> = HashMap::new();
        for layer in &spec.layers {
            let plugin_error = |source| Error::Plugin {
                layer: layer.name.clone(),
                source: Box::new(source),
            };
            let path = registry.locate(&layer.plugin).map_err(plugin_error)?;
            if isolate_all || layer.isolate {
                // Checked here without being opened: only the worker runs
                // its code.
                let checked = registry::check(&path, Some(&layer.plugin), layer.sha256.as_deref())
                    .map_err(plugin_error)?;
                let (meta, worker) = match workers.get(&path) {
                    Some((meta, worker)) if worker.plugin == checked.manifest.name => {
                        (meta.clone(), Arc::clone(worker))
                    }
                    _ => {
                        let worker = Arc::new(Worker::start(&checked).map_err(plugin_error)?);
                        let meta = PluginMeta {
                            name: checked.manifest.name.clone(),
                            version: checked.manifest.version.clone(),
                        };
                        workers.insert(path.clone(), (meta.clone(), Arc::clone(&worker)));
                        (meta, worker)
                    }
                };
                layers.push(ModelLayer::new_isolated(
                    &layer.name,
                    meta,
                    worker,
                    &layer.config,
                )?);
            } else {
                let plugin = registry::load(&path, Some(&layer.plugin), layer.sha256.as_deref())
                    .map_err(plugin_error)?;
                layers.push(ModelLayer::new(&layer.name, plugin, &layer.config)?);
            }
        }
        let signatures: Vec<&Signature> = layers.iter().map(|l| &l.signature).collect();
        let graph = Graph::resolve(&spec, &signatures)?;
        Ok(Model {
            spec,
            layers,
            graph,
        })
    }

    /// The element type model input `index` is converted to, given the
    /// type it comes in: the declared one (format 2), or, for a chain's
    /// input, that type if the first layer takes it, else the first layer's
    /// preferred one.
    pub fn input_dtype_of(&self, index: usize, offered: DType) -> DType {
        if let Some(dtype) = self.spec.inputs[index].dtype {
            return dtype;
        }
        self.layers[0].input_dtype_for(offered)
    }

    /// The element type a chain's input is converted to (format 1).
    pub fn input_dtype(&self, offered: DType) -> DType {
        self.input_dtype_of(0, offered)
    }

    /// Shapes and parameters of every layer for one input of `input_shape`,
    /// of its declared type or the first layer's preferred one.
    pub fn plan(&self, input_shape: &[usize]) -> Result<Vec<LayerPlan>, Error> {
        let dtype = self.input_dtype_of(0, self.layers[0].signature.inputs[0].dtypes[0]);
        self.plan_typed(TensorSpec::new(dtype, input_shape))
    }

    /// Plans a model of one input.
    pub fn plan_typed(&self, input: TensorSpec) -> Result<Vec<LayerPlan>, Error> {
        self.plan_inputs(&[input])
    }

    /// Element types, shapes and parameters of every node (in the model
    /// file's order) for the model inputs `inputs` (in declared order, of
    /// the types [`Model::input_dtype_of`] gives), with the model file's
    /// initializer overrides and sharing applied, checked before anything is
    /// computed. A tensor whose type the reading node does not accept is
    /// refused, naming both ends.
    pub fn plan_inputs(&self, inputs: &[TensorSpec]) -> Result<Vec<LayerPlan>, Error> {
        let invalid = |message: String| Error::Model {
            path: self.spec.path.clone(),
            message,
        };
        if inputs.len() != self.spec.inputs.len() {
            return Err(invalid(format!(
                "the model takes {} input(s) ({}), but {} were given",
                self.spec.inputs.len(),
                self.input_names().join(", "),
                inputs.len()
            )));
        }
        check_declared_shapes(&self.spec, inputs).map_err(invalid)?;
        let mut plans: Vec<Option<LayerPlan>> = vec![None; self.layers.len()];
        for &node in &self.graph.order {
            let layer = &self.layers[node];
            let mut specs = Vec::with_capacity(layer.signature.inputs.len());
            for (port, source) in layer.signature.inputs.iter().zip(&self.graph.sources[node]) {
                let Some(source) = source else {
                    specs.push(None);
                    continue;
                };
                let (spec, producer) = match *source {
                    Source::Input(i) => (
                        inputs[i].clone(),
                        format!("model input '{}' is", self.spec.inputs[i].name),
                    ),
                    Source::Node { node: n, output } => {
                        let p = plans[n].as_ref().expect("producers are planned first");
                        let l = &self.layers[n];
                        let what = if l.signature.outputs.len() == 1 {
                            String::new()
                        } else {
                            format!(" output '{}'", l.signature.outputs[output])
                        };
                        (
                            p.outputs[output].clone(),
                            format!(
                                "layer '{}' (plugin '{}'){what} outputs",
                                l.name, l.plugin.name
                            ),
                        )
                    }
                };
                if !port.dtypes.contains(&spec.dtype) {
                    let into = if self.spec.format == 1 {
                        format!("the next layer, '{}'", layer.name)
                    } else {
                        format!("node '{}' input '{}'", layer.name, port.name)
                    };
                    return Err(invalid(format!(
                        "{producer} {}, but {into} (plugin '{}') accepts {}; put a layer \
                         between them that converts, or choose layers whose types agree",
                        spec.dtype,
                        layer.plugin.name,
                        dtype_list(&port.dtypes)
                    )));
                }
                specs.push(Some(spec));
            }
            plans[node] = Some(layer.plan_inputs(specs)?);
        }
        let mut plans: Vec<LayerPlan> = plans
            .into_iter()
            .map(|p| p.expect("every node is in the order"))
            .collect();
        let mut seen = std::collections::HashSet::new();
        for p in plans.iter().flat_map(|p| &p.params) {
            if !seen.insert(p.name.as_str()) {
                return Err(invalid(format!(
                    "two parameters are both called '{}': rename one of the layers",
                    p.name
                )));
            }
        }
        crate::binding::bind_params(&self.spec, &mut plans)?;
        // Each parameter fits the memory budget (checked as it was
        // declared); all of them together must too.
        let stored = plans
            .iter()
            .flat_map(|p| &p.params)
            .filter(|p| p.is_stored());
        let total = crate::budget::sum(stored.map(|p| crate::budget::shape_bytes(&p.shape, 4)));
        if let Err(over) = crate::budget::check(total) {
            return Err(invalid(format!("the sum of the model's parameters {over}")));
        }
        Ok(plans)
    }

    /// The model's input names, in declared order.
    pub fn input_names(&self) -> Vec<&str> {
        self.spec.inputs.iter().map(|i| i.name.as_str()).collect()
    }

    /// The spec of the tensor `source` for `plans` and model `inputs`.
    pub fn source_spec<'a>(
        &self,
        plans: &'a [LayerPlan],
        inputs: &'a [TensorSpec],
        source: Source,
    ) -> &'a TensorSpec {
        match source {
            Source::Input(i) => &inputs[i],
            Source::Node { node, output } => &plans[node].outputs[output],
        }
    }

    /// Every parameter of a plan, in layer order.
    pub fn param_infos(plans: &[LayerPlan]) -> Vec<ParamInfo> {
        plans
            .iter()
            .flat_map(|p| p.params.iter().cloned())
            .collect()
    }

    /// Destroys every layer object, reporting the first panic in a `Drop`.
    /// The model must not run after.
    pub fn close(&self) -> Result<(), Error> {
        let mut first = Ok(());
        for layer in &self.layers {
            let closed = layer.close();
            if first.is_ok() {
                first = closed;
            }
        }
        first
    }
}
