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

use std::path::PathBuf;

use layer_api::{FanMode, Init};
use serde_json::{json, Value};

use crate::error::Error;
use crate::param_file::ParamFile;
use crate::params::{ParamInfo, ParamStore};
use crate::print::{format_array, format_known_shape, format_shape};
use crate::runtime::{LayerPlan, Model};

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

/// One layer of a model.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerSummary {
    pub name: String,
    pub plugin: String,
    pub version: String,
    pub output_shape: Dims,
    pub params: Vec<ParamSummary>,
}

/// A model's layers, shapes and parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSummary {
    pub model: String,
    pub path: PathBuf,
    pub input_shape: Dims,
    pub layers: Vec<LayerSummary>,
}

impl ModelSummary {
    /// The summary for a known input shape.
    pub fn for_input(model: &Model, input_shape: &[usize]) -> Result<ModelSummary, Error> {
        let plans = model.plan(input_shape)?;
        Ok(ModelSummary::from_plans(model, input_shape, &plans))
    }

    /// The summary without an input shape, by probing (see the module
    /// documentation).
    pub fn probe(model: &Model) -> Result<ModelSummary, Error> {
        // Fields that name the input features first, then every other
        // number in the configs (a layer sharing a weight may need the input
        // to have `units` features), then the primes.
        let config_numbers = |named: bool| -> Vec<usize> {
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
        };
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
            let mut summary = ModelSummary::from_plans(model, &base_shape, &base_plans);
            for axis in 0..rank {
                for size in axis_sizes(axis) {
                    if size == base_shape[axis] {
                        continue;
                    }
                    let mut shape = base_shape.clone();
                    shape[axis] = size;
                    if let Ok(plans) = model.plan(&shape) {
                        summary.input_shape[axis] = None;
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

    fn from_plans(model: &Model, input_shape: &[usize], plans: &[LayerPlan]) -> ModelSummary {
        ModelSummary {
            model: model.spec.name.clone(),
            path: model.spec.path.clone(),
            input_shape: known(input_shape),
            layers: model
                .layers
                .iter()
                .zip(plans)
                .map(|(layer, plan)| LayerSummary {
                    name: layer.name.clone(),
                    plugin: layer.plugin.name.clone(),
                    version: layer.plugin.version.clone(),
                    output_shape: known(&plan.output_shape),
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
        }
    }

    /// Marks as unknown every dimension (and fan) that differs in `plans`.
    fn merge(&mut self, plans: &[LayerPlan]) {
        for (layer, plan) in self.layers.iter_mut().zip(plans) {
            unify(&mut layer.output_shape, &plan.output_shape);
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

    /// A table like Keras' `model.summary()`.
    pub fn to_text(&self) -> String {
        let mut rows: Vec<[String; 7]> = vec![[
            "layer",
            "plugin",
            "version",
            "output",
            "parameter",
            "shape",
            "elements",
        ]
        .map(str::to_string)];
        let mut inits = vec!["init".to_string()];
        for layer in &self.layers {
            let mut first = [
                layer.name.clone(),
                layer.plugin.clone(),
                layer.version.clone(),
                format_shape(&layer.output_shape),
                String::new(),
                String::new(),
                String::new(),
            ];
            if layer.params.is_empty() {
                rows.push(first);
                inits.push(String::new());
                continue;
            }
            for (i, p) in layer.params.iter().enumerate() {
                let mut row = if i == 0 {
                    std::mem::take(&mut first)
                } else {
                    Default::default()
                };
                row[4].clone_from(&p.info.local_name);
                row[5] = format_shape(&p.shape);
                row[6] = p.elements().map_or("?".to_string(), |n| n.to_string());
                rows.push(row);
                inits.push(if p.info.is_stored() {
                    init_label(&p.info.init)
                } else {
                    format!("shared with {}", p.info.stored_as)
                });
            }
        }
        let widths: Vec<usize> = (0..7)
            .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
            .collect();
        let input = if self.input_shape.iter().any(Option::is_none) {
            format!(
                "{} (not given: '?' marks sizes that depend on it)",
                format_shape(&self.input_shape)
            )
        } else {
            format_shape(&self.input_shape)
        };
        let mut out = format!(
            "model: {} ({})\ninput: {input}\n\n",
            self.model,
            self.path.display()
        );
        for (row, init) in rows.iter().zip(&inits) {
            let mut line = String::new();
            for (c, (cell, w)) in row.iter().zip(&widths).enumerate() {
                if c == 6 {
                    line.push_str(&format!("{cell:>w$}  "));
                } else {
                    line.push_str(&format!("{cell:<w$}  "));
                }
            }
            line.push_str(init);
            out.push_str(line.trim_end());
            out.push('\n');
        }
        let shared = self.params().filter(|p| !p.info.is_stored()).count();
        let total = self
            .total_params()
            .map_or("?".to_string(), |n| n.to_string());
        out.push_str(&format!(
            "\ntotal: {total} parameters in {} tensors",
            self.stored_tensors()
        ));
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
        json!({
            "model": self.model,
            "path": self.path,
            "input_shape": self.input_shape,
            "layers": self.layers.iter().map(|l| json!({
                "name": l.name,
                "plugin": l.plugin,
                "version": l.version,
                "output_shape": l.output_shape,
                "params": l.params.iter().map(|p| json!({
                    "name": p.info.name,
                    "local_name": p.info.local_name,
                    "shape": p.shape,
                    "elements": p.elements(),
                    "init": p.info.init,
                    "stored_as": p.info.stored_as,
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "total_params": self.total_params(),
            "stored_tensors": self.stored_tensors(),
        })
    }
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
