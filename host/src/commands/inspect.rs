//! `host inspect`: the model's layers (a graph's nodes, with where their
//! inputs come from), output shapes and types, parameters and totals, for
//! the input shapes given or, without them, the ones probing can tell.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::commands::inputs::{complete, given_specs, InputArgs};
use crate::error::Error;
use crate::inspect::ModelSummary;
use crate::model::ModelSpec;
use crate::print::print_stdout;
use crate::registry::PluginRegistry;
use crate::runtime::Model;

/// What `host inspect` was asked to do.
pub struct InspectOptions {
    pub model: PathBuf,
    pub inputs: InputArgs,
    pub json: bool,
    pub plugin_dirs: Vec<PathBuf>,
}

pub fn inspect(opts: InspectOptions) -> Result<(), Error> {
    let (model, summary) = summarize(&opts.model, &opts.inputs, &opts.plugin_dirs)?;
    model.close()?;
    if opts.json {
        let text = serde_json::to_string_pretty(&summary.to_json()).expect("JSON values serialize");
        print_stdout(&format!("{text}\n"))
    } else {
        print_stdout(&summary.to_text())
    }
}

/// Loads the model and summarizes it for the inputs given: shapes of the
/// others follow from the declared ones where the given inputs fix their
/// symbols; what is still unknown is probed.
pub fn summarize(
    model: &Path,
    inputs: &InputArgs,
    plugin_dirs: &[PathBuf],
) -> Result<(Model, ModelSummary), Error> {
    let registry = PluginRegistry::new(plugin_dirs);
    let spec = ModelSpec::load(model)?;
    // Before any plugin is loaded: a name the model does not have.
    let given = inputs.match_inputs(&spec)?;
    let model = Model::load(spec, &registry)?;
    let mut known = given_specs(&model, &given)?;
    complete(&model, &mut known, &BTreeMap::new());
    let summary = ModelSummary::for_known_inputs(&model, &known)?;
    Ok((model, summary))
}
