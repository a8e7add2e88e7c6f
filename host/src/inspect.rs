//! What a model is made of, before running it: per layer its plugin, output
//! shape and parameters (shape, element count, initializer, sharing), and the
//! totals. `host inspect` prints it; `host init` and `host params` use it to
//! learn the parameters' shapes.
//!
//! Without an input shape, sizes that depend on the input are shown as `?`.
//! The plugin interface only answers questions about concrete shapes, so the
//! model is *probed*: planned for several made-up input shapes that differ in
//! one axis at a time, and every output or parameter dimension that changes
//! between probes is unknown. The input's rank is unknown too: ranks 2
//! (batch, features), 1, 3 and 4 are tried in that order and the first one
//! the layers accept is used. A layer may accept only some feature sizes
//! (`mydense` with `in_units` in its config, or a layer sharing a weight whose
//! shape must then agree), so the feature sizes tried are the
//! `in_units`/`in_features` values found in the layers' configs first, then
//! the other numbers found there, then a few primes that no real model is
//! likely to fix; an axis for which only one size works is known to be that
//! size. This needs no change to the
//! plugin interface; its limit is that a dimension that happens to agree
//! across every probe is taken as known.
//!
//! A graph (format 2) declares its inputs' ranks and types, so only its
//! symbols (`batch`, `seq`) are probed: a symbol that a given input fixes
//! takes that size, the others are tried at several sizes, one symbol at a
//! time, and a dimension that changes with one of them is unknown. With
//! every input shape known, the summary also has the planned peak of live
//! tensor bytes, as the runner would hold them.

use std::collections::BTreeMap;
use std::path::PathBuf;

use layer_api::{DType, FanMode, Init};
use serde_json::{json, Map, Value};

use crate::error::Error;
use crate::model::{Dim, ModelSpec, NodeInputs};
use crate::param_file::ParamFile;
use crate::params::{ParamInfo, ParamStore};
use crate::print::{format_array, format_known_shape, format_shape};
use crate::runtime::{LayerPlan, Model, TensorSpec};

/// A shape in which `None` is a dimension that depends on the input.
pub type Dims = Vec<Option<usize>>;

/// Sizes tried for the leading (batch-like) axes.
const LEADING_PROBES: [usize; 2] = [13, 17];
/// Feature sizes tried after those found in the layers' configs.
const FEATURE_PROBES: [usize; 3] = [19, 23, 29];
/// Input ranks tried, most common first.
const PROBE_RANKS: [usize; 4] = [2, 1, 3, 4];
/// Config fields that fix a layer's number of input features.
const FEATURE_FIELDS: [&str; 2] = ["in_units", "in_features"];
/// At most this many sizes of a graph's symbols are tried before one is
/// accepted.
const MAX_BASE_PROBES: usize = 256;

/// One parameter of a layer.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamSummary {
    /// As planned for one (probe) input; where `shape` has `None`, its shape
    /// and fans are that probe's.
    pub info: ParamInfo,
    pub shape: Dims,
    /// Whether the fans (which scale Xavier and Kaiming) are known.
    pub fans_known: bool,
}

impl ParamSummary {
    /// The element count, when every dimension is known.
    pub fn elements(&self) -> Option<usize> {
        self.shape.iter().copied().product()
    }
}

/// One input of a model.
#[derive(Debug, Clone, PartialEq)]
pub struct InputSummary {
    pub name: String,
    pub dtype: DType,
    pub shape: Dims,
    /// The shape the model file declares (format 2).
    pub declared: Option<Vec<Dim>>,
}

/// One output of a layer.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputSummary {
    /// As the layer's signature names it.
    pub name: String,
    pub dtype: DType,
    pub shape: Dims,
}

/// One layer (node) of a model.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerSummary {
    pub name: String,
    pub plugin: String,
    pub version: String,
    /// Where its inputs come from, as the model file writes them, in the
    /// order of the layer's signature: `(input name, reference)`, the name
    /// `None` for a reference given by position.
    pub inputs: Vec<(Option<String>, String)>,
    /// One per declared output.
    pub outputs: Vec<OutputSummary>,
    pub params: Vec<ParamSummary>,
}

impl LayerSummary {
    /// The shape of its first output (a chain's one).
    pub fn output_shape(&self) -> &Dims {
        &self.outputs[0].shape
    }
}

/// A model's layers, shapes and parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSummary {
    pub model: String,
    pub path: PathBuf,
    /// 1 (a chain of layers) or 2 (a graph of nodes).
    pub format: u32,
    pub inputs: Vec<InputSummary>,
    pub layers: Vec<LayerSummary>,
    /// References to what the model returns.
    pub outputs: Vec<String>,
    /// The most bytes the model's inputs and live tensors take at once
    /// during a pass, when every shape is known.
    pub planned_peak_bytes: Option<usize>,
    /// Symbols whose size was not given and that some size depends on.
    pub unknown_symbols: Vec<String>,
}

impl ModelSummary {
    /// The summary for a known input shape (a model of one input).
    pub fn for_input(model: &Model, input_shape: &[usize]) -> Result<ModelSummary, Error> {
        let dtype = model.input_dtype_of(0, model.layers[0].signature.inputs[0].dtypes[0]);
        ModelSummary::for_inputs(model, &[TensorSpec::new(dtype, input_shape)])
    }

    /// The summary for known inputs (one per model input, in declared
    /// order), with the planned peak of live tensor bytes.
    pub fn for_inputs(model: &Model, inputs: &[TensorSpec]) -> Result<ModelSummary, Error> {
        let plans = model.plan_inputs(inputs)?;
        let mut summary = ModelSummary::from_plans(model, inputs, &plans);
        summary.planned_peak_bytes = Some(crate::runner::planned_peak_bytes(model, &plans, inputs));
        Ok(summary)
    }

    /// The shape of the first input (a chain's one).
    pub fn input_shape(&self) -> &Dims {
        &self.inputs[0].shape
    }

    /// The summary for the inputs that are known (`None`: not given): every
    /// shape known, as [`ModelSummary::for_inputs`]; otherwise by probing
    /// (see the module documentation).
    pub fn for_known_inputs(
        model: &Model,
        known: &[Option<TensorSpec>],
    ) -> Result<ModelSummary, Error> {
        if let Some(all) = known.iter().cloned().collect::<Option<Vec<TensorSpec>>>() {
            return ModelSummary::for_inputs(model, &all);
        }
        if model.spec.inputs.iter().all(|i| i.shape.is_some()) {
            return ModelSummary::probe_symbols(model, known);
        }
        match known {
            [None] => ModelSummary::probe(model),
            _ => Err(Error::Model {
                path: model.spec.path.clone(),
                message: format!(
                    "cannot probe a model whose inputs ({}) declare no shapes: give \
                     --input-shape NAME=DIMS for each",
                    model.input_names().join(", ")
                ),
            }),
        }
    }

    /// The summary without an input shape, by probing (see the module
    /// documentation).
    pub fn probe(model: &Model) -> Result<ModelSummary, Error> {
        if model.spec.inputs.iter().all(|i| i.shape.is_some()) {
            return ModelSummary::probe_symbols(model, &vec![None; model.spec.inputs.len()]);
        }
        // Fields that name the input features first, then every other
        // number in the configs (a layer sharing a weight may need the input
        // to have `units` features), then the primes.
        let config_numbers = |named: bool| config_numbers(model, named);
        let mut features = config_numbers(true);
        features.extend(config_numbers(false));
        features.extend(FEATURE_PROBES);
        let mut seen = std::collections::HashSet::new();
        features.retain(|f| *f > 0 && seen.insert(*f));
        let mut first_error = None;
        for rank in PROBE_RANKS {
            let axis_sizes = |axis: usize| -> Vec<usize> {
                if axis + 1 == rank {
                    features.clone()
                } else {
                    LEADING_PROBES.to_vec()
                }
            };
            // The base probe: the first size of each leading axis, and the
            // first feature size the layers accept.
            let mut base = None;
            for &f in &features {
                let mut shape: Vec<usize> = (0..rank - 1).map(|a| axis_sizes(a)[0]).collect();
                shape.push(f);
                match model.plan(&shape) {
                    Ok(plans) => {
                        base = Some((shape, plans));
                        break;
                    }
                    Err(e) => {
                        first_error.get_or_insert((shape, e));
                    }
                }
            }
            let Some((base_shape, base_plans)) = base else {
                continue;
            };
            let dtype = model.input_dtype_of(0, model.layers[0].signature.inputs[0].dtypes[0]);
            let mut summary = ModelSummary::from_plans(
                model,
                &[TensorSpec::new(dtype, &base_shape)],
                &base_plans,
            );
            for axis in 0..rank {
                for size in axis_sizes(axis) {
                    if size == base_shape[axis] {
                        continue;
                    }
                    let mut shape = base_shape.clone();
                    shape[axis] = size;
                    if let Ok(plans) = model.plan(&shape) {
                        summary.inputs[0].shape[axis] = None;
                        summary.merge(&plans);
                    }
                }
            }
            return Ok(summary);
        }
        let (shape, error) = first_error.expect("at least one probe was tried");
        if let Error::Model { .. } = error {
            // A mistake in the model file itself (an "init" or "share" that
            // names nothing, a shape that never agrees): report it as is.
            return Err(error);
        }
        Err(Error::Model {
            path: model.spec.path.clone(),
            message: format!(
                "cannot work out the shapes without an input shape: no input of rank {} was \
                 accepted; e.g. {} gave: {error}. Give --input-shape or --input",
                PROBE_RANKS
                    .iter()
                    .map(|r| r.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                crate::print::format_known_shape(&shape)
            ),
        })
    }

    /// Probes a model whose inputs declare their shapes: the symbols that
    /// `known` inputs do not fix are tried at several sizes.
    fn probe_symbols(model: &Model, known: &[Option<TensorSpec>]) -> Result<ModelSummary, Error> {
        let spec = &model.spec;
        let shapes: Vec<Option<Vec<usize>>> = known
            .iter()
            .map(|k| k.as_ref().map(|k| k.shape.clone()))
            .collect();
        let fixed = bind_symbols(spec, &shapes, &BTreeMap::new());
        let mut free: Vec<String> = Vec::new();
        for (declared, k) in spec.inputs.iter().zip(known) {
            if k.is_some() {
                continue;
            }
            for dim in declared.shape.iter().flatten() {
                if let Dim::Symbol(s) = dim {
                    if !fixed.contains_key(s) && !free.contains(s) {
                        free.push(s.clone());
                    }
                }
            }
        }
        let sizes = probe_sizes(model);
        let inputs_for = |assignment: &BTreeMap<String, usize>| -> Vec<TensorSpec> {
            let mut symbols = fixed.clone();
            symbols.extend(assignment.iter().map(|(k, v)| (k.clone(), *v)));
            spec.inputs
                .iter()
                .zip(known)
                .enumerate()
                .map(|(i, (declared, k))| match k {
                    Some(k) => k.clone(),
                    None => {
                        let dims = declared.shape.as_deref().expect("checked declared");
                        let shape = declared_shape(dims, &symbols).expect("every symbol bound");
                        let dtype = model.input_dtype_of(i, DType::F32);
                        TensorSpec::new(dtype, &shape)
                    }
                })
                .collect()
        };
        let mut base = None;
        let mut first_error = None;
        for tuple in index_tuples(free.len(), sizes.len(), MAX_BASE_PROBES) {
            let assignment: BTreeMap<String, usize> = free
                .iter()
                .zip(&tuple)
                .map(|(s, &i)| (s.clone(), sizes[i]))
                .collect();
            let inputs = inputs_for(&assignment);
            match model.plan_inputs(&inputs) {
                Ok(plans) => {
                    base = Some((assignment, inputs, plans));
                    break;
                }
                Err(e) => {
                    first_error.get_or_insert((inputs, e));
                }
            }
        }
        let Some((base_assignment, base_inputs, base_plans)) = base else {
            let (inputs, error) = first_error.expect("at least one probe was tried");
            if let Error::Model { .. } = error {
                return Err(error);
            }
            let tried = spec
                .inputs
                .iter()
                .zip(&inputs)
                .map(|(i, t)| format!("{} {}", i.name, format_known_shape(&t.shape)))
                .collect::<Vec<_>>()
                .join(", ");
            return Err(Error::Model {
                path: spec.path.clone(),
                message: format!(
                    "cannot work out the shapes without the sizes of {}: no sizes tried were \
                     accepted; e.g. {tried} gave: {error}. Give {}",
                    free.join(", "),
                    missing_shapes_hint(spec, known)
                ),
            });
        };
        let mut summary = ModelSummary::from_plans(model, &base_inputs, &base_plans);
        for symbol in &free {
            for &size in &sizes {
                if size == base_assignment[symbol] {
                    continue;
                }
                let mut assignment = base_assignment.clone();
                assignment.insert(symbol.clone(), size);
                let Ok(plans) = model.plan_inputs(&inputs_for(&assignment)) else {
                    continue;
                };
                if !summary.unknown_symbols.contains(symbol) {
                    summary.unknown_symbols.push(symbol.clone());
                }
                for (input, k) in summary.inputs.iter_mut().zip(known) {
                    if k.is_some() {
                        continue;
                    }
                    for (d, dim) in input.shape.iter_mut().zip(input.declared.iter().flatten()) {
                        if matches!(dim, Dim::Symbol(s) if s == symbol) {
                            *d = None;
                        }
                    }
                }
                summary.merge(&plans);
            }
        }
        if summary.unknown_symbols.is_empty() {
            // Every symbol takes one size only: the shapes are known.
            summary.planned_peak_bytes = Some(crate::runner::planned_peak_bytes(
                model,
                &base_plans,
                &base_inputs,
            ));
        }
        Ok(summary)
    }

    fn from_plans(model: &Model, inputs: &[TensorSpec], plans: &[LayerPlan]) -> ModelSummary {
        ModelSummary {
            model: model.spec.name.clone(),
            path: model.spec.path.clone(),
            format: model.spec.format,
            inputs: model
                .spec
                .inputs
                .iter()
                .zip(inputs)
                .map(|(declared, given)| InputSummary {
                    name: declared.name.clone(),
                    dtype: given.dtype,
                    shape: known(&given.shape),
                    declared: declared.shape.clone(),
                })
                .collect(),
            layers: model
                .layers
                .iter()
                .zip(&model.spec.layers)
                .zip(plans)
                .map(|((layer, spec), plan)| LayerSummary {
                    name: layer.name.clone(),
                    plugin: layer.plugin.name.clone(),
                    version: layer.plugin.version.clone(),
                    inputs: written_inputs(&spec.inputs, &layer.signature),
                    outputs: layer
                        .signature
                        .outputs
                        .iter()
                        .zip(&plan.outputs)
                        .map(|(name, out)| OutputSummary {
                            name: name.clone(),
                            dtype: out.dtype,
                            shape: known(&out.shape),
                        })
                        .collect(),
                    params: plan
                        .params
                        .iter()
                        .map(|p| ParamSummary {
                            info: p.clone(),
                            shape: known(&p.shape),
                            fans_known: true,
                        })
                        .collect(),
                })
                .collect(),
            outputs: model.spec.outputs.clone(),
            planned_peak_bytes: None,
            unknown_symbols: Vec::new(),
        }
    }

    /// Marks as unknown every dimension (and fan) that differs in `plans`.
    fn merge(&mut self, plans: &[LayerPlan]) {
        for (layer, plan) in self.layers.iter_mut().zip(plans) {
            for (output, other) in layer.outputs.iter_mut().zip(&plan.outputs) {
                unify(&mut output.shape, &other.shape);
            }
            let same_params = layer.params.len() == plan.params.len()
                && layer
                    .params
                    .iter()
                    .zip(&plan.params)
                    .all(|(a, b)| a.info.name == b.name);
            for (i, param) in layer.params.iter_mut().enumerate() {
                match plan.params.get(i).filter(|_| same_params) {
                    Some(other) => {
                        unify(&mut param.shape, &other.shape);
                        if (param.info.fan_in, param.info.fan_out) != (other.fan_in, other.fan_out)
                        {
                            param.fans_known = false;
                        }
                    }
                    None => {
                        param.shape.iter_mut().for_each(|d| *d = None);
                        param.fans_known = false;
                    }
                }
            }
        }
    }

    /// Every parameter, in layer order.
    pub fn params(&self) -> impl Iterator<Item = &ParamSummary> {
        self.layers.iter().flat_map(|l| &l.params)
    }

    /// The number of parameter values the model stores (a shared parameter
    /// counts once), when every stored shape is known.
    pub fn total_params(&self) -> Option<usize> {
        self.params()
            .filter(|p| p.info.is_stored())
            .map(ParamSummary::elements)
            .sum()
    }

    /// The number of tensors the model stores.
    pub fn stored_tensors(&self) -> usize {
        self.params().filter(|p| p.info.is_stored()).count()
    }

    /// The parameters with concrete shapes, for initializing or loading.
    /// A shape that depends on the input is taken from `file` when it holds a
    /// tensor of that name whose known dimensions agree; otherwise it is an
    /// error naming the parameter. Initializing (`file` is `None`) also needs
    /// the fans.
    pub fn resolved_params(&self, file: Option<&ParamFile>) -> Result<Vec<ParamInfo>, Error> {
        let needs_input = |p: &ParamSummary, why: &str| Error::Param {
            name: p.info.name.clone(),
            message: format!(
                "its {why} depends on the input, which was not given: pass --input-shape or \
                 --input"
            ),
        };
        let mut resolved = Vec::new();
        for p in self.params() {
            let mut info = p.info.clone();
            if p.shape.iter().any(Option::is_none) {
                let shape = format_shape(&p.shape);
                let Some(file) = file else {
                    return Err(needs_input(p, &format!("shape {shape}")));
                };
                let file_error = |message: String| Error::Params {
                    path: file.path.clone(),
                    message,
                };
                match file.tensors.get(&p.info.stored_as) {
                    Some(tensor) if fits(&p.shape, &tensor.shape) => {
                        info.shape.clone_from(&tensor.shape);
                    }
                    Some(tensor) => {
                        return Err(file_error(format!(
                            "parameter '{}' has shape {:?} in the file, but layer '{}' needs \
                             {shape}",
                            p.info.stored_as, tensor.shape, p.info.layer
                        )))
                    }
                    None => {
                        return Err(file_error(format!(
                            "parameter '{}' is missing (layer '{}' needs it with shape \
                             {shape}); the file holds: {}",
                            p.info.stored_as,
                            p.info.layer,
                            file.names()
                        )))
                    }
                }
            } else if file.is_none() && !p.fans_known {
                return Err(needs_input(p, "fan-in or fan-out"));
            }
            resolved.push(info);
        }
        Ok(resolved)
    }

    /// A table like Keras' `model.summary()`: one row per layer (per
    /// node, with where its inputs come from, for a graph), continued on
    /// further rows for its other parameters, inputs and outputs.
    pub fn to_text(&self) -> String {
        if self.format == 1 {
            self.chain_text()
        } else {
            self.graph_text()
        }
    }

    fn chain_text(&self) -> String {
        let mut rows: Vec<Vec<String>> = vec![[
            "layer",
            "plugin",
            "version",
            "output",
            "parameter",
            "shape",
            "elements",
            "init",
        ]
        .map(str::to_string)
        .to_vec()];
        for layer in &self.layers {
            let lines = layer.params.len().max(1);
            for k in 0..lines {
                let mut row = vec![String::new(); 4];
                if k == 0 {
                    row = vec![
                        layer.name.clone(),
                        layer.plugin.clone(),
                        layer.version.clone(),
                        format_shape(layer.output_shape()),
                    ];
                }
                row.extend(param_cells(layer.params.get(k)));
                rows.push(row);
            }
        }
        let input_shape = self.input_shape();
        let input = if input_shape.iter().any(Option::is_none) {
            format!(
                "{} (not given: '?' marks sizes that depend on it)",
                format_shape(input_shape)
            )
        } else {
            format_shape(input_shape)
        };
        let mut out = format!(
            "model: {} ({})\ninput: {input}\n\n",
            self.model,
            self.path.display()
        );
        out.push_str(&render_table(&rows, &[6]));
        out.push_str(&self.totals_line());
        out
    }

    fn graph_text(&self) -> String {
        let mut out = format!("model: {} ({})\n", self.model, self.path.display());
        for input in &self.inputs {
            // Unknown sizes by the symbol the file declares for them.
            let dims: Vec<String> = input
                .shape
                .iter()
                .enumerate()
                .map(
                    |(axis, d)| match (d, input.declared.as_ref().map(|s| &s[axis])) {
                        (Some(n), _) => n.to_string(),
                        (None, Some(Dim::Symbol(s))) => s.clone(),
                        (None, _) => "?".to_string(),
                    },
                )
                .collect();
            let shape = match dims.as_slice() {
                [one] => format!("({one},)"),
                _ => format!("({})", dims.join(", ")),
            };
            out.push_str(&format!(
                "input {}: {} {shape}\n",
                input.name,
                input.dtype.name()
            ));
        }
        out.push_str(&format!("output: {}\n", self.outputs.join(", ")));
        if !self.unknown_symbols.is_empty() {
            out.push_str(&format!(
                "'?' marks sizes that depend on {} (not given: --input-shape NAME=DIMS gives \
                 them)\n",
                self.unknown_symbols.join(", ")
            ));
        }
        out.push('\n');
        let mut rows: Vec<Vec<String>> = vec![[
            "node",
            "plugin",
            "version",
            "inputs",
            "output",
            "dtype",
            "parameter",
            "shape",
            "elements",
            "init",
        ]
        .map(str::to_string)
        .to_vec()];
        for layer in &self.layers {
            let lines = layer
                .params
                .len()
                .max(layer.inputs.len())
                .max(layer.outputs.len())
                .max(1);
            for k in 0..lines {
                let mut row = vec![String::new(); 3];
                if k == 0 {
                    row = vec![
                        layer.name.clone(),
                        layer.plugin.clone(),
                        layer.version.clone(),
                    ];
                }
                row.push(match layer.inputs.get(k) {
                    Some((Some(port), reference)) => format!("{port}={reference}"),
                    Some((None, reference)) => reference.clone(),
                    None => String::new(),
                });
                match layer.outputs.get(k) {
                    Some(o) if layer.outputs.len() == 1 => {
                        row.push(format_shape(&o.shape));
                        row.push(o.dtype.name().to_string());
                    }
                    Some(o) => {
                        row.push(format!("{} {}", o.name, format_shape(&o.shape)));
                        row.push(o.dtype.name().to_string());
                    }
                    None => row.extend([String::new(), String::new()]),
                }
                row.extend(param_cells(layer.params.get(k)));
                rows.push(row);
            }
        }
        out.push_str(&render_table(&rows, &[8]));
        out.push_str(&self.totals_line());
        out.push_str(&match self.planned_peak_bytes {
            Some(bytes) => format!(
                "planned peak of live tensors: {}, model inputs included\n",
                human_bytes(bytes)
            ),
            None => "planned peak of live tensors: ? (depends on the input shapes)\n".to_string(),
        });
        out
    }

    fn totals_line(&self) -> String {
        let shared = self.params().filter(|p| !p.info.is_stored()).count();
        let total = self
            .total_params()
            .map_or("?".to_string(), |n| n.to_string());
        let mut out = format!(
            "\ntotal: {total} parameters in {} tensors",
            self.stored_tensors()
        );
        if shared > 0 {
            out.push_str(&format!(
                " ({shared} shared parameter{} stored once)",
                if shared == 1 { "" } else { "s" }
            ));
        }
        out.push('\n');
        out
    }

    /// The same as JSON; unknown dimensions and totals are `null`.
    pub fn to_json(&self) -> Value {
        let params = |l: &LayerSummary| -> Vec<Value> {
            l.params
                .iter()
                .map(|p| {
                    json!({
                        "name": p.info.name,
                        "local_name": p.info.local_name,
                        "shape": p.shape,
                        "elements": p.elements(),
                        "init": p.info.init,
                        "stored_as": p.info.stored_as,
                    })
                })
                .collect()
        };
        if self.format == 1 {
            return json!({
                "model": self.model,
                "path": self.path,
                "input_shape": self.input_shape(),
                "layers": self.layers.iter().map(|l| json!({
                    "name": l.name,
                    "plugin": l.plugin,
                    "version": l.version,
                    "output_shape": l.output_shape(),
                    "params": params(l),
                })).collect::<Vec<_>>(),
                "total_params": self.total_params(),
                "stored_tensors": self.stored_tensors(),
            });
        }
        let declared = |dims: &[Dim]| -> Vec<Value> {
            dims.iter()
                .map(|d| match d {
                    Dim::Size(n) => json!(n),
                    Dim::Symbol(s) => json!(s),
                })
                .collect()
        };
        json!({
            "model": self.model,
            "path": self.path,
            "format": self.format,
            "inputs": self.inputs.iter().map(|i| json!({
                "name": i.name,
                "dtype": i.dtype.name(),
                "shape": i.shape,
                "declared_shape": i.declared.as_deref().map(declared),
            })).collect::<Vec<_>>(),
            "nodes": self.layers.iter().map(|l| {
                let inputs = if l.inputs.iter().all(|(port, _)| port.is_none()) {
                    json!(l.inputs.iter().map(|(_, r)| r).collect::<Vec<_>>())
                } else {
                    Value::Object(
                        l.inputs
                            .iter()
                            .map(|(port, r)| (port.clone().unwrap_or_default(), json!(r)))
                            .collect::<Map<String, Value>>(),
                    )
                };
                json!({
                    "name": l.name,
                    "plugin": l.plugin,
                    "version": l.version,
                    "inputs": inputs,
                    "outputs": l.outputs.iter().map(|o| json!({
                        "name": o.name,
                        "dtype": o.dtype.name(),
                        "shape": o.shape,
                    })).collect::<Vec<_>>(),
                    "params": params(l),
                })
            }).collect::<Vec<_>>(),
            "outputs": self.outputs,
            "total_params": self.total_params(),
            "stored_tensors": self.stored_tensors(),
            "planned_peak_bytes": self.planned_peak_bytes,
        })
    }
}

/// The parameter cells of a table row: name, shape, elements and
/// initializer (or what it is shared with); empty without a parameter.
fn param_cells(param: Option<&ParamSummary>) -> [String; 4] {
    let Some(p) = param else {
        return Default::default();
    };
    [
        p.info.local_name.clone(),
        format_shape(&p.shape),
        p.elements().map_or("?".to_string(), |n| n.to_string()),
        if p.info.is_stored() {
            init_label(&p.info.init)
        } else {
            format!("shared with {}", p.info.stored_as)
        },
    ]
}

/// Columns separated by two spaces, each as wide as its widest cell (the
/// last one not padded), the columns `right` aligned right; no trailing
/// spaces.
fn render_table(rows: &[Vec<String>], right: &[usize]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .map(|r| r.get(c).map_or(0, |cell| cell.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            let w = widths[c];
            if c + 1 == columns {
                line.push_str(cell);
            } else if right.contains(&c) {
                line.push_str(&format!("{cell:>w$}  "));
            } else {
                line.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// A byte count, with KiB, MiB or GiB beside it when large.
fn human_bytes(bytes: usize) -> String {
    let units = [("GiB", 1usize << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
    match units.iter().find(|(_, size)| bytes >= *size) {
        Some((unit, size)) => format!("{bytes} bytes ({:.1} {unit})", bytes as f64 / *size as f64),
        None => format!("{bytes} bytes"),
    }
}

/// Where a node's inputs come from, in the order of its signature.
fn written_inputs(
    inputs: &NodeInputs,
    signature: &crate::runtime::Signature,
) -> Vec<(Option<String>, String)> {
    match inputs {
        NodeInputs::Positional(refs) => refs.iter().map(|r| (None, r.clone())).collect(),
        NodeInputs::Named(refs) => {
            let mut named: Vec<(Option<String>, String)> = refs
                .iter()
                .map(|(k, v)| (Some(k.clone()), v.clone()))
                .collect();
            named.sort_by_key(|(port, _)| {
                signature
                    .inputs
                    .iter()
                    .position(|p| Some(&p.name) == port.as_ref())
            });
            named
        }
    }
}

/// The numbers in the layers' configs: those of fields naming input
/// features (`named`), or all the others.
fn config_numbers(model: &Model, named: bool) -> Vec<usize> {
    model
        .spec
        .layers
        .iter()
        .filter_map(|l| l.config.as_object())
        .flat_map(|c| c.iter())
        .filter(|(k, _)| FEATURE_FIELDS.contains(&k.as_str()) == named)
        .filter_map(|(_, v)| v.as_u64())
        .filter_map(|v| usize::try_from(v).ok())
        .collect()
}

/// The sizes a graph's symbols are tried at: two small primes, the numbers
/// in the layers' configs (feature counts first), then more primes.
fn probe_sizes(model: &Model) -> Vec<usize> {
    let config_numbers = |named: bool| config_numbers(model, named);
    let mut sizes = LEADING_PROBES.to_vec();
    sizes.extend(config_numbers(true));
    sizes.extend(config_numbers(false));
    sizes.extend(FEATURE_PROBES);
    let mut seen = std::collections::HashSet::new();
    sizes.retain(|s| *s > 0 && seen.insert(*s));
    sizes
}

/// Up to `limit` tuples of `k` indices below `n`, those of smaller sum
/// first (so the first sizes are tried together before later ones).
fn index_tuples(k: usize, n: usize, limit: usize) -> Vec<Vec<usize>> {
    fn with_sum(
        k: usize,
        n: usize,
        sum: usize,
        prefix: &mut Vec<usize>,
        out: &mut Vec<Vec<usize>>,
        limit: usize,
    ) {
        if out.len() >= limit {
            return;
        }
        if k == 0 {
            if sum == 0 {
                out.push(prefix.clone());
            }
            return;
        }
        for i in 0..n.min(sum + 1) {
            prefix.push(i);
            with_sum(k - 1, n, sum - i, prefix, out, limit);
            prefix.pop();
        }
    }
    let mut out = Vec::new();
    if n == 0 && k > 0 {
        return out;
    }
    for sum in 0..=k * n.saturating_sub(1) {
        with_sum(k, n, sum, &mut Vec::new(), &mut out, limit);
        if out.len() >= limit {
            break;
        }
    }
    out
}

/// The sizes the given inputs' shapes (and `bound`) give the declared
/// symbols: the first input to have a symbol decides it (a disagreement is
/// reported when the model is planned).
pub fn bind_symbols(
    spec: &ModelSpec,
    shapes: &[Option<Vec<usize>>],
    bound: &BTreeMap<String, usize>,
) -> BTreeMap<String, usize> {
    let mut symbols = bound.clone();
    for (declared, shape) in spec.inputs.iter().zip(shapes) {
        let (Some(dims), Some(shape)) = (&declared.shape, shape) else {
            continue;
        };
        if dims.len() != shape.len() {
            continue;
        }
        for (dim, &size) in dims.iter().zip(shape) {
            if let Dim::Symbol(s) = dim {
                symbols.entry(s.clone()).or_insert(size);
            }
        }
    }
    symbols
}

/// A declared shape with its symbols replaced by their sizes, when every
/// one is bound.
pub fn declared_shape(dims: &[Dim], symbols: &BTreeMap<String, usize>) -> Option<Vec<usize>> {
    dims.iter()
        .map(|d| match d {
            Dim::Size(n) => Some(*n),
            Dim::Symbol(s) => symbols.get(s).copied(),
        })
        .collect()
}

/// A declared shape as written: `(batch, seq)`.
pub fn format_declared(dims: &[Dim]) -> String {
    let text: Vec<String> = dims
        .iter()
        .map(|d| match d {
            Dim::Size(n) => n.to_string(),
            Dim::Symbol(s) => s.clone(),
        })
        .collect();
    match text.as_slice() {
        [one] => format!("({one},)"),
        _ => format!("({})", text.join(", ")),
    }
}

/// Which input shapes to give for the inputs not `known`: `--input-shape
/// tokens=DIMS (declared (batch, seq)), ...`.
pub fn missing_shapes_hint(spec: &ModelSpec, known: &[Option<TensorSpec>]) -> String {
    let missing: Vec<String> = spec
        .inputs
        .iter()
        .zip(known)
        .filter(|(_, k)| k.is_none())
        .map(|(i, _)| match &i.shape {
            Some(dims) => format!("{}=DIMS (declared {})", i.name, format_declared(dims)),
            None => format!("{}=DIMS", i.name),
        })
        .collect();
    format!("--input-shape {}", missing.join(", --input-shape "))
}

/// The values of the parameters called `names` (all when empty), each headed
/// by its name and shape, as `host params` prints them. Printing all shows a
/// shared tensor once; naming a sharer shows the values it uses.
pub fn format_param_values(
    params: &[ParamInfo],
    store: &ParamStore,
    names: &[String],
) -> Result<String, Error> {
    if let Some(name) = names.iter().find(|n| !params.iter().any(|p| &p.name == *n)) {
        return Err(Error::Param {
            name: name.clone(),
            message: format!(
                "no layer of the model has it; the parameters are: {}",
                params
                    .iter()
                    .map(|p| p.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        });
    }
    let mut blocks = Vec::new();
    for p in params
        .iter()
        .filter(|p| names.is_empty() || names.contains(&p.name))
    {
        let mut heading = format!("{} {}", p.name, format_known_shape(&p.shape));
        if !p.is_stored() {
            heading.push_str(&format!(" shared with {}", p.stored_as));
            if names.is_empty() {
                blocks.push(heading);
                continue;
            }
        }
        let values = store.get(&p.stored_as).ok_or_else(|| Error::Param {
            name: p.name.clone(),
            message: "no value was loaded or initialized for it".to_string(),
        })?;
        blocks.push(format!("{heading}\n{}", format_array(values)));
    }
    Ok(format!("{}\n", blocks.join("\n\n")))
}

fn known(shape: &[usize]) -> Dims {
    shape.iter().copied().map(Some).collect()
}

/// Forgets the dimensions of `dims` that `other` disagrees with; a different
/// rank forgets them all.
fn unify(dims: &mut Dims, other: &[usize]) {
    if dims.len() != other.len() {
        dims.iter_mut().for_each(|d| *d = None);
        return;
    }
    for (d, o) in dims.iter_mut().zip(other) {
        if *d != Some(*o) {
            *d = None;
        }
    }
}

/// Whether a concrete shape agrees with every known dimension of `dims`.
fn fits(dims: &[Option<usize>], shape: &[usize]) -> bool {
    dims.len() == shape.len()
        && dims
            .iter()
            .zip(shape)
            .all(|(d, s)| d.is_none_or(|d| d == *s))
}

/// An initializer as `inspect` shows it, e.g. `normal(mean=0.0, std=1.0)`.
pub fn init_label(init: &Init) -> String {
    let mode = |m: FanMode| match m {
        FanMode::FanIn => "fan_in",
        FanMode::FanOut => "fan_out",
    };
    match *init {
        Init::Zeros => "zeros".to_string(),
        Init::Ones => "ones".to_string(),
        Init::Constant { value } => format!("constant(value={value:?})"),
        Init::Normal { mean, std } => format!("normal(mean={mean:?}, std={std:?})"),
        Init::Uniform { low, high } => format!("uniform(low={low:?}, high={high:?})"),
        Init::XavierUniform { gain } => format!("xavier_uniform(gain={gain:?})"),
        Init::XavierNormal { gain } => format!("xavier_normal(gain={gain:?})"),
        Init::KaimingUniform { mode: m, gain } => {
            format!("kaiming_uniform(mode={}, gain={gain:?})", mode(m))
        }
        Init::KaimingNormal { mode: m, gain } => {
            format!("kaiming_normal(mode={}, gain={gain:?})", mode(m))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disagreeing_dimensions_become_unknown() {
        let mut dims = known(&[13, 8]);
        unify(&mut dims, &[17, 8]);
        assert_eq!(dims, vec![None, Some(8)]);
        unify(&mut dims, &[17, 8, 1]);
        assert_eq!(dims, vec![None, None]);
        assert!(fits(&[None, Some(8)], &[64, 8]));
        assert!(!fits(&[None, Some(8)], &[64, 9]));
        assert!(!fits(&[None, Some(8)], &[8]));
    }

    #[test]
    fn param_values_show_a_shared_tensor_once_unless_named() {
        let owner = ParamInfo {
            name: "a.w".into(),
            layer: "a".into(),
            local_name: "w".into(),
            shape: vec![2],
            fan_in: 2,
            fan_out: 2,
            init: Init::Constant { value: 1.5 },
            stored_as: "a.w".into(),
        };
        let sharer = ParamInfo {
            name: "b.w".into(),
            layer: "b".into(),
            ..owner.clone()
        };
        let params = [owner, sharer];
        let store = ParamStore::initialize(&params, 0);
        assert_eq!(
            format_param_values(&params, &store, &[]).unwrap(),
            "a.w (2,)\n[1.5 1.5]\n\nb.w (2,) shared with a.w\n"
        );
        assert_eq!(
            format_param_values(&params, &store, &["b.w".into()]).unwrap(),
            "b.w (2,) shared with a.w\n[1.5 1.5]\n"
        );
        let err = format_param_values(&params, &store, &["c.w".into()]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "parameter 'c.w': no layer of the model has it; the parameters are: a.w, b.w"
        );
    }

    #[test]
    fn initializer_labels() {
        assert_eq!(
            init_label(&Init::normal(0.0, 1.0)),
            "normal(mean=0.0, std=1.0)"
        );
        assert_eq!(
            init_label(&Init::KaimingUniform {
                mode: FanMode::FanOut,
                gain: 1.0
            }),
            "kaiming_uniform(mode=fan_out, gain=1.0)"
        );
    }
}
