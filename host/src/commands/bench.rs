//! `host bench`: the model timed on made-up (or given) inputs, whole and
//! per layer or node.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use crate::bench::random_model_input;
use crate::commands::inputs::{complete, default_dtype, Given, InputArgs};
use crate::commands::run::load_params;
use crate::error::Error;
use crate::inspect::missing_shapes_hint;
use crate::model::{Dim, ModelSpec};
use crate::npy;
use crate::print::print_stdout;
use crate::registry::PluginRegistry;
use crate::runtime::{Model, TensorSpec};
use crate::tensor::Tensor;

/// What `host bench` was asked to do.
pub struct BenchOptions {
    pub model: PathBuf,
    /// Rows of a chain's input, or the size of a graph's symbol `batch`.
    pub batch: Option<usize>,
    /// A chain's input features (its last axis).
    pub features: Option<usize>,
    /// Shapes of made-up inputs, and files of given ones.
    pub inputs: InputArgs,
    pub threads: usize,
    pub min_time: f64,
    pub params: Option<PathBuf>,
    pub json: bool,
    pub plugin_dirs: Vec<PathBuf>,
}

/// The longest `min_time`, in seconds: an hour.
pub const MAX_MIN_TIME: f64 = 3600.0;

pub fn bench(opts: BenchOptions) -> Result<(), Error> {
    // `Duration` panics on NaN, infinity and anything past u64 seconds.
    if !(0.0..=MAX_MIN_TIME).contains(&opts.min_time) {
        return Err(Error::Usage(format!(
            "--min-time {}: give a number of seconds from 0 to {MAX_MIN_TIME} (an hour)",
            opts.min_time
        )));
    }
    let registry = PluginRegistry::new(&opts.plugin_dirs);
    let spec = ModelSpec::load(&opts.model)?;
    let given = opts.inputs.match_inputs(&spec)?;
    let mut bound = BTreeMap::new();
    let chain_shape =
        if spec.format == 1 {
            match (&given[0], opts.batch) {
                (None, Some(batch)) => Some(vec![batch, chain_features(&spec, opts.features)?]),
                (None, None) => return Err(Error::Usage(
                    "give the input's shape: --batch N (with --features F), --input-shape DIMS \
                     or --input X.npy"
                        .to_string(),
                )),
                (Some(_), None) => None,
                (Some(_), Some(_)) => return Err(Error::Usage(
                    "--batch makes up the input's shape: give it, or --input-shape or --input, \
                     not both"
                        .to_string(),
                )),
            }
        } else {
            if opts.features.is_some() {
                return Err(Error::Usage(format!(
                    "--features applies to a chain of layers (format 1); give this graph's input \
                 shapes with {}",
                    missing_shapes_hint(&spec, &vec![None; spec.inputs.len()])
                )));
            }
            if let Some(batch) = opts.batch {
                let declares_batch = spec
                    .inputs
                    .iter()
                    .flat_map(|i| i.shape.iter().flatten())
                    .any(|d| matches!(d, Dim::Symbol(s) if s == "batch"));
                if !declares_batch {
                    return Err(Error::Usage(
                        "--batch: no input of the model has the symbol 'batch' in its declared \
                     shape; give the input shapes with --input-shape NAME=DIMS"
                            .to_string(),
                    ));
                }
                bound.insert("batch".to_string(), batch);
            }
            None
        };
    let model = Model::load(spec, &registry)?;

    let mut tensors: Vec<Option<Tensor>> = Vec::with_capacity(given.len());
    let mut specs: Vec<Option<TensorSpec>> = Vec::with_capacity(given.len());
    for (i, g) in given.iter().enumerate() {
        let (tensor, spec) = match g {
            Some(Given::File(path)) => {
                let t = read_input(&model, i, path)?;
                let spec = TensorSpec::new(t.dtype(), t.shape());
                (Some(t), Some(spec))
            }
            Some(Given::Shape(dims)) => {
                (None, Some(TensorSpec::new(default_dtype(&model, i), dims)))
            }
            None => (
                None,
                chain_shape
                    .as_deref()
                    .map(|shape| TensorSpec::new(default_dtype(&model, i), shape)),
            ),
        };
        tensors.push(tensor);
        specs.push(spec);
    }
    complete(&model, &mut specs, &bound);
    if specs.iter().any(Option::is_none) {
        return Err(Error::Usage(format!(
            "bench needs the shape of every input: give {} (an input not given takes its \
             declared shape, with the sizes the given ones fix for its symbols)",
            missing_shapes_hint(&model.spec, &specs)
        )));
    }
    let specs: Vec<TensorSpec> = specs.into_iter().flatten().collect();
    // A made-up input is allocated here, before any layer sees it: its size
    // (from --batch, --features, --input-shape or a declared shape) must fit
    // the memory budget, checked without overflow.
    for (i, spec) in specs.iter().enumerate() {
        if tensors[i].is_some() {
            continue;
        }
        if let Err(over) = crate::budget::check_shape(&spec.shape, spec.dtype.size()) {
            return Err(Error::Usage(format!(
                "the made-up input '{}' of shape {} {} {over}; give smaller sizes \
                 (--batch, --features, --input-shape)",
                model.spec.inputs[i].name,
                crate::budget::shape_text(&spec.shape),
                spec.dtype
            )));
        }
    }
    let plans = model.plan_inputs(&specs)?;
    let inputs = tensors
        .into_iter()
        .zip(&specs)
        .enumerate()
        .map(|(i, (t, spec))| match t {
            Some(t) => Ok(t),
            None => random_model_input(&model, i, spec),
        })
        .collect::<Result<Vec<_>, Error>>()?;
    let params = load_params(&model, &plans, opts.params.as_ref(), false)?;
    let report = crate::bench::bench(
        &model,
        &plans,
        &params,
        &inputs,
        opts.threads.max(1),
        Duration::from_secs_f64(opts.min_time),
    )?;
    model.close()?;
    if opts.json {
        print_stdout(&format!(
            "{}\n",
            serde_json::to_string_pretty(&report).expect("a report serializes")
        ))
    } else {
        print_stdout(&report.to_table())
    }
}

/// A chain's input features: `--features`, else the first layer's
/// `in_units` or `in_features` config.
fn chain_features(spec: &ModelSpec, features: Option<usize>) -> Result<usize, Error> {
    if let Some(f) = features {
        return Ok(f);
    }
    spec.layers
        .first()
        .and_then(|l| {
            ["in_units", "in_features"]
                .iter()
                .find_map(|key| l.config.get(key).and_then(|v| v.as_u64()))
        })
        .map(|f| f as usize)
        .ok_or_else(|| Error::Model {
            path: spec.path.clone(),
            message: "the first layer's config has no `in_units` or `in_features`: give the \
                      input's feature count with --features"
                .to_string(),
        })
}

/// A given input file, converted to the type the model takes.
fn read_input(model: &Model, index: usize, path: &std::path::Path) -> Result<Tensor, Error> {
    let t = npy::read_tensor(path).map_err(|source| Error::Npy {
        path: path.to_path_buf(),
        source,
    })?;
    let dtype = model.input_dtype_of(index, t.dtype());
    t.convert(dtype).map_err(|message| Error::Model {
        path: model.spec.path.clone(),
        message: format!(
            "input '{}' ({}): {message}",
            model.spec.inputs[index].name,
            path.display()
        ),
    })
}
