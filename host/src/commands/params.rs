//! `host params`: parameter values (all, or the named ones) as numpy
//! prints them: from the model's parameter file or `--params`, otherwise
//! as initialized from the model's seed.

use std::path::PathBuf;

use crate::commands::inputs::InputArgs;
use crate::commands::inspect::summarize;
use crate::error::Error;
use crate::inspect::format_param_values;
use crate::param_file::ParamFile;
use crate::params::ParamStore;
use crate::print::print_stdout;

/// What `host params` was asked to do.
pub struct ParamsOptions {
    pub model: PathBuf,
    /// Full names (`encoder.self_attn.in_proj_weight`); all when empty.
    pub names: Vec<String>,
    pub params: Option<PathBuf>,
    pub allow_unused_params: bool,
    pub inputs: InputArgs,
    pub plugin_dirs: Vec<PathBuf>,
}

pub fn params(opts: ParamsOptions) -> Result<(), Error> {
    let (model, summary) = summarize(&opts.model, &opts.inputs, &opts.plugin_dirs)?;
    let (infos, store) = match opts.params.as_ref().or(model.spec.params.as_ref()) {
        Some(path) => {
            let file = ParamFile::read(path)?;
            let infos = summary.resolved_params(Some(&file))?;
            let store = ParamStore::from_file(&file, &infos, opts.allow_unused_params)?;
            (infos, store)
        }
        None => {
            let infos = summary.resolved_params(None)?;
            let store = ParamStore::initialize(&infos, model.spec.seed);
            (infos, store)
        }
    };
    model.close()?;
    print_stdout(&format_param_values(&infos, &store, &opts.names)?)
}
