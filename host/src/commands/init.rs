//! `host init`: the parameters initialized from the seed, written to a
//! safetensors file.

use std::path::{Path, PathBuf};

use crate::atomic_file::{check_writable, refuse_overwriting};
use crate::commands::inputs::InputArgs;
use crate::commands::inspect::summarize;
use crate::error::Error;
use crate::params::ParamStore;
use crate::print::print_stdout;

/// What `host init` was asked to do.
pub struct InitOptions {
    pub model: PathBuf,
    pub out: PathBuf,
    /// Instead of the model file's "seed".
    pub seed: Option<u64>,
    pub inputs: InputArgs,
    pub plugin_dirs: Vec<PathBuf>,
}

pub fn init(opts: InitOptions) -> Result<(), Error> {
    // Before anything is loaded: `--out` must not replace the model or an
    // input, and must be writable.
    let inputs: Vec<PathBuf> = opts
        .inputs
        .files
        .iter()
        .flat_map(|f| {
            let named = f.split_once('=').map(|(_, file)| PathBuf::from(file));
            std::iter::once(PathBuf::from(f)).chain(named)
        })
        .collect();
    let mut others: Vec<(&Path, &str)> = vec![(&opts.model, "the model file")];
    others.extend(inputs.iter().map(|p| (p.as_path(), "an input")));
    refuse_overwriting("--out", &opts.out, &others)?;
    check_writable(&opts.out)?;
    let (model, summary) = summarize(&opts.model, &opts.inputs, &opts.plugin_dirs)?;
    let infos = summary.resolved_params(None)?;
    let store = ParamStore::initialize(&infos, opts.seed.unwrap_or(model.spec.seed));
    // As in `run`: a panic in a layer's `Drop` fails before anything is written.
    model.close()?;
    store.save_safetensors(&opts.out)?;
    let values: usize = store.iter().map(|(_, t)| t.len()).sum();
    print_stdout(&format!(
        "wrote {values} parameters in {} tensors to {}\n",
        store.iter().count(),
        opts.out.display()
    ))
}
