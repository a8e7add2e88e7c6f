//! The host as a library of another program (the `layerhost` Python
//! package): a model loaded once and then run on tensors in memory, its
//! parameters read, its summary taken, with every failure sorted into one
//! of four kinds a caller can tell apart.
//!
//! What the command line does with files, [`Session`] does with tensors the
//! caller lends: [`Session::run`] reads its inputs where they are, for the
//! duration of the call, and returns owned outputs. It takes `&self`, so
//! several threads may run one session at once; what a run prepares for one
//! set of input shapes (the plans and the parameters, loaded or
//! initialized) is kept and reused while the shapes stay the same.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use layer_api::DType;
use ndarray::ArrayD;

use crate::commands::inputs::{complete, default_dtype};
use crate::error::Error;
use crate::inspect::ModelSummary;
use crate::isolate;
use crate::model::ModelSpec;
use crate::param_file::ParamFile;
use crate::params::ParamStore;
use crate::registry::PluginRegistry;
use crate::runner::Runner;
use crate::runtime::{LayerPlan, Model, TensorSpec};
use crate::tensor::{Tensor, TensorView};

/// How a model is loaded and run: the command line's `--params`,
/// `--plugin-dir`, `--threads` and the model file's `seed`.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Parameters from this file instead of the model file's `"params"`.
    pub params: Option<PathBuf>,
    pub allow_unused_params: bool,
    /// Searched first, before `LAYER_PLUGIN_PATH`.
    pub plugin_dirs: Vec<PathBuf>,
    /// Threads a run may split a batch across (0: one per core).
    pub threads: usize,
    /// Replaces the model file's seed for parameters no file provides.
    pub seed: Option<u64>,
    /// Runs every layer in a worker process (the command line's
    /// `--isolate`); without it, only the layers the model file isolates.
    pub isolate: bool,
    /// The longest one call into an isolated plugin may take (`--timeout`).
    pub timeout: Option<Duration>,
    /// The `host` executable started as a worker for isolated layers: a
    /// program embedding the host is not one itself.
    pub worker_exe: Option<PathBuf>,
}

/// Held while a model is loaded: isolation settings are the process's,
/// read when a model starts its workers.
static LOADING: Mutex<()> = Mutex::new(());

/// Which part of the work a failure belongs to, for a caller that reports
/// each kind differently (the Python package's exception classes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The model file: unreadable, invalid, or wired wrongly.
    Model,
    /// A plugin: not found, refused, or failing (or panicking) in a call.
    Plugin,
    /// The parameters: the file, or a tensor in it.
    Params,
    /// The inputs given: their names, number, types or shapes.
    Input,
}

/// A host error with its kind. Its message is the command line's, without
/// the `error: ` the command line puts before it.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct Failure {
    pub kind: ErrorKind,
    #[source]
    pub error: Error,
}

/// The step a failure happened in, which decides the kind of errors that
/// do not carry one themselves.
#[derive(Clone, Copy)]
enum Step {
    Load,
    Inputs,
    Params,
    Forward,
}

fn failure(step: Step) -> impl Fn(Error) -> Failure {
    move |error| {
        let kind = match (&error, step) {
            (Error::Layer { panicked: true, .. }, _) => ErrorKind::Plugin,
            // A layer refusing the shape or type it is given while the
            // inputs are planned: the input is what is wrong.
            (Error::Layer { .. }, Step::Inputs) => ErrorKind::Input,
            (
                Error::Plugin { .. }
                | Error::PluginLookup(_)
                | Error::Layer { .. }
                | Error::Worker { .. }
                | Error::Threads(_),
                _,
            ) => ErrorKind::Plugin,
            (Error::Params { .. } | Error::Param { .. }, _) => ErrorKind::Params,
            (Error::InputShape { .. } | Error::InputDtype { .. } | Error::Npy { .. }, _) => {
                ErrorKind::Input
            }
            (_, Step::Params) => ErrorKind::Params,
            (_, Step::Inputs) => ErrorKind::Input,
            (_, Step::Load | Step::Forward) => ErrorKind::Model,
        };
        Failure { kind, error }
    }
}

fn input_error(model: &Model, message: String) -> Failure {
    Failure {
        kind: ErrorKind::Input,
        error: Error::Model {
            path: model.spec.path.clone(),
            message,
        },
    }
}

/// What a run prepares for one set of input types and shapes.
struct Prepared {
    inputs: Vec<TensorSpec>,
    plans: Vec<LayerPlan>,
    params: ParamStore,
}

/// A loaded model, ready to run on tensors in memory.
pub struct Session {
    model: Model,
    options: Options,
    threads: usize,
    /// The last set of inputs prepared for.
    prepared: Mutex<Option<Arc<Prepared>>>,
}

impl Session {
    /// Reads the model file, finds and loads each layer's plugin and
    /// creates its layers. Parameters are loaded (or initialized) at the
    /// first run, once the input shapes are known.
    pub fn open(path: &Path, options: Options) -> Result<Session, Failure> {
        let registry = PluginRegistry::new(&options.plugin_dirs);
        let mut spec = ModelSpec::load(path).map_err(failure(Step::Load))?;
        if let Some(seed) = options.seed {
            spec.seed = seed;
        }
        let model = {
            let _loading = LOADING.lock().unwrap_or_else(|p| p.into_inner());
            let before = isolate::settings();
            isolate::configure(isolate::Settings {
                all: options.isolate,
                timeout: options.timeout,
                sandbox: before.sandbox,
                worker_exe: options.worker_exe.clone(),
            });
            let loaded = Model::load(spec, &registry);
            isolate::configure(before);
            loaded.map_err(failure(Step::Load))?
        };
        let threads = match options.threads {
            0 => crate::runner::default_threads(),
            n => n,
        };
        Ok(Session {
            model,
            options,
            threads,
            prepared: Mutex::new(None),
        })
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The model's input names, in declared order.
    pub fn input_names(&self) -> Vec<String> {
        self.model
            .input_names()
            .iter()
            .map(|n| n.to_string())
            .collect()
    }

    /// The model's output names, in order.
    pub fn output_names(&self) -> Vec<String> {
        self.model.spec.outputs.clone()
    }

    /// The element type input `index` must be lent as, when it comes as
    /// `offered` (see [`Model::input_dtype_of`]).
    pub fn input_dtype(&self, index: usize, offered: DType) -> DType {
        self.model.input_dtype_of(index, offered)
    }

    /// Runs the model on `inputs` (one per model input, in declared order,
    /// each of the type [`Session::input_dtype`] names) and returns every
    /// output, in the model's order. The inputs are read in place, only
    /// during the call.
    pub fn run(&self, inputs: &[TensorView<'_>]) -> Result<Vec<Tensor>, Failure> {
        let names = self.model.input_names();
        if inputs.len() != names.len() {
            return Err(input_error(
                &self.model,
                format!(
                    "the model takes {} input(s) ({}), but {} were given",
                    names.len(),
                    names.join(", "),
                    inputs.len()
                ),
            ));
        }
        let specs: Vec<TensorSpec> = inputs
            .iter()
            .map(|v| TensorSpec::new(v.dtype, v.shape))
            .collect();
        let prepared = self.prepared_for(&specs)?;
        let mut runner = Runner::with_inputs(
            &self.model,
            &prepared.plans,
            &prepared.params,
            &specs,
            self.threads,
        )
        .map_err(failure(Step::Forward))?;
        let outputs = runner
            .run_all(inputs, None)
            .map_err(failure(Step::Forward))?
            .into_iter()
            .cloned()
            .collect();
        runner.close().map_err(failure(Step::Forward))?;
        Ok(outputs)
    }

    /// The plans and parameters for inputs `specs`: the last ones when the
    /// specs are the same, otherwise made (and kept) now.
    fn prepared_for(&self, specs: &[TensorSpec]) -> Result<Arc<Prepared>, Failure> {
        let lock = || self.prepared.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = lock().as_ref().filter(|p| p.inputs == specs) {
            return Ok(Arc::clone(p));
        }
        let plans = self
            .model
            .plan_inputs(specs)
            .map_err(failure(Step::Inputs))?;
        let params = crate::commands::run::load_params(
            &self.model,
            &plans,
            self.options.params.as_ref(),
            self.options.allow_unused_params,
        )
        .map_err(failure(Step::Params))?;
        let prepared = Arc::new(Prepared {
            inputs: specs.to_vec(),
            plans,
            params,
        });
        *lock() = Some(Arc::clone(&prepared));
        Ok(prepared)
    }

    /// Why this model's inputs of `shapes` (by name) cannot be cut into
    /// blocks of rows run separately (the outputs joined) with the same
    /// result as one run of the whole, or `None` when they can: every layer
    /// is batch-independent and keeps the rows. What the command line
    /// checks before streaming.
    pub fn row_sharding_refusal(
        &self,
        shapes: &[(String, Vec<usize>)],
    ) -> Result<Option<String>, Failure> {
        let known = self.known_inputs(shapes)?;
        let Some(specs) = known.into_iter().collect::<Option<Vec<TensorSpec>>>() else {
            return Err(input_error(
                &self.model,
                format!(
                    "give the shape of every input ({}) to check row sharding",
                    self.model.input_names().join(", ")
                ),
            ));
        };
        let plans = self
            .model
            .plan_inputs(&specs)
            .map_err(failure(Step::Inputs))?;
        Ok(crate::stream::check_chunkable(&self.model, &plans)
            .err()
            .map(|reason| reason.to_string()))
    }

    /// The shapes of the inputs given by name (the others worked out from
    /// their declared shapes where possible), each of the type it is
    /// planned with.
    fn known_inputs(
        &self,
        shapes: &[(String, Vec<usize>)],
    ) -> Result<Vec<Option<TensorSpec>>, Failure> {
        let names = self.model.input_names();
        let mut known: Vec<Option<TensorSpec>> = vec![None; names.len()];
        for (name, shape) in shapes {
            let index = names.iter().position(|n| n == name).ok_or_else(|| {
                input_error(
                    &self.model,
                    format!(
                        "the model has no input '{name}'; its inputs are: {}",
                        names.join(", ")
                    ),
                )
            })?;
            known[index] = Some(TensorSpec::new(default_dtype(&self.model, index), shape));
        }
        complete(&self.model, &mut known, &Default::default());
        Ok(known)
    }

    /// What `host inspect --json` prints, for the input shapes given by
    /// name (none: probed, as the command line does without
    /// `--input-shape`).
    pub fn inspect(&self, shapes: &[(String, Vec<usize>)]) -> Result<serde_json::Value, Failure> {
        let known = self.known_inputs(shapes)?;
        let summary =
            ModelSummary::for_known_inputs(&self.model, &known).map_err(failure(Step::Inputs))?;
        Ok(summary.to_json())
    }

    /// Every stored parameter, by its full name, in layer order: copies of
    /// the values a run with inputs of `shapes` uses (loaded from the
    /// parameter file, or initialized from the seed), as `host params`
    /// shows them.
    pub fn params(
        &self,
        shapes: &[(String, Vec<usize>)],
    ) -> Result<Vec<(String, ArrayD<f32>)>, Failure> {
        let known = self.known_inputs(shapes)?;
        let summary =
            ModelSummary::for_known_inputs(&self.model, &known).map_err(failure(Step::Inputs))?;
        let params_file = self
            .options
            .params
            .as_ref()
            .or(self.model.spec.params.as_ref());
        let (infos, store) = match params_file {
            Some(path) => {
                let file = ParamFile::read(path).map_err(failure(Step::Params))?;
                let infos = summary
                    .resolved_params(Some(&file))
                    .map_err(failure(Step::Params))?;
                let store = ParamStore::from_file(&file, &infos, self.options.allow_unused_params)
                    .map_err(failure(Step::Params))?;
                (infos, store)
            }
            None => {
                let infos = summary
                    .resolved_params(None)
                    .map_err(failure(Step::Params))?;
                let store = ParamStore::initialize(&infos, self.model.spec.seed);
                (infos, store)
            }
        };
        Ok(infos
            .iter()
            .filter(|info| info.is_stored())
            .filter_map(|info| {
                store
                    .get(&info.name)
                    .map(|values| (info.name.clone(), values.clone()))
            })
            .collect())
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // A panic in a layer's `Drop` is reported by `close` as an error;
        // nobody is left to tell, and it must not unwind out of a drop.
        let _ = self.model.close();
    }
}

/// One plugin library found, as `host plugins` lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginListing {
    pub name: String,
    pub version: String,
    /// The interface version it was built for, `major.minor`.
    pub interface: String,
    pub description: String,
    pub path: PathBuf,
}

/// Every plugin library in `plugin_dirs`, then `LAYER_PLUGIN_PATH`, read
/// without being opened, and a message for each library file that could
/// not be read (`host plugins` prints these as warnings).
pub fn plugins(plugin_dirs: &[PathBuf]) -> (Vec<PluginListing>, Vec<String>) {
    let registry = PluginRegistry::new(plugin_dirs);
    let mut found = Vec::new();
    let mut problems = Vec::new();
    for (path, inspected) in registry.discover() {
        match inspected {
            Ok(p) => found.push(PluginListing {
                name: p.manifest.name.clone(),
                version: p.manifest.version.clone(),
                interface: format!("{}.{}", p.manifest.abi.0, p.manifest.abi.1),
                description: p.manifest.description.clone(),
                path,
            }),
            Err(e) => problems.push(format!("skipped {e}")),
        }
    }
    (found, problems)
}
