//! A model made runnable: each layer's plugin resolved and its layer object
//! created, shapes and parameters planned for an input shape before any
//! computation, then the forward pass, layer by layer.

use std::time::Duration;

use abi_stable::std_types::RSlice;
use layer_api::abi::{LayerBox, LayerError, ParamRef, TensorMut, TensorRef};
use layer_api::Init;
use ndarray::ArrayD;

use crate::error::Error;
use crate::model::ModelSpec;
use crate::params::{ParamInfo, ParamStore};
use crate::registry::{self, LoadedPlugin, PluginRegistry};
use crate::runner::{param_refs, Runner};

/// A layer whose plugin is loaded and whose layer object exists.
pub struct ModelLayer {
    pub name: String,
    pub plugin: &'static LoadedPlugin,
    object: LayerBox,
}

/// What one layer will do for a given input shape.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerPlan {
    pub input_shape: Vec<usize>,
    pub output_shape: Vec<usize>,
    pub params: Vec<ParamInfo>,
}

/// A model ready to plan and run.
pub struct Model {
    pub spec: ModelSpec,
    pub layers: Vec<ModelLayer>,
}

impl ModelLayer {
    /// Creates the layer called `name` from `plugin` with `config`.
    pub fn new(
        name: &str,
        plugin: &'static LoadedPlugin,
        config: &serde_json::Value,
    ) -> Result<ModelLayer, Error> {
        let object = plugin.create(config).map_err(|e| Error::Layer {
            layer: name.to_string(),
            plugin: plugin.name.clone(),
            message: format!("invalid config {config}: {}", e.message),
            panicked: e.panicked,
        })?;
        Ok(ModelLayer {
            name: name.to_string(),
            plugin,
            object,
        })
    }

    pub(crate) fn error(&self, e: LayerError) -> Error {
        Error::Layer {
            layer: self.name.clone(),
            plugin: self.plugin.name.clone(),
            message: e.message.into_string(),
            panicked: e.panicked,
        }
    }

    /// Floating-point operations of one forward pass (0: the layer does not say).
    pub fn flops(&self, input_shape: &[usize]) -> u64 {
        self.object.flops(RSlice::from_slice(input_shape))
    }

    /// Whether the layer may process a batch in separate pieces.
    pub fn batch_independent(&self) -> bool {
        self.object.batch_independent()
    }

    /// The layer's output shape and parameters for an input of `input_shape`.
    pub fn plan(&self, input_shape: &[usize]) -> Result<LayerPlan, Error> {
        let output_shape = self
            .object
            .output_shape(RSlice::from_slice(input_shape))
            .into_result()
            .map_err(|e| self.error(e))?
            .into_vec();
        let decls = self
            .object
            .param_decls(RSlice::from_slice(input_shape))
            .into_result()
            .map_err(|e| self.error(e))?;
        let mut params = Vec::with_capacity(decls.len());
        for decl in decls {
            let local_name = decl.name.into_string();
            let init: Init =
                serde_json::from_str(decl.init.as_str()).map_err(|e| Error::Layer {
                    layer: self.name.clone(),
                    plugin: self.plugin.name.clone(),
                    message: format!(
                        "parameter '{local_name}' declares an invalid default initializer: {e}"
                    ),
                    panicked: false,
                })?;
            let name = format!("{}.{}", self.name, local_name);
            params.push(ParamInfo {
                stored_as: name.clone(),
                name,
                layer: self.name.clone(),
                local_name,
                shape: decl.shape.into_vec(),
                fan_in: decl.fan_in,
                fan_out: decl.fan_out,
                init,
            });
        }
        Ok(LayerPlan {
            input_shape: input_shape.to_vec(),
            output_shape,
            params,
        })
    }

    /// Runs the layer once, on one thread, on `input` (of `plan.input_shape`,
    /// standard layout), writing into `output`, which holds as many elements
    /// as `plan.output_shape` says. Unlike a model's forward pass it leaves
    /// `output` as it finds it before the call, so that `host check-plugin`
    /// can see which elements the layer wrote.
    pub fn forward_into(
        &self,
        plan: &LayerPlan,
        input: &ArrayD<f32>,
        params: &ParamStore,
        output: &mut [f32],
    ) -> Result<(), Error> {
        let refs = param_refs(plan, params)?;
        let input = input.as_standard_layout();
        let data = input.as_slice().expect("standard layout is contiguous");
        self.call_forward(&plan.input_shape, data, &refs, &plan.output_shape, output)
            .map_err(|e| self.error(e))
    }

    /// One `forward` call through the plugin boundary, on row-major data:
    /// the single place the host lends tensors to a layer.
    pub(crate) fn call_forward(
        &self,
        input_shape: &[usize],
        input: &[f32],
        params: &[ParamRef<'_>],
        output_shape: &[usize],
        output: &mut [f32],
    ) -> Result<(), LayerError> {
        self.object
            .forward(
                TensorRef {
                    shape: RSlice::from_slice(input_shape),
                    data: RSlice::from_slice(input),
                },
                RSlice::from_slice(params),
                TensorMut {
                    shape: RSlice::from_slice(output_shape),
                    data: output.into(),
                },
            )
            .into_result()
    }
}

impl Model {
    /// Resolves every layer's plugin and creates its layer from its config.
    pub fn load(spec: ModelSpec, registry: &PluginRegistry) -> Result<Model, Error> {
        let mut layers = Vec::with_capacity(spec.layers.len());
        for layer in &spec.layers {
            let plugin_error = |source| Error::Plugin {
                layer: layer.name.clone(),
                source: Box::new(source),
            };
            let path = registry.locate(&layer.plugin).map_err(plugin_error)?;
            // Before loading: loading a library runs its code.
            if let Some(pin) = &layer.sha256 {
                crate::pin::verify(&layer.name, &path, pin)?;
            }
            let plugin = registry::load(&path, Some(&layer.plugin)).map_err(plugin_error)?;
            layers.push(ModelLayer::new(&layer.name, plugin, &layer.config)?);
        }
        Ok(Model { spec, layers })
    }

    /// Shapes and parameters of every layer for an input of `input_shape`,
    /// with the model file's initializer overrides and sharing applied,
    /// checked before anything is computed.
    pub fn plan(&self, input_shape: &[usize]) -> Result<Vec<LayerPlan>, Error> {
        let mut shape = input_shape.to_vec();
        let mut plans = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            let plan = layer.plan(&shape)?;
            shape.clone_from(&plan.output_shape);
            plans.push(plan);
        }
        let mut seen = std::collections::HashSet::new();
        for p in plans.iter().flat_map(|p| &p.params) {
            if !seen.insert(p.name.as_str()) {
                return Err(Error::Model {
                    path: self.spec.path.clone(),
                    message: format!(
                        "two parameters are both called '{}': rename one of the layers",
                        p.name
                    ),
                });
            }
        }
        crate::binding::bind_params(&self.spec, &mut plans)?;
        Ok(plans)
    }

    /// Every parameter of a plan, in layer order.
    pub fn param_infos(plans: &[LayerPlan]) -> Vec<ParamInfo> {
        plans
            .iter()
            .flat_map(|p| p.params.iter().cloned())
            .collect()
    }

    /// Runs the layers in order on `input`, with up to `threads` threads.
    pub fn forward(
        &self,
        plans: &[LayerPlan],
        params: &ParamStore,
        input: &ArrayD<f32>,
        threads: usize,
    ) -> Result<ArrayD<f32>, Error> {
        self.forward_observed(plans, params, input, threads, |_, _, _| {})
    }

    /// Runs the layers in order on `input`, calling `observe` after each
    /// with the layer, its output and the time its forward call took.
    pub fn forward_observed(
        &self,
        plans: &[LayerPlan],
        params: &ParamStore,
        input: &ArrayD<f32>,
        threads: usize,
        mut observe: impl FnMut(&ModelLayer, &ArrayD<f32>, Duration),
    ) -> Result<ArrayD<f32>, Error> {
        let mut runner = Runner::new(self, plans, params, threads)?;
        let output = runner.run_observed(input.view(), |i, output, elapsed| {
            observe(&self.layers[i], output, elapsed)
        })?;
        Ok(output.clone())
    }
}
